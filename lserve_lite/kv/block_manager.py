"""Paged KV allocator: a free list of physical pages; pages go back when a sequence ends or is preempted."""

from __future__ import annotations

from collections import deque

from ..engine.sequence import Sequence


class BlockManager:
    """Hands out page ids in [0, num_pages); a sequence owns the pages in its page_table."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.page_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        n = self.pages_needed(seq, num_tokens)
        if n > len(self.free):
            raise RuntimeError("KV page pool exhausted (scheduler must check can_grow first)")
        seq.page_table.extend(self.free.popleft() for _ in range(n))

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.page_table)
        seq.page_table = []
        seq.num_cached = 0
