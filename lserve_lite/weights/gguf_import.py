"""GGUF import: a llama-architecture GGUF file -> a Hugging Face style model directory.

The directory holds float32 safetensors under HF tensor names (dequantized with `gguf.quants`, Q/K rows
un-permuted), `config.json`, `generation_config.json`, and a `tokenizer.json` / `tokenizer_config.json`
rebuilt from the GGUF vocabulary so that it tokenizes exactly as transformers' own GGUF tokenizer does
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
MAX_SHARD_BYTES = 4 << 30  # one model.safetensors up to this size, HF-style shards above it

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# llama.cpp token types (tokenizer.ggml.token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes transformers uses per `tokenizer.ggml.pre` (GGUF_PRE_TOKENIZER_SPLITS); others: GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, progress: bool = True, *, overwrite: bool = False
) -> Path:
    """Convert a llama GGUF into an HF directory at `out_dir` (written to a temp dir, then renamed).

    An existing non-empty `out_dir` is an error unless `overwrite`. Returns `out_dir`.
    """
    src, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{out}: output directory already exists and is not empty")
    meta, tensors = read_gguf(src)
    config = _model_config(meta, tensors, src)
    tokenizer, tok_config, gen_config = _tokenizer_files(meta, config, src)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_weights(tensors, config, src, tmp, progress)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "generation_config.json", gen_config)
        del tensors
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out)
    except OSError as e:
        raise ModelLoadError(f"{out}: cannot write the converted model ({_one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- reading


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

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.unpack("<IQ")
            if itype in _ARRAY_DTYPE:
                dt = np.dtype(_ARRAY_DTYPE[itype])
                at = self.take(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=at)
                return (arr != 0).tolist() if itype == 7 else arr.tolist()
            if n * 8 > self.size - self.pos:  # every string or array item takes at least 8 bytes
                raise _Bad(f"array of {n} items at byte {self.pos} runs past the end of the file")
            return [self.value(itype) for _ in range(n)]
        if vtype not in _SCALAR_FMT:
            raise _Bad(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.unpack(_SCALAR_FMT[vtype])[0]


def read_gguf(gguf_path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata as Python values, tensors by GGUF name) of a GGUF v2/v3 file; ModelLoadError if unreadable.

    Tensor data stays memory-mapped; nothing is dequantized here.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        cur = _Cursor(buf)
        if bytes(buf[: cur.take(4) + 4]) != b"GGUF":
            raise _Bad("no GGUF magic bytes at the start")
        (version,) = cur.unpack("<I")
        if version in (2 << 24, 3 << 24):
            raise _Bad("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise _Bad(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<QQ")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            (vtype,) = cur.unpack("<I")
            meta[key] = cur.value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            (n_dims,) = cur.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise _Bad(f"tensor {name!r} has {n_dims} dimensions")
            dims = cur.unpack(f"<{n_dims}Q")
            ttype, offset = cur.unpack("<IQ")
            infos.append((name, dims, ttype, offset))
        align = int(meta.get("general.alignment", 32))
        if align <= 0:
            raise _Bad(f"bad general.alignment {align}")
        data_start = -(-cur.pos // align) * align
        tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, offset in infos:
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise _Bad(f"tensor {name!r} has unknown type id {ttype}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise _Bad(f"tensor {name!r}: row length {dims[0]} is not a multiple of {block}")
            row_bytes = dims[0] // block * block_bytes
            nbytes = row_bytes * math.prod(dims[1:])
            start = data_start + offset
            if start + nbytes > len(buf):
                raise _Bad(f"tensor {name!r} runs past the end of the file (truncated?)")
            shape = tuple(int(d) for d in reversed(dims))
            data = buf[start : start + nbytes].reshape(*shape[:-1], row_bytes)
            tensors[name] = GGUFTensor(name, qtype, qtype.name, shape, data)
    except _Bad as e:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({_one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(
            f"{path}: not a valid GGUF file (a string is not UTF-8: {_one_line(e)})"
        ) from None
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({_one_line(e)})") from None
    return meta, tensors


def _model_config(meta: dict[str, Any], tensors: dict, path: Path) -> dict[str, Any]:
    """config.json for a llama GGUF, after checking tensor names, types and shapes against it."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (only 'llama' GGUF files)")

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise ModelLoadError(f"{path}: missing metadata key 'llama.{key}'")
        if isinstance(v, list):  # per-layer values: fine if all equal
            if not v or len(set(v)) != 1:
                raise ModelLoadError(f"{path}: per-layer 'llama.{key}' values differ (not supported)")
            v = v[0]
        return kind(v)

    if get("expert_count", 0):
        raise ModelLoadError(f"{path}: mixture-of-experts llama models are not supported")
    layers, hidden = get("block_count"), get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    rope_dim = meta.get("llama.rope.dimension_count")
    head_dim = get("attention.key_length", rope_dim or hidden // max(heads, 1))
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(
            f"{path}: partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not supported"
        )
    if get("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: value head size differs from key head size (not supported)")
    if min(layers, hidden, heads, kv_heads, head_dim) <= 0 or heads % kv_heads:
        raise ModelLoadError(f"{path}: inconsistent attention shape ({heads} heads, {kv_heads} KV heads)")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    vocab = emb.shape[0] if len(emb.shape) == 2 else 0
    theta = get("rope.freq_base", 10000.0, float)

    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, float),
        "rope_theta": theta,
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(meta, tensors, theta, head_dim, path)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if (v := meta.get(f"tokenizer.ggml.{key}")) is not None:
            cfg[name] = int(v)
    eos = _eos_ids(meta)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    cfg["lserve_lite"] = {"converted_from": path.name, "gguf_name": meta.get("general.name")}
    _check_tensors(tensors, cfg, path)
    return cfg


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """End-of-generation ids: eos, then end-of-turn / end-of-message when the GGUF names them."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    want = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        want["lm_head.weight"] = (v, h)
    per_layer = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    for i in range(cfg["num_hidden_layers"]):
        for k, s in per_layer.items():
            want[f"model.layers.{i}.{k}.weight"] = s
    return want


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a llama GGUF tensor name (None if it has none)."""
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _check_tensors(tensors: dict, cfg: dict[str, Any], path: Path) -> None:
    """Every tensor known, of a supported type and the expected shape; none missing."""
    want = _expected_shapes(cfg)
    seen = set()
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        hf = hf_name(name)
        if hf is None or hf not in want:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r} (not a plain llama model)")
        ttype = t.type_name
        if ttype not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has type {ttype}, not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if t.shape != want[hf]:
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {t.shape}, expected {want[hf]}")
        seen.add(hf)
    missing = sorted(set(want) - seen)
    if missing:
        raise ModelLoadError(f"{path}: missing tensor for {missing[0]} ({len(missing)} missing)")


