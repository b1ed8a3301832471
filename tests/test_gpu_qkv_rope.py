"""CudaOps.qkv_rope with LSERVE_CUDA_FUSE_ROPE=1: RoPE and the K/V page write in the epilogue of the decode q/k/v
GEMV (kernels/rope_out.cuh in gemv_rows and quant_gemv_split) against the unfused calls on the same device weight
(rmsnorm_linear, then rope_write_kv: `norm_qkv_rope`), against the float64 reference of the whole, and through the
engine (eager and CUDA Graphs, fused against unfused). gpu-marked (skipped without a GPU); the same epilogue runs
on the host in CI through tools/quant_host_check.py (test_kernels_compile.py).

Unmarked (in CI): the launch argument's host-side bookkeeping (backends/rope_out.py) on stand-in arrays.

Both paths compute each output's float32 sum with the same kernel code in the same order and round as the other
does, so q, the written K/V slots, the residual stream, every cache value left alone and the engine's logits are
equal bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lserve_lite.config import ModelConfig


@pytest.fixture(scope="module")
def hctx(harness_seed):
    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.harness import Ctx

    ctx = Ctx(seed=harness_seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSERVE_CUDA_FUSE_ROPE", "1")
        mp.setenv("LSERVE_CUDA_FUSE_ROPE_QUANT", "1")
        ctx.ops = CudaOps()  # the fused paths, read at construction
    return ctx


def _weight(hctx, fmt: str, m: int, k: int):
    from lserve_lite.harness.quant import random_quant
    from lserve_lite.weights.quantize import quantize_int4, quantize_int8

    w = hctx.f16(m, k, scale=1 / np.sqrt(k))
    if fmt in ("int8", "int4"):
        return (quantize_int8 if fmt == "int8" else quantize_int4)(w)
    return w if fmt == "f16" else random_quant(fmt, m, k, hctx.rng)


@pytest.mark.gpu
@pytest.mark.parametrize("first", [False, True], ids=["residual", "first_layer"])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["f16", "int8", "int4", "q4_1", "q4_k"])
@pytest.mark.parametrize("d", [64, 128])
def test_qkv_rope_fused_matches_unfused(hctx, d, fmt, n, first):
    from lserve_lite.backends.base import norm_qkv_rope, rope_tables
    from lserve_lite.backends.cuda_quant import DeviceQuant
    from lserve_lite.backends.reference.layers import rmsnorm_ref, rope_write_kv_ref
    from lserve_lite.harness.quant import reference_matrix

    ops, rng, cp = hctx.ops, hctx.rng, hctx.cp
    assert ops.fuse_rope_rows == 8
    hq, hkv, k, page = 6, 2, 512, 16
    cfg = ModelConfig("LlamaForCausalLM", k, 1024, 1, hq, hkv, d, 100, max_position_embeddings=4096)
    w = _weight(hctx, fmt, (hq + 2 * hkv) * d, k)
    dw = ops.upload(w)
    assert fmt == "f16" or (isinstance(dw, DeviceQuant) and dw.split is not None)
    cos, sin = (cp.asarray(t.astype(np.float16)) for t in rope_tables(cfg, 4096))
    x = hctx.f16(n, k)
    res = None if first else (3 * rng.standard_normal((n, k))).astype(np.float32)
    lnw = (1 + 0.2 * rng.standard_normal(k)).astype(np.float16)
    pos = rng.integers(0, 4096, n).astype(np.int64)
    slots = rng.choice(8 * page, n, replace=False).astype(np.int64)
    if n > 1:
        slots[1] = -1  # a padding row of a captured batch: no K/V write
    runs, old = {}, None  # old: the caches' values before the call, the same for both runs (to leave alone)
    for how in ("fused", "unfused"):
        cache = ops.alloc_kv(cfg, page, 8)
        if old is None:
            old = [rng.standard_normal(a.shape).astype(np.float16) for a in (cache.k[0], cache.v[0])]
        for a, o in zip((cache.k[0], cache.v[0]), old, strict=True):
            a[...] = cp.asarray(o)
        before = (cache.k[0].copy(), cache.v[0].copy())
        fn = ops.qkv_rope if how == "fused" else (lambda *a: norm_qkv_rope(ops, *a))
        q, r = fn(hctx.dev16(x), None if first else cp.asarray(res), cp.asarray(lnw), 1e-5, dw, None,
                  cp.asarray(pos), cp.asarray(slots), cache, 0, (cos, sin))  # fmt: skip
        runs[how] = [cp.asnumpy(a) for a in (q, r, cache.k[0], cache.v[0], *before)]
    for name, a, b in zip(
        ("q", "residual", "k cache", "v cache"), runs["fused"], runs["unfused"], strict=False
    ):
        assert np.array_equal(a, b, equal_nan=True), f"{name} differs"
    q, r, kc, vc, k0, v0 = runs["fused"]
    written = np.zeros(kc.shape, bool)
    for s in slots[slots >= 0]:
        written[s // page, :, s % page] = True
    assert np.array_equal(kc[~written], k0[~written]) and np.array_equal(vc[~written], v0[~written])
    # float64 reference of the whole: norm, product, RoPE, page write (tolerance: the fp16 roundings on the way)
    r_ref = x + (0 if first else res)
    assert np.array_equal(r, r_ref.astype(np.float32))
    h = (
        rmsnorm_ref(r_ref.astype(np.float32), lnw.astype(np.float32), 1e-5)
        .astype(np.float16)
        .astype(np.float64)
    )
    wf = w.astype(np.float64) if fmt == "f16" else reference_matrix(w)
    qkv = h @ wf.T
    kr, vr = np.zeros(kc.shape), np.zeros(vc.shape)
    tab = [t.astype(np.float64) for t in rope_tables(cfg, 4096)]
    q_ref = rope_write_kv_ref(qkv, pos, np.maximum(slots, 0), kr.copy(), vr.copy(), *tab)
    live = slots >= 0
    rope_write_kv_ref(qkv[live], pos[live], slots[live], kr, vr, *tab)
    scale = np.abs(h) @ np.abs(wf).T  # the product's magnitude: fp16 roundings and int8 activations
    tol = 0.02 * scale.max() + 2e-3
    assert np.abs(q.astype(np.float64) - q_ref).max() <= tol
    for got, ref in ((kc, kr), (vc, vr)):
        g = got[slots[live] // page, :, slots[live] % page].astype(np.float64)
        assert np.abs(g - ref[slots[live] // page, :, slots[live] % page]).max() <= tol


# LServe's dense-pool slots per row count (page 16, logical pages of 8; -1 padding): runs that continue a logical
# page past its offset 0 (merged with its stored statistics), start one at offset 0, and stand alone
LSERVE_DENSE_SLOTS = {1: [13], 3: [21, 22, 40], 8: [21, 22, 23, 24, 25, 32, 50, -1]}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["f16", "q4_1", "int8"])
def test_qkv_rope_lserve_fused_matches_unfused(hctx, fmt, n):
    """An LServe cache (KV heads 0, 2 dense, 1, 3 streaming, in pool rows swapped; logical pages of 8 tokens): the
    fused epilogue against rmsnorm_linear + rope_write_kv_sparse on random pools and statistics, bit for bit: q,
    both pools and the dense pool's key max / min (runs merged with the stored statistics or started afresh)."""
    from lserve_lite.backends.base import KVCache, norm_qkv_rope, rope_tables

    ops, rng, cp = hctx.ops, hctx.rng, hctx.cp
    hq, hkv, d, k, page, pages = 8, 4, 64, 512, 16, 8
    cfg = ModelConfig("LlamaForCausalLM", k, 1024, 1, hq, hkv, d, 100, max_position_embeddings=4096)
    dw = ops.upload(_weight(hctx, fmt, (hq + 2 * hkv) * d, k))
    cos, sin = (cp.asarray(t.astype(np.float16)) for t in rope_tables(cfg, 4096))
    x, lnw = hctx.f16(n, k), (1 + 0.2 * rng.standard_normal(k)).astype(np.float16)
    pos = rng.integers(0, 4096, n).astype(np.int64)
    dense = np.asarray(LSERVE_DENSE_SLOTS[n], np.int64)
    stream = rng.choice(pages * page, n, replace=False).astype(np.int64)
    stream[dense < 0] = -1
    slots = cp.asarray(np.stack([dense, stream]))
    hc, hs = np.array([0, 1, 0, 1], np.int32), np.array([1, 1, 0, 0], np.int32)
    arrays = [rng.standard_normal(shape).astype(np.float16) for shape in
              [(pages, 2, page, d)] * 4 + [(pages, 2, 2, d)] * 2]  # fmt: skip
    runs = {}
    for how in ("fused", "unfused"):
        dev = [cp.asarray(a) for a in arrays]
        cache = KVCache(k=[dev[0]], v=[dev[1]], page_size=page, num_pages=pages, ks=[dev[2]], vs=[dev[3]],
                        head_class=[cp.asarray(hc)], head_slot=[cp.asarray(hs)], kmax=[dev[4]], kmin=[dev[5]])  # fmt: skip
        fn = ops.qkv_rope if how == "fused" else (lambda *a: norm_qkv_rope(ops, *a))
        q, _ = fn(
            hctx.dev16(x), None, cp.asarray(lnw), 1e-5, dw, None, cp.asarray(pos), slots, cache, 0, (cos, sin)
        )
        runs[how] = [cp.asnumpy(a) for a in (q, *dev)]
    names = ("q", "k dense", "v dense", "k stream", "v stream", "kmax", "kmin")
    for name, a, b, before in zip(names, runs["fused"], runs["unfused"], [None, *arrays], strict=True):
        assert np.array_equal(a, b), f"{name} differs"
        assert before is None or not np.array_equal(a, before), f"{name} unwritten"


