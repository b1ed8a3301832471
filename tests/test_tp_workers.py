"""The tensor-parallel driver with real worker processes on the CPU backend (shared-memory stand-in for NCCL):
greedy output equal to the in-process engine's, and supervision: a worker that dies, fails at load or hangs
ends the engine with one clear error, never a hang."""

from __future__ import annotations

import _signal
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig
from lserve_lite.engine import tp_group
from lserve_lite.errors import InvalidRequestError, LServeError, TensorParallelError

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
PROMPTS = ["hello world", "the quick brown fox"]


@pytest.fixture(autouse=True)
def python_handles_ctrl_c():
    """Python's SIGINT handler for each test: a shell that starts pytest in the background without job control
    (`(cmd &)` in a script) leaves SIGINT ignored, and a hold then has no Ctrl-C to hold (the Ctrl-C tests failed)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def tp_llm(path, world: int = 2, **kw) -> LLM:
    return LLM(str(path), backend="cpu", config=EngineConfig(tensor_parallel=world, **kw))


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """fn started on a daemon thread (one that may block forever must not hold pytest), and the list its exception
    lands in, for the test to assert on once it has joined."""
    err: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, err


def test_workers_greedy_equal_in_process(tiny_dir):
    one = LLM(str(tiny_dir), backend="auto")  # this host has no GPU
    want = [o.token_ids for o in one.generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert llm.engine.blocks.num_used == 0  # every page back after the requests
        # what the model runs on (the server's start line, bench): the driver's own Ops are the host's, and
        # said "cpu" for ranks on GPUs
        assert (one.engine.backend, llm.engine.backend) == ("cpu", "cpu, tensor parallel 2")
    finally:
        llm.engine.runner.executor.close()


def test_workers_quantized_kv(tiny_dir):
    """--kv-dtype with --tensor-parallel: the workers hold int8 pages (greedy output equal to the in-process int8
    engine), the driver reports their format and sizes the pools by the real bytes of a page (within every
    rank's budget), and a dtype the workers' backend lacks is refused in one line."""
    from lserve_lite.kv.layout import page_bytes
    from lserve_lite.kv.quant import FORMATS
    from lserve_lite.weights.shard import shard_config, shard_of

    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu", config=EngineConfig(kv_dtype="int8"))
            .generate(PROMPTS, GREEDY)]  # fmt: skip
    llm = tp_llm(tiny_dir, kv_dtype="int8")
    try:
        eng, group = llm.engine, llm.engine.runner.executor
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert eng.kv_format.name == "int8" and eng.kv_bytes == FORMATS["int8"].kv_bytes(eng.cfg.head_dim, 4)
        for rank, budget in enumerate(group.budgets):
            shard = shard_config(eng.cfg, shard_of(eng.cfg, rank, 2))
            dense, _ = page_bytes(shard, eng.ecfg.page_size, eng.kv_bytes, None, 4)
            assert eng.blocks.num_pages * dense <= budget
        assert "int8" in eng.kv_summary()
    finally:
        llm.engine.runner.executor.close()
    # workers compiling for a generic x86-64 (no fp16 conversions) lack fp16 KV (cpu_half.py)
    with (
        pytest.MonkeyPatch.context() as mp,
        pytest.raises(TensorParallelError, match=r"worker \d failed: kv_dtype fp16 is not available here"),
    ):
        mp.setenv("NUMBA_CPU_NAME", "generic")
        tp_llm(tiny_dir, kv_dtype="fp16")


def test_cpu_ranks_share_the_hosts_kv_budget(tiny_dir):
    """CPU ranks share one host: each took the whole fixed CPU budget (2 GiB x kv_memory_fraction / 0.8) and the
    whole memory limit, so N ranks held N times the KV memory of one process (and N times its pages, the page of a
    rank holding 1/N of the heads). The budget and limit are the group's: each rank has 1/N of them."""
    from lserve_lite.backends.cpu import CpuOps

    ops, frac = CpuOps(), 0.01  # a budget well under the pool's page cap
    one = LLM(str(tiny_dir), backend="cpu", config=EngineConfig(kv_memory_fraction=frac))
    llm = tp_llm(tiny_dir, kv_memory_fraction=frac)
    try:
        group = llm.engine.runner.executor
        assert sum(group.budgets) <= ops.kv_budget_bytes(frac) and len(set(group.budgets)) == 1
        assert sum(group.limits) <= ops.kv_limit_bytes()
        assert llm.engine.blocks.num_pages == one.engine.blocks.num_pages
    finally:
        llm.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc")
def test_closed_llm_kept_holds_no_descriptors(tiny_dir):
    """A closed LLM still referenced (kept in a list, a REPL's `_`) held three file descriptors a rank (its pipe and
    its process's two), so a process that re-created its LLM ran out of them; after close the group holds none."""
    # the first also opens what stays for the process (the resource tracker's pipe, the Barrier's heap)
    first = tp_llm(tiny_dir)
    first.close()
    before = _open_fds()
    kept = tp_llm(tiny_dir)
    kept.close()
    assert _open_fds() == before and kept.engine.fault() is not None  # no step can run any more


def test_fault_asked_while_the_group_closes(tiny_dir, monkeypatch):
    """`fault` (the server's /health, any thread) asked while the group closes: the processes it waits on stay its own
    (the closed group lets go of them: their sentinels were closed under the wait and the lookup found no worker)."""
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    real = tp_group.wait

    def closing_meanwhile(objs, timeout=None):
        group.close()
        return real(objs, timeout)

    monkeypatch.setattr(tp_group, "wait", closing_meanwhile)
    assert re.search(r"worker \d \(pid \d+\) has exited", group.fault())


@pytest.mark.parametrize("at", ["waiting", "reply read"])
def test_closed_by_another_thread_mid_step(tiny_dir, monkeypatch, at):
    """The group closed by another thread while a step waits on the ranks (the server's shutdown, once its 30 s join
    of a step that runs longer has passed): the step raised IndexError (the closed group's emptied worker lists), or,
    with its reply read just before, returned logits read from the closed block (NumPy made a fresh uninitialized
    array of it), which were sampled. The step ends with the group's reason; the close raises nothing."""
    from lserve_lite.engine.llm_engine import LLMEngine

    eng = LLMEngine(str(tiny_dir), "cpu", EngineConfig(tensor_parallel=2))
    group = eng.runner.executor
    in_step, closed = threading.Event(), threading.Event()
    outs: list = []  # what the first step, the one the close lands in, returned
    if at == "waiting":  # rank 1 stopped: rank 0 waits in its all-reduce, the driver for its reply
        os.kill(group.procs[1].pid, signal.SIGSTOP)
        real = tp_group.wait

        def hook(*a, **k):
            if threading.current_thread() is not threading.main_thread() and not in_step.is_set():
                in_step.set()
                closed.wait(60)
            return real(*a, **k)

        monkeypatch.setattr(tp_group, "wait", hook)
    else:
        real = group._recv

        def hook(rank: int, timeout: float) -> tuple:
            msg = real(rank, timeout)
            if msg[0] == "logits":
                in_step.set()
                closed.wait(60)
            return msg

        monkeypatch.setattr(group, "_recv", hook)

    def steps() -> None:
        eng.add_request("hello world", GREEDY)
        while eng.has_unfinished():
            outs.extend(eng.step())

    t, err = in_thread(steps)
    try:
        assert in_step.wait(60)
        group.close()
    finally:
        closed.set()
        t.join(60)
    assert not t.is_alive() and len(err) == 1, err
    assert isinstance(err[0], TensorParallelError) and "it was closed" in str(err[0]), repr(err[0])
    assert outs == []  # no token sampled from a closed block


def test_killed_worker_ends_the_engine(tiny_dir):
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    os.kill(group.procs[1].pid, signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"worker 1 \(pid \d+\) died \(killed by SIGKILL\)"):
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - t < 10
    assert not any(p.is_alive() for p in group.procs)  # rank 0, blocked in its all-reduce, was ended too
    with pytest.raises(TensorParallelError, match="engine stopped"):
        llm.generate(PROMPTS, GREEDY)  # stays stopped


def test_hung_worker_times_out(tiny_dir, monkeypatch):
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 2.0)
    os.kill(group.procs[1].pid, signal.SIGSTOP)
    with pytest.raises(TensorParallelError, match=r"worker 0 sent nothing for 2 s \(hung\)"):
        llm.generate(PROMPTS, GREEDY)
    assert not any(p.is_alive() for p in group.procs)


