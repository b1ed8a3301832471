"""GGUF tokenizer rebuild: a `tokenizers.Tokenizer` (plus tokenizer_config.json and
generation_config.json contents) reconstructed from a GGUF's `tokenizer.ggml.*` metadata so that it
tokenizes exactly as transformers' own GGUF tokenizer does
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`): llama.cpp token types, the per-`pre`
pre-tokenizer split regexes, GPT-2's byte table and BPE merges (given or derived from token scores). It
works on metadata alone, independent of the tensors and of the weight conversion in `gguf_import`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..tokenizer import bytes_to_unicode
from .gguf_reader import _one_line

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


# Merges are derived by trying every split of every piece, a time quadratic in a piece's length (a crafted 1 MB
# token took minutes); sentencepiece's own pieces are at most 16 characters by default.
MAX_SCORED_PIECE = 256


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
    longest = max(tokens, key=len)
    if len(longest) > MAX_SCORED_PIECE:
        raise ValueError(
            f"token {tokens.index(longest)} has {len(longest)} characters; merges are derived from token scores "
            f"only for tokens of at most {MAX_SCORED_PIECE}"
        )
    return _generate_merges(vocab, dict(zip(tokens, scores, strict=True)))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _num_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _merge_list(v: object) -> bool:
    return _str_list(v) and all(m.count(" ") == 1 for m in v)


_TOKENIZER_KEYS = {  # key -> (what it must be, its check)
    "tokenizer.ggml.model": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.ggml.pre": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.chat_template": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.chat_template.tool_use": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.ggml.tokens": ("a list of strings", _str_list),
    "tokenizer.ggml.merges": ("a list of 'a b' strings", _merge_list),
    "tokenizer.ggml.token_type": ("a list of integers", _int_list),
    "tokenizer.ggml.scores": ("a list of numbers", _num_list),
    **{
        f"tokenizer.ggml.{k}_token_id": ("a non-negative integer", lambda v: _is_int(v) and v >= 0)
        for k in ("bos", "eos", "eot", "eom", "unknown", "padding")
    },
    **{f"tokenizer.ggml.add_{k}_token": ("a boolean", lambda v: isinstance(v, bool)) for k in ("bos", "eos")},
}


def check_tokenizer_metadata(meta: dict[str, Any], path: str | Path) -> None:
    """The tokenizer.* metadata has the types the rebuild relies on (one ModelLoadError line otherwise)."""
    for key, (what, ok) in _TOKENIZER_KEYS.items():
        if key in meta and not ok(meta[key]):
            raise ModelLoadError(f"{path}: metadata key {key!r} must be {what}, got {repr(meta[key])[:60]}")


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
            spelling = bytes_to_unicode()
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
    have = {t.content for t in tok.get_added_tokens_decoder().values()}  # one call: each builds the whole map
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


def tokenizer_files(meta: dict[str, Any], cfg: dict[str, Any], path: Path):
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
    if "max_position_embeddings" in cfg:  # else none named (transformers' tokenizer: no limit)
        tc["model_max_length"] = cfg["max_position_embeddings"]
    if (template := meta.get("tokenizer.chat_template")) is not None:
        tc["chat_template"] = template
        if (
            tool_use := meta.get("tokenizer.chat_template.tool_use")
        ) is not None:  # llama.cpp's named templates
            tc["chat_template"] = [
                {"name": "default", "template": template},
                {"name": "tool_use", "template": tool_use},
            ]
    gen: dict[str, Any] = {}
    if "bos_token_id" in cfg:
        gen["bos_token_id"] = cfg["bos_token_id"]
    if cfg.get("eos_token_id") is not None:
        gen["eos_token_id"] = cfg["eos_token_id"]
    if "pad_token_id" in cfg:
        gen["pad_token_id"] = cfg["pad_token_id"]
    return tok, tc, gen


__all__ = ["PRE_TOKENIZER_SPLITS", "build_tokenizer"]
