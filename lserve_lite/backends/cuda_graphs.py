"""The CUDA backend's executor: decode steps replay CUDA Graphs, every other step runs eagerly.

A graph is captured lazily per batch size (1, 2, 4, ... up to max_num_seqs). Each captured size owns static
device inputs (token ids, positions, slots), a device plan of fixed capacity (CudaPlan: up to `size` query
blocks, ceil(max_len / page_size) pages per sequence and class) and static per-layer head-class buffers.
`plan()` copies a step's host arrays into them (ids, positions and slots lie in front of the plan: one pinned
copy a step; ids still on the device, the previous step's samples under the engine's overlapped step, were sampled
straight into the graph's id row, `ids_row`, or are copied there on the device); `run()` launches the graph: one
launch instead of ~10 per layer.

A batch of n decode rows runs in the smallest captured size >= n: padding rows get token 0 at position 0
and slot -1 (their K/V is not written) and lie past the plan's live query blocks (attention skips them);
their logits rows are dropped. Intermediates live in a private CuPy memory pool that nothing else allocates
from, so eager steps between replays cannot reuse the graphs' memory.

LServe mode (a two-pool sparse cache): the static inputs hold both KV slots of each row, and the plan
carries the per-block windows and page-selection fields as data. Each size has two graphs over the same static
buffers: the step that runs the page selector (`CudaPlan(always_select=True)`; blocks whose refresh flag is 0 exit
at once on the device) and, for steps where no sequence refreshes its selection (select_interval - 1 of every
select_interval steps), one captured without the selector's launches (`reuse`; those early-exit launches cost
~5 us per layer on an H200). The two are captured together (a capture resets the rows they share, so it must
come before the sampler writes a step's ids there) and never run at once (one stream), so the reuse graph's
intermediates reuse the first graph's memory from the private pool. The decode split count is fixed at capture
from `visit_pages` (KVLayout.decode_visit_pages); a batch whose lists are longer (a wider per-request window)
runs eagerly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..sparse.plan import BatchLayout, build_plan
from .base import Array, EagerExecutor, Forward, KVCache, StepInputs
from .cuda_attention import CudaPlan, plan_offsets
from .memory import LOGIT_BYTES, MemoryNeed

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def graph_sizes(max_num_seqs: int, sizes: tuple[int, ...] = DEFAULT_SIZES) -> list[int]:
    """The batch sizes captured (each at its first use): `sizes` up to max_num_seqs, and max_num_seqs itself up to
    the largest default."""
    out = [s for s in sizes if s <= max_num_seqs]
    if max_num_seqs not in out and max_num_seqs <= max(DEFAULT_SIZES):
        out.append(max_num_seqs)
    return sorted(set(out or [max_num_seqs]))


def graph_needs(
    vocab: int, max_num_seqs: int, max_len: int, page_size: int, sparse: bool
) -> list[MemoryNeed]:
    """What the captured sizes hold once each has run: every graph its own float32 logits (LServe: two graphs a size)
    and every size a device plan of 2 x size x ceil(max_len / page_size) page pairs (`_capture`)."""
    sizes, graphs, pages = graph_sizes(max_num_seqs), 2 if sparse else 1, math.ceil(max_len / page_size)
    rows = sum(sizes)
    plans = sum(4 * plan_offsets(s, s, 2 * s * pages)["kv_pl"][1] for s in sizes)
    two = ", two graphs a size" if sparse else ""
    return [
        MemoryNeed(graphs * rows * vocab * LOGIT_BYTES, f"CUDA Graphs of 1-{sizes[-1]} rows ({rows} in all{two}) x "
                   f"vocab {vocab}", "decode graphs' logits", "--max-num-seqs (max_num_seqs=)"),
        MemoryNeed(plans, f"CUDA Graphs of {rows} rows in all x {pages} pages of context", "decode graphs' plans",
                   "--max-model-len (max_model_len=)"),
    ]  # fmt: skip


@dataclass
class _Captured:
    """One batch size: its graph, static buffers and device plan (all referenced while the graph lives:
    freed memory would be reused)."""

    size: int
    graph: object
    io: Array  # [rows, size] int64: ids, positions, slots (dense pool [, streaming pool])
    rows: Array  # [size] int64 logit rows (arange): the graph reads it at every replay
    plan: CudaPlan
    logits: Array


@dataclass
class _Replay:
    graph: _Captured
    n: int


class GraphExecutor:
    """CUDA Graphs for pure decode batches up to max_num_seqs rows; an EagerExecutor for the rest."""

    def __init__(
        self, ops, forward: Forward, cache: KVCache, max_num_seqs: int, max_len: int,
        visit_pages: int | None = None, sizes: tuple[int, ...] = DEFAULT_SIZES,
    ):  # fmt: skip
        import cupy as cp

        self.cp, self.forward, self.cache = cp, forward, cache
        self.eager = EagerExecutor(ops, forward, cache)
        self.sizes = graph_sizes(max_num_seqs, sizes)
        self.page_size = cache.page_size
        self.max_pages = math.ceil(max_len / cache.page_size)
        self.sparse = cache.sparse
        self.visit_pages = (visit_pages or self.max_pages) if self.sparse else None
        # streaming heads only (no dense-pool heads in any layer): no head visits the plan's dense lists, whole
        # contexts long, so they do not bound the captured decode window (they sent every step eagerly)
        self.dense_heads = not self.sparse or any(int(k.shape[1]) for k in cache.k)
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graphs: dict[int, _Captured] = {}
        self.reuse: dict[int, _Captured] = {}  # LServe: the same steps without the page selector's launches
        self._rows = 4 if self.sparse else 3
        self._staging = {s: np.empty((self._rows, s), np.int64) for s in self.sizes}  # uploaded with the plan
        self.replays = 0
        self.replay_events: list | None = None  # a list (benchmarks): (start, end) CUDA events of each replay
        self._hc_src: list | None = None  # the head-class list last copied into the static buffers
        self._hc: list | None = None
        self._window: tuple[int, int] | None = None  # (sink, local) the graphs were captured with

    def size_for(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def plan(self, step: StepInputs):
        """Stage a decode batch into its graph's static buffers, or plan it eagerly."""
        size = self._graph_size(step)
        if size is None:
            return self.eager.plan(step)
        plan, n = step.plan, len(step.ids)
        if self._window != (plan.sink, plan.local):
            self.graphs.clear()  # the window may be baked into launches: capture again
            self.reuse.clear()
            self._window = (plan.sink, plan.local)
        self._sync_head_classes(step.head_classes)
        g = self.graphs.get(size)
        if g is None:
            g = self._capture_size(size, plan.sink, plan.local)
        # LServe step without a refresh: the size's reuse graph
        replay = self.reuse[size] if self.sparse and not plan.refreshes else g
        st = self._staging[size]
        on_host = isinstance(step.ids, np.ndarray)
        st[0, :n], st[1, :n], st[2:, :n] = step.ids if on_host else 0, step.positions, step.slots
        st[0, n:], st[1, n:], st[2:, n:] = 0, 0, -1
        # the rows (g.io) and the plan in one copy; ids on the device keep row 0 out of it (padding rows keep
        # the valid ids they hold)
        g.plan.update(plan, prefix=st, keep=0 if on_host else size * 8)
        if not on_host and step.ids.data.ptr != g.io.data.ptr:
            g.io[0, :n] = step.ids  # not sampled into `ids_row`: copied on the device behind its sampling
        return _Replay(replay, n)

    def ids_row(self, n: int) -> Array | None:
        """Where the replay of an n-row decode batch reads its token ids: the sampler writes the next step's
        there, and that step's upload leaves them (None before that size's graph is captured)."""
        g = self.graphs.get(self.size_for(n))
        return None if g is None else g.io[0, :n]

    def run(self, prepared) -> Array:
        """Replay (logits: a view of the graph's static output) or run the eager step."""
        if not isinstance(prepared, _Replay):
            return self.eager.run(prepared)
        stream = self.cp.cuda.get_current_stream()
        start = stream.record() if self.replay_events is not None else None
        prepared.graph.graph.launch(stream=stream)
        if start is not None:
            self.replay_events.append((start, stream.record()))
        self.replays += 1
        return prepared.graph.logits[: prepared.n]

    def capture_all(self, head_classes: list, sink: int = 0, local: int = 0) -> None:
        """Capture every size now (instead of at first use)."""
        self._sync_head_classes(head_classes)
        self._window = (sink, local)
        for s in self.sizes:
            if s not in self.graphs:
                self._capture_size(s, sink, local)

    def _capture_size(self, size: int, sink: int, local: int) -> _Captured:
        """The graph of `size` rows and, in LServe mode, its reuse graph at once: a capture resets the rows the
        two share, which must happen before `ids_row` hands them to the sampler (a reuse graph captured at its
        first use replaced the step's sampled ids with the capture's placeholder token)."""
        g = self._capture(size, sink, local)
        if self.sparse:
            self.reuse[size] = self._capture(size, sink, local, share=g)
        self.graphs[size] = g  # last: a size is in `graphs` only with its reuse graph (a failure is redone)
        return g

    def _graph_size(self, step: StepInputs) -> int | None:
        """The captured size that serves this step, None when it is not a decode batch the graphs fit."""
        if not step.is_decode:
            return None
        plan = step.plan
        size = self.size_for(len(step.ids))
        longest = int(np.max(np.diff(plan.kv_indptr))) if plan.kv_indptr.size > 1 else 0
        if size is None or longest > self.max_pages:
            return None
        if self.sparse and (
            np.ndim(step.slots) != 2 or plan.decode_visit_pages(self.dense_heads) > self.visit_pages
        ):
            return None
        return size

    def _sync_head_classes(self, head_classes: list) -> None:
        cp = self.cp
        if self._hc is None:
            self._hc = [cp.array(h, dtype=cp.int32) for h in head_classes]
        elif head_classes is not self._hc_src:
            for dst, src in zip(self._hc, head_classes, strict=True):
                dst[...] = cp.asarray(src, dtype=cp.int32)
        self._hc_src = head_classes

    def _capture(self, size: int, sink: int, local: int, share: _Captured | None = None) -> _Captured:
        """A graph of the decode step of `size` rows; `share`: an LServe size's selector graph whose static
        buffers this one reads, captured without the page selector (its reuse graph)."""
        cp = self.cp
        if share is None:
            rows = cp.arange(size, dtype=cp.int64)
            plan = CudaPlan(
                max_qblocks=size, max_pages=2 * size * self.max_pages, max_seqs=size, always_select=self.sparse,
                fixed_visit_pages=self.visit_pages, prefix_bytes=self._rows * size * 8,
            )  # fmt: skip
            io = plan.prefix(np.int64, (self._rows, size))  # ids, positions, slots: uploaded with the plan
        else:
            io, rows, plan = share.io, share.rows, share.plan
        io[0], io[1], io[2:] = 1, 0, -1  # token 1 at position 0, no K/V written
        slots = io[2:] if self.sparse else io[2]  # [2, size] (dense-pool, streaming-pool slots) or [size]
        dummy = build_plan(
            BatchLayout([1] * size, [1] * size, [[0]] * size), self.page_size, sink=sink, local=local
        )
        plan.update(dummy)
        plan.refreshes = self.sparse and share is None  # read by the forward at capture: launch the selector?
        cp.cuda.get_current_stream().synchronize()

        def fwd():
            return self.forward(io[0], io[1], slots, plan, self.cache, self._hc, rows)

        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            fwd()  # warm-up: compiles kernels, picks cuBLAS algorithms, fills the pool
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                logits = fwd()
            finally:
                graph = self.stream.end_capture()
            self.stream.synchronize()
        return _Captured(size, graph, io, rows, plan, logits)
