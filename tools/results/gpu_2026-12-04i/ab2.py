"""Engine step vs graph replay, batch-1 greedy decode, overlapped: python3 ab2.py <repo root> <model dir> <label> <dense|lserve> <fp16|int4>"""

import sys
import time

sys.path.insert(0, sys.argv[1])
import cupy as cp
import numpy as np

import lserve_lite
from lserve_lite import LLM, SamplingParams
from lserve_lite.config import EngineConfig, SparseConfig

assert lserve_lite.__file__.startswith(sys.argv[1]), lserve_lite.__file__
label, mode, wq = sys.argv[3], sys.argv[4], sys.argv[5]
sp = (
    SparseConfig(enabled=True, static_sparsity=0.0, token_budget=1024) if mode == "lserve" else SparseConfig()
)
llm = LLM(
    sys.argv[2],
    backend="cuda",
    config=EngineConfig(
        num_kv_pages=1024,
        max_num_seqs=8,
        max_num_batched_tokens=8192,
        sparse=sp,
        quantize=None if wq == "fp16" else wq,
    ),
)
eng = llm.engine
ex = eng.runner.executor
rng = np.random.default_rng(0)


def one(plen, new):
    ids = [int(t) for t in rng.integers(100, 40000, plen)]
    eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
    eng.step()
    ex.replay_events = []
    t1, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += len(eng.step())
    t2 = time.perf_counter()
    cp.cuda.get_current_stream().synchronize()
    ev = [cp.cuda.get_elapsed_time(a, b) for a, b in ex.replay_events]
    rep = float(np.mean(ev))
    med = float(np.median(ev))
    ex.replay_events = None
    return (t2 - t1) / n * 1e3, rep, med


one(64, 16)
for plen in (512, 4096):
    one(plen, 4)
    res = [one(plen, 300) for _ in range(3)]
    for step, rep, med in res:
        print(
            f"{label} {mode} {wq} ctx {plen}: step {step * 1e3:.1f} us, replay {rep * 1e3:.1f} us, x {step / rep:.4f}, "
            f"gap {(step - rep) * 1e3:.1f} us, tok/s {1e3 / step:.0f}, replay median {med * 1e3:.1f} us",
            flush=True,
        )
