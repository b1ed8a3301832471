"""Short-context graphs A/B: graph replay of one batch-1 decode step, random SmolLM2- and Llama-3-8B-shaped models
(fp16 or packed int4 weights), the graph of one decode CTA a list (short_len = the context) against the default
graph (split + combine), alternating, per context; replay outputs compared. Usage: short_ab.py OUT.json [int4]"""

import json
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, "tools")
from bench_e2e import gpu_time, llama3_8b_config, random_llama, replay_step  # noqa: E402

from lserve_lite.backends.cuda import CudaOps  # noqa: E402
from lserve_lite.backends.cuda_graphs import GraphExecutor  # noqa: E402
from lserve_lite.config import ModelConfig  # noqa: E402
from lserve_lite.sparse.plan import BatchLayout, build_plan  # noqa: E402


def main() -> None:
    quant = sys.argv[2] if len(sys.argv) > 2 else None
    smol = ModelConfig(
        "LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, 49152, rope_theta=1e5, max_position_embeddings=8192
    )
    rows = []
    for cfg, name, ctxs in (
        (smol, "SmolLM2-shape", (256, 512, 1024, 2048, 4096)),
        (llama3_8b_config(8192), "Llama-3-8B-shape", (512, 2048, 4096)),
    ):
        ops, ps, max_len = CudaOps(), 64, 8192
        model = random_llama(cfg, ops, max_len, quantize=quant)
        cache = ops.alloc_kv(cfg, ps, max_len // ps + 2)
        for layer in range(cfg.num_layers):
            for pool in (cache.k[layer], cache.v[layer]):
                pool[...] = cp.random.standard_normal(pool.shape, dtype=cp.float32).astype(cp.float16)
        hc = [np.zeros(cfg.num_kv_heads, np.int32) for _ in range(cfg.num_layers)]
        table = list(range(max_len // ps + 2))
        execs = {
            s: GraphExecutor(
                ops, model.forward, cache, max_num_seqs=1, max_len=max_len, sizes=(1,), short_len=s
            )
            for s in (0, 8192)
        }
        for ctx in ctxs:
            plan = build_plan(BatchLayout([1], [ctx + 1], [table]), ps)
            slot = np.array([table[ctx // ps] * ps + ctx % ps])
            outs, times = {}, {0: [], 8192: []}
            for s, ex in execs.items():
                outs[s] = replay_step(ex, np.array([1]), np.array([ctx]), slot, plan, hc).astype(cp.float32)
                assert (ex.short_replays > 0) == (s > 0)
            for _ in range(3):
                for s, ex in execs.items():
                    g = ex.short[1] if s else ex.graphs[1]
                    times[s].append(
                        gpu_time(lambda g=g: g.graph.launch(cp.cuda.get_current_stream()), 50) * 1e3
                    )
            diff = float(cp.abs(outs[8192] - outs[0]).max() / cp.abs(outs[0]).max())
            r = dict(
                model=name,
                weights=quant or "fp16",
                context=ctx,
                split_ms=times[0],
                one_cta_ms=times[8192],
                rel_diff=diff,
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
        del model, cache, execs
        cp.get_default_memory_pool().free_all_blocks()
    json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
