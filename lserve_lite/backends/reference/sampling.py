"""Reference of kernels/sampling.cu, and the CPU backend's sampler: logit bias and min_tokens' mask, then the
repetition, frequency and presence penalties (vLLM's order), a grammar's token mask, temperature, min-p (the CPU's
only: the CUDA backend refuses it), top-k, top-p, a per-request seeded RNG; and the log-probabilities the OpenAI API
returns."""

from __future__ import annotations

import math

import numpy as np

from ...sampling_params import SamplingParams
from ...sequence import Sequence

FLOAT32_MAX = float(np.finfo(np.float32).max)
HEAD = 1024  # logits sample_row sorts first (then 8x as many until its decision lies inside)


def sample(logits: np.ndarray, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` [B, vocab] (float32), following each sequence's params."""
    out = []
    for row, seq in zip(logits, seqs):
        p = seq.params
        if p.greedy and p.repetition_penalty == 1.0 and not has_additive(p) and seq.token_mask is None:
            out.append(int(np.argmax(row)))  # the logits as they are: no copy of the row
            continue
        x = row.astype(np.float32, copy=True)
        ids, deltas = bias_terms(seq, x.shape[0])  # vLLM's logits processors, before its penalties
        x[ids] += deltas
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.all_ids, dtype=np.int64))
            seen = seen[seen < x.shape[0]]
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        ids, deltas = penalty_terms(seq, x.shape[0])
        x[ids] += deltas
        if seq.token_mask is not None:
            x[~allowed_tokens(seq.token_mask, x.shape[0])] = -np.inf
        if p.greedy:
            out.append(int(np.argmax(x)))
            continue
        out.append(int(sample_row(x, p.temperature, p.top_k, p.top_p, seq.rng.random(), p.min_p)))
    return out


def sound_rows_ref(logits: np.ndarray) -> np.ndarray:
    """Whether each row can be sampled: every logit finite and not all equal (overflowed activations give NaN / inf,
    or zeros where a norm's sum of squares overflowed, and such a row samples a meaningless id)."""
    hi, lo = logits.max(axis=1), logits.min(axis=1)  # a NaN anywhere in a row is its max and min: not finite
    return np.isfinite(hi) & np.isfinite(lo) & (hi > lo)  # two passes over the logits, no [B, vocab] mask


def has_additive(p: SamplingParams) -> bool:
    """Whether presence / frequency penalties, a logit bias or min_tokens' mask add to any logit."""
    return bool(p.presence_penalty or p.frequency_penalty or p.logit_bias or p.min_tokens)


_NO_IDS, _NO_AMOUNTS = np.zeros(0, np.int64), np.zeros(0, np.float32)
_NO_IDS.flags.writeable = _NO_AMOUNTS.flags.writeable = False


def bias_terms(seq: Sequence, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids and the float32 amount added to their logits before the penalties (vLLM's order): logit_bias,
    and -inf for the stop ids (`seq.stop_ids`: EOS, ignore_eos or not, and stop_token_ids) while it has fewer than
    min_tokens (vLLM's rule)."""
    p = seq.params
    if not p.logit_bias and len(seq.output_ids) >= p.min_tokens:  # most requests: no per-id work a step
        return _NO_IDS, _NO_AMOUNTS
    delta = dict(p.logit_bias)
    if len(seq.output_ids) < p.min_tokens:
        delta.update(dict.fromkeys(seq.stop_ids, -math.inf))
    ids = np.fromiter((t for t in delta if t < vocab), np.int64)
    return ids, np.asarray([delta[t] for t in ids.tolist()], np.float32)


def penalty_terms(seq: Sequence, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids and the float32 amount added to their logits after the repetition penalty (vLLM's order):
    -(count x frequency_penalty + presence_penalty) over the generated ids (OpenAI's rule)."""
    p = seq.params
    if not (p.presence_penalty or p.frequency_penalty) or not seq.output_ids:
        return _NO_IDS, _NO_AMOUNTS
    ids, counts = np.unique(np.asarray(seq.output_ids, np.int64), return_counts=True)
    keep = ids < vocab
    amounts = -(counts[keep] * p.frequency_penalty + p.presence_penalty)
    return ids[keep], amounts.astype(np.float32)


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """Booleans [vocab] from a bitmask of int32 words (bit i % 32 of word i // 32; llguidance's layout)."""
    bits = np.unpackbits(np.ascontiguousarray(mask, np.int32).view(np.uint8), bitorder="little")
    out = np.zeros(vocab, bool)
    n = min(vocab, bits.size)
    out[:n] = bits[:n].astype(bool)
    return out


def sample_row(
    x: np.ndarray, temperature: float, top_k: int, top_p: float, u: float, min_p: float = 0.0
) -> int:
    """Inverse-CDF sampling with uniform `u` in [0, 1) over the filtered, tempered distribution: the logits in the
    order (value descending, index ascending), those at least min_p times as probable as the first (vLLM's min-p,
    after temperature: a prefix of the order), the first top_k of them, then the shortest prefix whose probability
    reaches top_p, and the first element whose cumulative probability exceeds u times the kept mass.

    Sorts only as far as the decision needs (`_head`: the first m of the order, m growing 8x from HEAD until the
    crossing is inside it): a full stable argsort of a 49k vocabulary took 5-6 ms a row. With more than HEAD logits
    kept, the float64 total of the kept ones is summed in the row's order, not the sorted one (the decision can
    differ from a fully sorted sum only where u falls within that rounding of a CDF boundary)."""
    x = x / np.float32(min(temperature, FLOAT32_MAX))  # a huge temperature: uniform, no overflow
    n = x.shape[0]
    kept = top_k if 0 < top_k < n else n
    if min_p > 0:
        kept = min(kept, _min_p_kept(x, min_p))
    if 4 * HEAD > n or np.isnan(x).any():  # a short row; NaN (last in argsort, first in a partition)
        return _sample_sorted(x, np.argsort(-x, kind="stable")[:kept], top_p, u)
    if kept <= HEAD:
        return _sample_sorted(x, _head(x, kept), top_p, u)
    xmax = x.max()
    w = np.exp((x[_head_set(x, kept)] - xmax).astype(np.float64))
    total = w.sum()
    m, whole = HEAD, None
    while True:
        order = _head(x, m)
        probs = np.exp((x[order] - xmax).astype(np.float64)) / total
        cum = np.cumsum(probs)
        if top_p < 1.0:
            keep = int(np.searchsorted(cum, top_p) + 1)
            if keep <= m or m == kept:
                probs, order = probs[:keep] / probs[:keep].sum(), order[:keep]
                idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
                return int(order[min(idx, len(order) - 1)])
        else:
            if whole is None:  # the kept probabilities' sum, as the plain definition's probs.sum()
                whole = (w / total).sum()
            idx = int(np.searchsorted(cum, u * whole, side="right"))
            if idx < m or m == kept:
                return int(order[min(idx, m - 1)])
        m = min(kept, 8 * m)
        m = kept if m > n // 4 else m  # (a head of over a quarter of the row: the kept set sorted whole)


def _min_p_kept(x: np.ndarray, min_p: float) -> int:
    """How many tempered logits are at least min_p times as probable as the most probable one (at least it: a row
    holding NaN keeps only its first)."""
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, not kept
        return max(1, int(np.count_nonzero(np.exp((x - x.max()).astype(np.float64)) >= min_p)))


def _head_set(x: np.ndarray, m: int) -> np.ndarray:
    """Indices of the first m logits in the order (value descending, index ascending), in index order."""
    n = x.shape[0]
    if m >= n:
        return np.arange(n)
    thr = np.partition(x, n - m)[n - m]  # the m-th largest value
    above = np.flatnonzero(x > thr)
    return np.concatenate([above, np.flatnonzero(x == thr)[: m - above.size]])


def _head(x: np.ndarray, m: int) -> np.ndarray:
    """Indices of the first m logits in the order (value descending, index ascending), in that order."""
    if m >= x.shape[0]:
        return np.argsort(-x, kind="stable")
    cand = _head_set(x, m)
    return cand[np.lexsort((cand, -x[cand]))]


def _sample_sorted(x: np.ndarray, order: np.ndarray, top_p: float, u: float) -> int:
    """The plain definition over `order`, the kept logits fully sorted (tempered logits x)."""
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
    if k and 4 * HEAD <= x.shape[1] and not np.isnan(x).any():  # each row's first k by a partition
        top = np.stack([_head(row, k) for row in x]) if r else np.zeros((0, k), np.int64)
    else:
        top = np.argsort(-x, axis=1, kind="stable")[:, :k] if k else np.zeros((r, 0), np.int64)
    top_lp = (np.take_along_axis(x, top, axis=1) - lse).astype(np.float32)
    return lp, top.astype(np.int64), top_lp
