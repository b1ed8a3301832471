"""Turns a scheduled batch into model inputs and a plan, runs the model, returns logits."""

from __future__ import annotations

import math

import numpy as np

from ..backends.base import Ops
from ..config import EngineConfig, ModelConfig, SparseConfig
from ..kv.layout import KVLayout
from ..models.llama import LlamaModel
from ..sparse.plan import AttentionPlan, BatchLayout, build_plan
from .sequence import Sequence


class ModelRunner:
    """Owns the model and the KV cache of one backend.

    On CUDA (EngineConfig.cuda_graphs) pure decode batches replay captured CUDA Graphs (engine/cuda_graph.py),
    in dense and in LServe mode; every other batch runs eagerly. Both paths get the same host inputs and the
    same host plan from `_inputs`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict,
        ops: Ops,
        ecfg: EngineConfig,
        num_pages: int,
        layout: KVLayout | None = None,
        num_stream_pages: int = 0,
        model: LlamaModel | None = None,
    ):
        self.cfg, self.ops, self.ecfg = cfg, ops, ecfg
        self.page_size = ecfg.page_size
        self.max_len = ecfg.resolve_max_len(cfg)
        # `model`: an already built model on this backend (benchmarks with random weights made on the device)
        self.model = model if model is not None else LlamaModel(cfg, weights, ops, self.max_len)
        self.layout = layout
        if layout is None:
            self.cache = ops.alloc_kv(cfg, num_pages, self.page_size)
            self.set_head_classes([np.zeros(cfg.num_kv_heads, np.int32)] * cfg.num_layers, sink=0, local=0)
        else:
            self.cache = ops.alloc_sparse_kv(cfg, layout, num_pages, num_stream_pages, ecfg.max_num_seqs)
            self.head_classes = [ops.upload(c) for c in layout.head_class]
            self.cache.head_class = self.head_classes
            self.cache.head_slot = [ops.upload(s) for s in layout.head_slot]
            self.sink = self.local = 0
        self.graphs = None
        if ops.name == "cuda" and ecfg.cuda_graphs:
            from .cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model, ops, self.cache, ecfg.max_num_seqs, self.max_len, self.page_size,
                visit_pages=self._graph_visit_pages(),
            )  # fmt: skip

    def _graph_visit_pages(self) -> int | None:
        """LServe decode graphs: the longest page list a head visits at a decode step (selected pages + the
        newest, or the streaming window). It fixes the decode kernel's split count at capture."""
        lay = self.layout
        if lay is None:
            return None
        sp, ps = self.ecfg.sparse, self.page_size
        window = (
            math.ceil(sp.decode_sink / ps) + math.ceil(sp.decode_local / ps) + 1 if lay.has_streaming else 0
        )
        return max(lay.select_pages + 1, window, 1)

    def set_head_classes(self, classes: list[np.ndarray], sink: int, local: int) -> None:
        """Dense-pool emulation of streaming heads (calibration, evaluation): per-layer KV-head classes
        (0 dense, 1 streaming) and their window; memory is not saved this way, attention is the same."""
        self.head_classes = [self.ops.upload(np.asarray(c, np.int32)) for c in classes]
        self.sink, self.local = sink, local if any(np.any(np.asarray(c) == 1) for c in classes) else 0

    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False):
        """Process each sequence's next `num_new` tokens; backend logits of every last row (or all rows)."""
        ids, pos, slots, plan, rows = self._inputs(seqs, num_new)
        logits = None
        if self.graphs is not None and not all_logits and all(n == 1 for n in num_new):
            # None unless the graphs can serve this batch (pure decode, fits a captured size and capacity)
            logits = self.graphs.run(ids, pos, slots, plan, self.cache, self.head_classes)
        if logits is None:
            logit_rows = np.arange(len(ids)) if all_logits else rows
            up = self.ops.upload
            logits = self.model.forward(
                up(ids), up(pos), up(slots), self.ops.prepare_plan(plan), self.cache, self.head_classes,
                up(logit_rows.astype(np.int64)),
            )  # fmt: skip
        for seq, n in zip(seqs, num_new):
            seq.num_cached += n
        return logits

    def _inputs(self, seqs: list[Sequence], num_new: list[int]):
        """Host inputs of one step: token ids, positions, KV slots ([N], or [2, N] dense-pool and
        streaming-pool slots in LServe mode), the host plan and the last row of each sequence."""
        ids, pos, slots, stream_slots, rows = [], [], [], [], []
        ps, lay = self.page_size, self.layout
        for seq, n in zip(seqs, num_new):
            start = seq.num_cached
            p = np.arange(start, start + n)
            ids.extend(_token_ids(seq, start, n))
            pos.append(p)
            first = start // ps  # only the pages this step writes (page tables grow with the context)
            table = np.asarray(seq.page_table[first : (start + n - 1) // ps + 1], np.int64)
            slots.append(table[p // ps - first] * ps + p % ps)
            if lay is not None:
                stream_slots.append(self._stream_slots(seq, p))
            rows.append(len(ids) - 1)
        layout = BatchLayout(
            q_lens=list(num_new),
            ctx_lens=[s.num_cached + n for s, n in zip(seqs, num_new)],
            page_tables=[s.page_table for s in seqs],
        )
        ring = None
        if lay is not None:
            self._sparse_layout(layout, seqs, num_new)
            ring = (lay.sink_pages, lay.ring_pages) if lay.has_streaming else None
        plan: AttentionPlan = build_plan(layout, ps, sink=self.sink, local=self.local, ring=ring)
        slot_arr = np.concatenate(slots)
        if lay is not None:
            slot_arr = np.stack([slot_arr, np.concatenate(stream_slots)])
        return (
            np.asarray(ids, np.int64),
            np.concatenate(pos).astype(np.int64),
            np.ascontiguousarray(slot_arr, dtype=np.int64),
            plan,
            np.asarray(rows, np.int64),
        )

    def _stream_slots(self, seq: Sequence, p: np.ndarray) -> np.ndarray:
        lay, ps = self.layout, self.page_size
        if not lay.has_streaming:
            return np.full(p.shape, -1, np.int64)
        lp = p // ps
        idx = np.where(
            lp < lay.sink_pages, lp, lay.sink_pages + (lp - lay.sink_pages) % max(lay.ring_pages, 1)
        )
        return np.asarray(seq.stream_table, np.int64)[idx] * ps + p % ps

    def _sparse_layout(self, layout: BatchLayout, seqs: list[Sequence], num_new: list[int]) -> None:
        """Per-sequence windows and page-selection settings (decode vs prefill, per-request knobs)."""
        windows, keep, refresh = [], [], []
        for seq, n in zip(seqs, num_new):
            sp: SparseConfig = seq.sparse or self.ecfg.sparse
            decoding = n == 1 and seq.num_cached >= len(seq.prompt_ids)
            if decoding:
                windows.append((sp.decode_sink, sp.decode_local) if self.layout.has_streaming else (0, 0))
                budget = sp.token_budget // self.page_size if self.layout.select_pages else 0
                keep.append(budget)
                refresh.append(int(seq.decode_steps % sp.select_interval == 0))
                seq.decode_steps += 1
            else:
                windows.append((sp.prefill_sink, sp.prefill_local) if self.layout.has_streaming else (0, 0))
                keep.append(0)
                refresh.append(0)
        layout.stream_tables = [s.stream_table for s in seqs]
        layout.windows = windows
        layout.sel_slots = [s.sel_slot for s in seqs]
        layout.sel_keep = keep
        layout.sel_refresh = refresh


def _token_ids(seq: Sequence, start: int, n: int) -> list[int]:
    """seq.all_ids[start : start + n] without concatenating the whole prompt (long contexts)."""
    np_ = len(seq.prompt_ids)
    if start + n <= np_:
        return seq.prompt_ids[start : start + n]
    if start >= np_:
        return seq.output_ids[start - np_ : start - np_ + n]
    return seq.prompt_ids[start:] + seq.output_ids[: start + n - np_]