def _quant_cache(hctx, fmt, pages: int, page: int, d: int, lserve: bool):
    """A one-layer quantized cache of random bytes and scales: dense (4 KV heads), or LServe's (KV heads 0, 2 dense,
    1, 3 streaming, in pool rows swapped; logical pages of 8 tokens, random fp16 statistics)."""
    from lserve_lite.backends.base import KVCache

    rng, cp = hctx.rng, hctx.cp

    def pool(heads):
        vals = rng.integers(
            0, 256, (pages, heads, page, fmt.packed_dim(d) * fmt.value_dtype.itemsize), np.uint8
        )
        sc = rng.uniform(0.01, 1, (pages, heads, page, fmt.scale_cols(d))).astype(np.float16)
        return cp.asarray(vals.view(fmt.value_dtype)), cp.asarray(sc)

    if not lserve:
        (k, ks), (v, vs) = pool(4), pool(4)
        return KVCache(k=[k], v=[v], page_size=page, num_pages=pages, fmt=fmt, k_scale=[ks], v_scale=[vs])
    (kd, kds), (vd, vds), (kst, kss), (vst, vss) = (pool(2) for _ in range(4))
    stats = [cp.asarray(rng.standard_normal((pages, 2, 2, d)).astype(np.float16)) for _ in range(2)]
    return KVCache(k=[kd], v=[vd], page_size=page, num_pages=pages, ks=[kst], vs=[vst],
                   head_class=[cp.asarray(np.array([0, 1, 0, 1], np.int32))],
                   head_slot=[cp.asarray(np.array([1, 1, 0, 0], np.int32))], kmax=[stats[0]], kmin=[stats[1]],
                   fmt=fmt, k_scale=[kds], v_scale=[vds], ks_scale=[kss], vs_scale=[vss])  # fmt: skip


