"""CPU backend: NumPy float32 and Numba kernels. Its LServe mode runs dense mode's attention and K/V write (any KV
format) per KV pool and a Numba page selector (cpu_select.py); backends/reference/ holds the NumPy references every
CPU and GPU kernel is tested against."""

from __future__ import annotations

import functools
import time

import numpy as np

from ..config import GROUP_REDUCE, ORACLE_REDUCE, EngineConfig, env_choice
from ..sparse.plan import AttentionPlan
from ..weights.qtensor import QuantTensor, RowStack, Weight, stored_bytes
from . import cpu_kernels as K
from .base import (
    EagerExecutor,
    Forward,
    HostTokens,
    KVCache,
    RopeTables,
    alloc_kv_cache,
    norm_qkv_rope,
    norm_then_linear,
)
from .cpu_half import NATIVE_HALF
from .cpu_kv import kernel_view
from .cpu_native import job_address
from .cpu_quant import embed_q, linear_q, logits_q
from .cpu_select import select_pages_numba
from .cpu_threads import SplitRunner, even_bounds, openblas_set_threads, spin_seconds
from .memory import MemoryNeed, host_memory_bytes, step_needs
from .reference.attention import attend_qblocks, visited_pages
from .reference.layers import embed_ref
from .reference.page_select import select_pages_ref
from .reference.sampling import logprobs_ref, sample

# Up to this many rows (decode), the Numba GEMV and attention kernels; beyond (prefill), OpenBLAS GEMMs.
SMALL_ROWS = 8
# Decode attention's unit of work: a KV head's run of listed pages holding about this many keys.
CHUNK_KEYS = 256


