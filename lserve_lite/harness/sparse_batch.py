"""Random steps over LServe's two KV pools (head classes, page tables, windows, selection budgets) shared by
the sparse attention and page-selector rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.base import KVCache
from ..geometry import ring_pages, sink_pages
from ..kv.layout import head_slots
from ..sparse.plan import BatchLayout, build_plan
from .common import Ctx


def head_classes(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(head_class, head_slot) of a pattern such as "0110" (0: dense head, 1: streaming head)."""
    hc = np.array([int(ch) for ch in pattern], np.int32)
    return hc, head_slots(hc)


@dataclass
class SparseBatch:
    """One step over LServe's two KV pools: float16-exact float32 host arrays and the host plan."""

    q: np.ndarray  # [N, Hq, D]
    kd: np.ndarray  # dense pool [P, nd, page, D]
    vd: np.ndarray
    ks: np.ndarray  # streaming pool [Ps, ns, page, D]
    vs: np.ndarray
    hc: np.ndarray  # [Hkv] head classes
    slot: np.ndarray  # [Hkv] head slots
    plan: object  # sparse.plan.AttentionPlan
    tables: list  # dense-pool page table per sequence
    ctx_lens: list
    num_slots: int  # selection slots (rows of sel_idx / sel_cnt)


def sparse_batch(c: Ctx, q_lens, ctx_lens, hq, pattern, d, ps, windows, keep=None, refresh=None):
    """Random pools, distinct random dense / streaming page tables per sequence, per-sequence windows; with
    `keep`, a selecting plan (per-sequence budget in pages, `refresh` flags, shuffled selection slots)."""
    hc, slot = head_classes(pattern)
    nd, ns = int((hc == 0).sum()), int((hc == 1).sum())
    nseq = len(q_lens)
    # the engine's rule (geometry): sink pages, then the ring a chunk of the longest query list needs
    ring = (
        sink_pages(max(w[0] for w in windows), ps),
        ring_pages(max(w[1] for w in windows), max(q_lens), ps),
    )
    need = [-(-t // ps) for t in ctx_lens]
    n_dense, n_stream = sum(need) + 3, nseq * (ring[0] + ring[1]) + 2
    perm, offs = c.rng.permutation(n_dense), np.cumsum([0, *need])
    tables = [[int(p) for p in perm[offs[i] : offs[i + 1]]] for i in range(nseq)]
    per = ring[0] + ring[1]
    sperm = c.rng.permutation(n_stream)
    stables = [[int(p) for p in sperm[i * per : (i + 1) * per]] for i in range(nseq)]
    num_slots = nseq + 2
    sel = keep is not None
    lay = BatchLayout(
        list(q_lens), list(ctx_lens), tables, stream_tables=stables, windows=list(windows),
        sel_slots=[int(s) for s in c.rng.permutation(num_slots)[:nseq]] if sel else None,
        sel_keep=list(keep) if sel else None, sel_refresh=list(refresh or [1] * nseq) if sel else None,
    )  # fmt: skip
    return SparseBatch(
        q=c.f16(sum(q_lens), hq, d),
        kd=c.f16(n_dense, nd, ps, d),
        vd=c.f16(n_dense, nd, ps, d),
        ks=c.f16(n_stream, ns, ps, d),
        vs=c.f16(n_stream, ns, ps, d),
        hc=hc,
        slot=slot,
        plan=build_plan(lay, ps, q_block=64, ring=ring if ns else None),
        tables=tables,
        ctx_lens=list(ctx_lens),
        num_slots=num_slots,
    )


def sparse_cache(c: Ctx, b: SparseBatch, kmax=None, kmin=None, sel_idx=None, sel_cnt=None, cap=1):
    """The batch's pools as a one-layer LServe KVCache on the device; selection buffers poisoned (-1) unless
    given."""
    cp, hkv = c.cp, b.hc.size
    return KVCache(
        k=[c.dev16(b.kd)], v=[c.dev16(b.vd)], page_size=b.plan.page_size, num_pages=b.kd.shape[0],
        ks=[c.dev16(b.ks)], vs=[c.dev16(b.vs)], head_class=[cp.asarray(b.hc)], head_slot=[cp.asarray(b.slot)],
        kmax=None if kmax is None else [c.dev16(kmax)], kmin=None if kmin is None else [c.dev16(kmin)],
        sel_idx=[c.poison((b.num_slots, hkv, cap), np.int32) if sel_idx is None else cp.asarray(sel_idx)],
        sel_cnt=[c.poison((b.num_slots, hkv), np.int32) if sel_cnt is None else cp.asarray(sel_cnt)],
    )  # fmt: skip
