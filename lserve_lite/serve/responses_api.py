"""OpenAI's Responses API (POST /v1/responses) run on the chat completions path: a request's input, instructions,
tools and text format become a chat body (same validation, limits, template, sampling and tool calls), and the
chat reply, whole or streamed, becomes a response object or its events, kept (`store`) for GET and for
`previous_response_id` in a ResponseStore."""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import InvalidRequestError
from ..sampling_params import refuse_set
from .protocol import CHAT_REFUSED, ApiError, check_top_logprobs, now
from .response_store import ResponseStore, Stored
from .responses import EventStream, sse

# Responses fields this server cannot honour, each with its value that means "off" (accepted, as is null)
REFUSED: dict[str, tuple[object, str]] = {
    "conversation": (
        None,
        "conversations are not stored: chain responses with previous_response_id, or send the whole "
        "conversation in input",
    ),
    "background": (
        False,
        "responses run while the request is open: send stream: true to read one as it is written",
    ),
    "reasoning": ({}, "no reasoning effort or summaries"),
    "prompt": (None, "no stored prompts: send the text in input"),
    "max_tool_calls": (None, "parallel_tool_calls: false allows one call a response"),
}
LOGPROBS = "message.output_text.logprobs"  # the one `include` item served: the text's token logprobs
ROLES = ("user", "system", "developer", "assistant")
PARTS = ("input_text", "output_text")  # the text parts of a message; images, files and audio are refused
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512  # OpenAI's limits
ITEMS_PAGE = 100  # the most input items a page lists (OpenAI's limit)
# the prefixes of stored input items' ids
ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
# the chat fields that errors of the chat path name, as a Responses request spells them
_RENAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
_MESSAGES = re.compile(r"^messages(\[\d+\])?")
_TOOL_FUNCTION = re.compile(r"(tools\[\d+\])\.function\.")


def chat_body(body: dict, earlier: list[dict] | None = None) -> dict:
    """A Responses request as the chat completions body that runs it, after the `earlier` items of a chained
    conversation; what this server cannot honour is refused in one line naming its field (the chat path checks the
    rest, `renamed` puts its errors in these names)."""
    for name, (off, instead) in REFUSED.items():
        try:
            refuse_set(name, body.get(name), off, instead)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), name) from None
    if body.get("truncation") not in (None, "disabled"):
        raise ApiError(
            400, "truncation: only 'disabled' (a conversation over the context is refused)", "truncation"
        )
    for name in ("instructions", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError(400, f"{name}: must be a string", name)
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise ApiError(400, "store: must be a boolean", "store")
    check_metadata(body.get("metadata"))
    chat = chat_logprobs(body.get("include"), body.get("top_logprobs"))
    # vLLM's salt; and what chat refuses, set, is refused (not ignored) there
    passed = ("model", "temperature", "top_p", "parallel_tool_calls", "stream", "cache_salt", *CHAT_REFUSED)
    chat |= {k: body[k] for k in passed if k in body}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream") is True:  # the usage that response.completed carries
        chat["stream_options"] = {"include_usage": True}
    system = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    chat["messages"] = system + input_messages(earlier or []) + input_messages(body.get("input"))
    if body.get("tools") is not None:
        chat["tools"] = chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    form = text_format(body.get("text"))
    if form is not None:
        chat["response_format"] = form
    return chat


def chat_logprobs(include: object, top: object) -> dict:
    """`include` of the text's logprobs, with `top_logprobs` alternatives, as chat's fields (chat checks the
    count's range: 0-20); other items are refused in one line naming the field. `top_logprobs` without the item
    returns no logprobs, as OpenAI's API does."""
    items = [] if include is None else include
    if not isinstance(items, list) or any(x != LOGPROBS for x in items):
        raise ApiError(400, f"include: only {LOGPROBS!r} is supported (the text's token logprobs), got "
                       f"{include!r:.80}", "include")  # fmt: skip
    if not items:  # OpenAI's rule: the count alone is checked, and no logprobs come (an empty list)
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise ApiError(400, f"top_logprobs must be an integer, got {top!r:.40}", "top_logprobs")
        check_top_logprobs(top)
        return {}
    return {"logprobs": True, "top_logprobs": 0 if top is None else top}


def check_metadata(meta: object) -> None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if meta is None:
        return
    if not isinstance(meta, dict) or len(meta) > METADATA_PAIRS:
        raise ApiError(400, f"metadata: must be an object of at most {METADATA_PAIRS} pairs", "metadata")
    for k, v in meta.items():
        if len(k) > METADATA_KEY or not isinstance(v, str) or len(v) > METADATA_VALUE:
            raise ApiError(400, f"metadata: keys of at most {METADATA_KEY} characters, string values of at most "
                           f"{METADATA_VALUE}", "metadata")  # fmt: skip


def input_messages(items: object) -> list[dict]:
    """`input` as chat messages: a string is the user's message; a list holds messages (text content), and
    function calls and their outputs, which become an assistant turn's tool_calls and tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise ApiError(400, "input: must be a string or a list of items", "input")
    msgs: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise ApiError(
                    400, f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r:.40}", "input"
                )
            msgs.append({"role": role, "content": text_content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            fields = [item.get(k) for k in ("call_id", "name", "arguments")]
            if not all(isinstance(f, str) for f in fields):
                raise ApiError(
                    400, f"{where}: a function_call has call_id, name and arguments strings", "input"
                )
            call = {
                "id": fields[0],
                "type": "function",
                "function": {"name": fields[1], "arguments": fields[2]},
            }
            if not msgs or msgs[-1]["role"] != "assistant":  # calls after the assistant's text: the same turn
                msgs.append({"role": "assistant", "content": None})
            msgs[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"{where}.call_id: must be a string", "input")
            out = text_content(item.get("output"), f"{where}.output")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"], "content": out})
        else:
            raise ApiError(400, f"{where}: items of type {kind!r:.40} are not supported (messages of text, "
                           "function_call and function_call_output)", "input")  # fmt: skip
    return msgs


def text_content(content: object, where: str) -> str | list[dict]:
    """A message's content (a string, or input_text / output_text parts) as chat's."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: must be a string or a list of input_text parts", "input")
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind not in PARTS or not isinstance(p.get("text"), str):
            raise ApiError(400, f"{where}[{j}]: parts of type {kind!r:.40} are not supported (input_text or "
                           "output_text, with a text string)", "input")  # fmt: skip
        parts.append({"type": "text", "text": p["text"]})
    return parts


