"""Ctrl-C held over work that must finish once begun: a message to every tensor-parallel rank, a pipe read, the
block manager's page ops. KeyboardInterrupt is raised by Python's SIGINT handler between any two bytecodes, so
without this it can land after rank 0 has a step and before rank 1 does (the ranks out of step, a hang)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending: list[int] = []  # SIGINTs the outermost hold has recorded; it raises them when it ends


def _record(signum: int, frame: object) -> None:
    _pending.append(signum)


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Run the block with SIGINT recorded instead of handled, then handle it (KeyboardInterrupt after the block).

    A handler swap, not `signal.pthread_sigmask`: a mask blocks the signal for this thread only, and a
    process-directed SIGINT then goes to another thread, whose C handler still makes the main thread raise.
    Python runs signal handlers on the main thread only, so elsewhere there is nothing to hold. Nests: inside a
    hold, the outermost one raises."""
    old = signal.getsignal(signal.SIGINT)
    # None: a handler set outside Python, which could not be put back
    if threading.current_thread() is not threading.main_thread() or old is None or old is _record:
        yield
        return
    _pending.clear()
    signal.signal(signal.SIGINT, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if _pending:
            _pending.clear()
            signal.raise_signal(
                signal.SIGINT
            )  # handled now as it would have been (KeyboardInterrupt by default)


def ctrl_c_pending() -> bool:
    """Whether this thread's hold has a Ctrl-C waiting: work inside it that may wait long (a rank that reads
    nothing) can give up rather than keep the user waiting. Only the main thread holds one."""
    return bool(_pending) and threading.current_thread() is threading.main_thread()
