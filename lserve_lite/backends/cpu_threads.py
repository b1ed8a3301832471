"""The CPU backend's threads: helper threads that run the parts of one product or attention call at once,
and the choice, timed per call shape, between spreading a call over them or running it on one thread."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from ..config import env_float
from . import cpu_native


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MAX_HELPERS = 8  # SplitRunner uses at most 8 parts
NativeJob = Callable[[], tuple[int, np.ndarray]]  # makes (job address, int64 args): cpu_native.native_job
_NO_ARGS = np.zeros(0, np.int64)  # the args posted with a Python part


def spin_seconds() -> float:
    """How long an idle helper spins before it sleeps: LSERVE_CPU_SPIN_US (default 2000 us, at most 1 s)."""
    return env_float("LSERVE_CPU_SPIN_US", 2000.0, 0.0, 1e6) * 1e-6


class _Helpers:
    """Daemon threads (one per extra CPU, started on first use) that run the parts of a split call.

    Each helper spins in compiled code (`cpu_native.serve`) for `spin_s` after its last job, so the next part
    starts without an OS wake-up; a native part runs there without the GIL, a Python part back in Python. Idle
    longer, it sleeps on a condition variable."""

    def __init__(self, spin_s: float | None = None):
        """`spin_s`: how long a helper spins for its next part (default: `spin_seconds()`)."""
        self.lock = threading.Lock()  # held by the caller whose parts are on the helpers
        self._cv = threading.Condition()
        self._ctl = np.zeros(MAX_HELPERS * cpu_native.CTL_COLS, np.int64)
        self._py: list = []  # per helper: (part, a, b) of a Python job
        self._errors: list = []
        self._sleeping: list[bool] = []
        self._seq = 0
        self.spin_s = spin_s
        self._spins = -1

    def spread(self, part, bounds: Sequence[int], native: NativeJob | None = None) -> bool:
        """part(bounds[i], bounds[i + 1]) for i >= 1 on helpers while part 0 runs here; False if busy.
        `native`: a callable giving (job function address, args array) that run the same parts without Python
        (cpu_native), made only when the parts are spread."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            n = len(bounds) - 2
            if n > MAX_HELPERS:
                raise ValueError(f"at most {MAX_HELPERS + 1} parts, got {n + 1}")
            self._grow(n)
            self._seq += 1
            fn, args = native() if native is not None else (0, _NO_ARGS)
            for i in range(n):
                if not fn:
                    self._py[i] = (part, bounds[i + 1], bounds[i + 2])
                cpu_native.post(self._ctl, i, self._seq, fn, args, bounds[i + 1], bounds[i + 2])
                if self._sleeping[i]:
                    with self._cv:
                        self._cv.notify_all()
            try:
                part(bounds[0], bounds[1])
            finally:
                cpu_native.wait_done(self._ctl, n, self._seq)
                errors = [e for e in self._errors[:n] if e is not None]
                self._errors[:n] = [None] * n
                self._py[:n] = [None] * n  # the parts' closures hold weights and KV: not past the call
            if errors:
                raise errors[0]
        finally:
            self.lock.release()
        return True

    def _grow(self, n: int) -> None:
        if self._spins < 0:  # pauses per spin_s, timed once
            spin_s = spin_seconds() if self.spin_s is None else self.spin_s
            cpu_native.spin_for(1)  # (compiled or loaded first)
            t = time.perf_counter()
            cpu_native.spin_for(20000)
            self._spins = int(spin_s / max((time.perf_counter() - t) / 20000, 1e-10))
        while len(self._py) < n:
            self._py.append(None)
            self._errors.append(None)
            self._sleeping.append(False)
            threading.Thread(
                target=self._loop, args=(len(self._py) - 1,), name="lserve-cpu", daemon=True
            ).start()

    def _loop(self, row: int) -> None:
        ctl, last = self._ctl, 0
        while True:
            last = cpu_native.serve(ctl, row, last, self._spins)
            if last < 0:  # a Python part
                last = -last
                self._run_part(row)
                cpu_native.finish(ctl, row, last)
                continue
            with self._cv:
                self._sleeping[row] = True
                while ctl[row * cpu_native.CTL_COLS + cpu_native.POSTED] == last:
                    self._cv.wait()
                self._sleeping[row] = False

    def _run_part(self, row: int) -> None:
        """The Python part posted to helper `row`; its closure is referenced only by this call's frame, so the
        weights and KV cache it reads are not kept alive by an idle helper (LLM.close releases them)."""
        part, a, b = self._py[row]
        try:
            part(a, b)
        except BaseException as e:  # handed to the waiting caller
            self._errors[row] = e


