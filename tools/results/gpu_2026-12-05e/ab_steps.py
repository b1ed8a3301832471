"""Engine step vs graph replay, batch-1 greedy decode (overlapped):
python3 ab_steps.py <model dir> <label> <dense|lserve> <fp16|int4> <context> [<context> ...]
Per context: a warm-up request, then three of 64 new tokens; prints the engine's wall time per token, the mean replay
and how many replays were of a short graph (GraphExecutor.short_replays, 0 where the executor has none: the
reverted build had it)."""

import sys
import time

import cupy as cp
import numpy as np

from lserve_lite import LLM, SamplingParams
from lserve_lite.config import EngineConfig, SparseConfig

model, label, mode, wq = sys.argv[1:5]
ctxs = [int(c) for c in sys.argv[5:]]
sp = (
    SparseConfig(enabled=True, static_sparsity=0.0, token_budget=1024) if mode == "lserve" else SparseConfig()
)
cfg = EngineConfig(num_kv_pages=1024, max_num_seqs=8, max_num_batched_tokens=8192, sparse=sp,
                   quantize=None if wq == "fp16" else wq)  # fmt: skip
eng = LLM(model, backend="cuda", config=cfg).engine
ex = eng.runner.executor
rng = np.random.default_rng(0)


def one(plen, new):
    ids = [int(t) for t in rng.integers(100, 40000, plen)]
    eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
    eng.step()
    ex.replay_events, s0 = [], getattr(ex, "short_replays", 0)
    t1, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += len(eng.step())
    t2 = time.perf_counter()
    cp.cuda.get_current_stream().synchronize()
    ev = [cp.cuda.get_elapsed_time(a, b) for a, b in ex.replay_events]
    ex.replay_events = None
    return (t2 - t1) / n * 1e3, float(np.mean(ev)), getattr(ex, "short_replays", 0) - s0, len(ev)


one(64, 16)
for plen in ctxs:
    one(plen, 4)
    for _ in range(3):
        step, rep, short, reps = one(plen, 64)
        print(f"{label} {mode} {wq} ctx {plen}: step {step * 1e3:.1f} us, replay {rep * 1e3:.1f} us, "
              f"x {step / rep:.4f}, tok/s {1e3 / step:.0f}, short replays {short}/{reps}", flush=True)  # fmt: skip
