"""Paged KV allocator: free lists of physical pages for the dense pool and the streaming pool.

A sequence owns `page_table` (dense pool, one page per `page_size` tokens, grows with the context) and
`stream_table` (streaming pool: sink pages then a ring of local pages, at most `stream_per_seq` pages).
Pages go back when the sequence ends, is aborted or is preempted.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sequence import Sequence


class BlockManager:
    """Hands out page ids in [0, num_pages) and [0, num_stream_pages)."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_stream_pages: int = 0,
        stream_per_seq: int = 0,
        max_seqs: int = 0,
    ):
        self.num_pages, self.page_size = num_pages, page_size
        self.num_stream_pages, self.stream_per_seq = num_stream_pages, stream_per_seq
        self.free: deque[int] = deque(range(num_pages))
        self.stream_free: deque[int] = deque(range(num_stream_pages))
        self.slots: deque[int] = deque(range(max_seqs))  # page-selection slots of running sequences

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Pages in use in both pools."""
        return self.num_pages - len(self.free) + self.num_stream_pages - len(self.stream_free)

    def _needed(self, seq: Sequence, num_tokens: int) -> tuple[int, int]:
        pages = -(-num_tokens // self.page_size)
        dense = max(0, pages - len(seq.page_table))
        stream = max(0, min(pages, self.stream_per_seq) - len(seq.stream_table))
        return dense, stream

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        dense, stream = self._needed(seq, num_tokens)
        return dense <= len(self.free) and stream <= len(self.stream_free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        dense, stream = self._needed(seq, num_tokens)
        if dense > len(self.free) or stream > len(self.stream_free):
            raise RuntimeError("KV page pool exhausted (scheduler must check can_grow first)")
        seq.page_table.extend(self.free.popleft() for _ in range(dense))
        seq.stream_table.extend(self.stream_free.popleft() for _ in range(stream))
        if seq.sel_slot < 0 and self.slots:
            seq.sel_slot = self.slots.popleft()

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.page_table)
        self.stream_free.extend(seq.stream_table)
        if seq.sel_slot >= 0:
            self.slots.append(seq.sel_slot)
        seq.page_table, seq.stream_table, seq.sel_slot = [], [], -1
        seq.num_cached = seq.decode_steps = 0
