"""Per-step wall times of the engine's overlapped batch-1 decode, dense vs LServe, and a host profile of each:
python3 step_times.py <model dir> <dense|lserve> <fp16|int4> <context>
Three requests of 64 new tokens after a warm-up; then one more under cProfile (top functions by own time)."""

import cProfile
import pstats
import sys
import time

import cupy as cp
import numpy as np

from lserve_lite import LLM, SamplingParams
from lserve_lite.config import EngineConfig, SparseConfig

model, mode, wq, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sp = (
    SparseConfig(enabled=True, static_sparsity=0.0, token_budget=1024) if mode == "lserve" else SparseConfig()
)
cfg = EngineConfig(num_kv_pages=1024, max_num_seqs=8, max_num_batched_tokens=8192, sparse=sp,
                   quantize=None if wq == "fp16" else wq)  # fmt: skip
eng = LLM(model, backend="cuda", config=cfg).engine
ex = eng.runner.executor
rng = np.random.default_rng(0)


def one(plen, new, prof=None):
    ids = [int(t) for t in rng.integers(100, 40000, plen)]
    eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
    eng.step()
    ex.replay_events, times, sync = [], [], 0
    if prof:
        prof.enable()
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
        sync += eng._inflight is None
    if prof:
        prof.disable()
    cp.cuda.get_current_stream().synchronize()
    rep = float(np.mean([cp.cuda.get_elapsed_time(a, b) for a, b in ex.replay_events]))
    ex.replay_events = None
    return np.asarray(times) * 1e6, rep * 1e3, sync


one(64, 16)
one(ctx, 4)
for _ in range(3):
    t, rep, sync = one(ctx, 64)
    q = np.percentile(t, [10, 50, 90, 99])
    print(f"{mode} {wq} ctx {ctx}: steps {len(t)}, mean {t.mean():.0f} us (replay {rep:.0f}), p10/50/90/99 "
          f"{q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}/{q[3]:.0f}, max {t.max():.0f}, steps ending without one in flight "
          f"{sync}, slowest steps at {sorted(np.argsort(t)[-5:].tolist())}", flush=True)  # fmt: skip
prof = cProfile.Profile()
one(ctx, 64, prof)
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
