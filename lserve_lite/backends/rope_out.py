"""The RoPE + K/V write epilogue of the fused q/k/v decode GEMVs (gemv_rows_rope, quant_gemv_split_rope;
kernels/rope_out.cuh) as their one struct argument: a NumPy structured scalar with the layout of `lserve::RopeOut`
(CuPy and the PDL launcher pass its bytes by value)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import KVCache

_POINTERS = ("positions", "slots", "cos", "sin", "q_out", "k_cache", "v_cache", "bias", "ks", "vs", "head_class",
             "head_slot", "kmax", "kmin")  # fmt: skip
ROPE_OUT = np.dtype(
    [(f, np.uint64) for f in _POINTERS]
    + [(f, np.int32) for f in ("hq", "hkv", "head_dim", "page_size", "nd", "ns", "sub", "n_rows")],
    align=True,
)
assert ROPE_OUT.itemsize == 144  # static_assert(sizeof(RopeOut) == 144) in rope_out.cuh


def _ptr(a: Any) -> int:
    return 0 if a is None else int(a.data.ptr)


def rope_out(
    positions: Any,
    slots: Any,
    rope: tuple[Any, Any],
    q_out: Any,
    cache: KVCache,
    layer: int,
    bias: Any,
    hq: int,
) -> np.void:
    """The argument for device arrays positions [N] int64, slots ([N] dense, [2, N] LServe) int64, the RoPE tables,
    q_out [N, Hq, D], one layer of an fp16 cache (dense, or LServe's two pools with its page statistics) and the
    projection's bias (None: none). The arrays must outlive the launch (the scalar holds their addresses only)."""
    kc = cache.k[layer]
    sparse = cache.sparse
    stats = sparse and cache.kmax is not None
    arrays = (positions, slots, rope[0], rope[1], q_out, kc, cache.v[layer], bias,
              cache.ks[layer] if sparse else None, cache.vs[layer] if sparse else None,
              cache.head_class[layer] if sparse else None, cache.head_slot[layer] if sparse else None,
              cache.kmax[layer] if stats else None, cache.kmin[layer] if stats else None)  # fmt: skip
    v = np.zeros((), ROPE_OUT)
    for f, a in zip(_POINTERS, arrays, strict=True):
        v[f] = _ptr(a)
    v["hq"], v["hkv"], v["head_dim"], v["page_size"] = (
        hq,
        cache.kv_heads(layer),
        cache.head_dim,
        int(kc.shape[2]),
    )
    v["nd"], v["ns"] = int(kc.shape[1]), int(cache.ks[layer].shape[1]) if sparse else 0
    v["sub"] = int(cache.kmax[layer].shape[2]) if stats else 1
    v["n_rows"] = int(positions.shape[0])
    return v[()]


def rope_kind(ro: np.void) -> int:
    """The kernels' ROPE template argument for `ro`: 1 a dense cache, 2 LServe's (two pools, statistics)."""
    return 2 if int(ro["head_class"]) else 1


def rope_rows(ro: np.void, first: int) -> np.void:
    """`ro` for a launch over rows first.. of the batch: its per-row pointers moved `first` rows on (the streaming
    slots stay n_rows after the dense ones)."""
    if first == 0:
        return ro
    v = np.array(ro, ROPE_OUT)
    v["positions"] += 8 * first
    v["slots"] += 8 * first
    v["q_out"] += 2 * first * int(ro["hq"]) * int(ro["head_dim"])
    return v[()]
