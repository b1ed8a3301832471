"""The CPU backend's threads: helper threads that run the parts of one product or attention call at once,
and the choice, timed per call shape, between spreading a call over them or running it on one thread."""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import deque

import numpy as np


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Helpers:
    """Daemon threads (one per extra CPU, started on first use) that run the parts of a split call."""

    def __init__(self):
        self.lock = threading.Lock()  # held by the caller whose parts are on the helpers
        self._req: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = 0

    def spread(self, part, bounds: list[int]) -> bool:
        """part(bounds[i], bounds[i + 1]) for i >= 1 on helpers while part 0 runs here; False if busy."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            while len(self._req) < len(bounds) - 2:
                self._req.append(queue.SimpleQueue())
                threading.Thread(
                    target=self._loop, args=(self._req[-1],), name="lserve-cpu", daemon=True
                ).start()
            self._seq += 1
            for i in range(1, len(bounds) - 1):
                self._req[i - 1].put((self._seq, part, bounds[i], bounds[i + 1]))
            try:
                part(bounds[0], bounds[1])
            finally:
                self._wait(self._seq, len(bounds) - 2)
        finally:
            self.lock.release()
        return True

    def _wait(self, seq: int, n: int) -> None:
        errors = []
        while n:  # completions for a caller interrupted while waiting are stale: skip them
            done, err = self._done.get()
            if done == seq:
                n -= 1
                errors.append(err)
        for err in filter(None, errors):
            raise err

    def _loop(self, req: queue.SimpleQueue) -> None:
        while True:
            seq, part, a, b = req.get()
            try:
                part(a, b)
                self._done.put((seq, None))
            except BaseException as e:  # handed to the waiting caller
                self._done.put((seq, e))


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


def even_bounds(lo: int, hi: int, parts: int) -> list[int]:
    """parts + 1 boundaries cutting lo..hi into near-equal ranges."""
    return [lo + (hi - lo) * i // parts for i in range(parts + 1)]


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

    def run(self, key, part, bounds: list[int], joint: bool = False) -> None:
        """part(bounds[i], bounds[i + 1]) for every i, spread over threads when that was faster lately.
        `joint`: part(bounds[0], bounds[-1]) does the same as the parts, so on one thread it is one call."""
        if len(bounds) < 3:
            part(bounds[0], bounds[-1])
            return
        st = self._keys.get(key) or self._keys.setdefault(key, _WayStats(self.first))
        probe = st.countdown <= 0
        t = time.perf_counter()
        if not (st.spread != probe and _HELPERS.spread(part, bounds)):
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
