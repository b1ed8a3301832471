"""The driver's side of tensor parallelism: one worker process per rank (multiprocessing spawn), each step
the scheduler and planner made sent to every rank, and supervision: a worker that fails, exits or falls
silent ends the engine with its reason, never a hang (docs/TENSOR_PARALLEL.md)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from multiprocessing.util import Finalize
from pathlib import Path
from select import select
from typing import Any

import numpy as np

from ..backends.base import StepInputs
from ..backends.comm import SHM_DIR, ShmBlock, megabytes, more_room, reserved_block
from ..backends.group import exchange_blocks, host_ops, new_group
from ..backends.memory import host_left
from ..config import EngineConfig, ModelConfig
from ..errors import LServeError, TensorParallelError
from ..kv.layout import KVLayout, fit_context, pool_pages
from ..kv.quant import FORMATS
from ..weights.shard import check_tensor_parallel, shard_config, shard_of
from .interrupts import ctrl_c_held, ctrl_c_pending, pending_name
from .model_runner import ModelRunner
from .tp_worker import worker_main

STARTUP_TIMEOUT = 1800.0  # loading a large checkpoint from a cold disk
STEP_TIMEOUT = 600.0  # no step takes this long: a worker silent for it is hung
# a wait of at most a second that returns this much later: this process was stopped meanwhile
STOPPED_SLACK = 5.0
# the setting that shrinks rank 0's logits block (max_num_seqs x vocabulary x 4 bytes), and where it is set
FEWER_SEQS = "max_num_seqs (--max-num-seqs, EngineConfig's max_num_seqs)"


def shm_free_bytes() -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask, e.g. macOS)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def logits_block(max_num_seqs: int, vocab_size: int) -> ShmBlock:
    """Rank 0's logits of up to max_num_seqs rows (decode) come back through this block; more rows by the pipe."""
    return ShmBlock(
        "rank 0's logits",
        f"max_num_seqs {max_num_seqs} x vocabulary {vocab_size} x 4 bytes",
        max_num_seqs * vocab_size * 4,
        FEWER_SEQS,
    )


def check_shm_room(blocks: list[ShmBlock], free: int | None) -> None:
    """Refuse before any block is made when they cannot fit, naming each block and the settings that shrink them: a
    block larger than the room left is created sparse and kills its first writer with SIGBUS (Docker's /dev/shm is
    64 MB by default)."""
    need = sum(b.size for b in blocks)
    if free is not None and need > free:
        parts = " and ".join(f"{b.what} {megabytes(b.size)} ({b.sized_by})" for b in blocks)
        raise LServeError(
            f"tensor parallel needs {megabytes(need)} of shared memory in {SHM_DIR}, {megabytes(free)} are free: "
            f"{parts}; {more_room(' or '.join(b.shrink for b in blocks))}"
        )


