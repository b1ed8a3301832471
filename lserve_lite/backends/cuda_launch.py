"""Our kernels' launcher: CuPy's launch, or, in captured decode graphs on Hopper, a programmatic dependent launch.

A decode step is ~10 dependent kernels per layer; on the H200 the gap between one kernel's end and the next
one's first loads was a large part of the step (docs/PERF_e2e.md). With programmatic stream serialization
(cuLaunchKernelEx, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) a kernel is launched while the one
before it still runs; it waits in `lserve::pdl_enter()` (kernels/pdl.cuh: griddepcontrol.wait) until that
kernel is done and its writes are visible, and the GEMVs issue their first weight loads before that wait.
Every kernel in kernels/ calls pdl_enter() before touching memory another kernel writes or reads
(tests/test_cuda_launch.py checks that each __global__ function calls it).

Only launches into a stream being captured use it (LSERVE_PDL: "auto", the default, on sm_90 and newer;
"0" never; "1" wherever the driver accepts it): eager launches are bound by the host, and a graph replayed
against its eager twin is the test of the overlap (tests/test_gpu_graphs*.py compare them).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from ..config import env_choice

PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union (first field used)."""

    _fields_ = [
        ("id", ctypes.c_int),
        ("pad", ctypes.c_char * 4),
        ("value", ctypes.c_int),
        ("rest", ctypes.c_char * 60),
    ]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h): grid, block, dynamic shared memory, stream, attributes."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


def kernel_arg(a: Any) -> ctypes._SimpleCData | ctypes.Array:
    """One kernel argument as a ctypes value, converted as CuPy's RawKernel converts it: device arrays and
    memory pointers by address, NumPy scalars by their bytes, Python int / float / bool as int64 / double / bool."""
    if a is None:
        return ctypes.c_void_p(0)
    if isinstance(a, np.generic):
        return (ctypes.c_char * a.nbytes).from_buffer_copy(a.tobytes())
    if isinstance(a, bool):
        return ctypes.c_bool(a)
    if isinstance(a, int):
        return ctypes.c_longlong(a)
    if isinstance(a, float):
        return ctypes.c_double(a)
    data = getattr(a, "data", None)  # cupy.ndarray
    ptr = getattr(data if data is not None and hasattr(data, "ptr") else a, "ptr", None)  # or a MemoryPointer
    if isinstance(ptr, int):
        return ctypes.c_void_p(ptr)
    raise TypeError(f"cannot pass a {type(a).__name__} to a kernel")


def _dims(d: int | tuple[int, ...]) -> tuple[int, int, int]:
    t = (d,) if isinstance(d, int) else tuple(int(x) for x in d)
    return (*t, *(1,) * (3 - len(t)))  # type: ignore[return-value]


class Driver:
    """cuLaunchKernelEx from the CUDA driver library, with the one attribute we set."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernelEx.argtypes = [
            ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
        ]  # fmt: skip
        self.lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.attr = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)

    def launch(self, func: int, name: str, grid, block, shared_mem: int, stream: int, args: tuple) -> None:
        """Launch `func` (a CUfunction) with programmatic stream serialization; raises on a launch error."""
        vals = [kernel_arg(a) for a in args]
        params = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
        cfg = LaunchConfig(
            grid=(ctypes.c_uint * 3)(*_dims(grid)), block=(ctypes.c_uint * 3)(*_dims(block)),
            shared_mem=shared_mem, stream=stream, attrs=ctypes.pointer(self.attr), num_attrs=1,
        )  # fmt: skip
        rc = self.lib.cuLaunchKernelEx(ctypes.byref(cfg), func, params, None)
        if rc != 0:
            err = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(err))
            raise RuntimeError(f"launching {name} failed: {(err.value or b'?').decode()} ({rc})")


@functools.cache
def _driver() -> Driver:
    return Driver()


def pdl_setting(compute_capability: str) -> bool:
    """Whether captured launches use programmatic dependent launch on a device of this capability ("90")."""
    setting = env_choice("LSERVE_PDL", "auto", ("auto", "0", "1"))
    return setting == "1" or (setting == "auto" and int(compute_capability) >= 90)


class Kernel:
    """A kernel of ours, called as CuPy's RawKernel is: `kernel(grid, block, args, shared_mem=0)`; the CuPy
    attributes our launchers use are forwarded (slots: any other assignment fails instead of doing nothing)."""

    __slots__ = ("raw", "name", "pdl")

    def __init__(self, raw: Any, name: str, pdl: bool):
        self.raw, self.name, self.pdl = raw, name, pdl

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.raw.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, nbytes: int) -> None:
        self.raw.max_dynamic_shared_size_bytes = nbytes

    @property
    def preferred_shared_memory_carveout(self) -> int:
        return self.raw.preferred_shared_memory_carveout

    @preferred_shared_memory_carveout.setter
    def preferred_shared_memory_carveout(self, percent: int) -> None:
        self.raw.preferred_shared_memory_carveout = percent

    @property
    def num_regs(self) -> int:
        return self.raw.num_regs

    def blocks_per_sm(self, threads: int, shared_mem: int) -> int:
        """Blocks of `threads` threads with `shared_mem` bytes of dynamic shared memory resident at once on one SM
        (the driver's occupancy calculator: registers, shared memory, threads; a query, no stream work)."""
        from cupy_backends.cuda.api import driver

        return int(driver.occupancyMaxActiveBlocksPerMultiprocessor(self.raw.kernel.ptr, threads, shared_mem))

    def __call__(self, grid, block, args: tuple, shared_mem: int = 0) -> None:
        if self.pdl:
            import cupy as cp

            stream = cp.cuda.get_current_stream()
            if stream.is_capturing():
                _driver().launch(self.raw.kernel.ptr, self.name, grid, block, shared_mem, stream.ptr, args)
                return
        self.raw(grid, block, args, shared_mem=shared_mem)


class Module:
    """A compiled kernels/<file>.cu: `get_function(name)` gives a Kernel."""

    def __init__(self, raw: Any, pdl: bool):
        self.raw, self.pdl = raw, pdl

    def get_function(self, name: str) -> Kernel:
        return Kernel(self.raw.get_function(name), name, self.pdl)
