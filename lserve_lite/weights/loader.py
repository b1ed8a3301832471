"""Loading a model without torch: a Hugging Face directory (config, safetensors shards, tokenizer files),
optionally quantized at load (`--quantize`), or a llama / qwen2 GGUF file run from its quantized blocks."""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ModelConfig, path_name, read_json_object, token_ids, user_path
from ..errors import ModelLoadError
from ..tokenizer import Tokenizer
from .gguf_weights import float_projections, gguf_config, gguf_model, gguf_tokenizer
from .qtensor import QuantTensor, check_finite
from .quantize import quantize_weights
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile


@dataclass
class LoadedModel:
    """A model's config, tokenizer and weights by HF name (float arrays or QuantTensors)."""

    cfg: ModelConfig
    tokenizer: Tokenizer
    weights: dict[str, np.ndarray | QuantTensor]

    def drop_file_pages(self) -> None:
        """Once the backend holds its copies (fused q/k/v and gate/up, GPU uploads), let the kernel drop the
        mapped file's resident pages (MADV_DONTNEED): they stop counting in RSS, and those a weight still
        views fault back in from the page cache when read. The loaders map files read-only, so nothing is
        lost; a no-op where the platform has no MADV_DONTNEED."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        maps = {id(m): m for m in map(_mapping, self.weights.values()) if m is not None}
        for m in maps.values() if advice is not None else ():
            m.madvise(advice)


def load_model(path: Path, quantize: str | None = None) -> LoadedModel:
    """The model at `path` (from `resolve_model_dir`); `quantize` ("int8" / "int4") quantizes the float
    projection matrices at load (a GGUF's quantized tensors stay as they are)."""
    if _is_gguf(path):
        model = LoadedModel(*gguf_model(path))
    else:
        cfg = load_config(path)
        weights = load_weights(path, cfg)
        model = LoadedModel(_own_head(cfg, weights), Tokenizer(path), weights)
    # quantizing refuses a NaN / Inf matrix itself; its packed copy is then checked cheaply
    if quantize:
        try:
            model.weights = quantize_weights(model.weights, quantize)
        except ValueError as e:
            raise ModelLoadError(f"{path}: cannot quantize to {quantize} ({e})") from None
    for name, w in model.weights.items():
        check_finite(w, name, path)
    return model


def applied_quantize(path: Path, quantize: str | None) -> str | None:
    """What `load_model(path, quantize)` applies, for results to record: None for a GGUF whose projections
    are all packed already (the flag changes nothing there)."""
    if quantize and _is_gguf(path) and not float_projections(path):
        return None
    return quantize


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of an HF directory or a GGUF file (from `resolve_model_dir`)."""
    return gguf_tokenizer(path) if _is_gguf(path) else Tokenizer(path)


def model_name(path: Path) -> str:
    """The name a model is served under: its directory's name, a GGUF file's name without `.gguf` (a file known
    by its magic keeps its whole name: "Llama-3.2-1B" is not "Llama-3"), and the default GGUF's model name (so
    `"model": "SmolLM2-135M-Instruct"` keeps working now that the engine runs the GGUF). A directory's name is
    `path_name`'s: `--model .` was served as "" (and `..` as "..")."""
    from .default_model import GGUF_NAME, MODEL_NAME

    if not _is_gguf(path):
        return path_name(path)
    if path.name == GGUF_NAME:
        return MODEL_NAME
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _own_head(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> ModelConfig:
    """`cfg`, untied where config.json ties the head to the embedding but the checkpoint holds an lm_head.weight
    of other values: transformers then keeps the two apart (with a warning), so the head is the checkpoint's."""
    head = weights.get("lm_head.weight")
    if (
        not cfg.tie_word_embeddings
        or head is None
        or np.array_equal(head, weights["model.embed_tokens.weight"])
    ):
        return cfg
    return replace(cfg, tie_word_embeddings=False)


def _is_gguf(path: Path) -> bool:
    """A regular file named *.gguf (any case), or one that starts with the GGUF magic: downloads are not always
    named so, and llama.cpp goes by the magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _mapping(w: np.ndarray | QuantTensor) -> mmap.mmap | None:
    """The file mapping a weight views (np.memmap keeps it as `_mmap`), if any."""
    a = w.data if isinstance(w, QuantTensor) else w
    while a is not None:
        if isinstance(getattr(a, "_mmap", None), mmap.mmap):
            return a._mmap
        a = getattr(a, "base", None)
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face Hub model id, "org/name"


def resolve_model_dir(model: str | Path | None) -> Path:
    """The model directory or GGUF file for `model` (None: the default SmolLM2's GGUF, fetched on first
    use)."""
    if model is None:
        from .default_model import default_gguf_path

        return default_gguf_path()
    p = user_path(model)
    if _is_gguf(p):
        return p
    if p.is_file():
        raise ModelLoadError(f"{p}: not a .gguf file (give a GGUF file or a Hugging Face model directory)")
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"{p}: not a regular file or directory (a FIFO or device)")
    if not p.is_dir():
        hub = (  # code ported from vLLM names a Hub model ("org/name"), which vLLM downloads
            " (nothing is downloaded: fetch a Hub model with `huggingface-cli download NAME --local-dir DIR` and "
            "give DIR)"
            if _HUB_ID.fullmatch(str(model))
            else ""
        )
        raise ModelLoadError(
            f"{p}: {'GGUF file' if p.suffix == '.gguf' else 'model directory'} not found{hub}"
        )
    if not (p / "config.json").exists():
        ggufs = sorted(f.name for f in p.glob("*") if f.suffix.lower() == ".gguf" and f.is_file())[:3]
        hint = f"; it holds {', '.join(ggufs)}: give that file as the model" if ggufs else ""
        raise ModelLoadError(f"{p}: no config.json (not a Hugging Face model directory){hint}")
    return p


def load_config(model_dir: Path) -> ModelConfig:
    """config.json, with generation_config.json's end-of-generation ids merged in (a GGUF: its metadata)."""
    if _is_gguf(model_dir):
        return gguf_config(model_dir)
    raw = read_json_object(model_dir / "config.json")
    cfg = ModelConfig.from_dict(raw, str(model_dir / "config.json"))
    gen = model_dir / "generation_config.json"
    if not gen.exists():
        return cfg
    eos = token_ids(read_json_object(gen).get("eos_token_id"), "eos_token_id", str(gen), cfg.vocab_size)
    # config.json's own ids join them, not its class's default (transformers generates with generation_config's
    # alone: a Llama 3 config without eos_token_id would stop at the default 2, "#")
    own = cfg.eos_token_ids if "eos_token_id" in raw else ()
    return replace(cfg, eos_token_ids=tuple(dict.fromkeys(own + eos)))


# generation_config.json's sampling fields that vLLM's LLM takes as its default SamplingParams, each with
# transformers' own default: a field at that value is dropped, as vLLM reads the file (GenerationConfig.to_diff_dict)
SAMPLING_FIELDS = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "max_new_tokens": None,
}


