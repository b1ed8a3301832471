"""KV rows and pages of a CPU KV pool in any CPU format: a row stored (quantized on write), a page's rows read by
decode attention's two loops (scores, weighted sum of values), and a page dequantized for prefill's BLAS.

Numba picks the format from the values' type as `kernel_view` hands the pool over (float32: fp32, uint16: fp16
bits, int8: int8, a record of one `e4m3` byte: fp8, uint8: int4 with (scale, min) per group, the group read from
the scales' width; kv/quant.py has the rules). The kernels that write and read K/V call `kv_store`,
`page_scores` and `page_weighted_sum` and stay format-free; every format is read as stored, with no float copy
of the cache or of a page: int8 and fp8 rows apply their scale to the row's score and probability, int4 rows
apply each group's (scale, min) to the group's partial dot product.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ..kv.quant import FORMATS, HADAMARD_MAX_DIM, hadamard_signs
from .cpu_half import f32_to_half, half_to_f32

E4M3_MAX = FORMATS["fp8"].qmax


@njit
def e4m3_code(y: float) -> int:
    """kv/quant.e4m3_encode of one value: the nearest e4m3 code (ties to the even code, saturating at 448), from the
    value's exponent and mantissa (the reference searches the table of code values: the same codes, tested). NaN
    saturates as the reference's does (`min` would pass it on to an integer conversion of NaN: any code)."""
    a = abs(y)
    a = a if a < E4M3_MAX else E4M3_MAX
    if a < 2.0**-6:  # subnormal codes 0..7 are multiples of 2^-9 (8: 2^-6, the first normal one)
        code = int(np.rint(a * 512.0))
    else:  # a = m 2^e, m in [0.5, 1): exponent field e + 6, then 3 mantissa bits rounded to even (a carry
        m, e = math.frexp(a)  # moves into the exponent, as the codes are ordered)
        code = (e + 6) * 8 + int(np.rint((m * 2.0 - 1.0) * 8.0))
    return code | (128 if np.signbit(y) else 0)


HADAMARD_SIGNS = hadamard_signs(HADAMARD_MAX_DIM)


@njit(inline="always")
def _absmax(x, i0, i1):
    """max |x[i]| over i0 <= i < i1, NaN if any is NaN: a row holding NaN gets a NaN scale and reads as NaN, as in
    kv/quant.quantize and a float cache (`max` skips a NaN, which then stored a finite row of other values)."""
    m = np.float32(0.0)
    for i in range(i0, i1):
        a = abs(x[i])
        if a != a:
            return a
        m = max(m, a)
    return m


@njit(inline="always")
def _minmax(x, i0, i1):
    """(min, max) of x[i0:i1], both NaN if any is NaN: an int4 group holding NaN gets a NaN (scale, min), as in
    kv/quant.quantize (`min` / `max` skip a NaN)."""
    lo, hi = x[i0], x[i0]
    for i in range(i0, i1):
        v = x[i]
        if v != v:
            return v, v
        lo, hi = min(lo, v), max(hi, v)
    return lo, hi


@njit(inline="always")
def _hadamard(x, d):
    for j in range(d):
        x[j] *= HADAMARD_SIGNS[j]
    h = 1
    while h < d:
        for i in range(0, d, 2 * h):
            for j in range(i, i + h):
                a, b = x[j], x[j + h]
                x[j], x[j + h] = a + b, a - b
        h *= 2
    r = np.float32(1.0) / np.sqrt(np.float32(d))
    for j in range(d):
        x[j] *= r


@njit(inline="always")
def hadamard_row(x):
    """x [D] float32 (D a power of two) into the randomized Hadamard basis, in place: kv/quant.hadamard's signs and
    butterflies in its order, so that the stored keys are its bits (int4's and fp8's basis: `KVFormat.rotates_keys`).
    D = 64 (SmolLM2's) and 128 get loops of constant length."""
    if x.shape[0] == 64:
        _hadamard(x, 64)
    elif x.shape[0] == 128:
        _hadamard(x, 128)
    else:
        _hadamard(x, x.shape[0])


