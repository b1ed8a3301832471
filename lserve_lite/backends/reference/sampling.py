"""Reference of kernels/sampling.cu, and the CPU backend's sampler: repetition penalty, temperature,
top-k, top-p, a per-request seeded RNG."""

from __future__ import annotations

import numpy as np

from ...sequence import Sequence

FLOAT32_MAX = float(np.finfo(np.float32).max)


def sample(logits: np.ndarray, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` [B, vocab] (float32), following each sequence's params."""
    out = []
    for row, seq in zip(logits, seqs):
        p = seq.params
        x = row.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.all_ids, dtype=np.int64))
            seen = seen[seen < x.shape[0]]
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.greedy:
            out.append(int(np.argmax(x)))
            continue
        out.append(int(sample_row(x, p.temperature, p.top_k, p.top_p, seq.rng.random())))
    return out


def sample_row(x: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """Inverse-CDF sampling with uniform `u` in [0, 1) over the filtered, tempered distribution."""
    x = x / np.float32(min(temperature, FLOAT32_MAX))  # a huge temperature: uniform, no overflow
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    z = x[order] - x[order[0]]
    probs = np.exp(z.astype(np.float64))
    probs /= probs.sum()
    if top_p < 1.0:
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return int(order[min(idx, len(order) - 1)])
