"""Reading safetensors without torch: header parsing with clear errors, bf16 widened to float32."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


class SafetensorsFile:
    """Memory-mapped view of one .safetensors file; tensors come out as NumPy arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelLoadError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise ModelLoadError(f"{self.path}: corrupt or truncated safetensors header")
                meta = json.loads(f.read(n))
        except FileNotFoundError:
            raise ModelLoadError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        meta.pop("__metadata__", None)
        self.base = 8 + n
        self.meta = meta
        end = max((v["data_offsets"][1] for v in meta.values()), default=0)
        if self.base + end > size:
            raise ModelLoadError(f"{self.path}: truncated ({size} bytes, header promises {self.base + end})")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.meta)

    def dtype_of(self, name: str) -> str:
        return self.meta[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """Tensor as stored (bf16 as float32, exact)."""
        info = self.meta[name]
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise ModelLoadError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        raw = self._mm[self.base + lo : self.base + hi]
        arr = raw.view(dt).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr
