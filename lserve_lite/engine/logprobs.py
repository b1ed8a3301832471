"""Log-probabilities for the OpenAI API, computed by the backend (`Ops.logprobs`) on the rows asked for:
generated tokens (`logprobs`) and, for echo, prompt tokens (`prompt_logprobs`, every prefill row)."""

from __future__ import annotations

import numpy as np

from ..backends.base import Ops
from ..sequence import Sequence, TokenLogprob

# rows whose log-softmax one Ops.logprobs call takes: the CPU's takes two float64 copies of them (16 bytes a logit),
# which for a whole prompt chunk at once (2048 rows of SmolLM2's 49k vocabulary) held 1.5 GiB
LOGPROB_ROWS = 64


def record_prompt_logprobs(
    ops: Ops, logits, seqs: list[Sequence], num_new: list[int], wants: list[bool]
) -> None:
    """After the step: the logprob of each prompt token whose predecessor was in this step's chunk. `wants`:
    `seq.wants_prompt_logprobs` before the step (those sequences got a logit row per chunk token)."""
    end = 0
    for seq, n, w in zip(seqs, num_new, wants):
        c = n if w else 1
        end += c
        if not w:
            continue
        start, p = seq.num_cached - n, len(seq.prompt_ids)
        pos = np.arange(start, min(start + n, p - 1))  # row at position j predicts prompt token j + 1
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None] * p
        if pos.size == 0:
            continue
        rows = end - c + (pos - start)
        chosen = np.asarray(seq.prompt_ids, np.int64)[pos + 1]
        for j, entry in zip(pos.tolist(), _entries(ops, logits, rows, chosen, seq.params.prompt_logprobs)):
            seq.prompt_logprobs[j + 1] = entry


def record_token_logprobs(ops: Ops, logits, seqs: list[Sequence], tokens: list[int]) -> None:
    """The sampled tokens' logprobs for the sequences that asked (rows of `logits` follow `seqs`)."""
    idx = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not idx:
        return
    k = max(seqs[i].params.logprobs for i in idx)
    chosen = np.asarray([tokens[i] for i in idx], np.int64)
    for i, entry in zip(idx, _entries(ops, logits, np.asarray(idx), chosen, k)):
        entry.top = entry.top[: seqs[i].params.logprobs]
        seqs[i].logprobs.append(entry)


def _entries(ops: Ops, logits, rows: np.ndarray, chosen: np.ndarray, k: int) -> list[TokenLogprob]:
    """The logprobs of `chosen` [R] and the top k from logits[rows], LOGPROB_ROWS rows a call."""
    out = []
    for a in range(0, len(rows), LOGPROB_ROWS):
        picked = chosen[a : a + LOGPROB_ROWS]
        lp, top, top_lp = ops.logprobs(logits[rows[a : a + LOGPROB_ROWS]], picked, k)
        out += [
            TokenLogprob(int(t), float(v), list(zip(ids.tolist(), lps.tolist())))
            for t, v, ids, lps in zip(picked.tolist(), lp.tolist(), top, top_lp)
        ]
    return out
