"""cProfile of 64 batch-1 greedy decode steps of a tiny random llama on the CPU backend (the lserve_lite on
PYTHONPATH): per-step self and cumulative time and calls of each function, the fastest of `reps` runs.

    python profile_decode_host.py MODEL_DIR OUT.json [REPS]"""

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

from lserve_lite import LLM, EngineConfig, SamplingParams

model, out, reps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3
llm = LLM(model, backend="cpu", config=EngineConfig(prefix_caching=False))
params = SamplingParams(temperature=0, max_new_tokens=65, ignore_eos=True)
ids = [5 + i % 300 for i in range(32)]
for _ in llm.stream_outputs(ids, params):  # warm-up: JIT, first-use allocations
    pass
walls, best = [], None
for _ in range(reps):
    stream = llm.stream_outputs(ids, params)
    next(stream)  # after the prefill
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    n = sum(1 for _ in stream)
    prof.disable()
    walls.append((time.perf_counter() - t0) / n * 1e6)
    if best is None or walls[-1] < best[0]:
        best = (walls[-1], pstats.Stats(prof), n)
_, st, n = best
rows = []
for (fn, line, name), (_, calls, self_s, cum_s, _) in st.stats.items():
    short = fn.split("lserve_lite/")[-1] if "lserve_lite/" in fn else fn.rsplit("/", 1)[-1]
    rows.append({"function": f"{short}:{line}({name})", "calls_per_step": calls / n,
                 "self_us_per_step": self_s / n * 1e6, "cum_us_per_step": cum_s / n * 1e6})  # fmt: skip
rows.sort(key=lambda r: -r["self_us_per_step"])
total_calls = sum(r["calls_per_step"] for r in rows)
res = {"steps": n, "profiled_us_per_step_each_rep": walls, "total_self_us_per_step": st.total_tt / n * 1e6,
       "function_calls_per_step": total_calls, "top_self": rows[:60],
       "top_cum": sorted(rows, key=lambda r: -r["cum_us_per_step"])[:60]}  # fmt: skip
out.write_text(json.dumps(res, indent=1))
print(f"{n} steps, profiled us/step per rep {[round(w) for w in walls]}, calls/step {total_calls:.0f}")
for r in rows[:25]:
    print(
        f"{r['self_us_per_step']:9.1f} {r['cum_us_per_step']:9.1f} {r['calls_per_step']:7.1f}  {r['function']}"
    )
