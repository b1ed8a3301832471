"""Run-time compilation of kernels/*.cu with NVRTC (through CuPy), and a GPU-free compile check for CI.

Every kernel source is compiled with the same flags at run time (`load_module`) and in CI (`nvrtc_check`):
`STD_FLAGS` + `-I<kernels dir>` + the caller's options (+ `-ftz=true`, which CuPy adds at run time).

Caching: in memory per (file, device arch, options); on disk through CuPy's kernel cache (a user cache dir,
`~/.cupy/kernel_cache` unless `CUPY_CACHE_DIR` says otherwise), keyed by source, options, arch and NVRTC
version. Headers included from the kernels dir are hashed into a `-D` option, so editing a `.cuh`
invalidates every cached module that includes it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from pathlib import Path

from .cuda_launch import Module, pdl_setting

STD_FLAGS: tuple[str, ...] = ("-std=c++17",)
RUNTIME_EXTRA: tuple[str, ...] = ("-ftz=true",)  # CuPy appends this at run time; CI mirrors it
# Sources with arch-specific instructions (wgmma needs the "a" target sm_90a): compiled for that target only,
# never for other devices (the source #errors elsewhere). Every other source compiles for the device's arch.
ARCH_SPECIFIC: dict[str, str] = {"attention_prefill_sm90.cu": "sm_90a"}
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
_modules: dict[tuple, object] = {}


@functools.cache
def kernels_dir() -> Path:
    """The folder holding the *.cu / *.cuh sources (package data when installed, ./kernels in a checkout)."""
    try:
        p = Path(str(importlib.resources.files("lserve_lite.kernels")))
        if p.is_dir() and any(p.glob("*.cu")):
            return p
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "kernels"


def kernel_sources() -> list[str]:
    """Names of every compilable kernel source (kernels/*.cu)."""
    return sorted(p.name for p in kernels_dir().glob("*.cu"))


def read_source(filename: str) -> str:
    return (kernels_dir() / filename).read_text()


def _source_digest(filename: str) -> str:
    """Hash of the source and every local header it includes (transitively)."""
    h, seen, todo = hashlib.sha256(), set(), [filename]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = kernels_dir() / name
        if not path.is_file():
            continue  # a system header, or one NVRTC will report
        text = path.read_text()
        h.update(name.encode() + b"\0" + text.encode())
        todo.extend(_INCLUDE_RE.findall(text))
    return h.hexdigest()[:16]


def compile_options(filename: str, options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The exact NVRTC options used at run time for this file (arch and -ftz added by CuPy)."""
    return (*STD_FLAGS, f"-I{kernels_dir()}", f"-DLSERVE_SRC_HASH=0x{_source_digest(filename)}", *options)


def load_module(filename: str, name_expressions: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    """Compile kernels/<filename> for the current device (cached) and return it as a cuda_launch.Module.

    `name_expressions` lists template instantiations to fetch later by the same string through
    `module.get_function("kernel<64, 4>")`.
    """
    import cupy

    dev = cupy.cuda.Device()
    arch = dev.compute_capability
    opts = compile_options(filename, tuple(options))
    target = ARCH_SPECIFIC.get(filename)
    if target is not None:
        if target.removeprefix("sm_").rstrip("a") != arch:
            raise RuntimeError(f"{filename} is built for {target} only; this device is sm_{arch}")
        # CuPy appends its own -arch=sm_<cc> after these options; NVRTC keeps the arch-specific target
        # (checked: NVRTC 12.9 emits .target sm_90a and an sm_90a cubin for either order), and the source's
        # #error guard turns any other outcome into a compile error rather than a wrong kernel.
        opts = (*opts, f"-arch={target}")
    key = (filename, arch, opts, tuple(name_expressions))
    mod = _modules.get(key)
    if mod is None:

        def build(o):
            m = cupy.RawModule(
                code=read_source(filename), options=o, name_expressions=tuple(name_expressions) or None
            )
            m.compile()
            return m

        try:
            mod = build(opts)
        except cupy.cuda.compiler.CompileException as e:
            if "cannot open source file" not in str(e) or not _cuda_include_dirs():
                raise
            # CuPy found no CUDA headers (cuda_fp16.h): point NVRTC at the ones we know of.
            mod = build(opts + tuple(f"-I{d}" for d in _cuda_include_dirs()))
        _modules[key] = mod
    return Module(mod, pdl_setting(arch))


@functools.cache
def _cuda_include_dirs() -> tuple[str, ...]:
    """Include dirs with cuda_fp16.h etc. for a GPU-free compile (nvidia-cuda-runtime-cu12, CUDA_PATH)."""
    import os

    dirs = []
    try:
        import nvidia.cuda_runtime as rt

        for p in rt.__path__:
            if (Path(p) / "include" / "cuda_fp16.h").is_file():
                dirs.append(str(Path(p) / "include"))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            dirs.append(str(Path(root) / "include"))
    return tuple(dict.fromkeys(dirs))


def nvrtc_check(
    filename: str,
    arch: str,
    name_expressions: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    source: str | None = None,
) -> str:
    """Compile kernels/<filename> for `arch` ("sm_80", "sm_90", "80", "sm_90a") through NVRTC with no GPU.

    Uses the run-time flags; returns the compiler log (warnings); raises RuntimeError with the log on errors.
    `source`: this text compiled in the file's place (tests: a source plus static_asserts on its layouts).
    """
    from cupy_backends.cuda.libs import nvrtc

    cc = arch.removeprefix("sm_").removeprefix("compute_")
    opts = [
        f"-arch=compute_{cc}",
        *compile_options(filename, tuple(options)),
        *RUNTIME_EXTRA,
        *(f"-I{d}" for d in _cuda_include_dirs()),
    ]
    prog = nvrtc.createProgram(read_source(filename) if source is None else source, filename, [], [])
    try:
        for ne in name_expressions:
            nvrtc.addNameExpression(prog, ne)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {filename} for sm_{cc}:\n{nvrtc.getProgramLog(prog)}") from e
        for ne in name_expressions:
            nvrtc.getLoweredName(prog, ne)  # raises if the instantiation does not exist
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
