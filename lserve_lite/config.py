"""Configuration: the model (from HF config.json), the LServe sparsity knobs, and the engine limits."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, ModelLoadError

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ACTS = ("silu", "swish")  # the MLP's activation (transformers' names for the same SiLU)
# What transformers' config class of each architecture takes for a field that config.json leaves out (a Llama
# without max_position_embeddings ran to 4096 here, theirs 2048; one without eos_token_id never stopped; Llama's
# num_key_value_heads is then num_attention_heads, Mistral's and Qwen2's a number of their own)
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "eos_token_id": 2},
    "MistralForCausalLM": {
        "max_position_embeddings": 131072, "eos_token_id": 2, "sliding_window": 4096, "num_key_value_heads": 8,
    },
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096},
}  # fmt: skip


# Sane bounds for config.json sizes: far above any released model, far below a runaway allocation.
SIZE_BOUNDS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
MAX_MODEL_LEN = SIZE_BOUNDS["max_position_embeddings"]  # the longest context an EngineConfig accepts
MAX_NUM_SEQS = 4096  # requests batched together at most (page-selection slots, decode graphs and logits rows)
MAX_BATCHED_TOKENS = 1 << 20  # tokens one step computes at most
MAX_POOL_PAGES = 1 << 20  # a KV pool never has more pages than this (page ids are int32 in plans)
PAGE_SIZES = (16, 1024)  # a KV page's tokens: a power of two in this range (dense mode and LServe alike)
MAX_JSON_BYTES = 64 << 20  # config / tokenizer / index JSON files larger than this are not model files


def env_float(name: str, default: float, lo: float, hi: float) -> float:
    """A numeric tuning knob from the environment, refused with one line outside [lo, hi] (an InvalidRequestError,
    which the CLI and the server print alone, not a traceback)."""
    value = os.environ.get(name, "")
    try:
        x = float(value) if value else default
    except ValueError:
        x = float("nan")
    if not lo <= x <= hi:
        raise InvalidRequestError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return x


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """A switch from the environment (stripped, lower-cased; unset or empty: `default`), refused with one line
    outside `choices` (an InvalidRequestError, printed alone by the CLI and the server, as env_float's)."""
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise InvalidRequestError(f"{name} must be one of {', '.join(choices)}, got {os.environ.get(name)!r}")
    return value


def env_flag(name: str, default: bool) -> bool:
    """An on / off switch from the environment: "1" or "0" (env_choice's rules; unset: `default`)."""
    return env_choice(name, "1" if default else "0", ("0", "1")) == "1"


def is_utf8(text: str) -> bool:
    """False for a str holding a lone surrogate (undecodable bytes let through as surrogate escapes, or a JSON
    \\udXXX escape): it cannot be encoded, tokenized or echoed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_text_file(path: Path, what: str) -> str:
    """A model file's UTF-8 text, read only from a regular file of at most MAX_JSON_BYTES: a FIFO would hang the
    load and a device (a symlink to /dev/urandom) grow memory without end. O_NONBLOCK: a FIFO's open returns."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelLoadError(f"{path}: not a regular file (a FIFO, device or directory)")
            if st.st_size > MAX_JSON_BYTES:
                raise ModelLoadError(f"{path}: {st.st_size} bytes, too large for {what}")
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None


def user_path(path: str | Path, what: str = "") -> Path:
    """`path` with a leading `~` / `~user` expanded; a `~user` naming no user here is one line (pathlib raised a
    bare RuntimeError, which the CLI printed as a traceback). `what` names where the path came from."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ModelLoadError(f"{what}{path}: its ~ names no user's home directory here") from None


def path_name(path: str | Path) -> str:
    """The name of a model's directory or file, as results record it and head patterns are found by: its absolute
    path's last part, without following links (`Path(".").name` is "", so `--model .` was recorded nameless)."""
    return Path(os.path.abspath(path)).name


def written_in_place(path: str | Path) -> bool:
    """Whether write_text_atomic writes `path` in place (appends to it), not replacing it: a device or FIFO (`--out
    /dev/null`), or an open descriptor named through /dev/stdout, /dev/fd/N or /proc/<pid>/fd/N (a pipe, whose
    resolved name `pipe:[N]` no file can be made beside, or the file the shell redirected it to, which a rename would
    take away from the process's own output)."""
    p = os.path.abspath(path)
    for _ in range(40):  # the chain of symbolic links, as the kernel follows it
        if re.match(r"/(proc/[^/]+|dev)/fd/", p):
            return True
        if not os.path.islink(p):
            break
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return os.path.exists(path) and not os.path.isfile(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: an interrupted or failed write
    (Ctrl-C, a full disk) leaves the earlier file whole, never half of the new one. A symbolic link's target is the
    file replaced (not the link); a device, FIFO or descriptor (`written_in_place`) is appended to, never replaced. A
    file replaced keeps its permission bits (one the user made 0600 stays private, the temporary file too)."""
    if written_in_place(path):
        # `/dev/stdout`: what this process printed so far goes first (left buffered, it was flushed at exit over the
        # text appended here, in a file the shell redirected stdout to)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        with open(path, "a") as f:
            f.write(text)
        return
    path = Path(os.path.realpath(path))
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else 0o600)
        with open(fd, "w") as f:
            if mode is not None:
                os.fchmod(fd, mode)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Throttled:
    """Calls `write` (a whole results file rewritten, atomically) at `soon` only when the last call is over max(1 s,
    10 x its own time) old: a rewrite per prompt made a 100k-prompt evaluation quadratic. `now` always writes (the
    run's end, Ctrl-C, an error), so an interrupted run keeps everything done; `now` returns what `write` returns."""

    def __init__(self, write: Callable[[], Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.clock, self.next_at = write, clock, -math.inf

    def soon(self) -> None:
        if self.clock() >= self.next_at:
            self.now()

    def now(self) -> Any:
        t = self.clock()
        out = self.write()
        done = self.clock()
        self.next_at = done + max(1.0, 10 * (done - t))
        return out


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def lfs_pointer_error(path: Path, head: bytes) -> ModelLoadError | None:
    """The error for a weights file that is a Git LFS pointer (a clone without `git lfs`): its text, not the
    weights, so the format's own check would call it corrupt. None for any other start of a file."""
    if not head.startswith(_LFS_POINTER):
        return None
    return ModelLoadError(f"{path}: a Git LFS pointer, not the file itself (fetch it: git lfs pull)")


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; every way it can be wrong is one ModelLoadError line."""
    path = Path(path)
    try:
        d = json.loads(read_text_file(path, "a JSON config file"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {_kind(d)}")
    return d


def _kind(v: object) -> str:
    """A JSON type name for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number")


class _Fields:
    """Typed access to one JSON object's fields; each wrong one raises ModelLoadError naming file and field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def bad(self, key: str, what: str, value: object) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: field {key!r} {what}, got {_short(value)}")

    def integer(self, key: str, default: int | None = None, lo: int = 1, hi: int | None = None) -> int:
        """An integer in [lo, hi] (hi: SIZE_BOUNDS); integral floats (1e3) pass, as some JSON writers emit them."""
        v = self.d.get(key)
        if v is None:
            if default is None:
                raise ModelLoadError(f"{self.source}: missing required field {key!r}")
            v = default
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.bad(key, "must be an integer", v)
        hi = SIZE_BOUNDS.get(key) if hi is None else hi
        if v < lo or (hi is not None and v > hi):
            raise self.bad(key, f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}", v)
        return v

    def number(self, key: str, default: float, lo: float, hi: float = math.inf) -> float:
        """A finite number in the open interval (lo, hi): NaN, inf and signs that break RoPE/RMSNorm refused."""
        v = self.d.get(key)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.bad(key, "must be a number", v)
        if not (math.isfinite(v) and lo < v < hi):
            raise self.bad(key, f"must be a finite number in ({lo:g}, {hi:g})", v)
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.bad(key, "must be true or false", v)
        return v

    def obj(self, key: str) -> dict | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, dict):
            raise self.bad(key, "must be an object", v)
        return v or None

    def text(self, key: str) -> str | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, str):
            raise self.bad(key, "must be a string", v)
        return v


def _short(v: object) -> str:
    """repr of a field value, cut to keep the error one short line."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def token_ids(v: object, key: str, source: str, vocab_size: int) -> tuple[int, ...]:
    """An id or a list of ids (eos_token_id), each in [0, vocab_size)."""
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    if len(items) > 1024 or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ModelLoadError(f"{source}: field {key!r} must be a token id or a list of them, got {_short(v)}")
    if any(not 0 <= i < vocab_size for i in items):
        raise ModelLoadError(f"{source}: field {key!r} has ids outside [0, {vocab_size}), got {_short(v)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ModelConfig:
    """The decoder shape and options that the forward pass needs."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # a sliding window in use that covers the trained positions: the context limit may not pass it
    sliding_window: int | None = None
    # the config names no trained length (max_position_embeddings, a GGUF's context_length): the limit above is
    # transformers' default for the architecture, which the engine says at load
    context_assumed: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """The one validation place for config.json: types, sane bounds and consistency, field by field."""
        if not isinstance(d, dict):
            raise ModelLoadError(f"{source}: expected a JSON object, got {_kind(d)}")
        f = _Fields(d, source)
        archs = d.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise f.bad("architectures", "must be a non-empty list of names", archs)
        if archs[0] not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs[0]!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        arch = archs[0]
        unset = ARCH_DEFAULTS[arch].keys() - d.keys()
        context_assumed = d.get("max_position_embeddings") is None
        d = {**ARCH_DEFAULTS[arch], **d}  # a field set to null stays null, as transformers reads it
        f = _Fields(d, source)
        rope = f.obj("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
        hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
        vocab = f.integer("vocab_size")
        bos = token_ids(d.get("bos_token_id"), "bos_token_id", source, vocab)
        _refuse_unsupported(f, arch)
        cfg = cls(
            arch=arch,
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_layers=f.integer("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=f.integer("num_key_value_heads", heads),
            head_dim=f.integer("head_dim", hidden // heads),
            vocab_size=vocab,
            # transformers' default for all three (1e-5 here ran every norm off theirs: logits 4e-3 apart)
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, lo=0.0, hi=1.0),
            rope_theta=f.number("rope_theta", rope.get("rope_theta", 10000.0), lo=1.0),
            rope_scaling=_rope_scaling(f, rope),
            max_position_embeddings=f.integer(
                "max_position_embeddings", ARCH_DEFAULTS[arch]["max_position_embeddings"]
            ),
            tie_word_embeddings=f.flag("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            dtype=f.text("torch_dtype") or f.text("dtype") or "float32",
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=token_ids(d.get("eos_token_id"), "eos_token_id", source, vocab),
            context_assumed=context_assumed,
        )
        cfg.validate(source)
        has_sw = d.get("sliding_window") is not None
        sw = f.integer("sliding_window", lo=0, hi=None) if has_sw else None
        # as transformers: Mistral slides whenever a window is set, Qwen2 only with use_sliding_window, Llama never
        slides = arch == "MistralForCausalLM" or (
            arch == "Qwen2ForCausalLM" and f.flag("use_sliding_window", False)
        )
        if not (slides and has_sw):
            return cfg
        sliding = _sliding_layers(f, cfg.num_layers) if arch == "Qwen2ForCausalLM" else cfg.num_layers
        if not sliding:
            return cfg
        if sw < cfg.max_position_embeddings:
            why = ", transformers' default when unset" if "sliding_window" in unset else ""
            where = "" if sliding == cfg.num_layers else f", {sliding} of {cfg.num_layers} layers"
            raise ModelLoadError(
                f"{source}: sliding-window attention (sliding_window={sw}{why}{where}) is not supported"
            )
        return replace(cfg, sliding_window=sw)

    def validate(self, source: str) -> None:
        """Cross-field consistency the forward pass relies on."""
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_heads * self.head_dim > SIZE_BOUNDS["hidden_size"]:
            raise ModelLoadError(
                f"{source}: num_attention_heads x head_dim = {self.num_heads * self.head_dim} exceeds"
                f" {SIZE_BOUNDS['hidden_size']} (sizes the attention and KV memory)"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim must be even (rotary embedding), got {self.head_dim}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"{source}: unsupported torch_dtype {self.dtype!r}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _refuse_unsupported(f: _Fields, arch: str) -> None:
    """Options that change the forward pass or the weights' form but that the engine does not implement: refused,
    not ignored (wrong logits, or a tensor missing for no visible reason). Qwen2's fixed q/k/v biases are
    implemented; Llama's `attention_bias` also biases o_proj."""
    if arch != "Qwen2ForCausalLM" and f.flag("attention_bias", False):
        raise ModelLoadError(
            f"{f.source}: field 'attention_bias' is true (q/k/v and o_proj biases): not supported"
        )
    if f.flag("mlp_bias", False):
        raise ModelLoadError(f"{f.source}: field 'mlp_bias' is true (MLP projection biases): not supported")
    quant = f.obj("quantization_config")
    if quant is not None:  # GPTQ / AWQ / bitsandbytes / FP8 tensors: not the float matrices the loader reads
        raise ModelLoadError(
            f"{f.source}: field 'quantization_config' (quant_method {_short(quant.get('quant_method'))}): a"
            " pre-quantized checkpoint is not supported (load the float one, with --quantize, or a GGUF)"
        )
    act = f.text("hidden_act") or "silu"
    if act not in SUPPORTED_ACTS:
        raise ModelLoadError(
            f"{f.source}: unsupported hidden_act {_short(act)} (supported: {', '.join(SUPPORTED_ACTS)})"
        )


QWEN2_LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_layers(f: _Fields, num_layers: int) -> int:
    """How many layers a Qwen2 slides (where use_sliding_window is on), as transformers' Qwen2Config: those its
    `layer_types` names, else those from `max_window_layers` (default 28) on; none is plain full attention."""
    types = f.d.get("layer_types")
    if types is None:
        return max(0, num_layers - f.integer("max_window_layers", 28, lo=0, hi=None))
    if (
        not isinstance(types, list)
        or len(types) != num_layers
        or any(t not in QWEN2_LAYER_TYPES for t in types)
    ):
        raise f.bad(
            "layer_types", f"must be a list of {num_layers} of {' / '.join(QWEN2_LAYER_TYPES)}", types
        )
    return types.count("sliding_attention")


def _rope_scaling(f: _Fields, rope: dict) -> dict | None:
    """rope_scaling (or transformers 5's rope_parameters): None, or llama3 with a factor >= 1 and finite, ordered
    frequency factors; every other type (linear, dynamic, yarn, longrope) is refused."""
    rs = f.obj("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if rs is None:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"{f.source}: unsupported rope_scaling type {_short(kind)} (supported: llama3)")
    g = _Fields(rs, f"{f.source}: rope_scaling")
    if "factor" not in rs:
        raise ModelLoadError(f"{f.source}: rope_scaling: missing required field 'factor'")
    factor = g.number("factor", math.nan, lo=0.0, hi=1e6)
    if factor < 1:  # transformers' rule; a tiny factor overflows the scaled frequencies (NaN tables)
        raise g.bad("factor", "must be a number in [1, 1e+06) (llama3 stretches the trained context)", factor)
    low = g.number("low_freq_factor", 1.0, lo=0.0, hi=1e6)
    high = g.number("high_freq_factor", 4.0, lo=low, hi=1e6)
    old = g.integer("original_max_position_embeddings", hi=SIZE_BOUNDS["max_position_embeddings"])
    return {**rs, "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old}  # fmt: skip


GROUP_REDUCE = ("max", "mass")  # the page selector's GQA group reductions (sparse/selector.py)
ORACLE_REDUCE = "oracle"  # evaluation only: exact attention picks the pages (CPU backend, float KV)
# query heads per KV head that `mass` handles (kernels/page_select.cu keeps them in registers)
MASS_MAX_GROUP = 32


@dataclass(frozen=True)
class SparseConfig:
    """LServe's knobs, with the paper's defaults except the selector's GQA reduction (`mass`: docs/ACCURACY.md
    has the retrieval results that chose it; docs/SPARSE.md). `enabled=False` is the dense baseline."""

    enabled: bool = False
    static_sparsity: float = 0.5
    page_size: int = 64
    sub_pages: int = 4
    prefill_sink: int = 128
    prefill_local: int = 8192
    decode_sink: int = 128
    decode_local: int = 256
    token_budget: int = 4096
    select_interval: int = 4
    group_reduce: str = "mass"  # selector: one score per KV head from its query group (sparse/selector.py)
    pattern_path: str | os.PathLike | None = None  # a DuoAttention TSV (None: the bundled pattern)

    def validate(self) -> SparseConfig:
        def bad(msg: str):
            raise InvalidRequestError(f"sparse config: {msg}")

        for f in fields(self):
            v, kind = getattr(self, f.name), type(getattr(SparseConfig, f.name, None))
            if f.name == "pattern_path":  # a pathlib.Path as well as a str, as every other path the API takes
                if v is not None and not isinstance(v, (str, os.PathLike)):
                    bad(f"pattern_path must be a path (str or os.PathLike) or None, got {_short(v)}")
                continue
            ok = isinstance(v, (int, float)) if kind is float else isinstance(v, kind)
            if not ok or (kind is not bool and isinstance(v, bool)):
                bad(f"{f.name} must be {kind.__name__}, got {v!r}")
        if not 0.0 <= self.static_sparsity <= 1.0:
            bad(f"static_sparsity must be in [0, 1], got {self.static_sparsity}")
        if not _page_size_ok(self.page_size):
            bad(
                f"page_size must be a power of two in [{PAGE_SIZES[0]}, {PAGE_SIZES[1]}], got {self.page_size}"
            )
        if self.sub_pages <= 0 or self.page_size % self.sub_pages:
            bad(f"sub_pages must divide page_size ({self.page_size}), got {self.sub_pages}")
        for name in ("prefill_sink", "prefill_local", "decode_sink", "decode_local"):
            v, lo = getattr(self, name), self.page_size if name.endswith("local") else 0  # a window: a page
            if not lo <= v <= MAX_MODEL_LEN or v % self.page_size:
                bad(
                    f"{name} must be a multiple of page_size ({self.page_size}) in [{lo}, {MAX_MODEL_LEN}], got {v}"
                )
        if not 2 * self.page_size <= self.token_budget <= MAX_MODEL_LEN or self.token_budget % self.page_size:
            bad(
                f"token_budget must be a multiple of page_size ({self.page_size}) in [{2 * self.page_size}, "
                f"{MAX_MODEL_LEN}], got {self.token_budget}"
            )
        if not 1 <= self.select_interval <= MAX_MODEL_LEN:  # one longer than any context never reselects
            bad(f"select_interval must be in [1, {MAX_MODEL_LEN}], got {self.select_interval}")
        reductions = (*GROUP_REDUCE, ORACLE_REDUCE)
        if self.group_reduce not in reductions:
            bad(f"group_reduce must be one of {', '.join(reductions)}, got {self.group_reduce!r}")
        return self

    def with_updates(self, **kw) -> SparseConfig:
        return self.with_knobs(kw)

    def with_knobs(self, knobs: dict) -> SparseConfig:
        """This config with `knobs` (a user's dict: names checked before they become keywords) applied."""
        bad = [k for k in knobs if not isinstance(k, str)]
        if bad:
            raise InvalidRequestError(f"sparse config: knobs are named by strings, got {bad[0]!r:.40}")
        unknown = set(knobs) - {f.name for f in fields(self)}
        if unknown:
            raise InvalidRequestError(f"sparse config: unknown knob(s) {sorted(unknown)}")
        return replace(self, **knobs).validate()


QUANTIZE_MODES = (None, "int8", "int4")
# vLLM's --generation-config keywords: the model's generation_config.json, or none (SamplingParams' defaults)
GENERATION_CONFIGS = ("auto", "vllm")
KV_DTYPES = ("auto", "fp16", "fp32", "int8", "int4", "fp8")  # formats: kv/quant.py


@dataclass
class EngineConfig:
    """Engine limits: KV memory, batching, context."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    num_kv_pages: int | None = None
    kv_memory_fraction: float = 0.8
    page_size: int = 64
    sparse: SparseConfig = field(default_factory=SparseConfig)
    cuda_graphs: bool = True
    prefix_caching: bool = True  # reuse cached KV pages of equal prompt prefixes (docs/PREFIX_CACHE.md)
    quantize: str | None = None  # "int8" / "int4": quantize a float model's projection matrices at load
    tensor_parallel: int | None = None  # ranks in worker processes (1 too); None: one in-process runner
    kv_dtype: str = "auto"  # KV-cache format (kv/quant.py); "auto": fp16 (fp32 on a CPU without F16C)
    # plan decode step N+1 while the device runs N (where Ops.async_steps: the CUDA backend)
    async_scheduling: bool = True
    # whose sampling defaults requests without their own take (vLLM's --generation-config): "auto" the model's
    # generation_config.json, "vllm" none, or a folder holding a generation_config.json
    generation_config: str | os.PathLike = "auto"

    def __post_init__(self):
        """Absurd limits are refused here, before they can hang the scheduler or size an allocation."""
        for name in ("cuda_graphs", "prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.sparse, dict):  # EngineConfig(sparse={"enabled": True, ...})
            self.sparse = SparseConfig().with_knobs(self.sparse)
        if not isinstance(self.sparse, SparseConfig):
            raise InvalidRequestError(
                f"sparse must be a SparseConfig or a dict of its knobs, got {self.sparse!r}"
            )
        _positive_int("max_num_seqs", self.max_num_seqs, hi=MAX_NUM_SEQS)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, hi=MAX_BATCHED_TOKENS)
        if self.num_kv_pages is not None:
            _positive_int("num_kv_pages", self.num_kv_pages, hi=MAX_POOL_PAGES)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len, hi=MAX_MODEL_LEN)
        f = self.kv_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise InvalidRequestError(f"kv_memory_fraction must be in (0, 1], got {f!r}")
        _positive_int("page_size", self.page_size, lo=PAGE_SIZES[0], hi=PAGE_SIZES[1])
        if not _page_size_ok(self.page_size):
            raise InvalidRequestError(
                f"page_size must be a power of two in [{PAGE_SIZES[0]}, {PAGE_SIZES[1]}], got {self.page_size}"
            )
        if self.quantize not in QUANTIZE_MODES:
            raise InvalidRequestError(
                f"quantize must be one of 'int8', 'int4' or None, got {self.quantize!r}"
            )
        if self.tensor_parallel is not None:
            _positive_int("tensor_parallel", self.tensor_parallel, hi=64)
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidRequestError(
                f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {self.kv_dtype!r}"
            )
        _check_generation_config(self.generation_config)
        self.sparse.validate()
        if not self.sparse.enabled and self.sparse.pattern_path is not None:  # a dense engine never reads it
            raise InvalidRequestError(
                "sparse pattern_path applies to LServe sparse attention only: set enabled=True or drop it"
            )
        if self.sparse.enabled and self.sparse.page_size != self.page_size:
            raise InvalidRequestError(
                f"sparse page_size {self.sparse.page_size} differs from the KV page_size {self.page_size}"
            )

    def resolve_max_len(self, model: ModelConfig) -> int:
        if self.max_model_len is None:
            return model.max_position_embeddings
        if self.max_model_len <= 0:
            raise InvalidRequestError(f"max_model_len must be positive, got {self.max_model_len}")
        if model.sliding_window is not None and self.max_model_len > model.sliding_window:
            raise InvalidRequestError(
                f"max_model_len {self.max_model_len} is past the model's sliding window {model.sliding_window}"
                " (sliding-window attention is not supported: attention would reach past it)"
            )
        return self.max_model_len

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)


def _check_generation_config(v: object) -> None:
    """vLLM's generation_config: one of GENERATION_CONFIGS or a folder that holds a generation_config.json (a typo
    would otherwise serve without the defaults meant)."""
    if isinstance(v, str) and v in GENERATION_CONFIGS:
        return
    if isinstance(v, (str, os.PathLike)) and (Path(os.fsdecode(v)) / "generation_config.json").is_file():
        return
    raise InvalidRequestError(
        f"generation_config must be 'auto', 'vllm' or a folder holding generation_config.json, got {_short(v)}"
    )


def _page_size_ok(v: int) -> bool:
    """A page size of PAGE_SIZES' range and a power of two (the kernels' page arithmetic)."""
    return PAGE_SIZES[0] <= v <= PAGE_SIZES[1] and not v & (v - 1)


def _positive_int(name: str, v: object, lo: int = 1, hi: int | None = None) -> None:
    """One engine limit: an int in [lo, hi], else one InvalidRequestError line naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidRequestError(f"{name} must be an integer {bound}, got {v!r}")