def test_worker_load_error_is_reported(tiny_dir):
    """int8 down_proj (input 96) split in 2 falls off its 32-value blocks: refused by the workers, one line."""
    with pytest.raises(
        TensorParallelError, match=r"worker \d failed: tensor_parallel 2: .*down_proj.weight is int8"
    ):
        tp_llm(tiny_dir, quantize="int8")


def test_config_checks_before_start(tiny_dir):
    with pytest.raises(InvalidRequestError, match=r"tensor_parallel 3 must divide num_attention_heads \(4\)"):
        tp_llm(tiny_dir, world=3)
    with pytest.raises(InvalidRequestError, match=r"tensor_parallel must be an integer in \[1, 64\], got 0"):
        EngineConfig(tensor_parallel=0)


def test_shared_memory_room_checked_before_start(tiny_dir, monkeypatch):
    """A /dev/shm too small for the logits block (Docker's 64 MB vs a large batch and vocabulary) is refused in
    one line before any block or worker exists, not met by SIGBUS in rank 0."""
    monkeypatch.setattr(tp_group, "shm_free_bytes", lambda: 1 << 20)
    with pytest.raises(
        LServeError,
        match=r"needs 8.1 MB of shared memory.*1.0 MB are free: .*lower max_num_seqs \(--max-num-seqs",
    ):  # every command that takes --tensor-parallel takes --max-num-seqs (chat, generate and bench since 2026-12-07)
        tp_llm(tiny_dir)
    logits = tp_group.logits_block(256, 128_256)
    with pytest.raises(LServeError, match=r"--shm-size"):
        tp_group.check_shm_room([logits], 64 << 20)
    tp_group.check_shm_room([logits], logits.size)
    tp_group.check_shm_room([logits], None)


def test_shared_memory_room_counts_only_blocks_made(tiny_dir, monkeypatch):
    """GPU ranks (NCCL) make no exchange block in /dev/shm: the check counted the CPU stand-in's 4 MB a rank for them
    too, refusing 8 GPUs with a 152k vocabulary (Qwen2) in Docker's 64 MB that needed only their 37 MB of logits. With
    room for the logits alone, a CUDA start goes on to its own check (here: no GPU)."""
    from lserve_lite.backends.comm import ShmCommunicator

    logits = 64 * 320 * 4  # max_num_seqs x the tiny model's vocabulary x 4 bytes
    monkeypatch.setattr(tp_group, "shm_free_bytes", lambda: logits)
    with pytest.raises(LServeError, match=r"needs 2 GPUs"):
        LLM(str(tiny_dir), backend="cuda", config=EngineConfig(tensor_parallel=2))
    monkeypatch.setattr(tp_group, "shm_free_bytes", lambda: logits + 2 * ShmCommunicator.SLOT_BYTES - 1)
    with pytest.raises(LServeError, match=r"MB of shared memory"):  # the CPU ranks' blocks are made: counted
        tp_llm(tiny_dir)


