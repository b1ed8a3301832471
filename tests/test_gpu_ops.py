"""GPU kernels against their CPU references (gpu-marked; skipped without a GPU).

The per-kernel cases are the kernel harness's (`lserve-lite kernels test`); on top: a whole forward of a
small random Llama on the CUDA backend against the CPU backend, and CUDA Graph decode against eager decode.
"""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.harness import CASES


@pytest.fixture(scope="module")
def hctx(harness_seed):
    from lserve_lite.harness import Ctx

    return Ctx(seed=harness_seed)


def run_case(hctx, seed: int, case: str) -> None:
    """One harness case on the inputs `lserve-lite kernels test CASE --seed SEED` draws; every row must pass."""
    from lserve_lite.harness import format_table

    hctx.seed_case(seed, case)
    results = CASES[case](hctx)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    assert results and not bad, (
        f"`lserve-lite kernels test {case} --seed {seed}` draws these again:\n" + format_table(bad)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("quant_")])  # those: test_gpu_quant.py
def test_kernel_against_reference(hctx, harness_seed, case):
    run_case(hctx, harness_seed, case)


def small_llama(
    seed=0, layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, vocab=1000, qkv_bias=False
):
    """A random Llama config and its float32 weights (as the loader returns them); `qkv_bias`: Qwen2's q/k/v
    biases too."""
    from lserve_lite.config import ModelConfig

    cfg = ModelConfig(
        "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM", hidden, inter, layers, heads, kv_heads, head_dim,
        vocab, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, qkv_bias=qkv_bias,
    )  # fmt: skip
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[-1]))).astype(np.float32)

    ws = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0), "lm_head.weight": w(vocab, hidden)}
    ws["model.norm.weight"] = 1 + 0.1 * w(hidden, scale=1.0)
    for i in range(layers):
        p = f"model.layers.{i}."
        ws |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": 1 + 0.1 * w(hidden, scale=1.0),
            p + "post_attention_layernorm.weight": 1 + 0.1 * w(hidden, scale=1.0),
        }
        if qkv_bias:
            for n, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                ws[p + f"self_attn.{n}_proj.bias"] = 0.5 * w(rows * head_dim, scale=1.0)
    return cfg, ws


def _runner(cfg, ws, backend, graphs=False, num_pages=96, page_size=16, kv_dtype="auto"):
    from lserve_lite.backends import make_ops
    from lserve_lite.config import EngineConfig
    from lserve_lite.engine.model_runner import ModelRunner
    from lserve_lite.kv.block_manager import BlockManager
    from lserve_lite.kv.quant import resolve_kv_format

    ecfg = EngineConfig(max_num_seqs=8, page_size=page_size, max_model_len=1024, num_kv_pages=num_pages,
                        cuda_graphs=graphs, kv_dtype=kv_dtype)  # fmt: skip
    ops = make_ops(backend)
    fmt = None if kv_dtype == "auto" else resolve_kv_format(kv_dtype, ops.kv_dtypes, cfg.head_dim)
    runner = ModelRunner(cfg, ws, ops, ecfg, 1024, num_pages, kv_format=fmt)
    assert hasattr(runner.executor, "graphs") == graphs
    return runner, BlockManager(num_pages, page_size)


def _step(runner, blocks, seqs, num_new, all_logits=False):
    for s, n in zip(seqs, num_new, strict=True):
        blocks.grow(s, s.num_cached + n)
    return runner.ops.to_numpy(runner.run(seqs, num_new, all_logits)).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_forward_matches_cpu_and_graphs_match_eager(qkv_bias):
    """Prefill (ragged, chunked) then decode steps, teacher-forced with the CPU runner's greedy tokens; with and
    without Qwen2's q/k/v biases (the fused QKV + RoPE epilogue adds them on the GPU)."""
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    cfg, ws = small_llama(qkv_bias=qkv_bias)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 40, 17)]
    runs = {name: _runner(cfg, ws, *spec) for name, spec in
            {"cpu": ("cpu",), "eager": ("cuda",), "graph": ("cuda", True)}.items()}  # fmt: skip
    seqs = {k: [Sequence(list(p), SamplingParams()) for p in prompts] for k in runs}
    # prefill in two chunks for the long prompt: 5 + 24 + 17 first, then the last 16 of prompt 2
    for k, (runner, blocks) in runs.items():
        first = _step(runner, blocks, seqs[k], [5, 24, 17], all_logits=True)
        if k == "cpu":
            ref_first = first
        else:
            err = np.abs(first - ref_first).max() / np.abs(ref_first).max()
            assert err < 2e-2, f"{k} prefill logits rel err {err:.3g}"
        _step(runner, blocks, seqs[k][1:2], [16])
        for s, t in zip(seqs[k], (11, 22, 33), strict=True):  # the first generated token, teacher-forced
            s.output_ids.append(t)
    for step in range(12):
        live = [0, 1, 2] if step < 8 else [1, 2]  # the batch shrinks: graph size 4 (padded) then 2
        out = {}
        for k, (runner, blocks) in runs.items():
            out[k] = _step(runner, blocks, [seqs[k][i] for i in live], [1] * len(live))
        toks = out["cpu"].argmax(-1)
        scale = np.abs(out["cpu"]).max()
        assert np.abs(out["eager"] - out["cpu"]).max() / scale < 2e-2
        assert np.abs(out["graph"] - out["eager"]).max() / scale < 5e-3, f"graph vs eager at step {step}"
        for k in runs:
            for i, t in zip(live, toks, strict=True):
                seqs[k][i].output_ids.append(int(t))
    graphs = runs["graph"][0].executor
    assert set(graphs.graphs) == {2, 4}, f"captured sizes {sorted(graphs.graphs)}"


@pytest.mark.gpu
def test_device_rope_tables_are_the_uploaded_host_tables():
    """The CUDA backend computes its fp16 RoPE tables on the device (a 2^24-token table took ~18 s on the host):
    the same values as the host's float64 angles rounded to float32 then float16, over chunk edges and odd lengths,
    with llama3 scaling; a last-bit difference of the device's double cos may flip a rare float16 rounding."""
    from lserve_lite.backends.base import ROPE_CHUNK, RopeTables, rope_tables
    from lserve_lite.backends.cuda import CudaOps, to_fp16
    from lserve_lite.config import ModelConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = ModelConfig(
        "LlamaForCausalLM", 512, 1024, 1, 4, 4, 128, 100, rope_theta=500000.0, rope_scaling=scaling
    )
    ops, n = CudaOps(), 2 * ROPE_CHUNK + 37
    tables = RopeTables(cfg, n)
    dev = ops.rope_tables(tables)
    assert tables.filled == 0 and "cos" not in vars(tables)  # no host table was filled, or allocated
    for got, want in zip(dev, rope_tables(cfg, n), strict=True):
        got, want = ops.cp.asnumpy(got), to_fp16(want)
        assert got.dtype == np.float16 and got.shape == want.shape == (n, 64)
        diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
        assert diff.max() <= 2.0**-11 and np.count_nonzero(diff) <= 1e-5 * diff.size, (
            diff.max(),
            np.count_nonzero(diff),
        )
