"""The residual add + RMSNorm in the decode o / down GEMVs' epilogue (CudaOps.linear_add_rmsnorm: gemv_rows /
quant_gemv_split with EPI_ADD_NORM, kernels/gemv_epilogue.cuh) against the unfused linear + add_rmsnorm on the
same device weight (gpu-marked; skipped without a GPU). The float64 rows are the harness's
(`lserve-lite kernels test linear_add_rmsnorm`, run by tests/test_gpu_ops.py).

The residual must be bit-identical (the same fp16-rounded products added in float32); h may differ by the order
of the sum of squares (one fp16 step at most). The "last block" ticket counter must be back at 0 after every
launch: two eager launches in a row, then a chain of fused launches captured in a CUDA Graph (with programmatic
dependent launch on sm_90+) replayed twice, each giving the eager chain's bits.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

K, HIDDEN, EPS = 512, 1037, 1e-5


@pytest.fixture(scope="module")
def ops():
    pytest.importorskip("cupy")
    from lserve_lite.backends import cuda_available

    if not cuda_available():
        pytest.skip("no GPU")
    from lserve_lite.backends.cuda import CudaOps

    ops = CudaOps()
    assert ops.fuse_norm, "LSERVE_CUDA_FUSE_NORM=0 in the environment: nothing fused to test"
    return ops


def _weight(ops, fmt: str, m: int, k: int, rng):
    from lserve_lite.backends.cuda_quant import DeviceQuant
    from lserve_lite.harness.quant import random_quant
    from lserve_lite.weights.quantize import quantize_int4, quantize_int8

    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    if fmt in ("int8", "int4"):
        w = (quantize_int8 if fmt == "int8" else quantize_int4)(w)
    elif fmt != "f16":
        w = random_quant(fmt, m, k, rng)
    dw = ops.upload(w)
    if fmt != "f16":
        assert isinstance(dw, DeviceQuant) and dw.split is not None  # the fused path
    return dw


def _inputs(ops, n: int, k: int, m: int, rng):
    cp = ops.cp
    x = cp.asarray((rng.standard_normal((n, k)) * 0.5).astype(np.float16))
    res0 = (rng.standard_normal((n, m)) * 2).astype(np.float32)
    ln = ops.upload((1 + 0.3 * rng.standard_normal(m)).astype(np.float32))
    return x, res0, ln


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("fmt", ["f16", "int8", "int4", "q4_1", "q8_0"])
def test_fused_matches_unfused_twice(ops, fmt, n):
    cp = ops.cp
    rng = np.random.default_rng(n * 31 + len(fmt))
    dw = _weight(ops, fmt, HIDDEN, K, rng)
    x, res0, ln = _inputs(ops, n, K, HIDDEN, rng)
    if fmt == "f16":
        assert ops.gemm_path(n, K) == "gemv"
    res_u = cp.asarray(res0)
    h_u, res_u = ops.add_rmsnorm(ops.linear(x, dw), res_u, ln, EPS)
    h_u, res_u = cp.asnumpy(h_u).astype(np.float64), cp.asnumpy(res_u)
    runs = []
    for _ in range(2):  # the second launch needs the counter the first one reset
        res = cp.asarray(res0)
        out = cp.full((n, HIDDEN), np.nan, cp.float16)
        h, r = ops.linear_add_rmsnorm(x, dw, res, ln, EPS, out=out)
        assert h is out and r is res  # in place
        assert int(ops.norm_counter.get()[0]) == 0
        runs.append((cp.asnumpy(h), cp.asnumpy(r)))
    for h, r in runs:
        assert np.isfinite(h).all()
        assert np.array_equal(r, res_u), "the residual must be bit-identical to the unfused path's"
        err = np.abs(h.astype(np.float64) - h_u)
        tol = 2.0**-10 * np.maximum(np.abs(h_u), np.abs(h.astype(np.float64))) + 2.0**-24
        assert np.all(err <= tol), f"max err / tol {float((err / tol).max()):.3g}"
    assert np.array_equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("fmt", ["f16", "int4"])
def test_fused_chain_in_a_cuda_graph(ops, fmt):
    """o-style and down-style fused launches back to back (each reading the h the previous one wrote), with a
    SiLU-and-multiply GEMV between them, captured once and replayed twice on fresh inputs: each replay gives
    the eager chain's bits and leaves the counter at 0."""
    cp = ops.cp
    rng = np.random.default_rng(7)
    n, layers, inter, hidden = 3, 3, 768, 1024  # hidden is the next GEMV's K: a multiple of 8 (and of 128)
    o = [_weight(ops, fmt, hidden, hidden, rng) for _ in range(layers)]
    gu = [_weight(ops, fmt, 2 * inter, hidden, rng) for _ in range(layers)]
    down = [_weight(ops, fmt, hidden, inter, rng) for _ in range(layers)]
    ln = [ops.upload((1 + 0.3 * rng.standard_normal(hidden)).astype(np.float32)) for _ in range(2 * layers)]
    h_in = cp.empty((n, hidden), cp.float16)
    res = cp.empty((n, hidden), cp.float32)

    def chain():
        h, r = h_in, res
        for i in range(layers):
            h, r = ops.linear_add_rmsnorm(h, o[i], r, ln[2 * i], EPS)
            h, r = ops.linear_add_rmsnorm(ops.gate_up_silu(h, gu[i]), down[i], r, ln[2 * i + 1], EPS)
        return h

    def inputs():
        hx = (rng.standard_normal((n, hidden)) * 0.5).astype(np.float16)
        return hx, rng.standard_normal((n, hidden)).astype(np.float32)

    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        chain()  # warm-up: compiles, sizes the pool
        stream.synchronize()
        stream.begin_capture()
        try:
            out = chain()
        finally:
            graph = stream.end_capture()
        for _ in range(2):
            hx, rx = inputs()
            h_in.set(hx, stream=stream)
            res.set(rx, stream=stream)
            graph.launch(stream=stream)
            stream.synchronize()
            got_h, got_r = cp.asnumpy(out), cp.asnumpy(res)
            assert int(ops.norm_counter.get()[0]) == 0
            h_in.set(hx, stream=stream)
            res.set(rx, stream=stream)
            want_h = cp.asnumpy(chain())
            stream.synchronize()
            assert int(ops.norm_counter.get()[0]) == 0
            assert np.isfinite(got_h).all()
            assert np.array_equal(got_h, want_h) and np.array_equal(got_r, cp.asnumpy(res))
