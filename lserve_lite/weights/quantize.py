"""Making `QuantTensor`s: round-to-nearest int8 / int4 quantizers for float weights (`--quantize` on Hugging
Face models), and the adapter that keeps a GGUF tensor's packed bytes as they are (no dequantization)."""

from __future__ import annotations

import numpy as np

from .gguf_reader import GGUFTensor
from .qtensor import FORMATS, LAYOUTS, QuantTensor

_BY_GGML_TYPE = {lay.ggml_type: fmt for fmt, lay in LAYOUTS.items() if lay.ggml_type is not None}


def quantize_int8(w: np.ndarray) -> QuantTensor:
    """Symmetric per-output-channel int8: q = round(w / s) in [-127, 127], s = max|row| / 127 as fp16."""
    w = _as_matrix(w, LAYOUTS["int8"].block)
    s = _fp16_scales(np.abs(w).max(axis=1), 127)
    q = _round_clip(w / _safe(s)[:, None], 127).astype(np.int8)
    data = np.concatenate([s.astype("<f2")[:, None].view(np.uint8), q.view(np.uint8)], axis=1)
    return QuantTensor("int8", w.shape, np.ascontiguousarray(data))


def quantize_int4(w: np.ndarray) -> QuantTensor:
    """Symmetric int4 in groups of 128 along the input: q = round(w / d) in [-7, 7], d = max|group| / 7
    (fp16), stored as the nibble q + 8 in q4_0's nibble order (see qtensor.py)."""
    block = LAYOUTS["int4"].block
    w = _as_matrix(w, block)
    g = w.reshape(w.shape[0], -1, block)
    d = _fp16_scales(np.abs(g).max(axis=2), 7)
    nib = (_round_clip(g / _safe(d)[..., None], 7) + 8).astype(np.uint8)
    qs = nib[..., : block // 2] | (nib[..., block // 2 :] << 4)
    data = np.concatenate([d.astype("<f2")[..., None].view(np.uint8), qs], axis=2)
    return QuantTensor("int4", w.shape, data.reshape(w.shape[0], -1))


def from_gguf(t: GGUFTensor) -> QuantTensor:
    """The GGUF tensor's own blocks as a QuantTensor (a plain-ndarray view of the mapped bytes, no copy:
    the kernels compile once for ndarray, not again for np.memmap). ValueError for a type kept as float."""
    fmt = _BY_GGML_TYPE.get(int(t.ggml_type))
    if fmt is None:
        raise ValueError(f"{t.name}: GGUF type {t.type_name} has no quantized kernel ({', '.join(FORMATS)})")
    if len(t.shape) != 2:
        raise ValueError(f"{t.name}: a {len(t.shape)}-d tensor is not a weight matrix")
    return QuantTensor(fmt, (int(t.shape[0]), int(t.shape[1])), np.asarray(t.data))


def unpermute_heads(qt: QuantTensor, n_head: int) -> QuantTensor:
    """Undo llama.cpp's Q/K row interleave by reordering whole rows (gguf_import._unpermute on rows)."""
    dim = qt.shape[0] // n_head // 2
    order = np.arange(qt.shape[0]).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(-1)
    return qt.take_rows(order)


def _as_matrix(w: np.ndarray, block: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"cannot quantize shape {w.shape}: need [out, in] with in a multiple of {block}")
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize weights with NaN or Inf")
    return w


def _fp16_scales(amax: np.ndarray, qmax: int) -> np.ndarray:
    """fp16 scales s with amax / s <= qmax exactly (rounded up where fp16 rounding went down)."""
    with np.errstate(over="ignore"):  # an overflow is refused below
        s = (amax / qmax).astype(np.float16)
    low = s.astype(np.float32) * qmax < amax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    if not np.isfinite(s).all():
        raise ValueError("weights too large for fp16 scales")
    return s


def _safe(s: np.ndarray) -> np.ndarray:
    """Scales as float32 with 0 (an all-zero group) replaced by 1, so that q = 0 there."""
    s = s.astype(np.float32)
    return np.where(s == 0, np.float32(1), s)


def _round_clip(v: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.rint(v), -qmax, qmax)


def quantizable(name: str) -> bool:
    """Whether `--quantize` quantizes the matrix of HF name `name` when it is stored as floats."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def quantize_weights(
    weights: dict[str, np.ndarray | QuantTensor], mode: str
) -> dict[str, np.ndarray | QuantTensor]:
    """`--quantize int8|int4` on a Hugging Face model: every float projection matrix and an untied lm_head
    become int8 / int4; int4 falls back to int8 where in_features is not a multiple of 128. Embeddings, norms,
    biases and already quantized matrices (a GGUF's) stay as they are. ValueError naming a tensor that cannot be
    quantized."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize must be 'int8' or 'int4', got {mode!r}")
    out: dict[str, np.ndarray | QuantTensor] = {}
    for name, w in weights.items():
        try:
            if isinstance(w, QuantTensor) or not quantizable(name):
                out[name] = w
            elif mode == "int4" and w.shape[1] % LAYOUTS["int4"].block == 0:
                out[name] = quantize_int4(w)
            else:
                out[name] = quantize_int8(w)
        except ValueError as e:  # NaN / Inf, or beyond fp16 scales: the tensor is named
            raise ValueError(f"tensor {name}: {e}") from None
    return out
