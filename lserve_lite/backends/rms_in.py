"""The residual add and RMSNorm that a decode GEMV applies to its input in its prologue (kernels/rms_in.cuh), as
the four trailing arguments of gemv_rows; its instantiations without it take `NO_NORM`."""

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


def scratch_bytes(nmax: int) -> int:
    """The shared memory rms_rows takes after a kernel's own (its `scratch`, rms_in.cuh)."""
    return 4 * 33 * nmax
