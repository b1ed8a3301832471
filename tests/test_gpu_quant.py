"""Quantized weights on the GPU (kernels/quant_gemv.cu and quant_gemv_split.cu through backends/cuda_quant.py).

gpu-marked (skipped without a GPU): the harness rows (`lserve-lite kernels test quant_gemv quant_prefill
quant_rowstack quant_split_rowstack quant_embed quant_gate_up_silu`; float64 references from
gguf.quants.dequantize), the fused gate_up GEMV + SiLU-and-multiply against the unfused launches (fp16, int8,
int4, q4_1, q4_k, q6_k weights), a random Llama quantized with
int8 / int4 through the CUDA engine (eager and CUDA Graphs) against the CPU engine on the same weights
dequantized to float32, GGUF files of every type, and SmolLM2's Q4_1 GGUF ($LSERVE_SMOLLM2_GGUF) against the
CPU backend on the same file. Unmarked: the host-side bookkeeping (kernel names, packed byte counts).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_gguf_import import write_tiny_gguf
from test_gpu_ops import _runner, _step, run_case, small_llama
from test_quant_engine import GGUF_TYPES, KINDS

from lserve_lite.config import EngineConfig
from lserve_lite.harness import CASES
from lserve_lite.weights.qtensor import LAYOUTS, QuantTensor, RowStack, stored_bytes
from lserve_lite.weights.quantize import quantize_int8, quantize_weights

QUANT_CASES = [name for name in CASES if name.startswith("quant_")]
SMALL_KV = EngineConfig(num_kv_pages=256)  # 16k tokens of KV, not most of the GPU


@pytest.fixture(scope="module")
def hctx(harness_seed):
    from lserve_lite.harness import Ctx

    return Ctx(seed=harness_seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", QUANT_CASES)
def test_quant_kernel_against_float64(hctx, harness_seed, case):
    run_case(hctx, harness_seed, case)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["f16", "int8", "int4", "q4_1", "q4_k", "q6_k"])
def test_gate_up_silu_fused_matches_unfused(hctx, fmt, n):
    """CudaOps.gate_up_silu in one kernel (gemv_rows / quant_gemv_split with SiLU-and-multiply in the epilogue)
    against silu_mul(linear(h, w)) on the same device weight, odd I, NaN-poisoned output. Both take the same
    float32 dot products (the same kernel code, the same order), so they differ by the unfused path's fp16
    rounding of [g | u] (2^-11 relative each, through silu_mul_atol) and the outputs' own rounding (2^-10);
    the GEMV's bound is added in case the compiler ordered the two differently."""
    from lserve_lite.backends.cuda_quant import DeviceQuant
    from lserve_lite.harness.common import silu_mul_atol
    from lserve_lite.harness.quant import U32, random_quant, reference_matrix, silu_inputs
    from lserve_lite.weights.quantize import quantize_int4

    ops, rng, cp = hctx.ops, hctx.rng, hctx.cp
    k, inter = 512, 1037
    w = hctx.f16(2 * inter, k, scale=1 / np.sqrt(k))
    if fmt in ("int8", "int4"):
        w = (quantize_int8 if fmt == "int8" else quantize_int4)(w)
    elif fmt in ("q4_1", "q4_k", "q6_k"):
        w = random_quant(fmt, 2 * inter, k, rng)
    ref_w = reference_matrix(w)
    x = silu_inputs(rng, n, ref_w).astype(np.float16)  # g, u ~ 3
    dw, dx = ops.upload(w), cp.asarray(x)
    if fmt == "f16":
        assert ops.gemm_path(n, k) == "gemv"
    else:
        assert isinstance(dw, DeviceQuant) and dw.split is not None  # the fused path
    assert ops.fuse_silu, "LSERVE_CUDA_FUSE_SILU=0 in the environment: nothing fused to test"
    fused = hctx.poison((n, inter), np.float16)
    assert ops.gate_up_silu(dx, dw, out=fused) is fused
    gu = ops.linear(dx, dw)
    unfused = cp.asnumpy(ops.silu_mul(gu)).astype(np.float64)
    got, gu = cp.asnumpy(fused).astype(np.float64), cp.asnumpy(gu).astype(np.float64)
    agu = 2 * (k / 32 + 20) * U32 * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T)
    tol = silu_mul_atol(gu, agu, rounded=True) + 2.0**-10 * np.abs(unfused)
    assert np.isfinite(got).all()
    err = np.abs(got - unfused)
    assert np.all(err <= tol), f"max err / tol {float((err / tol).max()):.3g}"
    assert np.abs(unfused).max() > 1.0  # silu's curved range reached


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_llama_cuda_vs_cpu_and_graphs_vs_eager(mode):
    """Prefill (46 rows: dequantized tiles + cuBLAS) then 10 decode steps of 3 rows (the GEMV; graph size 4,
    padded), teacher-forced with the CPU's greedy tokens. CPU: the same quantized weights as float32."""
    from lserve_lite.backends.cuda_quant import DeviceQuant
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    cfg, ws = small_llama()
    wq = quantize_weights(ws, mode)
    wf = {n: w.dequantize() if isinstance(w, QuantTensor) else w for n, w in wq.items()}
    runs = {"cpu": _runner(cfg, wf, "cpu"), "eager": _runner(cfg, wq, "cuda"),
            "graph": _runner(cfg, wq, "cuda", True)}  # fmt: skip
    model = runs["eager"][0].model
    assert all(isinstance(w, DeviceQuant) and w.fmt == mode for w in (model.layers[0].qkv, model.lm_head))
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 24, 17)]
    seqs = {k: [Sequence(list(p), SamplingParams()) for p in prompts] for k in runs}
    first = {k: _step(r, b, seqs[k], [5, 24, 17], all_logits=True) for k, (r, b) in runs.items()}
    scale = np.abs(first["cpu"]).max()
    assert np.abs(first["eager"] - first["cpu"]).max() / scale < 2e-2
    for k in runs:
        for s, t in zip(seqs[k], (11, 22, 33), strict=True):
            s.output_ids.append(t)
    for step in range(10):
        out = {k: _step(r, b, seqs[k], [1, 1, 1]) for k, (r, b) in runs.items()}
        scale = np.abs(out["cpu"]).max()
        assert np.abs(out["eager"] - out["cpu"]).max() / scale < 2e-2, f"eager vs cpu at step {step}"
        assert np.abs(out["graph"] - out["eager"]).max() / scale < 5e-3, f"graph vs eager at step {step}"
        for k in runs:
            for s, t in zip(seqs[k], out["cpu"].argmax(-1), strict=True):
                s.output_ids.append(int(t))
    assert runs["graph"][0].executor.replays >= 10


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in GGUF_TYPES if n not in ("F16", "F32")])
def test_gguf_every_type_on_the_gpu(tmp_path: Path, name: str):
    """A GGUF of each quantized type (and a Q4_K_M-style mix: a RowStack with an F16 part, a Q6_K embedding)
    runs packed on the GPU: logits of prefill (40 rows) and of decode-sized batches (6 rows) against the CPU
    backend's prefill on the same file (float32 activations on exactly the quantized weights; twice the
    tolerance for the decode-sized batches, whose activations the split kernels round to int8)."""
    from lserve_lite import LLM, SamplingParams
    from lserve_lite.backends.cuda_quant import DeviceQuant, DeviceRowStack

    types = GGUF_TYPES[name] or dict.fromkeys(KINDS, name)
    src = tmp_path / f"tiny-{name}.gguf"
    write_tiny_gguf(src, types=types, hidden=256, ffn=512, head_dim=64, matrix_scale=1 / 16)
    gpu, cpu = LLM(str(src), backend="cuda", config=SMALL_KV), LLM(str(src), backend="cpu")
    model = gpu.engine.runner.model
    assert isinstance(model.layers[0].qkv, DeviceRowStack if name == "Q4_K_M-mix" else DeviceQuant)
    assert isinstance(model.embed, DeviceQuant)
    ids = list(np.random.default_rng(1).integers(3, 200, 40))
    ref = cpu.logits(ids)
    tol = 2e-2 * np.abs(ref).max()
    assert np.abs(gpu.logits(ids) - ref).max() <= tol
    # decode-sized batches (the split kernels, every format) round activations to int8 per 32 values in every layer
    # (as the CPU backend's decode and llama.cpp do): measured 2.1% of the largest logit on Q4_1 (2026-12-02)
    assert np.abs(gpu.logits(ids[:6]) - ref[:6]).max() <= 2 * tol
    out = gpu.generate([ids], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


@pytest.mark.gpu
def test_smollm2_q4_1_gguf_on_the_gpu():
    """The default model's Q4_1 GGUF run packed on the GPU: teacher-forced argmax equal to the CPU backend's
    on the same file at >= 99% of 1000+ positions (prefill on both), and the greedy chat still says Paris."""
    from test_gpu_e2e import N_POSITIONS, TEXT
    from test_quant_engine import PARIS

    from lserve_lite import LLM, SamplingParams

    path = os.environ.get("LSERVE_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set LSERVE_SMOLLM2_GGUF to the default model's GGUF")
    gpu, cpu = LLM(path, backend="cuda", config=SMALL_KV), LLM(path, backend="cpu")
    ids = gpu.tokenizer.encode(TEXT)[:N_POSITIONS]
    agree = float(np.mean(gpu.logits(ids).argmax(-1) == cpu.logits(ids).argmax(-1)))
    assert len(ids) >= 1000 and agree >= 0.99, f"argmax agreement {agree:.4f} over {len(ids)} positions"
    reply = gpu.chat(PARIS, SamplingParams(temperature=0, max_new_tokens=24)).text
    assert "Paris" in reply, reply


def test_kernel_names_cover_every_format_and_row_count():
    from lserve_lite.backends.cuda_quant import (
        GEMV_ROWS,
        GEMV_VARIANTS,
        QUANT_KERNELS,
        SPLIT_KERNELS,
        SPLIT_PASSES,
        SPLIT_R,
        SPLIT_ROWS,
        SPLIT_SILU_R,
        SPREAD_ROPE_KINDS,
        kernel_names,
    )
    from lserve_lite.backends.quant_split import SPLIT_FORMATS
    from lserve_lite.backends.rope_out import KV_FORMAT_INDEX, QUANT_ROPE_ROWS

    assert len(QUANT_KERNELS) == len(LAYOUTS) * (2 * len(GEMV_VARIANTS) * len(GEMV_ROWS) + 1)
    # plain, SiLU and RoPE (one R, dense and LServe caches: fp16, and every KV format at QUANT_ROPE_ROWS)
    # instantiations per NMAX, + deep, dequant
    per_fmt = (len(SPLIT_PASSES) * len(SPLIT_R) + len(SPLIT_SILU_R) + 2) * len(SPLIT_ROWS) + 2
    per_fmt += 2 * (len(KV_FORMAT_INDEX) - 1) * len(QUANT_ROPE_ROWS)
    # the spread norm's module: the producer at every R and the deep sets, gate_up at the SiLU R, q/k/v per kind
    per_fmt += len(SPLIT_R) + 1 + len(SPLIT_SILU_R) + len(SPREAD_ROPE_KINDS)
    assert len(SPLIT_KERNELS) == len(SPLIT_FORMATS) * per_fmt
    spread = kernel_names("q4_1", ("spread",))
    assert "quant_gemv_split_spread<SQ4_1, 2, false, 2, 1>" in spread  # the deep producer
    assert "quant_gemv_split_rope_spread<SQ4_1, 2>" in spread and not set(spread) & set(kernel_names("q4_1"))
    names = kernel_names("q4_k")
    assert "quant_gemv<Q4_K, 8, float>" in names and "quant_gemv2<Q4_K, 8, float>" in names
    assert "quant_gemv_split<SQ4_K, 2, 4, 2, float>" in names and "quant_dequant_split<SQ4_K>" in names
    assert "quant_gemv_split<SQ6_K, 4, 8, 1, __half, true>" in kernel_names("q6_k", ("split",))
    assert not any("split" in n for n in kernel_names("q4_k", ("v1", "v2")))
    assert "quant_dequant<INT4>" in kernel_names("int4")
    assert "quant_gemv_split<SQ4_1, 4, 8, 1, __half>" in kernel_names("q4_1", ("split",))
    assert "quant_gemv_split<SQ4_1, 4, 8, 2, float>" in kernel_names("q4_1", ("split",))
    assert "quant_gemv_split<SINT4, 2, 1, 1, __half, true>" in kernel_names("int4", ("split",))
    assert "quant_gemv_split_rope<SQ4_1, 8, 2>" in kernel_names("q4_1", ("split",))
    assert kernel_names("int8", ("split",))[-1] == "quant_dequant_split<SINT8>"
    assert "quant_gemv_split<SINT8, 2, 1, 1, __half, false, 2>" in kernel_names("int8", ("split",))


def test_deep_split_gemv_choice(monkeypatch):
    """The deep split GEMV (UX = 2) runs R = 2 launches whose row groups all have a resident warp: the
    Llama-3-8B shape's o_proj / down (4,096 rows) on an H200 (2,112 warps at 2 blocks per SM), not its qkv (6,144
    rows), not R = 4; LSERVE_QGEMV_DEEP=0 turns it off."""
    from lserve_lite.backends.cuda_quant import deep_setting, split_deep

    h200 = 132 * 2  # resident blocks of the deep kernel (8 warps each)
    assert split_deep(4096, 2, h200) and split_deep(264 * 16, 2, h200)
    assert not split_deep(6144, 2, h200) and not split_deep(4096, 4, h200) and not split_deep(4096, 1, h200)
    assert not split_deep(264 * 16 + 1, 2, h200) and not split_deep(4096, 2, 255)
    monkeypatch.delenv("LSERVE_QGEMV_DEEP", raising=False)
    assert deep_setting()
    monkeypatch.setenv("LSERVE_QGEMV_DEEP", "0")
    assert not deep_setting()
    monkeypatch.setenv("LSERVE_QGEMV_DEEP", "yes")
    with pytest.raises(ValueError, match="LSERVE_QGEMV_DEEP"):
        deep_setting()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_1", "q4_k", "q6_k"])
def test_deep_split_gemv_equals_shallow(hctx, fmt):
    """The deep split GEMV adds each lane's chunks in the same order as the shallow one (only the loads per
    register set differ), so both give the same bits; the launcher takes it here (514 row groups of 2 rows)."""
    from lserve_lite.backends.cuda_quant import deep_name, split_deep, split_smem
    from lserve_lite.harness.common import setting
    from lserve_lite.harness.quant import random_quant

    q = hctx.ops.quant
    m, k = 1027, 2304
    w = hctx.ops.upload(random_quant(fmt, m, k, hctx.rng))
    fns = q._kernels(fmt, "split")
    deep = deep_name(w.split.trait)
    assert split_deep(m, 2, q.resident_blocks(deep, fns[deep], split_smem(1, k)))
    x = hctx.dev16(hctx.f16(1, k))
    outs = []
    for on in (True, False):
        got = hctx.poison((1, m), np.float16)
        with setting(q, "split_r", 2), setting(q, "split_deep", on):
            hctx.ops.gemm(x, w, np.float16, out=got)
        outs.append(hctx.cp.asnumpy(got))
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0], outs[1])


