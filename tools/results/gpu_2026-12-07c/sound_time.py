"""What the overflow check adds to a decode step on the GPU: GpuSampler.sound_rows (one kernel) against the six
CuPy launches it replaced, and argmax_rows beside them, batch 1 / 64 at SmolLM2's and Llama-3's vocabularies
(CUDA events around 200 back-to-back launches, median of 5 rounds, us a launch)."""

import numpy as np

from lserve_lite.backends.cuda import CudaOps

ops = CudaOps()
cp, s = ops.cp, ops.sampler


def cupy_check(x):
    return cp.isfinite(x).all(axis=1) & (x.max(axis=1) > x.min(axis=1))


def per_launch(f, n=200) -> float:
    f()
    times = []
    for _ in range(5):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        for _ in range(n):
            f()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1000 / n)
    return float(np.median(times))


print(f"{'rows x vocab':>14} {'sound_rows us':>14} {'cupy check us':>14} {'argmax_rows us':>15}")
for b, v in ((1, 49152), (1, 128256), (64, 49152), (64, 128256)):
    x = cp.asarray(np.random.default_rng(0).standard_normal((b, v)).astype(np.float32))
    out = cp.empty(b, cp.int64)
    assert (s.sound_rows(x) == cupy_check(x)).all()
    t = [
        per_launch(lambda x=x: s.sound_rows(x)),
        per_launch(lambda x=x: cupy_check(x)),
        per_launch(lambda x=x, out=out: s.argmax(x, out)),
    ]
    print(f"{b:>5} x {v:<6} {t[0]:14.2f} {t[1]:14.2f} {t[2]:15.2f}")
