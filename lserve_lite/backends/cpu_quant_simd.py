"""Vector primitives of the quantized CPU kernels, written as LLVM IR (Numba intrinsics).

Written as Numba loops, LLVM fully unrolls a block's 16-32 values and then vectorizes the loop over blocks
with strided gathers (measured 3-6x slower). Each primitive here loads one block's packed bytes as a vector,
widens them to float32 in registers and returns their dot product with float32 activations x[k:k + n].
Unaligned loads, no bounds checks: the callers in cpu_quant.py index within shapes they have checked.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .cpu_kernels import _bits_to_f32

_F32, _I8, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _load(context, builder, aryty, ary, index, elem: ir.Type, n: int):
    """n consecutive elements of a 1-d array from `index` on, as one vector."""
    data = context.make_array(aryty)(context, builder, value=ary).data
    ptr = builder.bitcast(builder.gep(data, [index]), ir.PointerType(_vec(elem, n)))
    return builder.load(ptr, align=1)


def _bytes(builder, value: int, n: int) -> ir.Constant:
    return ir.Constant(_vec(_I8, n), [value] * n)


def _shifted(builder, b, shift, n: int):
    """b >> shift per byte (shift: a runtime int64)."""
    v = builder.insert_element(ir.Constant(_vec(_I8, n), ir.Undefined), builder.trunc(shift, _I8), _I32(0))
    return builder.lshr(b, builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [0] * n)))


def _dot(builder, qf, xv, n: int):
    """sum(qf * xv) by a tree of vector halves."""
    v = builder.fmul(qf, xv)
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, _I32(0))


def _make_nib_pair(n: int):
    @intrinsic
    def nib_pair(typingctx, row, o, x, k):
        """sum_i<n lo(row[o + i]) * x[k + i] + hi(row[o + i]) * x[k + n + i]: q4_0 / q4_1 / int4 nibbles."""

        def codegen(context, builder, sig, args):
            b = _load(context, builder, sig.args[0], args[0], args[1], _I8, n)
            lo = builder.and_(b, _bytes(builder, 15, n))
            hi = builder.lshr(b, _bytes(builder, 4, n))
            q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))
            xv = _load(context, builder, sig.args[2], args[2], args[3], _F32, 2 * n)
            return _dot(builder, builder.uitofp(q, _vec(_F32, 2 * n)), xv, 2 * n)

        return types.float32(row, o, x, k), codegen

    return nib_pair


nib_pair16 = _make_nib_pair(16)  # q4_0, q4_1: 32 values in 16 bytes
nib_pair64 = _make_nib_pair(64)  # int4: 128 values in 64 bytes


@intrinsic
def nib_dot32(typingctx, row, o, shift, x, k):
    """sum_i<32 ((row[o + i] >> shift) & 15) * x[k + i]: one q4_k sub-block (shift 0 or 4)."""

    def codegen(context, builder, sig, args):
        b = _load(context, builder, sig.args[0], args[0], args[1], _I8, 32)
        q = builder.and_(_shifted(builder, b, args[2], 32), _bytes(builder, 15, 32))
        xv = _load(context, builder, sig.args[3], args[3], args[4], _F32, 32)
        return _dot(builder, builder.uitofp(q, _vec(_F32, 32)), xv, 32)

    return types.float32(row, o, shift, x, k), codegen


@intrinsic
def i8_dot32(typingctx, row, o, x, k):
    """sum_i<32 int8(row[o + i]) * x[k + i]: q8_0 and int8 blocks."""

    def codegen(context, builder, sig, args):
        b = _load(context, builder, sig.args[0], args[0], args[1], _I8, 32)
        xv = _load(context, builder, sig.args[2], args[2], args[3], _F32, 32)
        return _dot(builder, builder.sitofp(b, _vec(_F32, 32)), xv, 32)

    return types.float32(row, o, x, k), codegen


@intrinsic
def q6_dot16(typingctx, row, ol, sl, oh, sh, x, k):
    """sum_i<16 q * x[k + i] with the 6-bit q = ((row[ol + i] >> sl) & 15) | ((row[oh + i] >> sh) & 3) << 4."""

    def codegen(context, builder, sig, args):
        low = _load(context, builder, sig.args[0], args[0], args[1], _I8, 16)
        high = _load(context, builder, sig.args[0], args[0], args[3], _I8, 16)
        low = builder.and_(_shifted(builder, low, args[2], 16), _bytes(builder, 15, 16))
        high = builder.and_(_shifted(builder, high, args[4], 16), _bytes(builder, 3, 16))
        q = builder.or_(low, builder.shl(high, _bytes(builder, 4, 16)))
        xv = _load(context, builder, sig.args[5], args[5], args[6], _F32, 16)
        return _dot(builder, builder.uitofp(q, _vec(_F32, 16)), xv, 16)

    return types.float32(row, ol, sl, oh, sh, x, k), codegen


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


def _has_f16c() -> bool:
    """fpext half -> float is one instruction with F16C (x86) and on ARM; elsewhere a libcall Numba lacks."""
    triple = llvm.get_process_triple()
    return not triple.startswith(("x86_64", "i686")) or "+f16c" in llvm.get_host_cpu_features().flatten()


f16_at = _f16_fpext if _has_f16c() else _f16_bits  # the little-endian fp16 at row[o:o + 2], as float32
