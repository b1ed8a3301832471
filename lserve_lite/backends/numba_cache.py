"""Numba's on-disk kernel cache (`cache=True`), made to notice the other files a kernel compiles in.

Numba keys a cached kernel by the hash of its own source file only: an `@overload` or njit helper it
inlines from another module (or a global it freezes) can change while the cached machine code stays. So
after the int4 KV format became asymmetric in cpu_kv.py, an unchanged cpu_kernels.py kept loading its
cached `rope_write_kv` / `paged_attention` with the old symmetric int4 store and load compiled in: a dense
CPU engine with `--kv-dtype int4` then wrote K/V that the NumPy prefill attention (kv/quant.py's rule) read
as garbage, in any checkout whose __pycache__ predated the change (and a fresh one was fine).

`flush_if_deps_changed`, called at the end of a kernel module, records a hash of the dependencies' sources
beside the cache and flushes the module's cached kernels whenever it differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

from numba.core.dispatcher import Dispatcher


def deps_stamp(deps: list[ModuleType]) -> str:
    """Hash of the dependency modules' source files."""
    h = hashlib.sha256()
    for m in deps:
        h.update(m.__name__.encode() + b"\0" + Path(m.__file__).read_bytes() + b"\0")
    return h.hexdigest()


def flush_if_deps_changed(namespace: dict, deps: list[ModuleType]) -> bool:
    """Flush the on-disk cache of the cached kernels defined in module `namespace` (its globals()) when the
    sources of `deps` (what those kernels compile in from other modules) changed since the stamp was written;
    True if it flushed. A cache directory that cannot be written is left alone (Numba then caches nothing)."""
    mod = namespace["__name__"]
    kernels = [
        f for f in namespace.values()
        if isinstance(f, Dispatcher) and f.py_func.__module__ == mod and getattr(f._cache, "cache_path", None)
    ]  # fmt: skip
    if not kernels:
        return False
    stamp = deps_stamp(deps)
    path = Path(kernels[0]._cache.cache_path) / f"{mod.rsplit('.', 1)[-1]}.deps.sha256"
    try:
        if path.read_text() == stamp:
            return False
    except OSError:
        pass
    try:
        for f in kernels:
            f._cache.flush()
        for index in path.parent.glob(f"{mod.rsplit('.', 1)[-1]}.*.nbi"):  # also `cfunc`s made on first use
            index.unlink()
        path.write_text(stamp)
    except OSError:
        return False
    return True