SEQS = "max_num_seqs (--max-num-seqs, EngineConfig's max_num_seqs)"


def test_shared_memory_advice_names_every_setting_that_shrinks_the_blocks(tiny_dir, monkeypatch):
    """The refusal named max_num_seqs alone, though the CPU ranks' exchange block (4 MB a rank) grows with
    tensor_parallel and the logits with the vocabulary: it names each block's size, what drives it and the setting
    that shrinks it, beside the needed and free bytes; GPU ranks make no exchange block and are told of none. Every
    command that takes --tensor-parallel takes --max-num-seqs (chat, generate and bench since 2026-12-07)."""
    logits = 64 * 320 * 4  # max_num_seqs x the tiny model's vocabulary x 4 bytes
    monkeypatch.setattr(tp_group, "shm_free_bytes", lambda: 1 << 20)
    with pytest.raises(LServeError) as e:
        tp_llm(tiny_dir)
    line = str(e.value)
    assert "\n" not in line and "needs 8.1 MB of shared memory in /dev/shm, 1.0 MB are free" in line
    assert "rank 0's logits 0.1 MB (max_num_seqs 64 x vocabulary 320 x 4 bytes)" in line
    assert "the CPU ranks' exchange block 8.0 MB (2 ranks x 4 MB)" in line
    assert f"lower {SEQS} or tensor_parallel" in line
    assert line.endswith("or give /dev/shm more room (e.g. docker run --shm-size)")
    monkeypatch.setattr(tp_group, "shm_free_bytes", lambda: logits - 1)
    with pytest.raises(LServeError) as e:  # NCCL: the logits block alone, refused before the GPUs are counted
        LLM(str(tiny_dir), backend="cuda", config=EngineConfig(tensor_parallel=2))
    line = str(e.value)
    assert "needs 0.1 MB" in line and "exchange" not in line and "tensor_parallel" not in line
    assert f"lower {SEQS} or give" in line


def test_refused_logits_block_leaves_no_group_block(tiny_dir, monkeypatch):
    """The logits block refused by the system (out of file descriptors, memory) after the group's exchange block was
    made: that block stayed in /dev/shm for the life of the process (4 MB a rank, a start that is retried)."""
    from multiprocessing import shared_memory

    made: list[str] = []
    real_group, real_shm = tp_group.new_group, shared_memory.SharedMemory

    def new_group(*a):
        spec, cleanup = real_group(*a)
        made.append(spec.shm_name)
        return spec, cleanup

    def refused(*a, create: bool = False, **k):  # the group's block is made, the logits block after it is not
        if create and made:
            raise OSError(24, "Too many open files")
        return real_shm(*a, create=create, **k)

    monkeypatch.setattr(tp_group, "new_group", new_group)
    monkeypatch.setattr(tp_group.shared_memory, "SharedMemory", refused)
    with pytest.raises(OSError, match="Too many open files"):
        tp_llm(tiny_dir)
    assert len(made) == 1
    with pytest.raises(FileNotFoundError):
        real_shm(name=made[0])


@pytest.mark.parametrize("block", [0, 1])
def test_shared_memory_taken_meanwhile_fails_the_block_cleanly(tiny_dir, monkeypatch, block):
    """/dev/shm filled by another process between the room check and the blocks: a block was made sparse all the same
    and its first writer died of SIGBUS. Taking its pages (here refused, ENOSPC, for the group's exchange block or
    rank 0's logits block) fails in one line, and neither block stays in /dev/shm."""
    import errno

    from lserve_lite.backends import comm

    taken: list[str] = []
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, size: int) -> None:
        taken.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(taken) > block:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(comm.os, "posix_fallocate", fallocate)
    # each block's advice names the setting that shrinks it: the exchange block (world x 4 MB) said "lower
    # max_num_seqs", which leaves it as it is
    what, shrink = (
        (r"the CPU ranks' exchange block \(2 ranks x 4 MB;", r"tensor_parallel \(--tensor-parallel"),
        (
            r"rank 0's logits \(max_num_seqs 64 x vocabulary 320 x 4 bytes;",
            r"max_num_seqs \(--max-num-seqs",
        ),
    )[block]
    match = rf"shared memory in /dev/shm ran out while taking [\d.]+ MB for {what} .*: lower {shrink}"
    with pytest.raises(LServeError, match=match) as e:
        tp_llm(tiny_dir)
    assert "\n" not in str(e.value)
    assert len(taken) == block + 1 and all(p.startswith("/dev/shm/") for p in taken), taken
    assert not any(os.path.exists(p) for p in taken), taken


