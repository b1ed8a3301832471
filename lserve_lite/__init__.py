"""lserve-lite: a PyTorch-free long-context LLM engine implementing LServe's unified sparse attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineConfig, ModelConfig, SparseConfig
from .errors import InvalidRequestError, LServeError, ModelLoadError
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .llm import LLM, CompletionOutput

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LServeError",
    "ModelConfig",
    "ModelLoadError",
    "SamplingParams",
    "SparseConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`LLM` and `CompletionOutput` load the engine on first use, so `lserve-lite --help` starts fast."""
    if name in ("LLM", "CompletionOutput"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'lserve_lite' has no attribute {name!r}")
