"""Paged block-sparse attention kernels (kernels/attention_*.cu) against cpu.paged_attention_ref.

The NVRTC compile check runs everywhere (CI has no GPU); the rest is marked `gpu` and skipped without one.
Inputs are fresh random fp16 values (never zeros), outputs are NaN-poisoned before each launch. Prefill tests run
under each prefill kernel (the `prefill_kernel` fixture of conftest.py: mma.sync, and wgmma on 9.x devices).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from lserve_lite.backends import cuda_available
from lserve_lite.backends.reference.attention import paged_attention_ref
from lserve_lite.sparse.plan import BatchLayout, build_plan

# ---------------------------------------------------------------------------------------------- helpers


def make_case(
    rng,
    q_lens,
    prefix_lens,
    hq,
    hkv,
    d,
    page_size,
    q_block=64,
    sink=0,
    local=0,
    head_class=None,
    spare_pages=7,
):
    """Random paged KV (shuffled physical pages), random q, the plan, and the float32 reference."""
    ctx_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
    need = [-(-c // page_size) for c in ctx_lens]
    num_pages = sum(need) + spare_pages
    perm = rng.permutation(num_pages)
    tables, o = [], 0
    for n in need:
        tables.append([int(x) for x in perm[o : o + n]])
        o += n
    plan = build_plan(BatchLayout(list(q_lens), ctx_lens, tables), page_size, q_block, sink, local)
    k = rng.standard_normal((num_pages, hkv, page_size, d)).astype(np.float16)
    v = rng.standard_normal((num_pages, hkv, page_size, d)).astype(np.float16)
    q = rng.standard_normal((plan.num_tokens, hq, d)).astype(np.float16)
    hc = np.zeros(hkv, np.int32) if head_class is None else np.asarray(head_class, np.int32)
    ref = paged_attention_ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), plan, hc)
    return q, k, v, plan, hc, ref


def run_gpu(
    q, k, v, plan, hc, decode=None, cuda_plan=None, num_splits=None, min_units=None, misaligned=False
):
    """`misaligned`: an output 2 bytes off an 8-byte boundary, which the decode kernel never writes itself (every
    row through the combine)."""
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention

    cplan = cuda_plan.update(plan) if cuda_plan is not None else CudaPlan.from_plan(plan)
    size = q.shape[0] * q.shape[1] * q.shape[2]
    out = cp.full(size + 4, np.nan, dtype=np.float16)[1 if misaligned else 0 :][:size].reshape(q.shape[0], -1)
    res = paged_attention(
        cp.asarray(q), cp.asarray(k), cp.asarray(v), cplan, cp.asarray(hc), out=out, decode=decode,
        num_splits=num_splits, min_units=min_units,
    )  # fmt: skip
    assert res is out
    return cp.asnumpy(out).astype(np.float32)


def check(out, ref, atol=2e-3, rtol=5e-3):
    assert not np.isnan(out).any(), f"{np.isnan(out).sum()} outputs unwritten or NaN"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 2e-3, f"relative error {rel:.2e}"
    np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- GPU tests

PREFILL_CASES = {
    # name: (q_lens, prefix_lens, hq, hkv, d, page_size, q_block, sink, local, head_class)
    "single_200_g4_d128": ([200], [0], 8, 2, 128, 64, 64, 0, 0, None),
    "ragged_batch_g3_d64_p16": (
        [1, 7, 63, 64, 65, 200],
        [0, 5, 100, 0, 31, 333],
        6,
        2,
        64,
        16,
        64,
        0,
        0,
        None,
    ),
    "chunked_g1_d128_p32_qb128": ([100, 130], [1000, 77], 4, 4, 128, 32, 128, 0, 0, None),
    "p128_g4_d64": ([150], [260], 8, 2, 64, 128, 64, 0, 0, None),
    "qblock256_g1_d128": ([300], [40], 2, 2, 128, 64, 256, 0, 0, None),
    "qblock16_g4_d128": ([50, 9], [70, 0], 8, 2, 128, 16, 16, 0, 0, None),
    "streaming_mixed_d128_p16": ([700], [300], 8, 4, 128, 16, 64, 64, 256, [0, 1, 0, 1]),
    "streaming_mixed_g3_d64_p64": ([129, 64], [1100, 200], 6, 2, 64, 64, 64, 128, 384, [1, 0]),
    "streaming_only_g4_d128": ([260], [2000], 8, 2, 128, 64, 128, 64, 192, [1, 1]),
    # Shapes for the wgmma kernel's tile variants: one warpgroup (64 rows: q_len * group < 128), deep tile
    # loops, odd lengths everywhere, 32-token pages, all heads streaming at d64.
    "one_wg_g1_d64_p32": ([37, 5, 61], [0, 1000, 200], 3, 3, 64, 32, 64, 0, 0, None),
    "one_wg_g1_d128_odd": ([63, 1, 3], [4001, 77, 0], 2, 2, 128, 16, 64, 0, 0, None),
    "deep_g4_d128_p64": ([1500], [2600], 8, 2, 128, 64, 128, 0, 0, None),
    "streaming_only_g2_d64_p32": ([333], [1500], 4, 2, 64, 32, 64, 32, 160, [1, 1]),
}


def _assert_kernel_ran(prefill_kernel: str) -> None:
    """The kernel the fixture asked for is the one launched (its entry point was fetched)."""
    from lserve_lite.backends import cuda_attention as att

    names = att._kernels()._fns
    prefix = {"wgmma": "paged_attn_prefill_sm90_", "ws": "paged_attn_prefill_ws_"}.get(prefill_kernel)
    if prefix:
        assert any(n.startswith(prefix) for n in names), sorted(names)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_matches_reference(name, prefill_kernel):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q_lens, prefix, hq, hkv, d, ps, qb, sink, local, hc = PREFILL_CASES[name]
    q, k, v, plan, hcl, ref = make_case(rng, q_lens, prefix, hq, hkv, d, ps, qb, sink, local, hc)
    out = run_gpu(q, k, v, plan, hcl)
    check(out, ref)
    _assert_kernel_ran(prefill_kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["batch2_g3_d64_p16", "streaming_mixed", "batch3_g1_d128_p128"])
def test_one_row_plans_on_the_prefill_kernel(name, prefill_kernel):
    """Decode-shaped plans (one row per query block, long lists) through the prefill kernel."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    ctx, hq, hkv, d, ps, sink, local, hc = DECODE_CASES[name]
    q, k, v, plan, hcl, ref = make_case(
        rng, [1] * len(ctx), [c - 1 for c in ctx], hq, hkv, d, ps, 64, sink or 0, local or 0, hc
    )
    check(run_gpu(q, k, v, plan, hcl, decode=False), ref)