class WorkerGroup:
    """The ranks behind the Executor interface: `plan` passes the host step through, `run` sends it to every
    rank and returns rank 0's logits (NumPy); `copy_stream_pages` / `clear_pages` run the KV page ops on every
    rank."""

    def __init__(self, model_dir: Path, backend: str, ecfg: EngineConfig, world: int, vocab_size: int):
        ctx = mp.get_context("spawn")
        logits = logits_block(ecfg.max_num_seqs, vocab_size)
        check_shm_room([logits, *exchange_blocks(backend, world)], shm_free_bytes())
        spec, cleanup = new_group(backend, world, ctx)
        try:  # refused (out of descriptors or memory): the group's block goes too, not at the process's exit
            self.logits = reserved_block(logits)
        except BaseException:
            cleanup()
            raise
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.failure: str | None = None
        # held while the group closes and while a step reads what a close lets go of (the worker lists, the logits
        # block): a close by another thread (the server's shutdown past its wait for a long step) meanwhile made the
        # step fail with IndexError, or read its logits from the closed block (a fresh uninitialized array) and
        # sample them. Reentrant: a signal handler may close the group inside a step of its thread.
        self._closing = threading.RLock()
        self.steps = 0  # steps sent; rank 0 tags each reply with its number
        self.started = False  # every worker has reported (loaded its shard)
        # seconds this process was seen stopped (Ctrl-Z) while it waited on a rank (`_clock`)
        self._stopped = 0.0
        # a multiprocessing Finalize, not weakref's: at exit it runs before multiprocessing's own hook terminates the
        # daemon workers and joins them, which waited forever on workers that ignore SIGTERM (tp_worker)
        self._close = Finalize(
            self, _shutdown, (self.procs, self.conns, _releaser(cleanup, self.logits)), exitpriority=0
        )
        try:  # Ctrl-C while they load stops them now, not when the KeyboardInterrupt is collected
            for rank in range(world):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(rank, spec, model_dir, ecfg, child), daemon=True,
                                name=f"lserve-tp{rank}")  # fmt: skip
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
            ready = [self._recv(r, STARTUP_TIMEOUT) for r in range(world)]
            self.started = True
        except BaseException:
            self.close()
            raise
        self.budgets = [m[1] for m in ready]  # KV bytes each rank can hold
        self.limits = [m[2] for m in ready]  # the most KV bytes an explicit page count may take on each rank
        self.itemsize = ready[0][3]  # the ranks' float type (page statistics, KV scales)
        self.kv_format = FORMATS[ready[0][4]]  # resolved by the workers on their backend and device
        self.backend = spec.backend  # what the ranks run on (the driver's own Ops are the host's)

    def build(self, max_len: int, num_pages: int, layout: KVLayout | None, num_stream: int) -> None:
        """Every rank builds its model, KV pools (these page counts, all ranks alike) and executor; `host_left`:
        what the host has left for the driver's arrays (scored logits) beside the ranks and the shared blocks."""
        self._send(("build", max_len, num_pages, layout, num_stream, self.logits.name))
        built = [self._recv(r, STARTUP_TIMEOUT) for r in range(len(self.procs))]
        # ranks on the host each left their share of it; /dev/shm's blocks are the host's memory too
        shm = self.logits.size + sum(b.size for b in exchange_blocks(self.backend, len(built)))
        self.host_left = host_left(built[0][2], sum(m[1] for m in built), shm)

    def plan(self, step: StepInputs) -> StepInputs:
        return step

    def run(self, step: StepInputs) -> np.ndarray:
        """Rank 0's logits, from the shared block (copied: callers may keep them past the next run) or as it
        sent them). Replies to earlier steps still in the pipe (a run interrupted by Ctrl-C while it waited) are
        skipped."""
        self.steps += 1
        self._send(("step", step, self.steps))
        while (msg := self._recv(0, STEP_TIMEOUT))[2] != self.steps:
            pass
        out = msg[1]
        if not isinstance(out, tuple):
            return out
        with self._closing:
            if self.failure:  # closed since the reply came
                raise TensorParallelError(self.failure)
            return np.array(np.ndarray(out, np.float32, self.logits.buf))

    def copy_stream_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        self._send(("copy", src, dst))

    def clear_pages(self, pages: np.ndarray, stream_pages: np.ndarray) -> None:
        self._send(("clear", pages, stream_pages))

    def ids_row(self, n: int) -> None:
        return None

    def fault(self) -> str | None:
        """Why no step can run, seen now without waiting (an earlier failure, or a worker that has exited since
        the last step); None while every worker runs. Any thread may ask (it only reads: one list of processes,
        kept while their sentinels are waited on, which a `close` meanwhile lets go)."""
        procs = self.procs
        if self.failure is None:
            gone = wait([p.sentinel for p in procs], timeout=0)
            if gone:
                rank = next(r for r, p in enumerate(procs) if p.sentinel in gone)
                return f"tensor-parallel worker {rank} (pid {procs[rank].pid}) has exited"
        return self.failure

    def close(self) -> None:
        """Stop the workers (also done when the group is collected or the interpreter exits) and let go of their
        pipes and process handles: a closed group still referenced (a closed LLM kept in scope) held three file
        descriptors a rank, until a process that re-created its LLM ran out of them. A step in flight in another
        thread ends with the reason (`_workers`)."""
        with self._closing:
            self.failure = self.failure or "tensor-parallel engine stopped: it was closed"
            self._close()
            self.conns, self.procs = [], []

    def _workers(self) -> tuple[list, list]:
        """The workers' pipes and processes, or the group's reason to stop where another thread closed it meanwhile
        (it lets go of them)."""
        with self._closing:
            if not self.procs:
                raise TensorParallelError(self.failure)
            return self.conns, self.procs

    def _send(self, msg: tuple) -> None:
        """`msg` to every rank, or (a failure) to none that runs on: a Ctrl-C meanwhile is raised after the
        last send (interrupts.ctrl_c_held), never between two ranks."""
        if self.failure:
            raise TensorParallelError(self.failure)
        data = _framed(ForkingPickler.dumps(msg))  # pickled once for every rank
        with ctrl_c_held():
            for r in range(len(self._workers()[0])):
                self._write(r, data)

    def _write(self, rank: int, data: bytes) -> None:
        """One framed message to `rank`, within STEP_TIMEOUT: a rank that stopped reading (hung) fills its
        pipe, and a blocking send of a message larger than the pipe holds then waited forever. A Ctrl-C held
        (`_send`) while the rank reads nothing for a second ends the group: the message cannot be taken back."""
        conn = self._workers()[0][rank]  # kept: its descriptor stays open while written
        fd = conn.fileno()
        view, deadline = memoryview(data), self._clock() + STEP_TIMEOUT
        os.set_blocking(fd, False)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    self._fail(self._death(rank))
                self._stalled(rank, fd, deadline, STEP_TIMEOUT, writing=True)
        finally:
            os.set_blocking(fd, True)

    def _read(self, rank: int, deadline: float, timeout: float) -> tuple:
        """`rank`'s next message, whose first bytes have come, read by its frame as `Connection.recv` reads it,
        within the deadline: a rank that stalled mid-message (hung) left a plain `recv` waiting forever."""
        (n,) = struct.unpack("!i", self._take(rank, 4, deadline, timeout))
        if n == -1:
            (n,) = struct.unpack("!Q", self._take(rank, 8, deadline, timeout))
        return ForkingPickler.loads(self._take(rank, n, deadline, timeout))

    def _take(self, rank: int, n: int, deadline: float, timeout: float) -> bytes:
        """`n` bytes from `rank`'s pipe, as they come (nothing allocated by the length before the bytes are here)."""
        conn = self._workers()[0][rank]  # kept: its descriptor stays open while read
        fd = conn.fileno()
        chunks, left = [], n
        os.set_blocking(fd, False)
        try:
            while left:
                try:
                    chunk = os.read(fd, min(left, 1 << 24))
                except BlockingIOError:
                    self._stalled(rank, fd, deadline, timeout, writing=False)
                    continue
                except OSError:
                    chunk = b""
                if not chunk:  # the rank's end closed: it died
                    self._fail(self._death(rank))
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.set_blocking(fd, True)
        return b"".join(chunks)

    def _stalled(self, rank: int, fd: int, deadline: float, timeout: float, writing: bool) -> None:
        """Wait up to a second for `rank`'s pipe to move again; past the deadline, or with a Ctrl-C held
        (`ctrl_c_held`) and nothing moved, the group ends: a message begun cannot be taken back."""
        left = deadline - self._clock()
        what = "read" if writing else "sent"
        if left <= 0:
            self._fail(f"worker {rank} {what} nothing for {timeout:.0f} s (hung)")
        start, w = time.monotonic(), min(left, 1.0)
        ready = select([], [fd], [], w)[1] if writing else select([fd], [], [], w)[0]
        self._waited(start, w)
        if not ready and ctrl_c_pending():
            self._fail(f"interrupted ({pending_name()}) while worker {rank} {what} nothing")

    def _recv(self, rank: int, timeout: float) -> tuple:
        """`rank`'s next message, watching every worker's exit meanwhile; an error report, an exit or
        `timeout` seconds of silence end the group."""
        deadline = self._clock() + timeout
        conns, procs = self._workers()
        conn = conns[rank]
        sentinels = {p.sentinel: r for r, p in enumerate(procs)}
        while True:
            left = deadline - self._clock()
            if left <= 0:
                self._fail(f"worker {rank} sent nothing for {timeout:.0f} s (hung)")
            start, w = time.monotonic(), min(left, 1.0)
            ready = wait([conn, *sentinels], timeout=w)
            self._waited(start, w)
            if conn in ready:
                with ctrl_c_held():  # a message read in part would leave the pipe mid-message
                    msg = self._read(rank, deadline, timeout)
                if msg[0] == "error":
                    self._fail(f"worker {msg[1]} failed: {msg[2]}")
                return msg
            for s in ready:
                self._fail(self._death(sentinels[s]))

    def _clock(self) -> float:
        """What the ranks' silence is measured by: time.monotonic() less the time this process was stopped while it
        waited on them. Ctrl-Z stops the ranks with it (one process group): a reply resumed after a stop longer than
        the step timeout took them for hung and ended the engine."""
        return time.monotonic() - self._stopped

    def _waited(self, start: float, timeout: float) -> None:
        """A wait begun at `start` for at most `timeout` seconds that returned far later: this process was stopped
        (Ctrl-Z, SIGSTOP) for the excess, which `_clock` leaves out."""
        late = time.monotonic() - start - timeout
        if late > STOPPED_SLACK:
            self._stopped += late

    def _death(self, rank: int) -> str:
        """Why `rank` is gone: its own error report if it sent one, else how its process ended."""
        conns, procs = self._workers()
        conn, p = conns[rank], procs[rank]
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "error":
                    return f"worker {rank} failed: {msg[2]}"
        except (EOFError, OSError):
            pass
        p.join(timeout=1.0)
        code = p.exitcode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit code {code}"
        )
        if code == 1 and not self.started:  # Python's exit on an error before worker_main could report it
            how += (": its traceback is above; a script must create the engine under "
                    "`if __name__ == '__main__':` (multiprocessing spawn runs the script again in each worker)")  # fmt: skip
        return f"worker {rank} (pid {p.pid}) died ({how})"

    def _fail(self, reason: str) -> None:
        self.failure = f"tensor-parallel engine stopped: {reason}"
        _shutdown(self.procs, self.conns, lambda: None, grace=0.0)
        raise TensorParallelError(self.failure)


