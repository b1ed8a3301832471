"""Reference of kernels/sampling.cu, and the CPU backend's sampler: repetition penalty, presence / frequency
penalties and logit bias, a grammar's token mask, temperature, top-k, top-p, a per-request seeded RNG; and
the log-probabilities the OpenAI API returns."""

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
        ids, deltas = additive_terms(seq, x.shape[0])
        x[ids] += deltas
        if seq.token_mask is not None:
            x[~allowed_tokens(seq.token_mask, x.shape[0])] = -np.inf
        if p.greedy:
            out.append(int(np.argmax(x)))
            continue
        out.append(int(sample_row(x, p.temperature, p.top_k, p.top_p, seq.rng.random())))
    return out


def additive_terms(seq: Sequence, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids and the float32 amount added to their logits: -(count x frequency_penalty +
    presence_penalty) over the generated ids (OpenAI's rule), plus logit_bias."""
    p = seq.params
    delta: dict[int, float] = {}
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        ids, counts = np.unique(np.asarray(seq.output_ids, np.int64), return_counts=True)
        for t, c in zip(ids.tolist(), counts.tolist()):
            delta[t] = -(c * p.frequency_penalty + p.presence_penalty)
    for t, b in p.logit_bias.items():
        delta[t] = delta.get(t, 0.0) + b
    ids = np.fromiter((t for t in delta if t < vocab), np.int64)
    return ids, np.asarray([delta[t] for t in ids.tolist()], np.float32)


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """Booleans [vocab] from a bitmask of int32 words (bit i % 32 of word i // 32; llguidance's layout)."""
    bits = np.unpackbits(np.ascontiguousarray(mask, np.int32).view(np.uint8), bitorder="little")
    out = np.zeros(vocab, bool)
    n = min(vocab, bits.size)
    out[:n] = bits[:n].astype(bool)
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


def logprobs_ref(logits: np.ndarray, chosen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-softmax (float64 sums) of each row of raw `logits` [R, V]: the chosen ids' logprobs [R] and the
    top-k ids [R, k] (descending, ties by index) with their logprobs [R, k]."""
    x = np.asarray(logits, np.float32)
    r = x.shape[0]
    m = x.max(axis=1, keepdims=True).astype(np.float64)
    lse = m + np.log(np.exp(x.astype(np.float64) - m).sum(axis=1, keepdims=True))
    rows = np.arange(r)
    lp = (x[rows, np.asarray(chosen, np.int64)] - lse[:, 0]).astype(np.float32)
    top = np.argsort(-x, axis=1, kind="stable")[:, :k] if k else np.zeros((r, 0), np.int64)
    top_lp = (np.take_along_axis(x, top, axis=1) - lse).astype(np.float32)
    return lp, top.astype(np.int64), top_lp
