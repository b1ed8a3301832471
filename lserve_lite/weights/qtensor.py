"""`QuantTensor`: a quantized weight matrix kept in its packed blocks, the one type that travels from the
loader to `Ops.linear`, and the block layout of every supported format (the single source of truth).

Every format packs a row of `in_features` values into `in_features // block` blocks of `block_bytes` bytes
(int8 puts a 2-byte row scale before its blocks), so a matrix is a uint8 array [out_features, row_bytes] and
a range of output rows is a slice. The GGUF formats are byte-identical to ggml's (ggml-quants.c,
`gguf.constants.GGML_QUANT_SIZES`); fp16 fields are little-endian IEEE half.

| format | block | bytes | block contents (value of element i)                                          |
|--------|-------|-------|------------------------------------------------------------------------------|
| q8_0   | 32    | 34    | d:f16, q[32]:i8                          w = d*q[i]                          |
| q4_0   | 32    | 18    | d:f16, qs[16]                            w = d*(nib(i) - 8)                  |
| q4_1   | 32    | 20    | d:f16, m:f16, qs[16]                     w = d*nib(i) + m                    |
| q4_k   | 256   | 144   | d:f16, dmin:f16, scales[12] (8 x 6-bit sc, m), qs[128]                       |
|        |       |       |   sub-block s (32 values) of 4-bit q:    w = d*sc[s]*q - dmin*m[s]           |
| q6_k   | 256   | 210   | ql[128], qh[64], sc[16]:i8, d:f16        w = d*sc[i//16]*(q6(i) - 32)        |
| int8   | 32    | 32    | q[32]:i8, after the row's s:f16          w = s*q[i]  (per output channel)    |
| int4   | 128   | 66    | d:f16, qs[64]                            w = d*(nib(i) - 8), nib in [1, 15]  |

nib(i) (q4_0, q4_1, int4, with h = block / 2): the low nibble of qs[i] for i < h, else the high nibble of
qs[i - h]; q4_k's qs hold its sub-blocks in pairs the same way (32 bytes: low nibbles sub-block 2j, high
nibbles 2j + 1). So int4 is q4_0 with blocks of 128 and one nibble decoder reads all four formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelLoadError


@dataclass(frozen=True)
class BlockLayout:
    """How one format packs a row: `row_head` bytes, then `block` values per `block_bytes` bytes.

    A row-scale header, not a trailer: read first, it streams with the row (at the end, a per-row
    scale cost a memory latency per row: 4x slower at K = 576)."""

    block: int
    block_bytes: int
    row_head: int = 0
    ggml_type: int | None = None  # gguf.GGMLQuantizationType value for the GGUF formats
    # byte offsets of a block's fp16 fields (d, m / dmin), or of the row head's for int8; the rest are integers
    fp16_fields: tuple[int, ...] = (0,)

    def row_bytes(self, in_features: int) -> int:
        return self.row_head + in_features // self.block * self.block_bytes


LAYOUTS: dict[str, BlockLayout] = {
    "q8_0": BlockLayout(32, 34, ggml_type=8),
    "q4_0": BlockLayout(32, 18, ggml_type=2),
    "q4_1": BlockLayout(32, 20, ggml_type=3, fp16_fields=(0, 2)),
    "q4_k": BlockLayout(256, 144, ggml_type=12, fp16_fields=(0, 2)),
    "q6_k": BlockLayout(256, 210, ggml_type=14, fp16_fields=(208,)),
    "int8": BlockLayout(32, 32, row_head=2),
    "int4": BlockLayout(128, 66),
}
FORMATS: tuple[str, ...] = tuple(LAYOUTS)  # a format's index here is its code in the Numba kernels


@dataclass(frozen=True, eq=False)
class QuantTensor:
    """A [out_features, in_features] matrix as packed blocks (`data`: uint8 [out_features, row_bytes])."""

    fmt: str
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.fmt not in LAYOUTS:
            raise ValueError(f"unknown quantization format {self.fmt!r} (one of {', '.join(FORMATS)})")
        out_f, in_f = self.shape
        lay = LAYOUTS[self.fmt]
        if in_f <= 0 or in_f % lay.block:
            raise ValueError(f"{self.fmt}: in_features {in_f} is not a positive multiple of {lay.block}")
        want = (out_f, lay.row_bytes(in_f))
        if self.data.dtype != np.uint8 or self.data.shape != want or self.data.strides[1] != 1:
            raise ValueError(f"{self.fmt} {self.shape}: data must be uint8 {want} with contiguous rows, got "
                             f"{self.data.dtype} {self.data.shape}")  # fmt: skip

    @property
    def layout(self) -> BlockLayout:
        return LAYOUTS[self.fmt]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def rows(self, r0: int, r1: int) -> QuantTensor:
        """Output rows r0..r1 (a view of the same bytes)."""
        data = self.data[r0:r1]
        return QuantTensor(self.fmt, (data.shape[0], self.shape[1]), data)

    def take_rows(self, index: np.ndarray) -> QuantTensor:
        """Output rows reordered / selected by `index` (a copy), e.g. to undo llama.cpp's Q/K permutation."""
        data = np.ascontiguousarray(self.data[np.asarray(index)])
        return QuantTensor(self.fmt, (data.shape[0], self.shape[1]), data)

    def dequantize(self, dtype: type = np.float32) -> np.ndarray:
        """The float matrix (NumPy reference, float32 or float64): for tests and conversions, not serving."""
        f = np.dtype(dtype)
        out_f, in_f = self.shape
        lay = self.layout
        nb = in_f // lay.block
        blocks = self.data[:, lay.row_head :].reshape(out_f, nb, lay.block_bytes)
        w = _DEQUANT[self.fmt](blocks, f)
        if self.fmt == "int8":
            w = w * _f16(self.data[:, :2], f).reshape(out_f, 1, 1)
        return w.reshape(out_f, in_f).astype(f, copy=False)