_HELPERS = _Helpers()
os.register_at_fork(after_in_child=lambda: _HELPERS.__init__())  # threads do not survive a fork


def openblas_set_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count (process-wide) through ctypes; False where there is none."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    except OSError:
        return False
    names = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
    for path in paths:
        lib = ctypes.CDLL(path)
        for fn in filter(None, (getattr(lib, name, None) for name in names)):
            fn(n)
            return True
    return False


@functools.lru_cache(maxsize=1024)
def even_bounds(lo: int, hi: int, parts: int) -> tuple[int, ...]:
    """parts + 1 boundaries cutting lo..hi into near-equal ranges (kept per shape: every decode step asks again)."""
    return tuple(lo + (hi - lo) * i // parts for i in range(parts + 1))


class SplitRunner:
    """Runs the parts of a step on this thread and helper threads at once, or all on this thread.

    The parts are fixed by the caller, so results never depend on the choice. On an idle host more threads
    read memory and multiply faster; on an oversubscribed one a hand-off can wait a whole scheduler slice.
    So the way in use is timed per key and the other is retried after `interval` calls, the interval
    doubling while it keeps losing.
    """

    def __init__(self, parts: int | None = None, first: int = 8, longest: int = 512):
        self.parts = min(8, usable_cpus()) if parts is None else parts
        self.first, self.longest = first, longest
        self._keys: dict = {}

    def run(
        self, key, part, bounds: Sequence[int], joint: bool = False, native: NativeJob | None = None
    ) -> None:
        """part(bounds[i], bounds[i + 1]) for every i, spread over threads when that was faster lately.
        `joint`: part(bounds[0], bounds[-1]) does the same as the parts, so on one thread it is one call.
        `native`: the same parts as a native job, which then runs them here too (`cpu_native.run_job`) and on the
        helpers (`_Helpers.spread`); `part` only where it gives no job (address 0)."""
        if len(bounds) < 3:
            part(bounds[0], bounds[-1])
            return
        if native is not None:
            job = native()
            if job[0]:
                part, native = functools.partial(cpu_native.run_job, *job), lambda: job
        st = self._keys.get(key) or self._keys.setdefault(key, _WayStats(self.first))
        probe = st.countdown <= 0
        t = time.perf_counter()
        if not (st.spread != probe and _HELPERS.spread(part, bounds, native)):
            for a, b in [(bounds[0], bounds[-1])] if joint else zip(bounds[:-1], bounds[1:]):
                part(a, b)
        st.record(time.perf_counter() - t, probe, self.first, self.longest)


class _WayStats:
    """Recent timings of the way in use (spread or not) and when to retry the other one."""

    def __init__(self, first: int):
        self.spread, self.countdown, self.interval = False, first, first
        self.times: deque = deque(maxlen=8)

    def record(self, dt: float, probe: bool, first: int, longest: int) -> None:
        if not probe:
            self.times.append(dt)
            self.countdown -= 1
            return
        if self.times and dt < 0.9 * float(np.median(self.times)):  # the other way wins: switch
            self.spread, self.interval = not self.spread, first
            self.times.clear()
            self.times.append(dt)
        else:
            self.interval = min(2 * self.interval, longest)
        self.countdown = self.interval