def test_layout_clipped_to_the_pool_as_in_process(tiny_dir):
    """LServe's page budget is clipped to the context the pools hold (fit_context) on both paths: the driver
    used to keep the budget cut only to the model's context (128 pages here, 87 held), so its selection slots were dead memory and
    the engines differed. A rank holds half the KV heads in half the budget (CPU ranks share the host's), so the
    same kv_memory_fraction gives the same pool."""
    sp = SparseConfig(enabled=True, static_sparsity=0.0, page_size=16, prefill_sink=16, prefill_local=32,
                      decode_sink=16, decode_local=32, token_budget=4096)  # fmt: skip
    one = LLM(
        str(tiny_dir), backend="cpu", config=EngineConfig(page_size=16, sparse=sp, kv_memory_fraction=2e-4)
    )
    llm = tp_llm(tiny_dir, page_size=16, sparse=sp, kv_memory_fraction=2e-4)
    try:
        assert llm.engine.max_len == one.engine.max_len < 4096
        assert llm.engine.layout.select_pages == one.engine.layout.select_pages == one.engine.max_len // 16
        assert repr(llm.engine.layout) == repr(one.engine.layout)
        assert llm.engine.runner.layout is llm.engine.layout
    finally:
        llm.engine.runner.executor.close()


def test_cli_option():
    from lserve_lite.cli import build_parser
    from lserve_lite.engine_args import engine_config_from_args

    args = build_parser().parse_args(["generate", "--prompt", "x", "--tensor-parallel", "2"])
    assert engine_config_from_args(args).tensor_parallel == 2
    args = build_parser().parse_args(["serve", "--tensor-parallel", "4"])
    assert engine_config_from_args(args).tensor_parallel == 4


