"""fp16 <-> float32 in Numba code: one instruction where the host has it (F16C on x86, ARM), for the packed
weights' fp16 scales and the fp16 KV cache (stored as uint16 bits: Numba has no float16 arrays)."""

from __future__ import annotations

import llvmlite.binding as llvm
import numba as nb
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F32, _I16, _I32 = ir.FloatType(), ir.IntType(16), ir.IntType(32)


def host_has(feature: str) -> bool:
    """Whether Numba compiles for this host (no NUMBA_CPU_NAME) and the host has the CPU feature."""
    return nb.config.CPU_NAME is None and f"+{feature}" in llvm.get_host_cpu_features().flatten()


# fpext / fptrunc between half and float are single instructions with F16C (x86) and on ARM; elsewhere they are
# libcalls Numba lacks. Without them, weights' scales are decoded by bit arithmetic and the CPU has no fp16 KV.
NATIVE_HALF = not llvm.get_process_triple().startswith(("x86_64", "i686")) or host_has("f16c")


def half_ir(builder, h16):
    """An fp16 bit pattern (i16) as float32."""
    if NATIVE_HALF:
        return builder.fpext(builder.bitcast(h16, ir.HalfType()), _F32)
    # Integer bits for normal halves (exponent rebiased by 112) and Inf / NaN; the subnormals' mantissa times 2^-24.
    # No large constant factor: under a caller's fastmath "reassoc" LLVM folds constants across products, and the
    # 2^112 this once multiplied by met int4's 2^24 (`cpu_kv.NIBBLE_UNIT`) as 2^136 = Inf, so 0 * Inf = NaN.
    h = builder.zext(h16, _I32)
    exp, mant = builder.and_(h, _I32(0x7C00)), builder.and_(h, _I32(0x3FF))
    bits = builder.shl(builder.and_(h, _I32(0x7FFF)), _I32(13))
    normal = builder.add(bits, _I32(112 << 23))
    special = builder.or_(bits, _I32(0x7F800000))  # Inf / NaN
    big = builder.bitcast(
        builder.select(builder.icmp_unsigned("==", exp, _I32(0x7C00)), special, normal), _F32
    )
    small = builder.fmul(builder.uitofp(mant, _F32), _F32(2.0**-24))  # zero and subnormals, exact
    mag = builder.select(builder.icmp_unsigned("==", exp, _I32(0)), small, big)
    sign = builder.shl(builder.and_(h, _I32(0x8000)), _I32(16))
    return builder.bitcast(builder.or_(builder.bitcast(mag, _I32), sign), _F32)


@intrinsic
def half_to_f32(typingctx, h):
    """The float32 value of fp16 bits (uint16); vectorizes to vcvtph2ps with F16C."""

    def codegen(context, builder, sig, args):
        return half_ir(builder, args[0])

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_half(typingctx, x):
    """float32 rounded to the nearest fp16 (ties to even, overflow to Inf, as NumPy's astype), as uint16 bits.
    Only where NATIVE_HALF (the CPU backend offers fp16 KV only there)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(types.float32), codegen
