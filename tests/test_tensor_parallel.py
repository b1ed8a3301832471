"""Tensor parallelism on the CPU: ranks in threads over the in-process stand-in communicator (NumPy sum over
shards) give the unsharded model's logits, in prefill and decode, dense and LServe, float and int8 weights,
float and quantized KV caches."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from lserve_lite.backends.comm import ThreadGroup
from lserve_lite.backends.cpu import CpuOps
from lserve_lite.config import EngineConfig, ModelConfig, SparseConfig
from lserve_lite.engine.model_runner import ModelRunner
from lserve_lite.engine.tp_rank import RankRunner
from lserve_lite.errors import InvalidRequestError
from lserve_lite.kv.block_manager import BlockManager
from lserve_lite.kv.layout import KVLayout
from lserve_lite.kv.quant import FORMATS, KVFormat
from lserve_lite.sampling_params import SamplingParams
from lserve_lite.sequence import Sequence
from lserve_lite.weights.qtensor import QuantTensor
from lserve_lite.weights.quantize import quantize_weights
from lserve_lite.weights.shard import check_tensor_parallel, shard_config, shard_of, shard_weights

PAGE, PAGES, MAX_LEN = 16, 64, 512
SPARSE = SparseConfig(enabled=True, page_size=PAGE, prefill_sink=16, prefill_local=32, decode_sink=16,
                      decode_local=16, token_budget=32, select_interval=2)  # fmt: skip


def tiny(num_kv_heads: int = 2, seed: int = 0, **over) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A random 2-layer llama whose every split (world 2 and 4) falls on int8's 32-value blocks."""
    kw = dict(arch="LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
              num_kv_heads=num_kv_heads, head_dim=16, vocab_size=256, rms_norm_eps=1e-6,
              max_position_embeddings=MAX_LEN)  # fmt: skip
    cfg = ModelConfig(**(kw | over))
    rng = np.random.default_rng(seed)
    h, d, q, kv, f = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                   p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, q * d),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}  # fmt: skip
        if cfg.qkv_bias:
            shapes |= {p + f"self_attn.{n}_proj.bias": (s[0],) for n, s in
                       (("q", (q * d,)), ("k", (kv * d,)), ("v", (kv * d,)))}  # fmt: skip
    w = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 and "norm" in n else 0.1 * rng.standard_normal(s))
         for n, s in shapes.items()}  # fmt: skip
    return cfg, {n: a.astype(np.float32) for n, a in w.items()}


def layout_for(cfg: ModelConfig, sparse: SparseConfig) -> KVLayout | None:
    """LServe mode: layer 0 alternates dense / streaming KV heads, layer 1 keeps only its first one dense
    (so with 2+ ranks some rank has no streaming head in a layer and another no dense one)."""
    if not sparse.enabled:
        return None
    hkv = cfg.num_kv_heads
    classes = [np.arange(hkv, dtype=np.int32) % 2, (np.arange(hkv) > 0).astype(np.int32)]
    return KVLayout.sparse(sparse, classes, max_chunk=64)


