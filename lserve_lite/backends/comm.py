"""Collectives between tensor-parallel ranks: the `Communicator` interface the model calls, and in-process
and shared-memory stand-ins that sum NumPy shards (the NCCL one is backends/nccl.py)."""

from __future__ import annotations

import errno
import os
import threading
from multiprocessing import shared_memory
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..errors import LServeError

Array = Any  # the backend's array
SHM_DIR = "/dev/shm"  # where multiprocessing.shared_memory's blocks live on Linux
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a file system that cannot: left sparse


class ShmBlock(NamedTuple):
    """A shared-memory block a tensor-parallel group makes: what it holds, what sizes it, its bytes, and the setting
    that makes it smaller (each named when /dev/shm has no room for it)."""

    what: str
    sized_by: str
    size: int
    shrink: str


def megabytes(n: int) -> str:
    """A size as the shared-memory errors write it."""
    return f"{n / (1 << 20):.1f} MB"


def more_room(shrink: str) -> str:
    """The way out of a /dev/shm too small for the blocks: one wording for the check before any block is made
    (engine/tp_group.check_shm_room) and each block's own refusal."""
    return f"lower {shrink} or give {SHM_DIR} more room (e.g. docker run --shm-size)"


def reserved_block(block: ShmBlock) -> shared_memory.SharedMemory:
    """A new shared-memory block whose pages are taken now: made sparse, a block that /dev/shm no longer had room
    for (another process filled it after the room check) killed its first writer with SIGBUS. Here taking them
    fails in one line naming the block and the setting that makes it smaller, and the block goes."""
    shm = shared_memory.SharedMemory(create=True, size=block.size)
    try:
        _take_pages(shm, block)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm


def _take_pages(shm: shared_memory.SharedMemory, block: ShmBlock) -> None:
    """posix_fallocate on the block: on tmpfs it takes the pages, or fails with ENOSPC and takes none."""
    if not hasattr(os, "posix_fallocate"):  # macOS: none (and no /dev/shm)
        return
    try:
        os.posix_fallocate(shm._fd, 0, block.size)
    except OSError as e:
        if e.errno in _NO_FALLOCATE:
            return
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise LServeError(
                f"shared memory in {SHM_DIR} ran out while taking {megabytes(block.size)} for {block.what} "
                f"({block.sized_by}; another process took the room): {more_room(block.shrink)}"
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
    def block(world: int, slot_bytes: int = SLOT_BYTES) -> ShmBlock:
        """The shared block of a group of `world` ranks, as the room check and its refusal name it."""
        return ShmBlock(
            "the CPU ranks' exchange block",
            f"{world} ranks x {slot_bytes >> 20} MB",
            world * slot_bytes,
            "tensor_parallel (--tensor-parallel, EngineConfig's tensor_parallel)",
        )

    @staticmethod
    def create(world: int, slot_bytes: int = SLOT_BYTES) -> shared_memory.SharedMemory:
        """The shared block of a group (the driver owns it and unlinks it at shutdown)."""
        return reserved_block(ShmCommunicator.block(world, slot_bytes))

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
