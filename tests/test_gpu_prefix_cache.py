"""Prefix caching on the CUDA backend (gpu-marked; skipped without a GPU).

- `CudaOps.copy_stream_pages` equals the CPU one on random pools, overlapping source and destination pages;
- `CudaOps.clear_pages` equals the CPU one on random pools of every kind (values, scales, statistics; a pool
  without heads), pages listed twice included;
- a tiny LServe engine (streaming heads, page selection, decode CUDA Graphs) gives the same greedy outputs
  with the cache as without it for a conversation and requests sharing a system prompt (fp16: a near tie
  may flip under another chunking, so >= 80% of the requests identical, as tests/test_gpu_e2e.py), with
  the cache attaching the shared pages, and no page held at the end.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_copy_stream_pages_matches_cpu():
    from lserve_lite.backends.base import KVCache
    from lserve_lite.backends.cpu import CpuOps
    from lserve_lite.backends.cuda import CudaOps

    gpu, rng = CudaOps(), np.random.default_rng(0)
    pools = [rng.standard_normal((12, n, 16, 64)).astype(np.float16) for n in (1, 0, 2)]
    src, dst = np.array([3, 4, 5, 9]), np.array([4, 5, 11, 3])  # overlapping: the gather comes first

    def cache(arrays):
        return KVCache(k=[], v=[], page_size=16, num_pages=0, ks=arrays[:3], vs=arrays[3:])

    host = cache([p.copy() for p in pools + pools])
    dev = cache([gpu.cp.asarray(p) for p in pools + pools])
    CpuOps.copy_stream_pages(None, host, src, dst)
    gpu.copy_stream_pages(dev, src, dst)
    for h, d in zip(host.ks + host.vs, dev.ks + dev.vs, strict=True):
        np.testing.assert_array_equal(h, gpu.cp.asnumpy(d))
    np.testing.assert_array_equal(host.ks[0][4], pools[0][3])


def test_clear_pages_matches_cpu():
    from lserve_lite.backends.base import KVCache
    from lserve_lite.backends.cpu import CpuOps
    from lserve_lite.backends.cuda import CudaOps

    gpu, rng = CudaOps(), np.random.default_rng()
    shapes = [(12, 2, 16, 64), (12, 0, 16, 64), (12, 3, 16, 2), (12, 1, 4, 128), (12, 2, 16, 32)]
    dense = [rng.standard_normal(s).astype(np.float16) for s in shapes[:4]]
    dense.append(rng.integers(0, 255, shapes[4], dtype=np.uint8))  # int4 values: two a byte
    stream = [rng.standard_normal((7, 1, 16, 64)).astype(np.float16) for _ in range(2)]
    pages, stream_pages = np.array([5, 0, 11, 5]), np.array([6])

    def cache(d, s):
        return KVCache(k=d[:2], v=d[4:], page_size=16, num_pages=12, ks=s[:1], vs=s[1:], k_scale=d[2:3],
                       v_scale=[], kmax=d[3:4], kmin=[])  # fmt: skip

    host = cache([a.copy() for a in dense], [a.copy() for a in stream])
    dev = cache([gpu.cp.asarray(a) for a in dense], [gpu.cp.asarray(a) for a in stream])
    CpuOps.clear_pages(None, host, pages, stream_pages)
    gpu.clear_pages(dev, pages, stream_pages)
    for h, d in zip(
        host.dense_pools() + host.stream_pools(), dev.dense_pools() + dev.stream_pools(), strict=True
    ):
        np.testing.assert_array_equal(h, gpu.cp.asnumpy(d))
    assert not host.k[0][[0, 5, 11]].any() and host.k[0][1].all() and not host.ks[0][6].any()


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    from tiny_models import make_tiny

    p = make_tiny(tmp_path_factory.mktemp("tiny64_pc"), hidden_size=256, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")  # one streaming KV head per layer
    return p


def _engine(path, cache: bool):
    from lserve_lite import EngineConfig, SparseConfig
    from lserve_lite.engine.llm_engine import LLMEngine

    sp = SparseConfig(enabled=True, page_size=16, sub_pages=4, prefill_sink=32, prefill_local=128,
                      decode_sink=32, decode_local=64, token_budget=128, select_interval=3)  # fmt: skip
    cfg = EngineConfig(page_size=16, max_num_batched_tokens=64, max_num_seqs=4, num_kv_pages=256, sparse=sp,
                       prefix_caching=cache)  # fmt: skip
    return LLMEngine(str(path), backend="cuda", config=cfg)


def _run(eng, prompts) -> list[tuple[list[int], int]]:
    from lserve_lite import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in prompts]
    done = {}
    while eng.has_unfinished():
        done |= {
            o.request_id: (list(o.seq.output_ids), o.num_cached_tokens) for o in eng.step() if o.finished
        }
    return [done[r] for r in rids]


def test_lserve_outputs_with_cache_equal_cold(tiny64):
    rng = np.random.default_rng(1)
    system = [int(t) for t in rng.integers(3, 300, 300)]
    prompts = [system + [int(t) for t in rng.integers(3, 300, int(rng.integers(2, 30)))] for _ in range(8)]
    eng = _engine(tiny64, cache=True)
    got = _run(eng, prompts[:1]) + _run(eng, prompts[1:])
    turn = prompts[0] + got[0][0] + [5, 6, 7]
    got += _run(eng, [turn])
    cold = [_run(_engine(tiny64, cache=False), [p])[0][0] for p in prompts + [turn]]
    same = sum(g[0] == c for g, c in zip(got, cold, strict=True))
    assert same >= 0.8 * len(cold), f"{same}/{len(cold)} identical"
    assert all(g[1] >= 288 for g in got[1:]), [g[1] for g in got]  # 18 shared pages of 16 tokens
    assert eng.blocks.num_used == 0 and not any(eng.blocks.ref)