def _rope_scaling(
    meta: dict[str, Any], tensors: dict, theta: float, head_dim: int, path: Path
) -> dict | None:
    """HF rope_scaling: llama3 parameters recovered from `rope_freqs.weight`; None without scaling."""
    kind = meta.get("llama.rope.scaling.type")
    factor_meta = meta.get("llama.rope.scaling.factor")
    if (
        kind not in (None, "none")
        and factor_meta not in (None, 0.0, 1.0)
        and "rope_freqs.weight" not in tensors
    ):
        raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (only llama3 rope_freqs)")
    t = tensors.get("rope_freqs.weight")
    if t is None:
        return None
    from gguf.quants import dequantize

    if t.type_name != "F32":
        raise ModelLoadError(f"{path}: rope_freqs.weight has type {t.type_name}, expected F32")
    rf = np.asarray(dequantize(t.data, t.ggml_type), dtype=np.float64).reshape(-1)
    if rf.size != head_dim // 2 or not np.all(np.isfinite(rf)) or rf.min() < 1.0 - 1e-6:
        raise ModelLoadError(f"{path}: rope_freqs.weight does not look like llama3 rope factors")
    if np.allclose(rf, 1.0):
        return None
    factor = float(rf.max())
    old_ctx = int(meta.get("llama.rope.scaling.original_context_length") or 8192)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    smooth = (rf > 1 + 1e-6) & (rf < factor - 1e-6)
    low, high = 1.0, 4.0
    if smooth.sum() >= 2:  # s = (old_ctx * freq / 2pi - low) / (high - low) is linear in freq
        s = (1.0 / rf[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, icpt = np.polyfit(freqs[smooth] / (2 * math.pi), s, 1)
        span = old_ctx / slope
        low = -icpt * span
        high = low + span
        low, high = round(low * 1000) / 1000, round(high * 1000) / 1000
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor * 1e4) / 1e4,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx,
    }
    if not np.allclose(llama3_rope_factors(scaling, theta, head_dim), rf, rtol=1e-3, atol=1e-4):
        raise ModelLoadError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")
    return scaling


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


