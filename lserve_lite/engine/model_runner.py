"""Turns a scheduled batch into model inputs and a plan, runs the model, returns logits."""

from __future__ import annotations

import numpy as np

from ..backends.base import Ops
from ..config import EngineConfig, ModelConfig
from ..models.llama import LlamaModel
from ..sparse.plan import BatchLayout, build_plan
from .sequence import Sequence


class ModelRunner:
    """Owns the model and the KV cache of one backend."""

    def __init__(self, cfg: ModelConfig, weights: dict, ops: Ops, ecfg: EngineConfig, num_pages: int):
        self.cfg, self.ops, self.ecfg = cfg, ops, ecfg
        self.page_size = ecfg.page_size
        self.max_len = ecfg.resolve_max_len(cfg)
        self.model = LlamaModel(cfg, weights, ops, self.max_len)
        self.cache = ops.alloc_kv(cfg, num_pages, self.page_size)
        self.set_head_classes([np.zeros(cfg.num_kv_heads, np.int32)] * cfg.num_layers, sink=0, local=0)

    def set_head_classes(self, classes: list[np.ndarray], sink: int, local: int) -> None:
        """Per-layer KV-head classes (0 dense, 1 streaming) and the streaming heads' prefill window."""
        self.head_classes = [self.ops.upload(np.asarray(c, np.int32)) for c in classes]
        self.sink, self.local = sink, local if any(np.any(np.asarray(c) == 1) for c in classes) else 0

    def run(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False) -> np.ndarray:
        """Process each sequence's next `num_new` tokens; backend logits of every last row (or all rows)."""
        ids, pos, slots, rows = [], [], [], []
        ps = self.page_size
        for seq, n in zip(seqs, num_new):
            start = seq.num_cached
            toks = seq.all_ids[start : start + n]
            p = np.arange(start, start + n)
            table = np.asarray(seq.page_table, np.int64)
            ids.extend(toks)
            pos.append(p)
            slots.append(table[p // ps] * ps + p % ps)
            rows.append(len(ids) - 1)
        layout = BatchLayout(
            q_lens=list(num_new),
            ctx_lens=[s.num_cached + n for s, n in zip(seqs, num_new)],
            page_tables=[s.page_table for s in seqs],
        )
        plan = self.ops.prepare_plan(build_plan(layout, ps, sink=self.sink, local=self.local))
        logit_rows = np.arange(len(ids)) if all_logits else np.asarray(rows)
        up = self.ops.upload
        logits = self.model.forward(
            up(np.asarray(ids, np.int64)),
            up(np.concatenate(pos).astype(np.int64)),
            up(np.concatenate(slots).astype(np.int64)),
            plan,
            self.cache,
            self.head_classes,
            up(logit_rows.astype(np.int64)),
        )
        for seq, n in zip(seqs, num_new):
            seq.num_cached += n
        return logits
