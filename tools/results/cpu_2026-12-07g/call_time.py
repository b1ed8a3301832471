"""Time of one decode attention call (fp16 cache, 517 keys, 9 query heads on 3 KV heads) and of SmolLM2's four q4_1
decode GEMVs (q/k/v, o, gate/up, down) through a 2-part `SplitRunner`, on one thread and spread, replayed hot:
min / median over 400 calls, in us. Whether a split call's own part running the native job (`cpu_native.run_job`)
instead of the kernel's dispatcher costs time.
Usage, from a checkout's root: PYTHONPATH=. python tools/results/cpu_2026-12-07g/call_time.py"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path.cwd() / "tests"))
from test_cpu_kernels import _decode_case  # noqa: E402
from test_quant_kernels import _make  # noqa: E402

from lserve_lite.backends import cpu  # noqa: E402
from lserve_lite.backends.cpu_quant import linear_q  # noqa: E402
from lserve_lite.backends.cpu_threads import SplitRunner  # noqa: E402


def call_us(f, reps: int = 400) -> tuple[float, float]:
    """(min, median) of f's wall time in us, after 20 warm-up calls."""
    for _ in range(20):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e6, statistics.median(ts) * 1e6


def main() -> None:
    rng = np.random.default_rng(1)
    q, (kq, vq, ks, vs), _, plan, hc = _decode_case(rng, 517, 64, "fp16", False, False)
    ws = [_make("q4_1", m, k, rng)[0] for m, k in ((960, 576), (576, 576), (3072, 576), (576, 1536))]
    xs = {k: rng.standard_normal((1, k)).astype(np.float32) for k in (576, 1536)}
    row = []
    for spread in (False, True):
        runner = SplitRunner(parts=2, first=1 << 30)  # its first timing window never ends: one way only
        cpu.paged_attention_numba(q, kq, vq, plan, hc, runner, ks, vs)
        for w in ws:
            linear_q(xs[w.shape[1]], w, runner)
        for st in runner._keys.values():
            st.spread = spread
        attn = call_us(lambda r=runner: cpu.paged_attention_numba(q, kq, vq, plan, hc, r, ks, vs))
        gemvs = call_us(lambda r=runner: [linear_q(xs[w.shape[1]], w, r) for w in ws])
        way = "spread" if spread else "one thread"
        row.append(f"{way}: attention {attn[0]:.1f} / {attn[1]:.1f}, 4 GEMVs {gemvs[0]:.1f} / {gemvs[1]:.1f}")
    print(" | ".join(row))


if __name__ == "__main__":
    main()
