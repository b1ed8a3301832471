"""Quantized KV cache on the GPU (gpu-marked; skipped without a GPU): the kernel harness's kv_quant rows per
KV dtype (`lserve-lite kernels test kv_quant`), and the engine with int8 / int4 / fp8 KV on the CUDA backend
against its fp16 KV (dense and LServe modes, eager and CUDA Graph decode). Prefill rows run under the default
prefill kernel ("auto": the wgmma kernel of attention_prefill_sm90.cu on compute capability 9.x, checked to be the
launcher's choice) and, on 9.x, again under the mma.sync kernel (`PREFILL_KERNEL = "mma"`)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.harness import kv_quant as HK
from lserve_lite.harness.common import Ctx, format_table, setting

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def hctx():
    return Ctx(seed=0)


def _device_cc() -> str:
    import cupy as cp

    return cp.cuda.Device().compute_capability


def _prefill_setting(pk: str) -> str | None:
    """The harness's `prefill` argument for the test parameter pk ("auto" / "mma"); skips "mma" where "auto"
    already runs the mma.sync kernel (devices other than compute capability 9.x)."""
    if pk == "auto":
        return None
    from lserve_lite.backends import cuda_attention as CA

    if CA.prefill_kernel_for(128, "int8", _device_cc()) == "mma":
        pytest.skip("the default prefill kernel is the mma.sync one on this device")
    return pk


def _check_family(kv: str, pk: str) -> None:
    """The launcher's choice (cuda_attention.prefill_kernel_for, which paged_attention follows) for format kv: the
    wgmma kernel under "auto" on compute capability 9.x for every KV format, the mma.sync one under "mma"."""
    from lserve_lite.backends import cuda_attention as CA

    with setting(CA, "PREFILL_KERNEL", pk):
        got = CA.prefill_kernel_for(128, kv, _device_cc())
    assert got == ("wgmma" if pk == "auto" and str(_device_cc()).startswith("9") else "mma"), got


def _run(hctx, kv, fn, *args, **kw):
    """One harness case on a fresh seed for one KV dtype; every row must pass."""
    if kv not in hctx.ops.kv_dtypes:
        pytest.skip(f"kv_dtype {kv} needs sm_89 or newer")
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    hctx.rng = np.random.default_rng(seed)
    results = fn(hctx, *args, kv, **kw)
    results = results if isinstance(results, list) else [results]
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    assert results and not bad, f"{fn.__name__}(Ctx({seed}), {args}, {kv!r}, {kw}):\n" + format_table(bad)


@pytest.mark.parametrize("pk", ["auto", "mma"])
@pytest.mark.parametrize("impl", HK.DECODE_IMPLS)
@pytest.mark.parametrize("kv", HK.QUANT_KV)
@pytest.mark.parametrize("name", list(HK.KV_ATTENTION))
def test_attention_over_quantized_cache(hctx, kv, name, impl, pk):
    if HK.is_decode(name) and pk != "auto":
        pytest.skip("decode rows do not use the prefill kernel")
    if impl != "v1" and not HK.is_decode(name):
        pytest.skip("prefill rows do not use the decode implementation")
    if HK.is_decode(name):
        _run(hctx, kv, HK.kv_attention_one, name, impl=impl)
    else:
        _check_family(kv, pk)
        _run(hctx, kv, HK.kv_attention_one, name, prefill=_prefill_setting(pk))


@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("impl", HK.DECODE_IMPLS)
@pytest.mark.parametrize("kv", HK.QUANT_KV)
@pytest.mark.parametrize("name", ["decode_d64", "decode_d128_p16"])
def test_quantized_decode_split_counts(hctx, kv, name, impl, splits):
    """Forced split counts (cuda_attention.decode_splits replaced): 1, where the decode kernel writes the output
    itself and no combine runs, and 5; each CTA merges its 4 warps' partials (v1 and v2 epilogues)."""
    from lserve_lite.backends import cuda_attention as CA

    with setting(CA, "decode_splits", lambda *a, s=splits: s):
        _run(hctx, kv, HK.kv_attention_one, name, impl=impl)


@pytest.mark.parametrize("pk", ["auto", "mma"])
@pytest.mark.parametrize("impl", HK.DECODE_IMPLS)
@pytest.mark.parametrize("kv", HK.QUANT_KV)
@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_two_quantized_pools(hctx, kv, stage, impl, pk):
    if stage == "decode" and pk != "auto":
        pytest.skip("decode does not use the prefill kernel")
    if impl != "v1" and stage != "decode":
        pytest.skip("prefill does not use the decode implementation")
    if stage == "decode":
        _run(hctx, kv, HK.kv_sparse_one, stage, impl=impl)
    else:
        _check_family(kv, pk)
        _run(hctx, kv, HK.kv_sparse_one, stage, prefill=_prefill_setting(pk))


