"""User-facing errors: each carries one line that says what is wrong and where (no traceback shown)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class LServeError(Exception):
    """Base class; the CLI and the server print str(e) alone."""


class ModelLoadError(LServeError):
    """A model file is missing, truncated, malformed or of an unsupported kind."""


class InvalidRequestError(LServeError, ValueError):
    """A prompt or sampling parameter the engine cannot honour."""


class PromptTooLongError(InvalidRequestError):
    """A prompt over a length limit (the server's 400 carries OpenAI's code context_length_exceeded)."""


class TensorParallelError(LServeError):
    """A tensor-parallel worker failed, died or hung; the engine cannot go on."""


def exit_status(main: Callable[[], int | None]) -> int:
    """Runs a command as `lserve-lite` and the tools do: an LServeError is one `error: ...` line and status 1,
    Ctrl-C status 130, a reader of stdout that went away (`| head`) status 141 (128 + SIGPIPE), quietly as cat; any other
    OSError (a full disk under stdout) is one line and status 1."""
    try:
        return int(main() or 0)
    except LServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _drop_stdout()
        return 141
    except OSError as e:  # `> /dev/full`, a disk that filled up: a traceback hid the one line that says so
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:
            _drop_stdout()
        return 1


def _drop_stdout() -> None:
    """Points stdout at /dev/null: the flush at exit of what it could not take would raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
