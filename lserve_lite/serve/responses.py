"""Response bodies and SSE streams of one request's choices (prompts x n candidates, each an engine
request): text, echo, logprobs, finish reasons and usage, in OpenAI's completion and chat shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.llm_engine import StepOutput
from ..engine.structured import failure
from ..engine.tool_calls import ToolPlan, ToolStream, finish_reason
from .async_engine import RequestHandle
from .logprobs import LogprobFormatter, TextOffsets
from .protocol import ApiError, usage


class Choices:
    """How one request's choices are shaped: choice i answers prompt i // n."""

    def __init__(
        self,
        chat: bool,
        req,
        tools: ToolPlan | None,
        prompts: list[list[int]],
        prompt_texts: list[str],
        fmt: LogprobFormatter,
    ):
        self.chat, self.req, self.prompts, self.fmt = chat, req, prompts, fmt
        self.n = req.n
        self.echo = not chat and bool(req.echo)
        self.prompt_texts = prompt_texts
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.scores_only = not chat and req.scores_only  # the generated token is left out
        self.tools = tools  # the request's tool plan (chat), its call ids as the template takes them

    def grammar_failed(self, out: StepOutput) -> ApiError:
        """The 400 of a reply whose grammar gave up mid-reply (LLMEngine._append cut it), naming the field that
        set the grammar: a forced tool choice's calls, or strict tools' grammar, comes from `tools`; one
        that holds the request's own format beside the tools names that format (ToolPlan.field)."""
        why = f"constrained decoding failed after {out.num_output_tokens} tokens ({failure(out.seq)})"
        if self.tools and self.tools.holds and self.tools.field == "tools":
            return ApiError(400, f"tools: {why}; simpler function parameters avoid it", "tools")
        return ApiError(400, f"response_format: {why}; a simpler schema avoids it", "response_format")

    def echo_part(self, i: int, seq) -> tuple[str, list, list[int]]:
        """The echoed prompt of choice i: its text, its logprob entries and ids (empty without echo)."""
        if not self.echo:
            return "", [], []
        ids = self.prompts[i // self.n]
        entries = seq.prompt_logprobs if seq is not None and seq.prompt_logprobs else [None] * len(ids)
        return self.prompt_texts[i // self.n], entries, ids

    def logprobs(
        self, lps: list, offsets: TextOffsets, echo: tuple[str, list, list[int]] = ("", [], [])
    ) -> dict | None:
        """Logprobs of generated entries `lps`, after the echoed prompt's part (`echo_part`) where it is given."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return self.fmt.chat(lps)
        text, entries, ids = echo
        first = self.fmt.echo(text, entries, ids, offsets) if ids else None  # first: it moves `offsets` on
        out = self.fmt.completion(lps, [e.token_id for e in lps], offsets)
        return {k: v + out[k] for k, v in first.items()} if first else out

    def choice(self, i: int, text: str, last: StepOutput, lps: list) -> dict:
        """A non-streamed choice."""
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            finish = last.finish_reason
            if self.tools:
                message["content"], calls, finish = self.tools.reply(text, finish)
                if calls:
                    message["tool_calls"] = calls
            return {
                "index": i,
                "message": message,
                "logprobs": self.logprobs(lps, TextOffsets()),
                "finish_reason": finish,
            }
        echo = self.echo_part(i, last.seq)
        if self.scores_only:
            text, lps = "", []
        lp = self.logprobs(lps, TextOffsets(), echo)
        return {"index": i, "text": echo[0] + text, "logprobs": lp, "finish_reason": self.finish(last)}

    def finish(self, last: StepOutput) -> str | None:
        return "length" if self.scores_only else last.finish_reason

    def usage(self, lasts: list[StepOutput]) -> dict:
        """Prompt tokens once per prompt; cached: per prompt, the most any of its candidates took from cache."""
        cached = [
            max(o.num_cached_tokens for o in lasts[k : k + self.n]) for k in range(0, len(lasts), self.n)
        ]
        out = 0 if self.scores_only else sum(o.num_output_tokens for o in lasts)
        return usage(sum(map(len, self.prompts)), out, sum(cached))


async def merged(handles: list[RequestHandle], shape: Choices) -> AsyncIterator[tuple[int, StepOutput]]:
    """(choice index, output) of all handles as they come; the first error is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for out in h:
                if out.error:  # the request failed (logits it could not sample): its line, not garbage
                    raise ApiError(500, out.error)
                if out.finish_reason == "error":  # the grammar gave up: the reply is cut
                    raise shape.grammar_failed(out)
                await queue.put((i, out))
        except ApiError as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, ApiError):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect(request: Request, handles: list[RequestHandle], shape: Choices) -> tuple[list[dict], dict]:
    """All choices of a non-streamed request; a client that goes away meanwhile aborts them."""
    watch = asyncio.create_task(_on_disconnect(request, lambda: close_all(handles)))
    texts = [[] for _ in handles]
    lps = [[] for _ in handles]
    lasts: list[StepOutput | None] = [None] * len(handles)
    try:
        async for i, out in merged(handles, shape):
            texts[i].append(out.text)
            lps[i] += out.logprobs
            lasts[i] = out
    finally:
        watch.cancel()
        close_all(handles)
    choices = [
        shape.choice(i, "".join(t), last, lp) for i, (t, last, lp) in enumerate(zip(texts, lasts, lps))
    ]
    return choices, shape.usage(lasts)


def close_all(handles: list[RequestHandle]) -> None:
    for h in handles:
        h.close()


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    callback()


# Characters that str.splitlines (so httpx's iter_lines, and SSE clients built on it) takes for line ends, which
# json.dumps leaves raw: escaped, a chunk's JSON stays on its one data line
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


async def sse_events(
    handles: list[RequestHandle],
    base: dict,
    shape: Choices,
    include_usage: bool,
    on_error: Callable[[ApiError], None] = lambda e: None,
) -> AsyncIterator[str]:
    """OpenAI stream chunks, then (with include_usage) a usage chunk, then `data: [DONE]`; an error after the
    response started is an error event, and `on_error` hears of it (the server counts it in its metrics)."""
    extra = {"usage": None} if include_usage else {}
    offsets = [TextOffsets() for _ in handles]
    started = [False] * len(handles)
    tools = [ToolStream(shape.tools) if shape.tools else None for _ in handles]
    wrote = [False] * len(handles)  # whether a choice's content was sent

    def chunk(
        i: int, text: str | None, lp: dict | None = None, finish: str | None = None, role: bool = False,
        calls: list[dict] | None = None,
    ):  # fmt: skip
        if shape.chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return sse(base | {"choices": [choice]} | extra)

    try:
        if shape.chat:  # no content yet: a reply of tool calls alone streams as its content null, as whole
            for i in range(len(handles)):
                yield chunk(i, None, role=True)
        lasts: list[StepOutput | None] = [None] * len(handles)
        async for i, out in merged(handles, shape):
            echo = ("", [], []) if started[i] else shape.echo_part(i, out.seq)
            started[i] = True
            new, new_lps = ("", []) if shape.scores_only else (out.text, out.logprobs)
            text, calls = (echo[0] + new, []) if tools[i] is None else tools[i].deltas(new, out.finished)
            if text or new_lps or echo[2]:
                lp = shape.logprobs(new_lps, offsets[i], echo)
                # chat: logprobs without text carry no content (a reply of calls alone stays content null)
                yield chunk(i, text if text or not shape.chat else None, lp)
                wrote[i] = wrote[i] or bool(text)
            # a call's first delta (id, name), then pieces of its arguments (ToolStream.deltas)
            for call in calls:
                yield chunk(i, None, calls=[call])
            if out.finished:
                lasts[i] = out
                ncalls = tools[i].made if tools[i] else 0
                # a reply that sent no content and made no calls is empty: its content is "", as whole
                empty = None if wrote[i] or ncalls else ""
                made = ncalls > 0 and not tools[i].cut  # whole calls
                yield chunk(i, empty, finish=finish_reason(shape.finish(out), made))
        if include_usage:
            yield sse(base | {"choices": [], "usage": shape.usage(lasts)})
    except ApiError as e:
        on_error(e)
        yield sse(e.body())
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that aborts its requests however the response ends (done, disconnect, error)."""

    def __init__(self, handles: list[RequestHandle], events: AsyncIterator[str]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self.handles)
