"""Numba kernels for y[N, M] = x[N, K] @ W^T with W a `QuantTensor`, read straight from its packed blocks.

- Decode, N <= GEMV_ROWS (`gemv_rows_q`): each weight row is read from memory once for all rows of x; its
  blocks are unpacked in vector registers and multiplied with int8 activations (cpu_quant_simd.py). As in
  llama.cpp, x is quantized per 32 values (dx = max|x| / 127, xq = round(x / dx)), so a block costs a few
  integer instructions instead of a float32 conversion per weight (2.7x faster on AVX2). Accuracy cost: each
  activation is off by at most dx/2, so |y - x @ W.T| <= sum over 32-blocks of dx/2 * sum|w| (0.3-0.9% of
  max|y| on random data, well under the 4-bit weights' own error). The formats' offsets (q4_1 min, 8 of
  q4_0 / int4, q4_k mins, 32 of q6_k) go through the quantized activations' sums, so the bound covers them.
- Prefill, N > GEMV_ROWS (`gemm_rows_q`): float32 activations; a tile of weight rows is dequantized into a
  reused float32 scratch that stays in cache, then one BLAS GEMM per tile (arithmetic-bound there).
Both take an output-row range (j0, j1), like `gemv_rows` in cpu_kernels.py, so that `SplitRunner` (cpu.py)
can run parts of one product on several threads; `linear_q` does that split.

One generic kernel per shape of work with the format's block decoder inlined, chosen by a format code that is
constant for the whole call: the IR row loops of `ROW_DOT` for the GEMV, `_block_dequant` for the GEMM tiles.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from ..weights import qtensor
from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor
from . import cpu_kernels, cpu_native, cpu_quant_simd
from .cpu_kernels import FAST, JIT
from .cpu_native import native_job, view
from .cpu_quant_simd import ROW_DOT, ROW_DOT16, f16_at
from .cpu_threads import SplitRunner, even_bounds
from .numba_cache import flush_if_deps_changed

Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, INT8, INT4 = range(7)
assert FORMATS == ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8", "int4")
BLOCK = tuple(lay.block for lay in LAYOUTS.values())
BLOCK_BYTES = tuple(lay.block_bytes for lay in LAYOUTS.values())
_ROW16_Q8_0, _ROW16_INT8 = ROW_DOT16
# Up to this many rows of x, the GEMV (its cost grows with N; the GEMM's tile dequantization does not):
# measured crossover ~16-32 rows at 1536x576 and 4096x4096 (1 thread)
GEMV_ROWS = 16
# float32 scratch per GEMM tile: SmolLM2's four layer matrices at N = 512 took 78 ms with 8 MB tiles (one
# tile per matrix; float32 GEMMs 67 ms) against 92 ms with 1 MB tiles (float32 70 ms), one thread, loaded host
TILE_BYTES = 8 << 20


@nb.njit(inline="always")
def _k4_scale(row, o, s):
    """(scale, min) of q4_k sub-block s from the 12 packed bytes at row[o:] (6 bits each)."""
    if s < 4:
        return row[o + s] & 63, row[o + s + 4] & 63
    return (row[o + s + 4] & 15) | ((row[o + s - 4] >> 6) << 4), (row[o + s + 4] >> 4) | (
        (row[o + s] >> 6) << 4
    )


@nb.njit(inline="always")
def _block_scale(x, r, b, qmax):
    """(dx, 1 / dx) of values 32 b .. 32 b + 31 of row r: dx = max|x| / qmax, NaN if one of them is NaN or Inf
    (so that it reaches y as it would in float32), 1 / dx = 0 for an all-zero block."""
    amax, finite = np.float32(0.0), True
    for i in range(32 * b, 32 * b + 32):
        amax = max(amax, abs(x[r, i]))
        finite &= np.isfinite(x[r, i])
    d = amax / np.float32(qmax) if finite else np.float32(np.nan)
    return d, np.float32(1.0) / d if d > 0 else np.float32(0.0)


@nb.njit(**JIT)
def quantize_activations(x, xq, dx, xs):
    """Per 32 values of each row: dx = max|x| / 127, xq = round(x / dx); xs = dx * (sum of xq per 16)."""
    n, k = x.shape
    for r in range(n):
        for b in range(k // 32):
            d, inv = _block_scale(x, r, b, 127.0)
            dx[r, b] = d
            for c in range(2 * b, 2 * b + 2):
                s = 0
                for i in range(16 * c, 16 * c + 16):
                    q = np.int32(np.rint(x[r, i] * inv))
                    xq[r, i] = q
                    s += q
                xs[r, c] = d * np.float32(s)


@nb.njit(**JIT)
def quantize_activations16(x, xq, dx):
    """Per 32 values of each row: dx = max|x| / 32767, xq = round(x / dx) as int16 (`logits_q`)."""
    n, k = x.shape
    for r in range(n):
        for b in range(k // 32):
            d, inv = _block_scale(x, r, b, 32767.0)
            dx[r, b] = d
            for i in range(32 * b, 32 * b + 32):
                xq[r, i] = np.int16(np.rint(x[r, i] * inv))


@nb.njit(fastmath=FAST, **JIT)
def gemv_rows_q16(fmt, xq, dx, data, out, j0, j1):
    """`gemv_rows_q` for an 8-bit format (Q8_0 or INT8) and int16 activations from `quantize_activations16`."""
    nblocks = xq.shape[1] // 32
    for j in range(j0, j1):
        for r in range(xq.shape[0]):
            if fmt == Q8_0:
                out[r, j] = _ROW16_Q8_0(data[j], nblocks, xq[r], dx[r])
            else:
                out[r, j] = _ROW16_INT8(data[j], nblocks, xq[r], dx[r])


def _rows_of(row_dot):
    """The GEMV loop of one format (its row dot fixed at compile time: a loop per format, no format test
    inside it)."""

    @nb.njit(inline="always")
    def rows(xq, dx, xs, data, out, j0, j1, nblocks):
        for j in range(j0, j1):
            for r in range(xq.shape[0]):
                out[r, j] = row_dot(data[j], nblocks, xq[r], dx[r], xs[r])

    return rows


_ROWS_Q8_0, _ROWS_Q4_0, _ROWS_Q4_1, _ROWS_Q4_K, _ROWS_Q6_K, _ROWS_INT8, _ROWS_INT4 = map(_rows_of, ROW_DOT)


@nb.njit(fastmath=FAST, **JIT)  # contract: the per-block scale-and-accumulate becomes one FMA (1.6x)
def gemv_rows_q(fmt, xq, dx, xs, data, out, j0, j1):
    """out[r, j] = W[j] . x[r] for j0 <= j < j1; W's row j packed in data[j] (format code fmt), x quantized
    by `quantize_activations` into (xq, dx, xs)."""
    nblocks = xq.shape[1] // BLOCK[fmt]
    if fmt == Q4_1:
        _ROWS_Q4_1(xq, dx, xs, data, out, j0, j1, nblocks)
    elif fmt == Q4_0:
        _ROWS_Q4_0(xq, dx, xs, data, out, j0, j1, nblocks)
    elif fmt == Q8_0:
        _ROWS_Q8_0(xq, dx, xs, data, out, j0, j1, nblocks)
    elif fmt == Q4_K:
        _ROWS_Q4_K(xq, dx, xs, data, out, j0, j1, nblocks)
    elif fmt == Q6_K:
        _ROWS_Q6_K(xq, dx, xs, data, out, j0, j1, nblocks)
    elif fmt == INT8:
        _ROWS_INT8(xq, dx, xs, data, out, j0, j1, nblocks)
    else:
        _ROWS_INT4(xq, dx, xs, data, out, j0, j1, nblocks)


@nb.njit(**JIT)
def _gemv_args(fmt, xq, dx, xs, data, out):
    """The native job of `gemv_rows_q(fmt, xq, dx, xs, data, out, j0, j1)`: its int64 args (`_gemv_job`)."""
    a = np.empty(10, np.int64)
    a[0], a[1], a[2], a[3], a[4] = fmt, xq.shape[0], xq.shape[1], data.shape[0], data.shape[1]
    a[5], a[6], a[7], a[8], a[9] = (
        xq.ctypes.data,
        dx.ctypes.data,
        xs.ctypes.data,
        data.ctypes.data,
        out.ctypes.data,
    )
    return a


def _gemv_job(args, j0, j1):
    a = view(args, (10,), nb.int64)
    n, k, m = a[1], a[2], a[3]
    xq, dx, xs = (
        view(a[5], (n, k), nb.int8),
        view(a[6], (n, k // 32), nb.float32),
        view(a[7], (n, k // 16), nb.float32),
    )
    gemv_rows_q(a[0], xq, dx, xs, view(a[8], (m, a[4]), nb.uint8), view(a[9], (n, m), nb.float32), j0, j1)


@nb.njit(**JIT)
def _gemv16_args(fmt, xq, dx, data, out):
    """The native job of `gemv_rows_q16` (int16 activations): its int64 args (`_gemv16_job`)."""
    a = np.empty(9, np.int64)
    a[0], a[1], a[2], a[3], a[4] = fmt, xq.shape[0], xq.shape[1], data.shape[0], data.shape[1]
    a[5], a[6], a[7], a[8] = xq.ctypes.data, dx.ctypes.data, data.ctypes.data, out.ctypes.data
    return a


def _gemv16_job(args, j0, j1):
    a = view(args, (9,), nb.int64)
    n, k, m = a[1], a[2], a[3]
    xq, dx = view(a[5], (n, k), nb.int16), view(a[6], (n, k // 32), nb.float32)
    gemv_rows_q16(a[0], xq, dx, view(a[7], (m, a[4]), nb.uint8), view(a[8], (n, m), nb.float32), j0, j1)


@nb.njit(inline="always")
def _nibbles(row, o, h, dst, k, d, z, m, add_m):
    """dst[k + i] = d * (nib(i) - z), plus m where `add_m` (q4_1), for the 2h nibbles of row[o:o + h] (low
    nibbles first). q4_0 / int4 add nothing: adding 0.0 would turn gguf's -0.0 products (d < 0) into +0.0."""
    for i in range(h):
        q = np.int32(row[o + i])
        lo, hi = d * np.float32((q & 15) - z), d * np.float32((q >> 4) - z)
        dst[k + i] = lo + m if add_m else lo
        dst[k + h + i] = hi + m if add_m else hi


