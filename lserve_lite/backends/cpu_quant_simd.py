"""Vector primitives of the quantized CPU GEMV, written as LLVM IR (Numba intrinsics).

Each one loads a block's packed weight bytes as one vector, unpacks them in registers and returns their
integer dot product with int8 activations (as float32): on AVX2 through pmaddubsw/pmaddwd (32 products in two
instructions, as llama.cpp does), elsewhere through plain integer IR that LLVM lowers for the target.
Written as Numba loops instead, LLVM fully unrolls a block and then vectorizes the loop over blocks with
strided gathers, or not at all: measured 3-6x slower. Unaligned loads, no bounds checks: the callers in
cpu_quant.py stay within shapes they have checked. No product sum overflows int16 (maddubs: |u8 q| <= 128,
|x| <= 127), so the portable path needs no saturation.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .cpu_kernels import _bits_to_f32

_F32, _I8, _I16, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _host_has(feature: str) -> bool:
    """Whether Numba compiles for this host (no NUMBA_CPU_NAME) and the host has the CPU feature."""
    return nb.config.CPU_NAME is None and f"+{feature}" in llvm.get_host_cpu_features().flatten()


_AVX2 = _host_has("avx2")


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _lanes(values: list[int]) -> ir.Constant:
    return ir.Constant(_vec(_I32, len(values)), values)


def _load(context, builder, aryty, ary, index, n: int):
    """n consecutive bytes of a 1-d uint8 / int8 array from `index` on, as one <n x i8>."""
    data = context.make_array(aryty)(context, builder, value=ary).data
    return builder.load(builder.bitcast(builder.gep(data, [index]), ir.PointerType(_vec(_I8, n))), align=1)


def _const(value: int, n: int, elem: ir.Type = _I8) -> ir.Constant:
    return ir.Constant(_vec(elem, n), [value] * n)


def _nibbles(builder, b, shift, n: int):
    """(b >> shift) & 15 per byte, shift a runtime int64."""
    v = builder.insert_element(ir.Constant(_vec(_I8, n), ir.Undefined), builder.trunc(shift, _I8), _I32(0))
    return builder.and_(builder.lshr(b, builder.shuffle_vector(v, v, _lanes([0] * n))), _const(15, n))


def _x86(builder, name: str, ret: ir.Type, args: list):
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name
    )
    return builder.call(fn, args)


def _pair_sums(builder, v, n: int, elem: ir.Type):
    """Widen <n x iK> to <n x elem> and add adjacent pairs: <n/2 x elem>."""
    w = builder.sext(v, _vec(elem, n)) if v.type.element != elem else v
    even = builder.shuffle_vector(w, w, _lanes(list(range(0, n, 2))))
    odd = builder.shuffle_vector(w, w, _lanes(list(range(1, n, 2))))
    return builder.add(even, odd)


def _maddubs(builder, u, s, n: int):
    """Unsigned bytes u times signed bytes s, adjacent pairs added: <n/2 x i16> (pmaddubsw)."""
    if _AVX2 and n == 32:
        return _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, s])
    prod = builder.mul(builder.zext(u, _vec(_I16, n)), builder.sext(s, _vec(_I16, n)))
    return _pair_sums(builder, prod, n, _I16)


def _maddwd(builder, a, b, n: int):
    """int16 a * b, adjacent pairs added: <n/2 x i32> (pmaddwd)."""
    if _AVX2 and n == 16:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [a, b])
    prod = builder.mul(builder.sext(a, _vec(_I32, n)), builder.sext(b, _vec(_I32, n)))
    return _pair_sums(builder, prod, n, _I32)


def _sum_f32(builder, p32, n: int):
    """Sum of <n x i32> lanes, as float32."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(p32, p32, _lanes(list(range(n))))
        hi = builder.shuffle_vector(p32, p32, _lanes(list(range(n, 2 * n))))
        p32 = builder.add(lo, hi)
    return builder.sitofp(builder.extract_element(p32, _I32(0)), _F32)


