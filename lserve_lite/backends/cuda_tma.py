"""TMA tensor maps (CUtensorMap, made by the driver's cuTensorMapEncodeTiled) for the Hopper prefill kernel's K/V
tile loads: a KV pool [pages, heads, page_size, D] of fp16 seen as a 2D tensor of rows [pages * heads * page_size, D],
boxes of 16 rows x 64 columns (128 bytes) written into shared memory with the 128-byte swizzle the wgmmas read
(kernels/attention_prefill_sm90.cu, `issue_tma`). The maps live in device memory, four per launch (k0, v0, k1, v1),
cached by the pools' addresses and shapes: a map describes memory, so a pool freed and reallocated at the same
address with the same shape is described by the same map."""

from __future__ import annotations

import ctypes
import functools
from collections import OrderedDict

import numpy as np

_MAP_BYTES = 128  # sizeof(CUtensorMap), 64-byte aligned
_FLOAT16 = 6  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZERO = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements read as zeros
BOX_ROWS, BOX_COLS = 16, 64  # the kernel's box: one 16-row group of a key tile, one 128-byte column block
MAX_ROWS = 2**31 - 1  # the kernel's row coordinates are int32
_CACHE_ENTRIES = 256


class TensorMap(ctypes.Structure):
    _align_ = 64
    _fields_ = [("words", ctypes.c_uint64 * (_MAP_BYTES // 8))]


@functools.cache
def _encode_fn():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [
        ctypes.POINTER(TensorMap), ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    fn.restype = ctypes.c_int
    return fn


def encode_pool(ptr: int, rows: int, d: int) -> bytes:
    """The tensor map of `rows` contiguous fp16 rows of `d` values at device address `ptr` (16-byte aligned)."""
    if not 0 < rows <= MAX_ROWS or d % BOX_COLS or ptr % 16:
        raise ValueError(
            f"no TMA map for {rows} rows of {d} halves at {ptr:#x} (rows 1..2^31-1, D % 64, 16 B aligned)"
        )
    tm = TensorMap()
    dims = (ctypes.c_uint64 * 2)(d, rows)
    strides = (ctypes.c_uint64 * 1)(d * 2)
    box = (ctypes.c_uint32 * 2)(BOX_COLS, BOX_ROWS)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    rc = _encode_fn()(
        ctypes.byref(tm), _FLOAT16, 2, ctypes.c_void_p(ptr), dims, strides, box, elem,
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({rc}) for {rows} rows of {d} halves")
    return bytes(tm)


_maps: OrderedDict = OrderedDict()


def pool_maps(pools: tuple, d: int):
    """A device buffer of the four tensor maps [k0, v0, k1, v1] of fp16 pools (CuPy arrays; a pool of 0 heads gets
    the first pool's map: the kernel never reads it)."""
    import cupy as cp

    key = (d, *((int(a.data.ptr), int(a.size)) for a in pools))
    buf = _maps.get(key)
    if buf is not None:
        _maps.move_to_end(key)
        return buf
    live = [a for a in pools if a.size]
    blobs = [
        encode_pool(int(a.data.ptr), int(a.size) // d, d) for a in (a if a.size else live[0] for a in pools)
    ]
    buf = cp.asarray(np.frombuffer(b"".join(blobs), np.uint8))
    _maps[key] = buf
    if len(_maps) > _CACHE_ENTRIES:
        _maps.popitem(last=False)
    return buf