def concat_rows(parts: list[QuantTensor]) -> QuantTensor:
    """The parts' rows in order as one tensor (a fused q/k/v or gate/up); one format and in_features."""
    fmts, ins = {p.fmt for p in parts}, {p.shape[1] for p in parts}
    if len(fmts) != 1 or len(ins) != 1:
        raise ValueError(f"cannot fuse {sorted(fmts)} weights with in_features {sorted(ins)} into one tensor")
    data = np.concatenate([p.data for p in parts], axis=0)
    return QuantTensor(parts[0].fmt, (data.shape[0], parts[0].shape[1]), data)


@dataclass(frozen=True, eq=False)
class RowStack:
    """Row blocks of one fused matrix whose parts cannot share one packing (a Q4_K_M file's Q4_K q/k with
    Q6_K v, or a quantized part beside a float one): the product is computed per part into its columns."""

    parts: tuple[QuantTensor | np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)

    def dequantize(self, dtype: type = np.float32) -> np.ndarray:
        """The float matrix (for tests and for backends without kernels for these formats)."""
        return np.concatenate([_dequantized(p, dtype) for p in self.parts], axis=0)


Weight = np.ndarray | QuantTensor | RowStack


def finite(w: np.ndarray | QuantTensor) -> bool:
    """Whether every value of a weight is finite (a NaN or Inf one makes every output NaN), without a float copy:
    float32 by its min and max (NaN propagates); float16 values and the fp16 fields of packed blocks by their
    exponent bits (the other fields of a block are bounded integers), as NumPy's float16 min / max ran 30x
    slower than float32's."""
    if isinstance(w, QuantTensor):
        lay = w.layout
        if lay.row_head:
            fields = w.data[:, : lay.row_head]
        else:
            fields = w.data.reshape(w.shape[0], w.shape[1] // lay.block, lay.block_bytes)
        return not any(_fp16_nonfinite(fields[..., at + 1]) for at in lay.fp16_fields)
    if w.dtype == np.float16:
        return not _fp16_nonfinite(np.ascontiguousarray(w).reshape(-1).view(np.uint16))
    return w.size == 0 or bool(np.isfinite(w.min()) and np.isfinite(w.max()))


def _fp16_nonfinite(bits: np.ndarray) -> bool:
    """Whether any fp16 value has its exponent bits all ones (Inf or NaN): `bits` the values as uint16, or their
    high bytes as uint8; a few MB at a time along the first axis, so the temporaries stay small."""
    exponent = 0x7C << 8 * (bits.itemsize - 1)
    step = max(1, (1 << 22) // max(1, math.prod(bits.shape[1:])))
    return any(np.any((bits[i : i + step] & exponent) == exponent) for i in range(0, len(bits), step))


def check_finite(w: np.ndarray | QuantTensor, name: str, where: object) -> None:
    """ModelLoadError naming the tensor unless `finite(w)`, at load on every backend and in `convert`: a NaN or Inf
    weight made every logit NaN, which the CPU backend sampled as garbage tokens."""
    if not finite(w):
        what = "a NaN or Inf block scale" if isinstance(w, QuantTensor) else "NaN or Inf values"
        raise ModelLoadError(f"{where}: tensor {name} holds {what} (a damaged or badly converted model file)")


def stored_bytes(w: Weight, float_itemsize: int) -> int:
    """Bytes a backend holds for `w`: quantized matrices (parts) keep their packed bytes on every backend,
    float ones take `float_itemsize` bytes a value (the backend's float type)."""
    if isinstance(w, QuantTensor):
        return w.nbytes
    if isinstance(w, RowStack):
        return sum(stored_bytes(p, float_itemsize) for p in w.parts)
    return int(np.prod(w.shape)) * float_itemsize


def fuse_rows(parts: list[np.ndarray | QuantTensor]) -> Weight:
    """One matrix with the parts' rows in order (fused q/k/v, gate/up): a float array, one QuantTensor when
    the formats match, else a RowStack; the model file stays the same for every format."""
    if len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"cannot fuse weights with in_features {sorted({p.shape[1] for p in parts})}")
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=0)
    if len({getattr(p, "fmt", None) for p in parts}) == 1:
        return concat_rows(parts)
    return RowStack(tuple(parts))


