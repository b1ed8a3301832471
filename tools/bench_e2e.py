"""End-to-end speed on the CUDA backend: prefill and decode tokens/s, decode time beside the weight-read floor.

Two models:
- SmolLM2-135M-Instruct, real weights, through the engine (LLM -> scheduler -> runner -> CUDA Graph decode
  -> GPU sampling): prefill tokens/s at two prompt lengths, batch-1 decode tokens/s at those contexts,
  batch-64 decode throughput; plus the GPU time of one captured decode step.
- Llama-3-8B-shaped random weights (32 layers, hidden 4096, 32/8 heads, head dim 128, FFN 14336, vocab 128256,
  generated on the GPU, never zeros): prefill of 4k and 32k tokens, batch-1 decode at 4k and 32k context
  through DecodeGraphs, beside the floor = weight bytes / device copy bandwidth measured in this run.

Prints a table, writes JSON to --out. Model source for SmolLM2: --gguf / $LSERVE_SMOLLM2_GGUF (converted
into /tmp/lserve_smollm2_hf), else --model-dir, else the default model.

    python tools/bench_e2e.py --out tools/results/bench_e2e.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    import cupy as cp

    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(ts))


# -- SmolLM2 through the engine ----------------------------------------------------------------------
def smollm2_dir(args) -> Path:
    gguf = args.gguf or os.environ.get("LSERVE_SMOLLM2_GGUF")
    if gguf:
        from lserve_lite.weights.gguf_import import convert_gguf

        out = Path(os.environ.get("LSERVE_SMOLLM2_DIR", "/tmp/lserve_smollm2_hf"))
        if not (out / ".complete").is_file():
            convert_gguf(gguf, out, progress=False, overwrite=True)
            (out / ".complete").write_text(gguf + "\n")
        return out
    if args.model_dir:
        return Path(args.model_dir)
    from lserve_lite.weights.default_model import default_model_dir

    return default_model_dir()


def bench_smollm2(args, bw: float, emit) -> None:
    import cupy as cp

    from lserve_lite import LLM, SamplingParams
    from lserve_lite.config import EngineConfig
    from lserve_lite.engine.cuda_graph import attach_decode_graphs

    llm = LLM(
        str(smollm2_dir(args)),
        backend="cuda",
        config=EngineConfig(num_kv_pages=8192, max_num_seqs=64, max_num_batched_tokens=8192),
    )
    eng = llm.engine
    attach_decode_graphs(eng.runner)
    vocab = eng.cfg.vocab_size
    rng = np.random.default_rng(0)
    wbytes = sum(int(a.nbytes) for a in _model_arrays(eng.runner.model)) - int(eng.runner.model.embed.nbytes)
    wbytes += (
        int(eng.runner.model.lm_head.nbytes) if eng.runner.model.lm_head is eng.runner.model.embed else 0
    )

    def one(prompt_len: int, new: int):
        ids = [int(t) for t in rng.integers(100, vocab, prompt_len)]
        eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
        t0 = time.perf_counter()
        eng.step()  # the whole prompt in one chunk, and the first token
        t1 = time.perf_counter()
        n = 0
        while eng.has_unfinished():
            n += len(eng.step())
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(n, 1)

    one(64, 16)  # warm-up: compile, capture the batch-1 graph
    for plen in args.smol_prompts:
        one(plen, 2)  # warm-up for this prompt length (cuBLAS heuristics, attention variant, plan buffers)
        pre, per_tok = one(plen, args.decode_steps)
        emit(dict(model="SmolLM2-135M", what="prefill", batch=1, context=plen, tokens_per_s=plen / pre,
                         ms=pre * 1e3))  # fmt: skip
        emit(dict(model="SmolLM2-135M", what="decode (engine)", batch=1, context=plen,
                         tokens_per_s=1 / per_tok, ms=per_tok * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
    # the same decode without CUDA Graphs, and with cuBLAS for the small GEMMs
    graphs, ctx0 = eng.runner.graphs, args.smol_prompts[0]
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
    g = eng.runner.graphs.graphs.get(1)
    if g is not None:
        t = gpu_time(lambda: g.graph.launch(cp.cuda.get_current_stream()), 100)
        emit(dict(model="SmolLM2-135M", what="decode graph replay (GPU)", batch=1,
                         context=args.smol_prompts[-1], tokens_per_s=1 / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
    # batch 64: prompts of 256 tokens, 64 new tokens each
    b, new = 64, args.decode_steps
    for _ in range(b):
        ids = [int(t) for t in rng.integers(100, vocab, 256)]
        eng.add_request(ids, SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True))
    while eng.scheduler.waiting:
        eng.step()  # prefill (and first tokens)
    t0, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += len(eng.step())
    dt = time.perf_counter() - t0
    emit(dict(model="SmolLM2-135M", what="decode (engine)", batch=b, context=256, tokens_per_s=n / dt,
                     ms=dt / max(1, n // b) * 1e3))  # fmt: skip
    assert eng.blocks.num_used == 0


def _model_arrays(model):
    out = [model.embed, model.norm]
    if model.lm_head is not model.embed:
        out.append(model.lm_head)
    for ly in model.layers:
        out += [a for a in (ly.ln1, ly.qkv, ly.qkv_bias, ly.o, ly.ln2, ly.gate_up, ly.down) if a is not None]
    return out


# -- Llama-3-8B-shaped random weights ----------------------------------------------------------------
def llama3_8b_config(max_len: int):
    from lserve_lite.config import ModelConfig

    return ModelConfig(
        "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, 128256, rms_norm_eps=1e-5, rope_theta=5e5,
        max_position_embeddings=max_len,
    )  # fmt: skip


def random_llama(cfg, ops, max_len: int, seed: int = 0):
    """A LlamaModel with random float16 weights made on the GPU (LlamaModel.__init__ would need 32 GB of host
    float32 arrays); same attributes as LlamaModel builds."""
    import cupy as cp

    from lserve_lite.backends.base import rope_tables
    from lserve_lite.models.llama import Layer, LlamaModel

    rs = cp.random.RandomState(seed)

    def w(*shape, scale=None, offset=0.0):
        a = rs.standard_normal(shape, dtype=cp.float32) * (scale or 1 / math.sqrt(shape[-1])) + offset
        return a.astype(cp.float16)

    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    m = LlamaModel.__new__(LlamaModel)
    m.cfg, m.ops = cfg, ops
    m.embed, m.norm, m.lm_head = (
        w(cfg.vocab_size, h, scale=1.0),
        w(h, scale=0.1, offset=1.0),
        w(cfg.vocab_size, h),
    )
    m.layers = [
        Layer(
            ln1=w(h, scale=0.1, offset=1.0), qkv=w((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), qkv_bias=None,
            o=w(h, cfg.num_heads * d), ln2=w(h, scale=0.1, offset=1.0), gate_up=w(2 * i, h), down=w(h, i),
        )
        for _ in range(cfg.num_layers)
    ]  # fmt: skip
    cos, sin = rope_tables(cfg, max_len)
    m.rope = (ops.upload(cos), ops.upload(sin))
    return m


def bench_llama8b(args, bw: float, emit) -> None:
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.engine.cuda_graph import DecodeGraphs
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    ctxs = sorted(args.llama_contexts)
    max_len, ps = max(ctxs) + 256, 64
    cfg = llama3_8b_config(max_len)
    ops = CudaOps()
    model = random_llama(cfg, ops, max_len)
    wbytes = sum(int(a.nbytes) for a in _model_arrays(model)) - int(model.embed.nbytes)
    num_pages = math.ceil(max_len / ps) + 2
    cache = ops.alloc_kv(cfg, num_pages, ps)
    table = list(range(num_pages))
    hc = [cp.zeros(cfg.num_kv_heads, cp.int32) for _ in range(cfg.num_layers)]
    rng = np.random.default_rng(0)

    def prefill(start: int, n: int):
        pos = np.arange(start, start + n)
        slots = np.asarray(table)[pos // ps] * ps + pos % ps
        plan = ops.prepare_plan(build_plan(BatchLayout([n], [start + n], [table]), ps))
        up = ops.upload
        return model.forward(up(rng.integers(0, cfg.vocab_size, n)), up(pos), up(slots), plan, cache, hc,
                             up(np.array([n - 1])))  # fmt: skip

    chunk = args.prefill_chunk
    for ctx in ctxs:  # prefill the sequence from 0 to ctx in chunks (the cache ends up holding real K/V)

        def run_prefill(ctx=ctx):
            for s in range(0, ctx, chunk):
                prefill(s, min(chunk, ctx - s))

        t = gpu_time(run_prefill, 3, warm=1)
        emit(dict(model="Llama-3-8B-shape", what=f"prefill (chunks of {chunk})", batch=1, context=ctx,
                         tokens_per_s=ctx / t, ms=t * 1e3))  # fmt: skip
    graphs = DecodeGraphs(model, ops, cache, max_num_seqs=1, max_len=max_len, page_size=ps, sizes=(1,))
    floor = wbytes / bw

    def decode(ctx: int, label: str, host_steps: bool = True):
        pos = np.array([ctx])
        slot = np.array([table[ctx // ps] * ps + ctx % ps])
        plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
        ids = rng.integers(0, cfg.vocab_size, 1)

        def step():
            return graphs.run(ids, pos, slot, plan, cache, hc)

        assert step() is not None
        g = graphs.graphs[1]
        t = gpu_time(lambda: g.graph.launch(cp.cuda.get_current_stream()), 30)
        emit(dict(model="Llama-3-8B-shape", what=f"decode graph replay (GPU){label}", batch=1, context=ctx,
                         tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor))  # fmt: skip
        if host_steps:
            t0 = time.perf_counter()
            for _ in range(20):
                step()
                cp.cuda.get_current_stream().synchronize()
            t = (time.perf_counter() - t0) / 20
            emit(dict(model="Llama-3-8B-shape", what=f"decode step (host+GPU){label}", batch=1, context=ctx,
                             tokens_per_s=1 / t, ms=t * 1e3, floor_ms=floor * 1e3, x_floor=t / floor))  # fmt: skip

    for ctx in ctxs:
        decode(ctx, "")
    ops.small_gemv = False
    graphs.graphs.clear()
    decode(ctxs[0], ", cuBLAS", host_steps=False)
    ops.small_gemv = True


def splits_sweep(args, bw: float, emit) -> None:
    """GPU time of one captured decode step vs the decode kernel's split count (cuda_attention.decode_splits
    overridden), for SmolLM2- and Llama-3-8B-shaped random models at batch 1."""
    import cupy as cp

    from lserve_lite.backends import cuda_attention
    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.config import ModelConfig
    from lserve_lite.engine.cuda_graph import DecodeGraphs
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    default = cuda_attention.decode_splits
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
        cache = ops.alloc_kv(cfg, max_len // ps + 2, ps)
        for layer in range(cfg.num_layers):
            cache.k[layer][...] = cp.random.standard_normal(cache.k[layer].shape, dtype=cp.float32).astype(
                cp.float16
            )
            cache.v[layer][...] = cp.random.standard_normal(cache.v[layer].shape, dtype=cp.float32).astype(
                cp.float16
            )
        hc = [cp.zeros(cfg.num_kv_heads, cp.int32) for _ in range(cfg.num_layers)]
        table = list(range(max_len // ps + 2))
        for splits in (None, 128, 64, 32, 16, 8):
            cuda_attention.decode_splits = default if splits is None else (lambda *a, s=splits: s)
            graphs = DecodeGraphs(
                model, ops, cache, max_num_seqs=1, max_len=max_len, page_size=ps, sizes=(1,)
            )
            for ctx in ctxs:
                plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
                slot = np.array([table[ctx // ps] * ps + ctx % ps])
                assert graphs.run(np.array([1]), np.array([ctx]), slot, plan, cache, hc) is not None
                g = graphs.graphs[1]
                t = gpu_time(lambda g=g: g.graph.launch(cp.cuda.get_current_stream()), 50)
                emit(dict(model=name, what=f"graph replay, splits={splits or 'default'}", batch=1, context=ctx,
                          tokens_per_s=1 / t, ms=t * 1e3, floor_ms=wbytes / bw * 1e3))  # fmt: skip
        cuda_attention.decode_splits = default
        del model, cache, graphs
        cp.get_default_memory_pool().free_all_blocks()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results/bench_e2e.json")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--smol-prompts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--llama-contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--skip", choices=["smollm2", "llama", "splits"], action="append", default=[])
    ap.add_argument("--splits-sweep", action="store_true", help="also sweep the decode attention split count")
    args = ap.parse_args(argv)
    import cupy as cp

    bw = copy_bandwidth()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"{dev}: device copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(
        f"{'model':18s} {'what':30s} {'batch':>5s} {'context':>7s} {'tok/s':>10s} {'ms':>9s} {'floor ms':>9s}"
    )
    rows: list[dict] = []
    result = dict(date=time.strftime("%Y-%m-%d"), device=dev, copy_bandwidth_TBps=bw / 1e12, rows=rows,
                  command=" ".join(["python tools/bench_e2e.py", *(argv or sys.argv[1:])]))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def emit(r: dict) -> None:
        rows.append(r)
        fl = f"{r['floor_ms']:9.3f}" if "floor_ms" in r else " " * 9
        print(f"{r['model']:18s} {r['what'][:30]:30s} {r['batch']:5d} {r['context']:7d} {r['tokens_per_s']:10.1f} "
              f"{r['ms']:9.3f} {fl}", flush=True)  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    failed = 0
    for name, fn in (("smollm2", bench_smollm2), ("llama", bench_llama8b), ("splits", splits_sweep)):
        if name in args.skip or (name == "splits" and not args.splits_sweep):
            continue
        try:
            fn(args, bw, emit)
        except Exception:
            import traceback

            traceback.print_exc()
            failed += 1
        cp.get_default_memory_pool().free_all_blocks()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
