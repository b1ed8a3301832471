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

DENSE, STREAMING = 0, 1


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

    @property
    def num_qblocks(self) -> int:
        return int(self.qb_seq.shape[0])

    def pages(self, qb: int, cls: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.kv_indptr[qb * 2 + cls], self.kv_indptr[qb * 2 + cls + 1]
        return self.kv_page[lo:hi], self.kv_lpage[lo:hi]


@dataclass
class BatchLayout:
    """What the model runner schedules this step, per sequence: new tokens and page tables."""

    q_lens: list[int]  # new tokens per sequence
    ctx_lens: list[int]  # cached tokens after this step
    page_tables: list[list[int]]  # physical pages of each sequence, in logical order


def build_plan(
    layout: BatchLayout,
    page_size: int,
    q_block: int = 64,
    sink: int = 0,
    local: int = 0,
) -> AttentionPlan:
    """Plan one step: dense heads visit every causal page; streaming heads sink + local pages only.

    With local == 0 there are no streaming heads (the dense baseline): class 1 lists stay empty.
    """
    qb_seq, qb_start, qb_len, qb_pos = [], [], [], []
    indptr, pages, lpages = [0], [], []
    row = 0
    for s, (ql, ctx, table) in enumerate(zip(layout.q_lens, layout.ctx_lens, layout.page_tables)):
        pos0 = ctx - ql
        for off in range(0, ql, q_block):
            n = min(q_block, ql - off)
            first, last = pos0 + off, pos0 + off + n - 1
            qb_seq.append(s)
            qb_start.append(row + off)
            qb_len.append(n)
            qb_pos.append(first)
            n_pages = last // page_size + 1
            pages.extend(table[:n_pages])
            lpages.extend(range(n_pages))
            indptr.append(len(pages))
            if local > 0:
                keep = streaming_pages(first, last, page_size, sink, local)
                pages.extend(table[p] for p in keep)
                lpages.extend(keep)
            indptr.append(len(pages))
        row += ql
    i32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
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
        kv_page=i32(pages),
        kv_lpage=i32(lpages),
        sink=sink,
        local=local,
    )


def streaming_pages(first: int, last: int, page_size: int, sink: int, local: int) -> list[int]:
    """Logical pages a streaming head needs for queries at positions first..last (Lambda mask)."""
    n_pages = last // page_size + 1
    sink_pages = range(min(-(-sink // page_size), n_pages))
    lo = max(0, first - local + 1) // page_size
    return sorted(set(sink_pages) | set(range(lo, n_pages)))
