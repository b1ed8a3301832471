"""Harness rows of kernels/quant_gemv.cu (through backends/cuda_quant.py): the decode GEMV (n = 1..8 rows), the
prefill path (dequantized fp16 tiles + cuBLAS, n > 8), a fused matrix of mixed formats (RowStack), the
embedding gather of a quantized table, and the gate_up GEMV with SiLU-and-multiply (CudaOps.gate_up_silu), for
every format.

Reference, in float64: the GGUF formats dequantized by the `gguf` package's own `quants.dequantize` (an
independent decoder), int8 / int4 by QuantTensor.dequantize (itself checked against the documented layout
in tests/test_quant_kernels.py), times the fp16-rounded activations. Tolerances follow the arithmetic:
- GEMV: every product is exact float32 on the stored fields, summed in float32 (K/32 terms a lane, then a
  5-level warp tree): |err| <= (K/32 + 20) u32 * (|x| @ |W|^T), plus the output's rounding (2^-11 in fp16).
  v2 (quant_gemv2) sums q * x (exact products of small integers and fp16) over 8 values, then adds
  d * partial (+ m * sum(x) for q4_1 / q4_k): 8 + 2 roundings per group, K/256 groups a lane, the warp tree;
  within the same bound (where d q and m nearly cancel, |d q| + |m| exceeds |w|: the bound's slack covers it).
- split (quant_gemv_split, every format by default; exact integer dot products, the k-quants' sub-scales
  multiplied in as integers): x is rounded to int8 per 32 values
  (dx = max|x| / 127 over the block), so each x_k is off by up to dx / 2 and the sum by up to
  sum_k |W_mk| dx_b(k) / 2 (`activation_bound`, 2% slack for x * (127 / max) vs x / dx; float32 outputs take
  a second pass on the residual: dx / 508), plus the bound above for the float32 arithmetic on the exact
  integer dot products.
- prefill: the weights rounded to fp16 before cuBLAS, so the reference is x @ fp16(W)^T, with cuBLAS's
  float32 accumulation: 1e-4 * (|x| @ |W|^T).
Shapes: odd M, K a multiple of the block with whole and partial GEMV segments and rows that are not
16-byte aligned (e.g. q8_0 with K = 96: 102-byte rows).
"""

from __future__ import annotations

import numpy as np

from ..backends.cuda_quant import GEMV_VARIANTS, pick_variant
from ..backends.quant_split import SPLIT_FORMATS
from ..backends.reference.layers import rmsnorm_ref, silu_mul_ref
from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor, RowStack
from ..weights.quantize import quantize_int4, quantize_int8
from .common import Ctx, Result, compare, setting, silu_mul_atol

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


