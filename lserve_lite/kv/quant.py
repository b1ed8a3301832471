"""KV-cache formats (`--kv-dtype`): the one home of the quantization rule every backend and kernel follows.

A quantized pool is two arrays indexed by the same page id, so the allocator, the selector and the plans
see pages exactly as with a float cache: values [pages, heads, page_size, D] (int8, fp8 bits) or
[pages, heads, page_size, D/2] (int4, two per byte) and scales [pages, heads, page_size, D / group] in the
backend's float type (fp16 on the GPU, float32 on the CPU, which has no fp16 kernels). Rules, symmetric and
round-to-nearest: int8 one scale per (token, KV head) = amax / 127; int4 one scale per `group` channels of
a (token, head) = amax / 7, stored as q + 8 with channel 2i in the low nibble of byte i; fp8 (e4m3, GPU
sm_89+) one scale per (token, head) = amax / 448, values rounded to the nearest e4m3 (ties to even).
`quantize` / `dequantize` here are the float64 references (and the NumPy path of the CPU backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import KV_DTYPES
from ..errors import InvalidRequestError

INT4_GROUP = 32  # channels per int4 scale (a head of fewer, or of a non-multiple, has one group)


@dataclass(frozen=True)
class KVFormat:
    """One KV dtype: its value storage, its quantization range and its scale granularity."""

    name: str  # fp16 / fp32 / int8 / int4 / fp8
    qmax: float = 0.0  # largest quantized magnitude (0: a float cache)

    @property
    def quantized(self) -> bool:
        return self.qmax > 0

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype({"fp16": np.float16, "fp32": np.float32, "int8": np.int8}.get(self.name, np.uint8))

    def packed_dim(self, head_dim: int) -> int:
        """Stored values per (token, head): int4 packs two channels per byte."""
        return head_dim // 2 if self.name == "int4" else head_dim

    def group(self, head_dim: int) -> int:
        """Channels sharing one scale: the whole head, or INT4_GROUP for int4."""
        return INT4_GROUP if self.name == "int4" and head_dim % INT4_GROUP == 0 else head_dim

    def row_bytes(self, head_dim: int, scale_itemsize: int) -> int:
        """Bytes of one token's K (or V) for one KV head, values and scales: what sizes a page."""
        vals = self.packed_dim(head_dim) * self.value_dtype.itemsize
        return vals + (head_dim // self.group(head_dim)) * scale_itemsize if self.quantized else vals


FORMATS = {
    "fp16": KVFormat("fp16"),
    "fp32": KVFormat("fp32"),
    "int8": KVFormat("int8", 127.0),
    "int4": KVFormat("int4", 7.0),
    "fp8": KVFormat("fp8", 448.0),
}


def resolve_kv_format(name: str, supported: tuple[str, ...], head_dim: int) -> KVFormat:
    """The format of `name` on a backend whose KV dtypes are `supported` (the first is its float type, `auto`)."""
    if name not in KV_DTYPES:
        raise InvalidRequestError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {name!r}")
    fmt = FORMATS[supported[0] if name == "auto" else name]
    if fmt.name not in supported:
        need = (
            "needs the CUDA backend on an sm_89 or newer GPU"
            if fmt.name == "fp8"
            else "is not available here"
        )
        raise InvalidRequestError(f"kv_dtype {fmt.name} {need}; this backend has {', '.join(supported)}")
    if fmt.name == "int4" and head_dim % 2:
        raise InvalidRequestError(f"kv_dtype int4 needs an even head_dim, got {head_dim}")
    return fmt


def quantize(x: np.ndarray, fmt: KVFormat, scale_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] -> (values [..., packed D], scales [..., D / group]) in float64 arithmetic; scales are
    rounded to `scale_dtype` first and the values quantized against the rounded scale."""
    d = x.shape[-1]
    g = fmt.group(d)
    xg = np.asarray(x, np.float64).reshape(*x.shape[:-1], d // g, g)
    scale = (np.abs(xg).max(-1) / fmt.qmax).astype(scale_dtype)
    s = scale.astype(np.float64)[..., None]
    y = np.divide(xg, s, out=np.zeros_like(xg), where=s > 0).reshape(x.shape)
    if fmt.name == "fp8":
        return e4m3_encode(y), scale
    q = np.clip(np.rint(y), -fmt.qmax, fmt.qmax)
    if fmt.name == "int8":
        return q.astype(np.int8), scale
    u = (q + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8), scale


def dequantize(vals: np.ndarray, scales: np.ndarray, fmt: KVFormat, dtype=np.float64) -> np.ndarray:
    """(values, scales) -> x [..., D] in `dtype` (float64: the reference; float32: the CPU backend's path)."""
    if fmt.name == "int4":
        lo, hi = (vals & 15).astype(np.int8) - 8, (vals >> 4).astype(np.int8) - 8
        q = np.stack([lo, hi], -1).reshape(*vals.shape[:-1], 2 * vals.shape[-1])
    else:
        q = e4m3_decode(vals) if fmt.name == "fp8" else vals
    d = q.shape[-1]
    g = fmt.group(d)
    x = q.astype(dtype).reshape(*q.shape[:-1], d // g, g) * scales.astype(dtype)[..., None]
    return x.reshape(q.shape)


def _e4m3_table() -> np.ndarray:
    """The 127 non-negative finite e4m3 (fn) values, by code 0..126 (increasing)."""
    c = np.arange(127)
    e, m = c >> 3, c & 7
    return np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))


E4M3 = _e4m3_table()


def e4m3_encode(y: np.ndarray) -> np.ndarray:
    """Nearest e4m3 code (ties to the even code, saturating at 448) of each value, as uint8 bits."""
    a = np.minimum(np.abs(y), 448.0)
    hi = np.clip(np.searchsorted(E4M3, a), 1, 126)
    lo = hi - 1
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    code = np.where((dlo < dhi) | ((dlo == dhi) & (lo % 2 == 0)), lo, hi)
    return (code | np.where(np.signbit(y), 128, 0)).astype(np.uint8)


def e4m3_decode(bits: np.ndarray) -> np.ndarray:
    """e4m3 bits -> float64 (code 127 is NaN in e4m3fn; the encoder never writes it)."""
    mag = np.append(E4M3, np.nan)[bits & 127]
    return np.where(bits & 128, -mag, mag)
