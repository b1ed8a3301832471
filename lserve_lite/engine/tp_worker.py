"""A tensor-parallel worker process: loads its shard, builds its rank on its device, then runs the steps the
driver sends until told to stop. Rank 0 sends the logits back; any failure is reported, then the process ends."""

from __future__ import annotations

import os
import signal
import threading
import traceback
from dataclasses import replace
from multiprocessing import parent_process, shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.group import GroupSpec, join_group
from ..backends.memory import check_buffers
from ..config import EngineConfig
from ..errors import LServeError
from ..kv.layout import pools_bytes
from ..kv.quant import resolve_kv_format
from ..weights.loader import load_model
from ..weights.shard import shard_config, shard_of
from .tp_rank import RankRunner


def worker_main(rank: int, spec: GroupSpec, model_dir: Path, ecfg: EngineConfig, conn: Any) -> None:
    """The process entry (multiprocessing spawn). Messages in: ("build", max_len, pages, layout, stream
    pages, logits block name), ("step", StepInputs, number), ("copy", src, dst), ("clear", pages, stream
    pages), ("stop",) (also before "build"). Out: ("ready", kv budget bytes, kv limit bytes, itemsize, KV
    format name), ("built", memory left, whether it is the host's), ("logits", shape in the block | array, step number) from rank 0, ("error", rank,
    text)."""
    # Ctrl-C reaches the terminal's whole process group, and SIGTERM a whole group or cgroup (systemd's stop, a
    # shell's `kill %1`, `timeout`): the driver decides what they stop (a reply, the engine, a server once drained),
    # and it stops the workers when it closes the group or exits (their pipes end; SIGKILL for a rank that cannot
    # read its stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _end_with_driver()
    try:
        _serve(rank, spec, model_dir, ecfg, conn)
    except EOFError:  # the driver is gone (its end of the pipe closed): no one to report to
        raise SystemExit(1) from None
    except BaseException as e:  # reported to the driver, which ends the engine with it
        text = str(e)
        if not isinstance(e, LServeError):  # a bug: its traceback on this stderr, one line to the driver
            traceback.print_exc()
            text = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        try:
            conn.send(("error", rank, text))
        finally:
            raise SystemExit(1) from None


def _end_with_driver() -> None:
    """End this process when the driver's does, whatever this one is doing: a driver killed outright (SIGKILL,
    the OOM killer) after rank 0 had a step and before rank 1 did left rank 0 waiting in its collective forever
    (on a GPU, holding its memory); a worker between steps sees its pipe end instead."""

    def watch() -> None:
        parent_process().join()
        os._exit(1)

    threading.Thread(target=watch, name="lserve-tp-driver-watch", daemon=True).start()


def _serve(rank: int, spec: GroupSpec, model_dir: Path, ecfg: EngineConfig, conn: Any) -> None:
    ops, comm = join_group(spec, rank)
    loaded = load_model(model_dir, ecfg.quantize)
    cfg = loaded.cfg
    shard_of(cfg, rank, spec.world)  # refuses a model that does not split, before anything is built
    fmt = resolve_kv_format(ecfg.kv_dtype, ops.kv_dtypes, cfg.head_dim)  # refuses a dtype this device lacks
    itemsize = np.dtype(ops.dtype).itemsize
    # about this rank's share of what the device will hold (norms are replicated: negligible); ranks that share
    # one memory (the host's) split what it has for all of them
    weight_bytes = sum(ops.weight_bytes(w) for w in loaded.weights.values()) // spec.world
    share = spec.sharing_memory
    budget = ops.kv_budget_bytes(ecfg.kv_memory_fraction, weight_bytes * share) // share
    limit = ops.kv_limit_bytes(weight_bytes * share) // share
    conn.send(("ready", budget, limit, itemsize, fmt.name))
    msg = conn.recv()
    if msg[0] != "build":  # the driver refused to start (pools that do not fit): stopped before building
        return
    _, max_len, num_pages, layout, num_stream, logits_name = msg
    shard = shard_of(cfg, rank, spec.world)
    lay = layout.heads(*shard.kv_heads) if layout is not None else None
    part = shard_config(cfg, shard)
    kv = pools_bytes(part, ecfg.page_size, fmt.kv_bytes(cfg.head_dim, itemsize), lay, ecfg.max_num_seqs, num_pages,
                     num_stream, stat_itemsize=itemsize)  # fmt: skip
    # its activations are its shard's; its logits the whole vocabulary's (gathered from every rank)
    left = check_buffers(ops, replace(part, vocab_size=cfg.vocab_size), ecfg, max_len, lay, weight_bytes + kv,
                         f"rank {rank}'s share of the memory beside its weights and KV cache", share)  # fmt: skip
    out = shared_memory.SharedMemory(name=logits_name) if rank == 0 else None
    runner = RankRunner(cfg, loaded.weights, ops, ecfg, max_len, num_pages, layout, num_stream, comm, fmt)
    loaded.drop_file_pages()
    del loaded
    conn.send(("built", left, ops.memory_is_host))
    while True:
        msg = conn.recv()
        if msg[0] == "step":
            logits = runner.run(msg[1])
            if rank == 0:
                conn.send(("logits", _put(ops.to_numpy(logits), out), msg[2]))
        elif msg[0] == "copy":
            runner.copy_stream_pages(msg[1], msg[2])
        elif msg[0] == "clear":
            runner.clear_pages(msg[1], msg[2])
        else:
            return


def _put(logits: np.ndarray, out: shared_memory.SharedMemory) -> np.ndarray | tuple:
    """The logits' shape once written into the driver's shared block when they fit (decode), else the array
    itself (prefill's many rows): a pipe moved 16 MB of batch-32 logits in ~100 ms on a busy host."""
    if logits.nbytes > out.size:
        return logits
    np.ndarray(logits.shape, np.float32, out.buf)[...] = logits
    return logits.shape
