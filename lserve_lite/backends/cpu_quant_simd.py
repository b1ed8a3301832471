"""Row dot products of the quantized CPU GEMV, written as LLVM IR (Numba intrinsics), one per format.

`ROW_DOT[fmt](row, nblocks, xq, dx, xs)` is one packed weight row dotted with one row of int8 activations
(cpu_quant.quantize_activations). It is one generic loop over blocks (`_row_dot`) with the format's block
decoder inlined: each block's bytes are loaded as one vector, unpacked in registers and multiplied with the
int8 activations, on AVX2 through pmaddubsw/pmaddwd (32 products in two instructions, as llama.cpp does; one
vpdpbusd with AVX-512 VNNI), elsewhere through plain integer IR that LLVM lowers for the target; the int32 sums
are scaled into a float32 vector accumulator that is reduced once per row.

Why IR: written as Numba loops, LLVM fully unrolls a block and then vectorizes the loop over blocks with
strided gathers, or not at all (3-6x slower), and a per-block primitive pays a horizontal sum per block
(1.6x slower than this). Unaligned loads, no bounds checks: cpu_quant.py checks the shapes. No pair sum
overflows int16 (|unsigned q| <= 128, |xq| <= 127), so the portable path needs no saturation.
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.binding as llvm
import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_half import NATIVE_HALF, half_ir, host_has
from .cpu_kernels import _bits_to_f32

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


_AVX2 = host_has("avx2")
# vpdpbusd sums 4 adjacent u8 x s8 products per int32 lane, as pmaddubsw + pmaddwd(1) do (no pair saturates here):
# one instruction for two. Its intrinsic takes byte vectors from LLVM 22 (the version this was built and tested with).
_VNNI = _AVX2 and llvm.llvm_version_info >= (22,) and host_has("avx512vnni") and host_has("avx512vl")


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _lanes(values: list[int]) -> ir.Constant:
    return ir.Constant(_vec(_I32, len(values)), values)


def _const(value: int, n: int, elem: ir.Type = _I8) -> ir.Constant:
    return ir.Constant(_vec(elem, n), [value] * n)


def _splat(builder, value, n: int):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(v, v, _lanes([0] * n))


def _x86(builder, name: str, ret: ir.Type, args: list):
    fn = builder.module.globals.get(name)
    fn = fn or ir.Function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _pair_sums(builder, w, n: int):
    even = builder.shuffle_vector(w, w, _lanes(list(range(0, n, 2))))
    odd = builder.shuffle_vector(w, w, _lanes(list(range(1, n, 2))))
    return builder.add(even, odd)


def _maddubs(builder, u, s):
    """32 unsigned bytes u times 32 signed bytes s, adjacent pairs added: <16 x i16> (pmaddubsw)."""
    if _AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, s])
    return _pair_sums(
        builder, builder.mul(builder.zext(u, _vec(_I16, 32)), builder.sext(s, _vec(_I16, 32))), 32
    )


def _maddwd(builder, a, b):
    """<16 x i16> a * b, adjacent pairs added: <8 x i32> (pmaddwd)."""
    if _AVX2:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [a, b])
    return _pair_sums(
        builder, builder.mul(builder.sext(a, _vec(_I32, 16)), builder.sext(b, _vec(_I32, 16))), 16
    )


def _dot32(builder, u, s, scales=None):
    """<8 x i32> partial sums of u * s over 32 bytes (u unsigned, s signed); `scales`: <16 x i16> per pair."""
    if _VNNI and scales is None:
        zero = ir.Constant(_vec(_I32, 8), [0] * 8)
        return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", _vec(_I32, 8), [zero, u, s])
    return _maddwd(builder, _maddubs(builder, u, s), _const(1, 16, _I16) if scales is None else scales)


class _Row:
    """IR accessors for one row dot: the packed row, the int8 (or int16) activations, their scales and sums
    (none for int16 activations: the formats that take them have no offsets term)."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        # args: row, nblocks, xq, dx[, xs]
        data = [
            context.make_array(sig.args[i])(context, builder, value=args[i]).data
            for i in (0, 2, 3, 4)[: len(args) - 1]
        ]
        self.row, self.xq, self.dx = data[:3]
        self.xs = data[3] if len(data) > 3 else None

    def _at(self, base, index, ty: ir.Type):
        index = index if isinstance(index, ir.Value) else _I64(index)
        return self.b.load(self.b.bitcast(self.b.gep(base, [index]), ir.PointerType(ty)), align=1)

    def i(self, *terms):
        """Sum of int64 IR values and Python ints."""
        out = _I64(0)
        for t in terms:
            out = self.b.add(out, t if isinstance(t, ir.Value) else _I64(t))
        return out

    def half(self, o):
        return half_ir(self.b, self._at(self.row, o, _I16))

    def bytes(self, o, n: int):
        return self._at(self.row, o, _vec(_I8, n))

    def byte(self, o):
        """row[o] zero-extended to int32."""
        return self.b.zext(self._at(self.row, o, _I8), _I32)

    def xq32(self, k):
        return self._at(self.xq, k, _vec(_I8, 32))

    def xq16x32(self, k):
        """32 int16 activations from k."""
        return self._at(self.xq, k, _vec(_I16, 32))

    def halves(self, o):
        """The two fp16 values at row[o:o + 4] as <2 x float> (one conversion where fp16 is native)."""
        if not NATIVE_HALF:
            lo, hi = self.half(o), self.half(self.i(o, 2))
            v = self.b.insert_element(ir.Constant(_vec(_F32, 2), [0.0] * 2), lo, _I32(0))
            return self.b.insert_element(v, hi, _I32(1))
        return self.b.fpext(self._at(self.row, o, _vec(ir.HalfType(), 2)), _vec(_F32, 2))

    def dx_at(self, i):
        return self._at(self.dx, i, _F32)

    def xs_vec(self, i, n: int):
        """xs[i:i + n] (sums of x per 16 values) as <n x float>."""
        return self._at(self.xs, i, _vec(_F32, n))