def _cache_arrays(cache) -> list:
    return [a[0] for a in (cache.k, cache.v, cache.ks, cache.vs, cache.k_scale, cache.v_scale, cache.ks_scale,
                           cache.vs_scale, cache.kmax, cache.kmin) if a is not None]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("lserve", [False, True], ids=["dense", "lserve"])
@pytest.mark.parametrize("wfmt", ["f16", "q4_1"])
@pytest.mark.parametrize("kv", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("d", [64, 128])
def test_qkv_rope_quantized_fused_matches_unfused(hctx, d, kv, wfmt, lserve):
    """A quantized cache at one row (QUANT_ROPE_ROWS): the epilogue stages the K / V heads (and int4's / fp8's
    queries, in the Hadamard basis) and the head's last warp writes them with rope_write_kv(_sparse)'s row code,
    so q, every pool's bytes and scales and LServe's statistics equal the unfused rmsnorm_linear + rope_write_kv(_sparse)
    bit for bit; two calls in a row (the tickets left at zero), a position that continues a logical page and one
    that starts it."""
    from lserve_lite.backends.base import norm_qkv_rope, rope_tables
    from lserve_lite.kv.quant import resolve_kv_format

    ops, rng, cp = hctx.ops, hctx.rng, hctx.cp
    if kv not in ops.kv_dtypes:
        pytest.skip(f"{kv} KV needs a newer GPU")
    hq, hkv, k, page, pages = 8, 4, 512, 16, 8
    cfg = ModelConfig("LlamaForCausalLM", k, 1024, 1, hq, hkv, d, 100, max_position_embeddings=4096)
    fmt = resolve_kv_format(kv, ops.kv_dtypes, d)
    dw = ops.upload(_weight(hctx, wfmt, (hq + 2 * hkv) * d, k))
    cos, sin = (cp.asarray(t.astype(np.float16)) for t in rope_tables(cfg, 4096))
    base = _quant_cache(hctx, fmt, pages, page, d, lserve)
    runs = {}
    calls = [
        (rng.integers(0, 4096), 13, 70),
        (rng.integers(0, 4096), 16, 71),
    ]  # dense slot: mid / start of a page
    xs = [(hctx.f16(1, k), (1 + 0.2 * rng.standard_normal(k)).astype(np.float16)) for _ in calls]
    for how in ("fused", "unfused"):
        cache = dataclasses.replace(base, **{f: [a[0].copy()] for f, a in vars(base).items()
                                             if isinstance(a, list) and f not in ("head_class", "head_slot")})  # fmt: skip
        fn = ops.qkv_rope if how == "fused" else (lambda *a: norm_qkv_rope(ops, *a))
        out = []
        for (p, dslot, sslot), (x, lnw) in zip(calls, xs, strict=True):
            slots = cp.asarray(np.array([[dslot], [sslot]] if lserve else [dslot], np.int64))
            q, _ = fn(hctx.dev16(x), None, cp.asarray(lnw), 1e-5, dw, None, cp.asarray(np.array([p], np.int64)),
                      slots, cache, 0, (cos, sin))  # fmt: skip
            out.append(cp.asnumpy(q).view(np.uint16))
        runs[how] = out + [cp.asnumpy(a).view(np.uint8) for a in _cache_arrays(cache)]
        assert how == "unfused" or not cp.asnumpy(ops._rope_tickets).any(), "tickets left nonzero"
    before = [None, None] + [cp.asnumpy(a).view(np.uint8) for a in _cache_arrays(base)]
    for i, (a, b, old) in enumerate(zip(runs["fused"], runs["unfused"], before, strict=True)):
        assert np.array_equal(a, b), f"array {i} differs"
        assert old is None or not np.array_equal(a, old), f"array {i} unwritten"


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_engine_fused_equals_unfused(monkeypatch, graphs):
    """A random Llama through the ModelRunner, fused and unfused (a CudaOps each): prefill (46 rows: cuBLAS and
    rope_write_kv either way), then decode steps of 3 and 2 rows (graph sizes 4 and 2, padded) whose logits must be
    equal bit for bit; in the fused run rope_write_kv must not be called during decode."""
    from test_gpu_ops import _runner, _step, small_llama

    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    cfg, ws = small_llama()
    runs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("LSERVE_CUDA_FUSE_ROPE", fuse)
        runs[fuse] = _runner(cfg, ws, "cuda", graphs)
        assert (runs[fuse][0].ops.fuse_rope_rows > 0) == (fuse == "1")
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (5, 24, 17)]
    seqs = {k: [Sequence(list(p), SamplingParams()) for p in prompts] for k in runs}
    first = {k: _step(r, b, seqs[k], [5, 24, 17], all_logits=True) for k, (r, b) in runs.items()}
    assert np.array_equal(first["1"], first["0"])

    def no_rope_kernel(*a, **k):
        raise AssertionError("rope_write_kv called by a fused decode step")

    monkeypatch.setattr(runs["1"][0].ops, "rope_write_kv", no_rope_kernel)
    toks = dict(zip((0, 1, 2), first["0"][[4, 28, 45]].argmax(-1), strict=True))  # each prompt's last row
    for step in range(10):
        live = [0, 1, 2] if step < 6 else [1, 2]
        for k in runs:
            for i in live:
                seqs[k][i].output_ids.append(int(toks[i]))
        out = {k: _step(r, b, [seqs[k][i] for i in live], [1] * len(live)) for k, (r, b) in runs.items()}
        assert np.array_equal(out["1"], out["0"]), f"fused decode logits differ at step {step}"
        toks = dict(zip(live, out["0"].argmax(-1), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_engine_quantized_fused_equals_unfused(monkeypatch, kv, graphs):
    """A random Llama over a quantized cache through the ModelRunner, the epilogue's quantized write on and off
    (LSERVE_CUDA_FUSE_ROPE_QUANT): batch-1 decode steps' logits equal bit for bit, and the fused run's decode never
    calls rope_write_kv."""
    from test_gpu_ops import _runner, _step, small_llama

    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    cfg, ws = small_llama()
    runs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("LSERVE_CUDA_FUSE_ROPE_QUANT", fuse)
        runs[fuse] = _runner(cfg, ws, "cuda", graphs, kv_dtype=kv)
        assert runs[fuse][0].ops.fuse_rope_quant == (fuse == "1") and runs[fuse][0].cache.quantized
    prompt = list(np.random.default_rng(4).integers(0, cfg.vocab_size, 21))
    seqs = {k: Sequence(list(prompt), SamplingParams()) for k in runs}
    first = {k: _step(r, b, [seqs[k]], [21]) for k, (r, b) in runs.items()}
    assert np.array_equal(first["1"], first["0"])

    def no_rope_kernel(*a, **k):
        raise AssertionError("rope_write_kv called by a fused decode step")

    monkeypatch.setattr(runs["1"][0].ops, "rope_write_kv", no_rope_kernel)
    tok = int(first["0"].argmax())
    for step in range(12):  # across a 16-token page's end
        for k in runs:
            seqs[k].output_ids.append(tok)
        out = {k: _step(r, b, [seqs[k]], [1]) for k, (r, b) in runs.items()}
        assert np.array_equal(out["1"], out["0"]), f"fused decode logits differ at step {step}"
        tok = int(out["0"].argmax())


class _Dev:
    """Stands for a device array: a shape and a `data.ptr`."""

    def __init__(self, ptr: int, *shape: int):
        self.shape, self.data = shape, type("Mem", (), {"ptr": ptr})()


def _row_arrays() -> tuple:
    """Stand-ins for five rows' positions, slots, the RoPE tables (D 64) and q_out."""
    return _Dev(0x1000, 5), _Dev(0x2000, 5), _Dev(0x3000, 64, 32), _Dev(0x4000, 64, 32), _Dev(0x5000)


def test_rope_out_fields_dense_and_lserve():
    """rope_out's struct for a dense and an LServe cache (pointers, head and pool counts, logical pages, N), rope_kind,
    and rope_rows moving the per-row pointers for a later launch over rows 3.. (the streaming slots stay N apart)."""
    from lserve_lite.backends.base import KVCache
    from lserve_lite.backends.rope_out import rope_kind, rope_out, rope_rows

    pos, slots, cos, sin, q = _row_arrays()
    dense = KVCache(k=[_Dev(0x6000, 8, 3, 16, 64)], v=[_Dev(0x7000, 8, 3, 16, 64)], page_size=16, num_pages=8)
    ro = rope_out(pos, slots, (cos, sin), q, dense, 0, None, 9)
    assert (int(ro["positions"]), int(ro["slots"]), int(ro["q_out"]), int(ro["k_cache"]), int(ro["v_cache"])) == (
        0x1000, 0x2000, 0x5000, 0x6000, 0x7000)  # fmt: skip
    assert int(ro["bias"]) == int(ro["ks"]) == int(ro["head_class"]) == int(ro["kmax"]) == 0
    assert [int(ro[f]) for f in ("hq", "hkv", "head_dim", "page_size", "nd", "ns", "sub", "n_rows")] == [
        9, 3, 64, 16, 3, 0, 1, 5]  # fmt: skip
    assert rope_kind(ro) == 1
    sparse = KVCache(
        k=[_Dev(0x6000, 8, 2, 16, 64)], v=[_Dev(0x7000, 8, 2, 16, 64)], page_size=16, num_pages=8,
        ks=[_Dev(0x8000, 4, 1, 16, 64)], vs=[_Dev(0x9000, 4, 1, 16, 64)], head_class=[_Dev(0xA000, 3)],
        head_slot=[_Dev(0xB000, 3)], kmax=[_Dev(0xC000, 8, 2, 4, 64)], kmin=[_Dev(0xD000, 8, 2, 4, 64)],
    )  # fmt: skip
    ro = rope_out(pos, slots, (cos, sin), q, sparse, 0, _Dev(0xE000), 9)
    assert [int(ro[f]) for f in ("bias", "ks", "vs", "head_class", "head_slot", "kmax", "kmin")] == [
        0xE000, 0x8000, 0x9000, 0xA000, 0xB000, 0xC000, 0xD000]  # fmt: skip
    assert [int(ro[f]) for f in ("hkv", "nd", "ns", "sub", "n_rows")] == [3, 2, 1, 4, 5]
    assert rope_kind(ro) == 2
    moved = rope_rows(ro, 3)
    assert int(moved["positions"]) == 0x1000 + 24 and int(moved["slots"]) == 0x2000 + 24
    assert int(moved["q_out"]) == 0x5000 + 2 * 3 * 9 * 64 and int(moved["n_rows"]) == 5
    assert rope_rows(ro, 0) is ro and int(ro["positions"]) == 0x1000  # the original is left as it was


def test_rope_out_fields_quantized():
    """rope_out's struct for quantized caches: the scales' pointers, the stage and tickets (required), the Hadamard
    flag of int4's keys, rope_kind = kind + 2 x the format's index, rope_rows moving the stage with the rows; and the
    kinds compiled per row count (quantized at QUANT_ROPE_ROWS only)."""
    from lserve_lite.backends.base import KVCache
    from lserve_lite.backends.rope_out import QUANT_ROPE_ROWS, rope_kind, rope_kinds, rope_out, rope_rows
    from lserve_lite.kv.quant import FORMATS

    pos, slots, cos, sin, q = _row_arrays()
    stage, ticket = _Dev(0xF000, 5, 15, 64), _Dev(0xF800, 1024)
    for name, kind, had in (("int8", 3, 0), ("int4", 5, 1), ("fp8", 7, 1)):
        fmt = FORMATS[name]
        cols = fmt.packed_dim(64)
        cache = KVCache(k=[_Dev(0x6000, 8, 3, 16, cols)], v=[_Dev(0x7000, 8, 3, 16, cols)], page_size=16,
                        num_pages=8, fmt=fmt, k_scale=[_Dev(0x8000, 8, 3, 16, 1)], v_scale=[_Dev(0x9000, 8, 3, 16, 1)])  # fmt: skip
        with pytest.raises(ValueError, match="stage and ticket"):
            rope_out(pos, slots, (cos, sin), q, cache, 0, None, 9)
        ro = rope_out(pos, slots, (cos, sin), q, cache, 0, None, 9, stage, ticket)
        assert [int(ro[f]) for f in ("k_sc", "v_sc", "ks_sc", "stage", "ticket")] == [
            0x8000,
            0x9000,
            0,
            0xF000,
            0xF800,
        ]
        assert (int(ro["hadamard"]), rope_kind(ro), int(ro["head_dim"])) == (had, kind, 64)
        assert int(rope_rows(ro, 2)["stage"]) == 0xF000 + 2 * 2 * 15 * 64
    assert rope_kinds(1) == (1, 2, 3, 4, 5, 6, 7, 8) and rope_kinds(2) == (1, 2) and QUANT_ROPE_ROWS == (1,)


def test_fuse_rope_rows_default_is_batch_one():
    """The fused epilogue by default for one-row steps only (measured slower at 2-8 rows); the switch's forms."""
    from lserve_lite.backends.cuda import FUSE_ROPE_ROWS, GEMV_MAX_ROWS, fuse_rope_rows

    assert FUSE_ROPE_ROWS == 1 and fuse_rope_rows(None, None) == 1 and fuse_rope_rows(None, "") == 1
    assert fuse_rope_rows(None, "1") == GEMV_MAX_ROWS and fuse_rope_rows(None, "0") == 0
    assert fuse_rope_rows(True, "0") == GEMV_MAX_ROWS and fuse_rope_rows(False, "1") == 0
