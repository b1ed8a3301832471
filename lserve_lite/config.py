"""Configuration: the model (from HF config.json), the LServe sparsity knobs, and the engine limits."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import InvalidRequestError, ModelLoadError

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        rope = d.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg = cls(
                arch=arch,
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
                dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_ids(d.get("eos_token_id")),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: bad field value ({e})") from None
        cfg.validate(source)
        sw = d.get("sliding_window")
        uses_sw = d.get("use_sliding_window", arch == "MistralForCausalLM")
        if uses_sw and sw is not None and int(sw) < cfg.max_position_embeddings:
            raise ModelLoadError(f"{source}: sliding-window attention (sliding_window={sw}) is not supported")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def validate(self, source: str) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("llama3", "default"):
                raise ModelLoadError(f"{source}: unsupported rope_scaling type {kind!r} (supported: llama3)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"{source}: unsupported torch_dtype {self.dtype!r}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _as_ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class SparseConfig:
    """LServe's knobs, with the paper's defaults (docs/SPARSE.md). `enabled=False` is the dense baseline."""

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
    pattern_path: str | None = None

    def validate(self) -> SparseConfig:
        def bad(msg: str):
            raise InvalidRequestError(f"sparse config: {msg}")

        if not 0.0 <= self.static_sparsity <= 1.0:
            bad(f"static_sparsity must be in [0, 1], got {self.static_sparsity}")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1) or self.page_size < 16:
            bad(f"page_size must be a power of two >= 16, got {self.page_size}")
        if self.sub_pages <= 0 or self.page_size % self.sub_pages:
            bad(f"sub_pages must divide page_size ({self.page_size}), got {self.sub_pages}")
        for name in ("prefill_sink", "prefill_local", "decode_sink", "decode_local"):
            v = getattr(self, name)
            if v < 0 or v % self.page_size:
                bad(f"{name} must be a non-negative multiple of page_size ({self.page_size}), got {v}")
        if self.decode_local < self.page_size or self.prefill_local < self.page_size:
            bad("local windows must hold at least one page")
        if self.token_budget < 2 * self.page_size or self.token_budget % self.page_size:
            bad(f"token_budget must be a multiple of page_size and >= 2 pages, got {self.token_budget}")
        if self.select_interval < 1:
            bad(f"select_interval must be >= 1, got {self.select_interval}")
        return self

    def with_updates(self, **kw) -> SparseConfig:
        names = {f.name for f in fields(self)}
        unknown = set(kw) - names
        if unknown:
            raise InvalidRequestError(f"sparse config: unknown knob(s) {sorted(unknown)}")
        return replace(self, **kw).validate()


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
    seed: int = 0

    def __post_init__(self):
        self.sparse.validate()
        if self.sparse.enabled and self.sparse.page_size != self.page_size:
            raise InvalidRequestError(
                f"sparse page_size {self.sparse.page_size} differs from the KV page_size {self.page_size}"
            )

    def resolve_max_len(self, model: ModelConfig) -> int:
        if self.max_model_len is None:
            return model.max_position_embeddings
        if self.max_model_len <= 0:
            raise InvalidRequestError(f"max_model_len must be positive, got {self.max_model_len}")
        return self.max_model_len

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)
