"""The seeded corpus of damaged loader inputs (tests/data/fuzz_corpus/): each file with the message part that
its one-line error must contain. `python tests/fuzz_corpus.py` rewrites the stored files from this list.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "data" / "fuzz_corpus"

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _config(**kw: object) -> bytes:
    return _json({**BASE_CONFIG, **kw})


def safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from any header object (or raw header bytes) and data."""
    raw = header if isinstance(header, bytes) else _json(header)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _gs(s: bytes | str) -> bytes:
    """A GGUF string: u64 length, bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(
    kvs: list[bytes] = (),
    tensors: list[bytes] = (),
    data: bytes = b"",
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
) -> bytes:
    """A GGUF file from pre-encoded key/value entries and tensor infos; counts may lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def gguf_kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return _gs(key) + struct.pack("<I", vtype) + payload


def gguf_tensor(
    name: str, dims: list[int], ttype: int = 0, offset: int = 0, n_dims: int | None = None
) -> bytes:
    nd = len(dims) if n_dims is None else n_dims
    return _gs(name) + struct.pack(f"<I{len(dims)}QIQ", nd, *dims, ttype, offset)


def _nested_array(depth: int) -> bytes:
    """An array of arrays `depth` deep around one empty u8 array."""
    inner = struct.pack("<IQ", 0, 0)
    for _ in range(depth):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


_F32_8 = b"\0" * 32

