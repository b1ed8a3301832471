"""Fuzzing the loader edges (safetensors, GGUF, config.json, generation_config.json, tokenizer_config.json,
the shard index): every input ends in success or a one-line LServeError naming the file, nothing else.

CI runs a bounded, derandomized budget; `LSERVE_FUZZ_EXAMPLES=20000` runs a long random campaign (figures in
docs/HARDENING.md). Inputs are structured (headers of the right shape with absurd values) and byte-level
mutations of valid files and of the seeded corpus in tests/data/fuzz_corpus/.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from fuzz_corpus import (
    BASE_CONFIG,
    CORPUS,
    gguf_bytes,
    gguf_kv,
    gguf_tensor,
    safetensors_bytes,
    write_min_model_dir,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_files import replay

from lserve_lite.config import SIZE_BOUNDS, ModelConfig
from lserve_lite.errors import LServeError
from lserve_lite.tokenizer import Tokenizer
from lserve_lite.weights.gguf_import import model_config
from lserve_lite.weights.gguf_reader import read_gguf
from lserve_lite.weights.gguf_tokenizer import check_tokenizer_metadata, tokenizer_files
from lserve_lite.weights.loader import load_config, load_weights

LONG = int(os.environ.get("LSERVE_FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int, long_share: float = 1.0):
    """Hypothesis settings: a fixed, small budget in CI; LONG x long_share random examples on request."""
    return settings(
        max_examples=max(1, int(LONG * long_share)) if LONG else ci_examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def clear_or_ok(fn, *args, name: str):
    """fn(*args), or None when it refused with a one-line LServeError naming `name`; anything else fails."""
    try:
        return fn(*args)
    except LServeError as e:
        msg = str(e)
        assert "\n" not in msg and name in msg and len(msg) < 600, msg
        return None


# ------------------------------------------------------------------------------------------------ strategies

U64_EDGES = [0, 1, 7, 8, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
NUMBERS = [0, -1, 1, 2, 3, 15, 64, 1e9, 1e8, 2**31, 2**63, -(2**63), 10**30, 1.5, -5.0, 1e-300,
           float("nan"), float("inf"), float("-inf"), True, False]  # fmt: skip
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(NUMBERS),
    st.text(max_size=12),
)
json_value = st.recursive(
    leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few byte flips, cuts, insertions and u64 overwrites (counts, lengths, offsets)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["byte", "cut", "insert", "u64", "u64"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "byte" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=12))
        elif op == "u64" and len(data) >= i + 8:
            data[i : i + 8] = struct.pack("<Q", draw(st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)))
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _seeds(kind: str) -> list[bytes]:
    return [data for rel, (data, _) in CORPUS.items() if rel.startswith(kind + "/")]


# ---------------------------------------------------------------------------------------------- safetensors

ST_DTYPES = ["F32", "F16", "BF16", "I32", "I64", "U8", "F64", "BOOL", "Q4", "", "f32"]
dim = st.integers(0, 6) | st.sampled_from([-1, 2**31, 2**40, 2**64]) | leaf
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(ST_DTYPES) | leaf,
        "shape": st.lists(dim, max_size=3) | json_value,
        "data_offsets": st.lists(
            st.integers(0, 80) | st.sampled_from(U64_EDGES) | leaf, min_size=0, max_size=3
        ),
    }
)
header = (
    st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), tensor_entry | json_value, max_size=4)
    | json_value
)
VALID_ST = safetensors_bytes(
    {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
        "c": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]},
    },
    bytes(range(32)),
)


def _check_safetensors(path: Path) -> None:
    arrays = clear_or_ok(replay, "safetensors", path, None, name=path.name)
    for a in (arrays or {}).values():
        assert a.size >= 0 and a.ndim <= 8


@fuzz(300, 0.5)
@given(h=header, data=st.binary(max_size=80), lie=st.none() | st.sampled_from(U64_EDGES))
def test_fuzz_safetensors_headers(scratch: Path, h: object, data: bytes, lie: int | None):
    path = scratch / "h.safetensors"
    path.write_bytes(safetensors_bytes(h, data, length=lie))
    _check_safetensors(path)


@fuzz(300, 0.5)
@given(blob=mutated([VALID_ST, *_seeds("safetensors")]))
def test_fuzz_safetensors_bytes(scratch: Path, blob: bytes):
    path = scratch / "m.safetensors"
    path.write_bytes(blob)
    _check_safetensors(path)


# ----------------------------------------------------------------------------------------------------- GGUF


def _valid_gguf() -> bytes:
    """A small GGUF with every value kind, nested arrays and two tensors (F32 and Q8_0)."""
    kvs = [
        gguf_kv("general.architecture", 8, struct.pack("<Q", 5) + b"llama"),
        gguf_kv("u32", 4, struct.pack("<I", 7)),
        gguf_kv("f64", 12, struct.pack("<d", 0.5)),
        gguf_kv("flag", 7, b"\x01"),
        gguf_kv("ints", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3)),
        gguf_kv(
            "strs", 9, struct.pack("<IQ", 8, 2) + struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 2) + b"bc"
        ),
        gguf_kv("nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 2) + b"\x01\x02"),
    ]
    tensors = [gguf_tensor("f32", [4, 2], 0, 0), gguf_tensor("q8", [32], 8, 32)]
    return gguf_bytes(kvs, tensors, bytes(32) + bytes(34))


VALID_GGUF = _valid_gguf()
gguf_value = st.tuples(st.integers(0, 14), st.binary(max_size=24)).map(
    lambda t: struct.pack("<I", t[0]) + t[1]
)
gguf_kv_entry = st.one_of(
    st.builds(lambda k, v: struct.pack("<Q", len(k)) + k + v, st.binary(max_size=8), gguf_value),
    st.builds(
        lambda k, n: gguf_kv(k, 9, struct.pack("<IQ", 8, n)), st.text(max_size=6), st.sampled_from(U64_EDGES)
    ),
)
gguf_tensor_entry = st.builds(
    lambda name, dims, t, off, nd: gguf_tensor(name, dims, t, off, nd),
    st.text(max_size=6),
    st.lists(st.integers(0, 64) | st.sampled_from(U64_EDGES), max_size=5),
    st.sampled_from([0, 1, 2, 3, 8, 12, 30, 39, 999, 2**32 - 1]),
    st.integers(0, 96) | st.sampled_from(U64_EDGES),
    st.none() | st.integers(0, 6) | st.sampled_from([2**32 - 1]),
)


@fuzz(300, 0.5)
@given(
    kvs=st.lists(gguf_kv_entry, max_size=4),
    tensors=st.lists(gguf_tensor_entry, max_size=4),
    data=st.binary(max_size=96),
    n_kv=st.none() | st.sampled_from(U64_EDGES),
    n_tensors=st.none() | st.sampled_from(U64_EDGES),
    version=st.sampled_from([2, 3, 3, 1, 4, 3 << 24]),
)
def test_fuzz_gguf_structure(scratch: Path, kvs, tensors, data, n_kv, n_tensors, version):
    path = scratch / "s.gguf"
    path.write_bytes(gguf_bytes(kvs, tensors, data, n_kv=n_kv, n_tensors=n_tensors, version=version))
    clear_or_ok(read_gguf, path, name=path.name)


@fuzz(300, 0.5)
@given(blob=mutated([VALID_GGUF, *_seeds("gguf")]))
def test_fuzz_gguf_bytes(scratch: Path, blob: bytes):
    path = scratch / "m.gguf"
    path.write_bytes(blob)
    out = clear_or_ok(read_gguf, path, name=path.name)
    if out is not None:
        for t in out[1].values():
            assert t.data.nbytes <= len(blob)


META_KEYS = [
    "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
    "llama.attention.key_length", "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.expert_count",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]  # fmt: skip


@fuzz(40, 0.05)
@given(edits=st.dictionaries(st.sampled_from(META_KEYS), json_value, min_size=1, max_size=3))
def test_fuzz_gguf_metadata_to_config(tiny_gguf, edits: dict):
    meta, tensors, path = tiny_gguf

    def convert(m: dict) -> None:
        check_tokenizer_metadata(m, path)
        cfg = model_config(m, tensors, path)
        tokenizer_files(m, cfg, path)

    clear_or_ok(convert, {**meta, **edits}, name=path.name)


# ------------------------------------------------------------------------------------------ config.json etc

CONFIG_KEYS = [*BASE_CONFIG, "head_dim", "rope_scaling", "rope_parameters", "sliding_window",
               "use_sliding_window", "max_window_layers", "layer_types", "attention_bias", "dtype"]  # fmt: skip
rope_like = st.fixed_dictionaries(
    {},
    optional={
        "rope_type": st.sampled_from(["llama3", "default", "yarn"]) | leaf,
        "factor": leaf,
        "low_freq_factor": leaf,
        "high_freq_factor": leaf,
        "original_max_position_embeddings": leaf,
        "rope_theta": leaf,
    },
)
config_value = json_value | st.sampled_from(NUMBERS) | rope_like


def _check_config(cfg: ModelConfig | None) -> None:
    """A config that passed is within the bounds that every allocation relies on."""
    if cfg is None:
        return
    for value, key in [(cfg.hidden_size, "hidden_size"), (cfg.num_layers, "num_hidden_layers"),
                       (cfg.vocab_size, "vocab_size"), (cfg.head_dim, "head_dim"),
                       (cfg.max_position_embeddings, "max_position_embeddings"),
                       (cfg.intermediate_size, "intermediate_size")]:  # fmt: skip
        assert isinstance(value, int) and 1 <= value <= SIZE_BOUNDS[key]
    assert cfg.rope_theta > 1 and 0 < cfg.rms_norm_eps < 1 and cfg.num_heads % cfg.num_kv_heads == 0


@fuzz(500)
@given(
    edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), config_value, max_size=4),
    drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_fuzz_config_fields(scratch: Path, edits: dict, drop: list):
    d = {k: v for k, v in {**BASE_CONFIG, **edits}.items() if k not in drop}
    path = scratch / "config.json"
    path.write_text(json.dumps(d))
    _check_config(clear_or_ok(load_config, scratch, name="config.json"))


@fuzz(300)
@given(blob=mutated([json.dumps(BASE_CONFIG).encode(), *_seeds("config")]) | st.binary(max_size=64))
def test_fuzz_config_bytes(scratch: Path, blob: bytes):
    path = scratch / "config.json"
    path.write_bytes(blob)
    _check_config(clear_or_ok(load_config, scratch, name="config.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_min_model_dir(tmp_path_factory.mktemp("model"), weights=True)


@fuzz(200, 0.5)
@given(gen=json_value | st.dictionaries(st.just("eos_token_id"), json_value | st.sampled_from(NUMBERS)))
def test_fuzz_generation_config(model_dir: Path, gen: object):
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    try:
        cfg = clear_or_ok(load_config, model_dir, name="generation_config.json")
    finally:
        (model_dir / "generation_config.json").unlink()
    if cfg is not None:
        assert all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in cfg.eos_token_ids)


shard_name = st.sampled_from(["model.safetensors", "other.safetensors", "../model.safetensors", "/x.safetensors",
                              "model.bin", ""]) | leaf  # fmt: skip
tensor_name = st.sampled_from(["model.norm.weight", "lm_head.weight", "nope"]) | st.text(max_size=6)


@fuzz(150, 0.25)
@given(
    index=st.fixed_dictionaries({"weight_map": st.dictionaries(tensor_name, shard_name, max_size=3)})
    | json_value
)
def test_fuzz_index(model_dir: Path, index: object):
    path = model_dir / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    try:
        clear_or_ok(lambda: load_weights(model_dir, load_config(model_dir)), name=str(model_dir))
    finally:
        path.unlink()


JINJA_BITS = ["{%", "%}", "{{", "}}", "for m in messages", "endfor", "if", "endif", "m['content']", "m.role",
              "raise_exception('x')", "| tojson", "| upper", "+", " ", "messages[0]", "add_generation_prompt",
              "bos_token", "loop.index", "namespace(a=1)", "set x = 1", "'", ")", "("]  # fmt: skip
template = st.lists(st.sampled_from(JINJA_BITS) | st.text(max_size=4), max_size=12).map("".join)
tok_cfg = st.fixed_dictionaries(
    {},
    optional={
        "chat_template": template | json_value,
        "eos_token": leaf | st.fixed_dictionaries({"content": leaf}),
        "bos_token": leaf,
    },
)
messages = (
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]) | leaf, "content": leaf}),
        max_size=3,
    )
    | json_value
)


@fuzz(300, 0.25)
@given(cfg=tok_cfg | json_value, msgs=messages)
def test_fuzz_tokenizer_config_and_chat(model_dir: Path, cfg: object, msgs: object):
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps(cfg))
    try:
        tok = clear_or_ok(Tokenizer, model_dir, name="tokenizer_config.json")
    finally:
        path.unlink()
    if tok is not None and tok.chat_template:
        try:
            ids = tok.encode_chat(msgs)
            assert all(isinstance(i, int) for i in ids)
        except LServeError as e:
            assert "\n" not in str(e)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(write_min_model_dir(tmp_path_factory.mktemp("tok")))


@fuzz(200)
@given(text=st.text(st.characters(exclude_categories=()), max_size=20))
def test_fuzz_prompt_text(plain_tok: Tokenizer, text: str):
    try:
        assert all(isinstance(i, int) for i in plain_tok.encode(text))
    except LServeError as e:
        assert "surrogate" in str(e) and any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def test_fuzz_scratch_files_left_clean(model_dir: Path):
    """The fuzzers restore the shared model directory (so test order does not matter)."""
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
