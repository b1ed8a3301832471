"""`lserve-lite kernels test`: every GPU kernel against its CPU reference on fresh random inputs.

Each case draws new random inputs (never zeros), poisons the outputs (NaN, or -1 for token ids) before
the launch, runs the kernel through its launcher and compares with the float32 reference of cpu.py or
engine/sampler.py evaluated on the same float16-rounded inputs. One row per kernel and shape:
max abs error, rel = max abs error / max |ref|, PASS/FAIL (a NaN left in an output fails). Exit status 1
on any failure; 0 with a note when no GPU is visible.

LServe sparse kernels (cases sparse_attention, page_select, rope_write_kv_sparse): the two-pool prefill /
decode attention, the page selector and the sparse RoPE + K/V write + page statistics, against
backends/reference.py. Their named setups (SPARSE_PREFILL, SPARSE_DECODE, ROPE_SPARSE) run one at a time
through the `*_one(ctx, name)` functions.

The same cases back `pytest -m gpu tests/test_gpu_ops.py` (and, one test per named sparse setup,
tests/test_gpu_sparse.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .backends import cuda_available


@dataclass
class Result:
    kernel: str
    shape: str
    max_abs: float
    rel: float
    ok: bool
    note: str = ""


class Ctx:
    """What every case needs: CuPy, the ops, a fresh generator."""

    def __init__(self, seed: int):
        import cupy as cp

        from .backends.cuda import CudaOps

        self.cp = cp
        self.ops = CudaOps()
        self.rng = np.random.default_rng(seed)

    def f16(self, *shape, scale=1.0) -> np.ndarray:
        """Random normal float16 values (as float32 arrays holding float16-exact numbers); never zero-filled."""
        return (self.rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)

    def dev16(self, a: np.ndarray):
        return self.cp.asarray(a.astype(np.float16))

    def poison(self, shape, dtype):
        return self.cp.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


def compare(kernel: str, shape: str, got, ref, atol: float, rtol: float, nan_ok: bool = False) -> Result:
    """Elementwise |got - ref| <= atol + rtol |ref|; a non-finite value where ref is finite fails."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Result(kernel, shape, math.inf, math.inf, False, f"shape {got.shape} != {ref.shape}")
    both_nan = np.isnan(got) & np.isnan(ref)
    bad_nan = ~np.isfinite(got) & ~both_nan
    err = np.where(both_nan, 0.0, np.abs(got - ref))
    err = np.where(bad_nan, np.inf, err)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
    ok = bool(np.all(err <= atol + rtol * np.abs(np.nan_to_num(ref))))
    note = f"{int(bad_nan.sum())} non-finite" if bad_nan.any() else ""
    return Result(kernel, shape, max_abs, max_abs / max(scale, 1e-30), ok, note)


# -- cases: each returns a list of Results -----------------------------------------------------------
def case_embed(c: Ctx) -> list[Result]:
    out = []
    for vocab, hidden, n in [(1000, 576, 7), (333, 100, 5), (4096, 4096, 33)]:
        table = c.f16(vocab, hidden)
        ids = c.rng.integers(0, vocab, n)
        got = c.poison((n, hidden), np.float16)
        c.ops.embed(c.dev16(table), c.cp.asarray(ids), out=got)
        out.append(compare("embed_gather", f"V{vocab} H{hidden} N{n}", got.get(), table[ids], 0, 0))
    return out


def case_add_rmsnorm(c: Ctx) -> list[Result]:
    from .backends.cpu import rmsnorm_ref

    out = []
    for n, hidden in [(1, 576), (7, 100), (130, 4096), (3, 1000)]:
        for with_res in (False, True):
            x, w = c.f16(n, hidden), c.f16(hidden, scale=0.3) + 1.0
            w = w.astype(np.float16).astype(np.float32)
            res = c.rng.standard_normal((n, hidden)).astype(np.float32) * 2
            ref_res = x + res if with_res else x
            ref = rmsnorm_ref(ref_res, w, 1e-5)
            got = c.poison((n, hidden), np.float16)
            got_res = c.cp.asarray(res) if with_res else c.poison((n, hidden), np.float32)
            c.ops.add_rmsnorm(
                c.dev16(x), got_res if with_res else None, c.dev16(w), 1e-5, out=got, res_out=got_res
            )
            tag = f"N{n} H{hidden}" + (" +res" if with_res else "")
            out.append(compare("add_rmsnorm", tag, got.get(), ref, 2e-3, 4e-3))
            out.append(compare("add_rmsnorm.residual", tag, got_res.get(), ref_res, 1e-5, 1e-6))
    return out


