"""The overlapped decode step (docs/ARCHITECTURE.md): the record of a step launched before the host read its
samples, and which batches may launch so."""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.base import SampledTokens
from ..sequence import Sequence
from .scheduler import ScheduledBatch

PLACEHOLDER = -1  # output id of a token sampled on the device and not read back yet


@dataclass
class InFlight:
    """A launched decode step whose sampled ids the host has not read yet; each of its sequences holds a
    placeholder as its last output id meanwhile."""

    seqs: list[Sequence]
    tokens: SampledTokens


def overlaps(batch: ScheduledBatch, inflight: InFlight | None, async_ok: bool) -> bool:
    """Whether the batch may launch before the host reads its samples: plain decodes on a backend that
    runs asynchronously (`async_ok`), each fed by the step in flight (if any), nothing preempted."""
    if not async_ok or batch.preempted:
        return False
    live = set(map(id, inflight.seqs)) if inflight is not None else None
    return all(
        s.decodes(n) and _plain(s) and (live is None or id(s) in live)
        for s, n in zip(batch.seqs, batch.num_new)
    )


def inflight_ends(inflight: InFlight, max_len: int) -> bool:
    """The step in flight has no running sequence left, or its sample is the last of one by length
    (max_new_tokens, context limit)."""
    live = [s for s in inflight.seqs if not s.is_finished]
    return not live or any(
        len(s.output_ids) >= s.params.max_new_tokens or s.num_tokens >= max_len for s in live
    )


def drop_finished(batch: ScheduledBatch) -> None:
    """Rows of sequences that finished after the batch was scheduled (their pages are already freed)."""
    keep = [i for i, s in enumerate(batch.seqs) if not s.is_finished]
    batch.seqs = [batch.seqs[i] for i in keep]
    batch.num_new = [batch.num_new[i] for i in keep]


def _plain(seq: Sequence) -> bool:
    """A sequence whose next step needs nothing of this step's token on the host: no grammar, no logprobs,
    no penalty that counts the generated tokens, no min_tokens mask still to lift."""
    p = seq.params
    return (
        seq.guide is None
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and len(seq.output_ids) >= p.min_tokens
    )