def _dequantized(p: QuantTensor | np.ndarray, dtype: type) -> np.ndarray:
    return p.dequantize(dtype) if isinstance(p, QuantTensor) else np.asarray(p, dtype=dtype)


def _f16(b: np.ndarray, f: np.dtype) -> np.ndarray:
    """Little-endian fp16 fields (last axis: 2 bytes) as `f`, shape without that axis."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(f)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., h] bytes -> [..., 2h] values: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(b, f):
    return _f16(b[..., 0:2], f)[..., None] * b[..., 2:].view(np.int8).astype(f)


def _q4_0(b, f):
    return _f16(b[..., 0:2], f)[..., None] * (_nibbles(b[..., 2:]).astype(f) - 8)


def _q4_1(b, f):
    return _f16(b[..., 0:2], f)[..., None] * _nibbles(b[..., 4:]).astype(f) + _f16(b[..., 2:4], f)[..., None]


def q4_k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K blocks [..., 144] -> the 6-bit scales and mins of their 8 sub-blocks, int32 [..., 8] each."""
    sc = b[..., 4:16].astype(np.int32)
    lo4, hi4 = sc[..., 8:12], sc[..., 0:8] >> 6
    scale = np.concatenate([sc[..., 0:4] & 63, (lo4 & 15) | (hi4[..., 0:4] << 4)], axis=-1)
    mins = np.concatenate([sc[..., 4:8] & 63, (lo4 >> 4) | (hi4[..., 4:8] << 4)], axis=-1)
    return scale, mins


def q4_k_ints(b: np.ndarray) -> np.ndarray:
    """Q4_K blocks [..., 144] -> the 4-bit integers of their 8 sub-blocks, uint8 [..., 8, 32]."""
    q = _nibbles(b[..., 16:].reshape(*b.shape[:-1], 4, 32))  # [..., pair, 64]: sub-blocks 2j, 2j + 1
    return q.reshape(*b.shape[:-1], 8, 32)


def q6_k_ints(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks [..., 210] -> q6 - 32 of their 256 values, int32 [..., 256] (in -32..31)."""
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 2, 32).astype(np.int32)  # [half, l >= 32, l % 32]
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32).astype(np.int32)
    low = np.concatenate([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -1)
    high = np.concatenate([(qh[..., 0, :] >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    return ((low | (high << 4)) - 32).reshape(*b.shape[:-1], 256)  # [..., half, 128] -> [..., 256]


def _q4_k(b, f):
    d, dmin = _f16(b[..., 0:2], f), _f16(b[..., 2:4], f)
    scale, mins = q4_k_scales(b)
    q = q4_k_ints(b).astype(f)
    w = d[..., None, None] * scale[..., None].astype(f) * q - dmin[..., None, None] * mins[..., None].astype(
        f
    )
    return w.reshape(*b.shape[:-1], 256)


def _q6_k(b, f):
    scale = b[..., 192:208].view(np.int8).astype(f)
    d = _f16(b[..., 208:210], f)
    w = q6_k_ints(b).reshape(*b.shape[:-1], 16, 16).astype(f) * scale[..., None] * d[..., None, None]
    return w.reshape(*b.shape[:-1], 256)


def _int8(b, f):
    return b.view(np.int8).astype(f)


_DEQUANT = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q4_k": _q4_k, "q6_k": _q6_k, "int8": _int8,
            "int4": _q4_0}  # fmt: skip