def test_interrupted_step_does_not_shift_replies(tiny_dir, monkeypatch):
    """Ctrl-C while the driver waits for a step's logits (chat: "Ctrl-C stops a reply") leaves that reply in the
    pipe; the next step must not take it for its own (the chat's next reply came from stale logits)."""
    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(tp_group, "wait", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert llm.engine.blocks.num_used == 0
    finally:
        llm.engine.runner.executor.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_workers_ignore_ctrl_c(tiny_dir, sig):
    """Ctrl-C reaches the terminal's whole process group, workers too: the driver decides what it stops. SIGTERM too
    reaches a whole group or cgroup (systemd's stop, a shell's `kill %1`, `timeout`): it killed the workers, so a
    server that drains its requests on SIGTERM failed them with 503 (one process finished them)."""
    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    try:
        for p in group.procs:
            os.kill(p.pid, sig)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert all(p.is_alive() for p in group.procs)
    finally:
        group.close()


def test_worker_bug_is_one_line(tiny_dir):
    """An unexpected exception in a worker ends the engine with one line naming it (the whole traceback, which
    the server passed on to clients as its 503 reason, goes to the worker's stderr)."""
    llm = tp_llm(tiny_dir)
    with pytest.raises(TensorParallelError) as err:
        llm.engine.runner.executor.run(None)  # not a step: the worker's runner fails on it
    assert "\n" not in str(err.value) and re.search(r"worker \d failed: AttributeError: ", str(err.value))


def test_server_stops_its_workers(tiny_dir):
    """The server's shutdown stops the workers itself: after SIGTERM it re-raises the signal and dies by it, and
    the group's exit hook never runs (the resource tracker then warned of leaked shared memory)."""
    pytest.importorskip("fastapi")
    from lserve_lite.serve.app import ServerThread, create_app

    llm = tp_llm(tiny_dir)
    # the closed engine lets its runner go, and the closed group its processes
    procs = llm.engine.runner.executor.procs
    with ServerThread(create_app(llm.engine)):
        pass
    assert len(procs) == 2 and not any(p.is_alive() for p in procs)


def test_chat_ends_when_a_worker_died(tiny_dir, monkeypatch, capsys):
    """`lserve-lite chat` whose worker died: one error line and status 1. It prompted on, failing every message with
    the same error, and exited 0 at the end of its input."""
    from lserve_lite import cli

    llm = tp_llm(tiny_dir)
    proc = llm.engine.runner.executor.procs[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    lines = iter(["hello", "again"])
    monkeypatch.setattr(cli, "_make_llm", lambda args: llm)
    monkeypatch.setattr(cli, "_read_line", lambda prompt="": next(lines))
    args = cli.build_parser().parse_args(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4"])
    try:
        assert cli.cmd_chat(args) == 1
    finally:
        llm.close()
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "worker 1" in err and next(lines) == "again", err


def test_server_health_reports_a_dead_worker(tiny_dir):
    """/health is 503 once a worker has died, even before a request finds it (it said "ok" while every request
    failed, so a supervisor never restarted the server)."""
    pytest.importorskip("fastapi")
    import httpx

    from lserve_lite.serve.app import ServerThread, create_app

    llm = tp_llm(tiny_dir)
    with ServerThread(create_app(llm.engine)) as url:
        assert httpx.get(url + "/health", timeout=60).status_code == 200
        proc = llm.engine.runner.executor.procs[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        r = httpx.get(url + "/health", timeout=60)
        assert r.status_code == 503 and "worker 1" in r.json()["error"]["message"]


def test_server_logs_a_dead_worker_in_one_line(tiny_dir, caplog):
    """Requests to a server whose worker died: 503 with the reason, and the log says it in one line a request (each
    logged a traceback, the broken pipe's under the engine's, as for a bug)."""
    pytest.importorskip("fastapi")
    import httpx

    from lserve_lite.serve.app import ServerThread, create_app

    llm = tp_llm(tiny_dir)
    with ServerThread(create_app(llm.engine)) as url:
        proc = llm.engine.runner.executor.procs[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 503 and "worker 1" in r.json()["error"]["message"]
    failed = [rec for rec in caplog.records if "worker 1" in rec.getMessage()]
    assert len(failed) == 2 and not any(rec.exc_info for rec in caplog.records), caplog.text


def test_cli_sigterm_stops_workers_cleanly(tiny_dir):
    """SIGTERM to `lserve-lite generate --tensor-parallel 2`: status 143, the workers stopped and their shared
    memory released by the command itself (it died outright, and the resource tracker warned of leaks)."""
    import subprocess
    import sys

    argv = ["generate", "--model", str(tiny_dir), "--backend", "cpu", "--tensor-parallel", "2", "--prompt", "hi",
            "--max-new-tokens", "100000", "--temperature", "0"]  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "lserve_lite.cli", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout.read(1)  # generating
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err.decode()
    assert "leaked" not in err.decode() and "Traceback" not in err.decode(), err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_between_ranks_sends_to_all_or_none(tiny_dir, monkeypatch, sig):
    """Ctrl-C landing while a step is being sent, after rank 0 has it and before rank 1 does: every rank gets the
    step (the interrupt is raised once all have it), so the ranks stay in step. Rank 1 used to miss it: rank 0
    paired its collectives with rank 1's next step (wrong logits) and then waited for rank 1 forever. SIGTERM,
    which the CLI turns into SystemExit (cli._terminate), is held the same way: it tore the message as well."""
    from lserve_lite.cli import _terminate

    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 20.0)  # the old code hung here: fail, not wait 600 s
    real = group._write  # one rank's framed message
    sent: list[str] = []

    def write(rank: int, data: bytes) -> None:
        msg = pickle.loads(data[4:])
        if (
            rank == 1 and msg[0] == "step" and not sent
        ):  # Ctrl-C (SIGTERM) arrives (to this thread) between the two ranks
            sent.append(msg[0])
            signal.raise_signal(sig)
        real(rank, data)

    old = signal.signal(signal.SIGTERM, _terminate)  # the CLI's handler
    try:
        monkeypatch.setattr(group, "_write", write)
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit) as err:
            llm.generate(PROMPTS, GREEDY)
        assert sent and (sig == signal.SIGINT or err.value.code == 143)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert llm.engine.blocks.num_used == 0
    finally:
        signal.signal(signal.SIGTERM, old)
        group.close()


def test_ctrl_c_in_page_ops_reaches_every_rank(tiny_dir, monkeypatch):
    """Every page op (a clear of pages handed out, a snapshot copy) reaches every rank, in order, even with Ctrl-C
    landing in the first one's send to rank 1: rank 1 used to miss that op, and the ops after it, taken from the
    block manager, were lost on every rank."""
    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    eng, group = llm.engine, llm.engine.runner.executor
    got: list[list] = [[], []]
    real = group._write  # one rank's framed message

    def write(rank: int, data: bytes) -> None:
        msg = pickle.loads(data[4:])
        if msg[0] in ("copy", "clear"):
            if rank == 1 and not got[1]:
                signal.raise_signal(signal.SIGINT)
            got[rank].append((msg[0], msg[1].tolist(), msg[2].tolist()))
        real(rank, data)

    monkeypatch.setattr(group, "_write", write)
    try:
        eng.blocks.page_ops += [("clear", [1, 2], []), ("clear", [3], [])]
        with pytest.raises(KeyboardInterrupt):
            eng.step()
        assert got[0] == got[1] == [("clear", [1, 2], []), ("clear", [3], [])]
        # a generation's clears too, the same on both ranks
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert got[0] == got[1] and len(got[0]) > 2
    finally:
        group.close()


def test_ctrl_c_held_defers_and_nests():
    """interrupts.ctrl_c_held: a SIGINT inside is raised once the outermost block ends; handlers are put back."""
    from lserve_lite.engine.interrupts import ctrl_c_held, ctrl_c_pending

    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            with ctrl_c_held():
                signal.raise_signal(signal.SIGINT)
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"] and signal.getsignal(signal.SIGINT) is before
    # a Ctrl-C held is the main thread's: an engine stepping in another thread does not give up on it
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            signal.raise_signal(signal.SIGINT)
            t = threading.Thread(target=lambda: seen.append(ctrl_c_pending()))
            t.start()
            t.join()
            seen.append(ctrl_c_pending())
    assert seen == [False, True] and not ctrl_c_pending()


def test_sigterm_held_as_ctrl_c_is():
    """SIGTERM with a Python handler (the CLI's SystemExit) is held as Ctrl-C is, and handled first when both came
    (a KeyboardInterrupt, which the chat CLI takes as "stop the reply", dropped it); left to the system, it is
    not swapped."""
    from lserve_lite.cli import _terminate
    from lserve_lite.engine.interrupts import ctrl_c_held

    before = signal.getsignal(signal.SIGINT)
    old = signal.signal(signal.SIGTERM, _terminate)
    done = []
    try:
        with pytest.raises((SystemExit, KeyboardInterrupt)) as err:
            with ctrl_c_held():
                with ctrl_c_held():
                    signal.raise_signal(signal.SIGINT)
                    signal.raise_signal(signal.SIGTERM)
                    done.append("inner")
                done.append("outer")
        assert done == ["inner", "outer"] and err.type is SystemExit and err.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is _terminate and signal.getsignal(signal.SIGINT) is before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with ctrl_c_held():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("at", ["hold", "release"])
def test_signal_between_handler_swaps_leaves_none_swapped(monkeypatch, at):
    """A signal landing between the hold's two handler swaps (Python runs a pending signal's handler inside
    signal.signal, before the change): its exception left the other signal's handler the hold's recorder for
    good, so SIGTERM did nothing from then on and no later hold held Ctrl-C (taken for a nested hold)."""
    from lserve_lite.cli import _terminate
    from lserve_lite.engine.interrupts import ctrl_c_held

    real = _signal.signal  # what interrupts.ctrl_c_held swaps handlers with
    before = signal.getsignal(signal.SIGINT)
    old = real(signal.SIGTERM, _terminate)
    swaps: list[int] = []

    def swap(s: int, h: object) -> object:  # the other signal comes just after the first swap of `at`
        out = real(s, h)
        swaps.append(s)
        if len(swaps) == (1 if at == "hold" else 3):
            signal.raise_signal(signal.SIGINT if at == "hold" else signal.SIGTERM)
        return out

    try:
        monkeypatch.setattr(_signal, "signal", swap)
        with pytest.raises(KeyboardInterrupt if at == "hold" else SystemExit):
            with ctrl_c_held():
                pass
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) is _terminate and signal.getsignal(signal.SIGINT) is before
        with pytest.raises(KeyboardInterrupt), ctrl_c_held():  # the next hold holds Ctrl-C
            assert signal.getsignal(signal.SIGINT) is not before
            signal.raise_signal(signal.SIGINT)
    finally:
        real(signal.SIGTERM, old)
        real(signal.SIGINT, before)


def test_ctrl_c_mid_read_keeps_the_pipe_whole(tiny_dir, monkeypatch):
    """Ctrl-C after the driver has read a reply's length and before its body: the read completes first (the next
    read used to take the body's bytes for a length, and the pipe was garbage from there on)."""
    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 20.0)
    real = group._take  # the driver's read of n bytes of a rank's pipe: the length (4), then the body
    reads: list[int] = []

    def read(rank: int, n: int, *a):
        out = real(rank, n, *a)
        reads.append(n)
        if len(reads) == 1:
            signal.raise_signal(signal.SIGINT)
        return out

    try:
        monkeypatch.setattr(group, "_take", read)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS, GREEDY)
        assert reads[0] == 4
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    finally:
        group.close()


