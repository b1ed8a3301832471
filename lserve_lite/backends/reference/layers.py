"""References of kernels/layers.cu: embedding gather, RMSNorm, RoPE + K/V page write (both KV layouts,
with the page statistics of the selector), SiLU-and-multiply. float32 NumPy; the CPU backend runs the
Numba versions of the same math (backends/cpu_kernels.py). A quantized cache (kv/quant.py) gets its
values and scales written here, quantized from the float32 K/V."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...kv.quant import KVFormat, hadamard, quantize
from .page_stats import merge_page_stats, update_page_stats


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


def rope_qkv(
    qkv, positions, hkv: int, d: int, cos, sin, fmt: KVFormat | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the fused [N, (Hq + 2 Hkv) * D] projection into q, k (both rotated, half-split RoPE, then into the
    Hadamard basis when the KV format `fmt` stores keys there: kv/quant.hadamard) and v."""
    n = qkv.shape[0]
    hq = qkv.shape[1] // d - 2 * hkv
    x = qkv.reshape(n, hq + 2 * hkv, d)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    qk = x[:, : hq + hkv]
    a, b = qk[..., : d // 2], qk[..., d // 2 :]
    rot = np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)
    if fmt is not None and fmt.rotates_keys(d):
        rot = hadamard(rot)
    return rot[:, :hq], rot[:, hq:], x[:, hq + hkv :]


def write_rows(x, cache, scales, fmt: KVFormat | None, idx: tuple) -> None:
    """cache[idx] = x (float rows), or their quantized values and scales for a quantized cache."""
    if scales is None:
        cache[idx] = x
        return
    vals, sc = quantize(x, fmt, scales.dtype)
    cache[idx], scales[idx] = vals, sc


def rope_write_kv_ref(
    qkv, positions, slots, k_cache, v_cache, cos, sin, k_scale=None, v_scale=None, fmt=None
) -> np.ndarray:
    """Rotate q and k (half-split RoPE; then the Hadamard basis where `fmt` asks for it, with or without scales),
    write k/v into their page slots; return q [N, Hq, D]."""
    _, hkv, page, _ = k_cache.shape
    d = cos.shape[1] * 2
    q, k, v = rope_qkv(qkv, positions, hkv, d, cos, sin, fmt)
    pg, off = slots // page, slots % page
    write_rows(k, k_cache, k_scale, fmt, (pg, slice(None), off))
    write_rows(v, v_cache, v_scale, fmt, (pg, slice(None), off))
    return np.ascontiguousarray(q)


def rope_write_kv_sparse_ref(
    qkv, positions, dense_slots, stream_slots, kd, vd, ks, vs, head_class, head_slot, cos, sin,
    kmax=None, kmin=None, scales: tuple = (None,) * 4, fmt: KVFormat | None = None,
) -> np.ndarray:  # fmt: skip
    """Rotate q/k (half-split RoPE); write each KV head's k/v into the pool of its class (`scales` of kd, vd,
    ks, vs for a quantized cache); refresh the dense pool's key statistics from the unquantized keys."""
    hkv, d = head_class.shape[0], cos.shape[1] * 2
    q, k, v = rope_qkv(qkv, positions, hkv, d, cos, sin, fmt)
    for cls, slots, kc, vc, ksc, vsc in (
        (0, dense_slots, kd, vd, *scales[:2]),
        (1, stream_slots, ks, vs, *scales[2:]),
    ):
        heads = np.nonzero(head_class == cls)[0]
        if heads.size == 0:
            continue
        page = kc.shape[2]
        pg, off = slots // page, slots % page
        idx = (pg[:, None], head_slot[heads][None, :], off[:, None])
        write_rows(k[:, heads], kc, ksc, fmt, idx)
        write_rows(v[:, heads], vc, vsc, fmt, idx)
    if kmax is not None and kd.shape[1]:
        if scales[0] is None:
            update_page_stats(kmax, kmin, kd, dense_slots)
        else:
            dense = np.nonzero(head_class == 0)[0]
            keys = np.zeros((k.shape[0], kd.shape[1], d), np.float32)
            keys[:, head_slot[dense]] = k[:, dense]
            merge_page_stats(kmax, kmin, keys, dense_slots, kd.shape[2])
    return np.ascontiguousarray(q)
