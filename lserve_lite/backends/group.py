"""Starting a tensor-parallel group: what the driver makes once (the NCCL id, or the shared memory of the
CPU stand-in) and what each worker process builds from it (its Ops on its own device, its communicator)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LServeError
from . import cuda_device_count, make_ops, resolve_backend
from .comm import Communicator, ShmBlock, ShmCommunicator


@dataclass
class GroupSpec:
    """What a rank needs to join its group; given to each worker process at spawn (a Barrier cannot be sent
    later)."""

    backend: str  # "cuda" (NCCL, one GPU per rank) or "cpu" (shared-memory stand-in, for tests)
    world: int
    nccl_id: bytes | tuple | None = None  # nccl.get_unique_id(): bytes or a tuple, by CuPy version
    shm_name: str | None = None
    barrier: Any = None

    @property
    def sharing_memory(self) -> int:
        """How many ranks share one rank's memory: the CPU stand-in's all share the host (a KV budget or memory
        limit is the group's, each rank's 1/world of it); each GPU has its own."""
        return self.world if self.backend == "cpu" else 1


def no_multicast() -> None:
    """NVLink multicast (NVLS) stays off on these hosts: set before NCCL starts, in driver and workers."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"


def new_group(backend: str, world: int, ctx: Any) -> tuple[GroupSpec, Callable[[], None]]:
    """A group of `world` ranks on `backend` ("auto", "cuda", "cpu") and the driver's cleanup for it; CUDA
    needs `world` GPUs. `ctx`: the multiprocessing context the workers are spawned from."""
    backend = resolve_backend(backend)
    if backend == "cuda":
        have = cuda_device_count()
        if have < world:
            raise LServeError(f"tensor_parallel {world} needs {world} GPUs; CuPy sees {have}")
        from .nccl import nccl_unique_id

        no_multicast()
        return GroupSpec("cuda", world, nccl_id=nccl_unique_id()), lambda: None
    if backend != "cpu":
        raise LServeError(f"unknown backend {backend!r} (cpu, cuda or auto)")
    shm = ShmCommunicator.create(world)

    def close() -> None:
        shm.close()
        shm.unlink()

    return GroupSpec("cpu", world, shm_name=shm.name, barrier=ctx.Barrier(world)), close


def exchange_blocks(backend: str, world: int) -> list[ShmBlock]:
    """The blocks `new_group` makes in shared memory (/dev/shm) for `world` ranks on `backend`: the CPU stand-in's
    exchange block; NCCL makes none."""
    return [ShmCommunicator.block(world)] if resolve_backend(backend) == "cpu" else []


def join_group(spec: GroupSpec, rank: int) -> tuple[Any, Communicator]:
    """In a worker: its Ops (on GPU `rank` for CUDA) and its end of the group."""
    if spec.backend == "cuda":
        from .cuda import CudaOps
        from .nccl import NcclCommunicator

        no_multicast()
        ops = CudaOps(device=rank)
        return ops, NcclCommunicator(spec.nccl_id, rank, spec.world)
    return make_ops("cpu"), ShmCommunicator(spec.shm_name, spec.barrier, rank, spec.world)


def host_ops() -> Any:
    """The driver's Ops for host work (sampling rank 0's logits, which come back as NumPy)."""
    return make_ops("cpu")
