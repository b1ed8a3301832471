"""Unprofiled split of a tiny model's decode step: LLM.stream_outputs against engine.step called directly, and
the backend's sampling call alone (sample vs sample_async) on [1, V] greedy logits."""

import sys
import time
import timeit

import numpy as np

from lserve_lite import LLM, EngineConfig, SamplingParams

llm = LLM(sys.argv[1], backend="cpu", config=EngineConfig(prefix_caching=False))
params = SamplingParams(temperature=0, max_new_tokens=65, ignore_eos=True)
ids = [5 + i % 300 for i in range(32)]
for _ in llm.stream_outputs(ids, params):  # warm-up
    pass


def via_llm() -> float:
    s = llm.stream_outputs(ids, params)
    next(s)
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


a, b = [via_llm() for _ in range(15)], [via_engine() for _ in range(15)]
print(
    f"stream_outputs us/step min {min(a):.1f} med {np.median(a):.1f}; engine.step min {min(b):.1f} med {np.median(b):.1f}"
)
ops, seqs = llm.engine.ops, [type("Greedy", (), {"params": params, "token_mask": None})()]
for V in (320, 49152):
    lg = np.random.default_rng(0).standard_normal((1, V)).astype(np.float32)
    t1 = min(timeit.repeat(lambda lg=lg: ops.sample(lg, seqs), number=2000, repeat=5)) / 2000 * 1e6
    t2 = (
        min(timeit.repeat(lambda lg=lg: ops.sample_async(lg, seqs).tolist(), number=2000, repeat=5))
        / 2000
        * 1e6
    )
    print(f"V={V}: sample {t1:.1f} us, sample_async+tolist {t2:.1f} us")
