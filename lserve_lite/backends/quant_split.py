"""The GPU's "split" layout of the quantized formats (kernels/quant_gemv_split.cu): a QuantTensor's integers,
scales, additive terms and integer sub-scales in aligned arrays, so a decode lane reads 16-byte words of
integers only. Exact (the same integers and fp16 fields, moved, k-quant sub-scales as int8), NumPy only, done
once at upload.

| format | BITS | group (chunks) | Z | m       | sub-scales (2 bytes a chunk)  | bits/weight (blocks) | from           |
|--------|------|----------------|---|---------|-------------------------------|----------------------|----------------|
| q8_0   | 8    | 1              | 0 | -       | -                             | 8.5 (8.5)            | d, q[32]       |
| q4_0   | 4    | 1              | 8 | -       | -                             | 4.5 (4.5)            | d, qs[16]      |
| q4_1   | 4    | 1              | 0 | yes     | -                             | 5 (5)                | d, m, qs[16]   |
| q4_k   | 4    | 8              | 0 | -dmin   | sc_j, m_j (SUB 32)            | 4.625 (4.5)          | see below      |
| q6_k   | 8    | 8              | 0 | -       | sc of values 0-15, 16-31 (16) | 8.5625 (6.5625)      | see below      |
| int8   | 8    | the row        | 0 | -       | -                             | 8 (8)                | row scale, q   |
| int4   | 4    | 4              | 8 | -       | -                             | 4.125 (4.125)        | d, qs[64]      |

Integers: 4-bit chunk byte i = v[i] | v[i + 16] << 4 (Q4_0 / Q4_1's own order; int4's 128-value blocks and
Q4_K's sub-block pairs, low nibbles 2j and high nibbles 2j + 1, are re-nibbled to it); 8-bit: signed bytes
(Q6_K: q6 - 32). w = d * sub * (q - Z) + m * sub_m, with d / m fp16 per group and the integer sub-scales of
the k-quants (SUB: values per sub-scale; 1 elsewhere).
The k-quants keep their two-level scales (fp16 d, dmin per 256 values, 6-bit / int8 sub-scales) instead of
folding them into one fp16 scale per 32 / 16 values: d * sc has up to 17 (Q4_K) / 19 (Q6_K) significant bits,
so an fp16 product would be off by up to 2^-11 of each scale, and cost more bytes (Q4_K 5 bits/weight, Q6_K
9). The kernel multiplies the sub-scales into its exact int32 dot products instead (no error). Q6_K's 6-bit
integers take a byte each (8.56 bits/weight against the blocks' 6.56, 30% more to read and hold) so that
they meet the int8 activations in dp4a without unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..weights.qtensor import QuantTensor, q4_k_ints, q4_k_scales, q6_k_ints


@dataclass(frozen=True)
class SplitFormat:
    """The kernel's trait (`Split<BITS, CPG, MIN, Z, SUB>` in quant_gemv_split.cu) of one format."""

    trait: str
    bits: int
    cpg: int  # chunks of 32 values per scale (0: one scale per row)
    has_min: bool
    zero: int = 0  # Z, subtracted from each integer: w = d * (q - Z) (+ m)
    sub: int = 0  # values per integer sub-scale (0: none; 32: with has_min, the min's multiplier beside it)

    def groups(self, k: int) -> int:
        """Scales per row of k values."""
        return k // (32 * self.cpg) if self.cpg else 1

    def nbytes(self, m: int, k: int) -> int:
        """Bytes of an [m, k] matrix's split arrays (what the device holds and a decode step reads)."""
        scales = 2 * self.groups(k) * (1 + self.has_min) + (k // 16 if self.sub else 0)
        return m * (k * self.bits // 8 + scales)


SPLIT_FORMATS: dict[str, SplitFormat] = {
    "q8_0": SplitFormat("SQ8_0", 8, 1, False),
    "q4_0": SplitFormat("SQ4_0", 4, 1, False, 8),
    "q4_1": SplitFormat("SQ4_1", 4, 1, True),
    "int8": SplitFormat("SINT8", 8, 0, False),
    "int4": SplitFormat("SINT4", 4, 4, False, 8),
    "q4_k": SplitFormat("SQ4_K", 4, 8, True, 0, 32),
    "q6_k": SplitFormat("SQ6_K", 8, 8, False, 0, 16),
}


@dataclass(frozen=True)
class SplitHost:
    """The host arrays of one matrix: q uint8 [M, K * bits / 8], d / m float16 [M, groups] (m or None), the
    sub-scales s int8 [M, K / 16] (two a chunk of 32; or None)."""

    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None
    s: np.ndarray | None = None


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
    if w.fmt == "int4":  # qs byte i: v[i] | v[i + 64] << 4
        return SplitHost(_chunks4(np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], -1)),
                         f16(blocks[..., :2]), None)  # fmt: skip
    if w.fmt == "q4_k":  # w = d * sc_j * q + (-dmin) * m_j
        sc, mn = q4_k_scales(blocks)
        neg = blocks[..., 2:4].copy()
        neg[..., 1] ^= 0x80  # -dmin: the fp16 sign bit
        s = np.stack([sc, mn], axis=-1).astype(np.int8).reshape(rows, -1)
        return SplitHost(_chunks4(q4_k_ints(blocks)), f16(blocks[..., :2]), f16(neg), s)
    if w.fmt == "q6_k":  # w = d * sc[i // 16] * (q6 - 32)
        s = _rows(blocks[..., 192:208], rows).view(np.int8)
        return SplitHost(_rows(q6_k_ints(blocks).astype(np.int8).view(np.uint8), rows), f16(blocks[..., 208:]),
                         None, s)  # fmt: skip
    raise ValueError(f"{w.fmt}: no split layout (formats: {', '.join(SPLIT_FORMATS)})")


def _rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8).reshape(rows, -1)


def _chunks4(v: np.ndarray) -> np.ndarray:
    """4-bit values [rows, ...] in order -> chunk bytes [rows, K / 2]: byte i of each 32 = v[i] | v[i + 16] << 4."""
    c = v.reshape(v.shape[0], -1, 2, 16)
    return _rows(c[..., 0, :] | (c[..., 1, :] << 4), v.shape[0])


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
    d, m = (None if a is None else np.repeat(a.astype(dtype), per, axis=1) for a in (s.d, s.m))
    if s.s is not None:  # sub-scales: per 16 values, or (scale, min multiplier) pairs per 32
        sub = s.s.astype(dtype)
        if f.sub == 16:
            d = d * np.repeat(sub, 16, axis=1)
        else:
            d, m = d * np.repeat(sub[:, 0::2], 32, axis=1), m * np.repeat(sub[:, 1::2], 32, axis=1)
    return q * d if m is None else q * d + m
