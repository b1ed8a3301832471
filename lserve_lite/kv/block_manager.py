"""Paged KV allocator: reference-counted pages of the dense pool, the streaming pool's pages, and the prefix
cache's hooks (attach a cached prefix, index computed pages, keep streaming snapshots).

A sequence owns `page_table` (dense pool, one page per `page_size` tokens, grows with the context) and
`stream_table` (streaming pool: sink pages then a ring of local pages, at most `stream_per_seq` pages).
Dense pages are shared by reference count: a page attached from the prefix cache is referenced by every
sequence holding it. A page whose count drops to zero goes to the free list, or, when the prefix cache
indexes it, stays cached (idle) until an allocation evicts it. Streaming pages are never shared: a
snapshot's pages belong to the cache and are copied into the sequence's own.

In an engine that selects pages (LServe with a token budget: `max_seqs` > 0), a sequence that can decode also
holds a page-selection slot (its row in the selector's buffers) while it holds pages: `can_grow` counts it like a
page, so a sequence never runs without one (slot -1 read another sequence's selection). A prefill-only sequence
(`grow(..., slot=False)`: scoring) selects nothing and takes none.

Pages handed out by `grow` are cleared (zeroed in every layer's pools) before they are written, so a page reads
as a fresh pool's: the attention kernels read whole 16-row units and weigh slots past a context by 0, and
0 x NaN left there by an earlier owner would be NaN. Copies and clears are `page_ops`, run by the engine through
`Ops.copy_stream_pages` / `Ops.clear_pages` before the next forward, in the order recorded.
"""

from __future__ import annotations

from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import takewhile
from typing import TYPE_CHECKING

from .prefix_cache import PrefixCache, Snapshot, extend_hashes

if TYPE_CHECKING:
    from ..sequence import Sequence

# ("copy", streaming src pages, streaming dst pages) or ("clear", dense pages, streaming pages)
PageOp = tuple[str, list[int], list[int]]


class FreePages:
    """A pool's free page ids: a stack (last freed, first reused: memory the OS backs stays at the peak in use instead
    of creeping over the whole zero-filled pool under a long mixed load) over the ids never handed out, in ascending
    order, which it does not list: streaming-only mode's dense pool is MAX_POOL_PAGES ids without bytes, and listing
    them took ~40 MB of Python ints at startup, most of them never used."""

    def __init__(self, num_pages: int):
        self.stack: list[int] = []
        self.fresh, self.num_pages = 0, num_pages  # ids [fresh, num_pages) were never handed out

    def __len__(self) -> int:
        return len(self.stack) + self.num_pages - self.fresh

    def __iter__(self) -> Iterator[int]:
        yield from self.stack
        yield from range(self.fresh, self.num_pages)

    def pop(self) -> int:
        if self.stack:
            return self.stack.pop()
        if self.fresh >= self.num_pages:
            raise IndexError("pop from an empty free list")
        self.fresh += 1
        return self.fresh - 1

    def append(self, page: int) -> None:
        self.stack.append(page)

    def extend(self, pages: Iterable[int]) -> None:
        self.stack.extend(pages)


