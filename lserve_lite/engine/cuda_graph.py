"""CUDA Graphs for decode steps: `model.forward` captured once per batch size, replayed with new inputs.

Each captured size owns static device inputs (token ids, positions, slots, logit rows), a device plan of
fixed capacity (cuda_attention.CudaPlan: up to `size` query blocks, ceil(max_len / page_size) pages per
sequence and class) and static per-layer head-class buffers; a step copies the host arrays into them
(one pinned copy for ids/positions/slots plus the plan's own upload) and launches the graph: one launch
instead of ~10 per layer. Prefill and mixed batches stay eager (`run` returns None for them).

A batch of n decode rows runs in the smallest captured size >= n: padding rows get token 0 at position 0
and slot -1 (their K/V is not written) and lie past the plan's live query blocks (attention skips them);
their logits rows are dropped. Intermediates live in a private CuPy memory pool that nothing else
allocates from, so eager steps between replays cannot reuse the graphs' memory.

LServe mode (a two-pool sparse cache): the static inputs hold both KV slots of each row (dense pool and
streaming pool, the ring mapping done on the host), and the plan carries the per-block windows (qb_sink,
qb_local) and page-selection fields (qb_slot, qb_keep, qb_refresh) as data. The captured step always runs
the page selector (`CudaPlan.always_select`): blocks whose refresh flag is 0 exit at once on the device, so
one graph serves refresh and reuse steps. The decode split count is fixed at capture from `visit_pages`
(the longest list a decode head visits: budget + newest page, or the streaming window); a batch whose
lists are longer (a one-token prefill chunk, a wider per-request window) runs eagerly.

The logits returned by `run` are a view of the graph's static output: valid until the next `run`.
"""

from __future__ import annotations

import math

import numpy as np

from ..sparse.plan import AttentionPlan, BatchLayout, build_plan

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Captured:
    """One batch size: its graph, static buffers and device plan."""

    def __init__(self, size, graph, io, rows, plan, logits):
        # Everything the graph reads or writes stays referenced here: freed memory would be reused.
        self.size, self.graph, self.io, self.rows, self.plan, self.logits = (
            size,
            graph,
            io,
            rows,
            plan,
            logits,
        )


