"""Per-request sampling parameters, validated up front with one-line errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError

# Stop conditions are checked after every generated token (each stop string is searched in the new text),
# so their number and size bound the per-token cost that one request imposes on the whole batch.
# OpenAI allows 4 stop strings; 16 of up to 256 characters covers chat templates' end markers with room.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it logits overflow float32 (inf / NaN probabilities)
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing logits by them overflows float32)


@dataclass
class SamplingParams:
    """temperature 0 (or below 1e-5) means greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise InvalidRequestError(msg)

        if not _int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not _finite(self.repetition_penalty) or not lo <= self.repetition_penalty <= hi:
            bad(f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty!r}")
        if self.seed is not None and (not _int(self.seed) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            bad(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self._validate_stops()

    def _validate_stops(self) -> None:
        """Bounded stop conditions: they are checked on every token, for every request in the batch."""
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} allowed"
            )
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise InvalidRequestError(
                f"a stop string has {longest} characters; at most {MAX_STOP_CHARS} allowed"
            )
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative integers")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} allowed"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
