"""KV-cache formats (`--kv-dtype`): the one home of the quantization rule every backend and kernel follows.

A quantized pool is two arrays indexed by the same page id, so the allocator, the selector and the plans
see pages exactly as with a float cache: values [pages, heads, page_size, D] (int8, fp8 bits) or
[pages, heads, page_size, D/2] (int4, two per byte) and scales [pages, heads, page_size, scale_cols(D)] in
the backend's float type (fp16 on the GPU, float32 on the CPU, whose kernels compute in float32). Rules, round to
nearest: int8 symmetric, one scale per (token, KV head) = amax / 127; fp8 (e4m3; CPU, GPU sm_89+) symmetric, one
scale per (token, head) = amax / 448, values the nearest e4m3 (ties to even); int4 asymmetric, per group of
16 channels of a (token, head) a scale (max - min) / 15 and a min, stored interleaved (scale, min) per group,
value = scale * q + min with q in 0..15, channel 2i in the low nibble of byte i. Why (docs/KV_QUANT.md):
post-RoPE keys are lopsided per group, so the symmetric rule (7 levels a side, 32 channels) cost +15-18%
perplexity, this one about +2.5%; values in groups of 32 lost 7 of 45 passkey retrievals at 4k, of 16 none. int4 and fp8 also
store keys in a randomized Hadamard basis (`KVFormat.rotates_keys`): after RoPE, every query and key of a head of
power-of-two size D (at most 256) is multiplied by fixed signs and the orthonormal Hadamard matrix (`hadamard`),
so q . k is unchanged while a key's outlier channels are spread over all D channels instead of stretching one
group's range (int4) or carrying e4m3's relative error into the largest products (fp8); the selector's page
statistics are taken of the rotated keys, so they meet the rotated queries. Why (docs/KV_QUANT.md): int4's passkey
retrieval at 4k, fp8's perplexity (+1.6% at 2k before, +0.04% after); int8, at +0.16% without it, keeps its keys.
`quantize` / `dequantize` here are the float64 references (and the NumPy path of the CPU backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import KV_DTYPES
from ..errors import InvalidRequestError


@dataclass(frozen=True)
class KVFormat:
    """One KV dtype: its value storage, its quantization range and its scale granularity."""

    name: str  # fp16 / fp32 / int8 / int4 / fp8
    qmax: float = 0.0  # largest quantized magnitude (0: a float cache)
    asymmetric: bool = False  # levels 0..qmax from a per-group min (int4) instead of -qmax..qmax
    group_size: int = 0  # channels per scale (0, or a head it does not divide: the whole head)
    hadamard_keys: bool = False  # queries and keys stored in the Hadamard basis (`rotates_keys`)

    @property
    def quantized(self) -> bool:
        return self.qmax > 0

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype({"fp16": np.float16, "fp32": np.float32, "int8": np.int8}.get(self.name, np.uint8))

    def packed_dim(self, head_dim: int) -> int:
        """Stored values per (token, head): int4 packs two channels per byte."""
        return head_dim // 2 if self.name == "int4" else head_dim

    def head_dim(self, packed: int) -> int:
        """The head dim whose `packed_dim` is `packed`."""
        return packed * 2 if self.name == "int4" else packed

    def rotates_keys(self, head_dim: int) -> bool:
        """Whether queries and keys meet in the Hadamard basis: a format that asks for it, a power-of-two head."""
        return self.hadamard_keys and 2 <= head_dim <= HADAMARD_MAX_DIM and head_dim & (head_dim - 1) == 0

    def group(self, head_dim: int) -> int:
        """Channels sharing one scale (or (scale, min) pair)."""
        g = self.group_size
        return g if g and head_dim % g == 0 else head_dim

    def scale_cols(self, head_dim: int) -> int:
        """Scale entries per (token, head): one per group, or a (scale, min) pair per group (asymmetric)."""
        return (head_dim // self.group(head_dim)) * (2 if self.asymmetric else 1) if self.quantized else 0

    def row_bytes(self, head_dim: int, scale_itemsize: int) -> int:
        """Bytes of one token's row of this pool for one KV head, values and scales."""
        return (
            self.packed_dim(head_dim) * self.value_dtype.itemsize + self.scale_cols(head_dim) * scale_itemsize
        )

    def kv_bytes(self, head_dim: int, scale_itemsize: int) -> int:
        """Bytes of one token's K and V for one KV head (both pools share the format): what sizes a page."""
        return 2 * self.row_bytes(head_dim, scale_itemsize)


FORMATS = {
    "fp16": KVFormat("fp16"),
    "fp32": KVFormat("fp32"),
    "int8": KVFormat("int8", 127.0),
    "int4": KVFormat("int4", 15.0, asymmetric=True, group_size=16, hadamard_keys=True),
    "fp8": KVFormat("fp8", 448.0, hadamard_keys=True),
}