def test_driver_stopped_longer_than_the_step_timeout(tiny_dir, monkeypatch):
    """Ctrl-Z stops the driver and its ranks together (one process group): resumed (`fg`) after longer than the step
    timeout, the wait that spanned the stop returned with nothing yet, and the ranks were taken for hung (the reply
    ended the engine). Here the driver's first wait returns 60 s late with nothing, as after such a stop."""
    want = [o.token_ids for o in LLM(str(tiny_dir), backend="cpu").generate(PROMPTS, GREEDY)]
    llm = tp_llm(tiny_dir)
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 20.0)
    stop = [0.0]  # seconds the process "was stopped": what the clock has jumped

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + stop[0]

    real = tp_group.wait

    def wait(*a, **k):
        if not stop[0]:
            stop[0] = 60.0
            return []
        return real(*a, **k)

    monkeypatch.setattr(tp_group, "time", Clock)
    monkeypatch.setattr(tp_group, "wait", wait)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want and stop[0]
    finally:
        llm.close()


def test_hung_worker_times_out_on_a_large_message(tiny_dir, monkeypatch):
    """A rank that stops reading (hung) fills its pipe: a message larger than the pipe holds (a long prefill's
    step) then blocked the driver's send forever, past the step timeout that ends the engine for a small one."""
    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 2.0)
    os.kill(group.procs[1].pid, signal.SIGSTOP)
    pages = np.zeros(1 << 20, np.int64)  # 8 MB: page 0 cleared a million times
    t, err = in_thread(lambda: group.clear_pages(pages, pages[:0]))
    t.join(timeout=60)
    try:
        assert not t.is_alive(), "the driver's send blocked on a full pipe"
        assert isinstance(err[0], TensorParallelError)
        assert re.search(r"worker 1 read nothing for 2 s \(hung\)", str(err[0]))
        assert not any(p.is_alive() for p in group.procs)
    finally:
        if group.procs[1].exitcode is None:  # the old code: let it go on, so the group can stop
            os.kill(group.procs[1].pid, signal.SIGCONT)


def test_refused_at_sizing_stops_the_workers(tiny_dir, capfd):
    """A start refused once the workers are up (a KV budget that holds no page, num_kv_pages past a rank's memory)
    stops them at once, quietly: they lived on, each with its shard, while the error was referenced (a REPL keeps
    the last one), then each printed a traceback on taking the stop for its build."""
    import multiprocessing as mp

    with pytest.raises(InvalidRequestError, match="holds no KV page") as err:
        tp_llm(tiny_dir, kv_memory_fraction=1e-9)
    assert err.value is not None and not mp.active_children()
    assert "Traceback" not in capfd.readouterr().err


