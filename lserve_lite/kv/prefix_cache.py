"""Prefix cache: an index of full dense-pool pages by content, and snapshots of streaming-head state.

A full page's key is a hash chained over its token ids and its parent page's key, seeded with a salt of
everything else that changes its K/V (model, KV dtype, KV layout and, with streaming heads, the request's
prefill windows: streaming heads' outputs feed every later layer, so they change dense heads' K/V too).
Equal keys mean equal K/V, page statistics included (they live with the physical page). Indexed pages stay
indexed after their last sequence lets go ("idle") and are evicted least recently used only when the
allocator needs a page; `block_manager.py` owns reference counts and free lists, this module only indexes.

Streaming heads keep sink pages and a ring per sequence, so cached dense pages alone cannot resume them. A
`Snapshot` holds a sequence's sink + ring pages as they were after `end` tokens; it can resume a request at
any page boundary whose visible window the ring still holds (`geometry.ring_covers`), and is indexed under
the keys of those boundaries. See docs/PREFIX_CACHE.md.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..geometry import ring_covers, ring_oldest, ring_slot

if TYPE_CHECKING:
    from ..sequence import Sequence


def kv_salt(*parts: object) -> bytes:
    """The seed of every hash chain: what besides the token ids changes the K/V of a page."""
    return hashlib.sha256(repr(parts).encode()).digest()


def extend_hashes(seq: Sequence, upto: int, page_size: int) -> None:
    """Append to `seq.block_hashes` the key of every full page of its first `upto` tokens not hashed yet."""
    hashes = seq.block_hashes
    for k in range(len(hashes), upto // page_size):
        ids = np.asarray(seq.token_range(k * page_size, (k + 1) * page_size), np.int64)
        hashes.append(hashlib.sha256((hashes[-1] if hashes else seq.kv_salt) + ids.tobytes()).digest())


@dataclass(eq=False)
class Snapshot:
    """Streaming-pool pages (a sequence's stream_table layout: sink pages, then the ring) after `end` tokens;
    its ring holds no page older than `held_from` for the prefix (`Sequence.stream_from`)."""

    pages: list[int]
    end: int
    keys: list[bytes]
    held_from: int = 0


def snapshot_chain_pages(num_stream_pages: int, stream_per_seq: int, context_pages: int) -> int:
    """The most dense pages that streaming snapshots in `num_stream_pages` pages can resume: with streaming heads
    a cached page is attached only with a snapshot of a later boundary, and a snapshot of S pages resumes at most
    S pages of a context (a ring that never wrapped) or, a whole sequence's `stream_per_seq` pages, a whole
    context's `context_pages`. With no dense head, dense pages are ids without bytes (MAX_POOL_PAGES of them):
    no allocation evicts them, so this bounds the index (it grew by every prompt served, to hundreds of MB)."""
    return num_stream_pages * max(1, -(-context_pages // max(stream_per_seq, 1)))


class PrefixCache:
    """Dense pages by key (idle ones in LRU order) and streaming snapshots by boundary key (LRU order)."""

    def __init__(self, page_size: int, sink_pages: int = 0, ring_pages: int = 0, window: int = 0,
                 prompt_only: bool = False, max_idle: int | None = None):  # fmt: skip
        """`window`: the engine's widest streaming window (a request's own when it has knobs); `prompt_only`:
        only prompt K/V is cacheable (LServe: decode steps compute K/V under decode sparsity, not prefill's);
        `max_idle`: the most idle pages kept (None: as many as the pool has; `snapshot_chain_pages`)."""
        self.page_size, self.sink_pages, self.ring_pages = page_size, sink_pages, ring_pages
        self.window, self.prompt_only, self.max_idle = window, prompt_only, max_idle
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # indexed pages nobody references, oldest first
        self.snap_of: dict[bytes, Snapshot] = {}
        self.snaps: OrderedDict[Snapshot, None] = OrderedDict()  # oldest first
        self.snapshot_pages = 0  # a count, not a sum over `snaps`: /metrics reads it from another thread
        self.version = 0  # bumped by every change of what `match` / `find_snapshot` can answer

    # -- dense pages ----------------------------------------------------------------------------------
    def cacheable(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose computed K/V a cold run would compute the same way."""
        return min(seq.num_cached, len(seq.prompt_ids)) if self.prompt_only else seq.num_cached

    def match(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest indexed prefix of `keys`."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, key: bytes, page: int) -> None:
        """Index a freshly filled page, unless another page already holds this content."""
        if key not in self.page_of:
            self.page_of[key], self.key_of[page] = page, key
            self.version += 1

    def park(self, page: int) -> list[int]:
        """A page lost its last reference: an indexed one stays, idle (most recent), and past `max_idle` the least
        recently used idle page goes. The pages to free: `page` if it is not indexed, else any evicted."""
        if page not in self.key_of:
            return [page]
        self.idle[page] = None
        return [self.evict_page()] if self.max_idle is not None and len(self.idle) > self.max_idle else []

    def claim(self, page: int) -> None:
        """A page gets a reference: it is no longer evictable."""
        self.idle.pop(page, None)

    def evict_page(self) -> int:
        """Unindex and hand out the least recently used idle page."""
        page, _ = self.idle.popitem(last=False)
        del self.page_of[self.key_of.pop(page)]
        self.version += 1
        return page

    # -- streaming snapshots ---------------------------------------------------------------------------
    def _covers(self, boundary: int, snap: Snapshot, seq: Sequence) -> bool:
        sp = seq.sparse
        window = max(sp.prefill_local, sp.decode_local) if sp is not None else self.window
        return ring_covers(
            boundary, snap.end, window, self.sink_pages, self.ring_pages, self.page_size, snap.held_from
        )

    def held_from(self, snap: Snapshot, boundary_page: int) -> int:
        """`Sequence.stream_from` of a sequence resumed from `snap` at page `boundary_page`: the snapshot's ring pages
        of the shared prefix, then the pages it writes itself from the boundary on."""
        return min(ring_oldest(snap.end, self.ring_pages, self.page_size, snap.held_from), boundary_page)

    def held_slots(self, snap: Snapshot, boundary_page: int) -> list[int]:
        """Indices of `snap`'s table that hold pages of the prefix before `boundary_page` (a sequence resumed there
        copies these; its other slots hold the donor's pages past the prefix, which it must not read, not even
        the slots past its context that a kernel's 16-row unit weighs by 0: they are cleared instead)."""
        first = self.held_from(snap, boundary_page)
        sinks = range(min(self.sink_pages, boundary_page))
        ring = range(max(self.sink_pages, first), boundary_page)
        return [ring_slot(p, self.sink_pages, self.ring_pages) for p in (*sinks, *ring)]

    def snapshot_keys(self, seq: Sequence, end: int) -> list[bytes]:
        """Keys of the registered boundaries of `seq` that a snapshot after `end` tokens can resume and no
        snapshot serves yet (checked with the narrowest window; `find_snapshot` checks the request's)."""
        ps = self.page_size
        return [
            seq.block_hashes[k - 1]
            for k in range(1, seq.num_registered + 1)
            if seq.block_hashes[k - 1] not in self.snap_of
            and ring_covers(k * ps, end, ps, self.sink_pages, self.ring_pages, ps, seq.stream_from)
        ]

    def add_snapshot(self, snap: Snapshot) -> None:
        for key in snap.keys:
            self.snap_of[key] = snap
        self.snaps[snap] = None
        self.snapshot_pages += len(snap.pages)
        self.version += 1

    def find_snapshot(self, seq: Sequence, num_pages: int) -> tuple[int, Snapshot | None]:
        """The deepest boundary (in pages, <= num_pages) of `seq`'s prompt that a snapshot can resume."""
        for k in range(num_pages, 0, -1):
            snap = self.snap_of.get(seq.block_hashes[k - 1])
            if snap is not None and self._covers(k * self.page_size, snap, seq):
                self.snaps.move_to_end(snap)
                return k, snap
        return 0, None

    def evict_snapshot(self) -> list[int]:
        """Drop the least recently used snapshot; its streaming pages."""
        snap, _ = self.snaps.popitem(last=False)
        for key in snap.keys:
            del self.snap_of[key]
        self.snapshot_pages -= len(snap.pages)
        self.version += 1
        return snap.pages