def _dot_u8_s8(builder, u, s):
    """sum(u * s) over 32 unsigned weight bytes and 32 int8 activations, as float32."""
    return _sum_f32(builder, _maddwd(builder, _maddubs(builder, u, s, 32), _const(1, 16, _I16), 16), 8)


@intrinsic
def u4_pair16(typingctx, row, o, xq, k):
    """sum_i<16 lo(row[o + i]) * xq[k + i] + hi(row[o + i]) * xq[k + 16 + i]: a q4_0 / q4_1 block."""

    def codegen(context, builder, sig, args):
        b = _load(context, builder, sig.args[0], args[0], args[1], 16)
        lo, hi = builder.and_(b, _const(15, 16)), builder.lshr(b, _const(4, 16))
        q = builder.shuffle_vector(lo, hi, _lanes(list(range(32))))
        return _dot_u8_s8(builder, q, _load(context, builder, sig.args[2], args[2], args[3], 32))

    return types.float32(row, o, xq, k), codegen


@intrinsic
def u4_dot32(typingctx, row, o, shift, xq, k):
    """sum_i<32 ((row[o + i] >> shift) & 15) * xq[k + i]: a q4_k sub-block, a quarter of an int4 block."""

    def codegen(context, builder, sig, args):
        q = _nibbles(builder, _load(context, builder, sig.args[0], args[0], args[1], 32), args[2], 32)
        return _dot_u8_s8(builder, q, _load(context, builder, sig.args[3], args[3], args[4], 32))

    return types.float32(row, o, shift, xq, k), codegen


@intrinsic
def i8_dot32(typingctx, row, o, xq, k):
    """sum_i<32 int8(row[o + i]) * xq[k + i] (q8_0, int8) as |w| * (xq with w's sign), maddubs' operands."""

    def codegen(context, builder, sig, args):
        w = _load(context, builder, sig.args[0], args[0], args[1], 32)
        x = _load(context, builder, sig.args[2], args[2], args[3], 32)
        zero = _const(0, 32)
        neg = builder.icmp_signed("<", w, zero)
        absw = builder.select(neg, builder.sub(zero, w), w)
        x = builder.select(
            neg, builder.sub(zero, x), builder.select(builder.icmp_signed("==", w, zero), zero, x)
        )
        return _dot_u8_s8(builder, absw, x)

    return types.float32(row, o, xq, k), codegen


@intrinsic
def u6_dot32(typingctx, row, ol, sl, oh, sh, sc0, sc1, xq, k):
    """sum_i<32 sc[i // 16] * q_i * xq[k + i], q_i = ((row[ol + i] >> sl) & 15) | ((row[oh + i] >> sh) & 3) << 4:
    32 values of a q6_k block (q unsigned, 0..63) with their two int8 sub-block scales."""

    def codegen(context, builder, sig, args):
        low = _nibbles(builder, _load(context, builder, sig.args[0], args[0], args[1], 32), args[2], 32)
        high = _nibbles(builder, _load(context, builder, sig.args[0], args[0], args[3], 32), args[4], 32)
        q = builder.or_(low, builder.shl(builder.and_(high, _const(3, 32)), _const(4, 32)))
        p16 = _maddubs(builder, q, _load(context, builder, sig.args[7], args[7], args[8], 32), 32)
        s0, s1 = (builder.trunc(a, _I16) for a in (args[5], args[6]))
        sc = builder.shuffle_vector(
            builder.insert_element(builder.insert_element(_const(0, 2, _I16), s0, _I32(0)), s1, _I32(1)),
            ir.Constant(_vec(_I16, 2), ir.Undefined),
            _lanes([0] * 8 + [1] * 8),
        )
        return _sum_f32(builder, _maddwd(builder, p16, sc, 16), 8)

    return types.float32(row, ol, sl, oh, sh, sc0, sc1, xq, k), codegen


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


def _fpext_half_is_native() -> bool:
    """fpext half -> float is one instruction with F16C (x86) and on ARM; elsewhere a libcall Numba lacks."""
    return not llvm.get_process_triple().startswith(("x86_64", "i686")) or _host_has("f16c")


f16_at = _f16_fpext if _fpext_half_is_native() else _f16_bits  # the little-endian fp16 at row[o:o + 2]
