"""lserve-lite: a PyTorch-free long-context LLM engine implementing LServe's unified sparse attention."""

from .config import EngineConfig, ModelConfig, SparseConfig
from .errors import InvalidRequestError, LServeError, ModelLoadError
from .llm import LLM, CompletionOutput
from .sampling_params import SamplingParams

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