def test_gemv_variant_from_the_environment(monkeypatch):
    from lserve_lite.backends.cuda_quant import (
        block_variant,
        gemv_variant,
        pick_variant,
        split_rows,
        split_silu_rows,
    )

    monkeypatch.delenv("LSERVE_QGEMV", raising=False)
    assert gemv_variant() == "auto"
    monkeypatch.setenv("LSERVE_QGEMV", "v2")
    assert gemv_variant() == "v2"
    monkeypatch.setenv("LSERVE_QGEMV", "bogus")
    with pytest.raises(ValueError, match="LSERVE_QGEMV"):
        gemv_variant()
    monkeypatch.setenv("LSERVE_QGEMV", "v1")
    assert gemv_variant() == "v1"
    assert pick_variant("auto", "q4_0", 1) == "split" and pick_variant("auto", "int8", 8) == "split"
    assert pick_variant("auto", "q6_k", 1) == "split" and pick_variant("auto", "q4_k", 8) == "split"
    assert pick_variant("v2", "q4_k", 8) == "v2" and pick_variant("v1", "q6_k", 1) == "v1"
    assert block_variant("auto", "q6_k", 1) == "v2" and block_variant("auto", "q6_k", 2) == "v1"
    assert block_variant("auto", "q4_k", 1) == "v1" and block_variant("v2", "q4_k", 8) == "v2"
    assert pick_variant("v1", "q4_1", 1) == "v1"
    assert split_rows(576) == 1 and split_rows(4096) == 2 and split_rows(128256) == 4
    assert split_rows(576, 8) == 1 and split_rows(1536, 8) == 4
    assert (
        split_silu_rows(2 * 576) == 2
        and split_silu_rows(2 * 14336) == 4
        and split_silu_rows(2 * 1536, 8) == 4
    )