def test_ctrl_c_at_start_stops_the_workers(tiny_dir, monkeypatch):
    """Ctrl-C while the workers load (minutes for a large checkpoint) stops them at once: they lived on, loading,
    while the KeyboardInterrupt was referenced (a REPL keeps the last one)."""
    import multiprocessing as mp

    monkeypatch.setattr(tp_group, "wait", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as err:
        tp_llm(tiny_dir)
    assert err.value is not None and not mp.active_children()


def test_lserve_prefix_cache_equal_in_process(tiny_dir, tmp_path, monkeypatch):
    """LServe (a rank with only dense heads, one with only streaming heads) with the prefix cache, its page ops
    (snapshot copies, clears of pages handed out) on every rank: the same greedy outputs and cached-prompt counts
    as one process."""
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.sparse.patterns import save_pattern

    pat = str(save_pattern(tmp_path / "p.tsv", np.array([[1.0, 0.0], [1.0, 0.0]])))
    sp = SparseConfig(enabled=True, static_sparsity=0.5, prefill_sink=64, prefill_local=128, decode_sink=64,
                      decode_local=64, token_budget=256, pattern_path=pat)  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    rng = np.random.default_rng(0)
    base = rng.integers(3, 320, 300).tolist()
    prompts = [base + rng.integers(3, 320, 30).tolist() for _ in range(3)] + [base[:200]]
    got, kinds = [], set()
    for tp in (None, 2):
        eng = LLMEngine(str(tiny_dir), "cpu", EngineConfig(sparse=sp, num_kv_pages=20, max_num_seqs=3, tensor_parallel=tp,
                        max_num_batched_tokens=128))  # fmt: skip
        outs = []
        if tp:
            write = eng.runner.executor._write

            def counted(rank: int, data: bytes, write=write) -> None:
                kinds.add(pickle.loads(data[4:])[0])
                write(rank, data)

            monkeypatch.setattr(eng.runner.executor, "_write", counted)
        try:
            for _ in range(2):
                for p in prompts:
                    eng.add_request(p, params)
                while eng.has_unfinished():
                    outs += [(o.seq.output_ids[:], o.num_cached_tokens) for o in eng.step() if o.finished]
            assert eng.blocks.num_used == 0
        finally:
            eng.close()
        got.append(outs)
    assert got[0] == got[1] and sum(n for _, n in got[1]) > 0
    assert {"copy", "clear", "step"} <= kinds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_a_rank_reads_nothing(tiny_dir, monkeypatch, sig):
    """Ctrl-C while a message waits on a rank that reads nothing (hung) ends the engine within a second or so: the
    held interrupt kept the user waiting for the step timeout (600 s). A held SIGTERM too, and the engine's error
    names it (it said Ctrl-C)."""
    from lserve_lite.cli import _terminate

    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    monkeypatch.setattr(tp_group, "STEP_TIMEOUT", 20.0)
    os.kill(group.procs[1].pid, signal.SIGSTOP)
    real, calls = tp_group.select, []

    def select(*a):  # the write to rank 1 has filled its pipe: Ctrl-C now
        if not calls:
            signal.raise_signal(sig)
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(tp_group, "select", select)
    t = time.monotonic()
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    old = signal.signal(signal.SIGTERM, _terminate)  # the CLI's handler
    try:
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit) as err:
            group.clear_pages(np.zeros(1 << 20, np.int64), np.zeros(0, np.int64))
        assert time.monotonic() - t < 10
        assert re.search(rf"interrupted \({name}\) while worker 1 read nothing", str(err.value.__context__))
        assert not any(p.is_alive() for p in group.procs)
    finally:
        signal.signal(signal.SIGTERM, old)
        if group.procs[1].exitcode is None:
            os.kill(group.procs[1].pid, signal.SIGCONT)


def test_rank_stalled_mid_message_times_out(tiny_dir, monkeypatch):
    """A reply whose first bytes came and whose rest never comes (rank 0 stopped mid-send) ends the engine after the
    step timeout: the driver's read of the rest waited forever (Ctrl-C held too)."""
    import multiprocessing as mp
    import struct

    llm = tp_llm(tiny_dir)
    group = llm.engine.runner.executor
    mine, theirs = mp.Pipe()  # stands for rank 0's pipe, written by hand: a length, then part of the body
    monkeypatch.setattr(group, "conns", [mine, *group.conns[1:]])
    os.write(theirs.fileno(), struct.pack("!i", 1000) + b"x" * 10)
    t, err = in_thread(lambda: group._recv(0, 2.0))
    t.join(timeout=30)
    try:
        assert not t.is_alive(), "the driver's read waited for the rest forever"
        assert re.search(r"worker 0 sent nothing for 2 s \(hung\)", str(err[0]))
    finally:
        theirs.close()
        t.join(timeout=30)
        group.close()


def test_unguarded_script_is_named(tiny_dir, tmp_path):
    """A script that builds a tensor-parallel engine at import, without the `__main__` guard spawn needs (README):
    its workers die at start, and the error says why (it said only "died (exit code 1)")."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "from lserve_lite import LLM, EngineConfig\n"
        f"LLM({str(tiny_dir)!r}, backend='cpu', config=EngineConfig(tensor_parallel=2))\n"
    )
    import lserve_lite

    env = {**os.environ, "PYTHONPATH": str(Path(lserve_lite.__file__).parents[1])}  # this checkout's package
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    # multiprocessing's resource tracker may warn after the error, at its own exit, of semaphores the dying workers
    # left for it to clean up (CI saw it once in about six runs): its lines are Python's, not the engine's
    ours = [line for line in r.stderr.strip().splitlines() if "resource_tracker" not in line]
    last = ours[-1]
    assert r.returncode == 1 and "TensorParallelError" in last and "if __name__ == '__main__':" in last, last


def test_exit_with_the_llm_open_stops_its_workers(tiny_dir, tmp_path):
    """A script that ends with its LLM open, where weakref's exit hook was registered before multiprocessing's: the
    group's shutdown must run before multiprocessing's hook terminates and joins the daemon workers, whose join
    waits forever on workers that ignore SIGTERM."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import weakref\n"
        "weakref.finalize(weakref, int)  # weakref's exit hook, before multiprocessing's (imported below)\n"
        "from lserve_lite import LLM, EngineConfig, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(tiny_dir)!r}, backend='cpu', config=EngineConfig(tensor_parallel=2))\n"
        "    llm.generate(['hi'], SamplingParams(max_new_tokens=2))\n"
    )
    import lserve_lite

    env = {**os.environ, "PYTHONPATH": str(Path(lserve_lite.__file__).parents[1])}  # this checkout's package
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "leaked" not in r.stderr, r.stderr