# relative path -> (file bytes, part of the one-line error)
CORPUS: dict[str, tuple[bytes, str]] = {
    # safetensors
    "safetensors/header_list.safetensors": (safetensors_bytes([1, 2]), "not an object"),
    "safetensors/header_a1.safetensors": (safetensors_bytes({"a": 1}), "tensor 'a': field 'entry'"),
    "safetensors/wrong_shape.safetensors": (safetensors_bytes({"t": _t(shape=[2, 3])}, _F32_8[:8]), "must span 24 bytes"),
    "safetensors/shape_not_list.safetensors": (safetensors_bytes({"t": {**_t(), "shape": "ab"}}, _F32_8[:8]), "field 'shape'"),
    "safetensors/negative_dim.safetensors": (safetensors_bytes({"t": _t(shape=[-2])}, _F32_8[:8]), "field 'shape'"),
    "safetensors/bool_dim.safetensors": (safetensors_bytes({"t": _t(shape=[True, 2])}, _F32_8[:8]), "field 'shape'"),
    "safetensors/reversed_offsets.safetensors": (safetensors_bytes({"t": _t(offsets=[8, 0])}, _F32_8[:8]), "begin <= end"),
    "safetensors/overlapping.safetensors": (
        safetensors_bytes({"a": _t(offsets=[0, 8]), "b": _t(offsets=[4, 12])}, _F32_8[:12]), "overlap"),
    "safetensors/out_of_file.safetensors": (safetensors_bytes({"t": _t(shape=[250], offsets=[0, 1000])}, _F32_8[:8]), "truncated"),
    "safetensors/unknown_dtype.safetensors": (safetensors_bytes({"t": _t(dtype="Q4")}, _F32_8[:8]), "field 'dtype'"),
    "safetensors/header_len_beyond_file.safetensors": (safetensors_bytes({"t": _t()}, _F32_8[:8], length=10**6), "header length"),
    "safetensors/header_len_huge.safetensors": (safetensors_bytes(b"{}", length=2**63), "header length"),
    "safetensors/header_not_json.safetensors": (safetensors_bytes(b"{not json"), "not JSON"),
    "safetensors/header_not_utf8.safetensors": (safetensors_bytes(b'{"\xff": 1}'), "not JSON"),
    "safetensors/duplicate_key.safetensors": (
        safetensors_bytes(b'{"t": ' + _json(_t()) + b', "t": ' + _json(_t()) + b"}", _F32_8[:8]), "given twice"),
    "safetensors/metadata_not_object.safetensors": (safetensors_bytes({"__metadata__": [1]}), "__metadata__"),
    "safetensors/offsets_three.safetensors": (safetensors_bytes({"t": _t(offsets=[0, 4, 8])}, _F32_8[:8]), "data_offsets"),
    "safetensors/short_file.safetensors": (b"\x01\x02\x03", "truncated"),
    # GGUF
    "gguf/truncated_header.gguf": (b"GGUF\x03\x00\x00\x00\x01\x00", "truncated"),
    "gguf/bad_magic.gguf": (b"GGML" + b"\0" * 28, "magic"),
    "gguf/big_endian.gguf": (gguf_bytes(version=3 << 24), "big-endian"),
    "gguf/huge_n_tensors.gguf": (gguf_bytes(n_tensors=2**63), "cannot fit"),
    "gguf/huge_n_kv.gguf": (gguf_bytes(n_kv=2**40), "cannot fit"),
    "gguf/huge_string_len.gguf": (gguf_bytes([struct.pack("<Q", 2**62) + b"key"]), "truncated"),
    "gguf/huge_value_string.gguf": (gguf_bytes([gguf_kv("k", 8, struct.pack("<Q", 2**60) + b"abc")]), "truncated"),
    "gguf/huge_array_len.gguf": (gguf_bytes([gguf_kv("k", 9, struct.pack("<IQ", 0, 2**60))]), "beyond the limits"),
    "gguf/huge_string_array.gguf": (gguf_bytes([gguf_kv("k", 9, struct.pack("<IQ", 8, 2**20))]), "runs past the end"),
    "gguf/deep_nesting.gguf": (gguf_bytes([gguf_kv("k", 9, _nested_array(40))]), "beyond the limits"),
    "gguf/unknown_value_type.gguf": (gguf_bytes([gguf_kv("k", 99, b"\0" * 8)]), "unknown metadata value type"),
    "gguf/bad_utf8_key.gguf": (gguf_bytes([gguf_kv(b"\xff\xfe", 4, b"\0" * 4)]), "UTF-8"),
    "gguf/duplicate_key.gguf": (gguf_bytes([gguf_kv("k", 4, b"\0" * 4)] * 2), "given twice"),
    "gguf/bad_alignment.gguf": (gguf_bytes([gguf_kv("general.alignment", 4, struct.pack("<I", 3))]), "alignment"),
    "gguf/alignment_string.gguf": (gguf_bytes([gguf_kv("general.alignment", 8, _gs("32"))]), "alignment"),
    "gguf/huge_dims.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [2**40, 2**40])]), "dimension"),
    "gguf/zero_dims.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [], n_dims=0)]), "0 dimensions"),
    "gguf/five_dims.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [1] * 5)]), "5 dimensions"),
    "gguf/tensor_past_end.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [1024])]), "past the end"),
    "gguf/unknown_tensor_type.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [8], ttype=999)], data=_F32_8), "unknown type id"),
    "gguf/row_not_whole_blocks.gguf": (  # Q5_K (13): blocks of 256
        gguf_bytes(tensors=[gguf_tensor("t", [64], ttype=13)], data=bytes(256)), "'t' (Q5_K): row length 64 is not"),
    "gguf/overlapping.gguf": (
        gguf_bytes(tensors=[gguf_tensor("a", [8]), gguf_tensor("b", [8])], data=_F32_8), "overlap"),
    "gguf/misaligned_offset.gguf": (gguf_bytes(tensors=[gguf_tensor("t", [1], offset=4)], data=_F32_8), "alignment"),
    "gguf/duplicate_tensor.gguf": (
        gguf_bytes(tensors=[gguf_tensor("t", [8]), gguf_tensor("t", [8], offset=32)], data=_F32_8 * 2), "twice"),
    # config.json
    "config/list.json": (_json([1, 2]), "expected a JSON object, got a list"),
    "config/string.json": (_json("config"), "expected a JSON object, got a string"),
    "config/max_pos_1e9.json": (_config(max_position_embeddings=1e9), "'max_position_embeddings' must be in"),
    "config/layers_1e8.json": (_config(num_hidden_layers=100_000_000), "'num_hidden_layers' must be in"),
    "config/hidden_huge.json": (_config(hidden_size=10**9), "'hidden_size' must be in"),
    "config/vocab_huge.json": (_config(vocab_size=10**12), "'vocab_size' must be in"),
    "config/heads_zero.json": (_config(num_attention_heads=0), "'num_attention_heads' must be in"),
    "config/head_dim_huge.json": (_config(head_dim=2**20), "'head_dim' must be in"),
    "config/head_dim_odd.json": (_config(head_dim=15), "head_dim must be even"),
    "config/intermediate_huge.json": (_config(intermediate_size=2**40), "'intermediate_size' must be in"),
    "config/attention_width_huge.json": (
        _config(num_attention_heads=1024, num_key_value_heads=1024, head_dim=1024), "exceeds 65536"),
    "config/kv_heads_not_divisor.json": (_config(num_key_value_heads=3), "multiple of num_key_value_heads"),
    "config/layers_string.json": (_config(num_hidden_layers="2"), "'num_hidden_layers' must be an integer"),
    "config/layers_fraction.json": (_config(num_hidden_layers=2.5), "'num_hidden_layers' must be an integer"),
    "config/rope_theta_negative.json": (_config(rope_theta=-5), "'rope_theta' must be a finite number"),
    "config/rope_theta_string.json": (_config(rope_theta="1e4"), "'rope_theta' must be a number"),
    "config/eps_nan.json": (_config(rms_norm_eps=float("nan")), "'rms_norm_eps' must be a finite number"),
    "config/eps_inf.json": (_config(rms_norm_eps=float("inf")), "'rms_norm_eps' must be a finite number"),
    "config/eps_zero.json": (_config(rms_norm_eps=0), "'rms_norm_eps' must be a finite number"),
    "config/rope_scaling_list.json": (_config(rope_scaling=[1, 2]), "'rope_scaling' must be an object"),
    "config/rope_llama3_factor_string.json": (
        _config(rope_scaling={"rope_type": "llama3", "factor": "x", "original_max_position_embeddings": 8}),
        "'factor' must be a number"),
    "config/rope_llama3_low_above_high.json": (
        _config(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                              "original_max_position_embeddings": 8192}), "'high_freq_factor'"),  # fmt: skip
    "config/rope_llama3_no_factor.json": (
        _config(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8}), "missing required field 'factor'"),
    "config/rope_type_list.json": (_config(rope_scaling={"rope_type": [1]}), "unsupported rope_scaling type"),
    "config/architectures_string.json": (_config(architectures="LlamaForCausalLM"), "'architectures'"),
    "config/tie_string.json": (_config(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
    "config/eos_string.json": (_config(eos_token_id="abc"), "'eos_token_id' must be a token id"),
    "config/eos_out_of_vocab.json": (_config(eos_token_id=[2, 5000]), "outside [0, 320)"),
    "config/dtype_list.json": (_config(torch_dtype=["float32"]), "'torch_dtype' must be a string"),
    "config/deep_nesting.json": (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    "config/not_utf8.json": (b'{"architectures": ["\xff"]}', "not UTF-8"),
    # generation_config.json (next to config.json of BASE_CONFIG)
    "generation_config/eos_abc.json": (_json({"eos_token_id": "abc"}), "'eos_token_id' must be a token id"),
    "generation_config/eos_negative.json": (_json({"eos_token_id": -1}), "outside [0, 320)"),
    "generation_config/eos_list_mixed.json": (_json({"eos_token_id": [2, None]}), "'eos_token_id' must be"),
    "generation_config/list.json": (_json([2]), "expected a JSON object"),
    # model.safetensors.index.json
    "index/weight_map_list.json": (_json({"weight_map": [1, 2]}), "'weight_map' must be a non-empty object"),
    "index/no_weight_map.json": (_json({"metadata": {}}), "'weight_map' must be a non-empty object"),
    "index/weight_map_traversal.json": (_json({"weight_map": {"a": "../../etc/x.safetensors"}}), "not a file name"),
    "index/weight_map_int.json": (_json({"weight_map": {"a": 1}}), "not a file name"),
    "index/missing_shard.json": (_json({"weight_map": {"a": "model-1.safetensors"}}), "file not found"),
    # tokenizer_config.json
    "tokenizer_config/not_utf8.json": (b'{"chat_template": "\xff\xfe"}', "not UTF-8"),
    "tokenizer_config/template_syntax.json": (_json({"chat_template": "{% for m in messages %}{{ m"}), "Jinja syntax error"),
    "tokenizer_config/template_int.json": (_json({"chat_template": 5}), "'chat_template' must be a string"),
    "tokenizer_config/template_list_bad.json": (_json({"chat_template": [1, 2]}), "'chat_template' must list"),
    "tokenizer_config/eos_token_int.json": (_json({"eos_token": 5}), "'eos_token' must be a string"),
    "tokenizer_config/list.json": (_json(["x"]), "expected a JSON object"),
}  # fmt: skip


def write_min_model_dir(path: Path, weights: bool = False, **config: object) -> Path:
    """config.json (BASE_CONFIG updated by `config`), a word-level tokenizer.json and, if asked, random
    safetensors weights of BASE_CONFIG's shapes: a loadable model without torch."""
    import numpy as np
    from tokenizers import Tokenizer, models

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**BASE_CONFIG, **config}))
    vocab = {f"w{i}": i for i in range(BASE_CONFIG["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path / "tokenizer.json"))
    if weights:
        from safetensors.numpy import save_file

        rng = np.random.default_rng(0)
        save_file({k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in _shapes().items()},
                  str(path / "model.safetensors"))  # fmt: skip
    return path


def _shapes() -> dict[str, tuple[int, ...]]:
    c = BASE_CONFIG
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = h
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}  # fmt: skip
    return out


def write_corpus(root: Path = CORPUS_DIR) -> None:
    """Write every corpus file under root (the stored copy is what the tests replay)."""
    for rel, (data, _) in CORPUS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


if __name__ == "__main__":
    write_corpus()