def resolve_kv_format(name: str, supported: tuple[str, ...], head_dim: int) -> KVFormat:
    """The format of `name` on a backend whose KV dtypes are `supported` (the first is its float type, `auto`)."""
    if name not in KV_DTYPES:
        raise InvalidRequestError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {name!r}")
    fmt = FORMATS[supported[0] if name == "auto" else name]
    if fmt.name not in supported:
        need = (
            "needs an sm_89 or newer GPU (or the CPU backend)"
            if fmt.name == "fp8"
            else "is not available here"
        )
        raise InvalidRequestError(f"kv_dtype {fmt.name} {need}; this backend has {', '.join(supported)}")
    if fmt.name == "int4" and head_dim % 2:
        raise InvalidRequestError(f"kv_dtype int4 needs an even head_dim, got {head_dim}")
    return fmt


# The signs of the randomized Hadamard transform: channel j's is negative where bit j % 64 of word j // 64 is set
# (a fixed pseudo-random pattern, np.random.default_rng(0)'s draws; kernels/kv_quant.cuh holds the same words).
HADAMARD_SIGN_WORDS = (0x81191FF5899001F8, 0x2AA2ACD7368C93C2, 0x1607075CC4F70B22, 0xDE4E9C5C92664F53)
HADAMARD_MAX_DIM = 64 * len(HADAMARD_SIGN_WORDS)


def hadamard_signs(d: int) -> np.ndarray:
    """The first d channels' signs (float32 +-1) of `HADAMARD_SIGN_WORDS`."""
    j = np.arange(d)
    words = np.array(HADAMARD_SIGN_WORDS, np.uint64)[j // 64]
    return np.where((words >> (j % 64).astype(np.uint64)) & np.uint64(1), -1.0, 1.0).astype(np.float32)


def hadamard(x: np.ndarray) -> np.ndarray:
    """x [..., D] (D a power of two, at most HADAMARD_MAX_DIM) in the randomized Hadamard basis, H diag(signs) x
    with H the orthonormal Hadamard matrix, in float32: the signs, the fast transform's butterflies (a + b, a - b at
    strides 1, 2, 4, ...), then one scale by 1 / sqrt(D), the order every kernel follows, so that all of them store
    the same bits. Orthonormal, so (Hq) . (Hk) = q . k; the signs keep a key's common offset from landing in one
    channel (measured: +2.4% perplexity at 2k with them, +2.9% without; docs/KV_QUANT.md)."""
    d = x.shape[-1]
    y = np.array(x, np.float32) * hadamard_signs(d)
    h = 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], -2)
        h *= 2
    return y.reshape(x.shape) * (np.float32(1.0) / np.sqrt(np.float32(d)))


def quantize(x: np.ndarray, fmt: KVFormat, scale_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] -> (values [..., packed D], scales [..., scale_cols(D)]) in float64 arithmetic; scale and
    min are rounded to `scale_dtype` first and the values quantized against the rounded pair."""
    d = x.shape[-1]
    g = fmt.group(d)
    xg = np.asarray(x, np.float64).reshape(*x.shape[:-1], d // g, g)
    if fmt.asymmetric:
        lo = xg.min(-1).astype(scale_dtype)
        scale = ((xg.max(-1) - lo) / fmt.qmax).astype(scale_dtype)
        xg = xg - lo.astype(np.float64)[..., None]
        stored = np.stack([scale, lo], -1).reshape(*scale.shape[:-1], -1)
    else:
        scale = stored = (np.abs(xg).max(-1) / fmt.qmax).astype(scale_dtype)
    s = scale.astype(np.float64)[..., None]
    y = np.divide(xg, s, out=np.zeros_like(xg), where=s > 0).reshape(x.shape)
    if fmt.name == "fp8":
        return e4m3_encode(y), stored
    q = np.clip(np.rint(y), 0 if fmt.asymmetric else -fmt.qmax, fmt.qmax)
    if fmt.name == "int8":
        return q.astype(np.int8), stored
    u = q.astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8), stored


def dequantize(vals: np.ndarray, scales: np.ndarray, fmt: KVFormat, dtype=np.float64) -> np.ndarray:
    """(values, scales) -> x [..., D] in `dtype` (float64: the reference; float32: the CPU backend's path)."""
    if fmt.name == "int4":
        q = np.stack([vals & 15, vals >> 4], -1).reshape(*vals.shape[:-1], 2 * vals.shape[-1])
    else:
        q = e4m3_decode(vals) if fmt.name == "fp8" else vals
    d = q.shape[-1]
    g = fmt.group(d)
    sc = scales.astype(dtype)
    scale, lo = (sc[..., 0::2], sc[..., 1::2]) if fmt.asymmetric else (sc, 0)
    x = (
        q.astype(dtype).reshape(*q.shape[:-1], d // g, g) * scale[..., None]
        + np.asarray(lo, dtype)[..., None]
    )
    return x.reshape(q.shape)


def steps(scales: np.ndarray, fmt: KVFormat, head_dim: int) -> np.ndarray:
    """Each channel's quantization step (its group's scale) as float64 [..., head_dim]: what bounds a round trip."""
    s = scales[..., 0::2] if fmt.asymmetric else scales
    return np.repeat(s.astype(np.float64), fmt.group(head_dim), -1)


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
