"""GGUF reader: a bounds-checked parser for the GGUF v2/v3 binary format (header, key/value metadata,
tensor directory), with tensor data left memory-mapped and undecoded. It is kept apart from the conversion
and the tokenizer rebuild so that anything needing only a GGUF's metadata or raw tensors (the importer,
the tokenizer, tests) can read one without pulling in either; every structural problem surfaces as a
one-line `ModelLoadError`, and `_one_line` here is the shared formatter for those messages.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import lfs_pointer_error, user_path
from ..errors import ModelLoadError


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its raw bytes, shaped (*shape[:-1], bytes per row)."""

    name: str
    ggml_type: int  # a gguf.GGMLQuantizationType
    type_name: str
    shape: tuple[int, ...]  # row-major (numpy / HF) order: GGUF's dims reversed
    data: np.ndarray


class _Bad(ValueError):
    """A structural problem in the file; becomes a one-line ModelLoadError."""


# GGUF value types -> struct format (scalars) / numpy dtype (arrays); 8 is string, 9 is array
_SCALAR_FMT = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARRAY_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                11: "<i8", 12: "<f8"}  # fmt: skip


MAX_ARRAY_ITEMS = 1 << 24  # far above any vocabulary; metadata arrays beyond this are refused
MAX_NESTING = 3  # arrays of arrays of ...: deeper than this is not a real GGUF
MAX_DIM = 1 << 32
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class _Cursor:
    """Sequential little-endian reads over the mapped file, bounds-checked."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"truncated at byte {self.pos} (file is {self.size} bytes)")
        at = self.pos
        self.pos += n
        return at

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        at = self.take(n)
        return bytes(self.buf[at : at + n]).decode("utf-8")

    def left(self) -> int:
        return self.size - self.pos

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.unpack("<IQ")
            if n > MAX_ARRAY_ITEMS or depth >= MAX_NESTING:
                raise _Bad(
                    f"array of {n} items (nesting {depth + 1}) at byte {self.pos} is beyond the limits"
                )
            if itype in _ARRAY_DTYPE:
                dt = np.dtype(_ARRAY_DTYPE[itype])
                at = self.take(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=at)
                return (arr != 0).tolist() if itype == 7 else arr.tolist()
            if n * 8 > self.size - self.pos:  # every string or array item takes at least 8 bytes
                raise _Bad(f"array of {n} items at byte {self.pos} runs past the end of the file")
            return [self.value(itype, depth + 1) for _ in range(n)]
        if vtype not in _SCALAR_FMT:
            raise _Bad(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.unpack(_SCALAR_FMT[vtype])[0]


def read_gguf(gguf_path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata as Python values, tensors by GGUF name) of a GGUF v2/v3 file; ModelLoadError if unreadable.

    Tensor data stays memory-mapped; nothing is dequantized here.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = user_path(gguf_path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; a GGUF file (.gguf) is expected here")
    if not path.is_file():
        what = "not a regular file (a FIFO or device)" if path.exists() else "GGUF file not found"
        raise ModelLoadError(f"{path}: {what}")
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF" and (lfs := lfs_pointer_error(path, bytes(buf[:64]))):
            raise lfs
        if bytes(buf[: cur.take(4) + 4]) != b"GGUF":
            raise _Bad("no GGUF magic bytes at the start")
        (version,) = cur.unpack("<I")
        if version in (2 << 24, 3 << 24):
            raise _Bad("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise _Bad(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<QQ")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > cur.left():
            raise _Bad(f"{n_kv} metadata keys and {n_tensors} tensors cannot fit in {cur.size} bytes")
        meta = _read_metadata(cur, n_kv)
        infos = _read_tensor_infos(cur, n_tensors)
        align = meta.get("general.alignment", 32)
        if (
            not isinstance(align, int)
            or isinstance(align, bool)
            or not 0 < align <= 1 << 16
            or align & (align - 1)
        ):
            raise _Bad(f"general.alignment must be a power of two <= 65536, got {align!r}")
        data_start = -(-cur.pos // align) * align
        tensors: dict[str, GGUFTensor] = {}
        spans = []
        for name, dims, ttype, offset in infos:
            if offset % align:
                raise _Bad(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {align}")
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise _Bad(f"tensor {name!r} has unknown type id {ttype}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise _Bad(
                    f"tensor {name!r} ({qtype.name}): row length {dims[0]} is not a multiple of its block, {block}"
                )
            row_bytes = dims[0] // block * block_bytes
            nbytes = row_bytes * math.prod(dims[1:])
            start = data_start + offset
            if start + nbytes > len(buf):
                raise _Bad(f"tensor {name!r} runs past the end of the file (truncated?)")
            spans.append((start, start + nbytes, name))
            shape = tuple(int(d) for d in reversed(dims))
            data = buf[start : start + nbytes].reshape(*shape[:-1], row_bytes)
            tensors[name] = GGUFTensor(name, qtype, qtype.name, shape, data)
        _check_disjoint(spans)
    except _Bad as e:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({_one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(
            f"{path}: not a valid GGUF file (a string is not UTF-8: {_one_line(e)})"
        ) from None
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({_one_line(e)})") from None
    return meta, tensors


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    """The key/value section; a key given twice would make the file mean two things."""
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("<I")
        if key in meta:
            raise _Bad(f"metadata key {key!r} given twice")
        meta[key] = cur.value(vtype)
    return meta


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The tensor directory: (name, GGUF dims, type id, offset) each, dims bounded, names unique."""
    infos, names = [], set()
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions")
        dims = cur.unpack(f"<{n_dims}Q")
        if max(dims) > MAX_DIM:
            raise _Bad(f"tensor {name!r} has a dimension of {max(dims)}")
        if name in names:
            raise _Bad(f"tensor {name!r} listed twice")
        names.add(name)
        ttype, offset = cur.unpack("<IQ")
        infos.append((name, dims, ttype, offset))
    return infos


def _check_disjoint(spans: list[tuple[int, int, str]]) -> None:
    """No two tensors share bytes (a crafted directory could alias them)."""
    spans = sorted(s for s in spans if s[1] > s[0])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _Bad(f"tensors {a!r} and {b!r} overlap")


def read_gguf_metadata(gguf_path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values (ModelLoadError if unreadable)."""
    return read_gguf(gguf_path)[0]


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


__all__ = ["GGUFTensor", "read_gguf", "read_gguf_metadata"]
