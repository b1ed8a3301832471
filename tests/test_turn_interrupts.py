"""Ctrl-C at any point of an LLM call's turn (the lock every call takes) leaves the LLM usable: a KeyboardInterrupt
raised after the lock was taken but before the turn's `with` took hold, or while the turn ended, left the lock held
(other threads' calls waited for good) and the turn marked busy (this thread's calls were refused). It leaves no
request decoding unread nor an output box behind, and loses no token of another open stream."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

import interrupt_points
import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, LServeError, SamplingParams
from lserve_lite import llm as llm_module
from lserve_lite.engine import llm_engine

if sys.version_info < (
    3,
    11,
):  # Python 3.10 checks for signals at other bytecodes, which this model does not name
    pytest.skip("the interrupt points modelled are CPython 3.11's and later", allow_module_level=True)
# an interrupt at the start of a finalizer that a call runs (tqdm's __del__) is Python's unraisable one, as a Ctrl-C's
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SP = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
WAIT_S = 20  # a second call's limit: only a turn left held waits this long


def completes(fn: Callable[[], object]) -> object:
    """`fn()` run in another thread, which must end within WAIT_S (a lock left held by this one blocks it)."""
    got: list = []
    t = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), "a call from another thread waited for a turn this thread never ended"
    assert got, "the other thread's call failed"
    return got[0]


def usable(llm: LLM) -> None:
    """Another thread's call runs, and so does this thread's (refused as one inside its own turn while it held the
    lock)."""
    assert len(completes(lambda: llm.generate([[5, 6, 7]], SP))[0].token_ids) == 2
    assert len(llm.generate([[5, 6, 7]], SP)[0].token_ids) == 2


def nothing_left(llm: LLM) -> None:
    """With no call open, every output box and every request still in the engine is one recorded for the next step
    to drop or abort (an interrupted clean-up left boxes behind, and requests decoding unread to their end); and after
    a step (`usable`) none is left at all."""
    aborted = {s.request_id for s in llm.engine._aborts}  # not running: the next step frees them
    dropped = set(getattr(llm, "_dropped", ())) | aborted
    assert set(llm._boxes) <= dropped, f"boxes nobody reads: {sorted(set(llm._boxes) - dropped)}"
    assert set(llm.engine.seqs) <= dropped, f"requests nobody reads: {sorted(set(llm.engine.seqs) - dropped)}"
    usable(llm)
    assert not llm._boxes and not llm.engine.seqs, (dict(llm._boxes), list(llm.engine.seqs))


def each_point(
    setup: Callable[[], None],
    call: Callable[[], object],
    check: Callable[[], None],
    files: tuple[str, ...] = (),
) -> int:
    """interrupt_points.each_point in llm.py's frames (the turn's code and its callers) and `files`'."""
    return interrupt_points.each_point(setup, call, check, (llm_module.__file__, *files))


@pytest.fixture
def llm(tiny_llama):
    return LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))


@pytest.mark.parametrize("call", ["logits", "hold_engine", "generate", "stream", "stream_close"])
def test_ctrl_c_at_any_point_of_a_turn_leaves_the_llm_usable(llm, call):
    streams: list[Iterator] = []

    def setup() -> None:  # a stream past its first token, opened before the interrupt is armed
        streams.clear()
        if call.startswith("stream"):
            streams.append(llm.stream_outputs([5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True)))
            next(streams[0])

    def hold() -> None:
        with llm.hold_engine() as engine:
            assert not engine.closed

    calls = {
        "logits": lambda: llm.logits([5, 6]),
        "hold_engine": hold,
        "generate": lambda: llm.generate([[5, 6, 7]], SP),
        "stream": lambda: next(streams[0]),
        "stream_close": lambda: streams[0].close(),
    }

    def check() -> None:
        if streams:
            streams.pop().close()  # an interrupted stream's request aborted, as the chat REPL does
        nothing_left(llm)

    # hold_engine's `with` is contextlib's: one landing there leaves the turn to the generator it holds, given back
    # as that KeyboardInterrupt is dropped (its traceback held it)
    files = (contextlib.__file__,) if call == "hold_engine" else ()
    assert each_point(setup, calls[call], check, files) > 10


@pytest.mark.parametrize("call", ["generate", "stream", "stream_close", "add"])
def test_ctrl_c_in_a_call_loses_no_token_of_another_open_stream(llm, call):
    """A stream open beside an interrupted call gets every token it gets without the interrupt (one landing after
    `engine.step()` returned lost that step's outputs of every request: a missing token, or "ended unseen")."""
    other = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    want = llm.generate([[9, 10, 11]], other)[0].token_ids
    streams: dict[str, Iterator] = {}
    got: list[int] = []

    def setup() -> None:  # the other stream past its first token, and the interrupted one's
        got.clear()
        streams["other"] = llm.stream_outputs([9, 10, 11], other)
        got.extend(next(streams["other"]).token_ids)
        streams["mine"] = llm.stream_outputs([5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True))
        if call != "add":
            next(streams["mine"])

    calls = {
        "generate": lambda: llm.generate([[5, 6, 7]], SP),
        "stream": lambda: next(streams["mine"]),
        "stream_close": lambda: streams["mine"].close(),
        "add": lambda: next(streams["mine"]),  # the interrupted call adds its request, then steps
    }

    def check() -> None:
        streams.pop("mine").close()
        got.extend(t for out in streams.pop("other") for t in out.token_ids)
        assert got == want, f"the other stream got {got}, {want} without the interrupt"
        nothing_left(llm)

    assert each_point(setup, calls[call], check) > 10


