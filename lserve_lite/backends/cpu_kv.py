"""One KV row (a token's K or V of one head) stored into and loaded from a CPU KV pool in any CPU format.

Numba picks the format from the values' dtype (float32: fp32, uint16: fp16 bits (an fp16 cache viewed by
`kernel_view`), int8: int8, uint8: int4 with (scale, min) per
group, the group read from the scales' width, or fp8 e4m3 bits when a row has one scale; kv/quant.py has
the rule): the kernels that write and read K/V call `kv_store` / `kv_load_page` and stay format-free, quantizing
on write and, on load, reading values as stored (`to_f32`, `row_scaled`) or decoding a page's rows (`kv_load`),
with no float copy of the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ..kv.quant import E4M3, FORMATS
from .cpu_half import f32_to_half, half_to_f32

E4M3_MAX = FORMATS["fp8"].qmax


@njit
def e4m3_code(y: float) -> int:
    """kv/quant.e4m3_encode of one value: the nearest e4m3 code (ties to the even code, saturating at 448)."""
    a = min(abs(y), E4M3_MAX)
    lo, hi = 0, 126  # the first code whose value is >= a (searchsorted), then clamped to 1..126
    while lo < hi:
        mid = (lo + hi) // 2
        if E4M3[mid] < a:
            lo = mid + 1
        else:
            hi = mid
    hi = min(max(lo, 1), 126)
    lo = hi - 1
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    code = lo if dlo < dhi or (dlo == dhi and lo % 2 == 0) else hi
    return code | (128 if np.signbit(y) else 0)


def kv_store(x, vals, scales, pg, h, off):
    """Store row x [D] float32 at vals[pg, h, off] (and its scales); quantized caches round to nearest."""
    raise NotImplementedError  # Numba-only (the overload below)


def kv_load(vals, scales, pg, h, off, buf):
    """Row vals[pg, h, off] of a uint8 pool (int4, fp8) dequantized into buf [D] (float32): the formats whose
    values `kv_load_page` cannot hand over as stored."""
    raise NotImplementedError  # Numba-only (the overload below)


def kv_load_page(vals, scales, pg, h, buf):
    """Rows vals[pg, h] [page, D] as the attention loops read them (each value through `to_f32`): the cache's
    own rows (float32, fp16 bits converted as they are read, int8 values with their row scales applied by the
    caller: `row_scaled`), or dequantized into buf [page, D] (int4, fp8)."""
    raise NotImplementedError  # Numba-only (the overload below)


def to_f32(x):
    """A value of `kv_load_page`'s rows as float32."""
    raise NotImplementedError  # Numba-only (the overload below)


def row_scaled(vals):
    """Whether `kv_load_page` gives a pool's stored values unscaled, each row to be scaled by scales[pg, h, o, 0]
    (int8: the attention folds the key scale into the scores and the value scale into the probabilities)."""
    raise NotImplementedError  # Numba-only (the overload below)


@overload(to_f32, inline="always")
def _to_f32(x):
    if x == types.uint16:
        return lambda x: half_to_f32(x)
    if isinstance(x, types.Integer):
        return lambda x: np.float32(x)
    return lambda x: x


@overload(row_scaled, inline="always")
def _row_scaled(vals):
    scaled = vals.dtype == types.int8
    return lambda vals: scaled


