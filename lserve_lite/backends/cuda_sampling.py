"""GPU sampling (kernels/sampling.cu): the same decisions as backends/reference/sampling.py, one block per row.

A step uploads a [4, B] float64 parameter block (temperature, top_k, top_p, and one uniform per row drawn
from the sequence's own seeded generator, exactly as the CPU sampler draws it), plus each penalized row's
unique ids, and copies back only the B token ids. Same seed, same token as the CPU backend up to ties
(and up to float64 summation-order rounding at a CDF boundary).
"""

from __future__ import annotations

import numpy as np

from .cuda_compile import load_module

SAMPLING_KERNELS = ("argmax_rows", "sample_rows", "apply_penalty")
THREADS = 1024


def sampling_inputs(
    seqs: list, vocab: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Host side of a step: the [4, B] parameter block and the penalty triples (rows, ids, penalties).

    Draws one uniform from `seq.rng` for each non-greedy row, in row order, as backends/reference/sampling.py does.
    """
    b = len(seqs)
    params = np.zeros((4, b), np.float64)
    rows, ids, pens = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.all_ids, dtype=np.int64))
            seen = seen[seen < vocab]
            rows.append(np.full(seen.size, i, np.int32))
            ids.append(seen)
            pens.append(np.full(seen.size, p.repetition_penalty, np.float32))
        if not p.greedy:
            params[:, i] = (p.temperature, p.top_k, p.top_p, seq.rng.random())
    pen = (np.concatenate(rows), np.concatenate(ids), np.concatenate(pens)) if rows else None
    return params, pen


class GpuSampler:
    """Launches kernels/sampling.cu; `sample(logits, seqs)` returns one token id per row."""

    def __init__(self):
        import cupy as cp

        self.cp = cp
        mod = load_module("sampling.cu", SAMPLING_KERNELS)
        self.k = {n: mod.get_function(n) for n in SAMPLING_KERNELS}

    def sample(self, logits, seqs: list) -> list[int]:
        cp = self.cp
        b = len(seqs)
        if b == 0:
            return []
        logits = cp.asarray(logits)
        if logits.dtype != cp.float32 or not logits.flags.c_contiguous:
            logits = cp.ascontiguousarray(logits, dtype=cp.float32)
        if logits.shape[0] != b:
            raise ValueError(f"{logits.shape[0]} logit rows for {b} sequences")
        vocab = int(logits.shape[1])
        params, pen = sampling_inputs(seqs, vocab)
        if pen is not None:
            logits = logits.copy()  # never change the caller's logits
            self.apply_penalty(logits, *pen)
        out = cp.empty(b, cp.int32)
        stride = np.int64(vocab)
        if not params[0].any():  # all greedy
            self.k["argmax_rows"]((b,), (THREADS,), (logits, stride, np.int32(vocab), out))
        else:
            self.k["sample_rows"](
                (b,), (THREADS,), (logits, stride, np.int32(vocab), cp.asarray(params), out)
            )
        return [int(t) for t in out.get()]

    def apply_penalty(self, logits, rows: np.ndarray, ids: np.ndarray, pens: np.ndarray) -> None:
        """In place on contiguous float32 `logits`: the repetition penalty of each (row, id)."""
        cp = self.cp
        n = int(rows.size)
        if n:
            args = (
                logits,
                np.int64(logits.shape[1]),
                cp.asarray(rows),
                cp.asarray(ids),
                cp.asarray(pens),
                np.int32(n),
            )
            self.k["apply_penalty"]((-(-n // 256),), (256,), args)
