"""The Python API: LLM.generate / chat / stream / logits over one engine."""

from __future__ import annotations

import numbers
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from .config import EngineConfig
from .engine.llm_engine import LLMEngine, StepOutput
from .engine.tool_calls import call_form, plan_tools, prompt_messages
from .errors import InvalidRequestError, LServeError
from .sampling_params import MAX_LOGPROBS, SamplingParams, check_seed, refuse_set
from .sequence import TokenLogprob
from .tokenizer import Tokenizer, check_contents

# vLLM's engine arguments that go by another name here: code ported from vLLM passes them, and is told the name
VLLM_ENGINE_ARGS = {
    "tensor_parallel_size": "tensor_parallel",
    "enable_prefix_caching": "prefix_caching",
    "kv_cache_dtype": "kv_dtype",
    "quantization": "quantize",
    "block_size": "page_size",
    "gpu_memory_utilization": "kv_memory_fraction, the share of the free memory the KV cache takes",
    "enforce_eager": "cuda_graphs=False",
}
# vLLM's engine arguments with no counterpart here, and what to do instead
VLLM_ENGINE_ONLY = {
    "dtype": "weights run in the backend's float type; quantize='int8' or 'int4' quantizes them",
    "trust_remote_code": "no code from the model files is run: leave it out",
    "tokenizer": "the tokenizer is the model's own, from its directory or GGUF file",
    "download_dir": "nothing is downloaded: give a model directory or a GGUF file",
    "swap_space": "no KV swapping to host memory",
    "enable_chunked_prefill": "prefill is always chunked by max_num_batched_tokens",
    "disable_log_stats": "no stats are logged: leave it out",
    "max_seq_len_to_capture": "CUDA Graphs capture decode steps of any context: leave it out",
    "revision": "nothing is downloaded: fetch that revision into a directory and give it",
    "hf_token": "nothing is downloaded: give a model directory or a GGUF file",
    "tokenizer_mode": "the tokenizer is the model's own, from its directory or GGUF file",
    "pipeline_parallel_size": "no pipeline parallelism: tensor_parallel splits the model over GPUs",
    "enable_lora": "no LoRA adapters",
    "speculative_config": "no speculative decoding",
    "max_logprobs": f"SamplingParams(logprobs=k) takes k up to {MAX_LOGPROBS}",
    "cpu_offload_gb": "weights stay in device memory: quantize='int8' or 'int4' makes them smaller",
}


@dataclass
class CompletionOutput:
    """A finished request: its text, generated ids and why it stopped ("stop", "length", "abort", or "error": its
    response_format grammar gave up mid-reply, so the text is cut, or the request failed, `error` saying why). It
    also reads as vLLM's RequestOutput of one candidate (`outputs`, `prompt`, `request_id`, `finished`), so code
    ported from vLLM runs unchanged."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # per generated token, with SamplingParams(logprobs=k)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, with prompt_logprobs=k
    tool_calls: list[dict] | None = None  # chat with tools: the calls made (OpenAI's shape); `text` the rest
    # vLLM's: the prompt's text (chat: as rendered; None for a prompt of token ids), the request's id, which of
    # its prompt's n candidates this is, the stop token id or stop string that ended it (None: EOS, length), and
    # how many prompt tokens the prefix cache served
    prompt: str | None = None
    request_id: str = ""
    index: int = 0
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # why the request failed, in one line (finish_reason "error"; e.g. logits it could not sample), the rest of its
    # batch run to their end; None else, and where a response_format grammar gave up
    error: str | None = None

    @property
    def outputs(self) -> list[CandidateOutput]:
        """vLLM's RequestOutput.outputs: this candidate as vLLM's CompletionOutput (a copy of its fields, whose
        `finished()` is a method), so `out.outputs[0].text` is `out.text`. With n > 1 generate returns the n
        candidates of a prompt as n outputs in a row, each holding one."""
        return [CandidateOutput(**{f.name: getattr(self, f.name) for f in fields(self)})]

    @property
    def finished(self) -> bool:
        """vLLM's RequestOutput.finished: generate and chat return finished requests only."""
        return True

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the generated tokens' logprobs, with SamplingParams(logprobs=k); else None."""
        return None if self.logprobs is None else float(sum(t.logprob for t in self.logprobs))


