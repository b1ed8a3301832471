"""bf16 prefill on the Hopper wgmma kernel (kernels/attention_prefill_sm90.cu with lskv::BHalf): queries, caches and
output in bf16, against the float32 reference over the same bf16-rounded inputs; NaN-poisoned outputs. The host-side
bf16 rounding (harness.common.bf16_bits) is checked against torch's, an independent implementation, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends import cuda_available
from lserve_lite.harness.common import BF16_NAN, bf16_bits, bf16_values


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * np.float32(10.0) ** rng.integers(-6, 6, 4096),
        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.0e38, -1e-40], np.float32),  # ties to even, subnormal
    ])  # fmt: skip
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(x), want)
    np.testing.assert_array_equal(
        bf16_values(want), torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy()
    )


# (q_lens, ctx_lens, hq, hkv, d, page, sink, local, streaming heads): ragged blocks, chunked prefill over cached
# pages, GQA, one / two warpgroups, 16 / 32 / 64-token pages, streaming heads (dense mode's per-head windows).
CASES = [
    ([37, 200, 5], [37, 533, 1005], 4, 4, 64, 16, 0, 0, 0),
    ([700], [1000], 8, 2, 128, 64, 0, 0, 0),
    ([50, 3], [120, 3], 2, 2, 128, 32, 0, 0, 0),
    ([129, 64], [1229, 264], 6, 2, 64, 64, 128, 384, 1),
    ([300], [1200], 8, 4, 128, 16, 64, 256, 2),
]


def _hopper() -> bool:
    import cupy as cp

    return cp.cuda.Device().compute_capability.startswith("9")


def _run(q_lens, ctx_lens, hq, hkv, d, page, sink, local, n_stream, seed):
    import cupy as cp

    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.reference.attention import paged_attention_ref
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    rng = np.random.default_rng(seed)
    need = [-(-t // page) for t in ctx_lens]
    perm = rng.permutation(sum(need) + 5)
    tables, o = [], 0
    for n in need:
        tables.append([int(x) for x in perm[o : o + n]])
        o += n
    k = bf16_bits(rng.standard_normal((perm.size, hkv, page, d)))
    v = bf16_bits(rng.standard_normal((perm.size, hkv, page, d)))
    q = bf16_bits(rng.standard_normal((sum(q_lens), hq, d)))
    hc = np.zeros(hkv, np.int32)
    hc[rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, 64, sink, local)
    ref = paged_attention_ref(bf16_values(q), bf16_values(k), bf16_values(v), plan, hc)
    out = cp.full((sum(q_lens), hq * d), BF16_NAN, np.uint16)
    att.paged_attention(
        cp.asarray(q), cp.asarray(k), cp.asarray(v), att.CudaPlan.from_plan(plan), cp.asarray(hc), out=out,
        decode=False, kv="bf16",
    )  # fmt: skip
    return bf16_values(cp.asnumpy(out)), ref, (q, k, v, plan, hc)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bf16_prefill_matches_reference(case):
    if not cuda_available() or not _hopper():
        pytest.skip("bf16 prefill runs on compute capability 9.x only")
    got, ref, _ = _run(*CASES[case], seed=case)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs unwritten or NaN"
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 6e-3, f"relative error {rel:.2e}"  # bf16 P and output: 8 significant bits
    np.testing.assert_allclose(got, ref, atol=1e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_bf16_is_refused_where_it_does_not_run():
    if not cuda_available():
        pytest.skip("no CUDA device")
    import cupy as cp

    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.harness.common import setting

    _, _, (q, k, v, plan, hc) = _run(*CASES[0], seed=0) if _hopper() else (None, None, (None,) * 5)
    if q is None:
        with pytest.raises(ValueError, match="bf16"):
            att.prefill_kernel_for(64, "bf16", cp.cuda.Device().compute_capability)
        return
    args = (cp.asarray(q), cp.asarray(k), cp.asarray(v), att.CudaPlan.from_plan(plan), cp.asarray(hc))
    with pytest.raises(ValueError, match="decode"):
        att.paged_attention(*args, decode=True, kv="bf16")
    with setting(att, "PREFILL_KERNEL", "mma"), pytest.raises(ValueError, match="wgmma"):
        att.paged_attention(*args, decode=False, kv="bf16")
    with pytest.raises(ValueError, match="out must be"):
        att.paged_attention(
            *args, decode=False, kv="bf16", out=cp.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float16)
        )