DECODE_CASES = {
    # name: (ctx_lens, hq, hkv, d, page_size, sink, local, head_class)
    "batch4_llama_shape": ([1, 17, 3000, 5000], 32, 8, 128, 64, None, None, None),
    "batch2_g3_d64_p16": ([100, 2049], 6, 2, 64, 16, None, None, None),
    "batch3_g1_d128_p128": ([129, 7, 4000], 4, 4, 128, 128, None, None, None),
    "streaming_mixed": ([4000, 300], 8, 4, 128, 64, 128, 256, [0, 1, 1, 0]),
    "group20_two_head_tiles": ([900], 40, 2, 64, 32, None, None, None),
    "long_16k_g4": ([16384 + 5], 8, 2, 128, 64, None, None, None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_reference(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    ctx, hq, hkv, d, ps, sink, local, hc = DECODE_CASES[name]
    q, k, v, plan, hcl, ref = make_case(
        rng, [1] * len(ctx), [c - 1 for c in ctx], hq, hkv, d, ps, 64, sink or 0, local or 0, hc
    )
    check(run_gpu(q, k, v, plan, hcl), ref)
    # The prefill kernel executes the same one-row plan too.
    check(run_gpu(q, k, v, plan, hcl, decode=False), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("min_units", [1, 4])
@pytest.mark.parametrize("splits", [1, 3, 40, 70])
@pytest.mark.parametrize("name", ["batch4_llama_shape", "streaming_mixed", "group20_two_head_tiles"])
def test_decode_split_counts(name, splits, min_units, misaligned):
    """Forced grids of 1 split (the decode kernel writes the output itself, no combine), 3, 40 and 70 (more
    partials than the combine's warps fold in one batch of loads; 5000 keys at min_units 1 use all 70), of which
    each list uses as many as it has min_units units a warp for: in one launch, rows whose single live CTA writes
    the output (part_live 0, the combine leaves them) beside rows the combine merges; a misaligned output sends
    every row through the combine (single live partials included)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()) + splits)
    ctx, hq, hkv, d, ps, sink, local, hc = DECODE_CASES[name]
    q, k, v, plan, hcl, ref = make_case(
        rng, [1] * len(ctx), [c - 1 for c in ctx], hq, hkv, d, ps, 64, sink or 0, local or 0, hc
    )
    got = run_gpu(
        q, k, v, plan, hcl, decode=True, num_splits=splits, min_units=min_units, misaligned=misaligned
    )
    check(got, ref)


@pytest.mark.gpu
def test_decode_cuda_graph_replays_new_plans():
    """Capture one decode step; replay it after updating the plan in place (different contexts, pages)."""
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention

    rng = np.random.default_rng(7)
    hq, hkv, d, ps = 16, 4, 128, 64
    num_pages = 400
    k = rng.standard_normal((num_pages, hkv, ps, d)).astype(np.float16)
    v = rng.standard_normal((num_pages, hkv, ps, d)).astype(np.float16)
    kd, vd = cp.asarray(k), cp.asarray(v)
    hc = cp.asarray(np.zeros(hkv, np.int32))
    cplan = CudaPlan(max_qblocks=3, max_pages=num_pages)
    qd = cp.empty((3, hq, d), np.float16)
    out = cp.empty((3, hq * d), np.float16)
    cp.cuda.Device().synchronize()  # made on the null stream; everything below runs on `stream`

    def random_step(ctx_lens):
        perm = rng.permutation(num_pages)
        tables, o = [], 0
        for c in ctx_lens:
            n = -(-c // ps)
            tables.append([int(x) for x in perm[o : o + n]])
            o += n
        plan = build_plan(BatchLayout([1] * len(ctx_lens), ctx_lens, tables), ps)
        q = rng.standard_normal((len(ctx_lens), hq, d)).astype(np.float16)
        ref = paged_attention_ref(
            q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), plan, np.zeros(hkv, np.int32)
        )
        return plan, q, ref

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        plan, q, ref = random_step([500, 6000, 33])
        cplan.update(plan)
        qd.set(q)
        paged_attention(qd, kd, vd, cplan, hc, out=out, decode=True)  # warm-up: compile, workspace
        stream.synchronize()
        check(cp.asnumpy(out).astype(np.float32), ref)
        stream.begin_capture()
        paged_attention(qd, kd, vd, cplan, hc, out=out, decode=True)
        graph = stream.end_capture()
        for ctx in ([9000, 1, 64], [65, 12000, 2500], [7, 8]):
            plan, q, ref = random_step(ctx)
            cplan.update(plan)
            qd[: len(ctx)].set(q)
            out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            check(cp.asnumpy(out[: len(ctx)]).astype(np.float32), ref)


@pytest.mark.gpu
def test_cuda_available_for_gpu_tests():
    assert cuda_available()