@nb.njit(inline="always")
def _block_dequant(fmt, row, b, dst, row_scale):
    """dst[b*block:(b+1)*block] = the float32 values of block b (same float32 operations as gguf.quants)."""
    if fmt == Q4_1:
        o = b * 20
        _nibbles(row, o + 4, 16, dst, b * 32, f16_at(row, o), 0, f16_at(row, o + 2), True)
    elif fmt == Q4_0 or fmt == INT4:
        o, h = b * BLOCK_BYTES[fmt], BLOCK[fmt] // 2
        _nibbles(row, o + 2, h, dst, b * 2 * h, f16_at(row, o), 8, np.float32(0.0), False)
    elif fmt == Q8_0 or fmt == INT8:
        o = b * 34 + 2 if fmt == Q8_0 else 2 + b * 32
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
        row_scale = f16_at(row, 0) if fmt == INT8 else np.float32(1.0)
        for b in range(nblocks):
            _block_dequant(fmt, row, b, out[j - j0], row_scale)


def gemm_rows_q(fmt: int, x: np.ndarray, data: np.ndarray, out: np.ndarray, j0: int, j1: int) -> None:
    """out[:, j0:j1] = x @ W[j0:j1].T, one BLAS GEMM per dequantized tile of W's rows, written in place
    (a column block of a row-major matrix is a BLAS operand with leading dimension M: no copy)."""
    k = x.shape[1]
    tile = max(8, min(512, TILE_BYTES // (4 * k)))
    scratch = np.empty((min(tile, j1 - j0), k), np.float32)
    for t0 in range(j0, j1, tile):
        t1 = min(t0 + tile, j1)
        dequant_rows(fmt, data, scratch, t0, t1)
        np.matmul(x, scratch[: t1 - t0].T, out=out[:, t0:t1])


def embed_q(table: QuantTensor, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a quantized embedding table as float32 [len(ids), K]; only those rows are dequantized."""
    rows = np.ascontiguousarray(table.data[np.asarray(ids)])
    out = np.empty((rows.shape[0], table.shape[1]), np.float32)
    dequant_rows(FORMATS.index(table.fmt), rows, out, 0, rows.shape[0])
    return out


def linear_q(
    x: np.ndarray, w: QuantTensor, split: SplitRunner | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """x @ W.T for float32 x [N, K]: decode rows by the GEMV, more rows by tiled GEMMs; parts over W's rows.

    `out`: where to write the [N, M] result, e.g. a column block y[:, a:b] of a fused q/k/v output whose parts
    have different formats (a Q4_K_M file's Q4_K q/k and Q6_K v).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.shape} does not match a {w.fmt} weight of shape {w.shape}")
    n, m = x.shape[0], w.shape[0]
    fmt, parts = FORMATS.index(w.fmt), split.parts if split else 1
    y = np.empty((n, m), np.float32) if out is None else out
    if y.shape != (n, m) or y.dtype != np.float32 or y.strides[1] != 4:
        raise ValueError(f"out must be float32 ({n}, {m}) with unit column stride, got {y.dtype} {y.shape}")
    if n <= GEMV_ROWS:
        k = x.shape[1]
        xq, dx, xs = (
            np.empty((n, k), np.int8),
            np.empty((n, k // 32), np.float32),
            np.empty((n, k // 16), np.float32),
        )
        quantize_activations(x, xq, dx, xs)
        y_c = y if y.flags.c_contiguous else np.empty((n, m), np.float32)  # one compiled layout of `out`
        part = lambda a, b: gemv_rows_q(fmt, xq, dx, xs, w.data, y_c, a, b)  # noqa: E731
        native = functools.partial(native_job, _gemv_job, _gemv_args, fmt, xq, dx, xs, w.data, y_c)
        key = ("qgemv", n, w.fmt, w.shape)
    else:
        part = lambda a, b: gemm_rows_q(fmt, x, w.data, y, a, b)  # noqa: E731
        native, key = None, ("qgemm", n.bit_length(), w.fmt, w.shape)
    bounds = even_bounds(0, m, parts)
    if split:  # the GEMV's rows are independent: on one thread, its parts are one call
        split.run(
            key, part, bounds, joint=n <= GEMV_ROWS, native=native if w.data.flags.c_contiguous else None
        )
    else:
        part(0, m)
    if n <= GEMV_ROWS and y_c is not y:
        y[...] = y_c
    return y


def logits_q(x: np.ndarray, w: QuantTensor, split: SplitRunner | None = None) -> np.ndarray:
    """x @ W.T at float32-grade accuracy for the final logits, whose top two often differ by < 0.5% (the
    int8 activations alone flipped SmolLM2's greedy answer). Decode rows of an 8-bit head (Q8_0, int8) take
    int16 activations per 32 values (each off by at most max|x| / 65534) in one pass over the weights; other
    formats run the int8 GEMV a second time on the activations' rounding residual (off by dx/254, not dx/2)."""
    fmt = FORMATS.index(w.fmt)
    if x.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] > GEMV_ROWS or fmt not in (Q8_0, INT8):
        y = linear_q(x, w, split)  # (which refuses a bad x)
        if x.shape[0] <= GEMV_ROWS:
            y += linear_q(x - _int8_rounded(np.ascontiguousarray(x, dtype=np.float32)), w, split)
        return y
    n, k = x.shape
    xq, dx = np.empty((n, k), np.int16), np.empty((n, k // 32), np.float32)
    quantize_activations16(np.ascontiguousarray(x, dtype=np.float32), xq, dx)
    m = w.shape[0]
    y = np.empty((n, m), np.float32)
    part = lambda a, b: gemv_rows_q16(fmt, xq, dx, w.data, y, a, b)  # noqa: E731
    native = functools.partial(native_job, _gemv16_job, _gemv16_args, fmt, xq, dx, w.data, y)
    if split:
        split.run(
            ("qgemv16", n, w.fmt, w.shape), part, even_bounds(0, m, split.parts), joint=True,
            native=native if w.data.flags.c_contiguous else None,
        )  # fmt: skip
    else:
        part(0, m)
    return y


def _int8_rounded(x: np.ndarray) -> np.ndarray:
    """x as the GEMV sees it: per 32 values dx * round(x / dx) (`quantize_activations`)."""
    n, k = x.shape
    xq, dx, xs = (
        np.empty((n, k), np.int8),
        np.empty((n, k // 32), np.float32),
        np.empty((n, k // 16), np.float32),
    )
    quantize_activations(x, xq, dx, xs)
    return (xq.reshape(n, -1, 32) * dx[..., None]).reshape(n, k)


# Row kernels, block layouts and bit casts compiled in from these modules, which Numba's cache does not track.
flush_if_deps_changed(globals(), [cpu_quant_simd, cpu_kernels, cpu_native, qtensor])
