"""Loading a Hugging Face model directory (config, safetensors shards, tokenizer files) without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from .safetensors_io import SafetensorsFile


def resolve_model_dir(model: str | Path | None) -> Path:
    """The model directory for `model` (None: the default SmolLM2, obtained on first use)."""
    if model is None:
        from .default_model import default_model_dir

        return default_model_dir()
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        raise ModelLoadError(f"{p}: a GGUF file; convert it first: lserve-lite convert {p} OUTDIR")
    if not p.is_dir():
        raise ModelLoadError(f"{p}: model directory not found")
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p}: no config.json (not a Hugging Face model directory)")
    return p


def load_config(model_dir: Path) -> ModelConfig:
    cfg = ModelConfig.from_file(model_dir / "config.json")
    gen = model_dir / "generation_config.json"
    if gen.exists():
        try:
            g = json.loads(gen.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{gen}: not valid JSON ({e})") from None
        eos = g.get("eos_token_id")
        if eos is not None:
            ids = (eos,) if isinstance(eos, int) else tuple(eos)
            merged = tuple(dict.fromkeys(cfg.eos_token_ids + tuple(int(i) for i in ids)))
            cfg = type(cfg)(**{**cfg.__dict__, "eos_token_ids": merged})
    return cfg


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed index ({e})") from None
        return [model_dir / f for f in dict.fromkeys(wm.values())]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelLoadError(f"{model_dir}: only pickle weights (*.bin/*.pt) found; safetensors required")
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_weights(model_dir: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors by HF name (float arrays as stored, bf16 widened), checked against the config."""
    out: dict[str, np.ndarray] = {}
    for path in _shards(model_dir):
        f = SafetensorsFile(path)
        for name in f.keys():
            out[name] = f.get(name)
    _check(out, cfg, model_dir)
    return out


def _check(w: dict[str, np.ndarray], cfg: ModelConfig, where: Path) -> None:
    h, d, kv, hq = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    want = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
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
    for name, shape in want.items():
        if name not in w:
            raise ModelLoadError(f"{where}: missing tensor {name}")
        if tuple(w[name].shape) != shape:
            raise ModelLoadError(f"{where}: tensor {name} has shape {tuple(w[name].shape)}, expected {shape}")
