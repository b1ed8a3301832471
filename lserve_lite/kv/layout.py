"""How KV memory is split: which KV heads live in the dense pool and which in the streaming pool.

LServe keeps two page pools. Dense (retrieval) heads keep every page of a sequence; streaming heads
keep only their sink pages and a ring of local pages, so their memory per sequence is constant in
context length. A KV head's class comes from the head pattern (static sparsity); its slot is its
index among the heads of its class in that layer, i.e. its row in the pool of its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig, SparseConfig


@dataclass(frozen=True)
class KVLayout:
    """Per-layer head classes and slots, and the streaming ring geometry (in pages)."""

    page_size: int
    head_class: tuple[np.ndarray, ...]  # per layer [Hkv] int32: 0 dense, 1 streaming
    head_slot: tuple[np.ndarray, ...]  # per layer [Hkv] int32: row in its class's pool
    sink_pages: int = 0
    ring_pages: int = 0
    sub_pages: int = 0  # > 0: keep logical-page key stats for the page selector
    select_pages: int = 0  # > 0: decode page budget per dense head (token_budget / page_size)

    @property
    def stream_pages_per_seq(self) -> int:
        return self.sink_pages + self.ring_pages if self.has_streaming else 0

    @property
    def has_streaming(self) -> bool:
        return any(bool((c == 1).any()) for c in self.head_class)

    def num_dense(self, layer: int) -> int:
        return int((self.head_class[layer] == 0).sum())

    def num_streaming(self, layer: int) -> int:
        return int((self.head_class[layer] == 1).sum())

    def stream_page_index(self, lpage: int) -> int:
        """Index in a sequence's streaming page table that holds logical page `lpage` (sink, then ring)."""
        if lpage < self.sink_pages:
            return lpage
        return self.sink_pages + (lpage - self.sink_pages) % self.ring_pages

    @staticmethod
    def dense(cfg: ModelConfig, page_size: int) -> KVLayout:
        zeros = np.zeros(cfg.num_kv_heads, np.int32)
        slots = np.arange(cfg.num_kv_heads, dtype=np.int32)
        return KVLayout(page_size, (zeros,) * cfg.num_layers, (slots,) * cfg.num_layers)

    @staticmethod
    def sparse(cfg: ModelConfig, sp: SparseConfig, classes: list[np.ndarray], max_chunk: int) -> KVLayout:
        """Layout for LServe mode; the ring holds the widest local window plus one prefill chunk."""
        ps = sp.page_size
        slots = []
        for c in classes:
            s = np.zeros_like(c)
            for k in (0, 1):
                s[c == k] = np.arange(int((c == k).sum()))
            slots.append(s.astype(np.int32))
        window = max(sp.prefill_local, sp.decode_local)
        return KVLayout(
            page_size=ps,
            head_class=tuple(np.asarray(c, np.int32) for c in classes),
            head_slot=tuple(slots),
            sink_pages=math.ceil(max(sp.prefill_sink, sp.decode_sink) / ps),
            ring_pages=math.ceil((window + max_chunk) / ps) + 1,
            sub_pages=sp.sub_pages,
            select_pages=sp.token_budget // ps,
        )

    def bytes_per_page(self, cfg: ModelConfig, itemsize: int) -> tuple[int, int]:
        """K+V bytes of one dense-pool page and one streaming-pool page over all layers."""
        per_head = 2 * self.page_size * cfg.head_dim * itemsize
        dense = sum(self.num_dense(i) for i in range(cfg.num_layers)) * per_head
        stats = 0
        if self.sub_pages:
            stats = (
                2 * sum(self.num_dense(i) for i in range(cfg.num_layers)) * self.sub_pages * cfg.head_dim * 4
            )
        stream = sum(self.num_streaming(i) for i in range(cfg.num_layers)) * per_head
        return dense + stats, stream
