"""OpenAI's logprobs objects from the engine's TokenLogprob entries: the completions shape (tokens,
token_logprobs, top_logprobs, text_offset) and the chat shape (content: token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

import codecs
from functools import lru_cache

from ..sequence import TokenLogprob
from ..tokenizer import Tokenizer


class TextOffsets:
    """Where each token starts in the text, in characters, counted from the tokens' bytes: a token that holds
    part of a multi-byte character starts where that character does. One per choice, kept across a stream's
    chunks (what a chunk releases as text can lag its tokens, behind a possible stop string)."""

    def __init__(self) -> None:
        self.at = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, data: bytes) -> int:
        at = self.at
        self.at += len(self._utf8.decode(data))
        return at


class LogprobFormatter:
    """Token strings are the tokens' texts (Tokenizer.token_text: a token that is part of a UTF-8 character shows
    as U+FFFD there, as OpenAI's does); `bytes` and text offsets are the token's own bytes (Tokenizer.token_bytes)."""

    def __init__(self, tokenizer: Tokenizer):
        self.token = lru_cache(maxsize=65536)(tokenizer.token_text)
        self.bytes = lru_cache(maxsize=65536)(tokenizer.token_bytes)

    def completion(self, entries: list[TokenLogprob | None], ids: list[int], offsets: TextOffsets) -> dict:
        """`entries[i]` for `ids[i]` (None: no logprob, the first prompt token); offsets continue `offsets`."""
        return {
            "tokens": [self.token(t) for t in ids],
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [{self.token(i): lp for i, lp in e.top} if e else None for e in entries],
            "text_offset": [offsets.take(self.bytes(t)) for t in ids],
        }

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(t: int, lp: float) -> dict:
            return {"token": self.token(t), "logprob": lp, "bytes": list(self.bytes(t))}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(*x) for x in e.top]}
                            for e in entries]}  # fmt: skip