def kv_store(x, vals, scales, pg, h, off):
    """Store row x [D] float32 at vals[pg, h, off] (and its scales); quantized caches round to nearest."""
    raise NotImplementedError  # Numba-only (the overload below)


def page_scores(qrow, vals, scales, pg, h, srow, scale, tmp):
    """srow[o] = (qrow . row o of the page vals[pg, h]) * scale for every row of the page; tmp: float32 scratch
    of at least 2 D values (int4's query halves and group sums)."""
    raise NotImplementedError  # Numba-only (the overload below)


def page_weighted_sum(p, vals, scales, pg, h, acc, tmp, n):
    """acc [D] += sum over o < n of p[o] * row o of the page vals[pg, h]; p is consumed (int8 / fp8: scaled in place
    by the rows' scales); tmp: float32 scratch of at least D values (int4's even and odd sums). Rows from n on (past
    a context's end) are never read, their values nor their scales: a freed page's may hold anything, NaN
    included, and 0 * NaN would carry it into another sequence's output; p[o] must be 0 there (masked)."""
    raise NotImplementedError  # Numba-only (the overload below)


def page_rows(vals, scales, pg, h, out):
    """The rows of the page vals[pg, h] dequantized into out [page, D] float32 (prefill attention's BLAS operand:
    `cpu_kernels.gather_pages`); each value is the one kv/quant.dequantize gives, in float32."""
    raise NotImplementedError  # Numba-only (the overload below)


def to_f32(x):
    """A stored value of a float, int8 or fp8 pool as float32 (fp8: the code's value / 256, see `_row_unit`)."""
    raise NotImplementedError  # Numba-only (the overload below)


@overload(to_f32, inline="always")
def _to_f32(x):
    if x == types.uint16:
        return lambda x: half_to_f32(x)
    if isinstance(x, types.Record):  # e4m3 bits moved into an fp16's place are the value / 256, exactly

        def e4m3_f32(x):
            b = np.uint16(x.e4m3)
            return half_to_f32(np.uint16(((b & np.uint16(0x80)) << 8) | ((b & np.uint16(0x7F)) << 7)))

        return e4m3_f32
    if isinstance(x, types.Integer):
        return lambda x: np.float32(x)
    return lambda x: x


def _row_unit(vals) -> float:
    """What a row scale is multiplied by to turn `to_f32` of the stored values into the row's values (0: none)."""
    if isinstance(vals.dtype, types.Record):
        return 256.0  # fp8: to_f32 gives the code's value / 256
    return 1.0 if vals.dtype == types.int8 else 0.0


