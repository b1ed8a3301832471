"""Continuous batching with chunked prefill under a per-step token budget, preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..kv.block_manager import BlockManager
from ..sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each brings."""

    seqs: list[Sequence]
    num_new: list[int]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """Decodes first (one token per running sequence), then fills the rest of the budget with prefill chunks."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        seqs, num_new, preempted = [], [], []
        budget = self.budget
        # 1. Running sequences, oldest first; a sequence without room preempts the newest ones.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while not self.blocks.can_grow(seq, seq.num_cached + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_cached + n)
                seqs.append(seq)
                num_new.append(n)
                budget -= n
                i += 1
                continue
            break
        # 2. Admit waiting sequences while pages, slots and budget last (never ahead of a preempted one).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.blocks.can_grow(seq, seq.num_cached + n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_cached + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (done, stopped or aborted) and return its pages at once."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
