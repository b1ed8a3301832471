"""The scripts of tools/ on the CPU: their stand-ins keep up with the engine's interfaces, and bad input or a
missing GPU gives one line and a nonzero exit, before any output is written."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_quant_cpu  # noqa: E402

from lserve_lite.backends.cpu_threads import SplitRunner  # noqa: E402


def test_bench_quant_cpu_spread_takes_what_split_runner_takes():
    """linear_q passes SplitRunner.run's keywords (joint=, native=) to the benchmark's stand-in."""
    ours, theirs = inspect.signature(bench_quant_cpu.Spread.run), inspect.signature(SplitRunner.run)
    assert list(ours.parameters) == list(theirs.parameters)
    seen: list[tuple[int, int]] = []
    bench_quant_cpu.Spread(2).run(None, lambda a, b: seen.append((a, b)), [0, 4, 8], joint=True, native=None)
    assert sorted(seen) in ([(0, 8)], [(0, 4), (4, 8)])
    x = np.ones((1, 64), np.float32)
    w = bench_quant_cpu.random_weight("q8_0", 8, 64, np.random.default_rng(0))
    wall, _ = bench_quant_cpu.time_quant(x, w, 2, budget=0.01)
    assert 0 < wall < 1