@overload(kv_store)
def _kv_store(x, vals, scales, pg, h, off):
    if isinstance(vals.dtype, types.Float):

        def store_float(x, vals, scales, pg, h, off):
            for i in range(x.shape[0]):
                vals[pg, h, off, i] = x[i]

        return store_float

    if vals.dtype == types.uint16:

        def store_half(x, vals, scales, pg, h, off):
            for i in range(x.shape[0]):
                vals[pg, h, off, i] = f32_to_half(np.float32(x[i]))

        return store_half

    if vals.dtype == types.int8:

        def store_int8(x, vals, scales, pg, h, off):
            amax = np.float32(0.0)
            for i in range(x.shape[0]):
                amax = max(amax, abs(x[i]))
            s = amax / np.float32(127.0)
            scales[pg, h, off, 0] = s
            for i in range(x.shape[0]):
                vals[pg, h, off, i] = np.int8(min(max(np.rint(x[i] / s), -127.0), 127.0) if s > 0 else 0)

        return store_int8

    def store_uint8(x, vals, scales, pg, h, off):
        if scales.shape[3] == 1:  # fp8: one scale per row (int4 has (scale, min) pairs)
            amax = np.float32(0.0)
            for i in range(x.shape[0]):
                amax = max(amax, abs(x[i]))
            scales[pg, h, off, 0] = amax / np.float32(E4M3_MAX)
            s = np.float64(scales[pg, h, off, 0])  # against the stored scale, in float64 as the reference
            for i in range(x.shape[0]):
                vals[pg, h, off, i] = np.uint8(e4m3_code(np.float64(x[i]) / s) if s > 0 else 0)
            return
        groups = scales.shape[3] // 2
        g = x.shape[0] // groups
        for k in range(groups):
            lo, hi = x[k * g], x[k * g]
            for i in range(k * g, (k + 1) * g):
                lo, hi = min(lo, x[i]), max(hi, x[i])
            scales[pg, h, off, 2 * k] = (np.float64(hi) - lo) / 15.0  # float64 as the reference, then stored
            scales[pg, h, off, 2 * k + 1] = lo
            s, m = np.float64(scales[pg, h, off, 2 * k]), np.float64(lo)
            for i in range(k * g, (k + 1) * g, 2):
                a = min(max(np.rint((x[i] - m) / s), 0.0), 15.0) if s > 0 else 0.0
                b = min(max(np.rint((x[i + 1] - m) / s), 0.0), 15.0) if s > 0 else 0.0
                vals[pg, h, off, i // 2] = np.uint8(int(a) | (int(b) << 4))

    return store_uint8


@overload(kv_load)
def _kv_load(vals, scales, pg, h, off, buf):
    if vals.dtype != types.uint8:
        return None

    # One row with its scale (pair) hoisted per group and a table lookup per fp8 code: a per-value branch (fp8) and
    # a per-byte division (int4) made these loads 4.5x / 1.8x slower (docs/KV_QUANT.md).
    def load_uint8(vals, scales, pg, h, off, buf):
        row = vals[pg, h, off]
        if scales.shape[3] == 1:  # fp8: e4m3 bits moved into an fp16's place are the value / 256, exactly
            s = np.float32(scales[pg, h, off, 0]) * np.float32(256.0)
            for i in range(buf.shape[0]):
                b = np.uint16(row[i])
                buf[i] = (
                    half_to_f32(np.uint16(((b & np.uint16(0x80)) << 8) | ((b & np.uint16(0x7F)) << 7))) * s
                )
            return buf
        groups = scales.shape[3] // 2
        per = row.shape[0] // groups  # bytes per group
        for k in range(groups):
            s, m = np.float32(scales[pg, h, off, 2 * k]), np.float32(scales[pg, h, off, 2 * k + 1])
            for i in range(k * per, (k + 1) * per):
                b = np.int32(row[i])
                buf[2 * i] = np.float32(b & 15) * s + m
                buf[2 * i + 1] = np.float32(b >> 4) * s + m
        return buf

    return load_uint8


@overload(kv_load_page)
def _kv_load_page(vals, scales, pg, h, buf):
    if vals.dtype != types.uint8:  # float32, fp16 bits, int8: read as stored
        return lambda vals, scales, pg, h, buf: vals[pg, h]

    def load_rows(vals, scales, pg, h, buf):
        for o in range(buf.shape[0]):
            kv_load(vals, scales, pg, h, o, buf[o])
        return buf

    return load_rows


def kernel_view(a: np.ndarray) -> np.ndarray:
    """A KV pool as the kernels take it: an fp16 pool as its uint16 bits (Numba has no float16), others as they are."""
    return a.view(np.uint16) if a.dtype == np.float16 else a