def _shutdown(procs: list, conns: list, cleanup: Callable[[], None], grace: float = 5.0) -> None:
    """Ask the workers to stop, then kill them (a rank blocked in a collective, or loading its shard, cannot stop
    itself; they ignore SIGTERM). The stop is sent without waiting: a hung rank's pipe may be full. The grace is one
    for all ranks."""
    for conn in conns:
        try:
            os.set_blocking(conn.fileno(), False)
            conn.send(("stop",))
        except OSError:
            pass
    _join_all(procs, grace)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()
    cleanup()


def _join_all(procs: list, timeout: float) -> None:
    """Wait up to `timeout` seconds in all for the processes to end."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))


def _framed(data: bytes | memoryview) -> bytes:
    """`data` as multiprocessing's `Connection.send_bytes` frames it, so the worker's `recv` reads it: a 4-byte
    big-endian length, or -1 and an 8-byte one past 2 GiB."""
    n = len(data)
    return (struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)) + data


def _releaser(cleanup: Callable[[], None], shm: shared_memory.SharedMemory) -> Callable[[], None]:
    """The group's cleanup, then the logits block's."""

    def release() -> None:
        cleanup()
        shm.close()
        shm.unlink()

    return release


def tensor_parallel_runner(
    model_dir: Path, backend: str, cfg: ModelConfig, ecfg: EngineConfig, layout: KVLayout | None, max_len: int
) -> tuple[ModelRunner, int, int]:
    """Workers started and built, KV pools sized to the rank with the least room: (the driver's runner,
    dense pages, streaming pages). `cfg`, `layout`: the whole model's."""
    world = ecfg.tensor_parallel
    check_tensor_parallel(cfg, world)
    group = WorkerGroup(model_dir, backend, ecfg, world, cfg.vocab_size)
    try:  # a refusal (pools that do not fit a rank) stops the workers now, not when the error is collected
        dense, stream = [], []
        kv_bytes = group.kv_format.kv_bytes(cfg.head_dim, group.itemsize)
        for rank, (budget, limit) in enumerate(zip(group.budgets, group.limits)):
            s = shard_of(cfg, rank, world)
            lay = layout.heads(*s.kv_heads) if layout is not None else None
            d, st = pool_pages(shard_config(cfg, s), ecfg.page_size, kv_bytes, budget, lay, ecfg.max_num_seqs,
                               ecfg.num_kv_pages, stat_itemsize=group.itemsize, limit=limit)  # fmt: skip
            dense.append(d)
            stream += [st] if lay is not None and lay.has_streaming else []
        num_pages, num_stream = min(dense), min(stream, default=0)
        max_len, layout = fit_context(max_len, num_pages, ecfg.page_size, layout)
        group.build(max_len, num_pages, layout, num_stream)
        runner = ModelRunner(
            cfg, {}, host_ops(), ecfg, max_len, num_pages, layout, num_stream, executor=group
        )
    except BaseException:
        group.close()
        raise
    return runner, num_pages, num_stream
