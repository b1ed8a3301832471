"""The RoPE + K/V write epilogue of the fused q/k/v decode GEMVs (gemv_rows_rope, quant_gemv_split_rope;
kernels/rope_out.cuh) as their one struct argument: a NumPy structured scalar with the layout of `lserve::RopeOut`
(CuPy and the PDL launcher pass its bytes by value)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import KVCache
from .cuda_attention import KV_TRAITS

_POINTERS = ("positions", "slots", "cos", "sin", "q_out", "k_cache", "v_cache", "bias", "ks", "vs", "head_class",
             "head_slot", "kmax", "kmin", "k_sc", "v_sc", "ks_sc", "vs_sc", "stage", "ticket")  # fmt: skip
ROPE_OUT = np.dtype(
    [(f, np.uint64) for f in _POINTERS]
    + [
        (f, np.int32)
        for f in ("hq", "hkv", "head_dim", "page_size", "nd", "ns", "sub", "n_rows", "hadamard", "rope")
    ],
    align=True,
)
assert ROPE_OUT.itemsize == 200  # static_assert(sizeof(RopeOut) == 200) in rope_out.cuh
# Rows of a launch whose epilogue writes a quantized cache (its NMAX): batch 1, the steps the epilogue is on for by
# default (cuda.FUSE_ROPE_ROWS); more rows take rope_write_kv(_sparse) after the GEMV, sparing the compile of
# six more instantiations per row count.
QUANT_ROPE_ROWS = (1,)
ROPE_TICKETS = 1024  # heads (Hq + 2 Hkv) of a layer the tickets of CudaOps cover; more take the unfused path
# The KV formats' index in the kernels' ROPE argument: KV_TRAITS' order, which rope_out.cuh's KvOf follows.
KV_FORMAT_INDEX = {fmt: i for i, fmt in enumerate(KV_TRAITS)}


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
    stage: Any = None,
    ticket: Any = None,
) -> np.void:
    """The argument for device arrays positions [N] int64, slots ([N] dense, [2, N] LServe) int64, the RoPE tables,
    q_out [N, Hq, D], one layer of a cache (dense, or LServe's two pools with its page statistics; fp16 or a
    quantized format, which also needs `stage` [N, Hq + 2 Hkv, D] fp16 and `ticket` [>= Hq + 2 Hkv] int32 zeros)
    and the projection's bias (None: none). The arrays must outlive the launch (the scalar holds their addresses)."""
    kc = cache.k[layer]
    sparse = cache.sparse
    stats = sparse and cache.kmax is not None
    fmt = cache.fmt.name if cache.quantized else "fp16"
    if cache.quantized and (stage is None or ticket is None):
        raise ValueError("a quantized cache's epilogue needs its stage and ticket arrays")

    def scale(pools: list[Any] | None) -> Any:
        return pools[layer] if cache.quantized and pools is not None else None

    arrays = (positions, slots, rope[0], rope[1], q_out, kc, cache.v[layer], bias,
              cache.ks[layer] if sparse else None, cache.vs[layer] if sparse else None,
              cache.head_class[layer] if sparse else None, cache.head_slot[layer] if sparse else None,
              cache.kmax[layer] if stats else None, cache.kmin[layer] if stats else None,
              scale(cache.k_scale), scale(cache.v_scale), scale(cache.ks_scale), scale(cache.vs_scale),
              stage if cache.quantized else None, ticket if cache.quantized else None)  # fmt: skip
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
    v["hadamard"] = int(cache.quantized and cache.rotates_keys)
    v["rope"] = (2 if sparse else 1) + 2 * KV_FORMAT_INDEX[fmt]
    return v[()]


def rope_kind(ro: np.void) -> int:
    """The kernels' ROPE template argument for `ro` (rope_out.cuh's RopeKind): 1 a dense cache, 2 LServe's (two
    pools, statistics), plus twice the KV format's index (KV_FORMAT_INDEX)."""
    return int(ro["rope"])


def rope_kinds(nmax: int) -> tuple[int, ...]:
    """The ROPE arguments compiled for launches of up to `nmax` rows: fp16 caches always, quantized ones at
    QUANT_ROPE_ROWS."""
    formats = KV_FORMAT_INDEX.values() if nmax in QUANT_ROPE_ROWS else (0,)
    return tuple(kind + 2 * f for f in formats for kind in (1, 2))


def rope_rows(ro: np.void, first: int) -> np.void:
    """`ro` for a launch over rows first.. of the batch: its per-row pointers moved `first` rows on (the streaming
    slots stay n_rows after the dense ones)."""
    if first == 0:
        return ro
    v = np.array(ro, ROPE_OUT)
    v["positions"] += 8 * first
    v["slots"] += 8 * first
    v["q_out"] += 2 * first * int(ro["hq"]) * int(ro["head_dim"])
    if int(ro["stage"]):
        v["stage"] += 2 * first * (int(ro["hq"]) + 2 * int(ro["hkv"])) * int(ro["head_dim"])
    return v[()]