class BlockManager:
    """Hands out page ids in [0, num_pages) and [0, num_stream_pages)."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_stream_pages: int = 0,
        stream_per_seq: int = 0,
        max_seqs: int = 0,
        cache: PrefixCache | None = None,
    ):
        self.num_pages, self.page_size = num_pages, page_size
        self.num_stream_pages, self.stream_per_seq = num_stream_pages, stream_per_seq
        self.free, self.stream_free = FreePages(num_pages), FreePages(num_stream_pages)
        self.num_slots = max_seqs  # page-selection slots (0: the engine selects no pages)
        self.slots: deque[int] = deque(range(max_seqs))  # free page-selection slots
        self.ref = array("i", bytes(4 * num_pages))  # 4 bytes a page, not a list's 8 (2^20 pages: 4 MB)
        self.cache = cache
        self.page_ops: list[PageOp] = []  # copies and clears of KV pages, in order (module docstring)
        self.in_flight: Counter[bytes] = Counter()  # keys of prompt pages running sequences are computing
        self.in_flight_version = 0  # bumped by every change of `in_flight`
        # `awaits_prefix`'s answers by waiting sequence, with the (cache, in-flight) versions they hold for
        self._awaits: dict[Sequence, tuple[tuple[int, int], bool]] = {}
        # the last `_lookup`: (sequence, cache version, its tokens, pages, snapshot); one entry, so a hit touches no
        # snapshot's LRU place that a second lookup would have moved (only the last lookup's can be the newest)
        self._last_prefix: tuple[Sequence, int, int, list[int], Snapshot | None] | None = None

    @property
    def num_free(self) -> int:
        """Dense pages an allocation can get: free ones and idle cached ones."""
        return len(self.free) + (len(self.cache.idle) if self.cache else 0)

    @property
    def num_stream_free(self) -> int:
        return len(self.stream_free) + (self.cache.snapshot_pages if self.cache else 0)

    @property
    def num_used(self) -> int:
        """Pages held by sequences in both pools (idle cached pages and snapshots do not count)."""
        return self.num_dense_used + self.num_stream_used

    @property
    def num_dense_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_stream_used(self) -> int:
        return self.num_stream_pages - self.num_stream_free

    def _pages_for(self, num_tokens: int) -> tuple[int, int]:
        """(dense, streaming) pages a sequence of `num_tokens` tokens holds."""
        pages = -(-num_tokens // self.page_size)
        return pages, min(pages, self.stream_per_seq)

    def _needed(self, seq: Sequence, num_tokens: int) -> tuple[int, int]:
        dense, stream = self._pages_for(num_tokens)
        return max(0, dense - len(seq.page_table)), max(0, stream - len(seq.stream_table))

    def seqs_that_fit(self, num_tokens: int) -> int:
        """How many sequences of `num_tokens` tokens both pools hold at once (what a batch can run together)."""
        dense, stream = self._pages_for(num_tokens)
        return min(self.num_pages // dense, self.num_stream_pages // stream if stream else self.num_pages)

    def has_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` already holds the pages (and selection slot) for `num_tokens`: growing it is a no-op.
        A decode step asks this of every running sequence, and it is true for page_size - 1 steps of page_size."""
        return not self._wants_slot(seq) and self._needed(seq, num_tokens) == (0, 0)

    def _wants_slot(self, seq: Sequence, slot: bool = True) -> bool:
        """Whether growing `seq` takes a selection slot: it has none, may select (`slot`) and the engine selects."""
        return slot and self.num_slots > 0 and seq.sel_slot < 0

    def lacks_slot(self, seq: Sequence) -> bool:
        """Whether `seq` needs a page-selection slot and every one is taken (by sequences holding pages)."""
        return self._wants_slot(seq) and not self.slots

    def can_grow(self, seq: Sequence, num_tokens: int, slot: bool = True) -> bool:
        """Whether free pages (and a selection slot, unless `slot` is False) let `seq` hold `num_tokens`."""
        return self._fits(seq, *self._needed(seq, num_tokens), slot)

    def _fits(self, seq: Sequence, dense: int, stream: int, slot: bool = True) -> bool:
        """Whether the pools hold `dense` and `stream` more pages for `seq` (and its selection slot if it takes one)."""
        free_slot = not self._wants_slot(seq, slot) or bool(self.slots)
        return dense <= self.num_free and stream <= self.num_stream_free and free_slot

    def shortfall(self, seq: Sequence, num_tokens: int) -> str:
        """What the pools lack for `seq` to hold `num_tokens` (for a refusal): "" when both have the pages."""
        dense, stream = self._needed(seq, num_tokens)
        pools = (("dense", dense, self.num_free), ("streaming", stream, self.num_stream_free))
        return "; ".join(
            f"{name} pool: {need} pages needed, {free} free" for name, need, free in pools if need > free
        )

    def grow(self, seq: Sequence, num_tokens: int, slot: bool = True) -> None:
        """Pages for `num_tokens` tokens, and a selection slot unless `slot` is False (a prefill-only sequence)."""
        if not self.can_grow(seq, num_tokens, slot):
            raise RuntimeError("KV pages or selection slots exhausted (scheduler must check can_grow first)")
        dense, stream = self._needed(seq, num_tokens)
        pages = [self._page() for _ in range(dense)]
        stream_pages = [self._stream_page() for _ in range(stream)]
        seq.page_table.extend(pages)
        seq.stream_table.extend(stream_pages)
        if pages or stream_pages:
            self._clear(pages, stream_pages)
        if self._wants_slot(seq, slot):
            seq.sel_slot = self.slots.popleft()

    def _page(self) -> int:
        page = self.free.pop() if self.free else self.cache.evict_page()
        self.ref[page] = 1
        return page

    def _stream_page(self) -> int:
        if not self.stream_free:
            self.stream_free.extend(self.cache.evict_snapshot())
        return self.stream_free.pop()

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's pages (finished, aborted or preempted): cached ones stay cached."""
        if not self._donate_snapshot(seq):
            self.stream_free.extend(seq.stream_table)
        for page in reversed(seq.page_table):  # the tail goes idle first, so it is evicted before its prefix
            self.ref[page] -= 1
            if self.ref[page] == 0:
                self.free.extend(self.cache.park(page) if self.cache else [page])
        if seq.sel_slot >= 0:
            self.slots.append(seq.sel_slot)
        self._settle(seq, len(seq.in_flight))
        self._awaits.pop(seq, None)
        seq.page_table, seq.stream_table, seq.sel_slot = [], [], -1
        seq.num_cached = seq.decode_steps = seq.num_registered = seq.num_attached = seq.stream_from = 0

    # -- prefix cache ---------------------------------------------------------------------------------
    def admit(self, seq: Sequence, budget: int) -> int:
        """Attach the longest cached prefix of a waiting sequence's prompt (`_prefix`) and grow it for its first chunk
        of at most `budget` tokens: the chunk's tokens, or 0, with nothing attached, when the pools cannot hold it.
        Checked before attaching: restoring the prefix's snapshot can evict snapshots (its own too), and giving the
        prefix back at once lost them for nothing."""
        pages, snap, n = self._first_chunk(seq, budget)
        if n:
            self._attach(seq, pages, snap)
            self.grow(seq, len(pages) * self.page_size + n)
        return n

    def first_chunk(self, seq: Sequence, budget: int) -> int:
        """The tokens `admit` would give a waiting sequence now (0: it does not fit), attaching nothing: the
        scheduler holds back this much for the queue's head, its cached prefix counted as admission counts it."""
        return self._first_chunk(seq, budget)[2]

    def _first_chunk(self, seq: Sequence, budget: int) -> tuple[list[int], Snapshot | None, int]:
        """A waiting sequence's cached prefix (`_prefix`) and the first chunk after it within `budget`, 0 when the
        pools cannot hold the chunk."""
        pages, snap = self._prefix(seq)
        start = len(pages) * self.page_size
        n = min(seq.num_tokens - start, budget)
        dense, stream = self._pages_for(start + n)
        claimed = sum(page in self.cache.idle for page in pages) if pages else 0  # idle pages attaching takes
        fits = self._fits(seq, dense - len(pages) + claimed, max(stream, len(snap.pages) if snap else 0))
        return pages, snap, n if fits else 0

    def _prefix(self, seq: Sequence) -> tuple[list[int], Snapshot | None]:
        """The cached pages of the longest prefix of `seq`'s prompt (whole pages, never its last token; with streaming
        heads, only up to a boundary a snapshot can resume, and none when the streaming pool cannot hold that
        snapshot now) and that snapshot. A request for prompt logprobs takes none: it needs the logits of every
        prompt row."""
        c = self.cache
        if c is None or seq.params.prompt_logprobs is not None:
            return [], None
        memo = self._last_prefix
        if memo is None or memo[0] is not seq or memo[1:3] != (c.version, seq.num_tokens):
            memo = self._last_prefix = (seq, c.version, seq.num_tokens, *self._lookup(seq))
        pages, snap = memo[3], memo[4]
        if snap is not None and len(snap.pages) > self.num_stream_free:
            return [], None
        return pages, snap

    def _lookup(self, seq: Sequence) -> tuple[list[int], Snapshot | None]:
        """`_prefix` before the streaming pool's room is checked: a function of the index (`PrefixCache.version`) and
        the sequence's tokens, so the queue's reserve and admission in one step look it up once (the reserve asked
        once per running prefill, and admission again: hashing and matching a long prompt each time)."""
        c = self.cache
        most = ((len(seq.prompt_ids) if c.prompt_only else seq.num_tokens) - 1) // self.page_size
        extend_hashes(seq, most * self.page_size, self.page_size)
        pages = c.match(seq.block_hashes[:most])
        if not (self.stream_per_seq and pages):
            return pages, None
        k, snap = c.find_snapshot(seq, len(pages))
        return (pages[:k], snap) if snap is not None else ([], None)

    def _attach(self, seq: Sequence, pages: list[int], snap: Snapshot | None) -> None:
        """Give a sequence without pages a cached prefix (`_prefix`) and announce the prompt pages it computes."""
        c = self.cache
        if c is None:
            return
        for page in pages:
            c.claim(page)
            self.ref[page] += 1
        seq.page_table = list(pages)
        if snap is not None:
            # may reuse snap's own pages: the copy gathers before it scatters
            table = seq.stream_table = [self._stream_page() for _ in snap.pages]
            held = c.held_slots(snap, len(pages))
            self.page_ops.append(("copy", [snap.pages[i] for i in held], [table[i] for i in held]))
            held_set = set(held)  # the donor's pages past the prefix: cleared, not copied
            stale = [page for i, page in enumerate(table) if i not in held_set]
            if stale:
                self._clear([], stale)
            seq.stream_from = c.held_from(snap, len(pages))
        seq.num_registered = len(pages)
        seq.num_cached = seq.num_attached = len(pages) * self.page_size
        full = len(seq.prompt_ids) // self.page_size
        extend_hashes(seq, full * self.page_size, self.page_size)
        seq.in_flight = seq.block_hashes[len(pages) : full]
        self.in_flight.update(seq.in_flight)
        self.in_flight_version += bool(seq.in_flight)
        self._awaits.pop(seq, None)

    def awaits_prefix(self, seq: Sequence) -> bool:
        """Whether a running sequence is computing a page of this waiting sequence's prompt that is not cached
        yet: admitted after that page is cached, it attaches the page instead of computing it again. Remembered
        until the index or `in_flight` changes: the queue's reserve asks it of the queue's front once per running
        prefill and admission again, each a walk over the sequence's cached prefix."""
        if self.cache is None or not self.in_flight or seq.params.prompt_logprobs is not None:
            return False
        stamp = (self.cache.version, self.in_flight_version)
        memo = self._awaits.get(seq)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        most = (len(seq.prompt_ids) - 1) // self.page_size
        extend_hashes(seq, most * self.page_size, self.page_size)
        waits = False
        for key in seq.block_hashes[:most]:
            if self.in_flight[key]:
                waits = True
                break
            if key not in self.cache.page_of:
                break
        self._awaits[seq] = (stamp, waits)
        return waits

    def _settle(self, seq: Sequence, n: int) -> None:
        """The first `n` announced pages of `seq` are cached (or will never be): nobody waits for them."""
        for key in seq.in_flight[:n]:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]
        self.in_flight_version += bool(seq.in_flight[:n])
        del seq.in_flight[:n]

    def cache_computed(self, seq: Sequence, num_new: int) -> None:
        """After a step that computed `num_new` tokens of `seq`: index its newly filled cacheable pages; with
        streaming heads, snapshot its streaming state when its prompt has just been computed (by a chunk that ended
        there, or, recomputing after a preemption, went on into the reply)."""
        c = self.cache
        if c is None:
            return
        full = c.cacheable(seq) // self.page_size
        extend_hashes(seq, full * self.page_size, self.page_size)
        for k in range(seq.num_registered, full):
            c.register(seq.block_hashes[k], seq.page_table[k])
        seq.num_registered = max(seq.num_registered, full)
        if self.stream_per_seq and seq.num_cached - num_new < len(seq.prompt_ids) <= seq.num_cached:
            self._capture_snapshot(seq)
        # Waiters need the pages (dense mode) or, with streaming heads, the snapshot at the prompt's end too.
        if seq.num_cached >= len(seq.prompt_ids):
            self._settle(seq, len(seq.in_flight))
        elif not self.stream_per_seq:
            self._settle(seq, len(list(takewhile(c.page_of.__contains__, seq.in_flight))))

    def _capture_snapshot(self, seq: Sequence) -> None:
        """Copy the sequence's streaming pages into cache-owned ones, if free pages allow and it adds keys."""
        keys = self.cache.snapshot_keys(seq, seq.num_cached)
        if not keys or len(seq.stream_table) > self.num_stream_free:
            return
        pages = [self._stream_page() for _ in seq.stream_table]  # may evict older snapshots
        self.page_ops.append(("copy", list(seq.stream_table), pages))
        self.cache.add_snapshot(Snapshot(pages, seq.num_cached, keys, seq.stream_from))

    def _donate_snapshot(self, seq: Sequence) -> bool:
        """A released sequence's streaming pages become a snapshot of its state if they add keys."""
        if self.cache is None or not seq.stream_table or seq.num_cached <= seq.num_attached:
            return False
        keys = self.cache.snapshot_keys(seq, seq.num_cached)
        if keys:
            self.cache.add_snapshot(Snapshot(list(seq.stream_table), seq.num_cached, keys, seq.stream_from))
        return bool(keys)

    def _clear(self, pages: list[int], stream_pages: list[int]) -> None:
        """Record a clear of fresh pages, merged into the last op when that is a clear too (one launch a step)."""
        if self.page_ops and self.page_ops[-1][0] == "clear":
            self.page_ops[-1][1].extend(pages)
            self.page_ops[-1][2].extend(stream_pages)
        else:
            self.page_ops.append(("clear", pages, stream_pages))

    def take_page_ops(self) -> list[PageOp]:
        """The page copies and clears recorded since the last call, to run in this order before a forward."""
        ops, self.page_ops = self.page_ops, []
        return ops
