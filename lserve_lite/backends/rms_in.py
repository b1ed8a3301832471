"""The residual add and RMSNorm that a decode GEMV applies to its input in its prologue (kernels/rms_in.cuh), as
the four trailing arguments of gemv_rows and quant_gemv_split; the GEMVs without it take `NO_NORM`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NO_NORM = (np.uint64(0), np.uint64(0), np.uint64(0), np.float32(0.0))


@dataclass(frozen=True)
class RmsIn:
    """r = x + res_in (None: the first layer, r = x) goes to res_out (float32 [n, K], never res_in: every block
    reads res_in while block 0 writes res_out); the GEMV multiplies r's RMSNorm with weight w."""

    res_in: Any
    res_out: Any
    w: Any
    eps: float

    def args(self) -> tuple:
        return (
            np.uint64(0) if self.res_in is None else self.res_in,
            self.res_out,
            self.w,
            np.float32(self.eps),
        )

    def rows(self, i: int, j: int) -> RmsIn:
        """The same norm for input rows i .. j - 1 (a launch over part of the rows)."""
        res_in = None if self.res_in is None else self.res_in[i:j]
        return RmsIn(res_in, self.res_out[i:j], self.w, self.eps)


def norm_args(norm: RmsIn | None) -> tuple:
    return NO_NORM if norm is None else norm.args()


def scratch_bytes(nmax: int) -> int:
    """The shared memory rms_rows takes after a kernel's own (its `scratch`, rms_in.cuh)."""
    return 4 * 33 * nmax
