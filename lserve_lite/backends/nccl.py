"""NCCL collectives through CuPy (`cupy.cuda.nccl`) for tensor-parallel ranks, one GPU each. Every call is
issued on the current stream, so a decode step's all-reduces are captured in its CUDA Graph like its kernels."""

from __future__ import annotations

from typing import Any

import numpy as np


def nccl_unique_id() -> bytes | tuple:
    """The group's id, made once by the driver and given to every rank at start-up."""
    from cupy.cuda import nccl

    return nccl.get_unique_id()


class NcclCommunicator:
    """One rank's NCCL communicator on the current device (the `Communicator` of backends/comm.py)."""

    def __init__(self, unique_id: bytes | tuple, rank: int, world: int):
        import cupy as cp
        from cupy.cuda import nccl

        self.cp, self.rank, self.world = cp, rank, world
        self.comm = nccl.NcclCommunicator(world, unique_id, rank)
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32}
        self.sum = nccl.NCCL_SUM

    def all_reduce(self, x: Any) -> None:
        """x = the sum over ranks, in place (x contiguous: the outputs of our GEMMs are)."""
        stream = self.cp.cuda.get_current_stream().ptr
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self.types[x.dtype], self.sum, stream)

    def all_gather(self, x: Any) -> Any:
        """[R, n] per rank -> [R, world * n]: NCCL gathers rank-major ([world, R, n]), then one transpose copy."""
        buf = self.cp.empty((self.world, *x.shape), x.dtype)
        stream = self.cp.cuda.get_current_stream().ptr
        self.comm.allGather(x.data.ptr, buf.data.ptr, x.size, self.types[x.dtype], stream)
        return self.cp.ascontiguousarray(self.cp.moveaxis(buf, 0, -2)).reshape(*x.shape[:-1], -1)