def case_rope_write_kv(c: Ctx) -> list[Result]:
    from .backends.base import KVCache, rope_tables
    from .backends.cpu import rope_write_kv_ref
    from .config import ModelConfig

    out = []
    for hq, hkv, d, page, n, scaling in [
        (9, 3, 64, 64, 13, None),
        (
            32,
            8,
            128,
            16,
            70,
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        ),
        (4, 4, 32, 64, 1, None),
    ]:
        cfg = ModelConfig(
            "LlamaForCausalLM", hq * d, 4 * d, 1, hq, hkv, d, 100, rope_theta=5e5, rope_scaling=scaling
        )
        max_len, num_pages = 20000, 40
        cos, sin = (t.astype(np.float16).astype(np.float32) for t in rope_tables(cfg, max_len))
        qkv = c.f16(n, (hq + 2 * hkv) * d)
        pos = c.rng.integers(0, max_len, n)
        slots = c.rng.permutation(num_pages * page)[:n]
        slots[c.rng.random(n) < 0.2] = -1  # padding rows write nothing
        shape = (num_pages, hkv, page, d)
        k_ref, v_ref = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        live = slots >= 0
        q_ref = rope_write_kv_ref(qkv, pos, np.maximum(slots, 0), k_ref.copy(), v_ref.copy(), cos, sin)
        rope_write_kv_ref(qkv[live], pos[live], slots[live], k_ref, v_ref, cos, sin)
        kc, vc = c.poison(shape, np.float16), c.poison(shape, np.float16)
        q = c.poison((n, hq, d), np.float16)
        cache = KVCache([kc], [vc], page, num_pages)
        c.ops.rope_write_kv(
            c.dev16(qkv),
            c.cp.asarray(pos),
            c.cp.asarray(slots),
            cache,
            0,
            (c.dev16(cos), c.dev16(sin)),
            out=q,
        )
        tag = f"Hq{hq} Hkv{hkv} D{d} page{page} N{n}" + (" llama3" if scaling else "")
        out.append(compare("rope_write_kv.q", tag, q.get(), q_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.k", tag, kc.get(), k_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.v", tag, vc.get(), v_ref, 0, 0))
    return out


def case_silu_mul(c: Ctx) -> list[Result]:
    from .backends.cpu import silu_mul_ref

    out = []
    for n, inter in [(1, 1536), (5, 100), (64, 14336), (3, 7)]:
        gu = c.f16(n, 2 * inter, scale=2.0)
        got = c.poison((n, inter), np.float16)
        c.ops.silu_mul(c.dev16(gu), out=got)
        out.append(compare("silu_mul", f"N{n} I{inter}", got.get(), silu_mul_ref(gu), 2e-3, 4e-3))
    return out


def case_linear(c: Ctx) -> list[Result]:
    out = []
    for n, k, m in [
        (1, 576, 960),
        (7, 100, 33),
        (3, 4096, 14336),
        (8, 1536, 576),
        (64, 4096, 1024),
        (300, 576, 1536),
    ]:
        x, w = c.f16(n, k), c.f16(m, k, scale=1 / math.sqrt(k))
        got = c.poison((n, m), np.float16)
        c.ops.linear(c.dev16(x), c.dev16(w), out=got)
        name = f"linear [{c.ops.gemm_path(n, k)}]"
        out.append(compare(name, f"N{n} K{k} M{m}", got.get(), x @ w.T, 4e-3, 4e-3))
    return out


def case_logits(c: Ctx) -> list[Result]:
    out = []
    for n, h, v in [(1, 576, 49152), (3, 4096, 32000), (20, 576, 49152)]:
        x, w = c.f16(n, h), c.f16(v, h, scale=1 / math.sqrt(h))
        got = c.poison((n, v), np.float32)
        c.ops.logits(c.dev16(x), c.dev16(w), out=got)
        name = f"logits fp32 [{c.ops.gemm_path(n, h)}]"
        out.append(compare(name, f"N{n} H{h} V{v}", got.get(), x @ w.T, 1e-4, 1e-4))
    return out


