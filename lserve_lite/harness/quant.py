"""Harness rows of kernels/quant_gemv.cu (through backends/cuda_quant.py): the decode GEMV (n = 1..8 rows), the
prefill path (dequantized fp16 tiles + cuBLAS, n > 8), a fused matrix of mixed formats (RowStack) and the
embedding gather of a quantized table, for every format.

Reference, in float64: the GGUF formats dequantized by the `gguf` package's own `quants.dequantize` (an
independent decoder), int8 / int4 by QuantTensor.dequantize (itself checked against the documented layout
in tests/test_quant_kernels.py), times the fp16-rounded activations. Tolerances follow the arithmetic:
- GEMV: every product is exact float32 on the stored fields, summed in float32 (K/32 terms a lane, then a
  5-level warp tree): |err| <= (K/32 + 20) u32 * (|x| @ |W|^T), plus the output's rounding (2^-11 in fp16).
  v2 (quant_gemv2) sums q * x (exact products of small integers and fp16) over 8 values, then adds
  d * partial (+ m * sum(x) for q4_1 / q4_k): 8 + 2 roundings per group, K/256 groups a lane, the warp tree;
  within the same bound (where d q and m nearly cancel, |d q| + |m| exceeds |w|: the bound's slack covers it).
- prefill: the weights rounded to fp16 before cuBLAS, so the reference is x @ fp16(W)^T, with cuBLAS's
  float32 accumulation: 1e-4 * (|x| @ |W|^T).
Shapes: odd M, K a multiple of the block with whole and partial GEMV segments and rows that are not
16-byte aligned (e.g. q8_0 with K = 96: 102-byte rows).
"""

from __future__ import annotations

import numpy as np

from ..backends.cuda_quant import GEMV_VARIANTS
from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor, RowStack
from ..weights.quantize import quantize_int4, quantize_int8
from .common import Ctx, Result, compare

U32 = 2.0**-24
# (n, k, m): n <= 8 runs the GEMV, more rows the prefill path; k not a multiple of a format's block is skipped
GEMV_SHAPES = [(1, 96, 37), (2, 160, 301), (3, 256, 129), (4, 768, 1), (5, 2304, 515), (6, 4096, 77),
               (7, 1280, 1001), (8, 14336, 33), (1, 4096, 1023)]  # fmt: skip
PREFILL_SHAPES = [(9, 256, 37), (33, 2304, 129), (70, 768, 301)]
# the GGUF formats' fp16 fields (byte offsets in a block), filled with finite values by `random_quant`
_F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}


def random_quant(fmt: str, m: int, k: int, rng: np.random.Generator) -> QuantTensor:
    """Random packed blocks: random bytes with finite fp16 scales in [-0.05, 0.05] (some subnormal) for the
    GGUF formats, our quantizers on normal floats for int8 / int4."""
    if fmt in ("int8", "int4"):
        w = rng.standard_normal((m, k)).astype(np.float32)
        return quantize_int8(w) if fmt == "int8" else quantize_int4(w)
    lay = LAYOUTS[fmt]
    nb = k // lay.block
    data = rng.integers(0, 256, (m, nb, lay.block_bytes), dtype=np.uint8)
    for off in _F16_FIELDS[fmt]:
        d = rng.uniform(-0.05, 0.05, (m, nb)).astype("<f2")
        d.reshape(-1)[::7] = np.float16(3e-6)  # subnormal in fp16
        data[..., off : off + 2] = d[..., None].view(np.uint8)
    return QuantTensor(fmt, (m, k), data.reshape(m, -1))


def reference_matrix(w: QuantTensor | RowStack | np.ndarray) -> np.ndarray:
    """The float64 matrix: gguf.quants.dequantize for GGUF formats, QuantTensor.dequantize for int8 / int4."""
    if isinstance(w, RowStack):
        return np.concatenate([reference_matrix(p) for p in w.parts], axis=0)
    if isinstance(w, np.ndarray):
        return w.astype(np.float64)
    if w.layout.ggml_type is None:
        return w.dequantize(np.float64)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(w.data, GGMLQuantizationType(w.layout.ggml_type)).astype(np.float64)