class CpuOps:
    """float32 NumPy/Numba implementation of the Ops interface."""

    name = "cpu"
    dtype = np.float32
    # "auto" is fp16 (as llama.cpp's and our GPU's caches) where the host converts it in one instruction
    # (cpu_half.py): half the bytes decode attention reads, and twice the tokens in the same KV memory
    kv_dtypes = (*(("fp16",) if NATIVE_HALF else ()), "fp32", "int8", "int4", "fp8")
    selector_reductions = (*GROUP_REDUCE, ORACLE_REDUCE)  # the oracle reads float keys (float KV only)
    async_steps = False  # a step computes before its launch returns: nothing to overlap
    memory_is_host = True

    def __init__(self):
        # The backend spreads work over its own threads (`SplitRunner`); OpenBLAS's would oversubscribe the
        # cores and make GEMM sums depend on the thread count. Process-wide: NumPy's BLAS gets one thread.
        openblas_set_threads(1)
        spin_seconds()  # a bad LSERVE_CPU_SPIN_US is refused here, not at the first split call
        self.split = SplitRunner()
        # Page selector: "numba" (cpu_select.py) or "ref" (the NumPy reference, as before 2026-12-04; benchmarks
        # compare the two); select_seconds counts the time spent in it (tools/bench_cpu_lserve.py reads it).
        self.selector = env_choice("LSERVE_CPU_SELECTOR", "numba", ("numba", "ref"))
        self.select_seconds = 0.0

    def upload(self, a, name: str | None = None):
        """Floats as float32; quantized weights stay in their blocks (the kernels read them directly)."""
        if isinstance(a, (QuantTensor, RowStack)):
            return a
        return np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)

    def rope_tables(self, tables: RopeTables) -> None:
        """None: the kernels read the host tables, which the model fills as positions are reached."""
        return None

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int:
        """KV memory on the CPU: a fixed 2 GiB scaled by the fraction (the host is shared with all else)."""
        return int(2 * 2**30 * fraction / 0.8)

    def memory_bytes(self) -> int:
        """The memory this process may use: the host's, or its container's cgroup limit where lower."""
        return host_memory_bytes()

    def kv_limit_bytes(self, reserved: int = 0) -> int:
        """`memory_bytes` less the weights; pools are zero-filled, so pages never touched cost none."""
        return self.memory_bytes() - reserved

    def buffer_needs(self, cfg, ecfg: EngineConfig, max_len: int, layout=None) -> list[MemoryNeed]:
        """A step's logits, activations and the RoPE tables (`memory.step_needs`): nothing else is sized by the limits."""
        return step_needs(cfg, ecfg, max_len)

    def weight_bytes(self, w: Weight) -> int:
        """Packed bytes of quantized matrices (kept as they are), float32 for the rest."""
        return stored_bytes(w, 4)

    def alloc_kv(
        self, cfg, page_size, num_pages, layout=None, num_stream_pages=0, max_seqs=0, fmt=None
    ) -> KVCache:
        """fp16 or float32 pools, or quantized values with float32 scales (kv/quant.py)."""
        return alloc_kv_cache(np.zeros, np.asarray, np.float32, cfg, page_size, num_pages, layout,
                              num_stream_pages, max_seqs, fmt)  # fmt: skip

    def executor(self, forward: Forward, cache: KVCache, ecfg: EngineConfig, layout, max_len: int):
        """Every step eagerly: NumPy arrays need no upload and there is nothing to capture."""
        return EagerExecutor(self, forward, cache)

    def select_pages(self, q, cache: KVCache, layer: int, plan: AttentionPlan) -> None:
        """`select_pages_ref`'s selections from the Numba kernels (every reduction, the oracle included), or from
        the reference itself with LSERVE_CPU_SELECTOR=ref."""
        t = time.perf_counter()
        args = (q, cache.kmax[layer], cache.kmin[layer], plan, cache.head_class[layer], cache.head_slot[layer],
                cache.sel_idx[layer], cache.sel_cnt[layer])  # fmt: skip
        if self.selector == "ref":
            select_pages_ref(*args, k=cache.k[layer])
        else:
            select_pages_numba(*args, cache.k[layer], self.split)
        self.select_seconds += time.perf_counter() - t

    def copy_stream_pages(self, cache: KVCache, src: np.ndarray, dst: np.ndarray) -> None:
        """Streaming-pool pages src[i] -> dst[i] in every layer (prefix-cache snapshots); the gather completes
        before the scatter, so the two lists may overlap."""
        for pool in cache.stream_pools():
            pool[dst] = pool[src]

    def clear_pages(self, cache: KVCache, pages: np.ndarray, stream_pages: np.ndarray) -> None:
        """Zero these pages of every layer's dense pools (values, scales, statistics) and these of its streaming
        pools: a page handed to a sequence reads as a fresh pool's (kv/block_manager.py)."""
        for pool_pages, pools in ((pages, cache.dense_pools()), (stream_pages, cache.stream_pools())):
            if len(pool_pages):
                for pool in pools:
                    pool[pool_pages] = 0

    def prepare_plan(self, plan: AttentionPlan) -> AttentionPlan:
        return plan

    def embed(self, table, ids: np.ndarray, vocab_start: int = 0) -> np.ndarray:
        """Rows of the table (zeros for ids outside a vocabulary shard); a quantized table dequantizes only the
        gathered rows."""
        return embed_ref(table, ids, vocab_start, embed_q if isinstance(table, QuantTensor) else None)

    def add_rmsnorm(self, x, residual, w, eps):
        h = np.empty_like(x)
        if residual is None:
            K.rmsnorm(x, w, eps, h)
            return h, x
        res = np.empty_like(x)
        K.add_rmsnorm(x, residual, w, eps, h, res)
        return h, res

    def linear(self, x, w, bias=None):
        """x @ w.T for a float, quantized (cpu_quant.linear_q) or row-stacked weight, plus the bias."""
        if isinstance(w, QuantTensor):
            y = linear_q(x, w, self.split)
        elif isinstance(w, RowStack):
            y = self._linear_stack(x, w)
        else:
            y = self._linear_f32(x, w)
        return y if bias is None else y + bias

    def _linear_stack(self, x, w: RowStack) -> np.ndarray:
        """Each part's product written into its own columns of one output."""
        y = np.empty((x.shape[0], w.shape[0]), np.float32)
        c = 0
        for p in w.parts:
            cols = y[:, c : c + p.shape[0]]
            if isinstance(p, QuantTensor):
                linear_q(x, p, self.split, out=cols)
            else:
                cols[...] = self._linear_f32(x, p)
            c += p.shape[0]
        return y

    def _linear_f32(self, x, w: np.ndarray) -> np.ndarray:
        """Decode rows by the Numba GEMV over parts of w's rows, more rows by GEMMs on parts of x."""
        m, n = x.shape[0], w.shape[0]
        y = np.empty((m, n), np.float32)
        if m > SMALL_ROWS:
            part = lambda a, b: np.matmul(x[a:b], w.T, out=y[a:b])  # noqa: E731
            self.split.run(("gemm", m.bit_length(), w.shape), part, even_bounds(0, m, self.split.parts))
        else:
            x = np.ascontiguousarray(x)
            part = lambda a, b: K.gemv_rows(x, w, y, a, b)  # noqa: E731
            self.split.run(("gemv", m, w.shape), part, even_bounds(0, n, self.split.parts))
        return y

    def silu_mul(self, gate_up):
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        K.silu_mul(gate_up, out)
        return out

    def gate_up_silu(self, h, w):
        """silu_mul(linear(h, w)): the same kernels and numerics as the two calls (nothing fused on the CPU)."""
        return self.silu_mul(self.linear(h, w))

    def linear_add(self, x, w, residual):
        """linear(x, w), the residual add left to the next norm (nothing fused on the CPU)."""
        return self.linear(x, w), residual

    def rmsnorm_linear(self, x, residual, norm_w, eps, w, bias=None, silu=False):
        """The two calls (nothing fused on the CPU)."""
        return norm_then_linear(self, x, residual, norm_w, eps, w, bias, silu)

    def qkv_rope(self, x, residual, norm_w, eps, w, bias, positions, slots, cache, layer, rope):
        """The two calls (nothing fused on the CPU)."""
        return norm_qkv_rope(self, x, residual, norm_w, eps, w, bias, positions, slots, cache, layer, rope)

    def rope_write_kv(self, qkv, positions, slots, cache, layer, rope):
        """`slots` [N] (dense mode) or [2, N]: dense-pool slots, streaming-pool slots. A quantized cache is
        quantized here, as K/V are written (and LServe's key statistics come from the unquantized keys)."""
        ksc, vsc, kss, vss = cache.scales(layer)
        if not cache.sparse:
            kc, d = cache.k[layer], cache.head_dim
            q = np.empty((qkv.shape[0], qkv.shape[1] // d - 2 * kc.shape[1], d), np.float32)
            K.rope_write_kv(qkv, positions, slots, kernel_view(kc, ksc), kernel_view(cache.v[layer], vsc),
                            _scales_arg(ksc), _scales_arg(vsc), rope[0], rope[1], q, None,
                            cache.rotates_keys)  # fmt: skip
            return q
        args = (qkv, positions, slots[0], slots[1], cache.k[layer], cache.v[layer], cache.ks[layer],
                cache.vs[layer], cache.head_class[layer], cache.head_slot[layer], rope[0], rope[1],
                cache.kmax[layer] if cache.kmax else None, cache.kmin[layer] if cache.kmin else None)  # fmt: skip
        return rope_write_kv_sparse_numba(*args, (ksc, vsc, kss, vss), cache.rotates_keys)

    def attention(self, q, cache, layer, plan, head_class):
        """Dequantizes a quantized cache inside the kernels, as pages are read."""
        ksc, vsc, kss, vss = cache.scales(layer)
        if not cache.sparse:
            kc, vc = cache.k[layer], cache.v[layer]
            if int(plan.qb_len.max(initial=0)) <= SMALL_ROWS:
                return paged_attention_numba(q, kc, vc, plan, head_class, self.split, ksc, vsc)
            out, hc = np.empty(q.shape, np.float32), np.asarray(head_class)

            def part(a: int, b: int) -> None:
                attend_qblocks(q, kc, vc, plan, hc, out, a, b, ksc, vsc, cache.fmt, gather_pages_numba)

            self.split.run(("prefill-attn",), part, _qblock_bounds(plan, self.split.parts))
            return out.reshape(q.shape[0], -1)
        pools = (cache.k[layer], cache.v[layer], cache.ks[layer], cache.vs[layer])
        sel = (cache.head_class[layer], cache.head_slot[layer], cache.sel_idx[layer], cache.sel_cnt[layer])
        if int(plan.qb_len.max(initial=0)) <= SMALL_ROWS:
            return sparse_attention_numba(q, pools, plan, *sel, self.split, (ksc, vsc, kss, vss))
        return sparse_prefill_attention(q, pools, plan, *sel, self.split, (ksc, vsc, kss, vss), cache.fmt)

    def logits(self, h, lm_head):
        """float32 logits; a quantized head keeps float32-grade activations (`cpu_quant.logits_q`)."""
        return (
            logits_q(h, lm_head, self.split) if isinstance(lm_head, QuantTensor) else self.linear(h, lm_head)
        )

    def sample(self, logits: np.ndarray, seqs: list) -> list[int]:
        return sample(logits, seqs)

    def sample_async(self, logits: np.ndarray, seqs: list, out: None = None) -> HostTokens:
        """Rows that could not be sampled (`K.sound_rows`: sound_rows_ref's rule) are not: their ids read 0, their
        flags False."""
        sound = np.empty(len(seqs), np.bool_)
        if K.sound_rows(logits, sound) == len(seqs):  # the usual step: the logits as they are, no row copied
            return HostTokens(np.array(sample(logits, seqs), np.int64), sound)
        ids = np.zeros(len(seqs), np.int64)
        keep = np.flatnonzero(sound)
        if keep.size:
            ids[keep] = sample(logits[keep], [seqs[i] for i in keep])
        return HostTokens(ids, sound)

    def logprobs(self, logits: np.ndarray, chosen: np.ndarray, k: int):
        return logprobs_ref(logits, chosen, k)


def rope_write_kv_sparse_numba(
    qkv, positions, dense_slots, stream_slots, kd, vd, ks, vs, head_class, head_slot, cos, sin, kmax, kmin,
    scales=(None,) * 4, hadamard: bool = False,
) -> np.ndarray:  # fmt: skip
    """`rope_write_kv_sparse_ref` in Numba: dense mode's write once per pool (its KV heads' columns in pool-row
    order; `scales` of kd, vd, ks, vs for a quantized cache; `hadamard`: its keys' basis), then the dense pool's key statistics
    (`cpu_kernels.merge_key_stats`) from the stored keys (a float cache) or the unquantized ones (quantized)."""
    hkv, d = len(head_class), cos.shape[1] * 2
    n, hq = qkv.shape[0], qkv.shape[1] // d - 2 * hkv
    x = qkv.reshape(n, hq + 2 * hkv, d)
    q = np.empty((n, hq, d), np.float32)
    dense_slots = np.ascontiguousarray(dense_slots, np.int64)
    k_rot = np.empty((n, kd.shape[1], d), np.float32) if scales[0] is not None else None
    pools = ((0, dense_slots, kd, vd, *scales[:2]), (1, stream_slots, ks, vs, *scales[2:]))
    no_q = np.empty((n, 0, d), np.float32)
    qh = hq  # q's heads go with the first pool's call only
    for cls, slots, kc, vc, ksc, vsc in pools:
        order = _pool_rows(head_class, head_slot, cls)
        if order.size == 0:
            continue
        cols = np.concatenate([x[:, :qh], x[:, hq + order], x[:, hq + hkv + order]], axis=1).reshape(n, -1)
        K.rope_write_kv(cols, positions, np.ascontiguousarray(slots, np.int64), kernel_view(kc, ksc),
                        kernel_view(vc, vsc), _scales_arg(ksc), _scales_arg(vsc), cos, sin, q if qh else no_q,
                        k_rot if cls == 0 else None, hadamard)  # fmt: skip
        qh = 0
    if kmax is not None and kd.shape[1]:
        page = kd.shape[2]
        keys = kernel_view(kd)[dense_slots // page, :, dense_slots % page] if k_rot is None else k_rot
        K.merge_key_stats(kmax, kmin, keys, dense_slots, page)
    return q


def sparse_attention_numba(
    q, pools, plan: AttentionPlan, head_class, head_slot, sel_idx, sel_cnt, split, scales
):
    """`paged_attention_sparse_ref` for decode rows through `paged_attention_numba`: the streaming heads in one
    call over their pool, the dense heads in one over theirs (when blocks select pages, each dense head on its own
    pages: `_visited_plan`). pools: (kd, vd, ks, vs); scales: theirs, or Nones."""
    n, hq, d = q.shape
    out = np.empty((n, len(head_class), hq // len(head_class), d), np.float32)
    for cls, order, qc, (kc, vc, ksc, vsc) in _by_pool(q, pools, scales, head_class, head_slot):
        if cls == 1 or sel_idx is None or not plan.selects:
            o = paged_attention_numba(qc, kc, vc, plan, np.full(order.size, cls, np.int32), split, ksc, vsc)
            out[:, order] = o.reshape(n, order.size, -1, d)
            continue
        vplan, item_head = _visited_plan(plan, order, sel_idx, sel_cnt)
        o = paged_attention_numba(
            qc, kc, vc, vplan, np.zeros(order.size, np.int32), split, ksc, vsc, item_head
        )
        out[:, order] = o.reshape(n, order.size, -1, d)
    return out.reshape(n, hq * d)


def sparse_prefill_attention(
    q, pools, plan: AttentionPlan, head_class, head_slot, sel_idx, sel_cnt, split, scales, fmt
) -> np.ndarray:
    """`paged_attention_sparse_ref` for a step with prefill rows: each pool's heads through dense mode's prefill
    attention (`attend_qblocks`: every listed page, the block's window for streaming heads), then the blocks that
    select pages (decode rows beside the prefill) again through `sparse_attention_numba` on their sub-plan."""
    n, hq, d = q.shape
    out = np.empty((n, len(head_class), hq // len(head_class), d), np.float32)
    for cls, order, qc, (kc, vc, ksc, vsc) in _by_pool(q, pools, scales, head_class, head_slot):
        oc, hcs = np.empty(qc.shape, np.float32), np.full(order.size, cls, np.int32)
        # called within this iteration only (split.run returns once every part is done)
        part = lambda a, b: attend_qblocks(qc, kc, vc, plan, hcs, oc, a, b, ksc, vsc, fmt, gather_pages_numba)  # noqa: E731, B023
        if split is None:
            part(0, plan.num_qblocks)
        else:
            split.run(("prefill-attn",), part, _qblock_bounds(plan, split.parts))
        out[:, order] = oc.reshape(n, order.size, -1, d)
    out = out.reshape(n, hq * d)
    if sel_idx is not None and plan.selects:
        qbs = np.nonzero(plan.qb_keep > 0)[0]
        rows = np.concatenate([np.arange(plan.qb_start[b], plan.qb_start[b] + plan.qb_len[b]) for b in qbs])
        sub = sparse_attention_numba(q, pools, plan.subset(qbs), head_class, head_slot, sel_idx, sel_cnt, split,
                                     scales)  # fmt: skip
        out[rows] = sub[rows]
    return out


def _pool_rows(head_class, head_slot, cls: int) -> np.ndarray:
    """The KV heads of class `cls` in the order of their pool's rows (row j holds head [j])."""
    heads = np.nonzero(np.asarray(head_class) == cls)[0]
    return heads[np.argsort(np.asarray(head_slot)[heads])]


def _by_pool(q, pools, scales, head_class, head_slot):
    """For each LServe pool with heads: (class, its heads in row order, their query heads in that order
    [N, heads * group, D], (k, v, k scales, v scales))."""
    n, hq, d = q.shape
    hkv = len(head_class)
    qg = q.reshape(n, hkv, hq // hkv, d)
    for cls in (0, 1):
        order = _pool_rows(head_class, head_slot, cls)
        if order.size == 0:
            continue
        if pools[2 * cls].shape[1] != order.size:
            raise ValueError(
                f"pool of class {cls} has {pools[2 * cls].shape[1]} heads, head_class {order.size}"
            )
        qc = np.ascontiguousarray(qg[:, order].reshape(n, -1, d))
        yield cls, order, qc, (pools[2 * cls], pools[2 * cls + 1], scales[2 * cls], scales[2 * cls + 1])


def _visited_plan(
    plan: AttentionPlan, order: np.ndarray, sel_idx, sel_cnt
) -> tuple[AttentionPlan, np.ndarray]:
    """`plan`'s blocks repeated once per dense KV head (pool row j = head order[j]), each copy's class-0 list cut
    to the pages that head visits (`visited_pages`: its selection where the block selects) and its class-1 list
    empty; with the item heads that restrict each copy to its head (`cpu_kernels.paged_attention`)."""
    none = (np.zeros(0, np.int32), np.zeros(0, np.int32))
    blocks = np.repeat(np.arange(plan.num_qblocks), order.size)
    lists = [x for qb in range(plan.num_qblocks) for g in order
             for x in (visited_pages(plan, qb, 0, g, sel_idx, sel_cnt), none)]  # fmt: skip
    item_head = np.tile(
        np.stack([np.arange(order.size), np.full(order.size, -1)], 1).ravel(), plan.num_qblocks
    )
    return plan.regroup(blocks, lists), item_head.astype(np.int32)


def gather_pages_numba(cache, scales, fmt, pages, h) -> np.ndarray:
    """`reference.attention.gather_rows` through the Numba kernel (the rows read once, converted in registers)."""
    page, d = cache.shape[2], cache.shape[3] if fmt is None else fmt.head_dim(cache.shape[3])
    out = np.empty((len(pages) * page, d), np.float32)
    K.gather_pages(kernel_view(cache, scales), _scales_arg(scales), np.asarray(pages, np.int64), h, out)
    return out


def _qblock_bounds(plan: AttentionPlan, parts: int) -> list[int]:
    """Query-block boundaries cutting the plan's visited pages (its work) into `parts` near-equal shares."""
    work = np.cumsum(np.diff(plan.kv_indptr).reshape(-1, 2).sum(1))
    cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts) if work.size else []
    return [0, *(int(c) for c in cuts), plan.num_qblocks]


NO_SCALES = np.zeros((1, 1, 1, 1), np.float32)  # the scales argument of a float cache's kernels


def _scales_arg(scales):
    return NO_SCALES if scales is None else scales


def _attention_native(args: tuple, n: int) -> tuple[int, np.ndarray]:
    """(job address, int64 args) of the cache type's `K.ATTENTION_JOBS` job over paged_attention's operands `args`
    in n parts; (0, none): Python parts, where `K.attention_args` cannot pack them."""
    packed = K.attention_args(*args, n)
    return (job_address(K.ATTENTION_JOBS[args[1].dtype]), packed) if packed.size else (0, packed)


def paged_attention_numba(
    q,
    k_cache,
    v_cache,
    plan: AttentionPlan,
    head_class,
    split=None,
    k_scale=None,
    v_scale=None,
    item_head=None,
) -> np.ndarray:
    """`paged_attention_ref` as Numba kernels (same plan and masks, float32 softmax), for decode rows; the
    scales of a quantized cache (its format follows from the values' dtype: cpu_kv.py; fp16 pools as stored).

    Each KV head's pages are cut into runs of about `CHUNK_KEYS` keys, so that even one decode row's work can
    be spread over a `SplitRunner`'s threads; the runs' softmax sums are merged exactly (flash-decoding), and
    the runs depend only on the plan, so results do not depend on the threads.
    """
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = kernel_view(k_cache, k_scale), kernel_view(v_cache, v_scale)
    chunk = max(1, CHUNK_KEYS // page)
    rows = int(plan.qb_len.max(initial=0)) * (q.shape[1] // hkv)
    units = hkv * (plan.kv_page.shape[0] // chunk + plan.kv_indptr.shape[0] - 1)  # bounds the kernel's count
    part, acc = np.empty((units, 2, rows), np.float32), np.empty((units, rows, q.shape[2]), np.float32)
    hc = np.asarray(head_class, np.int32)
    items = plan.kv_indptr.shape[0] - 1
    ih = np.full(items, -1, np.int32) if item_head is None else np.asarray(item_head, np.int32)
    args = (
        q, k_cache, v_cache, _scales_arg(k_scale), _scales_arg(v_scale), plan.qb_start, plan.qb_len, plan.qb_pos,
        plan.qb_seq, plan.seq_ctx, plan.kv_indptr, plan.kv_page, plan.kv_lpage, hc, ih, plan.qb_sink, plan.qb_local,
        chunk, part, acc,
    )  # fmt: skip
    n = 1 if split is None else split.parts
    if n < 2:
        K.paged_attention(*args, 0, 1, 1)
    else:
        key = ("attn", plan.num_qblocks, plan.kv_page.shape[0].bit_length())
        native = functools.partial(_attention_native, args, n) if k_cache.dtype in K.ATTENTION_JOBS else None
        split.run(
            key, lambda a, b: K.paged_attention(*args, a, b, n), range(n + 1), joint=True, native=native
        )
    out = np.empty(q.shape, np.float32)
    K.merge_units(plan.qb_start, plan.qb_len, plan.kv_indptr, hc, ih, chunk, part, acc, out)
    return out.reshape(q.shape[0], -1)
