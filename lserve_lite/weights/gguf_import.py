"""GGUF import: convert a llama- or qwen2-architecture GGUF file into a Hugging Face style model directory (float32
safetensors under HF tensor names, `config.json`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json`). This module holds the conversion itself: `convert_gguf`, the config.json derived
from the metadata with its tensor name / type / shape checks, llama3 rope scaling recovered from
`rope_freqs.weight`, the Q/K row un-permute (llama only: llama.cpp's converter permutes no other
architecture's rows), dequantization with `gguf.quants` and the (sharded) writing;
parsing the file is `gguf_reader`'s job and rebuilding the tokenizer is `gguf_tokenizer`'s, so each piece
stays one concept that can be read and tested on its own.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, user_path
from ..errors import ModelLoadError
from ..sampling_params import is_int
from .gguf_reader import _one_line, read_gguf
from .gguf_tokenizer import check_tokenizer_metadata, tokenizer_files
from .qtensor import check_finite

# Types the kernels run in their blocks (weights/qtensor.LAYOUTS), F32 / F16, and types read as float32 through the
# gguf package's dequantization at load (no kernel of theirs: 2-8x the memory of their blocks; llama.cpp's Q4_K_M
# files store matrices whose width is not a multiple of 256 as Q5_0, and its Q5_K_M / Q3_K_M files use these)
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
                   "BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS")  # fmt: skip
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
# general.architecture -> (HF architecture, model_type); the metadata keys are prefixed with the GGUF name
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
_BIASED = ("attn_q", "attn_k", "attn_v")  # qwen2's q/k/v projections carry a bias
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, progress: bool = True, *, overwrite: bool = False
) -> Path:
    """Convert a llama or qwen2 GGUF into an HF directory at `out_dir` (written to a temp dir, then moved there).

    An existing non-empty `out_dir` is an error unless `overwrite`; a file there always is. Returns `out_dir`
    (resolved: "." names the working directory, whose name and parent the temp dir needs).
    """
    src = user_path(gguf_path)
    try:
        out = Path(out_dir).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a deleted working directory; a symlink loop
        raise ModelLoadError(f"{out_dir}: not a usable output path ({_one_line(e)})") from None
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"{out}: the output path is a file, not a directory")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ModelLoadError(f"{out}: output directory already exists and is not empty")
    meta, tensors = read_gguf(src)
    config = model_config(meta, tensors, src)
    tokenizer, tok_config, gen_config = tokenizer_files(meta, config, src)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_stale(out)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_weights(tensors, config, src, tmp, progress)
        # written by Python, not `tokenizer.save`: that raises a bare Exception on a failed write (disk full)
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "generation_config.json", gen_config)
        del tensors
        _move_into_place(tmp, out)
    except OSError as e:
        raise ModelLoadError(f"{out}: cannot write the converted model ({_one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """The finished files of `tmp` at `out`: `tmp` renamed there, or, where `out` exists (empty, or overwritten),
    its old entries moved aside and the new ones moved in, so that `out` stays the same directory (renamed away,
    it left a shell working in it, `lserve-lite convert m.gguf .`, in a deleted directory)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    old.mkdir()
    for p in out.iterdir():
        p.rename(old / p.name)
    for p in tmp.iterdir():
        p.rename(out / p.name)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """The work folders of earlier conversions to `out` whose process is gone (killed: no `finally` ran), each
    a float32 copy of a model; those of a conversion still running are left to it."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2 :].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # exists (another user's), or no pid at all: not ours to remove
        return True
    return True


# ---------------------------------------------------------------------------------------------- config


def model_config(meta: dict[str, Any], tensors: dict, path: Path) -> dict[str, Any]:
    """config.json for a llama or qwen2 GGUF, after checking tensor names, types and shapes against it. The
    tokenizer metadata is checked first: the config takes its special token ids from there."""
    _check_whole(meta, path)
    check_tokenizer_metadata(meta, path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ModelLoadError(
            f"{path}: architecture {arch!r:.60} is not supported (GGUF files of: {', '.join(ARCHS)})"
        )

    def get(key: str, default: Any = None, kind: type = int) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"{path}: missing metadata key '{arch}.{key}'")
        if isinstance(v, list):  # per-layer values: fine if all equal
            if not v or len(set(map(repr, v))) != 1:
                raise ModelLoadError(
                    f"{path}: per-layer '{arch}.{key}' values are empty or differ (not supported)"
                )
            v = v[0]
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (kind is int and not (math.isfinite(v) and v == int(v)))
        ):
            raise ModelLoadError(
                f"{path}: metadata key '{arch}.{key}' must be a {kind.__name__}, got {v!r:.60}"
            )
        return kind(v)

    if get("expert_count", 0):
        raise ModelLoadError(f"{path}: mixture-of-experts models are not supported")
    layers, hidden = get("block_count"), get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    rope_dim = get("rope.dimension_count", 0)
    head_dim = get("attention.key_length", rope_dim or hidden // max(heads, 1))
    if rope_dim and rope_dim != head_dim:
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
        "architectures": [ARCHS[arch][0]],
        "model_type": ARCHS[arch][1],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, float),
        "rope_theta": theta,
        # none named: transformers' default for the architecture, as its GGUF loader reads it (marked assumed)
        **({"max_position_embeddings": get("context_length")} if f"{arch}.context_length" in meta else {}),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        **({"attention_bias": False} if arch == "llama" else {}),  # qwen2 always has q/k/v biases
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if (v := meta.get(f"tokenizer.ggml.{key}")) is not None:
            cfg[name] = int(v)
    eos = _eos_ids(meta)  # none: none (not transformers' default for a config.json without the field)
    cfg["eos_token_id"] = (eos[0] if len(eos) == 1 else eos) if eos else None
    where = f"{path} (as config.json)"
    ModelConfig.from_dict(cfg, where)  # bounds and token ids of any config.json, before sizing or writing
    old_ctx = get("rope.scaling.original_context_length", 0) or 8192  # typed here: the scaling reads it
    scaling = _rope_scaling(meta, tensors, theta, head_dim, old_ctx, path, arch)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
        ModelConfig.from_dict(cfg, where)  # the scaling fitted to rope_freqs.weight: within the bounds too
    cfg["lserve_lite"] = {"converted_from": path.name, "gguf_name": meta.get("general.name")}
    _check_tensors(tensors, cfg, path)
    return cfg


def _check_whole(meta: dict[str, Any], path: Path) -> None:
    """Not one part of a model that llama.cpp's gguf-split cut into several files (`split.count` > 1): a part
    holds only some tensors (the first one the metadata), which would otherwise read as missing tensors or a
    missing architecture."""
    count, no = meta.get("split.count"), meta.get("split.no")
    if is_int(count) and count > 1:
        part = f"part {no + 1} of " if is_int(no) else ""
        raise ModelLoadError(
            f"{path}: {part}a model split into {count} GGUF files (gguf-split); merge them into one file first "
            f"(llama-gguf-split --merge FIRST_PART.gguf MERGED.gguf) and give that"
        )


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
    bias = {"self_attn.q_proj": (q,), "self_attn.k_proj": (kv,), "self_attn.v_proj": (kv,)}
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
        for k, s in bias.items() if cfg["model_type"] == "qwen2" else ():
            want[f"model.layers.{i}.{k}.bias"] = s
    return want


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a llama / qwen2 GGUF tensor name (None if it has none)."""
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS and (m.group(3) == "weight" or m.group(2) in _BIASED):
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
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
            raise ModelLoadError(
                f"{path}: unexpected tensor {name!r:.80} (not a plain {cfg['model_type']} model)"
            )
        ttype = t.type_name
        if ttype not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r:.80} has type {ttype}, not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if t.shape != want[hf]:
            raise ModelLoadError(f"{path}: tensor {name!r:.80} has shape {t.shape}, expected {want[hf]}")
        seen.add(hf)
    missing = sorted(set(want) - seen)
    if missing:
        raise ModelLoadError(f"{path}: missing tensor for {missing[0]} ({len(missing)} missing)")


