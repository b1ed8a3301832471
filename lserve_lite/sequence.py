"""A request's state inside the engine: its tokens, its pages, how far its KV cache has been written."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np

from .sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob, a value of TokenLogprob read as vLLM's dict: a token's logprob and rank (1: the most likely;
    None: not known, a chosen token outside the top alternatives) and its text decoded alone (None: not filled)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class TokenLogprob(Mapping[int, Logprob]):
    """A token's log-probability under the model (log-softmax of its raw logits) and the top alternatives. It
    reads as vLLM's per-token dict too: {token id: Logprob} of the chosen token (first) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    # each id's text decoded alone, vLLM's decoded_token (LLM's outputs fill it: with_decoded); None: not filled
    decoded: dict[int, str] | None = None

    def _as_dict(self) -> dict[int, Logprob]:
        """The chosen token first (its rank from the top where it is there), then the top: vLLM's order."""
        text = self.decoded or {}
        d = {t: Logprob(lp, rank, text.get(t)) for rank, (t, lp) in enumerate(self.top, 1)}
        return {self.token_id: Logprob(self.logprob, None, text.get(self.token_id)), **d}

    def with_decoded(self, decode: Callable[[int], str]) -> TokenLogprob:
        """This entry with `decoded` filled by `decode` (an id's text alone)."""
        self.decoded = {t: decode(t) for t in (self.token_id, *(t for t, _ in self.top))}
        return self

    def __getitem__(self, token_id: int) -> Logprob:
        return self._as_dict()[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Prompt + generated ids; `num_cached` tokens already have K/V in `page_table`'s pages."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id or f"req-{self.seq_id}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_cached = 0
        self.page_table: list[int] = []  # dense-pool pages, in logical order
        self.stream_table: list[int] = []  # streaming-pool pages: sink pages, then the local ring
        self.sel_slot = -1  # row of this sequence in the page-selection buffers while it runs
        self.sparse = None  # per-request SparseConfig (None: the engine's)
        self.decode_steps = 0  # selecting decode steps since the last prefill or step within the budget (the selector's reuse)
        self.cache_salt = cache_salt  # vLLM's: shares prefix-cache pages only within one salt
        self.kv_salt = b""  # seed of the prefix cache's page keys (kv/prefix_cache.py)
        self.block_hashes: list[bytes] = []  # keys of the full pages of all_ids hashed so far
        self.num_registered = 0  # leading pages of page_table indexed in the prefix cache
        self.num_attached = 0  # tokens whose K/V came from the prefix cache at this admission
        self.num_recompute = 0  # tokens a readmission after preemption recomputes by prefill (preempt)
        # oldest logical page past the sinks that stream_table holds for this sequence: resumed from a snapshot, its
        # older ring slots hold the donor's later pages (PrefixCache.held_from)
        self.stream_from = 0
        self.in_flight: list[
            bytes
        ] = []  # keys of prompt pages this sequence computes that others may wait for
        self.num_prefix_cached: int | None = None  # prompt tokens taken from the cache at the first admission
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it (vLLM's)
        self.error: str | None = None  # why the request failed (finish_reason "error" not from its grammar)
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        seed = params.seed if params.seed is not None else np.random.SeedSequence().entropy
        self.rng = np.random.default_rng(seed)
        self.logprobs: list[TokenLogprob] = []  # per generated token, when params.logprobs is set
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first: None)
        self.guide = None  # the grammar matcher of a constrained request (engine/structured.py)
        self.token_mask: np.ndarray | None = None  # this step's allowed-token bitmask (int32 words)
        self.text = ""  # detokenized output so far (stop strings trimmed)
        self.emitted = 0  # characters of `text` already returned to the caller
        self.stops_from = 0  # `text` offset a stop string must end past: the first min_tokens tokens' text
        # vLLM's all_stop_token_ids, masked before min_tokens: stop_token_ids and EOS (with ignore_eos too)
        self.stop_ids: frozenset[int] = frozenset()
        self._pages = np.zeros(0, np.int32)  # page_table as an array (page_array), grown as the list grows
        self._pages_of: list[int] | None = None  # the list object _pages mirrors
        self._known = 0  # leading entries of _pages that mirror it

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_range(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without concatenating the whole prompt (long contexts)."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n) : stop - n]

    def page_array(self) -> np.ndarray:
        """page_table as an int32 array (a view: valid until the table changes), converted incrementally: the
        block manager only appends to the list or replaces it, and a step's planning reads every running
        sequence's whole table (converting a 32k-token table of Python ints each decode step cost ~15 us)."""
        table, n = self.page_table, len(self.page_table)
        if table is not self._pages_of or n < self._known:
            self._pages_of, self._known = table, 0
        if n > self._known:
            if n > self._pages.size:
                grown = np.empty(max(n, 2 * self._pages.size, 16), np.int32)
                grown[: self._known] = self._pages[: self._known]
                self._pages = grown
            self._pages[self._known : n] = table[self._known : n]
            self._known = n
        return self._pages[:n]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prefilling a prompt whose token logprobs were asked for: every row's logits are needed."""
        return self.params.prompt_logprobs is not None and self.num_cached < len(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still has to be computed (the prompt left to prefill, or the last sampled id)."""
        return self.num_tokens - self.num_cached

    def decodes(self, n: int) -> bool:
        """Whether computing the next `n` tokens is a decode row (decode windows, page selection, an overlappable
        step): one token past the prompt and past the tokens a preemption dropped. A one-token chunk of that
        recompute is a prefill chunk; the evaluation harness's teacher-forced outputs (never preempted) decode."""
        return n == 1 and self.num_cached >= max(len(self.prompt_ids), self.num_recompute)

    def preempt(self) -> None:
        """Back to waiting, its pages already released. Readmitted, it recomputes every token it holds (the last
        sampled one too) in prefill chunks, however the step budget cuts them: it goes on as a fresh request of
        its prompt and reply so far would."""
        self.status = Status.WAITING
        self.num_recompute = self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