def case_sampling(c: Ctx) -> list[Result]:
    from .engine.sampler import sample as cpu_sample
    from .engine.sampler import sample_row
    from .engine.sequence import Sequence
    from .sampling_params import SamplingParams

    cp, sampler = c.cp, c.ops.sampler
    out = []
    for b, vocab, ties in [(1, 49152, False), (7, 1000, True), (64, 128256, False)]:
        x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
        if ties:
            x = np.round(x)
        got = c.poison((b,), np.int32)
        sampler.k["argmax_rows"]((b,), (1024,), (cp.asarray(x), np.int64(vocab), np.int32(vocab), got))
        miss = int(np.sum(got.get() != np.argmax(x, axis=1)))
        out.append(Result("argmax_rows", f"B{b} V{vocab}" + (" ties" if ties else ""), miss, 0.0, miss == 0))
    for b, vocab in [(48, 49152), (9, 777)]:
        x = (c.rng.standard_normal((b, vocab)) * c.rng.uniform(1, 6, (b, 1))).astype(np.float32)
        temps = c.rng.choice([0.0, 0.4, 1.0, 1.7], b)
        topk = c.rng.choice([0, 1, 7, 50, vocab + 5], b)
        topp = c.rng.choice([1.0, 0.95, 0.5, 0.1], b)
        us = c.rng.random(b)
        params = np.stack([temps, topk, topp, us]).astype(np.float64)
        got = c.poison((b,), np.int32)
        sampler.k["sample_rows"](
            (b,), (1024,), (cp.asarray(x), np.int64(vocab), np.int32(vocab), cp.asarray(params), got)
        )
        want = [
            int(np.argmax(x[i])) if temps[i] == 0 else sample_row(x[i], float(temps[i]), int(topk[i]), float(topp[i]), us[i])
            for i in range(b)
        ]  # fmt: skip
        miss = int(np.sum(got.get() != np.asarray(want)))
        out.append(
            Result(
                "sample_rows", f"B{b} V{vocab} mixed T/top-k/top-p", miss, 0.0, miss == 0, "abs = mismatches"
            )
        )
    # the whole path: penalties, per-sequence seeded uniforms, greedy and sampled rows in one batch
    b, vocab = 12, 5000
    x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
    prompts = [list(c.rng.integers(0, vocab + 20, int(c.rng.integers(1, 300)))) for _ in range(b)]
    mk = [
        SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), repetition_penalty=float(r), seed=int(s))
        for t, k, p, r, s in zip(
            c.rng.choice([0.0, 0.8, 1.3], b), c.rng.choice([0, 40], b), c.rng.choice([1.0, 0.9], b),
            c.rng.choice([1.0, 1.3, 0.8], b), c.rng.integers(0, 1 << 30, b), strict=True,
        )
    ]  # fmt: skip
    want = cpu_sample(x, [Sequence(pr, sp) for pr, sp in zip(prompts, mk, strict=True)])
    got = c.ops.sample(cp.asarray(x), [Sequence(pr, sp) for pr, sp in zip(prompts, mk, strict=True)])
    miss = int(np.sum(np.asarray(got) != np.asarray(want)))
    out.append(
        Result("sample (penalty + seeded rng)", f"B{b} V{vocab}", miss, 0.0, miss == 0, "abs = mismatches")
    )
    return out


def _attention_case(c: Ctx, hq, hkv, d, page, q_lens, ctx_lens, sink=0, local=0, n_stream=0) -> Result:
    from .backends.base import KVCache
    from .backends.cpu import paged_attention_ref
    from .sparse.plan import BatchLayout, build_plan

    need = [-(-t // page) for t in ctx_lens]
    num_pages = sum(need) + 3
    perm = list(c.rng.permutation(num_pages))
    tables = [[int(perm.pop()) for _ in range(k)] for k in need]
    k_cache = c.f16(num_pages, hkv, page, d)
    v_cache = c.f16(num_pages, hkv, page, d)
    q = c.f16(sum(q_lens), hq, d)
    head_class = np.zeros(hkv, np.int32)
    head_class[c.rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, sink=sink, local=local)
    ref = paged_attention_ref(q, k_cache, v_cache, plan, head_class)
    cache = KVCache([c.dev16(k_cache)], [c.dev16(v_cache)], page, num_pages)
    got = c.poison((sum(q_lens), hq * d), np.float16)
    dplan = c.ops.prepare_plan(plan)
    o = c.ops.attention(c.dev16(q), cache, 0, dplan, c.cp.asarray(head_class), out=got)
    kind = "decode" if all(n == 1 for n in q_lens) else "prefill"
    tag = f"Hq{hq}/{hkv} D{d} p{page} q{list(q_lens)[:4]} ctx{list(ctx_lens)[:4]}" + (
        f" stream{n_stream} {sink}/{local}" if n_stream else ""
    )
    return compare(f"attention.{kind}", tag, o.get(), ref, 2e-3, 1e-2)


def case_attention(c: Ctx) -> list[Result]:
    cases = [
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1, 1, 1, 1], ctx_lens=[1, 63, 64, 65, 3000]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[1, 1, 1], ctx_lens=[4096, 17, 200]),
        dict(hq=32, hkv=8, d=128, page=16, q_lens=[1], ctx_lens=[32768]),
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[5, 70, 1], ctx_lens=[5, 200, 1000]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[300], ctx_lens=[300]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[129, 1], ctx_lens=[2000, 77]),
        dict(
            hq=8,
            hkv=8,
            d=64,
            page=32,
            q_lens=[33, 1, 1],
            ctx_lens=[33, 500, 1],
        ),
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1], ctx_lens=[1500, 700], sink=64, local=256, n_stream=2),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[200], ctx_lens=[1200], sink=128, local=256, n_stream=4),
    ]
    return [_attention_case(c, **kw) for kw in cases]