def chat_tools(tools: object) -> list:
    """Function tools as chat spells them; `strict` (absent or null) defaults to true, as OpenAI's Responses API
    has it."""
    if not isinstance(tools, list):
        raise ApiError(400, "tools: must be a list of function tools", "tools")
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise ApiError(400, f"tools[{i}]: tools of type {kind!r:.40} are not supported (built-in tools run on "
                           "OpenAI's servers; send function tools)", "tools")  # fmt: skip
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        strict = t.get("strict")
        out.append({"type": "function", "function": fn | {"strict": True if strict is None else strict}})
    return out


def chat_tool_choice(choice: object) -> object:
    """`tool_choice` as chat spells it: a named function's {"type": "function", "name"} nests its name."""
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(400, "tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                   "tool_choice")  # fmt: skip


def text_format(text: object) -> dict | None:
    """`text.format` as chat's response_format (json_schema's name, schema and strict nest in `json_schema`)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ApiError(400, "text: must be an object", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise ApiError(
            400, "text.verbosity is not supported (the model writes as it writes)", "text.verbosity"
        )
    form = text.get("format")
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        return form
    schema = {k: form[k] for k in ("name", "description", "schema", "strict") if k in form}
    return {"type": "json_schema", "json_schema": schema}


def renamed(e: ApiError) -> ApiError:
    """An error of the chat path in the Responses request's field names."""
    msg = _TOOL_FUNCTION.sub(r"\1.", _MESSAGES.sub("input", e.message))
    param = "input" if e.param == "messages" else e.param
    for old, new in _RENAMES.items():
        msg, param = msg.replace(old, new), new if param == old else param
    return ApiError(e.status, msg, param, e.code)


def earlier_items(rid: object, store: ResponseStore) -> list[dict]:
    """The conversation that `previous_response_id` continues (on the event loop, which alone reads the store)."""
    param = "previous_response_id"
    if rid is None:
        return []
    if not isinstance(rid, str):
        raise ApiError(400, f"{param}: must be a string", param)
    if not store.enabled:
        raise ApiError(400, f"{param}: this server stores no responses (--responses-store 0): send the whole "
                       "conversation in input", param)  # fmt: skip
    entry = store.get(rid)
    if entry is None:
        raise ApiError(400, f"{param}: no stored response with id {rid!r:.80}", param, "not_found")
    return entry.conversation()


def stored_items(items: object) -> list[dict]:
    """The request's input items (checked by chat_body) as kept: a string is a user message; each has an id."""
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    out = []
    for item in items:
        kind = item.get("type", "message")
        out.append({"id": f"{ITEM_IDS[kind]}_{uuid.uuid4().hex}", "type": kind} | item)
    return out


def stored_reply(store: ResponseStore, method: str, path: str, query: dict[str, str]) -> dict:
    """GET /v1/responses/{id} (the response), GET .../{id}/input_items (a page of its input items), DELETE
    /v1/responses/{id} (OpenAI's deleted object)."""
    rid, _, sub = path.partition("/")
    if sub not in ("", "input_items") or (sub and method != "GET"):
        raise ApiError(404, f"{method} /v1/responses/{path[:80]} is not served (GET /v1/responses/ID, its "
                       "/input_items, DELETE /v1/responses/ID)")  # fmt: skip
    entry = store.get(rid)
    if entry is None:
        raise ApiError(404, f"no stored response with id {rid!r:.80}", "response_id", "not_found")
    if sub:
        return items_page(entry.items, query)
    if query.get("stream", "false") != "false":  # OpenAI's replay of a background response's events
        raise ApiError(
            400, "stream: a stored response is returned whole (no background responses here)", "stream"
        )
    if method == "DELETE":
        store.pop(rid)
        return {"id": rid, "object": "response", "deleted": True}
    return entry.response


def items_page(items: list[dict], query: dict[str, str]) -> dict:
    """OpenAI's list of input items: `order` desc (its default: the last first) or asc, up to `limit` (20) after
    the item of id `after`."""
    limit, order, after = query.get("limit", "20"), query.get("order", "desc"), query.get("after")
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 3 and 1 <= int(limit) <= ITEMS_PAGE):
        raise ApiError(400, f"limit: must be an integer from 1 to {ITEMS_PAGE}", "limit")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order: must be 'asc' or 'desc'", "order")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        start = next((i + 1 for i, item in enumerate(ordered) if item["id"] == after), None)
        if start is None:
            raise ApiError(400, f"after: no input item with id {after!r:.80}", "after")
    data = ordered[start : start + int(limit)]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + len(data) < len(ordered)}  # fmt: skip


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def shell(rid: str, body: dict, model: str, status: str, stored: bool = False) -> dict:
    """The response object without its output and usage: the request's settings, echoed as OpenAI does."""
    form = (body.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": now(), "status": status, "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "metadata": body.get("metadata") or {},
        "model": model, "output": [], "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"), "reasoning": None, "store": stored,
        "temperature": body.get("temperature"), "text": {"format": form},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_p": body.get("top_p"), "truncation": "disabled", "usage": None, "user": body.get("user"),
    }  # fmt: skip