@pytest.mark.parametrize("kv", HK.QUANT_KV)
def test_rope_write_quantizes(hctx, kv):
    _run(hctx, kv, HK.kv_write_one)


@pytest.mark.parametrize("kv", HK.QUANT_KV)
def test_rope_write_in_the_qkv_gemv_epilogue_quantizes(hctx, kv):
    """The opt-in fused write (LSERVE_CUDA_FUSE_ROPE_QUANT) against the float64 reference of the GEMV's rows."""
    _run(hctx, kv, HK.kv_write_fused_one)


@pytest.mark.parametrize("d", HK.SPARSE_DIMS)
@pytest.mark.parametrize("kv", HK.QUANT_KV)
def test_rope_write_sparse_quantizes_and_keeps_unquantized_stats(hctx, kv, d):
    _run(hctx, kv, HK.kv_write_sparse_one, d=d)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny llama with head_dim 64 (the GPU kernels' smallest) and a head pattern for LServe mode."""
    from tiny_models import make_tiny

    p = make_tiny(tmp_path_factory.mktemp("tiny64"), hidden_size=256, intermediate_size=512, head_dim=64)
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    return p


def _llm(path, kv: str, sparse: bool, graphs: bool):
    from lserve_lite import LLM, EngineConfig, SparseConfig

    knobs = dict(page_size=16, sub_pages=4, prefill_sink=16, prefill_local=64, decode_sink=16, decode_local=32,
                 token_budget=64)  # fmt: skip
    sp = SparseConfig(enabled=True, static_sparsity=0.5, **knobs) if sparse else SparseConfig()
    cfg = EngineConfig(kv_dtype=kv, page_size=16, sparse=sp, max_num_batched_tokens=64, num_kv_pages=64,
                       cuda_graphs=graphs, max_num_seqs=4)  # fmt: skip
    return LLM(str(path), backend="cuda", config=cfg)


def _decode_logits(llm, ids: list[int], prompt: int) -> np.ndarray:
    """Teacher-forced decode logits of ids[prompt:] after a prefill of ids[:prompt] (decode steps go through
    the runner's executor: CUDA Graph replays when the LLM has them)."""
    from lserve_lite.evaluation.harness import SparseHarness

    h = SparseHarness(llm)
    seq = h.begin(ids, prompt_len=prompt)
    try:
        h.forward(seq, prompt, logits="last")
        return h.decode(seq, len(ids) - prompt)
    finally:
        h.end(seq)


@pytest.mark.parametrize("impl", HK.DECODE_IMPLS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kv,tol", [("int8", 0.03), ("fp8", 0.1), ("int4", 0.25)])
def test_engine_with_quantized_kv(tiny64, kv, tol, sparse, impl, monkeypatch):
    """Chunked prefill logits near fp16 KV's (the quantization error); decode steps through CUDA Graphs equal
    to eager ones with the same KV dtype (`impl`: the quantized decode implementation, both LLMs)."""
    from lserve_lite.backends import cuda_attention as CA

    monkeypatch.setattr(CA, "KVQ_DECODE", impl)
    ref = _llm(tiny64, "fp16", sparse, graphs=False)
    if kv not in ref.engine.ops.kv_dtypes:
        pytest.skip(f"kv_dtype {kv} needs sm_89 or newer")
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 300, 240)]
    want = ref.logits(ids)
    eager = _llm(tiny64, kv, sparse, graphs=False)
    got = eager.logits(ids)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    e = _decode_logits(eager, ids, 200)
    g = _decode_logits(_llm(tiny64, kv, sparse, graphs=True), ids, 200)
    assert np.isfinite(g).all() and np.abs(g - e).max() / np.abs(e).max() < 5e-3


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kv", ["fp16", "int8", "int4", "fp8"])
def test_stale_nan_past_a_context_does_not_reach_another_request(tiny64, kv, sparse, graphs):
    """The CUDA twin of tests/test_kv_quant.py's test: every pool (values, scales, LServe's statistics) poisoned
    with NaN after a first run, a second run of the same prompts (ending mid-page, prefix caching off) gives the
    same logprobs bit for bit: no prefill or decode kernel reads a slot past its context into the output."""
    from test_kv_quant import check_stale_nan

    check_stale_nan(tiny64, "cuda", kv, sparse, np.random.default_rng(5), cuda_graphs=graphs, max_num_seqs=4)
