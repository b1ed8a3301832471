"""How KV memory is split: which KV heads live in the dense pool and which in the streaming pool.

LServe keeps two page pools. Dense (retrieval) heads keep every page of a sequence; streaming heads
keep only their sink pages and a ring of local pages, so their memory per sequence is constant in
context length. A KV head's class comes from the head pattern (static sparsity); its slot is its
index among the heads of its class in that layer, i.e. its row in the pool of its class.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from .. import geometry
from ..config import MAX_POOL_PAGES, ModelConfig, SparseConfig
from ..errors import InvalidRequestError


def head_slots(head_class: np.ndarray) -> np.ndarray:
    """Each KV head's row in the pool of its class: its index among the heads of its class in the layer."""
    slots = np.zeros(len(head_class), np.int32)
    for k in (0, 1):
        slots[head_class == k] = np.arange(int((head_class == k).sum()), dtype=np.int32)
    return slots


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

    @functools.cached_property
    def has_streaming(self) -> bool:
        """Whether any layer has a streaming head (asked several times a step by the planner: computed once)."""
        return any(bool((c == 1).any()) for c in self.head_class)

    @property
    def streaming_only(self) -> bool:
        """No dense head in any layer (static_sparsity 1): dense-pool pages hold no bytes, only page ids."""
        return not any(self.num_dense(i) for i in range(len(self.head_class)))

    def num_dense(self, layer: int) -> int:
        return int((self.head_class[layer] == 0).sum())

    def num_streaming(self, layer: int) -> int:
        return int((self.head_class[layer] == 1).sum())

    @staticmethod
    def sparse(
        sp: SparseConfig,
        classes: list[np.ndarray],
        max_chunk: int,
        max_len: int | None = None,
    ) -> KVLayout:
        """Layout for LServe mode; the ring holds the widest local window plus one prefill chunk (or, where that
        is longer, what a whole context of `max_len` tokens has past the sink pages). Sink and page budget are
        clipped to a whole context: the selection slots (max_seqs x KV heads x budget) are sized by the budget."""
        ps = sp.page_size
        window = max(sp.prefill_local, sp.decode_local)
        context = geometry.pages_for(max_len, ps) if max_len is not None else MAX_POOL_PAGES
        sink = min(geometry.sink_pages(max(sp.prefill_sink, sp.decode_sink), ps), context)
        layout = KVLayout(
            page_size=ps,
            head_class=tuple(np.asarray(c, np.int32) for c in classes),
            head_slot=tuple(head_slots(c) for c in classes),
            sink_pages=sink,
            ring_pages=geometry.ring_pages(window, max_chunk, ps, max_len, sink),
            sub_pages=sp.sub_pages,
            select_pages=geometry.budget_pages(sp.token_budget, ps),
        )
        # no dense head selects: its selections were dead memory, and refused when large
        if layout.streaming_only:
            layout = replace(layout, select_pages=0)
        return layout if max_len is None else layout.within(max_len)

    def within(self, max_len: int) -> KVLayout:
        """The page budget clipped to a context of `max_len` tokens (once the pool has bounded the context):
        a sequence never holds more pages, so a larger budget never selects, and its slots would be dead memory."""
        return replace(self, select_pages=min(self.select_pages, geometry.pages_for(max_len, self.page_size)))

    def heads(self, k0: int, k1: int) -> KVLayout:
        """The layout of KV heads k0..k1 only (a tensor-parallel rank's pools); the ring geometry is kept."""
        classes = tuple(c[k0:k1] for c in self.head_class)
        return replace(self, head_class=classes, head_slot=tuple(head_slots(c) for c in classes))

    def decode_visit_pages(self, sp: SparseConfig) -> int:
        """Longest page list a head visits at a decode step: a dense head's budget (plus the newest page), or
        a streaming head's decode window. It fixes the decode split count of captured CUDA Graphs."""
        window = geometry.window_visit_pages(sp.decode_sink, sp.decode_local, self.page_size)
        return max(geometry.visit_capacity(self.select_pages), window if self.has_streaming else 0, 1)

    def selection_bytes(self, cfg: ModelConfig, max_seqs: int) -> int:
        """Bytes of the page selector's selections (alloc_kv_cache's int32 sel_idx and sel_cnt, every layer: per
        sequence slot and KV head, a visit capacity of page ids and a count): sized by the budget, not by pages."""
        per_layer = max_seqs * cfg.num_kv_heads * (geometry.visit_capacity(self.select_pages) + 1)
        return 4 * cfg.num_layers * per_layer

    def bytes_per_page(self, cfg: ModelConfig, kv_bytes: int, stat_itemsize: int) -> tuple[int, int]:
        """K+V bytes of one dense-pool page (with its logical pages' key max / min, stored in the backend's float
        type of `stat_itemsize` bytes, as alloc_kv_cache does) and of one streaming-pool page over all layers;
        `kv_bytes`: one token's K and V of one head, scales included (kv/quant.KVFormat.kv_bytes)."""
        per_head = self.page_size * kv_bytes
        dense = sum(self.num_dense(i) for i in range(cfg.num_layers)) * per_head
        stats = 0
        if self.sub_pages:
            heads = sum(self.num_dense(i) for i in range(cfg.num_layers))
            stats = 2 * heads * self.sub_pages * cfg.head_dim * stat_itemsize
        stream = sum(self.num_streaming(i) for i in range(cfg.num_layers)) * per_head
        return dense + stats, stream