def finished(response: dict, finish: str | None, use: dict | None) -> dict:
    """`response` ended by a chat finish reason: completed, or incomplete where max_output_tokens cut it."""
    cut = finish == "length"
    response["status"] = "incomplete" if cut else "cancelled" if finish == "abort" else "completed"
    response["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
    response["usage"] = use and response_usage(use)
    return response


def response_usage(use: dict) -> dict:
    """Chat's usage in the Responses shape (the details objects the clients' models require)."""
    cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": use["prompt_tokens"], "output_tokens": use["completion_tokens"],
            "total_tokens": use["total_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip


def text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    """A message item's output_text part (no annotations here), with its tokens' logprobs where `include`d."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(text: str, status: str, logprobs: list[dict] | None = None) -> dict:
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text, logprobs)] if text or status != "in_progress" else []}  # fmt: skip


def entries(logprobs: dict | None) -> list[dict]:
    """A chat choice's or delta's logprob entries (token, logprob, bytes, top_logprobs: the Responses shape too)."""
    return (logprobs or {}).get("content") or []


def text_logprobs(lps: list[dict], text: str, calls: list) -> list[dict]:
    """The entries of a reply's text: all of them, or beside calls those before the first call (the tokens whose
    text, decoded as the reply's, the text begins with; a call carries none), as a stream sends them."""
    if not calls:
        return lps
    utf8, seen, out = codecs.getincrementaldecoder("utf-8")("replace"), "", []
    for e in lps:
        seen += utf8.decode(bytes(e["bytes"]))
        if not text.startswith(seen):
            break
        out.append(e)
    return out


def call_item(call: dict, status: str) -> dict:
    fn = call["function"]
    return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"] if status != "in_progress" else "", "status": status}  # fmt: skip


def last_status(finish: str | None) -> str:
    """The status of a reply's last item (text or a call): incomplete where max_output_tokens or an abort cut it;
    the items before it are whole."""
    return "incomplete" if finish in ("length", "abort") else "completed"


def response_object(rid: str, body: dict, reply: dict, stored: bool = False) -> dict:
    """A chat completion (one choice) as a response: its text a message item, its calls function_call items."""
    (choice,) = reply["choices"]
    msg, finish = choice["message"], choice["finish_reason"]
    calls = msg.get("tool_calls") or []
    content = msg["content"] or ""
    lps = text_logprobs(entries(choice["logprobs"]), content, calls)
    text = [message_item(content, "completed", lps)] if msg["content"] or not calls else []
    response = shell(rid, body, reply["model"], "completed", stored)
    response["output"] = text + [call_item(c, "completed") for c in calls]
    response["output"][-1]["status"] = last_status(finish)
    return finished(response, finish, reply["usage"])


class ResponseEvents:
    """A chat stream's chunks as the Responses API's events, each numbered in `sequence_number`. The last item
    stays open (its done events held) until the next begins or the reply ends: the end says whether it was cut.
    Logprob entries (`take`) go out with the next text delta, those of a call's tokens with none."""

    def __init__(self, response: dict):
        self.response, self.seq = response, 0
        self.open: dict | None = None  # the item not yet done: a message (its text in `text`) or a call
        self.text = ""
        self.lps: list[dict] = []  # the open message's logprob entries
        self.pending: list[dict] = []  # entries of tokens whose text is not sent yet
        self.called = False  # a call was made: the entries after it are no text's

    def take(self, lps: list[dict]) -> None:
        """A chunk's logprob entries, before its text: text that follows before any call sends them."""
        if not self.called:
            self.pending += lps

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": self.seq - 1} | fields)

    def where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.response["output"].index(item)}

    def add(self, item: dict) -> list[str]:
        """A new item, the open one done (whole) first."""
        out = self.close("completed")
        self.response["output"].append(item)
        self.open = item
        index = len(self.response["output"]) - 1
        return out + [self.event("response.output_item.added", output_index=index, item=item)]

    def write(self, text: str) -> list[str]:
        """Text of the reply: a message item (with its output_text part) opened at the first."""
        out = []
        if self.open is None or self.open["type"] != "message":
            out += self.add(message_item("", "in_progress"))
            out.append(self.event("response.content_part.added", **self.where(self.open), content_index=0,
                                  part=text_part("")))  # fmt: skip
            self.text, self.lps = "", []
        self.text += text
        lps, self.pending = self.pending, []
        self.lps += lps
        delta = self.event("response.output_text.delta", **self.where(self.open), content_index=0, delta=text,
                           logprobs=lps)  # fmt: skip
        return out + [delta]

    def call(self, delta: dict) -> list[str]:
        """A call's delta in chat's stream: its first (id, name) opens the call's item; its arguments, whole or a
        piece, go out as an arguments delta (the done event comes when the item closes)."""
        out = []
        if "id" in delta:
            self.called, self.pending = True, []
            out = self.add(call_item(delta, "in_progress"))
        item, args = self.open, delta["function"]["arguments"]
        if args:
            item["arguments"] += args
            out.append(self.event("response.function_call_arguments.delta", **self.where(item), delta=args))
        return out

    def close(self, status: str) -> list[str]:
        """The open item's done events, with `status`."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        at, out = self.where(item), []
        if item["type"] == "message":
            part = text_part(self.text, self.lps)
            item["content"] = [part]
            out = [
                self.event(
                    "response.output_text.done", **at, content_index=0, text=self.text, logprobs=self.lps
                ),
                self.event("response.content_part.done", **at, content_index=0, part=part),
            ]
        else:
            args, name = item["arguments"], item["name"]
            out = [self.event("response.function_call_arguments.done", **at, name=name, arguments=args)]
        return out + [self.event("response.output_item.done", output_index=at["output_index"], item=item)]

    def end(self, finish: str | None, use: dict | None) -> list[str]:
        """The last events: the open item done (an empty reply is a message of no text, as whole; entries of text not
        sent, such as a stop string's or EOS's, go in a delta of none), and the response completed, or incomplete where
        max_output_tokens cut it."""
        out = self.write("") if self.pending or not self.response["output"] else []
        out += self.close(last_status(finish))
        done = finished(self.response, finish, use)
        kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        return out + [self.event(kind, response=done)]

    def failed(self, error: dict) -> list[str]:
        """An error after the response began: OpenAI's error event, then response.failed."""
        self.response |= {"status": "failed", "error": {"code": "server_error", "message": error["message"]}}
        return [self.event("error", code=error.get("code"), message=error["message"], param=error.get("param")),
                self.event("response.failed", response=self.response)]  # fmt: skip


async def response_events(
    response: dict, chunks: AsyncIterator[str], keep: Callable[[dict], None] | None = None
) -> AsyncIterator[str]:
    """The Responses events of a chat stream (one choice, with its usage chunk) that `response` (`shell`) heads;
    `keep` gets the response at the end: completed, incomplete, failed, or cancelled where the client left."""
    ev = ResponseEvents(response)
    try:
        yield ev.event("response.created", response=response)
        yield ev.event("response.in_progress", response=response)
        finish = None
        async for raw in chunks:
            data = raw.removeprefix("data: ").strip()
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                for e in ev.failed(chunk["error"]):
                    yield e
                return
            for choice in chunk["choices"]:
                delta = choice["delta"]
                ev.take(entries(choice.get("logprobs")))
                for e in ev.write(delta["content"]) if delta.get("content") else []:
                    yield e
                for call in delta.get("tool_calls") or []:
                    for e in ev.call(call):
                        yield e
                finish = choice["finish_reason"] or finish
            if chunk.get("usage"):
                for e in ev.end(finish, chunk["usage"]):
                    yield e
    finally:
        if response["status"] == "in_progress":  # the client left: its request was aborted
            ev.close("incomplete")
            response["status"] = "cancelled"
        if keep is not None:
            keep(response)


def prepare(body: dict, earlier: list[dict], stored: bool) -> tuple[dict, list[dict], int]:
    """The chat body, and for a response to keep its input items and the JSON size of what it will hold (the
    request, the earlier items; its output is counted at its end)."""
    chat = chat_body(body, earlier)
    if not stored:
        return chat, [], 0
    return chat, stored_items(body.get("input")), len(json.dumps([earlier, body]))


async def create_response(
    body: dict, model: str, run: Callable[[dict], Awaitable[dict | EventStream]], store: ResponseStore
) -> dict | EventStream:
    """POST /v1/responses: `body` run as chat completions by `run` (the server's chat path), its reply reshaped and,
    unless `store` is false, kept in `store` (a stream at its end)."""
    rid = new_response_id()
    earlier = earlier_items(body.get("previous_response_id"), store)
    stored = store.enabled and body.get("store") is not False
    # off the event loop, as the chat path's checks
    chat, items, size = await asyncio.to_thread(prepare, body, earlier, stored)

    def keep(response: dict) -> None:
        if stored:  # its output's size is bounded by the tokens it generated
            store.put(Stored(response, items, earlier, size + len(json.dumps(response["output"]))))

    try:
        reply = await run(chat)
    except ApiError as e:
        raise renamed(e) from None
    if isinstance(reply, EventStream):
        events = response_events(shell(rid, body, model, "in_progress", stored), reply.body_iterator, keep)
        return EventStream(reply.handles, events)
    response = response_object(rid, body, reply, stored)
    keep(response)
    return response
