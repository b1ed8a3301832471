"""Reading safetensors without torch: one header validator, then memory-mapped tensors (bf16 widened)."""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import lfs_pointer_error
from ..errors import ModelLoadError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
FLOAT_DTYPES = ("F32", "F16", "BF16")  # what a model weight may be stored as
# Every dtype of the safetensors format, with its size: known ones are checked, unsupported ones refused at get.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the format's own limit
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    """One header entry, checked: its bytes lie in the data section and match dtype x shape."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the data section (after the header)
    end: int


class SafetensorsFile:
    """Memory-mapped view of one .safetensors file; tensors come out as NumPy arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            st = self.path.stat()
            if not stat.S_ISREG(st.st_mode):  # a FIFO's open would hang, a device's bytes never end
                raise ModelLoadError(f"{self.path}: not a regular file (a FIFO, device or directory)")
            size = st.st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelLoadError(f"{self.path}: truncated ({size} bytes, no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > MAX_HEADER_BYTES:
                    if lfs := lfs_pointer_error(self.path, head + f.read(64)):
                        raise lfs
                    raise ModelLoadError(
                        f"{self.path}: corrupt or truncated safetensors header (header length {n}, "
                        f"file {size} bytes)"
                    )
                raw = f.read(n)
        except FileNotFoundError:
            raise ModelLoadError(f"{self.path}: file not found") from None
        except OSError as e:
            raise ModelLoadError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.base = 8 + n
        self.meta = parse_header(raw, size - self.base, str(self.path))
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.meta)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.meta[name].shape

    def dtype_of(self, name: str) -> str:
        return self.meta[name].dtype

    def get(self, name: str) -> np.ndarray:
        """Tensor as stored (bf16 as float32, exact)."""
        info = self.meta[name]
        dt = _DTYPES.get(info.dtype)
        if dt is None:
            raise ModelLoadError(f"{self.path}: tensor {name} has unsupported dtype {info.dtype}")
        raw = self._mm[self.base + info.start : self.base + info.end]
        arr = raw.view(dt).reshape(info.shape)
        if info.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def parse_header(raw: bytes, data_bytes: int, where: str) -> dict[str, TensorInfo]:
    """The one validator of a safetensors header: JSON object of well-formed, in-file, disjoint tensors."""
    try:
        meta = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelLoadError(f"{where}: corrupt safetensors header (not JSON)") from None
    except ValueError as e:  # a duplicate key
        raise ModelLoadError(f"{where}: corrupt safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(
            f"{where}: corrupt safetensors header (a JSON {type(meta).__name__}, not an object)"
        )
    if not isinstance(meta.pop("__metadata__", {}), dict):
        raise ModelLoadError(f"{where}: corrupt safetensors header ('__metadata__' is not an object)")
    infos = {name: _tensor_info(name, v, data_bytes, where) for name, v in meta.items()}
    spans = sorted((i.start, i.end, name) for name, i in infos.items() if i.end > i.start)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelLoadError(f"{where}: tensors {a} and {b} overlap in the safetensors data")
    return infos


def _tensor_info(name: str, v: object, data_bytes: int, where: str) -> TensorInfo:
    """One header entry checked field by field against the data section's real size."""

    def bad(field: str, what: str) -> ModelLoadError:
        shown = repr(v.get(field) if isinstance(v, dict) else v)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ModelLoadError(f"{where}: tensor {name!r}: field {field!r} {what}, got {shown}")

    if not isinstance(v, dict):
        raise bad("entry", "must be an object with dtype, shape and data_offsets")
    dtype, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise bad("dtype", f"must be one of {', '.join(_ITEMSIZE)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_uint(d) for d in shape):
        raise bad("shape", f"must be a list of at most {MAX_DIMS} non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs):
        raise bad("data_offsets", "must be [begin, end] with non-negative integers")
    start, end = offs
    if start > end:
        raise bad("data_offsets", "must satisfy begin <= end")
    if end > data_bytes:
        raise ModelLoadError(
            f"{where}: truncated (tensor {name!r}: field 'data_offsets' ends at {end}, the data has {data_bytes} bytes)"
        )
    if end - start != math.prod(shape) * _ITEMSIZE[dtype]:
        raise bad("data_offsets", f"must span {math.prod(shape) * _ITEMSIZE[dtype]} bytes ({dtype} {shape})")
    return TensorInfo(dtype, tuple(shape), start, end)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice would silently hide one tensor."""
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} given twice")
        d[k] = v
    return d
