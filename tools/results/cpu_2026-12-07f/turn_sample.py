"""Host time of LLM's turn and of the CPU sampler, medians of many runs: an empty `with llm._call()` (the turn a
stream takes each token), `sample` against `sample_async` (+ `tolist`) on [1, V] greedy logits, and
`stream_outputs` against `engine.step` a decode step of a tiny model (tests/tiny_models.make_tiny_numpy).

    python turn_sample.py MODEL_DIR"""

import statistics
import sys
import time
import timeit

import numpy as np

from lserve_lite import LLM, EngineConfig, SamplingParams


def median_us(fn, number: int, repeat: int = 31) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


llm = LLM(sys.argv[1], backend="cpu", config=EngineConfig(prefix_caching=False))
params = SamplingParams(temperature=0, max_new_tokens=65, ignore_eos=True)
ids = [5 + i % 300 for i in range(32)]
for _ in llm.stream_outputs(ids, params):  # warm-up
    pass


def turn() -> None:
    with llm._call():
        pass


print(f"turn (empty `with llm._call()`): {median_us(turn, 20000):.2f} us")
ops, seqs = llm.engine.ops, [type("Greedy", (), {"params": params, "token_mask": None})()]
for V in (320, 49152):
    lg = np.random.default_rng(0).standard_normal((1, V)).astype(np.float32)
    t1 = median_us(lambda lg=lg: ops.sample(lg, seqs), 5000)
    t2 = median_us(lambda lg=lg: ops.sample_async(lg, seqs).tolist(), 5000)
    print(f"V={V}: sample {t1:.2f} us, sample_async+tolist {t2:.2f} us")


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


a, b = [], []
for _ in range(15):  # alternated, so both see the same neighbours
    a.append(via_llm())
    b.append(via_engine())
sa, sb = statistics.median(a), statistics.median(b)
print(
    f"a decode step (median of 15 x 64): stream_outputs {sa:.1f} us, engine.step {sb:.1f} us: +{sa - sb:.1f}"
)
