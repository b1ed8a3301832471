"""LServe on the CPU: sparse attention equals dense attention with the element mask materialized."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig
from lserve_lite.backends import cpu as cpu_backend
from lserve_lite.backends.reference.attention import paged_attention_sparse_ref, visited_pages
from lserve_lite.backends.reference.page_select import select_pages_ref
from lserve_lite.backends.reference.page_stats import update_page_stats
from lserve_lite.config import GROUP_REDUCE, ModelConfig
from lserve_lite.errors import InvalidRequestError
from lserve_lite.kv.block_manager import BlockManager
from lserve_lite.kv.layout import KVLayout
from lserve_lite.sequence import Sequence
from lserve_lite.sparse.plan import BatchLayout, build_plan


def masked_dense(q, keys, vals, qpos, mask):
    """Plain attention over a sequence's contiguous keys with an explicit [Nq, Hkv, T] mask."""
    nq, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    out = np.zeros((nq, hq, d), np.float32)
    for h in range(hq):
        s = q[:, h] @ keys[:, h // g].T / math.sqrt(d)
        s = np.where(mask[:, h // g], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ vals[:, h // g]
    return out


def _pools(rng, seq_len, hkv, d, ps, head_class, ring):
    """Random keys of one sequence scattered into shuffled pages of a dense and a streaming pool."""
    keys = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
    vals = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
    n_pages = -(-seq_len // ps)
    table = list(rng.permutation(n_pages + 5)[:n_pages])
    sink_pages, ring_pages = ring
    stable = list(rng.permutation(sink_pages + ring_pages + 3)[: sink_pages + ring_pages])
    dense, stream = np.nonzero(head_class == 0)[0], np.nonzero(head_class == 1)[0]
    slot = np.zeros(hkv, np.int32)
    slot[dense], slot[stream] = np.arange(dense.size), np.arange(stream.size)
    kd = np.full((n_pages + 5, dense.size, ps, d), np.nan, np.float32)
    vd = kd.copy()
    ks = np.full((sink_pages + ring_pages + 3, stream.size, ps, d), np.nan, np.float32)
    vs = ks.copy()
    for t in range(seq_len):
        lp = t // ps
        kd[table[lp], :, t % ps], vd[table[lp], :, t % ps] = keys[t, dense], vals[t, dense]
        ri = lp if lp < sink_pages else sink_pages + (lp - sink_pages) % ring_pages
        ks[stable[ri], :, t % ps], vs[stable[ri], :, t % ps] = keys[t, stream], vals[t, stream]
    return keys, vals, table, stable, kd, vd, ks, vs, slot


@pytest.mark.parametrize("q_len,ctx,group", [(64, 64, 1), (37, 300, 3), (200, 700, 4), (1, 513, 2)])
def test_prefill_two_pools_equal_masked_dense(q_len, ctx, group):
    rng = np.random.default_rng(q_len * 7 + ctx)
    hkv, d, ps, sink, local = 4, 16, 16, 32, 80
    head_class = np.array([0, 1, 1, 0], np.int32)
    ring = (2, math.ceil((local + q_len) / ps) + 1)
    keys, vals, table, stable, kd, vd, ks, vs, slot = _pools(rng, ctx, hkv, d, ps, head_class, ring)
    # The ring only holds the latest pages: it must have been filled in the order the engine writes.
    q = rng.standard_normal((q_len, hkv * group, d)).astype(np.float32)
    lay = BatchLayout([q_len], [ctx], [table], stream_tables=[stable], windows=[(sink, local)])
    plan = build_plan(lay, ps, q_block=32, ring=ring)
    got = paged_attention_sparse_ref(q, kd, vd, ks, vs, plan, head_class, slot).reshape(q_len, -1, d)
    qpos = np.arange(ctx - q_len, ctx)
    kpos = np.arange(ctx)
    causal = kpos[None, :] <= qpos[:, None]
    lam = causal & ((kpos[None, :] < sink) | (qpos[:, None] - kpos[None, :] < local))
    mask = np.stack([lam if c else causal for c in head_class], axis=1)
    want = masked_dense(q, keys, vals, qpos, mask)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ctx,keep", [(1000, 8), (1000, 100), (130, 4)])
def test_decode_selection_equals_masked_dense(ctx, keep):
    rng = np.random.default_rng(ctx + keep)
    hkv, d, ps, sub, group = 2, 16, 16, 4, 3
    head_class = np.zeros(hkv, np.int32)
    keys, vals, table, _, kd, vd, ks, vs, slot = _pools(rng, ctx, hkv, d, ps, head_class, (0, 1))
    kmax = np.zeros((kd.shape[0], hkv, sub, d), np.float32)
    kmin = np.zeros_like(kmax)
    update_page_stats(kmax, kmin, kd, (np.asarray(table)[np.arange(ctx) // ps] * ps + np.arange(ctx) % ps))
    q = rng.standard_normal((1, hkv * group, d)).astype(np.float32)
    lay = BatchLayout([1], [ctx], [table], sel_slots=[3], sel_keep=[keep], sel_refresh=[1])
    plan = build_plan(lay, ps)
    sel_idx = np.full((5, hkv, keep + 1), -1, np.int32)
    sel_cnt = np.zeros((5, hkv), np.int32)
    select_pages_ref(q, kmax, kmin, plan, head_class, slot, sel_idx, sel_cnt)
    n_pages = -(-ctx // ps)
    assert (sel_cnt[3] == min(keep, n_pages)).all()
    got = paged_attention_sparse_ref(q, kd, vd, ks, vs, plan, head_class, slot, sel_idx, sel_cnt)
    mask = np.zeros((1, hkv, ctx), bool)
    for g in range(hkv):
        _, lpages = visited_pages(plan, 0, 0, g, sel_idx, sel_cnt)
        assert n_pages - 1 in lpages  # the newest page is always visited
        for lp in lpages:
            mask[0, g, lp * ps : (lp + 1) * ps] = True
    mask &= np.arange(ctx)[None, None, :] < ctx
    want = masked_dense(q, keys, vals, np.array([ctx - 1]), mask)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-5, rtol=1e-4)
    if keep >= n_pages:  # budget covers the context: exactly dense decode
        full = masked_dense(q, keys, vals, np.array([ctx - 1]), np.ones((1, hkv, ctx), bool))
        np.testing.assert_allclose(got.reshape(full.shape), full, atol=2e-5, rtol=1e-4)


def test_oracle_selection_picks_the_heaviest_pages():
    """group_reduce "oracle" (evaluation): select_pages_ref ranks pages by the exact attention of the
    current query over the dense pool's keys; the newest page stays."""
    rng = np.random.default_rng(9)
    hkv, d, ps, sub, group, ctx, keep = 2, 16, 16, 4, 3, 400, 5
    head_class = np.zeros(hkv, np.int32)
    _, _, table, _, kd, vd, ks, vs, slot = _pools(rng, ctx, hkv, d, ps, head_class, (0, 1))
    kmax = np.zeros((kd.shape[0], hkv, sub, d), np.float32)
    q = 3 * rng.standard_normal((1, hkv * group, d)).astype(np.float32)
    plan = build_plan(BatchLayout([1], [ctx], [table], sel_slots=[0], sel_keep=[keep], sel_refresh=[1]), ps,
                      group_reduce="oracle")  # fmt: skip
    sel_idx = np.full((1, hkv, keep + 1), -1, np.int32)
    sel_cnt = np.zeros((1, hkv), np.int32)
    select_pages_ref(q, kmax, kmax, plan, head_class, slot, sel_idx, sel_cnt, k=kd)
    n = -(-ctx // ps)
    for g in range(hkv):
        keys = kd[np.asarray(table)[:n], slot[g]].reshape(-1, d)[:ctx]
        w = np.exp(q[0, g * group : (g + 1) * group] @ keys.T / np.sqrt(d))
        mass = (w / w.sum(1, keepdims=True)).mean(0)
        mass = np.bincount(np.arange(ctx) // ps, mass, n)
        want = np.sort(np.append(np.argsort(-mass[:-1], kind="stable")[: keep - 1], n - 1))
        np.testing.assert_array_equal(sel_idx[0, g, : sel_cnt[0, g]], want)


def test_oracle_runs_on_the_cpu_float_cache_only(tiny_llama, tmp_path):
    ids = [int(t) for t in np.random.default_rng(8).integers(3, 320, 300)]
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    _, llm = _sparse_tiny(tiny_llama, tmp_path, token_budget=64, group_reduce="oracle")
    assert len(llm.generate([ids], params)[0].token_ids) == 6
    p = tmp_path / "m"
    sp = SparseConfig(enabled=True, page_size=16, decode_local=64, prefill_local=128, group_reduce="oracle")
    ecfg = EngineConfig(page_size=16, max_num_batched_tokens=64, sparse=sp, kv_dtype="int8")
    with pytest.raises(InvalidRequestError, match="oracle is an evaluation selector"):
        LLM(str(p), backend="cpu", config=ecfg)


def _sparse_tiny(tiny_llama, tmp_path, engine_kw: dict | None = None, **kw):
    """An LServe LLM of the tiny model (half its KV heads streaming); `kw`: sparse knobs, `engine_kw`: engine
    limits over page_size 16 and 64-token steps."""
    import shutil

    p = tmp_path / "m"
    shutil.copytree(tiny_llama, p)
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    knobs = dict(
        page_size=16, sub_pages=4, prefill_sink=32, prefill_local=128, decode_sink=32, decode_local=64
    )
    knobs.update(kw)
    sp = SparseConfig(enabled=True, **knobs).validate()
    limits = dict(page_size=16, max_num_batched_tokens=64) | (engine_kw or {})
    return p, LLM(str(p), backend="cpu", config=EngineConfig(sparse=sp, **limits))


def test_engine_budget_over_context_equals_dense(tiny_llama, tmp_path):
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 320, 300)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    _, sparse = _sparse_tiny(tiny_llama, tmp_path, static_sparsity=0.0, token_budget=1024, select_interval=1)
    dense = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(page_size=16, max_num_batched_tokens=64))
    assert sparse.generate([ids], params)[0].token_ids == dense.generate([ids], params)[0].token_ids
    assert sparse.engine.blocks.num_used == 0


def test_no_selection_while_the_budget_covers_the_context(tiny_llama, tmp_path, monkeypatch):
    """A decode row whose pages all fit its budget selects nothing (page budget 0, no selector call: its dense heads
    visit the whole list, what a selection would keep); the first step past the budget selects, then every
    select_interval steps; a second run gives the same tokens."""
    ids = [int(t) for t in np.random.default_rng(7).integers(3, 320, 40)]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    _, llm = _sparse_tiny(tiny_llama, tmp_path, token_budget=64, select_interval=4)  # 4 pages of 16
    calls = []  # (context, page budget) of each selector call

    def spy(*args):
        plan = args[3]
        calls.append((int(plan.seq_ctx[0]), int(plan.qb_keep[0]), int(plan.qb_refresh[0])))
        return select(*args)

    select = cpu_backend.select_pages_numba
    monkeypatch.setattr(cpu_backend, "select_pages_numba", spy)
    got = llm.generate([ids], params)[0].token_ids
    contexts = sorted({c for c, _, _ in calls})
    assert contexts == [65, 69, 73, 77], contexts  # 40 + 40 tokens: past 4 pages at 65, then every 4th step
    assert all(keep == 4 and refresh == 1 for _, keep, refresh in calls)
    assert got == llm.generate([ids], params)[0].token_ids  # the same choices again: deterministic


def test_a_one_token_recompute_chunk_is_planned_as_prefill(tiny_llama, tmp_path):
    """A preempted sequence recomputes its prompt and outputs' K/V in prefill chunks; a chunk of one token among
    them (the step budget's last token) was planned as a decode row: decode windows, a page selection, and a
    selection count the real first decode step then continued from (reusing that stale selection)."""
    ids = [int(t) for t in np.random.default_rng(7).integers(3, 320, 40)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    _, llm = _sparse_tiny(tiny_llama, tmp_path, token_budget=32, select_interval=4)
    blocks, runner = llm.engine.blocks, llm.engine.runner
    rid = llm.engine.add_request(ids, params)
    seq = llm.engine.seqs[rid]
    while len(seq.output_ids) < 8:
        llm.engine.step()
    blocks.release(seq)  # preempted with 8 outputs: 48 tokens to recompute
    seq.preempt()
    blocks.grow(seq, seq.num_tokens)
    prefill, decode = (0, 32, 128), (2, 32, 64)  # (page budget, sink, local) of the row
    for cached in (len(ids) + 2, seq.num_tokens - 1):  # mid-recompute; the last sampled token
        seq.num_cached = cached
        plan = runner.prepare([seq], [1]).plan
        runner.advance([seq], [1])  # the step ran: its selection count moves on (here: stays 0)
        assert (int(plan.qb_keep[0]), int(plan.qb_sink[0]), int(plan.qb_local[0])) == prefill
        assert seq.decode_steps == 0
    seq.output_ids.append(5)  # the next sample decodes, and selects anew
    blocks.grow(seq, seq.num_tokens)
    seq.num_cached = seq.num_tokens - 1
    plan = runner.prepare([seq], [1]).plan
    assert seq.decode_steps == 0  # until the step has run
    runner.advance([seq], [1])
    assert (int(plan.qb_keep[0]), int(plan.qb_sink[0]), int(plan.qb_local[0])) == decode
    assert int(plan.qb_refresh[0]) == 1 and seq.decode_steps == 1


def test_a_preempted_request_resumes_as_a_fresh_request_of_its_tokens(tiny_llama, tmp_path):
    """A preempted request recomputes its prompt and reply so far by prefill (docs/PREFIX_CACHE.md): what it
    generates after its last preemption is what a fresh request of those tokens generates. One-token chunks of
    that recompute (a step budget of 5 beside decodes) were decode rows (decode windows, a page selection), the
    last sampled token's too, so the continuation depended on where the chunks fell."""
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 320, int(n))] for n in rng.integers(5, 90, 6)]
    knobs = dict(prefill_sink=16, prefill_local=32, decode_sink=16, decode_local=32, token_budget=48)
    limits = dict(num_kv_pages=14, max_num_batched_tokens=5, prefix_caching=False)
    _, llm = _sparse_tiny(tiny_llama, tmp_path, limits, static_sparsity=0.5, select_interval=3, **knobs)
    last: dict[int, int] = {}  # prompt index -> outputs it had when last preempted
    preempt = llm.engine.scheduler._preempt

    def spy(seq):
        last[prompts.index(seq.prompt_ids)] = len(seq.output_ids)
        preempt(seq)

    llm.engine.scheduler._preempt = spy
    params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    resumed = {i: k for i, k in last.items() if k}
    assert len(resumed) >= 2, "the pool was meant to preempt requests mid-reply"
    for i, k in resumed.items():
        fresh = SamplingParams(temperature=0, max_new_tokens=60 - k, ignore_eos=True)
        assert outs[i][k:] == llm.generate([prompts[i] + outs[i][:k]], fresh)[0].token_ids, (i, k)


@pytest.mark.parametrize("group_reduce", GROUP_REDUCE)
def test_engine_streaming_heads_and_selection_run_and_free(tiny_llama, tmp_path, monkeypatch, group_reduce):
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(3, 320, int(n))] for n in rng.integers(100, 600, 6)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    _, llm = _sparse_tiny(
        tiny_llama, tmp_path, token_budget=128, select_interval=4, group_reduce=group_reduce
    )
    assert llm.engine.layout.has_streaming
    used = []  # the group reductions the CPU selector was asked for

    def spy(*args):
        used.append(args[3].group_reduce)  # the plan's
        return select(*args)

    select = cpu_backend.select_pages_numba
    monkeypatch.setattr(cpu_backend, "select_pages_numba", spy)
    outs = llm.generate(prompts, params)
    assert all(len(o.token_ids) == 12 for o in outs)
    assert used and set(used) == {group_reduce}
    assert llm.engine.blocks.num_used == 0
    # Per request: a budget override changes nothing structural and must match a solo run.
    rid = llm.engine.add_request(prompts[0], params, sparse={"token_budget": 64, "select_interval": 2})
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert rid not in llm.engine.seqs
    for knob in ({"static_sparsity": 0.2}, {"group_reduce": "max"}):
        with pytest.raises(Exception, match="fixed per engine"):
            llm.engine.add_request(prompts[0], params, sparse=knob)


def test_request_knobs_taken_where_the_engine_sinks_exceed_the_context(tiny_llama, tmp_path):
    """Sink pages are clipped to a whole context (7 pages for 100 tokens): the engine's own 128-token sinks, which
    every request inherits, were then refused as above its pool, so any knob (a budget alone) was refused."""
    p, _ = _sparse_tiny(tiny_llama, tmp_path, token_budget=64)
    ids = [int(t) for t in np.random.default_rng(9).integers(3, 320, 80)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    runs = []
    for budget, knobs in ((128, {"token_budget": 64}), (64, None)):
        sp = SparseConfig(enabled=True, page_size=16, prefill_sink=128, decode_sink=128, prefill_local=128,
                          decode_local=64, token_budget=budget)  # fmt: skip
        llm = LLM(str(p), backend="cpu", config=EngineConfig(page_size=16, max_model_len=100, sparse=sp))
        assert llm.engine.layout.sink_pages == 7  # 112 tokens: the whole context, though the sinks are 128
        llm.engine.add_request(ids, params, sparse=knobs)
        got = []
        while llm.engine.has_unfinished():
            got += [t for o in llm.engine.step() for t in o.token_ids]
        runs.append(got)
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    llm = _sparse_tiny(tiny_llama, tmp_path / "b")[1]  # 32-token sinks, a longer context: still checked
    with pytest.raises(InvalidRequestError, match="sinks must fit .*: up to 32 tokens, got 48$"):
        llm.engine.add_request(ids, params, sparse={"decode_sink": 48})
    # a ring of 13 pages of 16 holds 128 tokens beside a 64-token chunk (the error said "as many as it holds")
    msg = "up to 128 tokens beside a 64-token prefill chunk, got 144$"
    with pytest.raises(InvalidRequestError, match=msg):
        llm.engine.add_request(ids, params, sparse={"decode_local": 144})
    llm.engine.add_request(ids, params, sparse={"decode_local": 128})


def test_mass_reduction_refused_at_start_for_groups_it_cannot_hold(tiny_llama, tmp_path, monkeypatch):
    """The default `mass` keeps a group's query heads in registers: a larger group is refused at start, with
    the way out named; `max` has no limit."""
    from lserve_lite.engine import kv_sizing

    monkeypatch.setattr(kv_sizing, "MASS_MAX_GROUP", 1)  # the tiny model has 2 query heads per KV head
    with pytest.raises(InvalidRequestError, match="at most 1 query heads per KV head .*--group-reduce max"):
        _sparse_tiny(tiny_llama, tmp_path)
    assert _sparse_tiny(tiny_llama, tmp_path / "b", group_reduce="max")[1].engine.layout is not None


def test_streaming_memory_is_constant_in_context_length():
    cfg = ModelConfig.from_dict(
        dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144)
    )  # fmt: skip
    classes = [np.array([0, 1] * 4, np.int32)] * 32
    sp = SparseConfig(enabled=True, prefill_local=1024, decode_local=256)
    lay = KVLayout.sparse(sp, classes, max_chunk=512)
    bm = BlockManager(
        num_pages=5000, page_size=64, num_stream_pages=100, stream_per_seq=lay.stream_pages_per_seq
    )
    dense_b, stream_b = lay.bytes_per_page(cfg, 2 * 128 * 2, 2)
    use = {}
    for n in (1024, 65536):
        s = Sequence([1], SamplingParams())
        bm.grow(s, n)
        use[n] = (len(s.page_table) * dense_b, len(s.stream_table) * stream_b)
        bm.release(s)
    assert use[65536][1] == use[1024][1] + (lay.stream_pages_per_seq - 1024 // 64) * stream_b
    assert len(range(lay.stream_pages_per_seq)) * stream_b == use[65536][1]
    # Streaming memory stops growing once sink + ring are full: 64k tokens cost what ~1.6k cost.
    s = Sequence([1], SamplingParams())
    bm.grow(s, lay.stream_pages_per_seq * 64)
    assert len(s.stream_table) * stream_b == use[65536][1]
    assert use[65536][0] == 64 * use[1024][0]  # dense heads keep every page


def test_plan_subset_keeps_rows_and_pages():
    """A mixed step's decode rows, planned alone (as the CUDA backend recomputes them), give the same rows."""
    rng = np.random.default_rng(9)
    hkv, d, ps = 2, 16, 16
    head_class = np.array([0, 1], np.int32)
    ring = (2, 12)
    seqs = [_pools(rng, n, hkv, d, ps, head_class, ring) for n in (300, 90)]
    n_pages = seqs[0][4].shape[0]
    # Both sequences in one pair of pools: offset the second one's page ids.
    kd = np.concatenate([seqs[0][4], seqs[1][4]])
    vd = np.concatenate([seqs[0][5], seqs[1][5]])
    ks = np.concatenate([seqs[0][6], seqs[1][6]])
    vs = np.concatenate([seqs[0][7], seqs[1][7]])
    s_pages = seqs[0][6].shape[0]
    tables = [seqs[0][2], [p + n_pages for p in seqs[1][2]]]
    stables = [seqs[0][3], [p + s_pages for p in seqs[1][3]]]
    lay = BatchLayout([1, 40], [300, 90], tables, stream_tables=stables, windows=[(32, 64), (32, 64)],
                      sel_slots=[0, 1], sel_keep=[4, 0], sel_refresh=[1, 0])  # fmt: skip
    plan = build_plan(lay, ps, q_block=16, ring=ring)
    q = rng.standard_normal((41, hkv * 2, d)).astype(np.float32)
    sel_idx, sel_cnt = np.zeros((2, hkv, 5), np.int32), np.zeros((2, hkv), np.int32)
    sel_idx[0, 0, :4] = [0, 5, 9, 18]
    sel_cnt[0, 0] = 4
    full = paged_attention_sparse_ref(q, kd, vd, ks, vs, plan, head_class, seqs[0][8], sel_idx, sel_cnt)
    part = plan.subset(np.nonzero((plan.qb_len == 1) & (plan.qb_keep > 0))[0])
    assert part.num_qblocks == 1 and part.selects
    rows = paged_attention_sparse_ref(q, kd, vd, ks, vs, part, head_class, seqs[0][8], sel_idx, sel_cnt)
    np.testing.assert_allclose(rows[:1], full[:1], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("kv", ["float", "int8", "int4"])
def test_page_sizing_counts_what_is_allocated(dtype, kv):
    """The bytes that size the pools (KVLayout.bytes_per_page with the backend's float size) are the bytes a page
    allocates: values, scales and the selector's key statistics in the backend's float type (the statistics were
    once counted as float32 on the GPU, sizing LServe pages 6-15% larger than they are)."""
    from lserve_lite.backends.base import alloc_kv_cache
    from lserve_lite.kv.quant import FORMATS

    cfg = ModelConfig.from_dict(
        dict(architectures=["LlamaForCausalLM"], hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
    )  # fmt: skip
    classes = [
        np.array([0, 1, 1, 0], np.int32),
        np.array([1, 1, 1, 1], np.int32),
        np.array([0, 0, 1, 0], np.int32),
    ]
    lay = KVLayout.sparse(SparseConfig(enabled=True), classes, max_chunk=256)
    item = np.dtype(dtype).itemsize
    fmt = FORMATS[{"float": f"fp{8 * item}"}.get(kv, kv)]  # a float cache is the backend's float type
    cache = alloc_kv_cache(np.zeros, np.asarray, dtype, cfg, 64, 1, lay, 1, 1, fmt if fmt.quantized else None)
    dense_b, stream_b = lay.bytes_per_page(cfg, fmt.kv_bytes(cfg.head_dim, item), item)

    def nbytes(*pools):
        return sum(int(a.nbytes) for pool in pools for a in pool or ())

    assert dense_b == nbytes(cache.k, cache.v, cache.k_scale, cache.v_scale, cache.kmax, cache.kmin)
    assert stream_b == nbytes(cache.ks, cache.vs, cache.ks_scale, cache.vs_scale)
    assert lay.selection_bytes(cfg, 1) == nbytes(cache.sel_idx, cache.sel_cnt)  # one sequence slot


def test_plan_refreshes_only_when_a_selecting_block_refreshes():
    """`AttentionPlan.refreshes` decides whether the model launches the page selector (and which CUDA Graph of a size
    replays): true when some block with a page budget refreshes, false when every selecting block reuses, and for a
    plan without selection."""
    table = list(range(8))

    def plan(keep: list[int], refresh: list[int] | None):
        sel = (
            dict(sel_slots=list(range(len(keep))), sel_keep=keep, sel_refresh=refresh)
            if refresh is not None
            else {}
        )
        lay = BatchLayout([1] * len(keep), [300] * len(keep), [table] * len(keep), **sel)
        return build_plan(lay, 64)

    assert plan([4, 4], [0, 1]).refreshes
    assert not plan([4, 4], [0, 0]).refreshes
    assert not plan([4, 0], [0, 1]).refreshes  # the refreshing block has no budget: nothing to select
    assert plan([4, 0], [0, 1]).selects
    assert not plan([0, 0], None).refreshes
    p = plan([4], [0])
    p.qb_refresh = None  # a hand-made plan without refresh flags refreshes
    assert p.refreshes


def test_streaming_only_at_the_longest_context_fills_rope_rows_as_reached(tiny_llama, tmp_path):
    """Streaming heads alone allow a 2^24-token context, and startup built its whole cos / sin tables (~18 s for
    SmolLM2, 4 GiB): they are now filled a chunk at a time as positions are reached, with the same outputs."""
    from lserve_lite.backends.base import ROPE_CHUNK
    from lserve_lite.config import MAX_MODEL_LEN

    ids = [int(t) for t in np.random.default_rng(6).integers(3, 320, 150)]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    outs = []
    for max_len in (MAX_MODEL_LEN, 256):
        _, llm = _sparse_tiny(
            tiny_llama, tmp_path / str(max_len), dict(max_model_len=max_len), static_sparsity=1.0
        )
        assert llm.engine.layout.streaming_only and llm.engine.max_len == max_len
        outs.append(llm.generate([ids], params)[0].token_ids)
        if max_len == MAX_MODEL_LEN:
            assert llm.engine.runner.model.lazy_rope.filled == ROPE_CHUNK
    assert outs[0] == outs[1]


def test_a_model_made_without_init_has_whole_rope_tables():
    """tools/bench_e2e.py makes its random models with LlamaModel.__new__ and sets `rope` itself: its forward must
    take those tables as they are (it read the lazily filled tables' attribute, which such a model lacks)."""
    from lserve_lite.models.llama import LlamaModel

    m = LlamaModel.__new__(LlamaModel)
    m.rope = (np.zeros((8, 2), np.float32), np.ones((8, 2), np.float32))
    assert m.rope_for(np.arange(8)) is m.rope


@pytest.mark.parametrize("static_sparsity", [0.5, 1.0], ids=["mixed", "streaming-only"])
def test_decode_lists_fit_the_window_graphs_are_captured_for(
    tiny_llama, tmp_path, monkeypatch, static_sparsity
):
    """A decode step replays a CUDA Graph only if no head's list is longer than the layout's decode_visit_pages (the
    split count the graphs are captured with). Streaming-only layouts have no dense head, so their dense lists (whole
    contexts) must not count: counted, every decode step past the window ran eagerly on the GPU."""
    _, llm = _sparse_tiny(
        tiny_llama, tmp_path, static_sparsity=static_sparsity, token_budget=128, select_interval=3
    )
    eng = llm.engine
    assert eng.layout.streaming_only == (static_sparsity == 1.0)
    cap = eng.layout.decode_visit_pages(eng.ecfg.sparse)
    plan_step, seen = eng.runner.executor.plan, []

    def spy(step):
        if step.is_decode:
            seen.append(step.plan.decode_visit_pages(dense_heads=not eng.layout.streaming_only))
        return plan_step(step)

    monkeypatch.setattr(eng.runner.executor, "plan", spy)
    ids = [int(t) for t in np.random.default_rng(7).integers(3, 320, 150)]
    llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert len(seen) == 11 and max(seen) <= cap, (seen, cap)
