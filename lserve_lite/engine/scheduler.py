"""Continuous batching with chunked prefill under a per-step token budget, preemption by recompute.

Each step fills the token budget in three passes:

1. Decodes: every running sequence with one pending token gets it, oldest first.
2. Running prefills: the budget left goes to running sequences still prefilling, oldest first, except
   that those with at most `reserve` tokens left go before the others (a short prompt that got a partial
   first chunk finishes its prefill in the next step instead of waiting behind a long one).
   While requests wait and a seat is free, these chunks leave a reserve of `budget // 4` tokens
   (at least 1; fewer when the head's prompt past its cached prefix is shorter) for the queue: a long prompt
   never takes the whole step. Where nothing else runs and the head
   cannot start after all (its cached prefix took the page it was counted on), they take the step.
3. Admission: waiting requests, first come first served, get chunks from what is left (the reserve, plus
   anything the passes above did not use) while pages, seats and page-selection slots (LServe) last, and
   never ahead of a request preempted in this step. A request first attaches the longest cached prefix of
   its prompt (prefix cache, kv/prefix_cache.py): its chunk starts after it, and the tokens attached cost
   no budget. A request whose prompt continues into pages a running sequence is still computing waits
   until they are cached (it would compute them again otherwise); requests behind it may go first.

Bound (for requests not waiting for a prefix being computed): with a free seat, pages and (LServe) a free
page-selection slot, the request at the head of the queue gets its first prefill chunk in
the step after it arrives, and the k-th waiting request within k steps, however long the prompts being
prefilled are. A prompt of at most `reserve` tokens is fully prefilled in that step and decodes from the
next; one of at most 2 x `reserve` tokens in the step after. A longer prompt then queues its remaining
chunks behind older prefills (first come, first served).

A sequence that lacks pages preempts the newest sequences not yet scheduled in this step (at worst
itself); they go back to the head of the queue and recompute their K/V when readmitted (their indexed
pages stay in the prefix cache, so readmission attaches what was not evicted meanwhile).

A step that schedules nothing and preempts nothing while work exists can never make progress (a budget
or seat limit below 1, a pool too small for the head request alone, or every page-selection slot held by
sequences outside the scheduler: an evaluation harness's): it raises SchedulerStalled.

Ctrl-C is held (interrupts.ctrl_c_held) wherever pages move: a grow with its preemptions, an admission with its
bookkeeping. One landing inside handed out pages no table recorded, or left an admitted request queued with its
pages (admitted again, it lost them). Steps that move no page (most decode steps) take no hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import LServeError
from ..kv.block_manager import BlockManager
from ..sequence import Sequence, Status
from .interrupts import ctrl_c_held

RESERVE_DIVISOR = 4  # while requests wait, running prefills leave budget // 4 tokens for the queue


class SchedulerStalled(LServeError):
    """The scheduler cannot run any waiting or running sequence (limits below 1 or too few KV pages)."""


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
    """Decodes first, then running prefill chunks, then admissions; see the module docstring for the rule."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SchedulerStalled(f"{name} must be an integer >= 1, got {v!r}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.reserve = max(1, max_num_batched_tokens // RESERVE_DIVISOR)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prompt_tokens_cached = 0  # prompt tokens attached from the prefix cache, over all admissions

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], [])
        budget = self.budget
        for seq in [s for s in self.running if s.num_pending == 1]:
            if budget > 0 and seq.status is Status.RUNNING:  # a decode before it may have preempted it
                budget -= self._run(seq, 1, batch)
        prefills = sorted(
            (s for s in self.running if s.num_pending > 1), key=lambda s: s.num_pending > self.reserve
        )
        budget = self._prefill(prefills, budget, batch, keep_reserve=True)
        self._admit(budget, batch)
        if not batch.seqs and not batch.preempted:
            # The head took none of its reserve after all (attaching its cached prefix claimed the idle page it
            # was counted on): the running prefills get the step instead of nothing running.
            self._prefill(prefills, budget, batch, keep_reserve=False)
        if not batch.seqs and not batch.preempted and self.has_work():
            raise SchedulerStalled(self._stall_reason())
        return batch

    def _prefill(
        self, prefills: list[Sequence], budget: int, batch: ScheduledBatch, keep_reserve: bool
    ) -> int:
        """Chunks of running prefills, in order, within `budget` (less the queue's reserve); the budget left."""
        for seq in prefills:
            cap = budget - (self._queue_reserve(budget, batch) if keep_reserve else 0)
            if cap <= 0:
                break
            if seq.status is Status.RUNNING:
                budget -= self._run(seq, min(seq.num_pending, cap), batch)
        return budget

    def _queue_reserve(self, budget: int, batch: ScheduledBatch) -> int:
        """Tokens kept for the queue's head this step: its first chunk after its cached prefix (the prefix costs
        neither budget nor, unless idle, pages), none if it cannot be admitted anyway."""
        if not self.waiting or len(self.running) >= self.max_num_seqs or batch.preempted:
            return 0
        head = next((s for s in self.waiting if not self.blocks.awaits_prefix(s)), None)
        return 0 if head is None else self.blocks.first_chunk(head, min(self.reserve, budget))

    def _run(self, seq: Sequence, n: int, batch: ScheduledBatch) -> int:
        """Schedule n tokens of running `seq`, preempting the newest unscheduled sequences for pages."""
        tokens = seq.num_cached + n
        if not self.blocks.has_room(seq, tokens):
            with ctrl_c_held():  # pages moved and recorded whole (module docstring)
                while not self.blocks.can_grow(seq, tokens):
                    # seq is unscheduled: the newest one not in the batch may be seq itself
                    victim = next(s for s in reversed(self.running) if s not in batch.seqs)
                    self.running.remove(victim)
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        return 0
                self.blocks.grow(seq, tokens)
        batch.seqs.append(seq)
        batch.num_new.append(n)
        return n

    def _admit(self, budget: int, batch: ScheduledBatch) -> None:
        """Admit waiting sequences while pages, seats and budget last."""
        used = 0
        for seq in list(self.waiting):
            if used >= budget or len(self.running) >= self.max_num_seqs or batch.preempted:
                break
            if self.blocks.awaits_prefix(seq):
                continue
            with ctrl_c_held():  # pages moved and recorded whole (module docstring)
                # its cached prefix is attached only if the chunk fits
                n = self.blocks.admit(seq, budget - used)
                if not n:
                    break
                got = seq.num_attached
                if seq.num_prefix_cached is None:
                    seq.num_prefix_cached = got
                self.prompt_tokens_cached += min(got, len(seq.prompt_ids))
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            used += n

    def _stall_reason(self) -> str:
        head = self.waiting[0] if self.waiting else self.running[0]
        slot = ", no free page-selection slot" if self.blocks.lacks_slot(head) else ""
        return (
            f"no sequence can be scheduled: {len(self.running)} running, {len(self.waiting)} waiting, "
            f"{self.blocks.num_free} free KV pages{slot}, the next request needs {head.num_pending} tokens "
            f"(max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.budget})"
        )

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.preempt()
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
