"""Programmatic dependent launch on the GPU (gpu-marked; backends/cuda_launch.py, kernels/pdl.cuh): a captured
chain of dependent kernels, each launched while the one before it still runs, gives the eager chain's bits.

The chain is a decode layer stack's shape (add + RMSNorm -> GEMV -> SiLU-and-multiply -> GEMV, then the logits
GEMV and greedy sampling): every kernel reads what the previous one wrote, so a kernel that read before its
pdl_enter() would see stale or half-written data; several inputs are replayed through one graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.weights.quantize import quantize_int4, quantize_int8

pytestmark = pytest.mark.gpu

HIDDEN, INTER, VOCAB, LAYERS = 1024, 2816, 5000, 12


@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_captured_chain_with_pdl_equals_eager(weights: str):
    cp = pytest.importorskip("cupy")
    from lserve_lite.backends.cuda import CudaOps

    ops = CudaOps()
    assert ops.k["add_rmsnorm<true, true>"].pdl, "LSERVE_PDL=auto should enable PDL on this sm_90+ device"
    rng = np.random.default_rng()
    pack = {"fp16": lambda a: a, "int8": quantize_int8, "int4": quantize_int4}[weights]

    def mat(m: int, k: int):
        return ops.upload(pack((rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)))

    ln = [ops.upload(1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32)) for _ in range(LAYERS + 1)]
    gate_up = [mat(2 * INTER, HIDDEN) for _ in range(LAYERS)]
    down = [mat(HIDDEN, INTER) for _ in range(LAYERS)]
    head = mat(VOCAB, HIDDEN)

    def chain(x):
        res = None
        for i in range(LAYERS):
            h, res = ops.add_rmsnorm(x, res, ln[i], 1e-5)
            x = ops.linear(ops.silu_mul(ops.linear(h, gate_up[i])), down[i])
        h, _ = ops.add_rmsnorm(x, res, ln[LAYERS], 1e-5)
        logits = ops.logits(h, head)
        return logits, cp.argmax(logits, axis=-1)

    x_in = cp.empty((2, HIDDEN), cp.float16)
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        x_in.set(rng.standard_normal((2, HIDDEN)).astype(np.float16), stream=stream)
        chain(x_in)  # warm-up: compiles, sizes the pool
        stream.synchronize()
        stream.begin_capture()
        try:
            out, tok = chain(x_in)
        finally:
            graph = stream.end_capture()
        for _ in range(4):
            x = rng.standard_normal((2, HIDDEN)).astype(np.float16)
            x_in.set(x, stream=stream)
            out.fill(np.nan)
            graph.launch(stream=stream)
            got, got_tok = out.get(stream=stream), tok.get(stream=stream)
            ref, ref_tok = chain(cp.asarray(x))
            assert np.array_equal(got, ref.get(stream=stream)), (
                "PDL graph replay differs from the eager chain"
            )
            assert np.array_equal(got_tok, ref_tok.get(stream=stream))
