"""The spread norm's struct argument (kernels/spread_norm.cuh's `lserve::Spread`): the residual stream, the producer's
per-block sums of squares and, for the consumer, the norm's weight and epsilon, as a NumPy structured scalar
(CuPy passes its bytes by value)."""

from __future__ import annotations

from typing import Any

import numpy as np

SPREAD = np.dtype(
    [("res", np.uint64), ("part", np.uint64), ("w", np.uint64), ("ld", np.int32), ("parts", np.int32),
     ("eps", np.float32)],
    align=True,
)  # fmt: skip
assert SPREAD.itemsize == 40  # static_assert(sizeof(Spread) == 40) in spread_norm.cuh


def spread_arg(res: Any, part: Any, w: Any = None, parts: int = 0, eps: float = 0.0) -> np.void:
    """The Spread argument: `res` the float32 residual stream [n, ld], `part` the partials (written by a producer,
    read by a consumer with the norm weight `w`, `parts` blocks' worth, and `eps`)."""
    v = np.zeros((), SPREAD)
    v["res"], v["part"] = int(res.data.ptr), int(part.data.ptr)
    v["w"] = 0 if w is None else int(w.data.ptr)
    v["ld"] = int(res.strides[0] // res.itemsize)
    v["parts"], v["eps"] = parts, eps
    return v[()]
