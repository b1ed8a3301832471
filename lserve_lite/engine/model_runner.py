"""Turns a scheduled batch into a step's host inputs and plan, runs it on the backend, returns logits."""

from __future__ import annotations

from functools import partial

import numpy as np

from ..backends.base import Array, Executor, Ops, StepInputs
from ..config import MAX_MODEL_LEN, EngineConfig, ModelConfig, SparseConfig
from ..errors import InvalidRequestError
from ..geometry import budget_pages, pages_for, ring_slot
from ..kv.block_manager import PageOp
from ..kv.layout import KVLayout
from ..kv.quant import KVFormat
from ..models.llama import LlamaModel
from ..sampling_params import is_int
from ..sequence import Sequence
from ..sparse.plan import BatchLayout, build_plan
from ..sparse.selector import refresh_due


class ModelRunner:
    """Owns the model and the KV cache of one backend.

    A step is prepared on the host (`prepare`: token ids, positions, KV slots, the LServe plan), then handed
    to the backend's executor, FlashInfer style: `executor.plan` does the backend's host work (uploads,
    device plans, the choice of a CUDA Graph), `executor.run` only launches or replays. The runner never
    asks which backend it runs on.
    """

    def __init__(
        self, cfg: ModelConfig, weights: dict, ops: Ops, ecfg: EngineConfig, max_len: int, num_pages: int,
        layout: KVLayout | None = None, num_stream_pages: int = 0, model: LlamaModel | None = None,
        executor: Executor | None = None, kv_format: KVFormat | None = None,
    ):  # fmt: skip
        """`max_len`: the engine's context limit (already clipped to the KV pool); `model`: an already built
        model on this backend (benchmarks with random weights made on the device); `executor`: one that runs
        the steps elsewhere, with its own model and KV cache (tensor-parallel workers, engine/tp_group.py);
        `kv_format`: the KV cache's format (None: the backend's float type)."""
        self.cfg, self.ops, self.ecfg = cfg, ops, ecfg
        self.page_size = ecfg.page_size
        self.max_len = max_len
        self.layout = layout
        self.sink = self.local = 0
        if layout is None:
            self.head_classes = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
        else:
            self.head_classes = [np.asarray(c, np.int32) for c in layout.head_class]
        if executor is None:
            self.model = model if model is not None else LlamaModel(cfg, weights, ops, max_len)
            self.cache = ops.alloc_kv(
                cfg, self.page_size, num_pages, layout, num_stream_pages, ecfg.max_num_seqs, kv_format
            )
            executor = ops.executor(self.model.forward, self.cache, ecfg, layout, max_len)
            self._copy = partial(ops.copy_stream_pages, self.cache)
            self._clear = partial(ops.clear_pages, self.cache)
        else:
            self._copy, self._clear = executor.copy_stream_pages, executor.clear_pages
        self.executor = executor
        # each sequence's page-selection count once the step last prepared has run (`advance` records it)
        self._counts: list[tuple[Sequence, int]] = []

    def set_head_classes(self, classes: list[np.ndarray], sink: int, local: int) -> None:
        """Public hook for calibration: in dense mode, make chosen KV heads streaming heads (1) with a
        sink/local window, in the dense pool (memory is not saved this way; attention is the same)."""
        if self.layout is not None:
            raise ValueError("head classes of an LServe-mode runner come from its head pattern")
        checked = self._checked_classes(classes)
        streaming = any(np.any(c == 1) for c in checked)
        # a window of no token left a streaming head's queries nothing to attend to (NaN logits)
        for name, v, lo in (("sink", sink, 0), ("local", local, 1 if streaming else 0)):
            if not (is_int(v) and lo <= v <= MAX_MODEL_LEN):
                raise InvalidRequestError(
                    f"{name} must be an integer in [{lo}, {MAX_MODEL_LEN}], got {v!r:.40}"
                )
        self.head_classes, self.sink, self.local = checked, int(sink), int(local) if streaming else 0

    def _checked_classes(self, classes: object) -> list[np.ndarray]:
        """`set_head_classes`' classes as int32 arrays, checked before any step reads them: a layer or KV head too many
        or too few failed mid-forward (a reshape, an IndexError) or was ignored, and a class other than 0 / 1 ran as
        something else (NaN logits for -1)."""
        L, H = self.cfg.num_layers, self.cfg.num_kv_heads
        got = [np.asarray(c) for c in classes] if isinstance(classes, (list, tuple, np.ndarray)) else None
        if got is None or len(got) != L or any(c.shape != (H,) or not np.isin(c, (0, 1)).all() for c in got):
            raise InvalidRequestError(
                f"head classes must be {L} layers of {H} KV heads, each 0 (dense) or 1 (streaming)"
            )
        return [c.astype(np.int32) for c in got]

    def apply_page_ops(self, page_ops: list[PageOp]) -> None:
        """Run the block manager's page ops in order: streaming-pool copies (prefix-cache snapshots) and clears
        of pages handed out (kv/block_manager.py)."""
        for kind, a, b in page_ops:
            (self._copy if kind == "copy" else self._clear)(np.asarray(a, np.int64), np.asarray(b, np.int64))

    def run(
        self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False, ids: Array | None = None
    ) -> Array:
        """Process each sequence's next `num_new` tokens (`forward`, then `advance`); backend logits of every last
        row (or all rows)."""
        logits = self.forward(seqs, num_new, all_logits, ids)
        self.advance(seqs, num_new)
        return logits

    def advance(self, seqs: list[Sequence], num_new: list[int]) -> None:
        """Record that the step last prepared ran: each sequence's next `num_new` tokens' K/V written, its
        page-selection count moved on (not in `prepare`: a forward a Ctrl-C cut short, run again, selected one
        step off the uninterrupted run's schedule)."""
        for seq, n in zip(seqs, num_new):
            seq.num_cached += n
        for seq, count in self._counts:
            seq.decode_steps = count
        self._counts = []

    def forward(
        self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False, ids: Array | None = None
    ) -> Array:
        """`run`'s forward, the sequences not advanced: the engine records that with the step's tokens, so a Ctrl-C
        between the two cannot leave a sequence computed but never sampled. `ids`: the step's token ids as a backend
        array, when they are the previous step's samples still on the device (the engine's overlapped decode; the
        host holds placeholders for them)."""
        step = self.prepare(seqs, num_new, all_logits)
        if ids is not None:
            step.ids = ids
        return self.executor.run(self.executor.plan(step))

    def ids_row(self, n: int) -> Array | None:
        """Where the next n-row decode step reads its token ids on the device, if the executor has such a
        place (the overlapped step samples into it: no copy)."""
        return self.executor.ids_row(n)

    def prepare(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False) -> StepInputs:
        """Host inputs of one step; the sequences' page-selection counts after it are kept for `advance`."""
        self._counts = []
        ids, pos, slots, plan, rows = self._inputs(seqs, num_new)
        rows = np.arange(len(ids), dtype=np.int64) if all_logits else rows
        return StepInputs(ids, pos, slots, plan, rows, self.head_classes)

    def _inputs(self, seqs: list[Sequence], num_new: list[int]):
        """Host inputs of one step: token ids, positions, KV slots ([N], or [2, N] dense-pool and
        streaming-pool slots in LServe mode), the host plan and the last row of each sequence (every row of a
        prompt chunk whose token logprobs were asked for)."""
        ids, pos, slots, stream_slots, rows = [], [], [], [], []  # flat Python ints
        tables = [seq.page_array() for seq in seqs]
        ps, lay = self.page_size, self.layout
        for seq, n, table in zip(seqs, num_new, tables):
            start = seq.num_cached
            ids.extend(seq.token_range(start, start + n))
            if n == 1:  # a decode row: plain ints (numpy on one element costs more than the arithmetic)
                pos.append(start)
                slots.append(int(table[start // ps]) * ps + start % ps)
                if lay is not None:
                    stream_slots.append(self._stream_slots(seq, start))
            else:
                p = np.arange(start, start + n)
                pos.extend(p.tolist())
                slots.extend((table[p // ps].astype(np.int64) * ps + p % ps).tolist())
                if lay is not None:
                    stream_slots.extend(self._stream_slots(seq, p).tolist())
            rows.extend(range(len(ids) - n, len(ids)) if seq.wants_prompt_logprobs else [len(ids) - 1])
        layout = BatchLayout(
            q_lens=list(num_new),
            ctx_lens=[s.num_cached + n for s, n in zip(seqs, num_new)],
            page_tables=tables,
        )
        ring = None
        if lay is not None:
            self._sparse_layout(layout, seqs, num_new)
            ring = (lay.sink_pages, lay.ring_pages) if lay.has_streaming else None
        plan = build_plan(layout, ps, sink=self.sink, local=self.local, ring=ring,
                          group_reduce=self.ecfg.sparse.group_reduce)  # fmt: skip
        slot_arr = np.asarray(slots, np.int64)
        if lay is not None:
            slot_arr = np.stack([slot_arr, np.asarray(stream_slots, np.int64)])
        return (
            np.asarray(ids, np.int64),
            np.asarray(pos, np.int64),
            np.ascontiguousarray(slot_arr, dtype=np.int64),
            plan,
            np.asarray(rows, np.int64),
        )

    def _stream_slots(self, seq: Sequence, p: int | np.ndarray) -> int | np.ndarray:
        """Streaming-pool slots of positions p: an int answered in Python ints (a decode row: no array of its whole
        streaming table), or an array; -1 without streaming heads."""
        lay, ps = self.layout, self.page_size
        one = isinstance(p, int)
        if not lay.has_streaming:
            return -1 if one else np.full(p.shape, -1, np.int64)
        idx = ring_slot(p // ps, lay.sink_pages, lay.ring_pages)
        return (seq.stream_table if one else np.asarray(seq.stream_table, np.int64))[idx] * ps + p % ps

    def _sparse_layout(self, layout: BatchLayout, seqs: list[Sequence], num_new: list[int]) -> None:
        """Per-sequence windows and page-selection settings (decode vs prefill, per-request knobs). A decode row
        whose pages all fit its budget selects nothing (budget 0: its dense heads visit the whole list, the pages
        a selection would keep): no selector work for it, and a step of such rows replays the graph without the
        selector's launches. Its selection count restarts, so the first step past the budget selects anew; a
        prefill row restarts it too (the first decode step after a prefill selects)."""
        windows, keep, refresh, counts = [], [], [], []
        for seq, n in zip(seqs, num_new):
            sp: SparseConfig = seq.sparse or self.ecfg.sparse
            if seq.decodes(n):
                windows.append((sp.decode_sink, sp.decode_local) if self.layout.has_streaming else (0, 0))
                budget = budget_pages(sp.token_budget, self.page_size) if self.layout.select_pages else 0
                if budget and pages_for(seq.num_cached + 1, self.page_size) > budget:
                    if seq.sel_slot < 0:  # row -1 is another sequence's: it would select there, silently
                        raise RuntimeError("a selecting decode row without a page-selection slot")
                    refresh.append(int(refresh_due(seq.decode_steps, sp.select_interval)))
                    counts.append(seq.decode_steps + 1)
                else:  # every page fits (or no selection at all): nothing to select, the count restarts
                    budget = 0
                    counts.append(0)
                    refresh.append(0)
                keep.append(budget)
            else:  # a prefill chunk (a harness's teacher-forced outputs too): the next decode step selects anew
                windows.append((sp.prefill_sink, sp.prefill_local) if self.layout.has_streaming else (0, 0))
                keep.append(0)
                refresh.append(0)
                counts.append(0)
        layout.stream_tables = [s.stream_table for s in seqs]
        layout.windows = windows
        layout.sel_slots = [s.sel_slot for s in seqs]
        layout.sel_keep = keep
        layout.sel_refresh = refresh
        self._counts = list(zip(seqs, counts))