class CandidateOutput(CompletionOutput):
    """vLLM's CompletionOutput, what `out.outputs[0]` is: the same fields, and `finished()` a method as there (on
    the RequestOutput it reads as, `out.finished` is a bool)."""

    def finished(self) -> bool:  # type: ignore[override]
        """vLLM's CompletionOutput.finished(): whether it has a finish reason; outputs here are finished ones."""
        return self.finish_reason is not None


class ChatOutput(CompletionOutput):
    """The output of chat given one conversation (returned alone), which also reads as vLLM's list of one
    RequestOutput: `llm.chat(msgs)[0].outputs[0].text` and `for out in llm.chat(msgs)` run unchanged."""

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[CompletionOutput]:
        yield self

    def __getitem__(self, i: int) -> CompletionOutput:
        return [self][i]


_Outs = TypeVar("_Outs", bound=Iterable[CompletionOutput])


def succeeded(outs: _Outs) -> _Outs:
    """`outs` of generate or chat where every request ran to its end; a failed one (finish_reason "error") raises
    its line, so a bench's figure or an eval's answer is never made of it."""
    failed = next((o.error for o in outs if o.error is not None), None)
    if failed is not None:
        raise LServeError(failed)
    return outs


class LLM:
    """An embedded engine: `LLM()` loads the default SmolLM2 on the best backend available. `close()` (or a
    `with LLM() as llm:` block) ends it. `seed` (vLLM's engine seed): requests without a seed of their own get one
    drawn from it in the order they are added, so a script's samples repeat from run to run; None: fresh entropy."""

    def __init__(
        self,
        model: str | None = None,
        backend: str = "auto",
        config: EngineConfig | None = None,
        seed: int | None = None,
        **kw,
    ):
        check_seed(seed)
        if model is not None and (not isinstance(model, (str, os.PathLike)) or not str(model)):
            raise InvalidRequestError(f"model must be a path or a model name, got {model!r}")
        if config is not None and not isinstance(config, EngineConfig):
            raise InvalidRequestError(f"config must be an EngineConfig, got {type(config).__name__}")
        if config is not None and kw:  # the keywords would be dropped
            raise InvalidRequestError(
                f"LLM takes config=EngineConfig(...) or its fields as keywords, not both: got config and "
                f"{', '.join(sorted(kw))}"
            )
        known = {f.name for f in fields(EngineConfig)}
        unknown = next((k for k in kw if k not in known), None)
        if unknown is not None:
            ported = (
                f" (vLLM's name; here: {VLLM_ENGINE_ARGS[unknown]})"
                if unknown in VLLM_ENGINE_ARGS
                else f" (vLLM's; not an option here: {VLLM_ENGINE_ONLY[unknown]})"
                if unknown in VLLM_ENGINE_ONLY
                else ""
            )
            raise InvalidRequestError(f"LLM: got an unexpected keyword argument {unknown!r}{ported}")
        cfg = config or EngineConfig(**kw)
        self.engine = LLMEngine(model, backend, cfg)
        self.tokenizer = self.engine.tokenizer
        # Outputs of this LLM's open requests not read yet, by request id: several streams and generate calls
        # may be open at once, and whichever of them steps the engine gets every request's outputs.
        self._boxes: dict[str, deque[StepOutput]] = {}
        # A step's outputs not handed to their boxes yet: the engine appends them here before the step returns, and
        # the next turn hands on what a Ctrl-C left, so no request loses one (`_deliver`).
        self._undelivered: deque[StepOutput] = deque()
        # Requests whose caller is done with them, recorded first thing in its clean-up: the next step aborts those
        # whose box is left and drops it, however far a Ctrl-C let that clean-up get (`_drop_recorded`).
        self._dropped: list[str] = []
        # The engine is not thread-safe: every call that touches it (adding requests, steps, scoring) takes a turn
        # (`with self._lock, turn:`, `_turn`), so calls from several threads take turns and each still gets exactly
        # its own outputs. Reentrant so that a turn inside this thread's own (a signal handler run mid-step, a
        # hold_engine block) is no deadlock: `_Turn` tells it from one of its own by the lock's owner.
        self._lock = threading.RLock()
        self._closed = False  # close asked: calls are refused; a turn of its own closes the engine as it ends
        # the seeds of requests added without one (vLLM's engine seed); None: each draws fresh entropy
        self._seeds = None if seed is None else np.random.default_rng(seed)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End this LLM: tensor-parallel workers exit, and the model, its weights and the KV cache are released
        (LLMEngine.close), not when the object is collected. Closing again does nothing. Every later call, and a
        stream still open, raises one line. A step of another thread ends first; called inside a step of this
        thread (a signal handler), it returns at once and the LLM closes as that step ends."""
        turn = self._turn()
        with self._lock, turn:  # inside this thread's own turn, that turn closes the engine as it ends
            self._closed = True

    def _turn(self) -> _Turn:
        """A turn of this LLM for `with self._lock, turn:`, made before the lock is taken (it tells whether the turn is
        its own); the block waits for another thread's turn to end."""
        return _Turn(self)

    def _call(self) -> _Turn:
        """A call's turn on the open engine. Inside a turn of this thread (a signal handler run mid-step) it is
        refused in one line: it would run a step inside a step (it waited for itself before)."""
        return self._turn().as_call()

    def _check_open(self) -> None:
        if self._closed:
            raise LServeError("this LLM was closed (LLM.close): make a new LLM to go on")

    def generate(
        self,
        prompts: str | list[int] | dict | list[str | list[int] | dict] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: object = None,
        prompt_token_ids: list[int] | list[list[int]] | None = None,
        priority: list[int] | None = None,
    ) -> list[CompletionOutput]:
        """Run all prompts as one continuous batch; outputs in prompt order (with `n > 1`, the n candidates
        of each prompt in a row; they share the prompt's KV pages through the prefix cache). `sampling_params`
        (vLLM's name, as in chat and stream): one for all prompts or a list, one per prompt. A prompt may be
        vLLM's dict, {"prompt": text} or {"prompt_token_ids": ids}, with vLLM's "cache_salt" if wanted (its requests
        share prefix-cache pages only with requests of the same salt). `use_tqdm` (vLLM's; off by default): a
        progress bar of finished sequences on stderr. A request that fails as it runs ends alone, its output's
        finish_reason "error" and `error` the reason; a refused prompt or Ctrl-C aborts the batch.
        `lora_request` (vLLM's, passed as None by code ported from it): no LoRA here, so only None.
        `prompt_token_ids` (older vLLM's keyword, as older lm-evaluation-harness passes it): the prompts as ids.
        `priority` (vLLM's, for its priority scheduling, one per prompt): requests run first come, first served,
        so only None or all 0."""
        self._check_open()
        refuse_set("lora_request", lora_request, None, "no LoRA adapters")
        if prompt_token_ids is not None:
            if prompts is not None:
                raise InvalidRequestError(
                    "generate takes prompts or prompt_token_ids (older vLLM's keyword), not both"
                )
            prompts = prompt_token_ids
        if not isinstance(use_tqdm, bool):
            raise InvalidRequestError(f"use_tqdm must be True or False, got {use_tqdm!r}")
        prompts = _prompt_list(prompts)
        _check_priority(priority, len(prompts))
        per_prompt = _per_prompt(sampling_params, len(prompts), self.get_default_sampling_params)
        rids: list[str] = []
        # each request's prompt text (None: token ids) and candidate index, as vLLM's outputs carry them
        about: list[tuple[str | None, int]] = []
        done = False
        try:
            for (p, salt), sp in zip(prompts, per_prompt):
                candidates = sp.candidates()
                ids = self.engine.prompt_ids(p)  # encoded and checked once for its n candidates
                for i, c in enumerate(candidates):
                    self._add(ids, c, salt, rids)
                    about.append((p if isinstance(p, str) else None, i))
            outs = self._collect(rids, use_tqdm)
            outs = [replace(o, prompt=text, index=i) for o, (text, i) in zip(outs, about)]
            done = True
            # no call just before the clean-up: a Ctrl-C raised after one would skip the clean-up's first line
            return outs
        finally:  # a refused prompt, an error or an interrupt: none of the batch stays queued or running
            # first, in one step that no interrupt splits: the next step does what an interrupt skips here
            self._dropped += rids
            # only those still with a box: a finished one's id may be another caller's request now
            if not done:
                self._abort([r for r in rids if r in self._boxes], wait=True)
            for r in rids:
                self._boxes.pop(r, None)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        lora_request: object = None,
        chat_template_content_format: str = "auto",
    ) -> ChatOutput | list[CompletionOutput]:
        """One conversation -> one output (a ChatOutput, which reads as vLLM's list of one too); a list of
        conversations (or n > 1) -> a list of outputs. `tools` / `tool_choice` / `parallel_tool_calls` as OpenAI's
        chat API takes them (docs/SERVE.md, "Tool calling"): an output's calls are in `tool_calls`, its other text
        in `text`. `continue_final_message` (with `add_generation_prompt=False`), as vLLM's: the reply continues
        the last message instead of a new turn.
        `use_tqdm` as in `generate`. `chat_template` / `chat_template_kwargs`, as vLLM's: the caller's Jinja
        template instead of the model's (rendered in the same sandbox) and extra variables for it. `lora_request`
        as in `generate`. `chat_template_content_format` (vLLM's): "auto" or "string", how contents reach the
        template here (text parts joined by newlines); "openai" (the list of parts) is refused."""
        self._check_open()
        _check_content_format(chat_template_content_format)
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("chat takes a conversation (a list of message dicts) or a list of them")
        if isinstance(tools, bool):  # vLLM's chat takes use_tqdm third: code ported from it passes it there
            raise InvalidRequestError(
                f"chat's third argument is tools, got {tools}: pass use_tqdm by keyword (vLLM's third argument)"
            )
        single = isinstance(messages[0], dict)
        convs = [messages] if single else messages
        per_conv = _per_prompt(sampling_params, len(convs), self.get_default_sampling_params)
        plan = plan_tools(tools, tool_choice, parallel_tool_calls)
        plan = plan and replace(plan, **self._call_form)
        plans = [plan and plan.fit(p.response_format) for p in per_conv]  # each conversation's format
        if plan:  # a forced choice's schema, a guided reply's grammar; unguided, the markers of calls kept
            per_conv = [
                replace(
                    p,
                    response_format=pl.reply_format(),
                    keep_special_tokens=list(dict.fromkeys([*p.keep_special_tokens, *pl.markers])),
                )
                for p, pl in zip(per_conv, plans)
            ]
        for c in convs:
            check_contents(c)
        native = self.tokenizer.reads_tools(chat_template)
        how = (add_generation_prompt, continue_final_message, chat_template, chat_template_kwargs)
        ids = [self.tokenizer.encode_chat(*prompt_messages(c, plan, native), *how) for c in convs]
        outs = self.generate(ids, per_conv, use_tqdm, lora_request)
        # vLLM's RequestOutput.prompt of a chat: its rendered text, decoded once for a conversation's n outputs
        texts = [self.tokenizer.decode(x, skip_special_tokens=False) for x in ids]
        for o, text in zip(outs, (t for t, p in zip(texts, per_conv) for _ in range(p.n))):
            o.prompt = text
        for o, pl in zip(outs, (pl for pl, p in zip(plans, per_conv) for _ in range(p.n))) if plan else []:
            content, calls, o.finish_reason = pl.reply(o.text, o.finish_reason)
            o.text, o.tool_calls = content or "", calls or None
        return ChatOutput(**vars(outs[0])) if single and len(outs) == 1 else outs

    def stream(
        self, prompt: str | list[dict] | list[int] | dict, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Text deltas of one request as they are produced; closing the generator aborts the request."""
        for out in self.stream_outputs(prompt, sampling_params):
            if out.text:
                yield out.text

    def stream_outputs(
        self, prompt: str | list[dict] | list[int] | dict, sampling_params: SamplingParams | None = None
    ) -> Iterator[StepOutput]:
        """Like `stream`, but yields the engine's per-step outputs (token ids, finish reason)."""
        self._check_open()
        (params,) = _per_prompt(sampling_params, 1, self.get_default_sampling_params)
        if params.n != 1:
            raise InvalidRequestError(f"a stream carries one candidate (n=1), got n={params.n}: use generate")
        prompt, salt = _unwrapped(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):  # a conversation, as chat's
            check_contents(prompt)
            prompt = self.tokenizer.encode_chat(
                *prompt_messages(prompt, None, self.tokenizer.template_reads_tools)
            )
        mine: list[str] = []  # its request's id, from before it is queued
        done = False
        try:
            self._add(prompt, params, salt, mine)
            while not done:
                for out in self._next_outputs(mine, raise_errors=True):
                    done = out.finished
                    yield out
        finally:
            # first, in one step that no interrupt splits: the next step does what an interrupt skips here
            self._dropped += mine
            if not done:  # closed early, or garbage-collected, perhaps inside a step of this thread
                self._abort(mine, wait=False)
            for r in mine:
                self._boxes.pop(r, None)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: a new SamplingParams of the model's generation_config.json sampling fields (the rest, and a GGUF's,
        SamplingParams' defaults), which a call without `sampling_params` (or a None in its list) runs with."""
        try:
            return SamplingParams(**self.engine.sampling_defaults)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{e}: pass sampling_params") from None

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, `self.tokenizer` (vLLM's accessor): encode, decode, render_chat, encode_chat."""
        return self.tokenizer

    @contextmanager
    def hold_engine(self) -> Iterator[LLMEngine]:
        """This LLM's engine for a block of direct calls (`llm.engine`'s API, the evaluation harness's steps): calls
        of other threads (generate, chat, stream, logits, another hold) wait until the block ends, as they wait for
        each other. Inside the block, use the engine it gives: this LLM's own calls there (and a harness step's, which
        holds the turn itself) are refused in one line, as on a closed LLM or inside one of its steps."""
        turn = self._call()
        with self._lock, turn:
            yield self.engine

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits [T, vocab] (float32 NumPy)."""
        turn = self._call()
        with self._lock, turn:
            return self.engine.score(token_ids)

    @cached_property
    def _call_form(self) -> dict:
        """How the chat template takes calls: its call ids and calls' format (tool_calls.call_form, probed once)."""
        return call_form(self.tokenizer)

    def _add(self, prompt, params: SamplingParams, cache_salt: str | None, rids: list[str]) -> None:
        """Queue one request with its output box, under the lock: a step in another thread between the two
        would drop the request's first outputs. Its id goes to the caller's `rids`, then its box is made, before it
        is queued, so the caller's clean-up drops it wherever a Ctrl-C lands. A request add_request refuses only
        uses up its id (ids stay unique: the engine's counter never gives one twice); its box goes with the
        caller's clean-up. Its grammar is built before: other threads' streams go on."""
        guide = self.engine.guide(params)
        turn = self._call()
        with self._lock, turn:  # seeds drawn in the turn: requests of several threads take them in turn
            if params.seed is None and self._seeds is not None:
                params = replace(params, seed=int(self._seeds.integers(1 << 63)))
            rid = self.engine.new_request_id()
            rids.append(rid)
            self._boxes[rid] = deque()  # before it is queued: only an id with a box is this LLM's to abort
            self.engine.add_request(prompt, params, rid, guide=guide, cache_salt=cache_salt)

    def _abort(self, rids: list[str], wait: bool) -> None:
        """Abort `rids` and free their pages with one step now; without `wait` (a generator's clean-up) the step
        is left to whichever call steps next when another thread's step is running, and always when garbage
        collection runs it inside a turn of this very thread."""
        for r in rids:
            self.engine.abort(r)
        # inside this thread's own turn, that turn's next step frees them; none queued (refused): nothing to free
        if not any(r in self.engine.seqs for r in rids) or self.engine.closed or self._lock._is_owned():
            return
        turn = self._turn()
        try:  # taken by hand, not by `with`, to try it without `wait`: an interrupt anywhere in here gives it back
            if self._lock.acquire(wait):
                with turn:
                    if not self.engine.closed:
                        self._step()
                self._lock.release()
        except BaseException:
            if self._lock._is_owned():
                self._lock.release()
            raise

    def _step(self) -> None:
        """One engine step (the caller holds the lock), after dropping what clean-ups recorded; each output goes to
        its request's box (outputs of requests not opened here are dropped)."""
        if self._dropped:
            self._drop_recorded()
        self.engine.step_into(self._undelivered)
        self._deliver()

    def _deliver(self) -> None:
        """Hand the undelivered outputs to their boxes, each taken off after: one a Ctrl-C cut short is handed on by
        the next turn, before any box is read (not twice: it is its box's last output then)."""
        pending = self._undelivered
        while pending:
            out = pending[0]
            box = self._boxes.get(out.request_id)
            if box is not None and not (box and box[-1] is out):
                box.append(out)
            pending.popleft()

    def _drop_recorded(self) -> None:
        """Abort the requests that clean-ups recorded and drop their boxes; only ids with a box are this LLM's still
        (a clean-up that ran to its end dropped it, and the id is free to another caller's request: not aborted).
        Each is taken off the record last, so one a Ctrl-C cut short is dropped again (either twice does nothing
        more)."""
        dropped = self._dropped
        while dropped:
            rid = dropped[0]
            if rid in self._boxes:
                self.engine.abort(rid)
                self._boxes.pop(rid, None)
            # not pop(0): a clean-up run meanwhile (by garbage collection) may have added one
            dropped.remove(rid)

    def _next_outputs(self, rids: list[str] | set[str], raise_errors: bool) -> list[StepOutput]:
        """The unread outputs of `rids`, stepping the engine until there is one (a step and the read of its outputs
        in one turn); with `raise_errors` a failed request's error is raised (logits it could not sample,
        LLMEngine.step: none of its text is garbage)."""
        while True:
            turn = self._call()
            with self._lock, turn:  # another thread's step may fill these boxes until this one is read
                if self._undelivered:  # a Ctrl-C cut a step's delivery short: hand it on before a box is read
                    self._deliver()
                if not any(self._boxes[r] for r in rids):
                    if not self.engine.has_unfinished():  # never with every step going through _step
                        raise LServeError(
                            f"requests {list(rids)[:4]} ended unseen: the engine was stepped outside LLM"
                        )
                    self._step()
                outs = [self._boxes[r].popleft() for r in rids for _ in range(len(self._boxes[r]))]
                if raise_errors and (failed := next((o.error for o in outs if o.error), None)):
                    raise LServeError(failed)
                if outs:
                    return outs

    def _collect(self, rids: list[str], use_tqdm: bool = False) -> list[CompletionOutput]:
        pending = set(rids)
        texts = {r: [] for r in rids}
        results: dict[str, CompletionOutput] = {}
        with tqdm(total=len(rids), desc="Processed sequences", file=sys.stderr, disable=not use_tqdm) as bar:
            while pending:
                for out in self._next_outputs(pending, raise_errors=False):
                    texts[out.request_id].append(out.text)
                    if out.finished:
                        s = out.seq
                        results[out.request_id] = CompletionOutput(
                            "".join(texts[out.request_id]),
                            list(s.output_ids),
                            out.finish_reason,
                            list(s.prompt_ids),
                            self._decoded(s.logprobs) if s.params.logprobs is not None else None,
                            None if s.prompt_logprobs is None else self._decoded(s.prompt_logprobs),
                            request_id=out.request_id,
                            stop_reason=s.stop_reason,
                            num_cached_tokens=out.num_cached_tokens,
                            error=out.error,
                        )
                        pending.discard(out.request_id)
                        # its id is free from here: a clean-up (generate's abort, a recorded drop) leaves it alone
                        self._boxes.pop(out.request_id, None)
                        bar.update(1)
        return [results[r] for r in rids]

    def _decoded(self, entries: list[TokenLogprob | None]) -> list[TokenLogprob | None]:
        """`entries` with vLLM's decoded_token: each id decoded alone (once per id of the request)."""
        texts: dict[int, str] = {}

        def decode(t: int) -> str:
            if t not in texts:
                texts[t] = self.tokenizer.decode([t])
            return texts[t]

        return [None if e is None else e.with_decoded(decode) for e in entries]


class _Turn:
    """One use of an LLM's turn, made before its lock is taken and entered inside it: `turn = llm._turn()`, then
    `with llm._lock, turn:`. The lock's own `__exit__` gives it back, a C call that no KeyboardInterrupt can come
    before: one raised after the lock was taken and before a Python `__exit__` ran held it for good (later calls
    waited, or were refused as inside a turn). `with` gives whether the turn is this use's own (False inside this
    thread's own turn, e.g. a signal handler run mid-step), and its end closes the engine where a close was asked.
    A class, not a generator context manager: a stream takes a turn a token, and the generators cost several times
    as much."""

    __slots__ = ("_llm", "_mine", "_refuse")

    def __init__(self, llm: LLM):
        # made before the lock is taken: the lock held already is this thread's own turn
        self._llm, self._mine, self._refuse = llm, not llm._lock._is_owned(), False

    def as_call(self) -> _Turn:
        """This turn as a call's (`LLM._call`): one that is not its own, or on a closed LLM, raises one line."""
        if not self._mine:
            raise LServeError(
                "this LLM was called inside one of its own steps (a signal handler?) or hold_engine "
                "blocks: call it after"
            )
        self._refuse = True
        return self

    def __enter__(self) -> bool:
        if not self._llm._lock._is_owned():  # `with llm._call():` alone, the form before, would run unlocked
            raise RuntimeError("a turn is entered inside its LLM's lock: `with llm._lock, turn:`")
        self._close_if_asked()  # where an interrupt cut a close short
        if self._refuse:
            self._llm._check_open()  # in the turn: a close may have run while this thread waited
        return self._mine

    def __exit__(self, *exc: object) -> None:
        self._close_if_asked()

    def _close_if_asked(self) -> None:
        """Close the engine where a close was asked, in a turn of its own (one inside it leaves that to it)."""
        llm = self._llm
        if llm._closed and self._mine and not llm.engine.closed:
            llm.engine.close()


def _check_priority(priority: object, count: int) -> None:
    """vLLM's generate(priority=[...]), one per prompt, ranks requests under its priority scheduling only; here
    requests run first come, first served, so only None or all 0 (vLLM's default) is the same."""
    if isinstance(priority, (list, tuple)) and len(priority) != count:
        raise InvalidRequestError(f"{len(priority)} priorities for {count} prompts")
    if priority is not None and not (
        isinstance(priority, (list, tuple)) and all(isinstance(p, numbers.Real) and p == 0 for p in priority)
    ):
        raise InvalidRequestError(
            "priority is not supported (requests are served first come, first served): leave it None or all 0"
        )


def _check_content_format(fmt: object) -> None:
    """vLLM's chat_template_content_format: contents reach the template as strings here ("string", which "auto"
    is); "openai" (a list of parts for the template to iterate) is refused."""
    if fmt == "openai":
        raise InvalidRequestError(
            "chat_template_content_format 'openai' is not supported (contents reach the template as strings, text "
            "parts joined by newlines): use 'auto' or 'string'"
        )
    if not isinstance(fmt, str) or fmt not in ("auto", "string"):
        raise InvalidRequestError(
            f"chat_template_content_format must be 'auto', 'string' or 'openai', got {fmt!r:.60}"
        )


def _per_prompt(params, count: int, default: Callable[[], SamplingParams]) -> list[SamplingParams]:
    """`sampling_params` as one SamplingParams per prompt: one (None: `default()`, the model's) for all, or a list of
    `count`."""
    per_prompt = params if isinstance(params, (list, tuple)) else [params] * count
    if len(per_prompt) != count:
        raise InvalidRequestError(f"{len(per_prompt)} SamplingParams for {count} prompts")
    per_prompt = [default() if p is None else p for p in per_prompt]
    if not all(isinstance(p, SamplingParams) for p in per_prompt):
        raise InvalidRequestError(
            "sampling_params must be a SamplingParams or a list of them, one per prompt"
        )
    return per_prompt


def _prompt_list(prompts) -> list[tuple[object, str | None]]:
    """generate's prompts as a list of (prompt, cache salt): a string or token ids each (a list, tuple or 1-D NumPy
    array of integers, which the engine checks; or vLLM's prompt dict of either)."""
    if isinstance(prompts, (str, dict)) or _token_ids(prompts):
        return [_unwrapped(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError("prompts must be a string, a list of token ids, or a list of either")
    prompts = [_unwrapped(p) for p in prompts]
    if not all(isinstance(p, (str, list, tuple)) or _token_ids(p) for p, _ in prompts):
        raise InvalidRequestError("each prompt must be a string or a list of token ids")
    return prompts


def _unwrapped(p) -> tuple[object, str | None]:
    """A prompt and its cache salt (None: none). vLLM's prompt dicts as what they hold: {"prompt": text} (TextPrompt),
    {"prompt_token_ids": ids} (TokensPrompt, its optional "prompt" text unused, as in vLLM), either with a
    "cache_salt" (the engine checks it). Their other keys (multi-modal data) are refused, not dropped."""
    if not isinstance(p, dict):
        return p, None
    keys = set(p) - {"cache_salt"}
    if keys == {"prompt"} or keys in ({"prompt_token_ids"}, {"prompt_token_ids", "prompt"}):
        key = "prompt_token_ids" if "prompt_token_ids" in keys else "prompt"
        # text under prompt_token_ids (or ids under prompt) would run as the other kind of prompt
        if isinstance(p[key], str) != (key == "prompt"):
            kind = "a string" if key == "prompt" else "a list of token ids"
            raise InvalidRequestError(f"a prompt dict's {key} must be {kind}, got {type(p[key]).__name__}")
        return p[key], p.get("cache_salt")
    raise InvalidRequestError(
        "prompts must be strings, token ids or vLLM's prompt dicts {'prompt': text} / {'prompt_token_ids': ids} "
        f"(a conversation goes to chat); got a dict with the keys {sorted(map(str, p))[:4]}"
    )


def _token_ids(p) -> bool:
    """Whether `p` is one prompt of token ids rather than a list of prompts."""
    if isinstance(p, np.ndarray):
        return p.ndim == 1
    return isinstance(p, (list, tuple)) and len(p) > 0 and isinstance(p[0], (int, np.integer))
