"""One KeyboardInterrupt raised at each point where CPython would raise a Ctrl-C's, in chosen files' frames: the
interrupt tests' model of where a Ctrl-C can land (test_turn_interrupts.py, test_step_interrupts.py)."""

from __future__ import annotations

import dis
import inspect
import itertools
import signal
import sys
from collections.abc import Callable

from lserve_lite.engine import interrupts

# Where CPython (3.11) runs a pending signal's handler: a function's start (a generator's too, and its resumption by
# next / send, not by throw or close), and the next bytecode after a call returns or a backward jump. Not at every
# bytecode: no code could be safe there, not even `with lock:`, whose exit call is set up by bytecodes no handler
# covers.
RESUME = dis.opmap["RESUME"]
CHECKED_AFTER = {RESUME, dis.opmap["CALL"], dis.opmap["CALL_FUNCTION_EX"], dis.opmap["JUMP_BACKWARD"]}


def held() -> bool:
    """Whether Ctrl-C is held now (interrupts.ctrl_c_held): a real one is recorded and raised as the hold ends."""
    return signal.getsignal(signal.SIGINT) is interrupts._record


def interrupted_at(n: int, files: tuple[str, ...], fn: Callable[[], object]) -> int:
    """`fn()` with one KeyboardInterrupt raised at the n-th point where Python would raise a Ctrl-C's, in the frames
    of `files` and at the start of the functions they call, and caught; gives the count of points passed. Points
    inside a `ctrl_c_held` block are not counted: a Ctrl-C there is raised where the block ends."""
    ran = [0]

    def passed() -> None:
        if held():
            return
        ran[0] += 1
        if ran[0] == n:
            raise KeyboardInterrupt  # a trace function that raises is removed: one interrupt

    def call(frame, event, arg):
        traced = frame.f_code.co_filename in files
        if not traced and (frame.f_back is None or frame.f_back.f_code.co_filename not in files):
            return None
        code = frame.f_code
        generator = bool(code.co_flags & inspect.CO_GENERATOR)
        if not generator:
            passed()  # raised as it starts
        if not traced:
            return None
        frame.f_trace_opcodes = True
        # a generator's from its first bytecode: raised inside it, where its `finally` runs (f_lasti is its RESUME,
        # not yet run where a throw or close resumes it)
        last = [code.co_code[frame.f_lasti] if generator else -1]

        def opcode(frame, event, arg):
            if event == "opcode":
                if last[0] in CHECKED_AFTER:
                    passed()
                last[0] = frame.f_code.co_code[frame.f_lasti]
            return opcode

        return opcode

    sys.settrace(call)
    try:
        fn()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return ran[0]


def each_point(
    setup: Callable[[], None],
    call: Callable[[], object],
    check: Callable[[], None],
    files: tuple[str, ...],
) -> int:
    """`call()` with the interrupt at each point n in turn (each after `setup()`, then `check()`), until a call ends
    before reaching n; gives that count."""
    for n in itertools.count(1):
        setup()
        ran = interrupted_at(n, files, call)
        try:
            check()
        except AssertionError as e:
            raise AssertionError(f"interrupted at point {n}: {e}") from None
        if ran < n:
            return n - 1
