"""A llama or qwen2 GGUF run directly: config, tokenizer (rebuilt in memory) and weights by Hugging Face name, with
every matrix of a type the kernels run kept in its packed blocks; no file is written. The config is the one
`convert_gguf` writes; the importer's float path reads the other tensors as float32 (norms, F32 / F16, and the
types without a kernel: gguf_import.SUPPORTED_TYPES)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..tokenizer import Tokenizer
from .gguf_import import dequantized, hf_name, model_config, permuted_heads
from .gguf_reader import read_gguf
from .gguf_tokenizer import tokenizer_files
from .qtensor import LAYOUTS, QuantTensor
from .quantize import from_gguf, quantizable, unpermute_heads


def gguf_model(path: Path) -> tuple[ModelConfig, Tokenizer, dict[str, np.ndarray | QuantTensor]]:
    """What the engine needs from a GGUF file, parsed once."""
    meta, tensors = read_gguf(path)
    cfg = model_config(meta, tensors, path)
    tokenizer = _tokenizer(meta, cfg, path)
    return ModelConfig.from_dict(cfg, f"{path} (as config.json)"), tokenizer, _weights(tensors, cfg)


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file, rebuilt in memory."""
    meta, tensors = read_gguf(path)
    return _tokenizer(meta, model_config(meta, tensors, path), path)


def _tokenizer(meta: dict[str, Any], cfg: dict[str, Any], path: Path) -> Tokenizer:
    tok, tok_config, _ = tokenizer_files(meta, cfg, path)
    return Tokenizer.from_parts(tok, tok_config, path)


def gguf_config(path: Path) -> ModelConfig:
    """The ModelConfig of a GGUF file (what config.json would hold after `convert_gguf`)."""
    meta, tensors = read_gguf(path)
    return ModelConfig.from_dict(model_config(meta, tensors, path), f"{path} (as config.json)")


def gguf_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray | QuantTensor]]:
    """(config.json dict, HF name -> QuantTensor for quantized matrices, float32 array otherwise)."""
    path = Path(path)
    meta, tensors = read_gguf(path)
    cfg = model_config(meta, tensors, path)
    return cfg, _weights(tensors, cfg)


def float_projections(path: Path) -> bool:
    """Whether a matrix `--quantize` would quantize is stored as floats (F16 / F32) in the GGUF: only then does
    the flag change anything. Reads the header only."""
    _, tensors = read_gguf(path)
    return any(quantizable(hf_name(n) or "") and not _packed(t) for n, t in tensors.items())


def _packed(t) -> bool:
    """A matrix kept in its GGUF blocks (a format the kernels run), not read as floats."""
    return t.type_name.lower() in LAYOUTS and len(t.shape) == 2


def _weights(tensors: dict, cfg: dict[str, Any]) -> dict[str, np.ndarray | QuantTensor]:
    """Quantized matrices are views of the memory-mapped file, except a llama's attn_q / attn_k, whose rows are
    reordered (llama.cpp's head permutation undone) into one packed copy each."""
    heads = permuted_heads(cfg)
    out: dict[str, np.ndarray | QuantTensor] = {}
    for name, t in tensors.items():
        hf = hf_name(name)
        if hf is None:  # rope_freqs: read into the config by model_config
            continue
        if _packed(t):
            w = from_gguf(t)
            kind = name.split(".")[-2]
            out[hf] = unpermute_heads(w, heads[kind]) if kind in heads else w
        else:
            out[hf] = dequantized(t, cfg)
    return out