def test_split_grid_from_the_environment(monkeypatch):
    """LSERVE_QGEMV_SPLIT picks the split GEMV's grid: persistent (at most the resident blocks) or one row group
    per warp; the persistent grid is never larger than the full one."""
    from lserve_lite.backends.cuda_quant import SPLIT_WARPS, split_blocks, split_grid_setting

    monkeypatch.delenv("LSERVE_QGEMV_SPLIT", raising=False)
    assert split_grid_setting() == "persist"
    monkeypatch.setenv("LSERVE_QGEMV_SPLIT", "grid")
    assert split_grid_setting() == "grid"
    monkeypatch.setenv("LSERVE_QGEMV_SPLIT", "bogus")
    with pytest.raises(ValueError, match="LSERVE_QGEMV_SPLIT"):
        split_grid_setting()
    assert SPLIT_WARPS == 8
    assert split_blocks(28672, 4) == 896 and split_blocks(28672, 4, 132 * 3) == 396
    assert split_blocks(4096, 2, 132 * 3) == 256 and split_blocks(4097, 2) == 257  # the full grid is smaller
    assert split_blocks(1, 4, 396) == 1 and split_blocks(14336, 2, 3) == 3


def test_device_weights_count_packed_bytes():
    """What the KV budget reserves: packed bytes for quantized matrices, the backend's float size otherwise."""
    from lserve_lite.backends.cuda_quant import DeviceQuant, DeviceRowStack

    q = quantize_int8(np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32))
    f = np.ones((3, 64), np.float32)
    assert stored_bytes(q, 2) == q.nbytes == 6 * (2 + 64)
    assert stored_bytes(RowStack((q, f)), 2) == q.nbytes + 3 * 64 * 2
    assert stored_bytes(f, 4) == f.nbytes
    dq = DeviceQuant("int8", q.shape, data=None)
    assert dq.row_bytes == 66 and dq.nbytes == q.nbytes
    from lserve_lite.backends.quant_split import SPLIT_FORMATS, split

    s = split(q)  # the split layout reads the same bytes: integers, then one fp16 scale per row
    sq = DeviceQuant("int8", q.shape, s.q, SPLIT_FORMATS["int8"], s.d)
    assert sq.row_bytes == 64 and sq.nbytes == q.nbytes
    from lserve_lite.harness.quant import random_quant

    k4 = random_quant("q4_k", 3, 512, np.random.default_rng(0))
    s = split(k4)  # per 256 values: 128 bytes of integers, 4 of d / -dmin, 16 of sub-scales (blocks: 144)
    sq = DeviceQuant("q4_k", k4.shape, s.q, SPLIT_FORMATS["q4_k"], s.d, s.m, s.s)
    assert sq.nbytes == 3 * 2 * 148 == k4.nbytes + 3 * 2 * 4
    from lserve_lite.backends.cuda_quant import device_bytes

    k6 = random_quant("q6_k", 5, 256, np.random.default_rng(0))  # what the KV budget reserves for an upload
    assert device_bytes(k4, "auto") == sq.nbytes and device_bytes(k4, "v2") == k4.nbytes
    assert device_bytes(k6, "v1") == k6.nbytes == 5 * 210
    assert device_bytes(RowStack((k6, np.ones((3, 256), np.float32))), "auto") == 5 * 274 + 3 * 256 * 2
    assert DeviceRowStack((dq, f)).shape == (9, 64)


def test_engine_reserves_packed_bytes(tmp_path: Path):
    """The engine's weight estimate for the KV budget counts a GGUF's packed bytes, not a float copy."""
    from lserve_lite import LLM

    src = tmp_path / "tiny-q4k.gguf"
    write_tiny_gguf(src, types=dict.fromkeys(KINDS, "Q4_K"), hidden=256, ffn=512, head_dim=64)
    eng = LLM(str(src), backend="cpu").engine
    model = eng.runner.model
    packed = sum(w.nbytes for lay in model.layers for w in (lay.qkv, lay.o, lay.gate_up, lay.down))
    floats = sum(a.nbytes for lay in model.layers for a in (lay.ln1, lay.ln2)) + model.norm.nbytes
    heads = model.embed.nbytes + (0 if model.lm_head is model.embed else model.lm_head.nbytes)
    assert eng.weight_bytes == packed + floats + heads
