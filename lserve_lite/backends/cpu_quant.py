"""Numba kernels for y[N, M] = x[N, K] @ W^T with W a `QuantTensor`, read straight from its packed blocks.

Activations stay float32: a block is widened to float32 in vector registers (cpu_quant_simd.py) and dotted
with x, so the only error beyond float32 rounding is the format's own (no int8 activation quantization as
llama.cpp does; that would add ~0.2-0.4% relative error per dot for ~1.5x less arithmetic per block).
The block offsets (x[N, K/16] sums of x) carry the formats' minimums and zero points: w = d*q + m gives
d*dot(q, x) + m*sum(x).

- Decode, N <= 8 (`gemv_rows_q`): each weight row is read once from memory for all rows of x.
- Prefill, N > 8 (`gemm_rows_q`): a tile of weight rows is dequantized into a reused float32 scratch that
  stays in cache, then one BLAS GEMM per tile (the arithmetic dominates there, not the bytes).
Both take an output-row range (j0, j1), like `gemv_rows` in cpu_kernels.py, so that `SplitRunner` (cpu.py)
can run parts of one product on several threads; `linear_q` does that split.

One generic kernel per shape of work; the per-format block decoders (`_block_dot`, `_block_dequant`) are
inlined and chosen by a format code that is constant for the whole call.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor
from .cpu import SMALL_ROWS, SplitRunner, even_bounds
from .cpu_kernels import FAST, JIT
from .cpu_quant_simd import f16_at, i8_dot32, nib_dot32, nib_pair16, nib_pair64, q6_dot16

Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, INT8, INT4 = range(7)
assert FORMATS == ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8", "int4")
BLOCK = tuple(lay.block for lay in LAYOUTS.values())
BLOCK_BYTES = tuple(lay.block_bytes for lay in LAYOUTS.values())
TILE_BYTES = 1 << 18  # float32 scratch per GEMM tile: fits the L2 cache next to the activations' panel


@nb.njit(inline="always")
def _k4_scale(row, o, s):
    """(scale, min) of q4_k sub-block s from the 12 packed bytes at row[o:] (6 bits each)."""
    if s < 4:
        return row[o + s] & 63, row[o + s + 4] & 63
    return (row[o + s + 4] & 15) | ((row[o + s - 4] >> 6) << 4), (row[o + s + 4] >> 4) | (
        (row[o + s] >> 6) << 4
    )


@nb.njit(inline="always")
def _sum16(xs, i, n):
    """Sum of x over n consecutive 16-value chunks from chunk i."""
    s = np.float32(0.0)
    for c in range(n):
        s += xs[i + c]
    return s


@nb.njit(inline="always")
def _block_dot(fmt, row, b, x, xs, row_scale):
    """dot(block b of the packed row, x[b*block:(b+1)*block]); xs: x's sums per 16 values."""
    if fmt == Q4_1:
        o = b * 20
        return f16_at(row, o) * nib_pair16(row, o + 4, x, b * 32) + f16_at(row, o + 2) * _sum16(xs, 2 * b, 2)
    if fmt == Q4_0:
        o = b * 18
        return f16_at(row, o) * (nib_pair16(row, o + 2, x, b * 32) - np.float32(8.0) * _sum16(xs, 2 * b, 2))
    if fmt == Q8_0:
        o = b * 34
        return f16_at(row, o) * i8_dot32(row, o + 2, x, b * 32)
    if fmt == INT8:
        return row_scale * i8_dot32(row, b * 32, x, b * 32)
    if fmt == INT4:
        o = b * 66
        return f16_at(row, o) * (nib_pair64(row, o + 2, x, b * 128) - np.float32(8.0) * _sum16(xs, 8 * b, 8))
    if fmt == Q4_K:
        o, k = b * 144, b * 256
        acc, mins = np.float32(0.0), np.float32(0.0)
        for s in range(8):
            sc, m = _k4_scale(row, o + 4, s)
            acc += np.float32(sc) * nib_dot32(row, o + 16 + 32 * (s // 2), 4 * (s % 2), x, k + 32 * s)
            mins += np.float32(m) * _sum16(xs, 16 * b + 2 * s, 2)
        return f16_at(row, o) * acc - f16_at(row, o + 2) * mins
    o, k = b * 210, b * 256  # Q6_K
    acc = np.float32(0.0)
    for c in range(16):  # 16-value chunks; c = 8 * half + 2 * group + t
        h, g, t = c // 8, (c // 2) % 4, c % 2
        ol, oh = o + 64 * h + 32 * (g % 2) + 16 * t, o + 128 + 32 * h + 16 * t
        q = q6_dot16(row, ol, 4 * (g // 2), oh, 2 * g, x, k + 16 * c) - np.float32(32.0) * xs[16 * b + c]
        acc += np.float32(np.int8(row[o + 192 + c])) * q
    return f16_at(row, o + 208) * acc


@nb.njit(fastmath=FAST, **JIT)
def gemv_rows_q(fmt, x, xs, data, out, j0, j1):
    """out[r, j] = dot(x[r], W[j]) for j0 <= j < j1, W's row j decoded from data[j] (format code fmt)."""
    n, k = x.shape
    nblocks = k // BLOCK[fmt]
    for j in range(j0, j1):
        row = data[j]
        row_scale = f16_at(row, row.shape[0] - 2) if fmt == INT8 else np.float32(1.0)
        for r in range(n):
            xr, xsr = x[r], xs[r]
            acc = np.float32(0.0)
            for b in range(nblocks):
                acc += _block_dot(fmt, row, b, xr, xsr, row_scale)
            out[r, j] = acc


@nb.njit(inline="always")
def _nibbles(row, o, h, dst, k, d, z, m):
    """dst[k + i] = d * (nib(i) - z) + m for the 2h nibbles of row[o:o + h] (low nibbles first)."""
    for i in range(h):
        q = np.int32(row[o + i])
        dst[k + i] = d * np.float32((q & 15) - z) + m
        dst[k + h + i] = d * np.float32((q >> 4) - z) + m


@nb.njit(inline="always")
def _block_dequant(fmt, row, b, dst, row_scale):
    """dst[b*block:(b+1)*block] = the float32 values of block b (same float32 operations as gguf.quants)."""
    if fmt == Q4_1:
        o = b * 20
        _nibbles(row, o + 4, 16, dst, b * 32, f16_at(row, o), 0, f16_at(row, o + 2))
    elif fmt == Q4_0 or fmt == INT4:
        o, h = b * BLOCK_BYTES[fmt], BLOCK[fmt] // 2
        _nibbles(row, o + 2, h, dst, b * 2 * h, f16_at(row, o), 8, np.float32(0.0))
    elif fmt == Q8_0 or fmt == INT8:
        o = b * 34 + 2 if fmt == Q8_0 else b * 32
        d = f16_at(row, b * 34) if fmt == Q8_0 else row_scale
        for i in range(32):
            dst[b * 32 + i] = np.float32(np.int8(row[o + i])) * d
    elif fmt == Q4_K:
        o = b * 144
        d, dmin = f16_at(row, o), f16_at(row, o + 2)
        for s in range(8):
            sc, m = _k4_scale(row, o + 4, s)
            ds, dm, sh, qo = d * np.float32(sc), dmin * np.float32(m), 4 * (s % 2), o + 16 + 32 * (s // 2)
            for i in range(32):
                dst[b * 256 + 32 * s + i] = ds * np.float32((row[qo + i] >> sh) & 15) - dm
    else:  # Q6_K
        o = b * 210
        d = f16_at(row, o + 208)
        for e in range(256):
            h, g, i = e // 128, (e // 32) % 4, e % 32
            q = ((row[o + 64 * h + 32 * (g % 2) + i] >> (4 * (g // 2))) & 15) | (
                ((row[o + 128 + 32 * h + i] >> (2 * g)) & 3) << 4
            )
            dst[b * 256 + e] = (d * np.float32(np.int8(row[o + 192 + e // 16]))) * np.float32(q - 32)


@nb.njit(**JIT)
def dequant_rows(fmt, data, out, j0, j1):
    """out[j - j0] = W's row j as float32 for j0 <= j < j1 (GEMM tiles, embedding rows)."""
    nblocks = out.shape[1] // BLOCK[fmt]
    for j in range(j0, j1):
        row = data[j]
        row_scale = f16_at(row, row.shape[0] - 2) if fmt == INT8 else np.float32(1.0)
        for b in range(nblocks):
            _block_dequant(fmt, row, b, out[j - j0], row_scale)


def gemm_rows_q(fmt: int, x: np.ndarray, data: np.ndarray, out_t: np.ndarray, j0: int, j1: int) -> None:
    """out_t[j] = W[j] @ x.T for j0 <= j < j1 (out_t: y transposed), one BLAS GEMM per dequantized tile."""
    k = x.shape[1]
    tile = max(8, min(256, TILE_BYTES // (4 * k)))
    scratch = np.empty((min(tile, j1 - j0), k), np.float32)
    for t0 in range(j0, j1, tile):
        t1 = min(t0 + tile, j1)
        dequant_rows(fmt, data, scratch, t0, t1)
        np.matmul(scratch[: t1 - t0], x.T, out=out_t[t0:t1])


def block_sums(x: np.ndarray) -> np.ndarray:
    """x[N, K] -> its sums over each 16 consecutive values, [N, K/16] (the GEMV kernel's offset terms)."""
    return x.reshape(x.shape[0], -1, 16).sum(axis=2, dtype=np.float32)


def linear_q(x: np.ndarray, w: QuantTensor, split: SplitRunner | None = None) -> np.ndarray:
    """x @ W.T for float32 x [N, K]: decode rows by the GEMV, more rows by tiled GEMMs; parts over W's rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.shape} does not match a {w.fmt} weight of shape {w.shape}")
    n, m = x.shape[0], w.shape[0]
    fmt, parts = FORMATS.index(w.fmt), split.parts if split else 1
    if n <= SMALL_ROWS:
        y = np.empty((n, m), np.float32)
        xs = block_sums(x)
        part = lambda a, b: gemv_rows_q(fmt, x, xs, w.data, y, a, b)  # noqa: E731
        key = ("qgemv", n, w.fmt, w.shape)
    else:
        y_t = np.empty((m, n), np.float32)
        part = lambda a, b: gemm_rows_q(fmt, x, w.data, y_t, a, b)  # noqa: E731
        key = ("qgemm", n.bit_length(), w.fmt, w.shape)
    bounds = even_bounds(0, m, parts)
    if split:
        split.run(key, part, bounds)
    else:
        part(0, m)
    return y if n <= SMALL_ROWS else np.ascontiguousarray(y_t.T)