def check_linear(
    c: Ctx, w: QuantTensor | RowStack, n: int, out_dtype=np.float16, tag: str = "", variant: str | None = None
) -> Result:
    """One product through CudaOps.gemm on the uploaded packed weight, against the float64 reference
    (`variant`: the decode GEMV kernel, "v1" quant_gemv / "v2" quant_gemv2; None: the backend's choice)."""
    m, k = w.shape
    x = c.f16(n, k)
    ref_w = reference_matrix(w)
    bound = np.abs(x).astype(np.float64) @ np.abs(ref_w).T
    got = c.poison((n, m), out_dtype)
    q = c.ops.quant
    saved = q.gemv_variant
    q.gemv_variant = variant or saved
    try:
        c.ops.gemm(c.dev16(x), c.ops.upload(w), out_dtype, out=got)
    finally:
        q.gemv_variant = saved
    fmt = w.fmt if isinstance(w, QuantTensor) else "+".join(getattr(p, "fmt", "f16") for p in w.parts)
    half = np.dtype(out_dtype) == np.float16
    rtol = 2.0**-10 if half else 1e-6
    if n <= 8:  # the GEMV (a RowStack's float part goes through cuBLAS: the prefill tolerance)
        name, ref = f"quant_gemv{' ' + variant if variant else ''} {fmt}", x @ ref_w.T
        atol = (k / 32 + 20) * U32 * bound if isinstance(w, QuantTensor) else 1e-4 * bound
    else:
        name, ref = f"quant_prefill {fmt}", x @ ref_w.astype(np.float16).astype(np.float64).T
        atol = 1e-4 * bound
    out = "" if half else " fp32"
    return compare(name + out, f"N{n} K{k} M{m}{tag}", c.cp.asnumpy(got), ref, atol, rtol)


def case_quant_gemv(c: Ctx) -> list[Result]:
    """Every format and shape through both decode GEMV kernels (v1 quant_gemv, v2 quant_gemv2)."""
    out = []
    for fmt in FORMATS:
        for n, k, m in GEMV_SHAPES:
            if k % LAYOUTS[fmt].block == 0:
                qt = random_quant(fmt, m, k, c.rng)
                out.extend(check_linear(c, qt, n, variant=v) for v in GEMV_VARIANTS)
        qt = random_quant(fmt, 257, 1024, c.rng)  # logits
        out.extend(check_linear(c, qt, 3, np.float32, variant=v) for v in GEMV_VARIANTS)
    return out


def case_quant_prefill(c: Ctx) -> list[Result]:
    out = []
    for fmt in FORMATS:
        for n, k, m in PREFILL_SHAPES:
            if k % LAYOUTS[fmt].block == 0:
                out.append(check_linear(c, random_quant(fmt, m, k, c.rng), n))
        out.append(check_linear(c, random_quant(fmt, 129, 512, c.rng), 20, np.float32))  # logits
    q = c.ops.quant  # several tiles, the last one partial: a small scratch tile for one product
    saved, q.tile_bytes = q.tile_bytes, 2 * 512 * 48
    try:
        out.append(check_linear(c, random_quant("q4_k", 301, 512, c.rng), 17, tag=" tiles of 48"))
    finally:
        q.tile_bytes = saved
    return out


def case_quant_rowstack(c: Ctx) -> list[Result]:
    """A Q4_K_M-style fused q/k/v: Q4_K, Q6_K and a float part, each into its own output columns."""
    k = 512
    w = RowStack(
        (random_quant("q4_k", 129, k, c.rng), random_quant("q6_k", 33, k, c.rng), c.f16(31, k, scale=0.05))
    )
    return [check_linear(c, w, n, variant=v) for n in (1, 5, 8) for v in GEMV_VARIANTS] + [
        check_linear(c, w, 12)
    ]


def case_quant_embed(c: Ctx) -> list[Result]:
    """Rows of a quantized embedding table as fp16: fp16(reference rows) up to double rounding (2^-10)."""
    out = []
    for fmt in FORMATS:
        vocab, hidden, n = 301, 768, 13
        table = random_quant(fmt, vocab, hidden, c.rng)
        ids = c.rng.integers(0, vocab, n)
        got = c.poison((n, hidden), np.float16)
        c.ops.embed(c.ops.upload(table), c.cp.asarray(ids), out=got)
        ref = reference_matrix(table)[ids]
        out.append(
            compare(f"quant_embed {fmt}", f"V{vocab} H{hidden} N{n}", c.cp.asnumpy(got), ref, U32, 2.0**-10)
        )
    return out
