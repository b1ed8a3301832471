"""References of kernels/layers.cu: embedding gather, RMSNorm, RoPE + K/V page write (both KV layouts,
with the page statistics of the selector), SiLU-and-multiply. float32 NumPy; the CPU backend runs the
Numba versions of the same math (backends/cpu_kernels.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .page_stats import update_page_stats


def embed_ref(
    table: Any, ids: np.ndarray, vocab_start: int = 0, gather: Callable | None = None
) -> np.ndarray:
    """Row gather: the embedding of each token id. The table may be a vocabulary shard (rows for ids
    vocab_start..): other ids give zeros. `gather(table, rows)`: how a packed table gives float rows."""
    local = np.asarray(ids) - vocab_start
    inside = (local >= 0) & (local < table.shape[0])
    rows = np.where(inside, local, 0)
    out = table[rows] if gather is None else gather(table, rows)
    out[~inside] = 0
    return out


def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm in float32, as HF Llama."""
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def silu_mul_ref(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up for the fused [N, 2*I] gate/up projection."""
    i = gate_up.shape[-1] // 2
    g, u = gate_up[:, :i], gate_up[:, i:]
    return (g / (np.float32(1.0) + np.exp(-g))) * u


def rope_qkv(qkv, positions, hkv: int, d: int, cos, sin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the fused [N, (Hq + 2 Hkv) * D] projection into q, k (both rotated, half-split RoPE) and v."""
    n = qkv.shape[0]
    hq = qkv.shape[1] // d - 2 * hkv
    x = qkv.reshape(n, hq + 2 * hkv, d)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    qk = x[:, : hq + hkv]
    a, b = qk[..., : d // 2], qk[..., d // 2 :]
    rot = np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)
    return rot[:, :hq], rot[:, hq:], x[:, hq + hkv :]


def rope_write_kv_ref(qkv, positions, slots, k_cache, v_cache, cos, sin) -> np.ndarray:
    """Rotate q and k (half-split RoPE), write k/v into their page slots; return q [N, Hq, D]."""
    _, hkv, page, d = k_cache.shape
    q, k, v = rope_qkv(qkv, positions, hkv, d, cos, sin)
    pg, off = slots // page, slots % page
    k_cache[pg, :, off] = k
    v_cache[pg, :, off] = v
    return np.ascontiguousarray(q)


def rope_write_kv_sparse_ref(
    qkv, positions, dense_slots, stream_slots, kd, vd, ks, vs, head_class, head_slot, cos, sin,
    kmax=None, kmin=None,
) -> np.ndarray:  # fmt: skip
    """Rotate q/k (half-split RoPE); write each KV head's k/v into the pool of its class; refresh stats."""
    hkv, d = head_class.shape[0], kd.shape[-1] if kd.shape[1] else ks.shape[-1]
    q, k, v = rope_qkv(qkv, positions, hkv, d, cos, sin)
    for cls, slots, kc, vc in ((0, dense_slots, kd, vd), (1, stream_slots, ks, vs)):
        heads = np.nonzero(head_class == cls)[0]
        if heads.size == 0:
            continue
        page = kc.shape[2]
        pg, off = slots // page, slots % page
        rows = head_slot[heads]
        kc[pg[:, None], rows[None, :], off[:, None]] = k[:, heads]
        vc[pg[:, None], rows[None, :], off[:, None]] = v[:, heads]
    if kmax is not None and kd.shape[1]:
        update_page_stats(kmax, kmin, kd, dense_slots)
    return np.ascontiguousarray(q)