@njit(inline="always")
def _int4_groups(scales):
    """An int4 pool's groups per row: its (scale, min) pairs. A uint8 pool with one scale per row is fp8 handed
    over without `kernel_view`, which would otherwise be read as int4."""
    if scales.shape[3] < 2:
        raise ValueError(
            "an fp8 KV pool reached a CPU kernel as plain uint8: pass it through cpu_kv.kernel_view"
        )
    return scales.shape[3] // 2


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
            scales[pg, h, off, 0] = _absmax(x, 0, x.shape[0]) / np.float32(127.0)
            # against the stored scale, in float64 as the reference (a float32 quotient can round onto a tie)
            s = np.float64(scales[pg, h, off, 0])
            for i in range(x.shape[0]):
                vals[pg, h, off, i] = np.int8(min(max(np.rint(x[i] / s), -127.0), 127.0) if s > 0 else 0)

        return store_int8

    if isinstance(vals.dtype, types.Record):

        def store_fp8(x, vals, scales, pg, h, off):
            scales[pg, h, off, 0] = _absmax(x, 0, x.shape[0]) / np.float32(E4M3_MAX)
            s = np.float64(scales[pg, h, off, 0])  # against the stored scale, in float64 as the reference
            for i in range(x.shape[0]):
                vals[pg, h, off, i].e4m3 = np.uint8(e4m3_code(np.float64(x[i]) / s) if s > 0 else 0)

        return store_fp8

    def store_int4(x, vals, scales, pg, h, off):
        groups = _int4_groups(scales)
        g = x.shape[0] // groups
        for k in range(groups):
            lo, hi = _minmax(x, k * g, (k + 1) * g)
            scales[pg, h, off, 2 * k] = (np.float64(hi) - lo) / 15.0  # float64 as the reference, then stored
            scales[pg, h, off, 2 * k + 1] = lo
            s, m = np.float64(scales[pg, h, off, 2 * k]), np.float64(lo)
            for i in range(k * g, (k + 1) * g, 2):
                a = min(max(np.rint((x[i] - m) / s), 0.0), 15.0) if s > 0 else 0.0
                b = min(max(np.rint((x[i + 1] - m) / s), 0.0), 15.0) if s > 0 else 0.0
                vals[pg, h, off, i // 2] = np.uint8(int(a) | (int(b) << 4))

    return store_int4


# The page loops below are inlined into their caller (which sets fastmath); a head dim of 64 (SmolLM2's) gets
# loops of constant length, unrolled. Page sizes are multiples of 4.


@njit(inline="always")
def _dots4(qrow, keys, srow, scale, d):
    """srow[o] = dot(qrow, keys[o]) * scale, four keys per pass over qrow."""
    for o in range(0, keys.shape[0], 4):
        a, b, c, e = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for i in range(d):
            a += qrow[i] * to_f32(keys[o, i])
            b += qrow[i] * to_f32(keys[o + 1, i])
            c += qrow[i] * to_f32(keys[o + 2, i])
            e += qrow[i] * to_f32(keys[o + 3, i])
        srow[o], srow[o + 1], srow[o + 2], srow[o + 3] = a * scale, b * scale, c * scale, e * scale


@njit(inline="always")
def _last(o, n):
    """Row o, or the last row that counts (n - 1) for one past it: a pass of several rows reads no row from n on
    (their weights p are 0, so the sum is what reading them as zeros gives)."""
    return min(o, n - 1)


@njit(inline="always")
def _sums4(p, vals, acc, d, n):
    """acc += sum over o < n of p[o] * vals[o], four rows per pass over acc."""
    for o in range(0, n, 4):
        a, b, c, e = p[o], p[o + 1], p[o + 2], p[o + 3]
        o1, o2, o3 = _last(o + 1, n), _last(o + 2, n), _last(o + 3, n)
        for i in range(d):
            acc[i] += (a * to_f32(vals[o, i]) + b * to_f32(vals[o1, i])) + (
                c * to_f32(vals[o2, i]) + e * to_f32(vals[o3, i])
            )


# A nibble n as fp16 bits is the subnormal n * 2^-24 (exact, and F16C converts eight at once): the query halves, the
# sums of values and the nibbles themselves are multiplied by this to undo it, never a group scale (up to float32's
# largest / 15: times 2^24 it overflowed, and a K or V row past 3e32 read as NaN where its values are finite).
NIBBLE_UNIT = np.float32(2.0**24)


@njit(inline="always")
def _nibbles(b):
    """The low and high nibble of byte b as float32, each / 2^24 (`NIBBLE_UNIT`: int-to-float conversions do not
    vectorize here, the fp16 one does)."""
    x = np.uint16(b)
    return half_to_f32(x & np.uint16(15)), half_to_f32(x >> np.uint16(4))


@njit(inline="always")
def _dots_int4(qrow, keys, sc, srow, scale, tmp, d, groups):
    """int4 keys: per group g, s_g * (q . nibbles) + m_g * (q's sum over the group), two keys per pass; the query's
    even and odd channels (the low and high nibbles') split into tmp first, times `NIBBLE_UNIT`."""
    half, per = d // 2, d // 2 // groups
    for i in range(half):
        tmp[i], tmp[half + i] = qrow[2 * i] * NIBBLE_UNIT, qrow[2 * i + 1] * NIBBLE_UNIT
    for g in range(groups):
        t = np.float32(0.0)
        for c in range(2 * g * per, 2 * (g + 1) * per):
            t += qrow[c]
        tmp[d + g] = t
    for o in range(0, keys.shape[0], 2):
        a, b = np.float32(0.0), np.float32(0.0)
        for g in range(groups):
            sa, sb = np.float32(sc[o, 2 * g]), np.float32(sc[o + 1, 2 * g])
            for i in range(g * per, (g + 1) * per):
                (xl, xh), (yl, yh) = _nibbles(keys[o, i]), _nibbles(keys[o + 1, i])
                a += sa * (tmp[i] * xl + tmp[half + i] * xh)
                b += sb * (tmp[i] * yl + tmp[half + i] * yh)
            a += np.float32(sc[o, 2 * g + 1]) * tmp[d + g]
            b += np.float32(sc[o + 1, 2 * g + 1]) * tmp[d + g]
        srow[o], srow[o + 1] = a * scale, b * scale


@njit(inline="always")
def _sums_int4(p, vals, sc, acc, tmp, d, groups, n):
    """int4 values: sum over o < n of p[o] s_g[o] q[o, c] (two rows per pass) into tmp's even and odd halves (the
    low and high nibbles', so that the stores are contiguous), then into acc (`_add_int4_mins`)."""
    half, per = d // 2, d // 2 // groups
    tmp[:d] = 0
    for o in range(0, n, 2):
        o1 = _last(o + 1, n)
        for g in range(groups):
            a = p[o] * np.float32(sc[o, 2 * g])
            b = p[o + 1] * np.float32(sc[o1, 2 * g])
            for i in range(g * per, (g + 1) * per):
                (xl, xh), (yl, yh) = _nibbles(vals[o, i]), _nibbles(vals[o1, i])
                tmp[i] += a * xl + b * yl
                tmp[half + i] += a * xh + b * yh
    _add_int4_mins(p, sc, acc, tmp, d, groups, n)


# The first and the second 8 bytes of a 16-byte span (two int4 groups of 16 channels): a row's two group scales
# become one 16-lane vector as s_a * FIRST8 + s_b * SECOND8 (exact: times 1 or 0).
FIRST8 = np.array([1.0] * 8 + [0.0] * 8, np.float32)
SECOND8 = 1 - FIRST8


@njit(inline="always")
def _sums_int4_pairs(p, vals, sc, acc, tmp, d, groups, n):
    """`_sums_int4` for groups of 16 channels (8 bytes; an even number of groups) two at a time: one 16-byte loop
    instead of two 8-byte ones (measured 1.6x faster on SmolLM2's head, which the 8-byte loops left unvectorized)."""
    half = d // 2
    tmp[:d] = 0
    for o in range(0, n, 2):
        o1 = _last(o + 1, n)
        for g in range(0, groups, 2):
            a0 = p[o] * np.float32(sc[o, 2 * g])
            a1 = p[o] * np.float32(sc[o, 2 * g + 2])
            b0 = p[o + 1] * np.float32(sc[o1, 2 * g])
            b1 = p[o + 1] * np.float32(sc[o1, 2 * g + 2])
            for j in range(16):
                i = g * 8 + j
                a, b = a0 * FIRST8[j] + a1 * SECOND8[j], b0 * FIRST8[j] + b1 * SECOND8[j]
                (xl, xh), (yl, yh) = _nibbles(vals[o, i]), _nibbles(vals[o1, i])
                tmp[i] += a * xl + b * yl
                tmp[half + i] += a * xh + b * yh
    _add_int4_mins(p, sc, acc, tmp, d, groups, n)


@njit(inline="always")
def _add_int4_mins(p, sc, acc, tmp, d, groups, n):
    """acc += tmp's even and odd halves interleaved (times `NIBBLE_UNIT`), plus each group's sum of p[o] m_g[o]
    over o < n."""
    half, per = d // 2, d // 2 // groups
    for g in range(groups):
        m = np.float32(0.0)
        for o in range(n):
            m += p[o] * np.float32(sc[o, 2 * g + 1])
        for i in range(g * per, (g + 1) * per):
            acc[2 * i] += tmp[i] * NIBBLE_UNIT + m
            acc[2 * i + 1] += tmp[half + i] * NIBBLE_UNIT + m


@overload(page_scores, inline="always")
def _page_scores(qrow, vals, scales, pg, h, srow, scale, tmp):
    if vals.dtype == types.uint8:

        def scores_int4(qrow, vals, scales, pg, h, srow, scale, tmp):
            keys, sc, groups = vals[pg, h], scales[pg, h], _int4_groups(scales)
            if qrow.shape[0] == 64 and groups == 4:  # SmolLM2's head: 4 groups of 16 channels
                _dots_int4(qrow, keys, sc, srow, scale, tmp, 64, 4)
            else:
                _dots_int4(qrow, keys, sc, srow, scale, tmp, qrow.shape[0], groups)

        return scores_int4
    unit = np.float32(_row_unit(vals))

    def scores(qrow, vals, scales, pg, h, srow, scale, tmp):
        if qrow.shape[0] == 64:
            _dots4(qrow, vals[pg, h], srow, scale, 64)
        else:
            _dots4(qrow, vals[pg, h], srow, scale, qrow.shape[0])
        if unit != 0:  # (q . k) * s_k: a quantized row's scale applied once per score
            for o in range(srow.shape[0]):
                srow[o] *= np.float32(scales[pg, h, o, 0]) * unit

    return scores


@overload(page_weighted_sum, inline="always")
def _page_weighted_sum(p, vals, scales, pg, h, acc, tmp, n):
    if vals.dtype == types.uint8:

        def sums_int4(p, vals, scales, pg, h, acc, tmp, n):
            rows, sc, groups = vals[pg, h], scales[pg, h], _int4_groups(scales)
            if acc.shape[0] == 64 and groups == 4:  # SmolLM2's head: 4 groups of 16 channels
                _sums_int4_pairs(p, rows, sc, acc, tmp, 64, 4, n)
            elif acc.shape[0] == 16 * groups and groups % 2 == 0:  # groups of 16 channels
                _sums_int4_pairs(p, rows, sc, acc, tmp, acc.shape[0], groups, n)
            else:
                _sums_int4(p, rows, sc, acc, tmp, acc.shape[0], groups, n)

        return sums_int4
    unit = np.float32(_row_unit(vals))

    def sums(p, vals, scales, pg, h, acc, tmp, n):
        if unit != 0:  # p * s_v times the stored values (the softmax's row sums are taken already)
            for o in range(n):
                p[o] *= np.float32(scales[pg, h, o, 0]) * unit
        if acc.shape[0] == 64:
            _sums4(p, vals[pg, h], acc, 64, n)
        else:
            _sums4(p, vals[pg, h], acc, acc.shape[0], n)

    return sums


@overload(page_rows, inline="always")
def _page_rows(vals, scales, pg, h, out):
    if vals.dtype == types.uint8:

        def rows_int4(vals, scales, pg, h, out):
            groups = _int4_groups(scales)
            per = vals.shape[3] // groups
            for o in range(out.shape[0]):
                for g in range(groups):
                    sg, mg = np.float32(scales[pg, h, o, 2 * g]), np.float32(scales[pg, h, o, 2 * g + 1])
                    for i in range(g * per, (g + 1) * per):
                        lo, hi = _nibbles(vals[pg, h, o, i])
                        out[o, 2 * i] = (lo * NIBBLE_UNIT) * sg + mg
                        out[o, 2 * i + 1] = (hi * NIBBLE_UNIT) * sg + mg

        return rows_int4
    unit = np.float32(_row_unit(vals))

    def rows(vals, scales, pg, h, out):
        for o in range(out.shape[0]):
            s = np.float32(scales[pg, h, o, 0]) * unit if unit != 0 else np.float32(1.0)
            for c in range(out.shape[1]):
                out[o, c] = to_f32(vals[pg, h, o, c]) * s

    return rows


FP8_VIEW = np.dtype(
    [("e4m3", np.uint8)]
)  # an fp8 pool's codes as the kernels take them (int4 is plain uint8)


def kernel_view(a: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """A KV pool as the kernels take it: fp16 as its uint16 bits (Numba has no float16), fp8 (uint8 codes, one scale
    per row) as `FP8_VIEW` records so that Numba tells it from int4's bytes; others as they are."""
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype == np.uint8 and scales is not None and scales.shape[-1] == 1:
        return a.view(FP8_VIEW)
    return a
