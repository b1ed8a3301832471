"""Unprofiled wall time per step of 64 batch-1 greedy decode steps of a tiny random llama (CPU backend), `reps`
times in one process.

    python step_time.py MODEL_DIR OUT.json REPS"""

import json
import statistics
import sys
import time

from lserve_lite import LLM, EngineConfig, SamplingParams

model, out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = LLM(model, backend="cpu", config=EngineConfig(prefix_caching=False))
params = SamplingParams(temperature=0, max_new_tokens=65, ignore_eos=True)
ids = [5 + i % 300 for i in range(32)]
for _ in llm.stream_outputs(ids, params):  # warm-up
    pass
us = []
for _ in range(reps):
    stream = llm.stream_outputs(ids, params)
    next(stream)  # after the prefill
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in stream)
    us.append(((time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6))
walls = sorted(u[0] for u in us)
res = {"steps_per_rep": n, "reps": reps, "wall_us_per_step": [round(u[0], 1) for u in us],
       "cpu_us_per_step": [round(u[1], 1) for u in us], "min_wall_us": round(walls[0], 1),
       "median_wall_us": round(statistics.median(walls), 1)}  # fmt: skip
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(res["min_wall_us"], res["median_wall_us"])