def page_bytes(
    cfg: ModelConfig, page_size: int, kv_bytes: int, layout: KVLayout | None, stat_itemsize: int
) -> tuple[int, int]:  # fmt: skip
    """(dense-pool page, streaming-pool page) bytes over all layers, what sizes the pools; without a layout
    (dense mode) one pool holds every KV head. `kv_bytes`, `stat_itemsize` as in `KVLayout.bytes_per_page`."""
    if layout is None:
        return cfg.num_layers * cfg.num_kv_heads * page_size * kv_bytes, 0
    return layout.bytes_per_page(cfg, kv_bytes, stat_itemsize)


def fit_context(
    max_len: int, num_pages: int, page_size: int, layout: KVLayout | None
) -> tuple[int, KVLayout | None]:
    """The context limit cut to what `num_pages` dense pages hold, and the layout's page budget clipped to it
    (KVLayout.within): the one rule the single-process engine and the tensor-parallel driver both apply."""
    max_len = pool_context(max_len, num_pages, page_size)
    return max_len, layout.within(max_len) if layout is not None else None


def pool_context(max_len: int, num_pages: int, page_size: int) -> int:
    """The context limit cut to what `num_pages` pages hold."""
    return min(max_len, num_pages * page_size)


class KVMemoryError(InvalidRequestError):
    """An explicit page count over the KV memory the device has; `fits`: the most dense pages that it holds."""

    def __init__(self, message: str, fits: int):
        super().__init__(message)
        self.fits = fits