# -- LServe sparse kernels: two KV pools, per-query-block windows, page selection, page statistics -------
# The setups below also back tests/test_gpu_sparse.py (one test per named setup).


def head_classes(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(head_class, head_slot) of a pattern such as "0110" (0: dense head, 1: streaming head); head_slot[g]
    is KV head g's row in the pool of its class."""
    hc = np.array([int(ch) for ch in pattern], np.int32)
    slot = np.zeros_like(hc)
    for k in (0, 1):
        slot[hc == k] = np.arange(int((hc == k).sum()), dtype=np.int32)
    return hc, slot


@dataclass
class SparseBatch:
    """One step over LServe's two KV pools: float16-exact float32 host arrays and the host plan."""

    q: np.ndarray  # [N, Hq, D]
    kd: np.ndarray  # dense pool [P, nd, page, D]
    vd: np.ndarray
    ks: np.ndarray  # streaming pool [Ps, ns, page, D]
    vs: np.ndarray
    hc: np.ndarray  # [Hkv] head classes
    slot: np.ndarray  # [Hkv] head slots
    plan: object  # sparse.plan.AttentionPlan
    tables: list  # dense-pool page table per sequence
    ctx_lens: list
    num_slots: int  # selection slots (rows of sel_idx / sel_cnt)


def sparse_batch(c: Ctx, q_lens, ctx_lens, hq, pattern, d, ps, windows, keep=None, refresh=None):
    """Random pools, distinct random dense / streaming page tables per sequence, per-sequence windows; with
    `keep`, a selecting plan (per-sequence budget in pages, `refresh` flags, shuffled selection slots)."""
    from .sparse.plan import BatchLayout, build_plan

    hc, slot = head_classes(pattern)
    nd, ns = int((hc == 0).sum()), int((hc == 1).sum())
    nseq = len(q_lens)
    ring = (-(-max(w[0] for w in windows) // ps), -(-(max(w[1] for w in windows) + max(q_lens)) // ps) + 1)
    need = [-(-t // ps) for t in ctx_lens]
    n_dense, n_stream = sum(need) + 3, nseq * (ring[0] + ring[1]) + 2
    perm, offs = c.rng.permutation(n_dense), np.cumsum([0, *need])
    tables = [[int(p) for p in perm[offs[i] : offs[i + 1]]] for i in range(nseq)]
    per = ring[0] + ring[1]
    sperm = c.rng.permutation(n_stream)
    stables = [[int(p) for p in sperm[i * per : (i + 1) * per]] for i in range(nseq)]
    num_slots = nseq + 2
    sel = keep is not None
    lay = BatchLayout(
        list(q_lens), list(ctx_lens), tables, stream_tables=stables, windows=list(windows),
        sel_slots=[int(s) for s in c.rng.permutation(num_slots)[:nseq]] if sel else None,
        sel_keep=list(keep) if sel else None, sel_refresh=list(refresh or [1] * nseq) if sel else None,
    )  # fmt: skip
    return SparseBatch(
        q=c.f16(sum(q_lens), hq, d),
        kd=c.f16(n_dense, nd, ps, d),
        vd=c.f16(n_dense, nd, ps, d),
        ks=c.f16(n_stream, ns, ps, d),
        vs=c.f16(n_stream, ns, ps, d),
        hc=hc,
        slot=slot,
        plan=build_plan(lay, ps, q_block=64, ring=ring if ns else None),
        tables=tables,
        ctx_lens=list(ctx_lens),
        num_slots=num_slots,
    )


def sparse_cache(c: Ctx, b: SparseBatch, kmax=None, kmin=None, sel_idx=None, sel_cnt=None, cap=1):
    """The batch's pools as a one-layer LServe KVCache on the device; selection buffers poisoned (-1) unless
    given."""
    from .backends.base import KVCache

    cp, hkv = c.cp, b.hc.size
    return KVCache(
        k=[c.dev16(b.kd)], v=[c.dev16(b.vd)], page_size=b.plan.page_size, num_pages=b.kd.shape[0],
        ks=[c.dev16(b.ks)], vs=[c.dev16(b.vs)], head_class=[cp.asarray(b.hc)], head_slot=[cp.asarray(b.slot)],
        kmax=None if kmax is None else [c.dev16(kmax)], kmin=None if kmin is None else [c.dev16(kmin)],
        sel_idx=[c.poison((b.num_slots, hkv, cap), np.int32) if sel_idx is None else cp.asarray(sel_idx)],
        sel_cnt=[c.poison((b.num_slots, hkv), np.int32) if sel_cnt is None else cp.asarray(sel_cnt)],
    )  # fmt: skip


SPARSE_PREFILL = {
    # name: (q_lens, prefix_lens, Hq, head classes, D, page, (sink, local) per sequence)
    "mixed_two_seqs": ([300, 77], [0, 450], 8, "0110", 128, 64, [(128, 256), (64, 128)]),
    "all_streaming": ([129], [700], 8, "11", 64, 16, [(32, 160)]),
    "all_dense": ([200, 5], [33, 0], 12, "000", 64, 32, [(0, 0), (0, 0)]),
    "gqa4_ragged": ([65, 1, 190], [1000, 37, 3], 16, "1010", 128, 64, [(64, 192), (64, 64), (128, 512)]),
    "gqa2_odd_no_sink": ([97, 3, 33], [211, 500, 0], 6, "011", 64, 16, [(0, 48), (16, 32), (48, 16)]),
}


def sparse_prefill_one(c: Ctx, name: str) -> Result:
    """CudaOps.attention (prefill kernel, two pools, per-block windows) vs paged_attention_sparse_ref."""
    from .backends.reference import paged_attention_sparse_ref

    q_lens, prefix, hq, pattern, d, ps, windows = SPARSE_PREFILL[name]
    ctx = [a + b for a, b in zip(q_lens, prefix, strict=True)]
    b = sparse_batch(c, q_lens, ctx, hq, pattern, d, ps, windows)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot)
    cache = sparse_cache(c, b)
    got = c.poison((b.q.shape[0], hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    tag = f"{name} {pattern} Hq{hq} D{d} p{ps}"
    return compare("attention.sparse_prefill", tag, o.get(), ref, 4e-3, 2e-2)


# fmt: off
SPARSE_DECODE = {
    # name: (contexts, Hq, head classes, D, page, sub_pages, budget in pages per sequence (0: no selection),
    #        (sink, local) per sequence, refresh per sequence (None: all; 0: reuse a selection made before))
    "mixed_select": ([3000, 700, 64 * 9], 8, "0110", 128, 64, 4, [8, 8, 9], [(128, 256)] * 3, None),
    "fits_budget": ([500, 1000], 8, "01", 64, 16, 4, [40, 63], [(32, 64)] * 2, None),
    "all_dense_small_pages": ([2500], 12, "000", 64, 16, 2, [20], [(0, 0)], None),
    "all_streaming": ([4000, 90], 8, "11", 128, 64, 4, [8, 8], [(128, 256)] * 2, None),
    "gqa8_long": ([20000], 32, "01010101", 128, 64, 4, [64], [(128, 256)], None),
    "many_pages_sub8": ([9001, 40, 777], 8, "0011", 64, 16, 8, [100, 100, 7],
                        [(32, 64), (0, 32), (16, 48)], None),
    "reused_and_unselected": ([64 * 40 + 1, 64 * 10 + 5, 333, 1234], 8, "0100", 128, 64, 4, [6, 200, 0, 5],
                              [(128, 256)] * 4, [0, 0, 1, 1]),
}
# fmt: on


def _decode_setup(c: Ctx, name: str):
    """The batch of SPARSE_DECODE[name], its dense-pool key statistics and the selection capacity."""
    from .kv.page_stats import update_page_stats

    ctx, hq, pattern, d, ps, sub, keep, windows, refresh = SPARSE_DECODE[name]
    b = sparse_batch(c, [1] * len(ctx), ctx, hq, pattern, d, ps, windows, keep=keep, refresh=refresh)
    shape = (b.kd.shape[0], b.kd.shape[1], sub, d)
    x, y = c.f16(*shape), c.f16(*shape)
    kmax, kmin = np.maximum(x, y), np.minimum(x, y)  # what pages outside the contexts hold (never scored)
    if b.kd.shape[1]:
        tok = [np.arange(n) for n in ctx]
        slots = np.concatenate(
            [np.asarray(t)[p // ps] * ps + p % ps for t, p in zip(b.tables, tok, strict=True)]
        )
        update_page_stats(kmax, kmin, b.kd, slots)
    return b, kmax, kmin, max(keep) + 1


def _stale_selection(c: Ctx, b: SparseBatch, sel: np.ndarray, cnt: np.ndarray) -> None:
    """For decode blocks that reuse a selection (qb_refresh 0): what the selector stored when the context
    was a token shorter (so the newest page is missing when that token opened it)."""
    plan, ps = b.plan, b.plan.page_size
    for qb in range(plan.num_qblocks):
        keep = int(plan.qb_keep[qb])
        if keep == 0 or plan.qb_refresh[qb]:
            continue
        ctx = int(plan.qb_pos[qb]) + 1
        prev = -(-(ctx - 1) // ps) if ctx > 1 else 1  # pages one token ago
        s = int(plan.qb_slot[qb])
        for g in np.nonzero(b.hc == 0)[0]:
            if prev <= keep:
                pick = np.arange(prev)
            else:
                pick = np.r_[np.sort(c.rng.choice(prev - 1, keep - 1, replace=False)), prev - 1]
            sel[s, g, : pick.size] = pick
            cnt[s, g] = pick.size


def sparse_decode_one(c: Ctx, name: str) -> Result:
    """CudaOps.attention (decode kernel) with page selections (fresh from select_pages_ref, or reused from an
    earlier step) uploaded into the cache vs paged_attention_sparse_ref given the same selections."""
    from .backends.reference import paged_attention_sparse_ref, select_pages_ref

    b, kmax, kmin, cap = _decode_setup(c, name)
    hkv = b.hc.size
    sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    cnt = np.full((b.num_slots, hkv), -1, np.int32)
    _stale_selection(c, b, sel, cnt)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, sel_idx=sel, sel_cnt=cnt)
    n, hq, d = b.q.shape
    got = c.poison((n, hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    pattern = "".join(str(int(x)) for x in b.hc)
    tag = f"{name} {pattern} Hq{hq} D{d} p{b.plan.page_size}"
    return compare("attention.sparse_decode", tag, o.get(), ref, 4e-3, 2e-2)


def sparse_mixed_one(c: Ctx) -> Result:
    """A step that mixes a prefill chunk with selecting decode rows (CudaOps.attention runs the prefill
    kernel, then the decode kernel on the decode rows' sub-plan) vs paged_attention_sparse_ref."""
    from .backends.reference import paged_attention_sparse_ref, select_pages_ref
    from .kv.page_stats import update_page_stats

    ctx, q_lens, ps, d = [3000, 500, 64 * 9 + 1], [1, 70, 1], 64, 128
    b = sparse_batch(c, q_lens, ctx, 8, "0110", d, ps, [(128, 256), (128, 512), (64, 256)], keep=[8, 8, 5])
    shape = (b.kd.shape[0], b.kd.shape[1], 4, d)
    x, y = c.f16(*shape), c.f16(*shape)
    kmax, kmin = np.maximum(x, y), np.minimum(x, y)
    slots = np.concatenate(
        [np.asarray(t)[np.arange(n) // ps] * ps + np.arange(n) % ps for t, n in zip(b.tables, ctx)]
    )
    update_page_stats(kmax, kmin, b.kd, slots)
    sel = np.full((b.num_slots, b.hc.size, 9), -1, np.int32)
    cnt = np.full((b.num_slots, b.hc.size), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, sel_idx=sel, sel_cnt=cnt)
    n, hq, _ = b.q.shape
    got = c.poison((n, hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    return compare("attention.sparse_mixed", f"q{q_lens} ctx{ctx} 0110 D{d}", o.get(), ref, 4e-3, 2e-2)


def page_select_one(c: Ctx, name: str) -> Result:
    """CudaOps.select_pages vs select_pages_ref on a poisoned (-1) selection: the selected page sets per
    (selection slot, dense head), the counts, and rows the selector must leave alone (streaming heads, no
    budget, reused selections). abs = mismatching rows; a set that differs only by pages whose reference
    scores tie the k-th best within fp32 summation error is noted, not counted."""
    from .backends.reference import select_pages_ref

    b, kmax, kmin, cap = _decode_setup(c, name)
    hkv = b.hc.size
    sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    cnt = np.full((b.num_slots, hkv), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, kmax, kmin, cap=cap)
    c.ops.select_pages(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan))
    got_sel, got_cnt = cache.sel_idx[0].get(), cache.sel_cnt[0].get()
    hard, near = _selection_mismatches(b, kmax, kmin, got_sel, got_cnt, sel, cnt)
    pattern = "".join(str(int(x)) for x in b.hc)
    tag = f"{name} {pattern} Hq{b.q.shape[1]} D{b.q.shape[2]} p{b.plan.page_size}"
    note = "abs = mismatching rows" + (f"; {near} near-tie swaps" if near else "")
    return Result("page_select", tag, hard, 0.0, hard == 0, note)


def _selection_mismatches(b: SparseBatch, kmax, kmin, sel_g, cnt_g, sel_r, cnt_r) -> tuple[int, int]:
    """(rows that differ, rows that differ only by near-ties) between a GPU and a reference selection."""
    from .sparse.selector import page_scores

    plan = b.plan
    qb_of_slot = {int(plan.qb_slot[qb]): qb for qb in range(plan.num_qblocks)}
    hard = near = 0
    for s in range(sel_r.shape[0]):
        for g in range(sel_r.shape[1]):
            k = int(cnt_r[s, g])
            tail = max(k, 0)  # entries past the count: left as they were (poison) on both sides
            if int(cnt_g[s, g]) != k or not np.array_equal(sel_g[s, g, tail:], sel_r[s, g, tail:]):
                hard += 1
                continue
            got, want = set(sel_g[s, g, : max(k, 0)].tolist()), set(sel_r[s, g, : max(k, 0)].tolist())
            if got == want:
                continue
            if len(got) != k or b.hc[g] != 0 or s not in qb_of_slot:
                hard += 1
                continue
            qb = qb_of_slot[s]
            table, _ = plan.pages(qb, 0)
            group = b.q.shape[1] // b.hc.size
            qg = b.q[plan.qb_start[qb]].reshape(b.hc.size, group, -1)[g]
            st = (kmax[:, b.slot[g] : b.slot[g] + 1], kmin[:, b.slot[g] : b.slot[g] + 1])
            scores = page_scores(qg, *st, table, int(plan.qb_pos[qb]) + 1, group, plan.page_size)[0, :-1]
            kth = np.sort(scores)[::-1][k - 2]
            swapped = np.asarray(sorted(got ^ want))
            tol = 1e-4 * max(1.0, abs(kth))
            if swapped.max() < scores.size and np.all(np.abs(scores[swapped] - kth) <= tol):
                near += 1
            else:
                hard += 1
    return hard, near


def case_sparse_attention(c: Ctx) -> list[Result]:
    out = [sparse_prefill_one(c, n) for n in SPARSE_PREFILL]
    return out + [sparse_decode_one(c, n) for n in SPARSE_DECODE] + [sparse_mixed_one(c)]


def case_page_select(c: Ctx) -> list[Result]:
    return [page_select_one(c, n) for n in SPARSE_DECODE]


ROPE_SPARSE = {
    # name: (head classes, query heads per KV head, D, page, sub_pages)
    "mixed": ("0110", 2, 64, 16, 4),
    "no_streaming": ("00", 2, 64, 16, 2),
    "no_dense": ("111", 2, 64, 16, 4),
    "one_dense_sub1": ("1000", 2, 64, 16, 1),
    "gqa3_d128_p64": ("01011", 3, 128, 64, 8),
}


def rope_write_kv_sparse_one(c: Ctx, name: str) -> list[Result]:
    """CudaOps.rope_write_kv on an LServe cache (kernel rope_write_kv_sparse: RoPE, K/V into the pool of each
    KV head's class, fused page statistics) vs rope_write_kv_sparse_ref. Three sequences (a chunk appended at
    an unaligned position, a fresh prompt, a decode row at an unaligned position) and two padding rows (slots
    -1); the pools NaN-poisoned except the sequences' earlier tokens (the statistics read them back), the
    statistics and q NaN-poisoned."""
    from .backends.base import KVCache
    from .backends.reference import rope_write_kv_sparse_ref

    pattern, gsize, d, ps, sub = ROPE_SPARSE[name]
    hc, slot = head_classes(pattern)
    hkv = hc.size
    hq, nd, ns = gsize * hkv, int((hc == 0).sum()), int((hc == 1).sum())
    starts, lens, pad = [37, 0, 203], [45, 20, 1], 2
    n_live = sum(lens)
    need = [-(-(s + m) // ps) for s, m in zip(starts, lens, strict=True)]
    n_pages, n_spages = sum(need) + 5, -(-n_live // ps) + 3
    perm, offs = c.rng.permutation(n_pages), np.cumsum([0, *need])
    tables = [perm[offs[i] : offs[i + 1]] for i in range(len(lens))]

    def slot_of(t, p):
        return t[p // ps] * ps + p % ps

    spans = [np.arange(s, s + m) for s, m in zip(starts, lens, strict=True)]
    pos = np.concatenate([*spans, c.rng.integers(0, max(starts), pad)]).astype(np.int64)
    n = pos.size
    live = np.arange(n) < n_live
    dslots, sslots = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    dslots[live] = np.concatenate([slot_of(t, p) for t, p in zip(tables, spans, strict=True)])
    sslots[live] = c.rng.permutation(n_spages * ps)[:n_live]
    qkv = c.f16(n, (hq + 2 * hkv) * d)
    cos, sin = c.f16(256, d // 2), c.f16(256, d // 2)
    pools = [np.full((n_pages, nd, ps, d), np.nan, np.float32) for _ in "kv"]
    pools += [np.full((n_spages, ns, ps, d), np.nan, np.float32) for _ in "kv"]
    hist = np.concatenate([slot_of(t, np.arange(s)) for t, s in zip(tables, starts, strict=True)])
    for pool in pools[:2]:  # the sequences' earlier tokens (dense pool): random
        pool[hist // ps, :, hist % ps] = c.f16(hist.size, nd, d)
    stats = [np.full((n_pages, nd, sub, d), np.nan, np.float32) for _ in "xn"]
    dev = [c.dev16(a) for a in pools + stats]
    want = [a.copy() for a in pools + stats]
    rope_write_kv_sparse_ref(
        qkv[live], pos[live], dslots[live], sslots[live], *want[:4], hc, slot, cos, sin, *want[4:]
    )
    q_ref = rope_write_kv_sparse_ref(  # q of every row, padding included (its K/V writes are thrown away)
        qkv, pos, np.maximum(dslots, 0), np.maximum(sslots, 0), *[a.copy() for a in pools], hc, slot, cos, sin
    )
    cp = c.cp
    cache = KVCache(
        k=[dev[0]], v=[dev[1]], page_size=ps, num_pages=n_pages, ks=[dev[2]], vs=[dev[3]],
        head_class=[cp.asarray(hc)], head_slot=[cp.asarray(slot)], kmax=[dev[4]], kmin=[dev[5]],
    )  # fmt: skip
    q = c.poison((n, hq, d), np.float16)
    slots = cp.asarray(np.stack([dslots, sslots]))
    c.ops.rope_write_kv(c.dev16(qkv), cp.asarray(pos), slots, cache, 0, (c.dev16(cos), c.dev16(sin)), out=q)
    tag = f"{name} {pattern} Hq{hq} D{d} p{ps} sub{sub} N{n}"
    out = [compare("rope_write_kv_sparse.q", tag, q.get(), q_ref, 2e-3, 4e-3)]
    rot, exact = (2e-3, 4e-3), (0.0, 0.0)  # rotated keys and their statistics; values are copied
    names = ("k dense", "v dense", "k stream", "v stream", "kmax", "kmin")
    tols = (rot, exact, rot, exact, rot, rot)
    for what, got, ref, tol in zip(names, dev, want, tols, strict=True):
        if ref.size:  # a pool without heads (layer with no dense / no streaming heads) has nothing to check
            out.append(compare(f"rope_write_kv_sparse.{what}", tag, got.get(), ref, *tol))
    return out


def case_rope_write_kv_sparse(c: Ctx) -> list[Result]:
    return [r for n in ROPE_SPARSE for r in rope_write_kv_sparse_one(c, n)]


CASES: dict[str, Callable[[Ctx], list[Result]]] = {
    "embed": case_embed,
    "add_rmsnorm": case_add_rmsnorm,
    "rope_write_kv": case_rope_write_kv,
    "silu_mul": case_silu_mul,
    "linear": case_linear,
    "logits": case_logits,
    "sampling": case_sampling,
    "attention": case_attention,
    "sparse_attention": case_sparse_attention,
    "page_select": case_page_select,
    "rope_write_kv_sparse": case_rope_write_kv_sparse,
}


def run_cases(names=None, seed: int | None = None) -> list[Result]:
    """Run the named cases (all by default); a case that raises becomes one failed row."""
    c = Ctx(int(time.time_ns() % (1 << 31)) if seed is None else seed)
    results = []
    for name in names or CASES:
        try:
            results.extend(CASES[name](c))
        except Exception as e:  # a crash is a failure of that kernel, not of the harness
            results.append(Result(name, "-", math.inf, math.inf, False, f"{type(e).__name__}: {e}"[:200]))
    return results


def format_table(results: list[Result]) -> str:
    rows = [f"{'kernel':34s} {'shape':44s} {'max abs':>10s} {'rel':>10s}  result"]
    for r in results:
        rows.append(
            f"{r.kernel:34s} {r.shape[:44]:44s} {r.max_abs:10.3g} {r.rel:10.3g}  {'PASS' if r.ok else 'FAIL'}"
            + (f"  ({r.note})" if r.note else "")
        )
    fails = sum(not r.ok for r in results)
    rows.append(f"{len(results) - fails} passed, {fails} failed")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lserve-lite kernels test", description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    argv = list(argv or [])
    if argv[:1] == ["test"]:  # `lserve-lite kernels test [cases]`
        argv = argv[1:]
    args = ap.parse_args(argv)
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if not cuda_available():
        print("kernels test: no NVIDIA GPU visible to CuPy; nothing to run (the CPU backend needs none).")
        return 0
    results = run_cases(args.cases or None, args.seed)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