# A block decoder: (_Row, block index) -> ([(int32 x 8 partial dot, float32 scale)], offset term: a float32, or
# a vector of `_row_dot`'s offset_lanes floats, summed once per row)
Decoder = Callable[[_Row, ir.Value], tuple[list, ir.Value]]


def _row_dot(decode: Decoder, offsets: bool = True, offset_lanes: int = 1):
    """The intrinsic row_dot(row, nblocks, xq, dx, xs) -> float32 of a format, `decode` inlined per block;
    without `offsets` (a format with none, e.g. int16 activations): row_dot(row, nblocks, xq, dx).
    `offset_lanes` > 1: `decode`'s offset is a vector of that many lanes, summed once per row."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), [0.0] * 8))
        zero = ir.Constant(_vec(_F32, offset_lanes), [0.0] * offset_lanes) if offset_lanes > 1 else _F32(0.0)
        off = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, args[1]) as loop:
            terms, offset = decode(r, loop.index)
            a = builder.load(acc)
            for part, scale in terms:
                a = builder.fadd(
                    a, builder.fmul(builder.sitofp(part, _vec(_F32, 8)), _splat(builder, scale, 8))
                )
            builder.store(a, acc)
            builder.store(builder.fadd(builder.load(off), offset), off)
        v, n = builder.load(acc), 8
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, _lanes(list(range(n))))
            v = builder.fadd(lo, builder.shuffle_vector(v, v, _lanes(list(range(n, 2 * n)))))
        o = builder.load(off)
        if offset_lanes > 1:
            lanes = [builder.extract_element(o, _I32(lane)) for lane in range(offset_lanes)]
            o = lanes[0]
            for e in lanes[1:]:
                o = builder.fadd(o, e)
        return builder.fadd(builder.extract_element(v, _I32(0)), o)

    if offsets:

        @intrinsic
        def row_dot(typingctx, row, nblocks, xq, dx, xs):
            return types.float32(row, nblocks, xq, dx, xs), codegen

    else:

        @intrinsic
        def row_dot(typingctx, row, nblocks, xq, dx):
            return types.float32(row, nblocks, xq, dx), codegen

    return row_dot


def _nibbles(b, v, shift: int, n: int):
    return b.and_(b.lshr(v, _const(shift, n)), _const(15, n)) if shift else b.and_(v, _const(15, n))


def _q4_small(r: _Row, blk, block_bytes: int, with_min: bool):
    """q4_0 / q4_1: d[, m], 16 bytes of nibbles (low: values 0-15, high: 16-31)."""
    b = r.b
    o = b.mul(blk, _I64(block_bytes))
    # the offset m * (xs0 + xs1) (q4_0: m = -8 d) as a 2-lane product, summed once per row; q4_1's (d, m) in one
    # fp16 conversion
    if with_min:
        dm = r.halves(o)
        d, m = b.extract_element(dm, _I32(0)), b.shuffle_vector(dm, dm, _lanes([1, 1]))
    else:
        d = r.half(o)
        m = _splat(b, b.fmul(d, _F32(-8.0)), 2)
    offset = b.fmul(m, r.xs_vec(b.mul(blk, _I64(2)), 2))
    qs = r.bytes(r.i(o, 4 if with_min else 2), 16)
    q = b.shuffle_vector(_nibbles(b, qs, 0, 16), _nibbles(b, qs, 4, 16), _lanes(list(range(32))))
    part = _dot32(b, q, r.xq32(b.mul(blk, _I64(32))))
    return [(part, b.fmul(d, r.dx_at(blk)))], offset


def _signed32(r: _Row, blk, o, scale):
    """32 int8 weights at row[o:] (q8_0, int8) as |w| * (xq with w's sign): maddubs' operand types."""
    b = r.b
    w, x = r.bytes(o, 32), r.xq32(b.mul(blk, _I64(32)))
    zero = _const(0, 32)
    neg = b.icmp_signed("<", w, zero)
    if _AVX2:  # psignb: x negated where w < 0, zeroed where w == 0
        x = _x86(b, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x, w])
    else:
        x = b.select(neg, b.sub(zero, x), b.select(b.icmp_signed("==", w, zero), zero, x))
    return [(_dot32(b, b.select(neg, b.sub(zero, w), w), x), b.fmul(scale, r.dx_at(blk)))], _F32(0.0)


def _q8_0(r: _Row, blk):
    o = r.b.mul(blk, _I64(34))
    return _signed32(r, blk, r.i(o, 2), r.half(o))


def _int8(r: _Row, blk):
    return _signed32(r, blk, r.i(r.b.mul(blk, _I64(32)), 2), r.half(_I64(0)))


def _int4(r: _Row, blk):
    """d, 64 bytes: value group g (32 values) = the low (g < 2) or high nibbles of bytes 32 (g % 2)..+32."""
    b = r.b
    o = b.mul(blk, _I64(66))
    d = r.half(o)
    terms = []
    for g in range(4):
        q = _nibbles(b, r.bytes(r.i(o, 2 + 32 * (g % 2)), 32), 4 * (g // 2), 32)
        a = r.i(b.mul(blk, _I64(4)), g)
        terms.append((_dot32(b, q, r.xq32(b.mul(a, _I64(32)))), b.fmul(d, r.dx_at(a))))
    xs = r.xs_vec(b.mul(blk, _I64(8)), 8)  # the offset -8 d sum xs, 8 lanes summed per row
    return terms, b.fmul(_splat(b, b.fmul(d, _F32(-8.0)), 8), xs)


def _q4_k(r: _Row, blk):
    """d, dmin, 12 bytes of 6-bit (scale, min) x 8, qs[128]: sub-block s = nibbles s % 2 of group s // 2."""
    b = r.b
    o = b.mul(blk, _I64(144))
    d, dmin = r.half(o), r.half(r.i(o, 2))
    sb = [r.byte(r.i(o, 4 + i)) for i in range(12)]
    terms, mv = [], _const(0, 8, _I32)
    for s in range(8):
        if s < 4:
            sc, m = b.and_(sb[s], _I32(63)), b.and_(sb[s + 4], _I32(63))
        else:
            top = b.shl(b.lshr(sb[s - 4], _I32(6)), _I32(4))
            sc = b.or_(b.and_(sb[s + 4], _I32(15)), top)
            m = b.or_(b.lshr(sb[s + 4], _I32(4)), b.shl(b.lshr(sb[s], _I32(6)), _I32(4)))
        a = r.i(b.mul(blk, _I64(8)), s)
        q = _nibbles(b, r.bytes(r.i(o, 16 + 32 * (s // 2)), 32), 4 * (s % 2), 32)
        scale = b.fmul(b.fmul(d, b.uitofp(sc, _F32)), r.dx_at(a))
        terms.append((_dot32(b, q, r.xq32(b.mul(a, _I64(32)))), scale))
        mv = b.insert_element(mv, m, _I32(s))
    # offset -dmin sum_s m_s (xs_2s + xs_2s+1), as one 8-lane product
    xs = r.xs_vec(b.mul(blk, _I64(16)), 16)
    pairs = b.fadd(*(b.shuffle_vector(xs, xs, _lanes(list(range(t, 16, 2)))) for t in (0, 1)))
    mins = b.fmul(b.uitofp(mv, _vec(_F32, 8)), pairs)
    return terms, b.fmul(_splat(b, b.fmul(dmin, _F32(-1.0)), 8), mins)


def _q6_k(r: _Row, blk):
    """ql[128], qh[64], 16 int8 scales, d: group G = 4 h + g of 32 values takes nibbles g // 2 of
    ql[64 h + 32 (g % 2):] and bits 2g of qh[32 h:]; each 16 values have a scale; q6 - 32 is the value."""
    b = r.b
    o = b.mul(blk, _I64(210))
    d = r.half(r.i(o, 208))
    terms = []
    for G in range(8):
        h, g = G // 4, G % 4
        low = _nibbles(b, r.bytes(r.i(o, 64 * h + 32 * (g % 2)), 32), 4 * (g // 2), 32)
        high = b.and_(b.lshr(r.bytes(r.i(o, 128 + 32 * h), 32), _const(2 * g, 32)), _const(3, 32))
        q = b.or_(low, b.shl(high, _const(4, 32)))
        sc = [b.sext(b.trunc(r.byte(r.i(o, 192 + 2 * G + t)), _I8), _I16) for t in (0, 1)]
        pair = b.insert_element(b.insert_element(_const(0, 2, _I16), sc[0], _I32(0)), sc[1], _I32(1))
        scales = b.shuffle_vector(pair, pair, _lanes([0] * 8 + [1] * 8))
        a = r.i(b.mul(blk, _I64(8)), G)
        terms.append((_dot32(b, q, r.xq32(b.mul(a, _I64(32))), scales), b.fmul(d, r.dx_at(a))))
    # offset -32 d sum_i sc_i xs_i over the block's 16 scales and 16-value sums, as one 16-lane product
    scv = b.sitofp(b.sext(r.bytes(r.i(o, 192), 16), _vec(_I32, 16)), _vec(_F32, 16))
    xsv = r.xs_vec(b.mul(blk, _I64(16)), 16)
    return terms, b.fmul(_splat(b, b.fmul(d, _F32(-32.0)), 16), b.fmul(scv, xsv))


def _x16(r: _Row, blk, o, scale):
    """32 int8 weights at row[o:] times block blk of int16 activations (two pmaddwd; no pair sum exceeds
    2 * 128 * 32767, and a block's int32 sums stay under 2^24, exact in float32)."""
    b = r.b
    w = b.sext(r.bytes(o, 32), _vec(_I16, 32))
    x = r.xq16x32(b.mul(blk, _I64(32)))
    half = [_lanes(list(range(16 * h, 16 * h + 16))) for h in (0, 1)]
    parts = [_maddwd(b, b.shuffle_vector(w, w, m), b.shuffle_vector(x, x, m)) for m in half]
    return [(b.add(*parts), b.fmul(scale, r.dx_at(blk)))], _F32(0.0)


def _q8_0_x16(r: _Row, blk):
    o = r.b.mul(blk, _I64(34))
    return _x16(r, blk, r.i(o, 2), r.half(o))


def _int8_x16(r: _Row, blk):
    return _x16(r, blk, r.i(r.b.mul(blk, _I64(32)), 2), r.half(_I64(0)))


# The 8-bit formats with int16 activations (cpu_quant.logits_q's one pass): q8_0, int8
ROW_DOT16 = (_row_dot(_q8_0_x16, offsets=False), _row_dot(_int8_x16, offsets=False))

# in qtensor.FORMATS order: q8_0, q4_0, q4_1, q4_k, q6_k, int8, int4
ROW_DOT = (
    _row_dot(_q8_0),
    _row_dot(lambda r, blk: _q4_small(r, blk, 18, False), offset_lanes=2),
    _row_dot(lambda r, blk: _q4_small(r, blk, 20, True), offset_lanes=2),
    _row_dot(_q4_k, offset_lanes=8),
    _row_dot(_q6_k, offset_lanes=16),
    _row_dot(_int8),
    _row_dot(_int4, offset_lanes=8),
)


@intrinsic
def _f16_fpext(typingctx, row, o):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.PointerType(ir.HalfType()))
        return builder.fpext(builder.load(ptr, align=1), _F32)

    return types.float32(row, o), codegen


@nb.njit(inline="always")
def _f16_bits(row, o):
    h = np.int32(row[o]) | (np.int32(row[o + 1]) << 8)
    mag = _bits_to_f32((h & 0x7FFF) << 13) * np.float32(2.0**112)  # exact for normal and subnormal halves
    if (h & 0x7C00) == 0x7C00:
        mag = _bits_to_f32(((h & 0x7FFF) << 13) | 0x7F800000)  # Inf / NaN
    return -mag if h & 0x8000 else mag


f16_at = _f16_fpext if NATIVE_HALF else _f16_bits  # the little-endian fp16 at row[o:o + 2], for Numba code
