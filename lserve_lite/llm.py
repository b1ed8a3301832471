"""The Python API: LLM.generate / chat / stream / logits over one engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .config import EngineConfig
from .engine.llm_engine import LLMEngine, StepOutput
from .errors import InvalidRequestError
from .sampling_params import SamplingParams
from .sequence import TokenLogprob


@dataclass
class CompletionOutput:
    """A finished request: its text, generated ids and why it stopped ("stop", "length", "abort")."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # per generated token, with SamplingParams(logprobs=k)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, with prompt_logprobs=k


class LLM:
    """An embedded engine: `LLM()` loads the default SmolLM2 on the best backend available."""

    def __init__(
        self, model: str | None = None, backend: str = "auto", config: EngineConfig | None = None, **kw
    ):
        cfg = config or EngineConfig(**kw)
        self.engine = LLMEngine(model, backend, cfg)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Run all prompts as one continuous batch; outputs in prompt order (with `n > 1`, the n candidates
        of each prompt in a row; they share the prompt's KV pages through the prefix cache)."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        rids: list[str] = []
        try:
            for p in prompts:
                rids += [self.engine.add_request(p, c) for c in params.candidates()]
        except Exception:  # a refused prompt refuses the batch: none of it stays queued
            for r in rids:
                self.engine.abort(r)
            raise
        return self._collect(rids)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None):
        """One conversation -> one output; a list of conversations (or n > 1) -> a list of outputs."""
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("chat takes a conversation (a list of message dicts) or a list of them")
        single = isinstance(messages[0], dict)
        convs = [messages] if single else messages
        outs = self.generate([self.tokenizer.encode_chat(c) for c in convs], params)
        return outs[0] if single and len(outs) == 1 else outs

    def stream(
        self, prompt: str | list[dict] | list[int], params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Text deltas of one request as they are produced; closing the generator aborts the request."""
        for out in self.stream_outputs(prompt, params):
            if out.text:
                yield out.text

    def stream_outputs(
        self, prompt: str | list[dict] | list[int], params: SamplingParams | None = None
    ) -> Iterator[StepOutput]:
        """Like `stream`, but yields the engine's per-step outputs (token ids, finish reason)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError(f"a stream carries one candidate (n=1), got n={params.n}: use generate")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self.tokenizer.encode_chat(prompt)
        rid = self.engine.add_request(prompt, params)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(rid)
                self.engine.step()

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits [T, vocab] (float32 NumPy)."""
        return self.engine.score(token_ids)

    def _collect(self, rids: list[str]) -> list[CompletionOutput]:
        pending = set(rids)
        texts = {r: [] for r in rids}
        results: dict[str, CompletionOutput] = {}
        while pending:
            for out in self.engine.step():
                if out.request_id not in pending:
                    continue
                texts[out.request_id].append(out.text)
                if out.finished:
                    s = out.seq
                    results[out.request_id] = CompletionOutput(
                        "".join(texts[out.request_id]),
                        list(s.output_ids),
                        out.finish_reason,
                        list(s.prompt_ids),
                        list(s.logprobs) if s.params.logprobs is not None else None,
                        s.prompt_logprobs,
                    )
                    pending.discard(out.request_id)
        return [results[r] for r in rids]
