"""The programmatic-dependent-launch contract (backends/cuda_launch.py, kernels/pdl.cuh), checked without a GPU:
every kernel waits in pdl_enter() before it may touch another kernel's memory, the ctypes structures match
cuda.h's layout, and arguments convert as CuPy's RawKernel converts them."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lserve_lite.backends import cuda_launch
from lserve_lite.backends.cuda_compile import kernels_dir
from lserve_lite.errors import InvalidRequestError

_GLOBAL = re.compile(r"^(?!template __global__).*__global__\b", re.M)
_DEVICE = re.compile(r"^__device__\b", re.M)


def _bodies(src: str, pattern: re.Pattern = _GLOBAL) -> list[tuple[str, str]]:
    """(name, body) of every __global__ (or `pattern`) function definition (explicit instantiations excluded)."""
    out = []
    for m in pattern.finditer(src):
        start = src.index("{", m.end())
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            if depth == 0:
                break
            i += 1
        out.append((src[m.start() : start].split("(")[0].split()[-1], src[start : i + 1]))
    return out


def test_every_kernel_calls_pdl_enter():
    """A kernel launched while its predecessor still runs must wait before reading activations or writing
    outputs: each __global__ body calls pdl_enter() (the GEMVs after their first weight loads only)."""
    seen = 0
    for path in sorted(kernels_dir().glob("*.cu")):
        src = path.read_text()
        # a kernel may be a thin wrapper of a device function of the same file that waits (the GEMV bodies)
        waits = [n for n, b in _bodies(src, _DEVICE) if "pdl_enter();" in b]
        for name, body in _bodies(src):
            seen += 1
            ok = "pdl_enter();" in body or any(re.search(rf"\b{w}\s*[<(]", body) for w in waits)
            assert ok, f"{path.name}: kernel {name} never calls pdl_enter()"
    assert seen >= 24  # every family: layers, attention (prefill, sm90, decode), selector, quant, sampling


def test_ctypes_structures_match_cuda_h():
    """Sizes and offsets of CUlaunchConfig / CUlaunchAttribute as cuda.h (CUDA 12-13, x86-64) lays them out."""
    cfg, attr = cuda_launch.LaunchConfig, cuda_launch.LaunchAttribute
    assert ctypes.sizeof(cfg) == 56 and ctypes.sizeof(attr) == 72
    assert (cfg.stream.offset, cfg.attrs.offset, cfg.num_attrs.offset, cfg.shared_mem.offset) == (
        32,
        40,
        48,
        24,
    )
    assert attr.value.offset == 8


class _Array:
    """Stands for a cupy.ndarray: a `data` with a `ptr`."""

    class data:
        ptr = 0x7F00_1234_5600


@pytest.mark.parametrize(
    "arg,size,raw",
    [
        (np.int32(-7), 4, np.int32(-7).tobytes()),
        (np.float32(1.5), 4, np.float32(1.5).tobytes()),
        (np.int64(1 << 40), 8, np.int64(1 << 40).tobytes()),
        (np.uint64(0), 8, bytes(8)),
        (None, 8, bytes(8)),
        (3, 8, np.int64(3).tobytes()),
        (0.25, 8, np.float64(0.25).tobytes()),
        (_Array(), 8, np.uint64(0x7F00_1234_5600).tobytes()),
    ],
)
def test_kernel_args_convert_as_cupy_does(arg, size, raw):
    v = cuda_launch.kernel_arg(arg)
    assert ctypes.sizeof(v) == size
    assert ctypes.string_at(ctypes.addressof(v), size) == raw


def test_kernel_arg_refuses_what_it_cannot_pass():
    with pytest.raises(TypeError, match="cannot pass a str"):
        cuda_launch.kernel_arg("x")


def test_pdl_setting(monkeypatch):
    monkeypatch.delenv("LSERVE_PDL", raising=False)
    assert cuda_launch.pdl_setting("90") and not cuda_launch.pdl_setting("80")
    monkeypatch.setenv("LSERVE_PDL", "0")
    assert not cuda_launch.pdl_setting("90")
    monkeypatch.setenv("LSERVE_PDL", "1")
    assert cuda_launch.pdl_setting("80")
    monkeypatch.setenv("LSERVE_PDL", "yes")
    with pytest.raises(InvalidRequestError, match="LSERVE_PDL must be one of auto, 0, 1, got 'yes'"):
        cuda_launch.pdl_setting("90")


def test_kernel_forwards_the_attributes_the_launchers_use():
    """Launchers read num_regs and set the shared-memory attributes: those must reach CuPy's kernel, not
    land on the wrapper (found: a carveout set on the wrapper did nothing)."""

    class Raw:
        num_regs, max_dynamic_shared_size_bytes, preferred_shared_memory_carveout = 40, 0, -1

    raw = Raw()
    k = cuda_launch.Kernel(raw, "k", pdl=False)
    k.max_dynamic_shared_size_bytes = 1000
    k.preferred_shared_memory_carveout = 100
    assert (raw.max_dynamic_shared_size_bytes, raw.preferred_shared_memory_carveout, k.num_regs) == (
        1000,
        100,
        40,
    )
    with pytest.raises(AttributeError):
        k.not_an_attribute = 1


def test_gemv_tuning_options():
    """gemv_rows' tuning knobs become NVRTC definitions; bad values are refused before any compile, with the one-line
    error the CLI and the server print alone (InvalidRequestError, not a traceback)."""
    from lserve_lite.backends.cuda import gemv_tuning
    from lserve_lite.errors import InvalidRequestError

    assert gemv_tuning({}) == ()
    assert gemv_tuning({"LSERVE_GEMV_PREFETCH": "128", "LSERVE_GEMV_UNROLL": "4"}) == (
        "-DLSERVE_GEMV_PREFETCH=128",
        "-DLSERVE_GEMV_UNROLL=4",
    )
    for env in ({"LSERVE_GEMV_UNROLL": "0"}, {"LSERVE_GEMV_PREFETCH": "-1"}, {"LSERVE_GEMV_UNROLL": "8; rm"}):
        with pytest.raises(InvalidRequestError, match="LSERVE_GEMV_"):
            gemv_tuning(env)


def test_numeric_knob_refuses_bad_values(monkeypatch):
    """LSERVE_GEMV_KSPLIT (waves of resident warps two warps per row may fill): numbers in range, else one line."""
    from lserve_lite.config import env_float as _env_float

    monkeypatch.delenv("LSERVE_GEMV_KSPLIT", raising=False)
    assert _env_float("LSERVE_GEMV_KSPLIT", 1.0, 0.0, 8.0) == 1.0
    monkeypatch.setenv("LSERVE_GEMV_KSPLIT", "1.5")
    assert _env_float("LSERVE_GEMV_KSPLIT", 1.0, 0.0, 8.0) == 1.5
    for bad in ("-1", "9", "nan", "two"):
        monkeypatch.setenv("LSERVE_GEMV_KSPLIT", bad)
        with pytest.raises(ValueError, match=r"LSERVE_GEMV_KSPLIT must be a number in \[0, 8\]"):
            _env_float("LSERVE_GEMV_KSPLIT", 1.0, 0.0, 8.0)


def test_switches_refuse_bad_values(monkeypatch):
    """The CUDA backend's switches (LSERVE_PDL, LSERVE_QGEMV*, LSERVE_CUDA_*, LSERVE_SELECTOR, ...): one value of a
    list, stripped and lower-cased, else an InvalidRequestError (one line from the CLI, not a traceback)."""
    from lserve_lite.config import env_choice

    monkeypatch.delenv("LSERVE_CUDA_FUSE_NORM", raising=False)
    assert env_choice("LSERVE_CUDA_FUSE_NORM", "1", ("0", "1")) == "1"
    monkeypatch.setenv("LSERVE_CUDA_FUSE_NORM", " 0 ")
    assert env_choice("LSERVE_CUDA_FUSE_NORM", "1", ("0", "1")) == "0"
    monkeypatch.setenv("LSERVE_CUDA_FUSE_NORM", "off")  # was read as "on": anything but "0" was
    with pytest.raises(InvalidRequestError, match="LSERVE_CUDA_FUSE_NORM must be one of 0, 1, got 'off'"):
        env_choice("LSERVE_CUDA_FUSE_NORM", "1", ("0", "1"))


def test_bad_switch_is_one_line_from_the_cli():
    """A bad LSERVE_KVQ_DECODE (read when the CUDA attention module loads) stops `kernels test` with one line."""
    env = {**os.environ, "LSERVE_KVQ_DECODE": "v3"}
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "kernels", "test", "kv_quant.decode"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: LSERVE_KVQ_DECODE must be one of v1, v2, got 'v3'"