class DecodeGraphs:
    """Captures decode steps lazily, one graph per batch size in `sizes` (up to max_num_seqs)."""

    def __init__(
        self, model, ops, cache, max_num_seqs: int, max_len: int, page_size: int, sizes=None,
        visit_pages: int | None = None,
    ):  # fmt: skip
        import cupy as cp
        import cupyx

        self.cp, self.model, self.ops, self.cache = cp, model, ops, cache
        sizes = [s for s in (sizes or DEFAULT_SIZES) if s <= max_num_seqs]
        if max_num_seqs not in sizes and sizes and max_num_seqs <= max(DEFAULT_SIZES):
            sizes.append(max_num_seqs)
        self.sizes = sorted(set(sizes or [max_num_seqs]))
        self.page_size = page_size
        self.max_pages = math.ceil(max_len / page_size)
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, _Captured] = {}
        self.sparse = bool(getattr(cache, "sparse", False))
        self.visit_pages = visit_pages if self.sparse else None
        if self.sparse and self.visit_pages is None:
            self.visit_pages = self.max_pages
        self._rows = 4 if self.sparse else 3  # ids, positions, slots (dense pool [, streaming pool])
        self._staging = {s: cupyx.empty_pinned((self._rows, s), np.int64) for s in self.sizes}
        self._staged: dict[int, object] = {}  # event after each size's last upload from its pinned staging
        self.replays = 0
        self._hc_src = None  # the head-class list last copied into the static buffers
        self._hc = None
        self._window = None  # (sink, local) the graphs were captured with

    # -- public -------------------------------------------------------------------------------
    def size_for(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def run(self, ids, positions, slots, plan: AttentionPlan, cache, head_classes):
        """Replay the graph for this decode batch; None when it is not a pure decode batch we can serve."""
        n = len(ids)
        if cache is not self.cache or n == 0 or plan.num_qblocks != n or plan.num_tokens != n:
            return None
        if np.any(plan.qb_len != 1):
            return None
        size = self.size_for(n)
        if size is None or self._pages_per_list(plan) > self._list_capacity(plan):
            return None
        if self.sparse and (np.ndim(slots) != 2 or _visit_pages(plan) > self.visit_pages):
            return None
        if self._window != (plan.sink, plan.local):
            self.graphs.clear()  # the window may be baked into launches: capture again
            self._window = (plan.sink, plan.local)
        self._sync_head_classes(head_classes)
        g = self.graphs.get(size)
        if g is None:
            g = self.graphs[size] = self._capture(size, plan.sink, plan.local)
        st = self._staging[size]
        done = self._staged.get(size)
        if done is not None:
            done.synchronize()  # the previous upload from this pinned buffer has been read
        st[0, :n], st[1, :n], st[2:, :n] = ids, positions, slots
        st[0, n:], st[1, n:], st[2:, n:] = 0, 0, -1
        cur = self.cp.cuda.get_current_stream()
        g.io.set(st, stream=cur)
        self._staged[size] = cur.record()
        g.plan.update(plan)
        g.graph.launch(stream=cur)
        self.replays += 1
        return g.logits[:n]

    def capture_all(self, head_classes, sink: int = 0, local: int = 0) -> None:
        """Capture every size now (instead of at first use)."""
        self._sync_head_classes(head_classes)
        self._window = (sink, local)
        for s in self.sizes:
            if s not in self.graphs:
                self.graphs[s] = self._capture(s, sink, local)

    # -- internals ----------------------------------------------------------------------------
    def _list_capacity(self, plan: AttentionPlan) -> int:
        return self.max_pages

    @staticmethod
    def _pages_per_list(plan: AttentionPlan) -> int:
        return int(np.max(np.diff(plan.kv_indptr))) if plan.kv_indptr.size > 1 else 0

    def _sync_head_classes(self, head_classes) -> None:
        cp = self.cp
        if self._hc is None:
            self._hc = [cp.array(h, dtype=cp.int32) for h in head_classes]
        elif head_classes is not self._hc_src:
            for dst, src in zip(self._hc, head_classes, strict=True):
                dst[...] = cp.asarray(src, dtype=cp.int32)
        self._hc_src = head_classes

    def _capture(self, size: int, sink: int, local: int) -> _Captured:
        from ..backends.cuda_attention import CudaPlan

        cp = self.cp
        io = cp.empty((self._rows, size), cp.int64)
        io[0], io[1], io[2:] = 1, 0, -1  # token 1 at position 0, no K/V written
        slots = io[2:] if self.sparse else io[2]  # [2, size] (dense-pool, streaming-pool slots) or [size]
        rows = cp.arange(size, dtype=cp.int64)
        plan_cap = CudaPlan(max_qblocks=size, max_pages=2 * size * self.max_pages, max_seqs=size)
        if self.sparse:
            plan_cap.always_select = True  # the selector is in the graph; qb_keep / qb_refresh gate it
            plan_cap.fixed_visit_pages = self.visit_pages
        dummy = build_plan(
            BatchLayout([1] * size, [1] * size, [[0]] * size), self.page_size, sink=sink, local=local
        )
        plan_cap.update(dummy)
        cp.cuda.get_current_stream().synchronize()

        def fwd():
            return self.model.forward(io[0], io[1], slots, plan_cap, self.cache, self._hc, rows)

        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            fwd()  # warm-up: compiles kernels, picks cuBLAS algorithms, fills the pool
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = fwd()
            finally:
                graph = self.stream.end_capture()
            self.stream.synchronize()
        return _Captured(size, graph, io, rows, plan_cap, logits)


def _visit_pages(plan: AttentionPlan) -> int:
    """The longest page list a head visits at this decode step: a dense head with a budget visits at most
    budget + 1 pages (selection + newest), otherwise its whole list; a streaming head its window."""
    lens = np.diff(plan.kv_indptr).reshape(-1, 2)
    if lens.size == 0:
        return 0
    dense = lens[:, 0]
    if plan.qb_keep is not None:
        dense = np.where(plan.qb_keep > 0, np.minimum(dense, plan.qb_keep + 1), dense)
    return int(max(dense.max(), lens[:, 1].max()))


def decode_with_graphs(runner, graphs: DecodeGraphs, seqs: list, num_new: list[int]):
    """A dense runner's `run` for a pure decode batch through `graphs`; None (nothing done) for any other
    batch. For runners that are not wired natively (ModelRunner calls `graphs.run` itself, in both modes).
    """
    if not seqs or any(n != 1 for n in num_new):
        return None
    if getattr(runner, "layout", None) is not None:
        return None  # LServe mode needs the runner's own inputs (stream slots, selection state)
    ps = runner.page_size
    n = len(seqs)
    ids, pos, slots = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    for i, s in enumerate(seqs):
        p = s.num_cached
        np_ = len(s.prompt_ids)
        ids[i] = s.prompt_ids[p] if p < np_ else s.output_ids[p - np_]
        pos[i] = p
        slots[i] = s.page_table[p // ps] * ps + p % ps
    layout = BatchLayout([1] * n, [s.num_cached + 1 for s in seqs], [s.page_table for s in seqs])
    plan = build_plan(layout, ps, sink=runner.sink, local=runner.local)
    logits = graphs.run(ids, pos, slots, plan, runner.cache, runner.head_classes)
    if logits is not None:
        for s in seqs:
            s.num_cached += 1
    return logits


def attach_decode_graphs(runner, sizes=None) -> DecodeGraphs | None:
    """Give an existing ModelRunner decode graphs by wrapping its `run` (for runners not wired natively).

    Does nothing (returns the runner's graphs, or None) when the runner has graphs already, is not on
    the CUDA backend, or its EngineConfig turns CUDA Graphs off.
    """
    if getattr(runner, "graphs", None) is not None:
        return runner.graphs
    if runner.ops.name != "cuda" or not getattr(runner.ecfg, "cuda_graphs", True):
        return None
    graphs = DecodeGraphs(
        runner.model,
        runner.ops,
        runner.cache,
        runner.ecfg.max_num_seqs,
        runner.max_len,
        runner.page_size,
        sizes,
    )
    eager = runner.run

    def run(seqs, num_new, all_logits=False):
        out = None if all_logits else decode_with_graphs(runner, graphs, seqs, num_new)
        return eager(seqs, num_new, all_logits) if out is None else out

    runner.graphs, runner.run = graphs, run
    return graphs
