"""A llama GGUF's weights kept quantized, by Hugging Face name: what the engine needs to run a GGUF directly
instead of converting it to a float32 checkpoint first (issue 10). The config is the one `convert_gguf`
writes; the float path of the importer is reused for the tensors that stay float (norms, F32/F16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .gguf_import import _dequantized, _model_config, hf_name
from .gguf_reader import read_gguf
from .qtensor import LAYOUTS, QuantTensor
from .quantize import from_gguf, unpermute_heads


def gguf_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray | QuantTensor]]:
    """(config.json dict, HF name -> QuantTensor for quantized matrices, float32 array otherwise).

    Quantized matrices are views of the memory-mapped file, except attn_q / attn_k, whose rows are reordered
    (llama.cpp's head permutation undone) into one packed copy each.
    """
    path = Path(path)
    meta, tensors = read_gguf(path)
    cfg = _model_config(meta, tensors, path)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    out: dict[str, np.ndarray | QuantTensor] = {}
    for name, t in tensors.items():
        hf = hf_name(name)
        if hf is None:  # rope_freqs: read into the config by _model_config
            continue
        if t.type_name.lower() in LAYOUTS and len(t.shape) == 2:
            w = from_gguf(t)
            kind = name.split(".")[-2]
            out[hf] = unpermute_heads(w, heads[kind]) if kind in heads else w
        else:
            out[hf] = _dequantized(t, cfg)
    return cfg, out
