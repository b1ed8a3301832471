"""End-to-end speed on the CUDA backend: prefill and decode tokens/s, decode time beside the weight-read floor.

Two models:
- SmolLM2-135M-Instruct, real weights, through the engine (LLM -> scheduler -> runner -> CUDA Graph decode
  -> GPU sampling): prefill tokens/s at two prompt lengths, batch-1 decode tokens/s at those contexts,
  batch-64 decode throughput; plus the GPU time of one captured decode step. Each batch-1 decode is measured
  with the overlapped step ("decode (engine)", EngineConfig.async_scheduling) and without it ("decode
  (engine, sync)"), beside the GPU time of the graph replays of that same run ("replay in run (GPU)", CUDA
  events around each replay; `x_replay` = engine step / replay), dense and in LServe mode (dynamic
  sparsity, `--smol-budget` tokens).
- Llama-3-8B-shaped random weights (32 layers, hidden 4096, 32/8 heads, head dim 128, FFN 14336, vocab 128256,
  generated on the GPU, never zeros): prefill of 4k and 32k tokens, batch-1 decode at 4k and 32k context
  through the CUDA backend's GraphExecutor, beside the floor = weight bytes / device copy bandwidth measured in this run.
  `--llama-batches 8 32`: also decode graph replays of that many rows at each context, every row with the
  sequence's K/V (its own pages within `--batch-kv-gib`, else a shared document's pages as a prefix cache serves them).
  `--quantize int8|int4`: its matrices and lm_head as packed blocks (floor = the packed bytes).
  `--kv-dtype int8|int4|fp8|fp16` (default auto: the backend's float type, fp16): its KV cache format, here and
  in `--sparse`; rows and summaries record it (`kv_dtype`). `--llama-prefill-reps`: timed prefills per context.

`--sparse` (only this section): LServe end to end on the Llama-3-8B-shaped random model with the
Llama-3-8B-Instruct-Gradient-1048k head pattern (static sparsity 0.5, LServe defaults) against our dense
mode, through the engine's ModelRunner (two-pool KV cache, chunked prefill, decode through CUDA Graphs with
the page selector inside, GPU sampling): one sequence is prefilled in chunks up to each context of
--sparse-contexts in turn; prefill time to a context is the sum of its chunks (wall time, host planning
included); at each context the prompt is cut there and decode is measured (engine step = host inputs + plan
+ graph replay + sampling + one token to the host; and the graph replay alone, GPU time, refresh and reuse
steps weighted 1 : select_interval - 1). Writes bench_e2e_sparse.json (and .png when matplotlib is there;
else `--plot-from JSON` draws it afterwards).

`--capacity` (only this section): the longest context that fits on this GPU per KV dtype (fp16, int8, int4,
fp8) for the Llama-3-8B-shaped model (fp16 weights, or --quantize), dense and LServe (the pattern above), for
one sequence: the KV budget the engine reads (CudaOps.kv_budget_bytes at the default kv_memory_fraction, the
weights' bytes reserved) through the engine's pool sizing (kv/layout.pool_pages); bytes per context token as
sized and as allocated, pages, tokens, and the engine's startup line. Writes bench_e2e_capacity.json.

Prints a table, writes JSON to --out (a file, or a folder); each row also records `others_busy_cpus`, the CPUs other
processes kept busy since the previous row (the engine rows are partly host-bound: compare them only between runs on
equally quiet hosts). Model source for SmolLM2: --gguf /
$LSERVE_SMOLLM2_GGUF (its packed weights, as `lserve-lite chat` loads it), else --model-dir, else the default
model. `--llama-bench PATH` runs llama.cpp's llama-bench (a CUDA build) on the same GGUF in the same run:
prefill 512 and decode at the --smol-prompts depths, rows "llama.cpp" beside ours.

    python tools/bench_e2e.py --out tools/results/bench_e2e.json
    python tools/bench_e2e.py --sparse --out results --deadline $(($(date +%s) + 400))
    python tools/bench_e2e.py --sparse --sparse-contexts 262144 --kv-dtype int8 --out results
    python tools/bench_e2e.py --capacity --out results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import events_median  # noqa: E402
from bench_cpu import Meter  # noqa: E402

from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.evaluation.plotting import pyplot  # noqa: E402


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    import cupy as cp

    src = cp.random.random(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    times = []
    for _ in range(reps + 2):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3, cp.cuda.get_current_stream().ptr)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    del src, dst
    return 2 * nbytes / float(np.median(times[2:]))


def gpu_time(fn, reps: int, warm: int = 3) -> float:
    """Median seconds of fn() by CUDA events (after `warm` warm-up calls)."""
    return events_median(fn, warm, reps) / 1e3


# -- SmolLM2 through the engine ----------------------------------------------------------------------
def smollm2_gguf(args) -> str | None:
    """SmolLM2's GGUF: --gguf, else $LSERVE_SMOLLM2_GGUF (None: neither)."""
    return args.gguf or os.environ.get("LSERVE_SMOLLM2_GGUF")


def smollm2_model(args) -> str:
    """SmolLM2's source: the GGUF (smollm2_gguf), loaded as `lserve-lite chat` loads it (packed weights, no float
    copy), else --model-dir, else the default model."""
    gguf = smollm2_gguf(args)
    if gguf:
        return gguf
    if args.model_dir:
        return args.model_dir
    from lserve_lite.weights.default_model import default_model_dir

    return str(default_model_dir())


def replay_timer(executor) -> list:
    """The executor's replay events, recorded from now on: (start, end) CUDA events around each replay."""
    executor.replay_events = []
    return executor.replay_events


def smol_decode(eng, rng, vocab: int, replays: list):
    """A `one(prompt_len, new)` for `eng`: (prefill s, engine s per decode token, replay GPU s per step)."""
    import cupy as cp

    from lserve_lite import SamplingParams

    def one(prompt_len: int, new: int):
        ids = [int(t) for t in rng.integers(100, vocab, prompt_len)]
        eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
        t0 = time.perf_counter()
        eng.step()  # the whole prompt in one chunk, and the first token
        t1 = time.perf_counter()
        n = 0
        replays.clear()
        while eng.has_unfinished():
            n += len(eng.step())
        t2 = time.perf_counter()
        cp.cuda.get_current_stream().synchronize()
        gpu = [cp.cuda.get_elapsed_time(a, b) / 1e3 for a, b in replays]
        return t1 - t0, (t2 - t1) / max(n, 1), float(np.mean(gpu)) if gpu else float("nan")

    return one


