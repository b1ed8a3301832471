"""CPU backend: NumPy float32 with Numba njit kernels; also the reference every GPU kernel is tested against."""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..engine.sampler import sample
from ..sparse.plan import AttentionPlan
from . import cpu_kernels as K
from .base import KVCache
from .reference import paged_attention_sparse_ref, rope_write_kv_sparse_ref, select_pages_ref

# Up to this many rows (decode), the Numba kernels; beyond (prefill), NumPy and OpenBLAS GEMMs.
SMALL_ROWS = 8


class CpuOps:
    """float32 NumPy/Numba implementation of the Ops interface."""

    name = "cpu"
    dtype = np.float32

    def upload(self, a: np.ndarray, name: str | None = None) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return a

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int:
        """KV memory on the CPU: a fixed 2 GiB scaled by the fraction (the host is shared with everything else)."""
        return int(2 * 2**30 * fraction / 0.8)

    def alloc_kv(self, cfg: ModelConfig, num_pages: int, page_size: int) -> KVCache:
        shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
        k = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        v = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        return KVCache(k=k, v=v, page_size=page_size, num_pages=num_pages)

    def alloc_sparse_kv(self, cfg: ModelConfig, layout, num_pages: int, num_stream_pages: int, max_seqs: int):
        """Two pools (dense heads / streaming heads per layer), page stats and selection buffers."""
        ps, d, L = layout.page_size, cfg.head_dim, cfg.num_layers
        z = np.zeros
        nd = [layout.num_dense(i) for i in range(L)]
        ns = [layout.num_streaming(i) for i in range(L)]
        cap = layout.select_pages + 1
        return KVCache(
            k=[z((num_pages, n, ps, d), np.float32) for n in nd],
            v=[z((num_pages, n, ps, d), np.float32) for n in nd],
            page_size=ps,
            num_pages=num_pages,
            ks=[z((num_stream_pages, n, ps, d), np.float32) for n in ns],
            vs=[z((num_stream_pages, n, ps, d), np.float32) for n in ns],
            head_class=list(layout.head_class),
            head_slot=list(layout.head_slot),
            kmax=[z((num_pages, n, layout.sub_pages, d), np.float32) for n in nd]
            if layout.sub_pages
            else None,
            kmin=[z((num_pages, n, layout.sub_pages, d), np.float32) for n in nd]
            if layout.sub_pages
            else None,
            sel_idx=[z((max_seqs, cfg.num_kv_heads, cap), np.int32) for _ in range(L)],
            sel_cnt=[z((max_seqs, cfg.num_kv_heads), np.int32) for _ in range(L)],
        )

    def select_pages(self, q, cache: KVCache, layer: int, plan: AttentionPlan) -> None:
        select_pages_ref(
            q, cache.kmax[layer], cache.kmin[layer], plan, cache.head_class[layer], cache.head_slot[layer],
            cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def prepare_plan(self, plan: AttentionPlan) -> AttentionPlan:
        return plan

    def embed(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def add_rmsnorm(self, x, residual, w, eps):
        if x.shape[0] > SMALL_ROWS:
            res = x if residual is None else x + residual
            return rmsnorm_ref(res, w, eps), res
        h = np.empty_like(x)
        if residual is None:
            K.rmsnorm(x, w, eps, h)
            return h, x
        res = np.empty_like(x)
        K.add_rmsnorm(x, residual, w, eps, h, res)
        return h, res

    def linear(self, x, w, bias=None):
        if x.shape[0] > SMALL_ROWS:
            y = x @ w.T
        else:
            y = np.empty((x.shape[0], w.shape[0]), np.float32)
            K.gemv(np.ascontiguousarray(x), w, y)
        return y if bias is None else y + bias

    def silu_mul(self, gate_up):
        if gate_up.shape[0] > SMALL_ROWS:
            return silu_mul_ref(gate_up)
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        K.silu_mul(gate_up, out)
        return out

    def rope_write_kv(self, qkv, positions, slots, cache, layer, rope):
        """`slots` [N] (dense mode) or [2, N]: dense-pool slots, streaming-pool slots."""
        if not cache.sparse:
            if qkv.shape[0] > SMALL_ROWS:
                return rope_write_kv_ref(qkv, positions, slots, cache.k[layer], cache.v[layer], *rope)
            kc = cache.k[layer]
            q = np.empty((qkv.shape[0], qkv.shape[1] // kc.shape[3] - 2 * kc.shape[1], kc.shape[3]), np.float32)
            K.rope_write_kv(qkv, positions, slots, kc, cache.v[layer], rope[0], rope[1], q)
            return q
        return rope_write_kv_sparse_ref(
            qkv, positions, slots[0], slots[1], cache.k[layer], cache.v[layer], cache.ks[layer],
            cache.vs[layer], cache.head_class[layer], cache.head_slot[layer], rope[0], rope[1],
            cache.kmax[layer] if cache.kmax else None, cache.kmin[layer] if cache.kmin else None,
        )  # fmt: skip

    def attention(self, q, cache, layer, plan, head_class):
        if not cache.sparse:
            if int(plan.qb_len.max(initial=0)) > SMALL_ROWS:
                return paged_attention_ref(q, cache.k[layer], cache.v[layer], plan, head_class)
            return paged_attention_numba(q, cache.k[layer], cache.v[layer], plan, head_class)
        return paged_attention_sparse_ref(
            q, cache.k[layer], cache.v[layer], cache.ks[layer], cache.vs[layer], plan, cache.head_class[layer],
            cache.head_slot[layer], cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def logits(self, h, lm_head):
        return self.linear(h, lm_head)

    def sample(self, logits: np.ndarray, seqs: list) -> list[int]:
        return sample(logits, seqs)


def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm in float32, as HF Llama."""
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def silu_mul_ref(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up for the fused [N, 2*I] gate/up projection."""
    i = gate_up.shape[-1] // 2
    g, u = gate_up[:, :i], gate_up[:, i:]
    return (g / (np.float32(1.0) + np.exp(-g))) * u


def rope_write_kv_ref(qkv, positions, slots, k_cache, v_cache, cos, sin) -> np.ndarray:
    """Rotate q and k (half-split RoPE), write k/v into their page slots; return q [N, Hq, D]."""
    n = qkv.shape[0]
    _, hkv, page, d = k_cache.shape
    hq = qkv.shape[1] // d - 2 * hkv
    x = qkv.reshape(n, hq + 2 * hkv, d)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    qk = x[:, : hq + hkv]
    a, b = qk[..., : d // 2], qk[..., d // 2 :]
    rot = np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)
    q, k, v = rot[:, :hq], rot[:, hq:], x[:, hq + hkv :]
    pg, off = slots // page, slots % page
    k_cache[pg, :, off] = k
    v_cache[pg, :, off] = v
    return np.ascontiguousarray(q)


def paged_attention_ref(q, k_cache, v_cache, plan: AttentionPlan, head_class: np.ndarray) -> np.ndarray:
    """Block-sparse paged attention executing `plan`; q [N, Hq, D] -> [N, Hq*D].

    Per query block and head class: gather the listed pages, one batched GEMM per KV-head group,
    mask (causal, context end, and the sink/local window for streaming heads), softmax in float32.
    """
    n, hq, d = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = np.empty((n, hq, d), np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    head_class = np.asarray(head_class)
    for qb in range(plan.num_qblocks):
        r0, nr, pos0 = int(plan.qb_start[qb]), int(plan.qb_len[qb]), int(plan.qb_pos[qb])
        ctx = int(plan.seq_ctx[plan.qb_seq[qb]])
        qpos = pos0 + np.arange(nr)
        for cls in (0, 1):
            gsel = np.nonzero(head_class == cls)[0]
            if gsel.size == 0:
                continue
            pages, lpages = plan.pages(qb, cls)
            kpos = (lpages[:, None] * page + np.arange(page)[None, :]).reshape(-1)
            k = k_cache[pages][:, gsel].transpose(1, 0, 2, 3).reshape(gsel.size, -1, d)
            v = v_cache[pages][:, gsel].transpose(1, 0, 2, 3).reshape(gsel.size, -1, d)
            heads = (gsel[:, None] * group + np.arange(group)[None, :]).reshape(-1)
            qg = q[r0 : r0 + nr, heads].reshape(nr, gsel.size, group, d).transpose(1, 2, 0, 3)
            s = (qg.reshape(gsel.size, group * nr, d) @ k.transpose(0, 2, 1)) * scale
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < ctx)
            if cls == 1:
                ok &= (kpos[None, :] < plan.sink) | (qpos[:, None] - kpos[None, :] < plan.local)
            s = np.where(np.tile(ok, (group, 1))[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            o = (s @ v) / s.sum(-1, keepdims=True)
            o = o.reshape(gsel.size, group, nr, d).transpose(2, 0, 1, 3).reshape(nr, -1, d)
            out[r0 : r0 + nr, heads] = o
    return out.reshape(n, hq * d)


def paged_attention_numba(q, k_cache, v_cache, plan: AttentionPlan, head_class: np.ndarray) -> np.ndarray:
    """`paged_attention_ref` as one Numba kernel (same plan, masks and float32 softmax); for decode rows."""
    out = np.empty(q.shape, np.float32)
    K.paged_attention(
        q, k_cache, v_cache, plan.qb_start, plan.qb_len, plan.qb_pos, plan.seq_ctx[plan.qb_seq], plan.kv_indptr,
        plan.kv_page, plan.kv_lpage, np.asarray(head_class, np.int32), plan.sink, plan.local, out,
    )  # fmt: skip
    return out.reshape(q.shape[0], -1)