def sampling_defaults(model_dir: Path) -> dict[str, object]:
    """The model creator's sampling defaults from generation_config.json (a GGUF, or no file: none), as vLLM's
    `LLM.get_default_sampling_params` reads them; SamplingParams checks their values."""
    gen = model_dir / "generation_config.json"
    if _is_gguf(model_dir) or not gen.exists():
        return {}
    raw = read_json_object(gen)
    return {k: raw[k] for k, hf in SAMPLING_FIELDS.items() if raw.get(k) is not None and raw[k] != hf}


def _shards(model_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(shard files, the index's tensor -> file map, {} without an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = read_json_object(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ModelLoadError(f"{index}: field 'weight_map' must be a non-empty object of tensor -> file")
        for name, fname in wm.items():
            if not isinstance(fname, str) or not _plain_name(fname):
                raise ModelLoadError(
                    f"{index}: field 'weight_map' maps {name!r:.60} to {fname!r:.60}, not a file name in {model_dir}"
                )
        files = [model_dir / f for f in dict.fromkeys(wm.values())]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(
                    f"{index}: field 'weight_map' names {f.name}, file not found in {model_dir}"
                )
        return files, wm
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single], {}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelLoadError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; safetensors required")
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def _plain_name(fname: str) -> bool:
    """A shard named by the index must be a .safetensors file inside the model directory."""
    p = Path(fname)
    return fname.endswith(".safetensors") and not p.is_absolute() and ".." not in p.parts


def load_weights(model_dir: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors by HF name (float arrays as stored, bf16 widened); headers are checked first."""
    files, wm = _shards(model_dir)
    owner: dict[str, SafetensorsFile] = {}
    for path in files:
        f = SafetensorsFile(path)
        for name in f.keys():
            if name in owner:
                raise ModelLoadError(f"{path}: tensor {name} is also in {owner[name].path.name}")
            owner[name] = f
    for name, fname in wm.items():
        if name not in owner or owner[name].path.name != Path(fname).name:
            raise ModelLoadError(f"{model_dir / 'model.safetensors.index.json'}: {name} is not in {fname}")
    used = _check({name: f.shape_of(name) for name, f in owner.items()}, cfg, model_dir)
    for name in used:  # an integer one loaded and ran as its raw integers (all-zero tokens from an I64 norm)
        if (dtype := owner[name].dtype_of(name)) not in FLOAT_DTYPES:
            raise ModelLoadError(
                f"{owner[name].path}: tensor {name} has dtype {dtype}; a weight must be one of {', '.join(FLOAT_DTYPES)}"
            )
    return {name: f.get(name) for name, f in owner.items()}


def _check(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where: Path) -> list[str]:
    """config.json against the headers' real tensors: the layer count first, then every expected shape. The
    names of the tensors the forward uses."""
    layers = {n.split(".")[2] for n in shapes if n.startswith("model.layers.") and n.count(".") > 2}
    if cfg.num_layers != len(layers):
        got = f"num_hidden_layers is {cfg.num_layers}, the weights hold {len(layers)} layers"
        raise ModelLoadError(f"{where / 'config.json'}: {got}")
    h, d, kv, hq = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    want = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings or "lm_head.weight" in shapes:  # a tied one may still be used (_own_head)
        want["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        want |= {
            p + "self_attn.q_proj.weight": (hq * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, hq * d),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.qkv_bias:
            want |= {
                p + "self_attn.q_proj.bias": (hq * d,),
                p + "self_attn.k_proj.bias": (kv * d,),
                p + "self_attn.v_proj.bias": (kv * d,),
            }
    # a bias the forward would skip gives wrong logits; other extras (such as rotary inv_freq) are inert
    extra = next((n for n in shapes if n.endswith(".bias") and n not in want), None)
    if extra is not None:
        raise ModelLoadError(f"{where}: tensor {extra} is a bias this {cfg.arch} forward does not apply")
    for name, shape in want.items():
        if name not in shapes:
            raise ModelLoadError(f"{where}: missing tensor {name}")
        if shapes[name] != shape:
            raise ModelLoadError(
                f"{where}: tensor {name} has shape {shapes[name]}, config.json implies {shape}"
            )
    return list(want)
