"""The GPU's "split" layout of the 32-value block formats (kernels/quant_gemv_split.cu): a QuantTensor's
integers, scales and additive terms in three aligned arrays, so a decode lane reads 16-byte words of integers
only. Lossless (the same integers and fp16 fields, moved), NumPy only, done once at upload.

| format | BITS | scale group (chunks of 32) | Z | m     | from                                             |
|--------|------|----------------------------|---|-------|--------------------------------------------------|
| q8_0   | 8    | 1                          | 0 | -     | d, q[32] of each block                           |
| q4_0   | 4    | 1                          | 8 | -     | d, qs[16] (nibble order kept)                    |
| q4_1   | 4    | 1                          | 0 | yes   | d, m, qs[16]                                     |
| int8   | 8    | the row                    | 0 | -     | the row scale, q                                 |
| int4   | 4    | 4                          | 8 | -     | d, qs[64] re-nibbled to 4 chunks of Q4_0's order |

Integers: 4-bit chunk byte i = v[i] | v[i + 16] << 4 (Q4_0 / Q4_1's own order); 8-bit: the signed bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..weights.qtensor import QuantTensor


@dataclass(frozen=True)
class SplitFormat:
    """The kernel's trait (`Split<BITS, CPG, MIN, Z>` in quant_gemv_split.cu) of one format."""

    trait: str
    bits: int
    cpg: int  # chunks of 32 values per scale (0: one scale per row)
    has_min: bool
    zero: int = 0  # Z, subtracted from each integer: w = d * (q - Z) (+ m)

    def groups(self, k: int) -> int:
        """Scales per row of k values."""
        return k // (32 * self.cpg) if self.cpg else 1


SPLIT_FORMATS: dict[str, SplitFormat] = {
    "q8_0": SplitFormat("SQ8_0", 8, 1, False),
    "q4_0": SplitFormat("SQ4_0", 4, 1, False, 8),
    "q4_1": SplitFormat("SQ4_1", 4, 1, True),
    "int8": SplitFormat("SINT8", 8, 0, False),
    "int4": SplitFormat("SINT4", 4, 4, False, 8),
}


@dataclass(frozen=True)
class SplitHost:
    """The three host arrays of one matrix: q uint8 [M, K * bits / 8], d / m float16 [M, groups] (m or None)."""

    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None


def split(w: QuantTensor) -> SplitHost:
    """`w`'s fields in the split layout (SPLIT_FORMATS[w.fmt] must exist)."""
    rows, k = w.shape
    lay = w.layout
    blocks = w.data[:, lay.row_head :].reshape(rows, k // lay.block, lay.block_bytes)

    def f16(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view("<f2").reshape(rows, -1).astype(np.float16)

    if w.fmt in ("q8_0", "q4_0"):  # d, then the integers
        return SplitHost(_rows(blocks[..., 2:], rows), f16(blocks[..., :2]), None)
    if w.fmt == "q4_1":
        return SplitHost(_rows(blocks[..., 4:], rows), f16(blocks[..., :2]), f16(blocks[..., 2:4]))
    if w.fmt == "int8":
        return SplitHost(_rows(blocks, rows), f16(w.data[:, :2]), None)
    if w.fmt == "int4":
        # qs byte i: v[i] | v[i + 64] << 4 -> 4 chunks of 32, chunk byte i: v[i] | v[i + 16] << 4
        qs = blocks[..., 2:]
        v = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1, 4, 2, 16)
        return SplitHost(_rows(v[..., 0, :] | (v[..., 1, :] << 4), rows), f16(blocks[..., :2]), None)
    raise ValueError(f"{w.fmt}: no split layout (formats: {', '.join(SPLIT_FORMATS)})")


def _rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8).reshape(rows, -1)


def dequantize(s: SplitHost, fmt: str, dtype: type = np.float64) -> np.ndarray:
    """The float matrix from the split arrays (NumPy reference of quant_dequant_split, for tests)."""
    f = SPLIT_FORMATS[fmt]
    rows = s.q.shape[0]
    if f.bits == 8:
        q = s.q.view(np.int8).astype(dtype)
    else:
        c = s.q.reshape(rows, -1, 16)
        q = np.concatenate([c & 15, c >> 4], axis=-1).reshape(rows, -1).astype(dtype)
    q -= f.zero
    k = q.shape[1]
    per = k // s.d.shape[1]
    w = q * np.repeat(s.d.astype(dtype), per, axis=1)
    if s.m is not None:
        w += np.repeat(s.m.astype(dtype), per, axis=1)
    return w
