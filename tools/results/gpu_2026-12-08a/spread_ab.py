"""A / B of the spread norm (LSERVE_CUDA_SPREAD_NORM; kernels/spread_norm.cuh) on batch-1 decode graph replays:
random packed weights of SmolLM2-135M's shape (q4_1, int8; 512 context) and the Llama-3-8B shape (int8, int4; 4096
context), each built twice on the same seed (spread off / on), replays timed alternately (off, on, off, on: median
of 50 CUDA-event-timed replays each), with the weight-read floor from the same run's copy bandwidth and the largest
logit difference between the two graphs' outputs (random weights: a sanity check, the GPU tests check numerics).

    python3 tools/results/gpu_2026-12-08a/spread_ab.py [--json out.json] [--only smollm2|llama8b]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_e2e import (  # noqa: E402
    _model_arrays,
    copy_bandwidth,
    gpu_time,
    llama3_8b_config,
    random_llama,
    replay_step,
    sequence_forward,
)


def smollm2_config(max_len: int):
    from lserve_lite.config import ModelConfig

    return ModelConfig("LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, 49152, rms_norm_eps=1e-5, rope_theta=1e5,
                       max_position_embeddings=max_len)  # fmt: skip


def built(cfg, quantize: str, spread: bool, ctx: int):
    """(graph launcher, logits of one replay, weight bytes) of a model prefilled to ctx, spread on or off."""
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.backends.cuda_graphs import GraphExecutor
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    ps, max_len = 64, ctx + 256
    ops = CudaOps(spread_norm=spread)
    model = random_llama(cfg, ops, max_len, quantize=quantize)
    cache = ops.alloc_kv(cfg, ps, max_len // ps + 2)
    table = list(range(max_len // ps + 2))
    hc = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
    rng = np.random.default_rng(0)
    for s in range(0, ctx, 4096):
        sequence_forward(model, cache, [cp.asarray(c) for c in hc], table, ps, rng, s, min(4096, ctx - s))
    graphs = GraphExecutor(ops, model.forward, cache, max_num_seqs=1, max_len=max_len, sizes=(1,))
    plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
    slot = np.array([table[ctx // ps] * ps + ctx % ps])
    logits = replay_step(graphs, np.array([7]), np.array([ctx]), slot, plan, hc)
    logits = cp.asnumpy(logits).astype(np.float64)
    g = graphs.graphs[1]
    wbytes = sum(int(a.nbytes) for a in _model_arrays(model)) - int(model.embed.nbytes)
    return (lambda: g.graph.launch(cp.cuda.get_current_stream())), logits, wbytes, (ops, model, cache, graphs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["smollm2", "llama8b"], default=None)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    # SmolLM2's shape in q4_1 (its GGUF's format; this call's first run took int4, whose 128-value groups do not
    # divide K = 576: random_device_quant's rows then read their neighbours' scales) and int8
    cases = [("smollm2", q, 512) for q in ("q4_1", "int8")] + [("llama8b", q, 4096) for q in ("int8", "int4")]
    for shape, quant, ctx in cases:
        if args.only and shape != args.only:
            continue
        cfg = smollm2_config(ctx + 256) if shape == "smollm2" else llama3_8b_config(ctx + 256)
        runs = {s: built(cfg, quant, s, ctx) for s in (False, True)}
        times = {False: [], True: []}
        for _ in range(2):
            for s in (False, True):
                times[s].append(gpu_time(runs[s][0], 50, warm=10))
        off, on = (float(np.median(times[s])) for s in (False, True))
        floor = runs[False][2] / bw
        diff = float(np.abs(runs[True][1] - runs[False][1]).max() / np.abs(runs[False][1]).max())
        row = dict(shape=shape, weights=quant, context=ctx, off_us=off * 1e6, on_us=on * 1e6, on_over_off=on / off,
                   floor_us=floor * 1e6, off_x_floor=off / floor, on_x_floor=on / floor, logits_rel_diff=diff,
                   times_us={str(s): [t * 1e6 for t in times[s]] for s in times})  # fmt: skip
        rows.append(row)
        print(f"{shape:8s} {quant} ctx {ctx}: off {off * 1e6:8.1f} us  on {on * 1e6:8.1f} us  on/off {on / off:.4f}  "
              f"floor {floor * 1e6:7.1f} us (off {off / floor:.3f}x, on {on / floor:.3f}x)  logits rel diff {diff:.1e}",
              flush=True)  # fmt: skip
        del runs
        if args.json:  # after every row: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(dict(copy_gbps=bw / 1e9, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
