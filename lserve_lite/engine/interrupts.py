"""Ctrl-C (and SIGTERM) held over work that must finish once begun: a message to every tensor-parallel rank, a pipe
read, the block manager's page ops. KeyboardInterrupt is raised by Python's SIGINT handler between any two bytecodes,
so without this it can land after rank 0 has a step and before rank 1 does (the ranks out of step, a hang); the
CLI's SIGTERM handler raises SystemExit just as anywhere (a framed message torn, the exit then waiting on workers)."""

from __future__ import annotations

import _signal  # getsignal and signal unwrapped (ctrl_c_held)
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The signals held, handled after the block in this order (SIGTERM first: a Ctrl-C's KeyboardInterrupt, which the
# chat CLI takes as "stop the reply", would drop it), where Python handles them: one left to the system (SIG_DFL,
# SIG_IGN) or set outside Python (None) is not swapped.
HELD = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []  # signals the outermost hold has recorded; it raises them when it ends
# tries of one handler swap while pending signals' handlers raise first (each runs once for a signal that came)
SWAP_TRIES = 8


def _record(signum: int, frame: object) -> None:
    _pending.append(signum)


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM recorded instead of handled, then handle them (KeyboardInterrupt, or
    what the SIGTERM handler raises, after the block).

    A handler swap, not `signal.pthread_sigmask`: a mask blocks the signal for this thread only, and a
    process-directed SIGINT then goes to another thread, whose C handler still makes the main thread raise.
    Python runs signal handlers on the main thread only, so elsewhere there is nothing to hold. Nests: inside a
    hold, the outermost one raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # the C module's calls, not the signal module's wrappers: those convert each handler to and from an enum through
    # a caught exception, ~2-3 us a call (a hold took ~13 us, now ~2 us), and an engine step takes a hold or more
    old = {s: _signal.getsignal(s) for s in HELD}
    held = [s for s, h in old.items() if callable(h)]
    if not held or _record in old.values():  # none Python handles, or inside a hold
        yield
        return
    _pending.clear()
    try:
        _swap({s: _record for s in held})
        yield
    finally:
        try:
            _swap({s: old[s] for s in held})
        finally:
            came = [s for s in held if s in _pending]
            _pending.clear()
        for s in came:  # handled now as they would have been: the first handler that raises ends the rest
            signal.raise_signal(s)


def _swap(handlers: dict[int, object]) -> None:
    """Set every handler, then raise what a handler run meanwhile raised: _signal.signal first runs the handlers of
    signals pending, so a Ctrl-C landing between two swaps raised there and left the other signal's handler the
    hold's recorder for good (SIGTERM then did nothing, and no later hold held Ctrl-C)."""
    raised: BaseException | None = None
    for s, h in handlers.items():
        for _ in range(SWAP_TRIES):
            try:
                _signal.signal(s, h)
                break
            except BaseException as e:  # raised before the change was made: make it
                raised = raised or e
        else:
            _signal.signal(s, h)  # signals still landing on every try: the last error is this one
    if raised is not None:
        raise raised


def ctrl_c_pending() -> bool:
    """Whether this thread's hold has a Ctrl-C (or SIGTERM) waiting: work inside it that may wait long (a rank that
    reads nothing) can give up rather than keep the user waiting. Only the main thread holds one."""
    return bool(_pending) and threading.current_thread() is threading.main_thread()


def pending_name() -> str:
    """What the held signal waiting is, as errors name it: "SIGTERM" (handled first), else "Ctrl-C"."""
    return "SIGTERM" if signal.SIGTERM in _pending else "Ctrl-C"
