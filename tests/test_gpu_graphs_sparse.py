"""LServe sparse decode inside CUDA Graphs equals eager sparse decode (gpu-marked; skipped without a GPU).

Two engines on the same tiny random Llama (head_dim 64) in LServe mode, one with decode CUDA Graphs and one
without, run the same requests in lock step: every step's logits are compared, and both continue with the
eager engine's greedy token. Streaming heads (two-pool cache, ring of local pages), page selection (budget
below the context, refresh every 3 steps: the graph serves refresh and reuse steps), and batches that need
padding (5 live sequences in the size-8 graph, then 3 in the size-4 graph).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sparse_tiny64(tmp_path_factory):
    from tiny_models import make_tiny

    p = make_tiny(
        tmp_path_factory.mktemp("tiny64_graphs"),
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")  # one streaming KV head per layer
    return p


def _engine(path, graphs: bool, **sparse):
    from lserve_lite import EngineConfig, SparseConfig
    from lserve_lite.engine.llm_engine import LLMEngine

    sp = SparseConfig(
        enabled=True, page_size=16, sub_pages=4, prefill_sink=32, prefill_local=128, decode_sink=32,
        decode_local=64, token_budget=128, select_interval=3, **sparse,
    ).validate()  # fmt: skip
    ecfg = EngineConfig(
        page_size=16,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        num_kv_pages=512,
        cuda_graphs=graphs,
        sparse=sp,
    )
    return LLMEngine(str(path), backend="cuda", config=ecfg)


def _lockstep(eager, graph, prompts, max_new):
    """Step both engines together; returns (steps, decode steps, near ties skipped)."""
    from lserve_lite import SamplingParams

    for eng in (eager, graph):
        for p, m in zip(prompts, max_new, strict=True):
            eng.add_request(p, SamplingParams(temperature=0, max_new_tokens=m, ignore_eos=True))
    steps = decode_steps = ties = 0
    while eager.has_unfinished():
        res = []
        for eng in (eager, graph):
            batch = eng.scheduler.schedule()
            pure = all(
                n == 1 and s.num_cached >= len(s.prompt_ids) for s, n in zip(batch.seqs, batch.num_new)
            )
            logits = eng.runner.run(batch.seqs, batch.num_new)
            done = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new)) if s.num_pending == 0]
            res.append((batch, done, eng.ops.to_numpy(logits)[np.asarray(done)] if done else None))
        (be, de, le), (bg, dg, lg) = res
        assert be.num_new == bg.num_new and de == dg, f"step {steps}: the schedules differ"
        assert [s.num_cached for s in be.seqs] == [s.num_cached for s in bg.seqs]
        steps += 1
        decode_steps += pure  # every row decoding: the graph engine must have replayed a graph
        if not de:
            continue
        scale = float(np.abs(le).max())
        err = float(np.abs(lg - le).max()) / scale
        assert err < 5e-3, f"step {steps}: graph vs eager logits rel err {err:.3g}"
        te, tg = le.argmax(-1), lg.argmax(-1)
        top2 = np.sort(le, axis=-1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) < 1e-3 * scale  # a near tie may flip under fp16 rounding
        assert np.all((te == tg) | tie), f"step {steps}: greedy tokens differ: eager {te}, graph {tg}"
        ties += int(np.sum(tie & (te != tg)))
        for eng, batch in ((eager, be), (graph, bg)):
            for i, t in zip(de, te, strict=True):
                eng._append(batch.seqs[i], int(t))
    assert not graph.has_unfinished()
    return steps, decode_steps, ties


def test_sparse_decode_graphs_match_eager(sparse_tiny64):
    eager, graph = _engine(sparse_tiny64, graphs=False), _engine(sparse_tiny64, graphs=True)
    assert not hasattr(eager.runner.executor, "graphs") and hasattr(graph.runner.executor, "graphs")
    assert graph.layout is not None and graph.layout.has_streaming and graph.layout.select_pages == 8
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(3, 320, n)] for n in (150, 420, 333, 200, 260)]
    steps, decode_steps, ties = _lockstep(eager, graph, prompts, max_new=[60, 48, 48, 20, 20])
    g = graph.runner.executor
    assert g.sparse and g.visit_pages == 9  # budget 8 pages + the newest; window 2 + 4 + 1 = 7
    assert {4, 8} <= set(g.graphs), f"captured sizes {sorted(g.graphs)}"
    assert g.replays >= 30 and g.replays == decode_steps, (g.replays, decode_steps, steps)
    assert ties <= 2
    for eng in (eager, graph):
        assert eng.blocks.num_used == 0


def test_sparse_graph_one_token_prefill_chunk_runs_eagerly(sparse_tiny64):
    """A one-token prefill chunk (no page budget, prefill window) is not a decode step: it runs eagerly."""
    from lserve_lite import SamplingParams
    from lserve_lite.sequence import Sequence

    eng = _engine(sparse_tiny64, graphs=True)
    rng = np.random.default_rng(3)
    seq = Sequence([int(t) for t in rng.integers(3, 320, 300)], SamplingParams(max_new_tokens=4))
    eng.blocks.grow(seq, 301)
    while seq.num_pending > 1:
        eng.runner.run([seq], [min(64, seq.num_pending - 1)])
    eng.runner.run([seq], [1])  # the last prompt token alone: dense heads visit every page
    assert eng.runner.executor.replays == 0
    seq.output_ids.append(5)
    eng.runner.run([seq], [1])  # a decode step
    assert eng.runner.executor.replays == 1
    eng.blocks.release(seq)


def test_streaming_only_layout_graphs_match_eager(sparse_tiny64):
    """static_sparsity 1 (no dense head: the dense pool holds page ids only, the streaming pool takes the whole
    budget) runs on the GPU, graphs equal to eager, and frees every page."""
    eager, graph = (_engine(sparse_tiny64, graphs=g, static_sparsity=1.0) for g in (False, True))
    assert graph.layout.streaming_only and graph.kv_summary().startswith(
        "KV cache fp16 (streaming heads only"
    )
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 320, n)] for n in (150, 300, 90)]
    steps, decode_steps, ties = _lockstep(eager, graph, prompts, max_new=[24, 24, 12])
    assert graph.runner.executor.replays == decode_steps > 0 and ties <= 1
    for eng in (eager, graph):
        assert eng.blocks.num_used == 0
