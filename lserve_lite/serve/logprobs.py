"""OpenAI's logprobs objects from the engine's TokenLogprob entries: the completions shape (tokens,
token_logprobs, top_logprobs, text_offset) and the chat shape (content: token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

from functools import lru_cache

from ..sequence import TokenLogprob
from ..tokenizer import Tokenizer


class LogprobFormatter:
    """Token strings are each id decoded alone (a byte-level token that is part of a UTF-8 character shows
    as U+FFFD, its `bytes` too, as the id alone has no complete character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.token = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def completion(self, entries: list[TokenLogprob | None], ids: list[int], offset: int) -> dict:
        """`entries[i]` for `ids[i]` (None: no logprob, the first prompt token); offsets count from `offset`."""
        tokens = [self.token(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [{self.token(i): lp for i, lp in e.top} if e else None for e in entries],
            "text_offset": offsets,
        }

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(t: int, lp: float) -> dict:
            s = self.token(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(*x) for x in e.top]}
                            for e in entries]}  # fmt: skip
