"""Attention plans: which KV pages each query block visits. Kernels only execute these.

A plan covers one forward step over a flattened batch of new tokens. Query tokens are grouped into
query blocks (one sequence each, at most `q_block` consecutive positions). For each query block and
each head class (0 = dense/retrieval head, 1 = streaming head) the plan lists the KV pages to visit,
as CSR arrays. The kernel applies the element mask (causal, and sink/local for streaming heads) only
where a page straddles a boundary. Arrays have fixed capacity so GPU decode can replay a CUDA Graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import ring_slot, streaming_bounds, streaming_pages, visit_capacity


@dataclass
class AttentionPlan:
    """Host (NumPy) plan; backends upload it into their own buffers."""

    page_size: int
    q_block: int
    num_tokens: int
    # Per query block.
    qb_seq: np.ndarray  # [nqb] int32 sequence slot in the batch
    qb_start: np.ndarray  # [nqb] int32 first row in the flattened token batch
    qb_len: np.ndarray  # [nqb] int32 query rows in the block
    qb_pos: np.ndarray  # [nqb] int32 position of the first query row
    # Per sequence.
    seq_ctx: np.ndarray  # [B] int32 tokens in the cache after this step (keys < seq_ctx are valid)
    # Per (query block, class): pages to visit, CSR over index qb * 2 + class.
    kv_indptr: np.ndarray  # [nqb * 2 + 1] int32
    kv_page: np.ndarray  # [nnz] int32 physical page ids
    kv_lpage: np.ndarray  # [nnz] int32 logical page index (key position = lpage * page_size + offset)
    # Streaming window, in tokens (used for class STREAMING only).
    sink: int = 0
    local: int = 0
    # Per query block streaming window (class 1); defaults to the scalars above.
    qb_sink: np.ndarray | None = None  # [nqb] int32
    qb_local: np.ndarray | None = None  # [nqb] int32
    # Decode page selection for dense heads (None: dense heads visit their whole class-0 list).
    # qb_keep[qb] > 0: dense heads visit only the pages the selector picked (at most qb_keep), stored by
    # the selector per (selection slot, KV head) as indices into the block's class-0 list.
    qb_slot: np.ndarray | None = None  # [nqb] int32 selection slot of the block's sequence
    qb_keep: np.ndarray | None = None  # [nqb] int32 page budget (0: no selection for this block)
    qb_refresh: np.ndarray | None = None  # [nqb] int32 1: recompute the selection this step
    group_reduce: str = "max"  # the selector's GQA group reduction (sparse/selector.py), one per engine

    def __post_init__(self):
        n = self.qb_seq.shape[0]
        if self.qb_sink is None:
            self.qb_sink = np.full(n, self.sink, np.int32)
        if self.qb_local is None:
            self.qb_local = np.full(n, self.local, np.int32)

    @property
    def selects(self) -> bool:
        return self.qb_keep is not None and bool((self.qb_keep > 0).any())

    @property
    def refreshes(self) -> bool:
        """Whether a selecting block picks its pages anew this step (the page selector runs; other selecting
        steps reuse the stored selection). A plan without refresh flags refreshes."""
        if not self.selects:
            return False
        return self.qb_refresh is None or bool((self.qb_refresh[self.qb_keep > 0] > 0).any())

    @property
    def num_qblocks(self) -> int:
        return int(self.qb_seq.shape[0])

    def subset(self, qbs: np.ndarray) -> AttentionPlan:
        """The plan restricted to query blocks `qbs` (same rows, sequences and page ids)."""
        qbs = np.asarray(qbs, np.int64)
        return self.regroup(qbs, [self.pages(int(qb), c) for qb in qbs for c in (0, 1)])

    def regroup(self, qbs: np.ndarray, lists: list) -> AttentionPlan:
        """Query blocks `qbs` of this plan (repeats allowed; same rows, sequences and windows) with new page
        lists: `lists` holds (pages, logical pages) of each block's class 0, then its class 1."""
        qbs = np.asarray(qbs, np.int64)
        indptr = np.concatenate([[0], np.cumsum([len(p) for p, _ in lists])]).astype(np.int32)
        cat = lambda i: np.concatenate([x[i] for x in lists] or [np.zeros(0, np.int32)]).astype(np.int32)  # noqa: E731
        opt = lambda a: None if a is None else a[qbs]  # noqa: E731
        return AttentionPlan(
            page_size=self.page_size, q_block=self.q_block, num_tokens=self.num_tokens,
            qb_seq=self.qb_seq[qbs], qb_start=self.qb_start[qbs], qb_len=self.qb_len[qbs], qb_pos=self.qb_pos[qbs],
            seq_ctx=self.seq_ctx, kv_indptr=indptr, kv_page=cat(0), kv_lpage=cat(1), sink=self.sink,
            local=self.local, qb_sink=self.qb_sink[qbs], qb_local=self.qb_local[qbs], qb_slot=opt(self.qb_slot),
            qb_keep=opt(self.qb_keep), qb_refresh=opt(self.qb_refresh), group_reduce=self.group_reduce,
        )  # fmt: skip

    def decode_visit_pages(self, dense_heads: bool = True) -> int:
        """The longest page list a head visits at this (decode) step: a dense head with a page budget visits
        at most geometry.visit_capacity(budget) pages, any other head its whole list (a window for streaming).
        `dense_heads` False (a cache without dense heads): the dense lists, which no head visits, do not count."""
        lens = np.diff(self.kv_indptr).reshape(-1, 2)
        if lens.size == 0:
            return 0
        if not dense_heads:
            return int(lens[:, 1].max())
        dense = lens[:, 0]
        if self.qb_keep is not None:
            dense = np.where(self.qb_keep > 0, np.minimum(dense, visit_capacity(self.qb_keep)), dense)
        return int(max(dense.max(), lens[:, 1].max()))

    def pages(self, qb: int, cls: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.kv_indptr[qb * 2 + cls], self.kv_indptr[qb * 2 + cls + 1]
        return self.kv_page[lo:hi], self.kv_lpage[lo:hi]


@dataclass
class BatchLayout:
    """What the model runner schedules this step, per sequence: new tokens and page tables."""

    q_lens: list[int]  # new tokens per sequence
    ctx_lens: list[int]  # cached tokens after this step
    page_tables: list[list[int] | np.ndarray]  # physical pages of each sequence, in logical order
    # LServe mode (all None in the dense baseline):
    stream_tables: list[list[int]] | None = None  # streaming-pool pages (sink pages, then the ring)
    windows: list[tuple[int, int]] | None = None  # per sequence (sink, local) of its streaming heads
    sel_slots: list[int] | None = None  # per sequence selection slot
    sel_keep: list[int] | None = None  # per sequence page budget (0 = no selection this step)
    sel_refresh: list[int] | None = None  # per sequence 1 = recompute its selection now


# Decode rows from which build_plan makes the plan's fields as arrays at once (_decode_plan): below it the block
# loop's Python costs less than the array calls' fixed cost (the 2-core host: 14 vs 42 us a dense row alone; from
# 8 to 16 rows the two cross, dense and LServe; 64 LServe rows: 1.04 ms vs 0.29-0.56 ms).
ARRAY_PLAN_ROWS = 12


def build_plan(
    layout: BatchLayout,
    page_size: int,
    q_block: int = 64,
    sink: int = 0,
    local: int = 0,
    ring: tuple[int, int] | None = None,
    group_reduce: str = "max",
) -> AttentionPlan:
    """Plan one step: dense heads visit every causal page; streaming heads sink + local pages only.

    With local == 0 and no per-sequence windows there are no streaming heads (the dense baseline):
    class 1 lists stay empty. `ring` = (sink_pages, ring_pages) maps streaming heads' logical pages
    onto the sequence's streaming-pool table; without it they share the dense page table.
    """
    if len(layout.q_lens) >= ARRAY_PLAN_ROWS and all(q == 1 for q in layout.q_lens):
        return _decode_plan(layout, page_size, q_block, sink, local, ring, group_reduce)
    return _general_plan(layout, page_size, q_block, sink, local, ring, group_reduce)


def _general_plan(
    layout: BatchLayout,
    page_size: int,
    q_block: int,
    sink: int,
    local: int,
    ring: tuple[int, int] | None,
    group_reduce: str,
) -> AttentionPlan:
    """build_plan block by block: any mix of prefill chunks and decode rows, streaming lists included."""
    qb_seq, qb_start, qb_len, qb_pos, qb_sink, qb_local = [], [], [], [], [], []
    qb_slot, qb_keep, qb_refresh = [], [], []
    indptr, pages, lpages = [0], [], []  # pages / lpages: int32 array segments, concatenated at the end
    count, row = 0, 0
    for s, (ql, ctx, table) in enumerate(zip(layout.q_lens, layout.ctx_lens, layout.page_tables)):
        pos0 = ctx - ql
        w_sink, w_local = layout.windows[s] if layout.windows else (sink, local)
        stable = layout.stream_tables[s] if ring else table
        # the sequence's causal pages converted once (a 256k-token decode row has 4096: one conversion, not a
        # Python int per page per block); a block's dense list is a prefix of them
        causal = np.asarray(table[: (ctx - 1) // page_size + 1] if ql else [], dtype=np.int32)
        for off in range(0, ql, q_block):
            n = min(q_block, ql - off)
            first, last = pos0 + off, pos0 + off + n - 1
            qb_seq.append(s)
            qb_start.append(row + off)
            qb_len.append(n)
            qb_pos.append(first)
            qb_sink.append(w_sink)
            qb_local.append(w_local)
            if layout.sel_keep is not None:
                qb_slot.append(layout.sel_slots[s])
                qb_keep.append(layout.sel_keep[s] if n == 1 else 0)
                qb_refresh.append(layout.sel_refresh[s])
            n_pages = last // page_size + 1
            pages.append(causal[:n_pages])
            lpages.append(np.arange(n_pages, dtype=np.int32))
            count += n_pages
            indptr.append(count)
            if w_local > 0:
                keep = streaming_pages(first, last, page_size, w_sink, w_local)
                pages.append(
                    np.asarray([stable[int(ring_slot(p, *ring)) if ring else p] for p in keep], np.int32)
                )
                lpages.append(np.asarray(keep, np.int32))
                count += len(keep)
            indptr.append(count)
        row += ql
    i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    sel = layout.sel_keep is not None
    return AttentionPlan(
        page_size=page_size,
        q_block=q_block,
        num_tokens=row,
        qb_seq=i32(qb_seq),
        qb_start=i32(qb_start),
        qb_len=i32(qb_len),
        qb_pos=i32(qb_pos),
        seq_ctx=i32(layout.ctx_lens),
        kv_indptr=i32(indptr),
        kv_page=np.concatenate(pages) if pages else i32([]),
        kv_lpage=np.concatenate(lpages) if lpages else i32([]),
        sink=sink,
        local=local,
        qb_sink=i32(qb_sink),
        qb_local=i32(qb_local),
        qb_slot=i32(qb_slot) if sel else None,
        qb_keep=i32(qb_keep) if sel else None,
        qb_refresh=i32(qb_refresh) if sel else None,
        group_reduce=group_reduce,
    )


def _decode_plan(
    layout: BatchLayout,
    page_size: int,
    q_block: int,
    sink: int,
    local: int,
    ring: tuple[int, int] | None,
    group_reduce: str,
) -> AttentionPlan:
    """_general_plan for a step of decode rows only (one query block each), its fields made as arrays at once: a
    batch of 64 LServe decode rows spent ~1 ms a step in the block loop (a streaming list page by page), dense
    ones ~0.15 ms. Row i's lists: the n_i causal pages, then (a streaming window) its sink pages [0, s_i) and
    local pages [max(lo_i, s_i), n_i), in the streaming table's ring slots with `ring`."""
    b = len(layout.q_lens)
    i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    windows = layout.windows or [(sink, local)] * b
    ctx = i32(layout.ctx_lens)
    w_sink, w_local = (i32([w[k] for w in windows]) for k in (0, 1))
    last = ctx.astype(np.int64) - 1
    n, s, first_local = streaming_bounds(
        last, last, page_size, w_sink.astype(np.int64), w_local
    )  # n: causal pages
    c = np.where(w_local > 0, s + n - first_local, 0)  # streaming list lengths
    n_list = n.tolist()
    causal = [i32(t[:k]) for t, k in zip(layout.page_tables, n_list)]  # views of array tables
    upto = np.arange(max(n_list, default=0), dtype=np.int32)  # logical page numbers, sliced per row
    if c.any():
        row_c = np.repeat(np.arange(b), c)
        at_c = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)  # place in the row's streaming list
        keep = np.where(at_c < s[row_c], at_c, first_local[row_c] + at_c - s[row_c])  # logical pages
        if ring:
            tabs = [i32(layout.stream_tables[r]) for r in range(b)]
            lens = np.asarray([len(t) for t in tabs], np.int64)
            slot = ring_slot(keep, *ring)
            if (slot >= lens[row_c]).any():
                raise ValueError("a streaming table is shorter than its window's ring slots")
            stream = np.concatenate(tabs)[(np.cumsum(lens) - lens)[row_c] + slot]
        else:
            stream = np.concatenate(causal)[(np.cumsum(n) - n)[row_c] + keep]
        cut = np.cumsum(c)[:-1]
        streams, keeps = np.split(stream.astype(np.int32), cut), np.split(keep.astype(np.int32), cut)
        kv_page = np.concatenate([x for pair in zip(causal, streams) for x in pair])
        kv_lpage = np.concatenate([x for k, kr in zip(n_list, keeps) for x in (upto[:k], kr)])
    else:
        kv_page = np.concatenate(causal) if b else i32([])
        kv_lpage = np.concatenate([upto[:k] for k in n_list]) if b else i32([])
    ends = np.cumsum(n + c)
    indptr = np.zeros(2 * b + 1, np.int64)
    indptr[1::2] = ends - c
    indptr[2::2] = ends
    rows = np.arange(b, dtype=np.int32)
    sel = layout.sel_keep is not None
    return AttentionPlan(
        page_size=page_size,
        q_block=q_block,
        num_tokens=b,
        qb_seq=rows,
        qb_start=rows.copy(),
        qb_len=np.ones(b, np.int32),
        qb_pos=i32(last),
        seq_ctx=ctx,
        kv_indptr=indptr.astype(np.int32),
        kv_page=kv_page,
        kv_lpage=kv_lpage,
        sink=sink,
        local=local,
        qb_sink=w_sink,
        qb_local=w_local,
        qb_slot=i32(layout.sel_slots) if sel else None,
        qb_keep=i32(layout.sel_keep) if sel else None,
        qb_refresh=i32(layout.sel_refresh) if sel else None,
        group_reduce=group_reduce,
    )