def test_score_through_the_pipe_equals_in_process(tiny_dir):
    """Teacher-forced logits of 600 rows (1 MB, past the shared logits block and a pipe's buffer: rank 0 sends them
    through the pipe, read in many pieces) equal one process's."""
    ids = np.random.default_rng(2).integers(3, 320, 600).tolist()
    want = LLM(str(tiny_dir), backend="cpu").engine.score(ids)
    llm = tp_llm(tiny_dir, max_num_batched_tokens=1024)
    try:
        got = llm.engine.score(ids)
        assert got.shape == want.shape == (600, 320) and np.abs(got - want).max() < 1e-4
    finally:
        llm.engine.close()


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not reaped by an init that never reaps, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_end_with_a_killed_driver(tiny_dir, tmp_path):
    """The driver killed outright (SIGKILL, the OOM killer) after rank 0 has a step and before rank 1 does: rank 0,
    waiting in its collective for rank 1, lived on forever (on a GPU, holding its memory); every worker now ends
    when its driver does."""
    import subprocess
    import sys

    import lserve_lite

    script = tmp_path / "driver.py"
    script.write_text(f"""
import os, pickle, signal
from lserve_lite import LLM, EngineConfig, SamplingParams
if __name__ == "__main__":
    llm = LLM({str(tiny_dir)!r}, backend="cpu", config=EngineConfig(tensor_parallel=2))
    group = llm.engine.runner.executor
    print(*(p.pid for p in group.procs), flush=True)
    write = group._write
    def killed_between(rank, data):
        write(rank, data)
        if rank == 0 and pickle.loads(data[4:])[0] == "step":
            os.kill(os.getpid(), signal.SIGKILL)
    group._write = killed_between
    llm.generate(["hi"], SamplingParams(max_new_tokens=2))
""")
    env = {**os.environ, "PYTHONPATH": str(Path(lserve_lite.__file__).parents[1])}
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert p.wait(timeout=120) == -signal.SIGKILL and len(pids) == 2
    deadline = time.monotonic() + 30
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a worker outlived its driver"


def test_shutdown_grace_is_shared():
    """Workers that cannot read their stop (loading a checkpoint, Ctrl-C at start; stuck in a collective) are
    given the grace once between them, then killed together: each was waited for in turn (40 s for 8 ranks)."""

    class Loading:  # a worker that reads no stop; it ends when killed
        def __init__(self) -> None:
            self.ended = False

        def join(self, timeout: float | None = None) -> None:
            if not self.ended:
                time.sleep(timeout or 0.0)

        def is_alive(self) -> bool:
            return not self.ended

        def kill(self) -> None:
            self.ended = True

    procs = [Loading() for _ in range(4)]
    t = time.monotonic()
    tp_group._shutdown(procs, [], lambda: None, grace=0.5)
    assert time.monotonic() - t < 1.5 and not any(p.is_alive() for p in procs)


def test_scored_logits_count_what_the_ranks_leave(tiny_dir):
    """`score` (`LLM.logits`) checks its [T, vocab] logits against the host's memory: with CPU ranks the driver
    counted the host's whole memory, not what is left beside the ranks' weights, KV pools and step buffers and the
    shared-memory blocks (tmpfs); now the rule of the in-process engine (memory.host_left), over all ranks."""
    from dataclasses import replace

    from lserve_lite.backends.cpu import CpuOps
    from lserve_lite.backends.group import exchange_blocks
    from lserve_lite.backends.memory import host_memory_bytes
    from lserve_lite.kv.layout import pools_bytes
    from lserve_lite.weights.loader import load_model
    from lserve_lite.weights.shard import shard_config, shard_of

    ops = CpuOps()
    weights = sum(ops.weight_bytes(w) for w in load_model(tiny_dir, None).weights.values())
    llm = tp_llm(tiny_dir)
    try:
        eng = llm.engine
        e, cfg = eng.ecfg, eng.cfg
        held = 0  # what each rank holds from its half of the host (tp_worker._serve)
        for rank in range(2):
            part = shard_config(cfg, shard_of(cfg, rank, 2))
            kv = pools_bytes(part, e.page_size, eng.kv_bytes, None, e.max_num_seqs, eng.blocks.num_pages, 0,
                             stat_itemsize=eng.itemsize)  # fmt: skip
            needs = ops.buffer_needs(replace(part, vocab_size=cfg.vocab_size), e, eng.max_len, None)
            held += weights // 2 + kv + sum(n.nbytes for n in needs)
        exchange = sum(b.size for b in exchange_blocks("cpu", 2))
        shm = e.max_num_seqs * cfg.vocab_size * 4 + exchange  # rank 0's logits, the exchange block
        assert eng._host_left == (
            host_memory_bytes() // 2 * 2 - held - shm,
            "this host beside the weights, the KV cache, a step's buffers and the shared-memory blocks",
        )
        assert eng.score(list(range(3, 53))).shape == (50, cfg.vocab_size)
    finally:
        llm.close()