def pool_pages(
    cfg: ModelConfig, page_size: int, kv_bytes: int, budget: int, layout: KVLayout | None, max_seqs: int,
    num_pages: int | None = None, *, stat_itemsize: int, limit: int | None = None,
) -> tuple[int, int]:  # fmt: skip
    """(dense-pool pages, streaming-pool pages) for `budget` bytes of KV memory, or `num_pages` dense pages,
    which must fit in `limit` bytes (Ops.kv_limit_bytes); `kv_bytes`, `stat_itemsize` as in
    `KVLayout.bytes_per_page` (a quantized cache fits more pages in the same budget).

    The page selector's selections (`KVLayout.selection_bytes`) come out of the memory first. The streaming pool
    holds every running sequence's sink + ring pages, within 30% of the rest (all of it where no head is dense:
    then a dense page holds no bytes, only an id, and the pool is MAX_POOL_PAGES ids); beside `num_pages` dense
    pages, within what they leave of `budget` too (it took its 30% on top of them, past kv_memory_fraction, and
    refused a page count that fitted the device as needing more), and always one whole sequence's."""
    dense_b, stream_b = page_bytes(cfg, page_size, kv_bytes, layout, stat_itemsize)
    per_seq = layout.stream_pages_per_seq if layout is not None else 0
    sel_b = layout.selection_bytes(cfg, max_seqs) if layout is not None else 0
    room = budget if not num_pages else limit
    if room is not None:
        _check_selections_fit(room, sel_b, dense_b, layout, max_seqs)
        room -= sel_b
    share = (0.3 if dense_b else 1.0) * (budget - sel_b)
    if num_pages:
        share = min(share, budget - sel_b - num_pages * dense_b)
    stream = max(per_seq, min(max_seqs * per_seq, int(share // stream_b))) if per_seq else 0
    if not num_pages:
        _check_stream_fits(room, per_seq * stream_b, dense_b)
        return (_fit(room - stream * stream_b, dense_b) if dense_b else MAX_POOL_PAGES), stream
    need = pools_bytes(
        cfg, page_size, kv_bytes, layout, max_seqs, num_pages, stream, stat_itemsize=stat_itemsize
    )
    if limit is not None and need > limit:
        # LServe's pools beside the pages asked for: without them the total read as the pages' own
        dense_gib, stream_gib, sel_gib = (b / 2**30 for b in (num_pages * dense_b, stream * stream_b, sel_b))
        parts = (
            f" (the dense pages {dense_gib:.2f}, the streaming pool {stream_gib:.2f}, the page selections {sel_gib:.2f})"
            if layout is not None
            else ""
        )
        raise KVMemoryError(
            f"num_kv_pages={num_pages} needs {need / 2**30:.1f} GiB of KV memory{parts}; this device has "
            f"{max(limit, 0) / 2**30:.1f} GiB for it: ask for fewer pages or leave num_kv_pages unset",
            max(room - stream * stream_b, 0) // dense_b if dense_b else 0,
        )
    return num_pages, stream


def pools_bytes(
    cfg: ModelConfig, page_size: int, kv_bytes: int, layout: KVLayout | None, max_seqs: int, num_pages: int,
    num_stream_pages: int, *, stat_itemsize: int,
) -> int:  # fmt: skip
    """Bytes of the KV pools `pool_pages` sized: the dense pages, the streaming pool and the page selections."""
    dense_b, stream_b = page_bytes(cfg, page_size, kv_bytes, layout, stat_itemsize)
    sel_b = layout.selection_bytes(cfg, max_seqs) if layout is not None else 0
    return num_pages * dense_b + num_stream_pages * stream_b + sel_b


def _check_selections_fit(
    room: int, sel_b: int, dense_b: int, layout: KVLayout | None, max_seqs: int
) -> None:
    """The page selector's selections must leave room for a dense page: a budget as long as the context at a
    long context limit, with many sequences, asks for more than the device has (a crash when allocated). Where
    not even a page fits, the pools' own errors say so."""
    if sel_b and dense_b <= room < sel_b + dense_b:
        raise InvalidRequestError(
            f"the page selections ({max_seqs} sequences x {geometry.visit_capacity(layout.select_pages)} pages a KV "
            f"head, every layer: {sel_b / 2**30:.1f} GiB) do not fit the KV memory ({max(room, 0) / 2**30:.1f} GiB); "
            f"lower the sparse token_budget, max_num_seqs or max_model_len"
        )


def _check_stream_fits(budget: int, seq_stream_b: int, dense_b: int) -> None:
    """One sequence's streaming pages (sink + local window) must leave room for a dense page: when they are
    what does not fit, say so (the dense pool's 'holds no KV page' would blame the budget)."""
    if dense_b <= budget < seq_stream_b + dense_b:
        raise InvalidRequestError(
            f"the streaming pool (sink + local window, {seq_stream_b / 2**20:.1f} MiB a sequence) does not fit "
            f"the KV memory budget ({max(budget, 0) / 2**20:.1f} MiB); lower the sparse sink / local windows or "
            f"raise kv_memory_fraction"
        )


def _fit(budget: int, per_page: int) -> int:
    """Pages of `per_page` bytes in `budget` bytes; a budget that holds none is an error, not one page."""
    pages = int(budget // per_page)
    if pages < 1:
        raise InvalidRequestError(
            f"the KV memory budget ({max(budget, 0) / 2**20:.1f} MiB) holds no KV page ({per_page / 2**20:.2f} "
            f"MiB); raise kv_memory_fraction, free device memory, or set num_kv_pages"
        )
    return min(pages, MAX_POOL_PAGES)


def kv_summary(
    fmt_name: str, pages: int, page_size: int, token_bytes: int, streaming_only: bool = False
) -> str:
    """The KV cache in one line (the engine's startup logs): format, capacity in tokens, bytes per token; with
    `streaming_only` (no dense head) `pages` are the streaming pool's, which holds sinks and local windows."""
    what = " (streaming heads only: each sequence keeps its sink + local window)" if streaming_only else ""
    return (f"KV cache {fmt_name}{what}: {pages} pages x {page_size} tokens = {pages * page_size} tokens, "
            f"{token_bytes / 1024:.1f} KiB per token")  # fmt: skip