# ---------------------------------------------------------------------------------------------- weights


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave (transformers' LlamaTensorProcessor._reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _dequantized(t, cfg: dict[str, Any]) -> np.ndarray:
    """One tensor as contiguous float32 in HF layout (bit-exact with gguf.quants.dequantize)."""
    from gguf.quants import dequantize

    w = dequantize(t.data, t.ggml_type)
    if ".attn_q." in t.name:
        w = _unpermute(w, cfg["num_attention_heads"])
    elif ".attn_k." in t.name:
        w = _unpermute(w, cfg["num_key_value_heads"])
    return np.ascontiguousarray(w, dtype=np.float32)


def _shard_plan(tensors: dict) -> list[list[str]]:
    """GGUF tensor names grouped into safetensors shards of at most MAX_SHARD_BYTES (float32)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if hf_name(name) is None:
            continue
        nbytes = 4 * math.prod(t.shape)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(tensors: dict, cfg: dict[str, Any], src: Path, out: Path, progress: bool) -> None:
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    plan = _shard_plan(tensors)
    n = len(plan)
    files = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(
        total=sum(map(len, plan)),
        desc=f"converting {src.name}",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for names, fname in zip(plan, files, strict=True):
            arrays: dict[str, np.ndarray] = {}
            for name in names:
                try:
                    arrays[hf_name(name)] = _dequantized(tensors[name], cfg)
                except (ValueError, TypeError, NotImplementedError) as e:
                    raise ModelLoadError(f"{src}: cannot read tensor {name!r} ({_one_line(e)})") from None
                bar.update(1)
            for k, a in arrays.items():
                weight_map[k] = fname
                total += a.nbytes
            save_file(arrays, str(out / fname), metadata={"format": "pt"})
            os.chmod(out / fname, 0o644)  # safetensors creates it owner-only
            del arrays
    finally:
        bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)


# -------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary (transformers' generate_merges with vocab_scores)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _merges(meta: dict[str, Any], vocab: dict[str, int], tokens: list[str]) -> list[tuple[str, str]]:
    raw = meta.get("tokenizer.ggml.merges")
    if raw is not None:
        return [tuple(m.split(" ")) for m in raw]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("the GGUF has neither merges nor token scores")
    return _generate_merges(vocab, dict(zip(tokens, scores, strict=True)))


def build_tokenizer(meta: dict[str, Any], path: str | Path = "GGUF"):
    """A `tokenizers.Tokenizer` equal to the one transformers builds from this GGUF's metadata, plus
    (add_bos_token, add_eos_token)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    try:
        if kind == "gpt2":
            spelling = _bytes_to_unicode()
            alphabet = set(spelling.values())
            vocab = {
                tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
                for i, tok in enumerate(tokens)
            }
            tok = Tokenizer(
                BPE(
                    vocab=vocab,
                    merges=_merges(meta, vocab, tokens),
                    dropout=None,
                    continuing_subword_prefix="",
                    end_of_word_suffix="",
                    fuse_unk=False,
                )
            )
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            default_names = ["<|endoftext|>"]  # GPT2Tokenizer's default unk/bos/eos
            add_bos_default = False
        elif kind == "llama":
            alphabet = None
            vocab = {t: i for i, t in enumerate(tokens)}
            tok = Tokenizer(
                BPE(
                    vocab=vocab,
                    merges=_merges(meta, vocab, tokens),
                    fuse_unk=True,
                    byte_fallback=True,
                    dropout=None,
                )
            )
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence(
                [
                    decoders.Replace("▁", " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(content=" ", left=1),
                ]
            )
            default_names = ["<unk>", "<s>", "</s>"]  # LlamaTokenizer's defaults
            add_bos_default = True
        else:
            raise ModelLoadError(
                f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
            )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build the tokenizer ({_one_line(e)})") from None

    def named(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {k: named(k + "_token_id") for k in ("bos", "eos", "unknown", "padding")}
    # As transformers: the class's default special names first, then control tokens, user-defined tokens
    # (not special) and the GGUF's named special tokens; a name outside the vocabulary is not added.
    added = [t for t in default_names if t in vocab]
    added += [
        t
        for t, ty in zip(tokens, types, strict=False)
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(added)])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    have = set(tok.get_added_tokens_decoder()[i].content for i in tok.get_added_tokens_decoder())
    named_new = [t for t in specials.values() if t is not None and t not in have and t in vocab]
    if named_new:
        tok.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named_new)]
        )

    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and specials["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and specials["eos"] is not None
    bos, eos = specials["bos"], specials["eos"]
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special_ids = ([(bos, tok.token_to_id(bos))] if add_bos else []) + (
        [(eos, tok.token_to_id(eos))] if add_eos else []
    )
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)
    return tok, add_bos, add_eos


def _tokenizer_files(meta: dict[str, Any], cfg: dict[str, Any], path: Path):
    """(tokenizer, tokenizer_config.json dict, generation_config.json dict)."""
    tok, add_bos, add_eos = build_tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    tc: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            tc[name] = tokens[i]
    tc["clean_up_tokenization_spaces"] = False
    tc["model_max_length"] = cfg["max_position_embeddings"]
    if (template := meta.get("tokenizer.chat_template")) is not None:
        tc["chat_template"] = template
    gen: dict[str, Any] = {}
    if "bos_token_id" in cfg:
        gen["bos_token_id"] = cfg["bos_token_id"]
    if "eos_token_id" in cfg:
        gen["eos_token_id"] = cfg["eos_token_id"]
    if "pad_token_id" in cfg:
        gen["pad_token_id"] = cfg["pad_token_id"]
    return tok, tc, gen


# ------------------------------------------------------------------------------------------------ utils


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def read_gguf_metadata(gguf_path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values (ModelLoadError if unreadable)."""
    return read_gguf(gguf_path)[0]


__all__ = [
    "GGUFTensor",
    "convert_gguf",
    "read_gguf",
    "build_tokenizer",
    "read_gguf_metadata",
    "hf_name",
    "llama3_rope_factors",
]
