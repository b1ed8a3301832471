"""CPU backend: NumPy float32 and Numba kernels. Its LServe mode runs the references in backends/reference/,
which every GPU kernel is tested against."""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections import deque

import numpy as np

from ..config import EngineConfig
from ..sparse.plan import AttentionPlan
from . import cpu_kernels as K
from .base import EagerExecutor, Forward, KVCache, alloc_kv_cache
from .reference.attention import attend_qblocks, paged_attention_sparse_ref
from .reference.layers import rope_write_kv_sparse_ref
from .reference.page_select import select_pages_ref
from .reference.sampling import sample

# Up to this many rows (decode), the Numba GEMV and attention kernels; beyond (prefill), OpenBLAS GEMMs.
SMALL_ROWS = 8


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

    def run(self, key, part, bounds: list[int]) -> None:
        """part(bounds[i], bounds[i + 1]) for every i, spread over threads when that was faster lately."""
        if len(bounds) < 3:
            part(bounds[0], bounds[-1])
            return
        st = self._keys.get(key) or self._keys.setdefault(key, _WayStats(self.first))
        probe = st.countdown <= 0
        t = time.perf_counter()
        if not (st.spread != probe and _HELPERS.spread(part, bounds)):
            for a, b in zip(bounds[:-1], bounds[1:]):
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