def emit_decode_modes(
    eng, one, label: str, plen: int, steps: int, emit, floor_ms: float | None = None
) -> None:
    """Batch-1 decode at `plen` with and without the overlapped step, each beside its replays' GPU time."""
    extra = {} if floor_ms is None else dict(floor_ms=floor_ms)
    saved = eng.ecfg.async_scheduling
    for overlap in (True, False):
        eng.ecfg.async_scheduling = overlap
        one(plen, 2)  # warm-up for this prompt length (cuBLAS heuristics, attention variant, plan buffers)
        _, per_tok, replay = one(plen, steps)
        what = f"decode (engine{label}{'' if overlap else ', sync'})"
        emit(dict(model="SmolLM2-135M", what=what, batch=1, context=plen, tokens_per_s=1 / per_tok,
                  ms=per_tok * 1e3, x_replay=per_tok / replay, async_scheduling=overlap, **extra))  # fmt: skip
        emit(dict(model="SmolLM2-135M", what=f"replay in run{label} (GPU)", batch=1, context=plen,
                  tokens_per_s=1 / replay, ms=replay * 1e3, async_scheduling=overlap))  # fmt: skip
    eng.ecfg.async_scheduling = saved


def bench_smollm2(args, bw: float, emit) -> None:
    import cupy as cp

    from lserve_lite import LLM, SamplingParams
    from lserve_lite.config import EngineConfig

    llm = LLM(
        smollm2_model(args),
        backend="cuda",
        config=EngineConfig(num_kv_pages=8192, max_num_seqs=64, max_num_batched_tokens=8192),
    )
    eng = llm.engine
    vocab = eng.cfg.vocab_size
    rng = np.random.default_rng(0)
    wbytes = sum(int(a.nbytes) for a in _model_arrays(eng.runner.model)) - int(eng.runner.model.embed.nbytes)
    wbytes += (
        int(eng.runner.model.lm_head.nbytes) if eng.runner.model.lm_head is eng.runner.model.embed else 0
    )
    timed = smol_decode(eng, rng, vocab, replay_timer(eng.runner.executor))

    def one(prompt_len: int, new: int):
        pre, per_tok, _ = timed(prompt_len, new)
        return pre, per_tok

    one(64, 16)  # warm-up: compile, capture the batch-1 graph
    for plen in args.smol_prompts:
        one(plen, 2)
        pre, _ = one(plen, args.decode_steps)
        emit(dict(model="SmolLM2-135M", what="prefill", batch=1, context=plen, tokens_per_s=plen / pre,
                         ms=pre * 1e3))  # fmt: skip
        emit_decode_modes(eng, timed, "", plen, args.decode_steps, emit, wbytes / bw * 1e3)
    # the same decode without CUDA Graphs, and with cuBLAS for the small GEMMs
    graphs, ctx0 = eng.runner.executor, args.smol_prompts[0]
    sizes, graphs.sizes = graphs.sizes, []
    _, per_tok = one(ctx0, 32)
    emit(dict(model="SmolLM2-135M", what="decode (engine, eager)", batch=1, context=ctx0,
                     tokens_per_s=1 / per_tok, ms=per_tok * 1e3))  # fmt: skip
    graphs.sizes = sizes
    eng.ops.small_gemv = False
    graphs.graphs.clear()
    _, per_tok = one(ctx0, args.decode_steps)
    emit(dict(model="SmolLM2-135M", what="decode (engine, cuBLAS GEMV)", batch=1, context=ctx0,
                     tokens_per_s=1 / per_tok, ms=per_tok * 1e3))  # fmt: skip
    g = graphs.graphs.get(1)
    t = gpu_time(lambda: g.graph.launch(cp.cuda.get_current_stream()), 100)
    emit(dict(model="SmolLM2-135M", what="graph replay (GPU), cuBLAS", batch=1, context=ctx0,
                     tokens_per_s=1 / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
    eng.ops.small_gemv = True
    graphs.graphs.clear()
    one(64, 4)
    # GPU time of one captured decode step at the last context (no host work)
    g = eng.runner.executor.graphs.get(1)
    if g is not None:
        t = gpu_time(lambda: g.graph.launch(cp.cuda.get_current_stream()), 100)
        emit(dict(model="SmolLM2-135M", what="decode graph replay (GPU)", batch=1,
                         context=args.smol_prompts[-1], tokens_per_s=1 / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
    # batch 64: prompts of 256 tokens, 64 new tokens each, with and without the overlapped step, after a round
    # that captures the batch-64 graph (captured on first use: inside the first timed run before 2026-12-04g)
    b, new = 64, args.decode_steps
    saved = eng.ecfg.async_scheduling
    for overlap in (None, True, False):
        eng.ecfg.async_scheduling = saved if overlap is None else overlap
        for _ in range(b):
            ids = [int(t) for t in rng.integers(100, vocab, 256)]
            eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=4 if overlap is None else new,
                                                ignore_eos=True))  # fmt: skip
        while eng.scheduler.waiting:
            eng.step()  # prefill (and first tokens)
        t0, n = time.perf_counter(), 0
        while eng.has_unfinished():
            n += len(eng.step())
        dt = time.perf_counter() - t0
        if overlap is None:
            continue
        emit(dict(model="SmolLM2-135M", what=f"decode (engine{'' if overlap else ', sync'})", batch=b, context=256,
                  tokens_per_s=n / dt, ms=dt / max(1, n // b) * 1e3, async_scheduling=overlap))  # fmt: skip
    eng.ecfg.async_scheduling = saved
    assert eng.blocks.num_used == 0
    # GPU time of one captured decode step per batch size, no host work: the sizes the runs used replay their
    # last step (context ~300), the others are captured now on their dummy step (context 1)
    ex = eng.runner.executor
    ran = set(ex.graphs)
    ex.capture_all(eng.runner.head_classes)
    for size in sorted(ex.graphs):
        t = gpu_time(lambda g=ex.graphs[size]: g.graph.launch(cp.cuda.get_current_stream()), 50)
        emit(dict(model="SmolLM2-135M", what="decode graph replay (GPU)", batch=size, context=256 + new if size in ran else 1,
                  tokens_per_s=size / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip


def bench_llamacpp(args, bw: float, emit) -> None:
    """llama.cpp's CUDA build on SmolLM2's GGUF (the peer of bench_smollm2, same file, same run)."""
    from bench_cpu import llama_cpp

    gguf = smollm2_gguf(args)
    if not gguf:
        raise SystemExit("--llama-bench needs the GGUF (--gguf or $LSERVE_SMOLLM2_GGUF)")
    depths = tuple(args.smol_prompts)
    got = llama_cpp(args.llama_bench, gguf, os.cpu_count() or 1, ("-ngl", "99", "-fa", "1"), depths, 128)
    for key, tps in got.items():
        prefill = key == "prefill_512"
        emit(dict(model="llama.cpp CUDA", what="prefill" if prefill else "decode (llama-bench)", batch=1,
                  context=512 if prefill else int(key.removeprefix("decode_ctx")), tokens_per_s=tps,
                  ms=(512 if prefill else 1) / tps * 1e3))  # fmt: skip


def bench_smollm2_lserve(args, bw: float, emit) -> None:
    """SmolLM2 in LServe mode (no head pattern: dynamic sparsity only, a `--smol-budget`-token page budget):
    batch-1 decode with and without the overlapped step, beside the replays' GPU time."""
    from lserve_lite import LLM
    from lserve_lite.config import EngineConfig, SparseConfig

    sp = SparseConfig(enabled=True, static_sparsity=0.0, token_budget=args.smol_budget)
    cfg = EngineConfig(num_kv_pages=8192, max_num_seqs=64, max_num_batched_tokens=8192, sparse=sp)
    eng = LLM(smollm2_model(args), backend="cuda", config=cfg).engine
    one = smol_decode(eng, np.random.default_rng(0), eng.cfg.vocab_size, replay_timer(eng.runner.executor))
    one(64, 16)  # warm-up: compile, capture the batch-1 graph
    for plen in args.smol_prompts:
        emit_decode_modes(eng, one, ", LServe", plen, args.decode_steps, emit)


def _model_arrays(model):
    out = [model.embed, model.norm]
    if model.lm_head is not model.embed:
        out.append(model.lm_head)
    for ly in model.layers:
        out += [a for a in (ly.ln1, ly.qkv, ly.qkv_bias, ly.o, ly.ln2, ly.gate_up, ly.down) if a is not None]
    return out


def tagged(emit, **tags):
    """`emit` adding `tags` to every row (a section's KV dtype), with its `result` and `save`."""

    def out(r: dict) -> None:
        emit({**r, **tags})

    out.result, out.save = emit.result, emit.save
    return out


# -- Llama-3-8B-shaped random weights ----------------------------------------------------------------
def llama3_8b_config(max_len: int):
    from lserve_lite.config import ModelConfig

    return ModelConfig(
        "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, rms_norm_eps=1e-5, rope_theta=5e5,
        max_position_embeddings=max_len,
    )  # fmt: skip


def random_llama(cfg, ops, max_len: int, seed: int = 0, quantize: str | None = None, comm=None):
    """A LlamaModel with random float16 weights made on the GPU (LlamaModel.__init__ would need 32 GB of host
    float32 arrays); same attributes as LlamaModel builds. `quantize` ("int8" / "int4"): the projection
    matrices and the lm_head as random packed blocks instead (the embedding stays float16, as --quantize does).
    With `comm`: `cfg` is a tensor-parallel rank's."""
    import itertools

    import cupy as cp
    from bench_quant_gpu import random_device_quant

    from lserve_lite.backends.base import rope_tables
    from lserve_lite.models.llama import Layer, LlamaModel

    rs = cp.random.RandomState(seed)

    def w(*shape, scale=None, offset=0.0):
        a = rs.standard_normal(shape, dtype=cp.float32) * (scale or 1 / math.sqrt(shape[-1])) + offset
        return a.astype(cp.float16)

    seeds = itertools.count(seed + 1)

    def mat(rows: int, cols: int):
        return (
            w(rows, cols) if quantize is None else random_device_quant(ops, quantize, rows, cols, next(seeds))
        )

    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    m = LlamaModel.__new__(LlamaModel)
    m.cfg, m.ops, m.comm = cfg, ops, comm
    m.vocab_start = comm.rank * cfg.vocab_size if comm is not None else 0
    m.embed, m.norm, m.lm_head = (
        w(cfg.vocab_size, h, scale=1.0),
        w(h, scale=0.1, offset=1.0),
        mat(cfg.vocab_size, h),
    )
    m.layers = [
        Layer(
            ln1=w(h, scale=0.1, offset=1.0), qkv=mat((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), qkv_bias=None,
            o=mat(h, cfg.num_heads * d), ln2=w(h, scale=0.1, offset=1.0), gate_up=mat(2 * i, h), down=mat(h, i),
        )
        for _ in range(cfg.num_layers)
    ]  # fmt: skip
    cos, sin = rope_tables(cfg, max_len)
    m.rope = (ops.upload(cos), ops.upload(sin))
    return m


def replay_step(graphs, ids, pos, slot, plan, head_classes):
    """One decode step (a row per id) through a GraphExecutor; fails loudly when it would not replay a graph."""
    from lserve_lite.backends.base import StepInputs

    step = StepInputs(
        np.asarray(ids), np.asarray(pos), np.asarray(slot), plan, np.arange(len(ids)), head_classes
    )
    prepared = graphs.plan(step)
    assert not isinstance(prepared, tuple), "the step was not served by a CUDA Graph"
    return graphs.run(prepared)


def sequence_forward(model, cache, head_classes, table: list[int], ps: int, rng, start: int, n: int):
    """Tokens start .. start + n - 1 of one sequence (random ids) through `model`, K/V into its page `table`;
    the logits of the last row."""
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    ops = model.ops
    pos = np.arange(start, start + n)
    slots = np.asarray(table)[pos // ps] * ps + pos % ps
    plan = ops.prepare_plan(build_plan(BatchLayout([n], [start + n], [table]), ps))
    up = ops.upload
    return model.forward(up(rng.integers(0, model.cfg.vocab_size, n)), up(pos), up(slots), plan, cache,
                         head_classes, up(np.array([n - 1])))  # fmt: skip


def batch_tables(b: int, ctx: int, ps: int, seq_pages: int, private: bool, spare0: int):
    """Page tables of b decode rows at context `ctx` whose row 0 owns pages 0 .. seq_pages - 1, and the page copies
    [(src, dst), ...] that give every row row 0's K/V: `private`, row i owns pages i * seq_pages ..; else the rows
    share row 0's pages (a shared document, as a prefix cache serves it) but the page their new token goes into,
    row i's spare page spare0 + i - 1 (a copy of row 0's page there)."""
    t0 = list(range(seq_pages))
    last = ctx // ps
    if private:
        tables = [[i * seq_pages + p for p in t0] for i in range(b)]
        copies = [(p, tables[i][p]) for i in range(1, b) for p in range(last + 1)]
    else:
        tables = [t0] + [t0[:last] + [spare0 + i - 1] + t0[last + 1 :] for i in range(1, b)]
        copies = [(t0[last], spare0 + i - 1) for i in range(1, b)]
    return tables, copies


def bench_llama8b(args, bw: float, emit) -> None:
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.backends.cuda_graphs import GraphExecutor
    from lserve_lite.kv.layout import page_bytes
    from lserve_lite.kv.quant import resolve_kv_format
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    ctxs = sorted(args.llama_contexts)
    max_len, ps = max(ctxs) + 256, 64
    cfg = llama3_8b_config(max_len)
    ops = CudaOps()
    fmt = resolve_kv_format(args.kv_dtype, ops.kv_dtypes, cfg.head_dim)
    emit = tagged(emit, kv_dtype=fmt.name)
    model = random_llama(cfg, ops, max_len, quantize=args.quantize)
    name = "Llama-3-8B-shape" + (f" {args.quantize}" if args.quantize else "")
    wbytes = sum(int(a.nbytes) for a in _model_arrays(model)) - int(model.embed.nbytes)
    seq_pages = math.ceil(max_len / ps) + 2
    itemsize = np.dtype(ops.dtype).itemsize
    page_b, _ = page_bytes(cfg, ps, fmt.kv_bytes(cfg.head_dim, itemsize), None, itemsize)
    batches = sorted(set(args.llama_batches) - {1})
    private = {b: b * seq_pages * page_b <= args.batch_kv_gib * 2**30 for b in batches}
    rows_private = max([b for b in batches if private[b]], default=1)
    spare0 = seq_pages * rows_private
    cache = ops.alloc_kv(cfg, ps, spare0 + max(batches, default=1), fmt=fmt)
    table = list(range(seq_pages))
    hc_host = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
    hc = [cp.asarray(c) for c in hc_host]
    rng = np.random.default_rng(0)

    def prefill(start: int, n: int):
        return sequence_forward(model, cache, hc, table, ps, rng, start, n)

    chunk = args.prefill_chunk
    for ctx in ctxs:  # prefill the sequence from 0 to ctx in chunks (the cache ends up holding real K/V)

        def run_prefill(ctx=ctx):
            for s in range(0, ctx, chunk):
                prefill(s, min(chunk, ctx - s))

        t = gpu_time(run_prefill, args.llama_prefill_reps, warm=1)
        emit(dict(model=name, what=f"prefill (chunks of {chunk})", batch=1, context=ctx,
                         tokens_per_s=ctx / t, ms=t * 1e3))  # fmt: skip
    graphs = GraphExecutor(ops, model.forward, cache, max_num_seqs=1, max_len=max_len, sizes=(1,))
    floor = wbytes / bw

    def decode(ctx: int, label: str, host_steps: bool = True):
        pos = np.array([ctx])
        slot = np.array([table[ctx // ps] * ps + ctx % ps])
        plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
        ids = rng.integers(0, cfg.vocab_size, 1)

        def step():
            return replay_step(graphs, ids, pos, slot, plan, hc_host)

        step()
        g = graphs.graphs[1]
        t = gpu_time(lambda: g.graph.launch(cp.cuda.get_current_stream()), 30)
        emit(dict(model=name, what=f"decode graph replay (GPU){label}", batch=1, context=ctx,
                         tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor))  # fmt: skip
        if host_steps:
            t0 = time.perf_counter()
            for _ in range(20):
                step()
                cp.cuda.get_current_stream().synchronize()
            t = (time.perf_counter() - t0) / 20
            emit(dict(model=name, what=f"decode step (host+GPU){label}", batch=1, context=ctx,
                             tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor))  # fmt: skip

    for ctx in ctxs:
        decode(ctx, "")
    for b in batches:  # batch b: b rows at each context, each with row 0's K/V (own pages, or shared ones)
        bgraphs = GraphExecutor(ops, model.forward, cache, max_num_seqs=b, max_len=max_len, sizes=(b,))
        kind = "own KV" if private[b] else "shared KV"
        for ctx in ctxs:
            tables, copies = batch_tables(b, ctx, ps, seq_pages, private[b], spare0)
            src, dst = (cp.asarray(np.array(c, np.int64)) for c in zip(*copies, strict=True))
            for layer in range(cfg.num_layers):
                for pool in (cache.k[layer], cache.v[layer], *cache.scales(layer)[:2]):
                    if pool is not None:  # a float cache has no scales
                        pool[dst] = pool[src]
            pos = np.full(b, ctx)
            slot = np.array([t[ctx // ps] * ps + ctx % ps for t in tables])
            plan = build_plan(BatchLayout([1] * b, [ctx + 1] * b, tables), ps)
            ids = rng.integers(0, cfg.vocab_size, b)
            replay_step(bgraphs, ids, pos, slot, plan, hc_host)
            g = bgraphs.graphs[b]
            t = gpu_time(lambda g=g: g.graph.launch(cp.cuda.get_current_stream()), 30)
            emit(dict(model=name, what=f"decode graph replay (GPU), {kind}", batch=b, context=ctx,
                      tokens_per_s=b / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor))  # fmt: skip
        del bgraphs
    if args.quantize:  # packed weights have no cuBLAS decode path
        return
    ops.small_gemv = False
    graphs.graphs.clear()
    decode(ctxs[0], ", cuBLAS", host_steps=False)
    ops.small_gemv = True


# -- LServe end to end: sparse vs dense on the Llama-3-8B shape --------------------------------------
PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"


def llama3_head_classes(num_layers: int, num_kv_heads: int, sparsity: float):
    """Per-layer KV-head classes from the bundled DuoAttention pattern."""
    from lserve_lite.sparse.patterns import PATTERN_FILE, head_classes, load_pattern

    root = Path(__file__).resolve().parents[1]
    for p in (root / "lserve_lite/sparse/patterns" / PATTERN / PATTERN_FILE,):
        if p.is_file():
            return head_classes(load_pattern(p, num_layers, num_kv_heads), sparsity), str(
                p.relative_to(root.parent)
            )
    raise FileNotFoundError(f"{PATTERN}/{PATTERN_FILE} not found")


def _fill_random(cache, lo_page: int, hi_page: int, seed: int = 1) -> None:
    """Random K/V in the cache's format (bench_attention's random values and scales) and random fp16 page
    statistics in pages [lo_page, hi_page) of every layer's dense pool."""
    import cupy as cp
    from bench_attention import random_kv_scales, random_kv_values

    g = cp.random.default_rng(seed)
    kv = cache.fmt.name if cache.quantized else "fp16"
    stats = [cache.kmax, cache.kmin] if cache.kmax is not None else []
    for pool, kind in [(cache.k, kv), (cache.v, kv), *((p, "fp16") for p in stats)]:
        for a in pool:
            part = a[lo_page:hi_page]
            if part.size:
                part[...] = random_kv_values(g, part.shape, kind)
    for pool in (cache.k_scale, cache.v_scale) if cache.quantized else ():
        for a in pool:
            part = a[lo_page:hi_page]
            if part.size:
                part[...] = random_kv_scales(g, part.shape)
    if cache.kmax is not None:  # keep max >= min
        for mx, mn in zip(cache.kmax, cache.kmin):
            hi, lo = (
                cp.maximum(mx[lo_page:hi_page], mn[lo_page:hi_page]),
                cp.minimum(mx[lo_page:hi_page], mn[lo_page:hi_page]),
            )
            mx[lo_page:hi_page], mn[lo_page:hi_page] = hi, lo


def bench_e2e_sparse(args, bw: float, emit) -> None:
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.config import EngineConfig, SparseConfig
    from lserve_lite.engine.llm_engine import PLACEHOLDER
    from lserve_lite.engine.model_runner import ModelRunner
    from lserve_lite.kv.block_manager import BlockManager
    from lserve_lite.kv.layout import KVLayout
    from lserve_lite.kv.quant import resolve_kv_format
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    ctxs = sorted(args.sparse_contexts)
    chunk, ps, steps = args.sparse_chunk, 64, args.sparse_decode_steps
    max_len = max(ctxs) + steps + 64
    cfg = llama3_8b_config(max_len)
    ops = CudaOps()
    fmt = resolve_kv_format(args.kv_dtype, ops.kv_dtypes, cfg.head_dim)
    weights = args.quantize or "fp16"
    emit = tagged(emit, kv_dtype=fmt.name, weights=weights)
    model = random_llama(cfg, ops, max_len, quantize=args.quantize)
    wbytes = sum(int(a.nbytes) for a in _model_arrays(model)) - int(model.embed.nbytes)
    floor = wbytes / bw
    classes, pattern_path = llama3_head_classes(cfg.num_layers, cfg.num_kv_heads, 0.5)
    sp_default = SparseConfig(enabled=True, sub_pages=args.sparse_sub_pages)
    info = emit.result.setdefault("sparse_setup", {})
    info.update(
        pattern=pattern_path, static_sparsity=0.5, dense_kv_heads=int(sum(int((c == 0).sum()) for c in classes)),
        kv_heads=cfg.num_layers * cfg.num_kv_heads, chunk=chunk, sparse_config=dict(sp_default.__dict__),
        weight_bytes=wbytes, floor_ms=floor * 1e3, contexts=ctxs, kv_dtype=fmt.name, weights=weights,
        notes=[],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    full = [int(t) for t in rng.integers(100, cfg.vocab_size, max(ctxs))]
    deadline = args.deadline or float("inf")

    def run_mode(mode: str) -> None:
        sparse = mode == "sparse"
        ecfg = EngineConfig(
            max_num_seqs=1, max_num_batched_tokens=chunk, max_model_len=max_len, page_size=ps,
            sparse=sp_default if sparse else SparseConfig(), cuda_graphs=True, kv_dtype=args.kv_dtype,
        )  # fmt: skip
        num_pages = -(-max_len // ps) + 1
        layout = KVLayout.sparse(ecfg.sparse, classes, chunk) if sparse else None
        per_seq = layout.stream_pages_per_seq if sparse else 0
        runner = ModelRunner(
            cfg, {}, ops, ecfg, max_len, num_pages, layout, per_seq, model=model, kv_format=fmt
        )
        blocks = BlockManager(num_pages, ps, per_seq, per_seq, 1)
        seq = Sequence(list(full), SamplingParams(temperature=0.0, max_new_tokens=steps))
        blocks.grow(seq, max_len)
        sync = cp.cuda.get_current_stream().synchronize
        # warm-up: one chunk (kernels, cuBLAS heuristics at this shape), then start over
        runner.run([seq], [chunk])
        sync()
        seq.num_cached, seq.decode_steps = 0, 0
        done, total, last_seg = 0, 0.0, None
        for ctx in ctxs:
            seg = (done, ctx)
            est = None
            if last_seg is not None:  # attention-bound: segment time grows as b^2 - a^2
                (a0, a1), t_prev = last_seg
                est = t_prev * (ctx**2 - done**2) / max(1, a1**2 - a0**2)
            if est is not None and time.time() + est + 20 > deadline:
                info["notes"].append(
                    f"{mode}: prefill {done}->{ctx} skipped (estimated {est:.0f} s past the deadline); "
                    f"K/V of those positions filled with random values for the decode measurement"
                )
                _fill_random(runner.cache, done // ps, -(-ctx // ps))
                sync()
                seq.num_cached = done = ctx
                total = None
            else:
                t0 = time.perf_counter()
                while seq.num_cached < ctx:
                    profiled = seq.num_cached // chunk in args.sparse_profile_chunks
                    if profiled:
                        sync()
                        cp.cuda.profiler.start()
                    runner.run([seq], [min(chunk, ctx - seq.num_cached)])
                    if profiled:
                        sync()
                        cp.cuda.profiler.stop()
                sync()
                t = time.perf_counter() - t0
                last_seg, done = (seg, t), ctx
                if total is not None:
                    total += t
                    emit(dict(model="Llama-3-8B-shape", what=f"prefill {mode} (chunks {chunk})", batch=1,
                              context=ctx, tokens_per_s=ctx / total, ms=total * 1e3, mode=mode,
                              kind="prefill"))  # fmt: skip
            # decode at this context: the prompt ends here
            seq.prompt_ids, seq.output_ids, seq.decode_steps = full[:ctx], [], 0
            seq.params = SamplingParams(temperature=0.0, max_new_tokens=steps)

            def step(runner=runner, seq=seq):
                logits = runner.run([seq], [1])
                seq.output_ids.append(ops.sample(logits, [seq])[0])  # synchronizes (token to the host)

            seq.output_ids.append(int(rng.integers(100, cfg.vocab_size)))
            for _ in range(4):
                step()  # warm-up (the first one captures the graph)
            n0 = runner.executor.replays
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            t = (time.perf_counter() - t0) / steps
            replays = runner.executor.replays - n0  # == steps: every step replayed the CUDA Graph
            emit(dict(model="Llama-3-8B-shape", what=f"decode step {mode} (engine)", batch=1, context=ctx,
                      tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor, mode=mode,
                      kind="decode_step", graph_replays=replays, steps=steps))  # fmt: skip

            def overlapped(n: int, runner=runner, seq=seq) -> float:
                # LLMEngine._launch's order: launch step k on step k-1's ids still on the device, queue its
                # sampling, then wait for step k-1's ids (the host's planning of k+1 overlaps the GPU's k)
                prev = None
                t0 = time.perf_counter()
                for _ in range(n):
                    logits = runner.run([seq], [1], ids=None if prev is None else prev.ids)
                    cur = ops.sample_async(logits, [seq])
                    if prev is not None:
                        seq.output_ids[-1] = prev.tolist()[0]
                    seq.output_ids.append(PLACEHOLDER)
                    prev = cur
                seq.output_ids[-1] = prev.tolist()[0]
                return (time.perf_counter() - t0) / n

            overlapped(4)
            t_ov = overlapped(steps)
            emit(dict(model="Llama-3-8B-shape", what=f"decode step {mode} (overlapped)", batch=1, context=ctx,
                      tokens_per_s=1 / t_ov, ms=t_ov * 1e3, floor_ms=floor * 1e3, x_floor=t_ov / floor,
                      mode=mode, kind="decode_step_overlapped", steps=steps))  # fmt: skip
            g = runner.executor.graphs[1]
            launch = lambda g=g: g.graph.launch(cp.cuda.get_current_stream())  # noqa: E731
            if sparse:
                interval = ecfg.sparse.select_interval
                while seq.decode_steps % interval:
                    step()
                step()  # uploaded with refresh = 1
                t_ref = gpu_time(launch, 20)
                step()  # refresh = 0: the size's reuse graph (no page selector launches)
                reuse = runner.executor.reuse.get(1, g)
                t_reuse = gpu_time(lambda r=reuse: r.graph.launch(cp.cuda.get_current_stream()), 20)
                t = (t_ref + (interval - 1) * t_reuse) / interval
                extra = dict(refresh_ms=t_ref * 1e3, reuse_ms=t_reuse * 1e3)
            else:
                t, extra = gpu_time(launch, 20), {}
            emit(dict(model="Llama-3-8B-shape", what=f"decode replay {mode} (GPU)", batch=1, context=ctx,
                      tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor, mode=mode,
                      kind="decode_replay", **extra))  # fmt: skip
            if args.sparse_profile_steps:
                sync()
                cp.cuda.profiler.start()
                for _ in range(args.sparse_profile_steps):
                    step()
                sync()
                cp.cuda.profiler.stop()
            # back to prefill: the rest of the prompt overwrites the decode steps' K/V
            seq.prompt_ids, seq.output_ids = full, []
            seq.num_cached, seq.decode_steps = ctx, 0
        blocks.release(seq)

    for mode in args.sparse_modes:
        try:
            run_mode(mode)  # its runner (caches, graphs) is freed on return
        except Exception as e:
            import traceback

            traceback.print_exc()
            info["notes"].append(f"{mode}: failed: {e!r}")
        import gc

        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
    emit.result["sparse_summary"] = sparse_summary(emit.result["rows"], floor, fmt.name)
    print(format_sparse_summary(emit.result["sparse_summary"]), flush=True)
    emit.save()


def sparse_summary(rows: list[dict], floor: float, kv: str) -> list[dict]:
    """Per context: sparse and dense figures and sparse-over-dense speedups (`kv`: the KV dtype of the run)."""
    by = {}
    for r in rows:
        if "kind" in r:
            by.setdefault(r["context"], {})[(r["kind"], r["mode"])] = r["ms"]
    out = []
    for ctx in sorted(by):
        d = by[ctx]
        row = dict(context=ctx, kv_dtype=kv, floor_ms=floor * 1e3)
        for kind in ("prefill", "decode_step", "decode_step_overlapped", "decode_replay"):
            s, n = d.get((kind, "sparse")), d.get((kind, "dense"))
            row[f"{kind}_sparse_ms"], row[f"{kind}_dense_ms"] = s, n
            row[f"{kind}_speedup"] = n / s if s and n else None
        out.append(row)
    return out


def format_sparse_summary(summary: list[dict]) -> str:
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| context | KV | decode step sparse ms (tok/s) | dense ms (tok/s) | speedup | replay sparse / dense ms | "
        "replay speedup | sparse replay x floor | prefill sparse s | dense s | speedup | overlapped step sparse / "
        "dense ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        ds, dd = r["decode_step_sparse_ms"], r["decode_step_dense_ms"]
        rs, rd = r["decode_replay_sparse_ms"], r["decode_replay_dense_ms"]
        ps_, pd = r["prefill_sparse_ms"], r["prefill_dense_ms"]
        lines.append(
            f"| {r['context'] // 1024}k | {r['kv_dtype']} | {f(ds)} ({f(ds and 1e3 / ds, '.1f')}) | {f(dd)} ({f(dd and 1e3 / dd, '.1f')}) "
            f"| {f(r['decode_step_speedup'])}x | {f(rs)} / {f(rd)} | {f(r['decode_replay_speedup'])}x | "
            f"{f(rs and rs / r['floor_ms'])} | {f(ps_ and ps_ / 1e3)} | {f(pd and pd / 1e3)} | "
            f"{f(r['prefill_speedup'])}x | {f(r['decode_step_overlapped_sparse_ms'])} / "
            f"{f(r['decode_step_overlapped_dense_ms'])} |"
        )
    return "\n".join(lines)


def plot_sparse(result: dict, path: Path) -> None:
    """Speedup of LServe sparse over our dense mode against context length (decode and prefill)."""
    plt = pyplot()
    if plt is None:
        return

    summ = result["sparse_summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, mk in (
        ("decode_step_speedup", "decode (engine step)", "o-"),
        ("decode_replay_speedup", "decode (graph replay, GPU)", "s--"),
        ("prefill_speedup", "prefill (chunked, end to end)", "^-"),
    ):
        pts = [(r["context"] // 1024, r[key]) for r in summ if r.get(key)]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=label)
            for x, y in pts:
                ax1.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context (k tokens)")
    ax1.set_ylabel("speedup, sparse over dense")
    ax1.set_title("LServe vs dense, Llama-3-8B shape, batch 1")
    ax1.legend(fontsize=8)
    floor = summ[0]["floor_ms"] if summ else None
    for mode, mk in (("sparse", "o-"), ("dense", "s-")):
        pts = [
            (r["context"] // 1024, r[f"decode_step_{mode}_ms"])
            for r in summ
            if r.get(f"decode_step_{mode}_ms")
        ]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=f"{mode} decode step")
    if floor:
        ax2.axhline(floor, color="k", ls=":", label=f"weight-read floor {floor:.2f} ms")
        ax2.axhline(1.3 * floor, color="grey", ls=":", label="1.3x floor")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context (k tokens)")
    ax2.set_ylabel("ms per decode token")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ticks = [r["context"] // 1024 for r in summ]
    for ax in (ax1, ax2):
        ax.set_xticks(ticks, [f"{t}k" for t in ticks])
        ax.minorticks_off()
    kv = result.get("sparse_setup", {}).get("kv_dtype")  # absent from runs before --kv-dtype
    fig.suptitle(
        f"{result.get('device', '')} {result.get('date', '')}{f', KV {kv}' if kv else ''}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the longest context per KV dtype ----------------------------------------------------------------
CAPACITY_KV = ("fp16", "int8", "int4", "fp8")


def kv_capacity(
    cfg, ecfg, classes: list, budget: int, supported: tuple[str, ...], itemsize: int, alloc
) -> list[dict]:
    """Per KV dtype of CAPACITY_KV, dense and LServe mode (head classes `classes`, LServe's default knobs): the
    engine's pool sizing for `budget` bytes of KV memory (kv/layout.pool_pages, as engine/startup.load_local): the
    bytes per context token of the pool that grows with the context (dense pool: values, scales and LServe's
    page statistics), as sized and as allocated (`alloc`, Ops.alloc_kv's signature, makes a one-page cache),
    the pages, the tokens one sequence's context can have (LServe's streaming pool is constant in the
    context), and the engine's startup line. `supported`, `itemsize`: the backend's KV dtypes and float size."""
    from lserve_lite.config import SparseConfig
    from lserve_lite.errors import InvalidRequestError
    from lserve_lite.kv.layout import KVLayout, kv_summary, page_bytes, pool_pages
    from lserve_lite.kv.quant import resolve_kv_format

    ps, out = ecfg.page_size, []
    sp = SparseConfig(enabled=True, page_size=ps)
    layouts = {"dense": None, "lserve": KVLayout.sparse(sp, classes, ecfg.max_num_batched_tokens)}
    for kv in CAPACITY_KV:
        for mode, layout in layouts.items():
            row = dict(kv_dtype=kv, mode=mode, budget_bytes=budget)
            try:
                fmt = resolve_kv_format(kv, supported, cfg.head_dim)
                kv_bytes = fmt.kv_bytes(cfg.head_dim, itemsize)
                dense_b, stream_b = page_bytes(cfg, ps, kv_bytes, layout, itemsize)
                pages, stream = pool_pages(
                    cfg,
                    ps,
                    kv_bytes,
                    budget,
                    layout,
                    ecfg.max_num_seqs,
                    ecfg.num_kv_pages,
                    stat_itemsize=itemsize,
                )
            except InvalidRequestError as e:  # fp8 before sm_89, or a budget that holds no page
                out.append(dict(row, error=str(e)))
                continue
            one = alloc(cfg, ps, 1, layout, 1 if stream else 0, 1, fmt)
            row.update(
                bytes_per_token=dense_b / ps, allocated_bytes_per_token=allocated_page_bytes(one) / ps,
                page_bytes=dense_b, pages=pages, tokens=pages * ps, stream_pages=stream,
                stream_bytes=stream * stream_b,
                startup_line=kv_summary(fmt.name, pages, ps, cfg.num_layers * cfg.num_kv_heads * kv_bytes),
            )  # fmt: skip
            out.append(row)
    return out


def allocated_page_bytes(cache) -> int:
    """Bytes of a one-page cache's dense-pool page as allocated: values, scales and page statistics."""
    pools = (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.kmax, cache.kmin)
    return sum(int(a.nbytes) for pool in pools for a in pool or ())


def format_capacity(rows: list[dict]) -> str:
    """The capacity rows as a table, tokens also over fp16's in the same mode."""
    fp16 = {r["mode"]: r["tokens"] for r in rows if r["kv_dtype"] == "fp16" and "tokens" in r}
    lines = [
        "| KV | mode | B/token sized (allocated) | pages | longest context | x fp16 | streaming pool MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kv_dtype']} | {r['mode']} | {r['error']} | | | | |")
            continue
        x = f"{r['tokens'] / fp16[r['mode']]:.2f}" if r["mode"] in fp16 else "-"
        lines.append(
            f"| {r['kv_dtype']} | {r['mode']} | {r['bytes_per_token']:.0f} ({r['allocated_bytes_per_token']:.0f}) | "
            f"{r['pages']} | {r['tokens']} ({r['tokens'] / 1024:.0f}k) | {x} | {r['stream_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def bench_capacity(args, bw: float, emit) -> None:
    """The longest context per KV dtype on this GPU for the Llama-3-8B-shaped model (random weights, --quantize):
    the KV budget as the engine reads it before its weights go up (CudaOps.kv_budget_bytes at the default
    kv_memory_fraction, the weights' bytes reserved), then kv_capacity for one sequence (max_num_seqs 1)."""
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.config import EngineConfig

    ops = CudaOps()
    cfg = llama3_8b_config(8192)
    model = random_llama(cfg, ops, 8192, quantize=args.quantize)
    weight_bytes = sum(int(a.nbytes) for a in _model_arrays(model))  # the embedding too, as the engine counts
    del model
    cp.get_default_memory_pool().free_all_blocks()
    ecfg = EngineConfig(max_num_seqs=1)
    free, total = cp.cuda.runtime.memGetInfo()
    budget = ops.kv_budget_bytes(ecfg.kv_memory_fraction, weight_bytes)
    classes, pattern = llama3_head_classes(cfg.num_layers, cfg.num_kv_heads, 0.5)
    rows = kv_capacity(cfg, ecfg, classes, budget, ops.kv_dtypes, np.dtype(ops.dtype).itemsize, ops.alloc_kv)
    emit.result["capacity"] = dict(
        model="Llama-3-8B-shape" + (f" {args.quantize}" if args.quantize else ""), weight_bytes=weight_bytes,
        free_bytes=free, total_bytes=total, kv_memory_fraction=ecfg.kv_memory_fraction, budget_bytes=budget,
        max_num_seqs=ecfg.max_num_seqs, max_num_batched_tokens=ecfg.max_num_batched_tokens, pattern=pattern,
        static_sparsity=0.5, rows=rows,
    )  # fmt: skip
    print(f"KV budget {budget / 2**30:.2f} GiB (weights {weight_bytes / 2**30:.2f} GiB, free {free / 2**30:.2f} "
          f"of {total / 2**30:.2f} GiB, kv_memory_fraction {ecfg.kv_memory_fraction})")  # fmt: skip
    print(format_capacity(rows), flush=True)
    emit.save()


def splits_sweep(args, bw: float, emit) -> None:
    """GPU time of one captured decode step vs the decode kernel's split count (cuda_attention.decode_splits
    overridden) and the units a warp takes at least (cuda_attention.DECODE_MIN_UNITS), for SmolLM2- and
    Llama-3-8B-shaped random models at batch 1."""
    import cupy as cp

    from lserve_lite.backends import cuda_attention
    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.backends.cuda_graphs import GraphExecutor
    from lserve_lite.config import ModelConfig
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    default, min_default = cuda_attention.decode_splits, cuda_attention.DECODE_MIN_UNITS
    smol = ModelConfig(
        "LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, 49152, rope_theta=1e5, max_position_embeddings=8192
    )
    for cfg, name, ctxs in (
        (smol, "SmolLM2-shape", (512, 4096)),
        (llama3_8b_config(8192), "Llama-3-8B-shape", (4096,)),
    ):
        ops, ps, max_len = CudaOps(), 64, 8192
        model = random_llama(cfg, ops, max_len)
        wbytes = sum(int(a.nbytes) for a in _model_arrays(model)) - int(model.embed.nbytes)
        cache = ops.alloc_kv(cfg, ps, max_len // ps + 2)
        for layer in range(cfg.num_layers):
            cache.k[layer][...] = cp.random.standard_normal(cache.k[layer].shape, dtype=cp.float32).astype(
                cp.float16
            )
            cache.v[layer][...] = cp.random.standard_normal(cache.v[layer].shape, dtype=cp.float32).astype(
                cp.float16
            )
        hc = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
        table = list(range(max_len // ps + 2))
        settings = [(None, m) for m in (1, 2, 4, 8)] + [(s, 1) for s in (64, 32, 16, 8)]
        for splits, min_units in settings:
            cuda_attention.decode_splits = default if splits is None else (lambda *a, s=splits: s)
            cuda_attention.DECODE_MIN_UNITS = min_units
            graphs = GraphExecutor(ops, model.forward, cache, max_num_seqs=1, max_len=max_len, sizes=(1,))
            for ctx in ctxs:
                plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
                slot = np.array([table[ctx // ps] * ps + ctx % ps])
                replay_step(graphs, np.array([1]), np.array([ctx]), slot, plan, hc)
                g = graphs.graphs[1]
                t = gpu_time(lambda g=g: g.graph.launch(cp.cuda.get_current_stream()), 50)
                emit(dict(model=name, what=f"graph replay, splits={splits or 'default'} min_units={min_units}",
                          batch=1, context=ctx, tokens_per_s=1 / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
        cuda_attention.decode_splits, cuda_attention.DECODE_MIN_UNITS = default, min_default
        del model, cache, graphs
        cp.get_default_memory_pool().free_all_blocks()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --out resolved to a file (a folder gets the section's default name)."""
    from lserve_lite.config import KV_DTYPES, MAX_MODEL_LEN, MAX_NUM_SEQS, SparseConfig
    from lserve_lite.engine_args import bounded_float, bounded_int

    tokens, steps = bounded_int(1, MAX_MODEL_LEN), bounded_int(1, 1 << 16)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/bench_e2e.json")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument(
        "--llama-bench", default=None, help="a llama-bench binary (CUDA build): llama.cpp on the GGUF"
    )
    ap.add_argument("--smol-prompts", type=tokens, nargs="+", default=[512, 4096])
    ap.add_argument("--decode-steps", type=steps, default=64)
    ap.add_argument("--llama-contexts", type=tokens, nargs="+", default=[4096, 32768])
    ap.add_argument(
        "--llama-batches",
        type=bounded_int(1, MAX_NUM_SEQS),
        nargs="+",
        default=[1],
        help="decode batch sizes of the Llama-3-8B-shaped model (graph replay; batch 1 always runs)",
    )
    ap.add_argument("--batch-kv-gib", type=bounded_float(0, 1 << 20), default=96.0,
                    help="KV memory for batched rows' own pages; beyond it the rows share row 0's pages")  # fmt: skip
    ap.add_argument("--prefill-chunk", type=tokens, default=8192)
    ap.add_argument("--smol-budget", type=tokens, default=1024, help="LServe token budget of smollm2-lserve")
    ap.add_argument(
        "--skip", choices=["smollm2", "smollm2-lserve", "llama", "splits"], action="append", default=[]
    )
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="the Llama-3-8B-shaped model's matrices and lm_head as packed int8 / int4 blocks (llama and --sparse sections)")  # fmt: skip
    ap.add_argument("--kv-dtype", choices=[k for k in KV_DTYPES if k != "fp32"], default="auto",  # GPU formats
                    help="KV cache format of the Llama-3-8B-shaped model (llama and --sparse sections)")  # fmt: skip
    ap.add_argument("--llama-prefill-reps", type=bounded_int(1, 1000), default=3,
                    help="timed prefills per context of the llama section (after one warm-up)")  # fmt: skip
    ap.add_argument("--capacity", action="store_true",
                    help="only the longest context per KV dtype (Llama-3-8B shape, dense and LServe)")  # fmt: skip
    ap.add_argument("--splits-sweep", action="store_true", help="also sweep the decode attention split count")
    ap.add_argument(
        "--sparse", action="store_true", help="only the LServe sparse-vs-dense end-to-end section"
    )
    ap.add_argument("--sparse-contexts", type=tokens, nargs="+", default=[32768, 131072, 262144])
    ap.add_argument("--sparse-modes", nargs="+", choices=["sparse", "dense"], default=["sparse", "dense"])
    ap.add_argument(
        "--sparse-chunk", type=tokens, default=16384, help="prefill chunk (max_num_batched_tokens)"
    )
    ap.add_argument("--sparse-decode-steps", type=steps, default=24)
    ap.add_argument(
        "--sparse-sub-pages",
        type=bounded_int(1, 64),
        default=SparseConfig().sub_pages,
        help="LServe's logical pages per page (the selector's statistics: 2 reads half of 4's)",
    )
    ap.add_argument("--sparse-profile-steps", type=bounded_int(0, 1 << 16), default=0,
                    help="after the timings at each context, run this many engine decode steps (one selector "
                         "refresh among them) between cudaProfilerStart / Stop, for ncu --profile-from-start off; "
                         "summarize with tools/profile_decode.py --summarize")  # fmt: skip
    ap.add_argument("--sparse-profile-chunks", type=bounded_int(0, 1 << 20), nargs="*", default=[],
                    help="prefill chunks (0-based indices) run between cudaProfilerStart / Stop, for ncu "
                         "--profile-from-start off (their prefill time then includes the profiler's)")  # fmt: skip
    ap.add_argument(
        "--deadline", type=float, default=None, help="epoch seconds: skip prefill segments past it"
    )
    ap.add_argument("--plot-from", default=None, help="draw the --sparse PNG from this JSON and exit")
    args = ap.parse_args(argv)
    if Path(args.out).is_dir() or not args.out.endswith(".json"):
        only = "_sparse" if args.sparse else "_capacity" if args.capacity else ""
        args.out = str(Path(args.out) / f"bench_e2e{only}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        src = Path(args.plot_from)
        plot_sparse(json.loads(src.read_text()), src.with_suffix(".png"))
        return 0
    require_gpu("bench_e2e.py")
    import cupy as cp

    bw = copy_bandwidth()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"{dev}: device copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'model':18s} {'what':30s} {'kv':5s} {'batch':>5s} {'context':>7s} {'tok/s':>10s} {'ms':>9s} "
          f"{'floor ms':>9s} {'others':>6s}")  # fmt: skip
    rows: list[dict] = []
    result = dict(date=time.strftime("%Y-%m-%d"), device=dev, copy_bandwidth_TBps=bw / 1e12, rows=rows,
                  command=" ".join(["python tools/bench_e2e.py", *(argv or sys.argv[1:])]))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")

    host = Meter().__enter__()

    def emit(r: dict) -> None:
        # other processes' CPU use since the previous row: engine rows are host-bound in part, so a busy host slows them
        r["others_busy_cpus"] = round(host.lap(), 2)
        rows.append(r)
        fl = f"{r['floor_ms']:9.3f}" if "floor_ms" in r else " " * 9
        print(f"{r['model']:18s} {r['what'][:30]:30s} {r.get('kv_dtype', ''):5s} {r['batch']:5d} {r['context']:7d} {r['tokens_per_s']:10.1f} "
              f"{r['ms']:9.3f} {fl} {r['others_busy_cpus']:6.2f}", flush=True)  # fmt: skip
        save()

    emit.result, emit.save = result, save

    failed = 0
    sections = (("llamacpp", bench_llamacpp), ("smollm2", bench_smollm2), ("smollm2-lserve", bench_smollm2_lserve),
                ("llama", bench_llama8b), ("splits", splits_sweep))  # fmt: skip
    if args.sparse:
        sections = (("sparse", bench_e2e_sparse),)
    if args.capacity:
        sections = (("capacity", bench_capacity),)
    for name, fn in sections:
        if (
            name in args.skip
            or (name == "splits" and not args.splits_sweep)
            or (name == "llamacpp" and not args.llama_bench)
        ):
            continue
        try:
            fn(args, bw, emit)
        except Exception:
            import traceback

            traceback.print_exc()
            failed += 1
        cp.get_default_memory_pool().free_all_blocks()
    if args.sparse and result.get("sparse_summary"):
        try:
            plot_sparse(result, Path(args.out).with_suffix(".png"))
        except Exception as e:  # matplotlib may be missing on the device: --plot-from afterwards
            print(f"no plot: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