@pytest.mark.parametrize("how", ["finished", "refused", "stream"])
def test_a_clean_up_record_aborts_no_later_request_of_its_id(llm, how):
    """A request of this LLM that ended (or was refused) leaves its id free: another caller's request under it ran
    until the next step aborted it, as the clean-up's record of the id was kept until then."""
    if how == "finished":
        rid = llm.generate([[5, 6, 7]], SP)[0].request_id
    elif how == "stream":
        rid = list(llm.stream_outputs([5, 6, 7], SP))[-1].request_id
    else:  # refused by add_request, after `_add` took its id: the clean-up recorded it all the same
        with pytest.raises(InvalidRequestError, match="stop_token_ids"):
            llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, stop_token_ids=[10**6]))
        (rid,) = llm._dropped
    theirs = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with llm.hold_engine() as engine:
        engine.add_request([9, 10, 11], theirs, request_id=rid)
    assert len(llm.generate([[5, 6]], SP)[0].token_ids) == 2  # steps the engine, theirs beside it
    with llm.hold_engine() as engine:
        assert rid in engine.seqs, f"{rid} was aborted by a stale record of this LLM's request of that id"
        ends = [o.finish_reason for _ in range(16) for o in engine.step() if o.finished]
    assert ends == ["length"]
    assert not llm._boxes


def test_an_interrupted_generate_aborts_none_of_its_finished_ids(llm, monkeypatch):
    """A generate cut short after one of its requests ended aborts only those still running: the ended one's id is
    free, and another caller's request under it (here added mid-step, as a signal handler could) runs on (until
    2026-12-07 the clean-up aborted the whole batch's ids)."""
    theirs = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    short, long = (SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (1, 6))
    step_into = llm.engine.step_into
    state: dict[str, str] = {}

    def step_then_interrupt(
        into,
    ) -> None:  # the step after the short request ended: theirs added, then Ctrl-C
        ended = [o.request_id for o in into if o.finished]
        if state.get("ended") and not state.get("added"):
            state["added"] = state["ended"]
            llm.engine.add_request([9, 10, 11], theirs, request_id=state["ended"])
            raise KeyboardInterrupt
        step_into(into)
        if not state.get("ended"):
            state["ended"] = next(
                (o.request_id for o in into if o.finished and o.request_id not in ended), ""
            )

    monkeypatch.setattr(llm.engine, "step_into", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7], [5, 6, 8]], [short, long])
    monkeypatch.setattr(llm.engine, "step_into", step_into)
    rid = state["added"]
    assert rid and rid in llm.engine.seqs, f"{rid}, another caller's request now, was aborted by the clean-up"
    assert len(llm.generate([[5, 6]], SP)[0].token_ids) == 2  # the next step drops the clean-up's record
    with llm.hold_engine() as engine:
        assert rid in engine.seqs, f"{rid} was aborted by the record of this LLM's ended request"
        ends = [o.finish_reason for _ in range(16) for o in engine.step() if o.finished]
    assert ends == ["length"] and not llm._boxes


def test_ctrl_c_in_engine_close_is_finished_by_closing_again(tiny_llama):
    """LLMEngine.close cut short (here: as it stops the tensor-parallel workers) is completed by a second close (it
    returned at once, as on a closed engine: the workers ran on)."""
    made: list[LLM] = []

    class Workers:  # a tensor-parallel group's close, as engine/tp_group.WorkerGroup's
        stopped = False

        def close(self) -> None:
            self.stopped = True

        def fault(self) -> None:
            return None

    def setup() -> None:
        made.append(LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16)))
        made[-1].engine._group = Workers()

    def check() -> None:
        engine, workers = made[-1].engine, made[-1].engine._group
        engine.close()
        assert engine.closed and not hasattr(engine, "runner")
        assert workers is None or workers.stopped, "the workers were never stopped"

    close = lambda: made[-1].engine.close()  # noqa: E731
    assert each_point(setup, close, check, (llm_engine.__file__,)) > 2


def test_a_turn_entered_outside_the_lock_is_refused(llm):
    """`with llm._call():`, the form from before the lock came first, would run a call unlocked beside other
    threads' steps: it raises instead."""
    with pytest.raises(RuntimeError, match="inside its LLM's lock"), llm._call():
        pass
    assert len(llm.generate([[5, 6, 7]], SP)[0].token_ids) == 2


def test_ctrl_c_at_any_point_of_close_still_closes(tiny_llama):
    """An interrupted close is done by closing again (or the next turn's end); it never leaves the lock held."""
    made: list[LLM] = []

    def check() -> None:
        completes(made[-1].close)
        assert made[-1].engine.closed
        with pytest.raises(LServeError, match="was closed"):
            made[-1].logits([5, 6])

    def setup() -> None:
        made.append(LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16)))

    assert each_point(setup, lambda: made[-1].close(), check) > 5


def test_chat_ctrl_c_at_any_point_of_a_reply_keeps_the_repl_answering(llm, monkeypatch, capsys, tmp_path):
    """Ctrl-C during a reply stops it and the next question is answered, wherever it lands in the reply's turns
    (one landing as a token's turn began left the turn marked busy: every later message was refused in one
    "called inside one of its own steps" line)."""
    from lserve_lite import cli

    typed: list[str] = []
    monkeypatch.setenv("HOME", str(tmp_path))  # the REPL's history file
    monkeypatch.setattr(cli, "_read_line", lambda prompt="": typed.pop(0))
    monkeypatch.setattr(cli, "_make_llm", lambda args: llm)
    argv = ["chat", "--model", "tiny", "--backend", "cpu", "--max-new-tokens", "3"]

    def check() -> None:
        err = capsys.readouterr().err
        assert "error:" not in err and err.count("tokens, first after") == 2, err[-2000:]
        usable(llm)

    assert each_point(lambda: typed.extend(["hi", "again", "/exit"]), lambda: cli.main(argv), check) > 10
