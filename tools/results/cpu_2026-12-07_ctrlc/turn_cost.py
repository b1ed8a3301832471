"""Host time of one LLM turn as this checkout takes it (before 0d0efbe: `with llm._call()`; after: `turn =
llm._call()`, `with llm._lock, turn:`), and of a `stream_outputs` decode step against `engine.step`'s, medians
(tests/tiny_models.make_tiny_numpy's model). Alternate processes of the two checkouts.

    PYTHONPATH=CHECKOUT python turn_cost.py MODEL_DIR"""

import statistics
import sys
import time
import timeit

from lserve_lite import LLM, EngineConfig, SamplingParams

llm = LLM(sys.argv[1], backend="cpu", config=EngineConfig(prefix_caching=False))
params = SamplingParams(temperature=0, max_new_tokens=65, ignore_eos=True)
ids = [5 + i % 300 for i in range(32)]
for _ in llm.stream_outputs(ids, params):  # warm-up
    pass
lock_first = not hasattr(llm, "_busy")  # the turn entered inside `with llm._lock, turn:`


def turn() -> None:
    if lock_first:
        t = llm._call()
        with llm._lock, t:
            pass
    else:
        with llm._call():
            pass


def via_llm() -> float:
    s = llm.stream_outputs(ids, params)
    next(s)  # after the prefill
    t0 = time.perf_counter()
    n = sum(1 for _ in s)
    return (time.perf_counter() - t0) / n * 1e6


def via_engine() -> float:
    e = llm.engine
    rid = e.add_request(ids, params)
    while not any(o.request_id == rid for o in e.step()):  # the prefill
        pass
    t0, n, done = time.perf_counter(), 0, False
    while not done:
        for o in e.step():
            n, done = n + 1, o.finished
    return (time.perf_counter() - t0) / n * 1e6


t = statistics.median(timeit.repeat(turn, number=20000, repeat=31)) / 20000 * 1e6
a, b = [], []
for _ in range(15):  # alternated, so both see the same neighbours
    a.append(via_llm())
    b.append(via_engine())
sa, sb = statistics.median(a), statistics.median(b)
print(f"{'lock first' if lock_first else 'before'}: turn {t:.3f} us; decode step (median of 15 x 64): "
      f"stream_outputs {sa:.1f} us, engine.step {sb:.1f} us: +{sa - sb:.1f}")  # fmt: skip
