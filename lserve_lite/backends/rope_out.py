"""The RoPE + K/V write epilogue of the fused q/k/v decode GEMV (kernels/rope_out.cuh) as its one kernel argument:
a NumPy structured scalar with the layout of `lserve::RopeOut`; the instantiations without it take `NO_ROPE`."""

from __future__ import annotations

from typing import Any

import numpy as np

ROPE_OUT = np.dtype(
    [(f, np.uint64) for f in ("positions", "slots", "cos", "sin", "q_out", "k_cache", "v_cache", "bias")]
    + [(f, np.int32) for f in ("hq", "hkv", "head_dim", "page_size")],
    align=True,
)
assert ROPE_OUT.itemsize == 80  # static_assert(sizeof(RopeOut) == 80) in rope_out.cuh

NO_ROPE = np.zeros((), ROPE_OUT)[()]


def _ptr(a: Any) -> int:
    return 0 if a is None else int(a.data.ptr)


def rope_out(
    positions: Any, slots: Any, rope: tuple[Any, Any], q_out: Any, k_cache: Any, v_cache: Any, bias: Any,
    hq: int, hkv: int, head_dim: int, page_size: int,
) -> np.void:  # fmt: skip
    """The argument for device arrays positions / slots [N] int64, the RoPE tables, q_out [N, Hq, D], one layer's
    fp16 K / V pools [pages, Hkv, page_size, D] and the projection's bias (None: none). The arrays must outlive
    the launch (the scalar holds their addresses only)."""
    v = np.zeros((), ROPE_OUT)
    for f, a in zip(
        ROPE_OUT.names[:8], (positions, slots, rope[0], rope[1], q_out, k_cache, v_cache, bias), strict=True
    ):
        v[f] = _ptr(a)
    v["hq"], v["hkv"], v["head_dim"], v["page_size"] = hq, hkv, head_dim, page_size
    return v[()]


def rope_rows(ro: np.void, first: int) -> np.void:
    """`ro` for a launch over rows first.. of the batch: its per-row pointers moved `first` rows on."""
    if first == 0:
        return ro
    v = np.array(ro, ROPE_OUT)
    v["positions"] += 8 * first
    v["slots"] += 8 * first
    v["q_out"] += 2 * first * int(ro["hq"]) * int(ro["head_dim"])
    return v[()]
