"""Collectives between tensor-parallel ranks: the `Communicator` interface the model calls, and in-process
and shared-memory stand-ins that sum NumPy shards (the NCCL one is backends/nccl.py)."""

from __future__ import annotations

import errno
import os
import threading
from multiprocessing import shared_memory
from typing import Any, Protocol

import numpy as np

from ..errors import LServeError

Array = Any  # the backend's array
SHM_DIR = "/dev/shm"  # where multiprocessing.shared_memory's blocks live on Linux
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a file system that cannot: left sparse


def reserved_block(size: int, what: str, shrink: str) -> shared_memory.SharedMemory:
    """A new shared-memory block whose pages are taken now: made sparse, a block that /dev/shm no longer had room
    for (another process filled it after the room check) killed its first writer with SIGBUS. Here taking them
    fails in one line naming `what` and `shrink`, the setting that makes this block smaller, and the block goes."""
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        _take_pages(shm, size, what, shrink)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm


def _take_pages(shm: shared_memory.SharedMemory, size: int, what: str, shrink: str) -> None:
    """posix_fallocate on the block: on tmpfs it takes the pages, or fails with ENOSPC and takes none."""
    if not hasattr(os, "posix_fallocate"):  # macOS: none (and no /dev/shm)
        return
    try:
        os.posix_fallocate(shm._fd, 0, size)
    except OSError as e:
        if e.errno in _NO_FALLOCATE:
            return
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise LServeError(
                f"shared memory in {SHM_DIR} ran out while taking {size / (1 << 20):.0f} MB for {what} (another "
                f"process took the room): lower {shrink} or give {SHM_DIR} more room (e.g. docker run --shm-size)"
            ) from None
        raise


class Communicator(Protocol):
    """One rank's end of a group of `world` ranks; every rank makes the same calls in the same order."""

    rank: int
    world: int

    def all_reduce(self, x: Array) -> None:
        """x = the sum of every rank's x, in place."""

    def all_gather(self, x: Array) -> Array:
        """Every rank's x [R, n] side by side along the last axis, rank order: [R, world * n]."""


class SumCommunicator:
    """all_gather as an all-reduce of zero-padded copies (exact: x + 0 == x), for the stand-ins."""

    rank: int
    world: int

    def all_reduce(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[-1]
        out = np.zeros((*x.shape[:-1], self.world * n), x.dtype)
        out[..., self.rank * n : (self.rank + 1) * n] = x
        self.all_reduce(out)
        return out


class ThreadGroup:
    """State shared by the ranks of one in-process group (one thread per rank)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[np.ndarray | None] = [None] * world

    def communicators(self) -> list[ThreadCommunicator]:
        return [ThreadCommunicator(self, r) for r in range(self.world)]


class ThreadCommunicator(SumCommunicator):
    """The in-process stand-in: NumPy sum over the shards of threads of one process, in rank order (so every
    rank gets bit-identical sums, as NCCL's ring gives)."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def all_reduce(self, x: np.ndarray) -> None:
        g = self.group
        g.slots[self.rank] = x
        g.barrier.wait()
        total = np.sum(g.slots, axis=0, dtype=x.dtype)
        g.barrier.wait()  # everyone has read every slot before anyone writes its own
        x[...] = total


class ShmCommunicator(SumCommunicator):
    """The process stand-in (CPU backend across worker processes): each rank's slot in one shared-memory
    block, chunk by chunk, between barriers of a multiprocessing.Barrier."""

    SLOT_BYTES = 1 << 22

    def __init__(self, name: str, barrier: Any, rank: int, world: int, slot_bytes: int = SLOT_BYTES):
        self.rank, self.world, self.barrier = rank, world, barrier
        self.shm = shared_memory.SharedMemory(name=name)
        self.slot_bytes = slot_bytes

    @staticmethod
    def create(world: int, slot_bytes: int = SLOT_BYTES) -> shared_memory.SharedMemory:
        """The shared block of a group (the driver owns it and unlinks it at shutdown)."""
        return reserved_block(
            world * slot_bytes,
            f"the CPU ranks' exchange block ({world} ranks x {slot_bytes >> 20} MB)",
            "tensor_parallel (--tensor-parallel, EngineConfig's tensor_parallel)",
        )

    def all_reduce(self, x: np.ndarray) -> None:
        if not x.flags.c_contiguous:
            raise ValueError("ShmCommunicator.all_reduce needs a contiguous array (it works on a flat view)")
        flat = x.reshape(-1)
        slots = np.ndarray((self.world, self.slot_bytes // x.itemsize), x.dtype, self.shm.buf)
        step = slots.shape[1]
        for c0 in range(0, flat.size, step):
            c1 = min(c0 + step, flat.size)
            slots[self.rank, : c1 - c0] = flat[c0:c1]
            self.barrier.wait()
            total = slots[:, : c1 - c0].sum(axis=0, dtype=x.dtype)
            self.barrier.wait()
            flat[c0:c1] = total