class CpuOps:
    """float32 NumPy/Numba implementation of the Ops interface."""

    name = "cpu"
    dtype = np.float32

    def __init__(self):
        # The backend spreads work over its own threads (`SplitRunner`); OpenBLAS's would oversubscribe the
        # cores and make GEMM sums depend on the thread count. Process-wide: NumPy's BLAS gets one thread.
        openblas_set_threads(1)
        self.split = SplitRunner()

    def upload(self, a: np.ndarray, name: str | None = None) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int:
        """KV memory on the CPU: a fixed 2 GiB scaled by the fraction (the host is shared with all else)."""
        return int(2 * 2**30 * fraction / 0.8)

    def alloc_kv(self, cfg, page_size, num_pages, layout=None, num_stream_pages=0, max_seqs=0) -> KVCache:
        return alloc_kv_cache(np.zeros, np.asarray, np.float32, cfg, page_size, num_pages, layout,
                              num_stream_pages, max_seqs)  # fmt: skip

    def executor(self, forward: Forward, cache: KVCache, ecfg: EngineConfig, layout, max_len: int):
        """Every step eagerly: NumPy arrays need no upload and there is nothing to capture."""
        return EagerExecutor(self, forward, cache)

    def select_pages(self, q, cache: KVCache, layer: int, plan: AttentionPlan) -> None:
        select_pages_ref(
            q, cache.kmax[layer], cache.kmin[layer], plan, cache.head_class[layer], cache.head_slot[layer],
            cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def copy_stream_pages(self, cache: KVCache, src: np.ndarray, dst: np.ndarray) -> None:
        """Streaming-pool pages src[i] -> dst[i] in every layer (prefix-cache snapshots); the gather completes
        before the scatter, so the two lists may overlap."""
        for pool in (*cache.ks, *cache.vs):
            pool[dst] = pool[src]

    def prepare_plan(self, plan: AttentionPlan) -> AttentionPlan:
        return plan

    def embed(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def add_rmsnorm(self, x, residual, w, eps):
        h = np.empty_like(x)
        if residual is None:
            K.rmsnorm(x, w, eps, h)
            return h, x
        res = np.empty_like(x)
        K.add_rmsnorm(x, residual, w, eps, h, res)
        return h, res

    def linear(self, x, w, bias=None):
        """x @ w.T: decode rows by the Numba GEMV over parts of w's rows, more rows by GEMMs on parts of x."""
        m, n = x.shape[0], w.shape[0]
        y = np.empty((m, n), np.float32)
        if m > SMALL_ROWS:
            part = lambda a, b: np.matmul(x[a:b], w.T, out=y[a:b])  # noqa: E731
            self.split.run(("gemm", m.bit_length(), w.shape), part, even_bounds(0, m, self.split.parts))
        else:
            x = np.ascontiguousarray(x)
            part = lambda a, b: K.gemv_rows(x, w, y, a, b)  # noqa: E731
            self.split.run(("gemv", m, w.shape), part, even_bounds(0, n, self.split.parts))
        return y if bias is None else y + bias

    def silu_mul(self, gate_up):
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        K.silu_mul(gate_up, out)
        return out

    def rope_write_kv(self, qkv, positions, slots, cache, layer, rope):
        """`slots` [N] (dense mode) or [2, N]: dense-pool slots, streaming-pool slots."""
        if not cache.sparse:
            kc = cache.k[layer]
            q = np.empty(
                (qkv.shape[0], qkv.shape[1] // kc.shape[3] - 2 * kc.shape[1], kc.shape[3]), np.float32
            )
            K.rope_write_kv(qkv, positions, slots, kc, cache.v[layer], rope[0], rope[1], q)
            return q
        return rope_write_kv_sparse_ref(
            qkv, positions, slots[0], slots[1], cache.k[layer], cache.v[layer], cache.ks[layer],
            cache.vs[layer], cache.head_class[layer], cache.head_slot[layer], rope[0], rope[1],
            cache.kmax[layer] if cache.kmax else None, cache.kmin[layer] if cache.kmin else None,
        )  # fmt: skip

    def attention(self, q, cache, layer, plan, head_class):
        if not cache.sparse:
            kc, vc = cache.k[layer], cache.v[layer]
            if int(plan.qb_len.max(initial=0)) <= SMALL_ROWS:
                return paged_attention_numba(q, kc, vc, plan, head_class, self.split)
            out, hc = np.empty(q.shape, np.float32), np.asarray(head_class)
            part = lambda a, b: attend_qblocks(q, kc, vc, plan, hc, out, a, b)  # noqa: E731
            self.split.run(("prefill-attn",), part, _qblock_bounds(plan, self.split.parts))
            return out.reshape(q.shape[0], -1)
        return paged_attention_sparse_ref(
            q, cache.k[layer], cache.v[layer], cache.ks[layer], cache.vs[layer], plan,
            cache.head_class[layer], cache.head_slot[layer], cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def logits(self, h, lm_head):
        return self.linear(h, lm_head)

    def sample(self, logits: np.ndarray, seqs: list) -> list[int]:
        return sample(logits, seqs)


def _qblock_bounds(plan: AttentionPlan, parts: int) -> list[int]:
    """Query-block boundaries cutting the plan's visited pages (its work) into `parts` near-equal shares."""
    work = np.cumsum(np.diff(plan.kv_indptr).reshape(-1, 2).sum(1))
    cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts) if work.size else []
    return [0, *(int(c) for c in cuts), plan.num_qblocks]


def paged_attention_numba(q, k_cache, v_cache, plan: AttentionPlan, head_class, split=None) -> np.ndarray:
    """`paged_attention_ref` as a Numba kernel (same plan, masks and float32 softmax), for decode rows.

    With a `SplitRunner`, the query blocks are cut into parts that may run at once.
    """
    out = np.empty(q.shape, np.float32)
    args = (
        q, k_cache, v_cache, plan.qb_start, plan.qb_len, plan.qb_pos, plan.seq_ctx[plan.qb_seq],
        plan.kv_indptr, plan.kv_page, plan.kv_lpage, np.asarray(head_class, np.int32), plan.sink,
        plan.local, out,
    )  # fmt: skip
    nqb = plan.num_qblocks
    if split is None or nqb < 2:
        K.paged_attention(*args, 0, 2 * nqb)
    else:
        part = lambda a, b: K.paged_attention(*args, 2 * a, 2 * b)  # noqa: E731 (items: query block x class)
        split.run(("attn", nqb), part, even_bounds(0, nqb, min(split.parts, nqb)))
    return out.reshape(q.shape[0], -1)