def run_steps(
    cfg, weights, sparse: SparseConfig | None, world: int, steps: int = 6, kv: KVFormat | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(unsharded logits, sharded logits) for a 2-sequence prefill (in chunks) then greedy decode steps, both
    over KV caches of format `kv` (None: float32)."""
    ecfg = EngineConfig(page_size=PAGE, max_num_seqs=4, sparse=sparse or SparseConfig())
    layout = layout_for(cfg, ecfg.sparse)
    per_seq = layout.stream_pages_per_seq if layout else 0
    n_stream = 4 * per_seq
    ref = ModelRunner(cfg, weights, CpuOps(), ecfg, MAX_LEN, PAGES, layout, n_stream, kv_format=kv)
    ranks = [RankRunner(cfg, weights, CpuOps(), ecfg, MAX_LEN, PAGES, layout, n_stream, c, kv)
             for c in ThreadGroup(world).communicators()]  # fmt: skip
    blocks = BlockManager(PAGES, PAGE, n_stream, per_seq, 4)
    rng = np.random.default_rng(1)
    seqs = [Sequence(list(rng.integers(0, cfg.vocab_size, n)), SamplingParams()) for n in (70, 45)]
    out = []
    chunks = [[40, 45], [30, 0]] + [[1, 1]] * steps
    for num_new in chunks:
        live = [(s, n) for s, n in zip(seqs, num_new) if n]
        for s, n in live:
            blocks.grow(s, s.num_cached + n)
        step = ref.prepare([s for s, _ in live], [n for _, n in live])
        want = ref.executor.run(ref.executor.plan(step))
        got = _threads([lambda r=r, step=step: r.run(step) for r in ranks])
        for g in got[1:]:
            np.testing.assert_array_equal(g, got[0])  # every rank gets the same gathered logits
        out.append((want, got[0]))
        ref.advance([s for s, _ in live], [n for _, n in live])  # the step ran: K/V and selection counts
        for (s, _), row in zip(live, want):
            if s.num_cached >= len(s.prompt_ids):
                s.output_ids.append(int(np.argmax(row)))
    return out


def _threads(fns: list) -> list:
    res: list = [None] * len(fns)
    errs: list = []

    def call(i: int) -> None:
        try:
            res[i] = fns[i]()
        except BaseException as e:  # surfaced below; a dead rank would otherwise hang the barrier
            errs.append(e)

    ts = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    if errs:
        raise errs[0]
    return res


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("num_kv_heads", [2, 4])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "lserve"])
def test_sharded_logits_equal_unsharded(world, num_kv_heads, sparse):
    """Float32: equal up to summation order; the greedy tokens equal. A KV head replicated on several ranks
    has its pages selected from each rank's own query heads (a part of its group), so there the budget
    holds the whole context (docs/TENSOR_PARALLEL.md); streaming heads still run."""
    cfg, w = tiny(num_kv_heads)
    sp = (SPARSE if num_kv_heads >= world else replace(SPARSE, token_budget=128)) if sparse else None
    for want, got in run_steps(cfg, w, sp, world):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("over", [dict(tie_word_embeddings=True), dict(qkv_bias=True)], ids=["tied", "bias"])
def test_sharded_tied_head_and_qkv_bias(over):
    cfg, w = tiny(2, **over)
    for want, got in run_steps(cfg, w, SPARSE, 2, steps=3):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_int8_equals_unsharded_int8(world):
    """int8 weights (quantized whole, then split on block boundaries): the same products as unsharded."""
    cfg, w = tiny(2)
    q = quantize_weights(w, "int8")
    assert isinstance(q["model.layers.0.mlp.down_proj.weight"], QuantTensor)
    sp = SPARSE if world == 2 else replace(SPARSE, token_budget=128)  # world 4 replicates the 2 KV heads
    for want, got in run_steps(cfg, q, sp, world, steps=3):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("kv", ["int8", "int4", "fp8"])
def test_sharded_quantized_kv_equals_unsharded(kv):
    """A quantized KV cache is quantized per (token, KV head) (int4: per channel group of a head), so splitting
    the heads over ranks leaves every stored value and scale as one process stores them: the same logits."""
    cfg, w = tiny(2)
    fmt = FORMATS[kv]
    for sp in (None, SPARSE):
        for want, got in run_steps(cfg, w, sp, 2, steps=3, kv=fmt):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            assert (got.argmax(-1) == want.argmax(-1)).all()


def test_shard_shapes_and_replicated_kv_heads():
    cfg, w = tiny(2)
    shards = [shard_of(cfg, r, 4) for r in range(4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # each KV head on 2 ranks
    assert [s.q_heads for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    s = shards[2]
    scfg = shard_config(cfg, s)
    assert (scfg.num_heads, scfg.num_kv_heads, scfg.intermediate_size, scfg.vocab_size) == (2, 1, 64, 64)
    sw = shard_weights(w, cfg, s)
    p = "model.layers.0."
    np.testing.assert_array_equal(sw[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.weight"][64:96])
    np.testing.assert_array_equal(sw[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.weight"][16:32])
    np.testing.assert_array_equal(
        sw[p + "self_attn.o_proj.weight"], w[p + "self_attn.o_proj.weight"][:, 64:96]
    )
    np.testing.assert_array_equal(sw[p + "mlp.down_proj.weight"], w[p + "mlp.down_proj.weight"][:, 128:192])
    np.testing.assert_array_equal(sw["lm_head.weight"], w["lm_head.weight"][128:192])
    assert sw[p + "input_layernorm.weight"].shape == (128,)
    classes = [np.array([0, 1], np.int32)]
    assert s.head_classes(classes)[0].tolist() == [1]


def test_quantized_split_off_block_boundary_refused():
    cfg, w = tiny(2, intermediate_size=192)  # down_proj's input 192 / 4 = 48: not a multiple of 32
    q = quantize_weights(w, "int8")
    with pytest.raises(InvalidRequestError, match=r"down_proj.weight is int8 in blocks of 32 values"):
        shard_weights(q, cfg, shard_of(cfg, 1, 4))
    shard_weights(q, cfg, shard_of(cfg, 1, 2))  # 96 per rank: on a boundary


@pytest.mark.parametrize(
    "over,world,msg",
    [
        (dict(num_heads=6), 4, r"tensor_parallel 4 must divide num_attention_heads \(6\)"),
        (dict(intermediate_size=100), 8, r"tensor_parallel 8 must divide intermediate_size \(100\)"),
        (dict(num_heads=12, num_kv_heads=3), 2, r"and num_key_value_heads \(3\) must divide one another"),
        (dict(vocab_size=250), 4, r"must divide vocab_size \(250\)"),
    ],
)
def test_tensor_parallel_validation(over, world, msg):
    cfg = replace(tiny(2)[0], **over)
    with pytest.raises(InvalidRequestError, match=msg):
        check_tensor_parallel(cfg, world)
