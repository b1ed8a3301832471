"""User-facing errors: each carries one line that says what is wrong and where (no traceback shown)."""


class LServeError(Exception):
    """Base class; the CLI and the server print str(e) alone."""


class ModelLoadError(LServeError):
    """A model file is missing, truncated, malformed or of an unsupported kind."""


class InvalidRequestError(LServeError, ValueError):
    """A prompt or sampling parameter the engine cannot honour."""


class TensorParallelError(LServeError):
    """A tensor-parallel worker failed, died or hung; the engine cannot go on."""
