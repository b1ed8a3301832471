"""The CPU backend's helper threads: native jobs (no GIL between jobs) and Python parts, spinning or asleep."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_quant_kernels import _make

from lserve_lite.backends import cpu_native, cpu_quant, cpu_threads
from lserve_lite.backends.cpu_native import job_address, native_job
from lserve_lite.backends.cpu_quant import GEMV_ROWS, linear_q, logits_q
from lserve_lite.backends.cpu_threads import MAX_HELPERS, SplitRunner, _Helpers
from lserve_lite.weights.qtensor import FORMATS, QuantTensor


def _spreading(parts: int) -> SplitRunner:
    """A runner that always spreads (its first timing window never ends; every key's way set to spread)."""

    class Always(SplitRunner):
        def run(self, key, part, bounds, joint=False, native=None):
            super().run(key, part, bounds, joint, native)
            self._keys[key].spread = True

    return Always(parts=parts, first=1 << 30)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 3])
def test_native_gemv_parts_equal_one_thread(fmt, n):
    """Decode GEMVs whose parts ran as native jobs on the helpers (and the 8-bit heads' int16 pass) give the
    bits of the whole product on one thread, for 2-4 parts and odd row counts."""
    rng = np.random.default_rng(FORMATS.index(fmt) * 10 + n)
    qt, _ = _make(fmt, 203, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    whole, head = linear_q(x, qt), logits_q(x, qt)
    for parts in (2, 3, 4):
        split = _spreading(parts)
        for _ in range(3):  # the first call times one thread; then spread
            np.testing.assert_array_equal(linear_q(x, qt, split), whole)
            np.testing.assert_array_equal(logits_q(x, qt, split), head)
        assert all(st.spread for st in split._keys.values())
    assert job_address.cache_info().currsize >= 1 and n <= GEMV_ROWS


def test_native_job_runs_without_the_python_part():
    """With a native job the helpers run it, not the Python part (which here records its ranges)."""
    rng = np.random.default_rng(7)
    qt, _ = _make("q4_1", 64, 256, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    xq, dx, xs = np.empty((1, 256), np.int8), np.empty((1, 8), np.float32), np.empty((1, 16), np.float32)
    cpu_quant.quantize_activations(x, xq, dx, xs)
    y = np.full((1, 64), np.nan, np.float32)
    ran = []

    def part(a, b):
        ran.append((a, b))
        cpu_quant.gemv_rows_q(FORMATS.index("q4_1"), xq, dx, xs, qt.data, y, a, b)

    def native():
        return native_job(
            cpu_quant._gemv_job, cpu_quant._gemv_args, FORMATS.index("q4_1"), xq, dx, xs, qt.data, y
        )

    helpers = _Helpers()
    assert helpers.spread(part, [0, 20, 41, 64], native)
    assert ran == [(0, 20)]
    np.testing.assert_array_equal(y, linear_q(x, qt))


@pytest.mark.parametrize("spread", [False, True])
def test_a_native_job_runs_the_callers_parts_too(spread):
    """Given a native job, a runner's own parts run it too (`cpu_native.run_job`), spread or on one thread, and
    the Python part never: a decode step loads one compiled copy of each kernel, the job's, not also the part's
    Numba dispatcher (~1 MB resident each; the chat's RSS, docs/QUANT.md)."""
    rng = np.random.default_rng(5)
    qt, _ = _make("q4_1", 64, 256, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    xq, dx, xs = np.empty((1, 256), np.int8), np.empty((1, 8), np.float32), np.empty((1, 16), np.float32)
    cpu_quant.quantize_activations(x, xq, dx, xs)
    y = np.empty((1, 64), np.float32)
    args = (cpu_quant._gemv_job, cpu_quant._gemv_args, FORMATS.index("q4_1"), xq, dx, xs, qt.data, y)

    def part(a, b):
        raise AssertionError(f"the Python part ran rows {a}..{b}")

    split = _spreading(3) if spread else SplitRunner(parts=3, first=1 << 30)
    for _ in range(3):  # the first call times one thread; then spread, or not
        y[:] = np.nan
        split.run("gemv", part, [0, 20, 41, 64], joint=True, native=lambda: native_job(*args))
        np.testing.assert_array_equal(y, linear_q(x, qt))
    assert split._keys["gemv"].spread == spread


def _spread_both_kinds(helpers: _Helpers, qt: QuantTensor, x: np.ndarray, want: np.ndarray) -> None:
    """A Python part and a native GEMV job through `helpers`; both results checked."""
    out = np.zeros(100, np.int64)

    def part(a, b):
        out[a:b] = np.arange(a, b) * 2

    assert helpers.spread(part, [0, 30, 70, 100])
    np.testing.assert_array_equal(out, np.arange(100) * 2)
    xq, dx, xs = np.empty((1, 256), np.int8), np.empty((1, 8), np.float32), np.empty((1, 16), np.float32)
    cpu_quant.quantize_activations(x, xq, dx, xs)
    y = np.full((1, qt.shape[0]), np.nan, np.float32)
    fmt = FORMATS.index(qt.fmt)
    args = (cpu_quant._gemv_job, cpu_quant._gemv_args, fmt, xq, dx, xs, qt.data, y)
    gemv = lambda a, b: cpu_quant.gemv_rows_q(fmt, xq, dx, xs, qt.data, y, a, b)  # noqa: E731
    assert helpers.spread(gemv, [0, 50, qt.shape[0]], lambda: native_job(*args))
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("spin_s", [0.0, 0.05])
def test_helpers_asleep_or_spinning_run_every_part(spin_s):
    """Helpers that sleep after each job (no spinning) or spin run Python and native parts alike, including
    after an idle pause long enough for spinning ones to fall asleep; errors reach the caller."""
    rng = np.random.default_rng(11)
    qt, _ = _make("int8", 97, 256, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    want = linear_q(x, qt)
    helpers = _Helpers(spin_s=spin_s)
    for i in range(6):
        _spread_both_kinds(helpers, qt, x, want)
        if i == 2:
            time.sleep(0.2)

    def bad(a, b):
        if a:
            raise ValueError("helper part")

    with pytest.raises(ValueError, match="helper part"):
        helpers.spread(bad, [0, 1, 2])
    assert helpers.spread(lambda a, b: None, [0, 1, 2])  # the error was handed over once, not kept


def test_helpers_refuse_too_many_parts_and_a_second_caller():
    helpers = _Helpers(spin_s=0.0)
    with pytest.raises(ValueError, match="at most"):
        helpers.spread(lambda a, b: None, list(range(MAX_HELPERS + 3)))
    started, release = threading.Event(), threading.Event()

    def slow(a, b):
        if a == 0:
            started.set()
            release.wait(5)

    t = threading.Thread(target=helpers.spread, args=(slow, [0, 1, 2]))
    t.start()
    assert started.wait(5)
    assert not helpers.spread(lambda a, b: None, [0, 1, 2])  # busy: the caller runs its parts itself
    release.set()
    t.join(5)
    assert not t.is_alive()


def test_quant_tensor_rows_not_contiguous_run_python_parts():
    """A weight whose packed rows are a strided view cannot be a native job: its parts run in Python."""
    rng = np.random.default_rng(5)
    qt, _ = _make("q8_0", 64, 256, rng)
    wide = np.zeros((64, qt.data.shape[1] * 2), np.uint8)
    wide[:, : qt.data.shape[1]] = qt.data
    view = QuantTensor(qt.fmt, qt.shape, wide[:, : qt.data.shape[1]])
    assert not view.data.flags.c_contiguous
    x = rng.standard_normal((1, 256)).astype(np.float32)
    split = _spreading(2)
    for _ in range(3):
        np.testing.assert_array_equal(linear_q(x, view, split), linear_q(x, qt))
    assert cpu_threads.usable_cpus() >= 1


def test_helpers_hold_no_part_after_the_call():
    """A split call's Python parts close over weights and KV arrays: an idle helper kept the last one it ran (in
    its job slot and its loop's locals), so LLM.close left a weight, and with it the whole memory-mapped
    safetensors file, alive for as long as the process ran. The parts go when the call returns."""
    import gc
    import weakref

    class Weight:
        pass

    w = Weight()
    gone = weakref.ref(w)
    ran = []

    def part(a, b, w=w):
        ran.append((a, b))

    assert _Helpers(spin_s=0.0).spread(part, [0, 10, 20, 30])
    del part, w
    gc.collect()
    assert sorted(ran) == [(0, 10), (10, 20), (20, 30)]
    assert gone() is None


def test_spin_setting_refused_at_backend_start(monkeypatch):
    """LSERVE_CPU_SPIN_US: microseconds in [0, 1e6]; anything else is one line when the CPU backend starts."""
    from lserve_lite.backends.cpu import CpuOps

    monkeypatch.setenv("LSERVE_CPU_SPIN_US", "0")
    assert cpu_threads.spin_seconds() == 0.0
    for bad in ("-5", "2e6", "fast"):
        monkeypatch.setenv("LSERVE_CPU_SPIN_US", bad)
        with pytest.raises(ValueError, match=r"LSERVE_CPU_SPIN_US must be a number in \[0, 1e\+06\]"):
            CpuOps()


class _OneThread(SplitRunner):
    """A runner that never spreads (its first timing window never ends) and records the ranges its Python parts
    ran."""

    def __init__(self, parts: int):
        super().__init__(parts=parts, first=1 << 30)
        self.ranges: list[tuple[int, int]] = []

    def run(self, key, part, bounds, joint=False, native=None):
        def recorded(a: int, b: int) -> None:
            self.ranges.append((a, b))
            part(a, b)

        super().run(key, recorded, bounds, joint, native)


@pytest.mark.parametrize("n", [1, GEMV_ROWS, GEMV_ROWS + 1])
def test_a_decode_gemv_on_one_thread_is_one_kernel_call(n, monkeypatch):
    """On one thread a decode GEMV's parts (independent rows) run as one call over all rows (its native job's),
    one Numba dispatch a product instead of one a part; the tiled GEMM keeps its parts (tiles start at each
    part's first row)."""
    rng = np.random.default_rng(n)
    qt, _ = _make("q4_1", 203, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    bounds = cpu_threads.even_bounds(0, 203, 3)
    want = [(0, 203)] if n <= GEMV_ROWS else list(zip(bounds[:-1], bounds[1:]))
    head, _ = _make("q8_0", 203, 512, rng)  # an 8-bit head's int16 pass
    split = _OneThread(3)
    run_job = cpu_native.run_job

    def recorded_job(fn, args, a, b):
        split.ranges.append((a, b))
        run_job(fn, args, a, b)

    monkeypatch.setattr(cpu_native, "run_job", recorded_job)
    for y in (lambda s: linear_q(x, qt, s), lambda s: logits_q(x, head, s)):
        split.ranges.clear()
        if n <= GEMV_ROWS:  # the same bits as without a runner (a GEMM's sums depend on its tiles)
            np.testing.assert_array_equal(y(split), y(None))
        else:
            y(split)
        assert split.ranges == want


def test_even_bounds_are_kept_per_shape():
    """The bounds of a shape are made once (a decode step asks for the same ones at every product)."""
    assert cpu_threads.even_bounds(0, 203, 3) == (0, 67, 135, 203)
    assert cpu_threads.even_bounds(0, 203, 3) is cpu_threads.even_bounds(0, 203, 3)