def activation_bound(x: np.ndarray, ref_w: np.ndarray, passes: int = 1) -> np.ndarray:
    """|error| bound [n, m] of x @ W^T from rounding x to int8 per 32 values (the split GEMV's activations):
    dx / 2 per value, or dx / 508 with the logits' second pass on the residual (whose step is <= dx / 254)."""
    n, k = x.shape
    dx = np.abs(x.astype(np.float64)).reshape(n, k // 32, 32).max(axis=2) / 127.0
    step = np.repeat(dx / 2 if passes == 1 else dx / 508, 32, axis=1)  # [n, k]
    return 1.02 * step @ np.abs(ref_w).T


def norm_linear_ref(
    x: np.ndarray, res: np.ndarray | None, lnw: np.ndarray, eps: float, ref_w: np.ndarray, silu: bool, split: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(output, its atol, residual stream) of a GEMV with the residual add and RMSNorm in its prologue
    (rms_in.cuh; CudaOps.rmsnorm_linear): r = x + res in float32 (exact), h = rmsnorm_ref(r) rounded to fp16
    (add_rmsnorm's output), times W (gate_up + SiLU-and-multiply with `silu`) in float64. Tolerance: the GEMV's on
    h (the split GEMV's int8 activations with `split`) plus one fp16 rounding of each h (the kernel's float32
    rstd is summed in another order, so a value may round the other way); add rtol 2^-10 for the fp16 output."""
    r = x.astype(np.float32) + (0 if res is None else res)
    h = rmsnorm_ref(r, lnw.astype(np.float32), eps).astype(np.float16).astype(np.float64)
    k = h.shape[1]
    prod, bound = h @ ref_w.T, np.abs(h) @ np.abs(ref_w).T
    atol = ((k / 32 + 20) * U32 + 2.0**-10) * bound
    if split:
        atol = atol + activation_bound(h, ref_w, 1)
    if silu:
        return silu_mul_ref(prod), silu_mul_atol(prod, atol), r
    return prod, atol, r


def check_linear(
    c: Ctx, w: QuantTensor | RowStack, n: int, out_dtype=np.float16, tag: str = "", variant: str | None = None,
    logits: bool = False,
) -> Result:  # fmt: skip
    """One product through CudaOps.gemm on the uploaded packed weight, against the float64 reference
    (`variant`: the decode GEMV setting, "v1" quant_gemv / "v2" quant_gemv2 / "auto" (split kernels for their
    formats); None: the backend's). `logits`: through CudaOps.logits (float32; the split GEMV's two passes)."""
    m, k = w.shape
    x = c.f16(n, k)
    ref_w = reference_matrix(w)
    bound = np.abs(x).astype(np.float64) @ np.abs(ref_w).T
    got = c.poison((n, m), out_dtype)
    with setting(c.ops.quant, "gemv_variant", variant):
        if logits:
            got = c.poison((n, m), np.float32)
            c.ops.logits(c.dev16(x), c.ops.upload(w), out=got)
        else:
            c.ops.gemm(c.dev16(x), c.ops.upload(w), out_dtype, out=got)
    parts = (w,) if isinstance(w, QuantTensor) else w.parts
    fmt = "+".join(getattr(p, "fmt", "f16") for p in parts)
    half = np.dtype(out_dtype) == np.float16 and not logits
    rtol = 2.0**-10 if half else 1e-6
    if n <= 8:  # the GEMV (a RowStack's float part goes through cuBLAS: the prefill tolerance)
        name, ref = f"quant_gemv{' ' + variant if variant else ''} {fmt}", x @ ref_w.T
        atol, c0 = np.empty_like(bound), 0
        for p in parts:  # per part: its kernel's arithmetic (a float part: cuBLAS)
            cols = slice(c0, c0 + p.shape[0])
            c0 += p.shape[0]
            if not isinstance(p, QuantTensor):
                atol[:, cols] = 1e-4 * bound[:, cols]
                continue
            atol[:, cols] = (k / 32 + 20) * U32 * bound[:, cols]
            if pick_variant(variant or c.ops.quant.gemv_variant, p.fmt, n) == "split":
                atol[:, cols] += activation_bound(x, ref_w[cols], 1 if half else 2)  # float32 out: two passes
    else:
        name, ref = f"quant_prefill {fmt}", x @ ref_w.astype(np.float16).astype(np.float64).T
        atol = 1e-4 * bound
    out = "" if half else " fp32"
    return compare(name + out, f"N{n} K{k} M{m}{tag}", c.cp.asnumpy(got), ref, atol, rtol)


def case_quant_gemv(c: Ctx) -> list[Result]:
    """Every format and shape through every decode GEMV kernel (v1 quant_gemv, v2 quant_gemv2, and "auto":
    quant_gemv_split for its formats, at every rows-per-warp choice)."""
    out = []
    for fmt in FORMATS:
        variants = (
            (*GEMV_VARIANTS, "auto") if pick_variant("auto", fmt, 1) == "split" else tuple(GEMV_VARIANTS)
        )
        for n, k, m in GEMV_SHAPES:
            if k % LAYOUTS[fmt].block == 0:
                qt = random_quant(fmt, m, k, c.rng)
                out.extend(check_linear(c, qt, n, variant=v) for v in variants)
        qt = random_quant(fmt, 257, 1024, c.rng)  # logits
        out.extend(check_linear(c, qt, 3, np.float32, variant=v) for v in variants)
        out.append(check_linear(c, qt, 3, variant="auto", tag=" logits", logits=True))
        if "auto" in variants:  # R = 2 and 4 rows per warp (split_rows picks them for large M only)
            block = LAYOUTS[fmt].block
            qt = random_quant(fmt, 4 * 8 * 264 + 5, max(128, block), c.rng)
            out.append(check_linear(c, qt, 2, variant="auto", tag=" R4"))
            qt = random_quant(fmt, 2 * 8 * 264 + 3, 96 if block == 32 else block, c.rng)
            out.append(check_linear(c, qt, 1, variant="auto", tag=" R2"))
            # R = 2 on 514 row groups: the deep register sets (cuda_quant.split_deep) on any GPU of 33+ SMs,
            # two K steps of 64 chunks (8-bit) or 128 (4-bit), the last one partial
            with setting(c.ops.quant, "split_r", 2):
                qt = random_quant(fmt, 1027, 2304 if 2304 % block == 0 else 4 * block, c.rng)
                out.append(check_linear(c, qt, 1, variant="auto", tag=" R2 deep"))
            # a persistent grid of 3 blocks: each warp loops over row groups and K steps (LSERVE_QGEMV_SPLIT)
            with setting(c.ops.quant, "split_resident", 3):
                qt = random_quant(fmt, 1001, 2304, c.rng)
                out.append(check_linear(c, qt, 3, variant="auto", tag=" G3"))
                qt = random_quant(fmt, 257, 1024, c.rng)
                out.append(check_linear(c, qt, 1, variant="auto", tag=" logits G3", logits=True))
    return out


def unit_scale(ref_w: np.ndarray) -> float:
    """The factor that gives unit-variance inputs products x @ W^T of about unit size (random q4_k / q6_k blocks
    reach hundreds a weight: unscaled, fp16 outputs overflow)."""
    return float(1.0 / np.sqrt(ref_w.shape[1] * np.mean(ref_w**2)))


def silu_inputs(rng: np.random.Generator, n: int, ref_w: np.ndarray) -> np.ndarray:
    """x [n, K] (float16 values, as float32) scaled so x @ W^T has a standard deviation of about 3: silu's curved
    range, and no fp16 overflow of silu(g) * u (unscaled, int8's N(0, 1) weights or random q4_k / q6_k blocks
    make products past 65504)."""
    x = rng.standard_normal((n, ref_w.shape[1])) * 3.0 * unit_scale(ref_w)
    return x.astype(np.float16).astype(np.float32)


def check_gate_up_silu(c: Ctx, w: QuantTensor, n: int, variant: str | None = None, tag: str = "") -> Result:
    """CudaOps.gate_up_silu on a packed [gate; up] weight [2I, K] (n <= 8 rows), against silu_mul_ref(x @ W^T) in
    float64: in one kernel (quant_gemv_split with SILU) for the split formats, else the block GEMV + silu_mul
    (`variant`: the decode GEMV setting at upload, as check_linear). Tolerance: check_linear's on [g | u] (the
    split GEMV's with its activation rounding) through silu_mul_atol, plus the output's fp16 rounding."""
    m, k = w.shape
    inter = m // 2
    ref_w = reference_matrix(w)
    x = silu_inputs(c.rng, n, ref_w)
    x64 = x.astype(np.float64)
    gu = x64 @ ref_w.T
    agu = (k / 32 + 20) * U32 * (np.abs(x64) @ np.abs(ref_w).T)
    q = c.ops.quant
    with setting(q, "gemv_variant", variant):
        split = pick_variant(q.gemv_variant, w.fmt, n) == "split"
        if split:
            agu = agu + activation_bound(x, ref_w, 1)
        got = c.poison((n, inter), np.float16)
        c.ops.gate_up_silu(c.dev16(x), c.ops.upload(w), out=got)
    fused = split and c.ops.fuse_silu
    atol = silu_mul_atol(gu, agu, rounded=not fused)
    name = f"quant_gate_up_silu{' ' + variant if variant else ''} {w.fmt}{' fused' if fused else ''}"
    return compare(name, f"N{n} K{k} I{inter}{tag}", c.cp.asnumpy(got), silu_mul_ref(gu), atol, 2.0**-10)


def case_quant_gate_up_silu(c: Ctx) -> list[Result]:
    """The fused gate_up GEMV + SiLU-and-multiply of every split format (rows per warp 2 and 4, odd I), and the
    fallback (block kernels + silu_mul) of the other formats and of a split format stored as blocks (v1)."""
    out = []
    # (n, k, I): R = 2 at the small ones, R = 4 at n >= 4 or 2I >= 8192 (split_silu_rows)
    shapes = [(1, 256, 1001), (3, 512, 77), (8, 2304, 515), (2, 768, 1537), (5, 4096, 4097), (1, 512, 4099),
              (1, 256, 3)]  # fmt: skip
    for fmt in FORMATS:
        for n, k, inter in shapes:
            if k % LAYOUTS[fmt].block == 0:
                out.append(check_gate_up_silu(c, random_quant(fmt, 2 * inter, k, c.rng), n))
    out.append(check_gate_up_silu(c, random_quant("int4", 2 * 301, 512, c.rng), 3, variant="v1"))
    # a persistent grid of 3 blocks: each warp loops over row groups
    with setting(c.ops.quant, "split_resident", 3):
        for fmt in SPLIT_FORMATS:
            out.append(check_gate_up_silu(c, random_quant(fmt, 2 * 515, 2304, c.rng), 2, tag=" G3"))
    return out


def case_quant_prefill(c: Ctx) -> list[Result]:
    out = []
    for fmt in FORMATS:
        for n, k, m in PREFILL_SHAPES:
            if k % LAYOUTS[fmt].block == 0:
                out.append(check_linear(c, random_quant(fmt, m, k, c.rng), n))
        out.append(check_linear(c, random_quant(fmt, 129, 512, c.rng), 20, np.float32))  # logits
    # several tiles, the last one partial: a small scratch tile for one product
    with setting(c.ops.quant, "tile_bytes", 2 * 512 * 48):
        out.append(check_linear(c, random_quant("q4_k", 301, 512, c.rng), 17, tag=" tiles of 48"))
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


def case_quant_split_rowstack(c: Ctx) -> list[Result]:
    """A Q4_K_M-style fused q/k/v under the default (split) kernels: Q4_K, Q6_K, a Q4_1 and a float part."""
    k = 512
    w = RowStack((random_quant("q4_k", 129, k, c.rng), random_quant("q6_k", 33, k, c.rng),
                  random_quant("q4_1", 65, k, c.rng), c.f16(31, k, scale=0.05)))  # fmt: skip
    return [check_linear(c, w, n, variant="auto") for n in (1, 5, 8)] + [check_linear(c, w, 12)]


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
