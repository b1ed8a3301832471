"""Tensor-parallel decode speed on N GPUs: the Llama-3-8B-shaped random model split over N ranks (one process
per GPU, NCCL), batch-1 and batch-32 decode through the CUDA Graphs (all-reduces captured), and the time of
one step's collectives alone (2 all-reduces per layer of [batch, hidden] fp16, the embedding's, and the
all-gather of the vocabulary-parallel logits), captured and replayed the same way.

World 1 runs without a communicator: the single-GPU engine's path, the baseline. Each rank builds its own
shard of random weights on its GPU (the checkpoint path is not timed here); K/V pages hold random values.

    python tools/bench_tp.py --tensor-parallel 1 2 --out results/bench_tp.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_e2e import _fill_random, gpu_time, llama3_8b_config, random_llama  # noqa: E402

from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.engine_args import bounded_int, output_file  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402

PS = 64


def rank_main(rank: int, spec, args, out) -> None:
    """One rank: its shard of the model, a KV cache for `batch` sequences, decode graph replays timed."""
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.backends.cuda_graphs import GraphExecutor
    from lserve_lite.backends.group import join_group
    from lserve_lite.weights.shard import shard_config, shard_of

    max_len = max(args.contexts) + PS
    full = llama3_8b_config(max_len)
    if spec is None:
        ops, comm, cfg = CudaOps(), None, full
    else:
        ops, comm = join_group(spec, rank)
        cfg = shard_config(full, shard_of(full, rank, spec.world))
    model = random_llama(cfg, ops, max_len, seed=rank, comm=comm)
    rows = []
    for batch in args.batches:
        ctxs = [c for c in args.contexts if batch * c <= args.max_batch_tokens]
        if not ctxs:
            continue
        seq_len = max(ctxs) + PS
        pages_per_seq = math.ceil(seq_len / PS)
        cache = ops.alloc_kv(cfg, PS, batch * pages_per_seq)
        _fill_random(cache, 0, batch * pages_per_seq)
        graphs = GraphExecutor(ops, model.forward, cache, max_num_seqs=batch, max_len=seq_len, sizes=(batch,))
        for ctx in ctxs:
            _replay(graphs, cfg, batch, ctx, pages_per_seq)  # captures (first time) and stages this step
            g = graphs.graphs[batch]
            t = gpu_time(lambda g=g: g.graph.launch(cp.cuda.get_current_stream()), args.reps)
            rows.append(
                dict(world=1 if spec is None else spec.world, batch=batch, context=ctx, step_ms=t * 1e3)
            )
        if comm is not None:
            t = gpu_time(_collectives_graph(cp, comm, cfg, batch), args.reps)
            rows.append(dict(world=spec.world, batch=batch, collectives_ms=t * 1e3))
        del graphs, cache
    if rank == 0:
        out.put(rows)


def _replay(graphs, cfg, batch: int, ctx: int, pages_per_seq: int):
    """One decode step of `batch` sequences at context `ctx` (each its own pages), through the graph."""
    from lserve_lite.backends.base import StepInputs
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    tables = [list(range(s * pages_per_seq, (s + 1) * pages_per_seq)) for s in range(batch)]
    slots = np.array([t[ctx // PS] * PS + ctx % PS for t in tables])
    plan = build_plan(BatchLayout([1] * batch, [ctx + 1] * batch, tables), PS)
    hc = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
    step = StepInputs(np.ones(batch, np.int64), np.full(batch, ctx), slots, plan, np.arange(batch), hc)
    return graphs.run(graphs.plan(step))


def _collectives_graph(cp, comm, cfg, batch: int):
    """A captured graph of one decode step's collectives alone; returns its launcher."""
    x = cp.ones((batch, cfg.hidden_size), cp.float16)
    logits = cp.ones((batch, cfg.vocab_size), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)

    def step() -> None:
        for _ in range(2 * cfg.num_layers + 1):
            comm.all_reduce(x)
        comm.all_gather(logits)

    with stream:
        step()  # warm-up (NCCL sets up its channels outside the capture)
        stream.synchronize()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    return lambda: graph.launch(cp.cuda.get_current_stream())


def _result(out, procs) -> list:
    """Rank 0's rows; a rank that exits with an error ends the run instead of a wait."""
    while True:
        try:
            return out.get(timeout=5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"rank process {dead[0].name} exited with code {dead[0].exitcode}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tensor-parallel", type=bounded_int(1, 64), nargs="+", default=[1, 2], help="world sizes to run"
    )
    ap.add_argument("--batches", type=bounded_int(1, 4096), nargs="+", default=[1, 32])
    ap.add_argument("--contexts", type=bounded_int(1, 1 << 24), nargs="+", default=[4096, 32768])
    ap.add_argument(
        "--max-batch-tokens", type=bounded_int(1), default=1 << 18, help="skip batch x context beyond this"
    )
    ap.add_argument("--reps", type=bounded_int(1, 100_000), default=30)
    ap.add_argument("--out", type=output_file, default="tools/results/bench_tp.json")
    args = ap.parse_args(argv)
    require_gpu("bench_tp.py")
    from lserve_lite.backends.group import new_group

    ctx = mp.get_context("spawn")
    rows = []
    for world in args.tensor_parallel:
        spec = None if world == 1 else new_group("cuda", world, ctx)[0]
        out = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, spec, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        got = _result(out, procs)
        for r in got:
            print(r, flush=True)
        rows += got
        for p in procs:
            p.join()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model="Llama-3-8B-shape random fp16", rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
