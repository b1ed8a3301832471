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
    """Chat token strings are the tokens' texts (Tokenizer.token_text: a token that is part of a UTF-8 character
    shows as U+FFFD there, as OpenAI's does), their `bytes` the token's own (Tokenizer.token_bytes); the completions
    shape names tokens apart (`name`: its top_logprobs is a dict keyed by them). Text offsets count the bytes."""

    def __init__(self, tokenizer: Tokenizer):
        self.token = lru_cache(maxsize=65536)(tokenizer.token_text)
        self.bytes = lru_cache(maxsize=65536)(tokenizer.token_bytes)
        self.special = tokenizer.is_special
        self.added = tokenizer.added_by_encode
        self.name = lru_cache(maxsize=65536)(self._name)

    def _name(self, token_id: int) -> str:
        """A token as the completions shape names it: its text, or for bytes that are not whole UTF-8 characters
        OpenAI's "bytes:\\xe2\\x98" (as U+FFFD, the parts of different characters were one dict key)."""
        data = self.bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(
                chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data
            )

    def top(self, e: TokenLogprob) -> dict[str, float]:
        """The alternatives of one position by name and the chosen token (OpenAI's "up to logprobs + 1" entries,
        as vLLM's: a client looks the chosen token up there), none lost: where two tokens share a name (a
        byte-fallback token and the piece of the same text), the chosen token keeps it, else the likelier one, and
        the other is named "token_id:N" (vLLM's spelling of a token by its id)."""
        chosen = self.name(e.token_id)
        owner, out = {chosen: e.token_id}, {}
        for t, lp in e.top:
            key = self.name(t)
            out[key if owner.setdefault(key, t) == t else f"token_id:{t}"] = lp
        out.setdefault(chosen, e.logprob)
        return out

    def completion(self, entries: list[TokenLogprob | None], ids: list[int], offsets: TextOffsets) -> dict:
        """`entries[i]` for generated `ids[i]`; offsets continue `offsets`. A special token takes no room: the
        text leaves it out."""
        return self._shape(
            entries, ids, [offsets.take(b"" if self.special(t) else self.bytes(t)) for t in ids]
        )

    def echo(
        self, text: str, entries: list[TokenLogprob | None], ids: list[int], offsets: TextOffsets
    ) -> dict:
        """The echoed prompt's part (entries as in `completion`, None: no logprob, the first prompt token): `ids`
        are the tokens of `text` (the prompt as sent, or its ids decoded) and their offsets index it. Each token is
        looked for where the one before ended; what the text does not show there takes no room: a BOS the tokenizer
        added (even where the prompt starts with the BOS's text: that text is its own token's, as the tokenizers
        library's offsets have it), or the space SentencePiece puts before a text's first word (neither the prompt
        as sent nor the decoder's output has it), or before each word after a special token (Metaspace "always",
        Llama 2's legacy tokenizer). `offsets` goes on after `text`, where the generated text starts."""
        at, starts = 0, []
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for t, added in zip(ids, self.added(text, ids)):
            piece = utf8.decode(self.bytes(t))
            starts.append(at)
            if added:
                continue
            if text.startswith(piece, at):
                at += len(piece)
            elif piece[:1] == " " and text.startswith(piece[1:], at):
                at += len(piece) - 1
            elif not self.special(t):  # a text the tokenizer normalized: counted as the token's length
                at = min(at + len(piece), len(text))
        offsets.at = len(text)
        return self._shape(entries, ids, starts)

    def _shape(self, entries: list[TokenLogprob | None], ids: list[int], starts: list[int]) -> dict:
        return {
            "tokens": [self.name(t) for t in ids],
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [self.top(e) if e else None for e in entries],
            "text_offset": starts,
        }

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(t: int, lp: float) -> dict:
            return {"token": self.token(t), "logprob": lp, "bytes": list(self.bytes(t))}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(*x) for x in e.top]}
                            for e in entries]}  # fmt: skip