def _rope_scaling(
    meta: dict[str, Any], tensors: dict, theta: float, head_dim: int, old_ctx: int, path: Path, arch: str
) -> dict | None:
    """HF rope_scaling: llama3 parameters recovered from `rope_freqs.weight` (`old_ctx`: the context the
    model was trained at before scaling); None without scaling."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor_meta = meta.get(f"{arch}.rope.scaling.factor")
    # llama.cpp applies such a scaling on top of any rope_freqs: ignoring it would shift every position
    if kind not in (None, "none") and factor_meta not in (None, 0.0, 1.0):
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
        if not 0 < low < high:  # a fit to no llama3 curve; llama3_rope_factors divides by both
            raise ModelLoadError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")
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


def dequantized(t, cfg: dict[str, Any]) -> np.ndarray:
    """One tensor as contiguous float32 in HF layout (bit-exact with gguf.quants.dequantize)."""
    from gguf.quants import dequantize

    w = dequantize(t.data, t.ggml_type)
    heads = permuted_heads(cfg).get(t.name.split(".")[-2])
    if heads is not None:
        w = _unpermute(w, heads)
    return np.ascontiguousarray(w, dtype=np.float32)


def permuted_heads(cfg: dict[str, Any]) -> dict[str, int]:
    """GGUF tensor kind -> heads of the matrices whose rows llama.cpp's converter interleaved: a llama's attn_q and
    attn_k; no other architecture's."""
    if cfg["model_type"] != "llama":
        return {}
    return {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}


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
    from safetensors import SafetensorError
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
        disable=None if progress else True,  # None: shown on a terminal only
        file=sys.stderr,
    )
    try:
        for names, fname in zip(plan, files, strict=True):
            arrays: dict[str, np.ndarray] = {}
            for name in names:
                try:
                    arrays[hf_name(name)] = dequantized(tensors[name], cfg)
                except (ValueError, TypeError, NotImplementedError) as e:
                    raise ModelLoadError(f"{src}: cannot read tensor {name!r} ({_one_line(e)})") from None
                check_finite(arrays[hf_name(name)], name, src)  # the converted model would be refused at load
                bar.update(1)
            for k, a in arrays.items():
                weight_map[k] = fname
                total += a.nbytes
            try:
                save_file(arrays, str(out / fname), metadata={"format": "pt"})
            except SafetensorError as e:  # the Rust writer's I/O errors (disk full) are not OSErrors
                raise OSError(_one_line(e)) from None
            os.chmod(out / fname, 0o644)  # safetensors creates it owner-only
            del arrays
    finally:
        bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["convert_gguf", "hf_name", "llama3_rope_factors"]
