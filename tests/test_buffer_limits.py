"""Buffers sized by the model's config times the engine's limits (a step's logits and activations, RoPE tables, the
CUDA Graphs' logits and plans) are checked against the memory the backend has before any is allocated: a config.json
at its bounds with large limits asked for tens of GiB at the first step (a MemoryError, or the OOM killer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lserve_lite.backends.cuda_graphs import graph_needs
from lserve_lite.backends.memory import check_needs, step_needs
from lserve_lite.config import EngineConfig, ModelConfig
from lserve_lite.errors import InvalidRequestError
from lserve_lite.kv.layout import pools_bytes
from lserve_lite.sampling_params import SamplingParams

GIB = 1 << 30
# SmolLM2-135M's shape
SMOL = ModelConfig(arch="LlamaForCausalLM", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192)  # fmt: skip


def wide_vocab_model(path: Path, vocab: int, kv: int = 1) -> Path:
    """A one-layer llama of hidden size 8 (two heads, `kv` KV heads) with a tied embedding of `vocab` rows (32 bytes a
    row) and a small tokenizer."""
    from safetensors.numpy import save_file
    from tiny_models import write_tokenizer

    rng = np.random.default_rng(0)
    d, f = 8, 16
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    p = "model.layers.0."
    shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * d // 2, d),
                   p + "self_attn.v_proj.weight": (kv * d // 2, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()},
              str(path / "model.safetensors"))  # fmt: skip
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=d, intermediate_size=f,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=kv, max_position_embeddings=2048,
               tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, torch_dtype="float32")  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, 320)
    return path


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory) -> Path:
    return wide_vocab_model(tmp_path_factory.mktemp("wide_vocab") / "m", 1 << 20)


def test_the_default_limits_need_little(tmp_path):
    """SmolLM2 at the default limits: 384 MiB of logits (2048 rows x 49152), all of it under 0.5 GiB; with the graphs
    of 1-64 rows (the default max_num_seqs) 25 MiB of logits more."""
    needs = step_needs(SMOL, EngineConfig(), 8192)
    assert needs[0].nbytes == 2048 * 49152 * 4 and needs[1].nbytes == 64 * 49152 * 4
    assert sum(n.nbytes for n in needs) < GIB // 2
    graphs = graph_needs(49152, 64, 8192, 64, sparse=False)
    assert graphs[0].nbytes == 127 * 49152 * 4 and graphs[1].nbytes < 2**20
    check_needs(needs + graphs, GIB, "this test's memory")  # no error


def test_a_step_whose_logits_pass_the_memory_names_max_num_batched_tokens():
    """Every row of a prefill chunk may ask for logits (prompt logprobs, scoring): 2048 rows of a 2^22 vocabulary are
    32 GiB, refused where less is left, naming the limit that sizes them."""
    cfg = replace(SMOL, vocab_size=1 << 22)
    with pytest.raises(InvalidRequestError) as e:
        check_needs(step_needs(cfg, EngineConfig(max_num_seqs=4096), 8192), 20 * GIB, "this host")
    assert str(e.value) == (
        "max_num_batched_tokens 2048 x vocab 4194304 needs 32.0 GiB of logits a step; this host has 20.0 GiB: "
        "lower --max-num-batched-tokens (max_num_batched_tokens=)"
    )


def test_the_rows_sampled_are_counted_beside_the_step_logits():
    """A step picks the rows it samples (one a sequence, up to max_num_seqs) out of its logits: a copy beside them.
    Neither alone passes 40 GiB here; together they do, and the line says the total."""
    needs = step_needs(replace(SMOL, vocab_size=1 << 22), EngineConfig(max_num_seqs=2048), 8192)
    assert needs[1].nbytes == 32 * GIB and needs[1].knob == "--max-num-seqs (max_num_seqs=)"
    with pytest.raises(
        InvalidRequestError, match=r"needs 32\.0 GiB of logits a step \(64\.\d GiB with the other"
    ):
        check_needs(needs, 40 * GIB, "this host")


@pytest.mark.parametrize(
    "over, batched, max_len, have, line",
    [
        ({"intermediate_size": 1 << 20}, 1 << 20, 8192, 64, "activations; this host has 64.0 GiB: lower "
         "--max-num-batched-tokens"),
        ({"head_dim": 1024, "num_heads": 1, "num_kv_heads": 1}, 2048, 1 << 24, 60, "RoPE tables; this host has "
         "60.0 GiB: lower --max-model-len"),
    ],
)  # fmt: skip
def test_activations_and_rope_tables_past_the_memory_name_their_limit(over, batched, max_len, have, line):
    """2^20 tokens a step of a 2^20-wide MLP: 12 TiB of activations; a 2^24-token context of head_dim 1024: 64 GiB
    of RoPE tables (cos and sin, float32)."""
    needs = step_needs(replace(SMOL, **over), EngineConfig(max_num_batched_tokens=batched), max_len)
    with pytest.raises(InvalidRequestError, match=line):
        check_needs(needs, have * GIB, "this host")


def test_the_gpu_counts_its_rope_tables_at_their_float16_size():
    """The GPU's RoPE tables are built on the device in float16 (CudaOps.rope_tables): 2 GiB for a 2^24-token context
    of head_dim 64. Its check counted them as the CPU's float32 host tables (4 GiB), refusing a start that fits."""
    from lserve_lite.backends.cpu import CpuOps
    from lserve_lite.backends.cuda import CudaOps

    ecfg = EngineConfig(cuda_graphs=False)
    gpu = object.__new__(CudaOps)  # buffer_needs reads the config only: no device needed
    rope = [n.nbytes for n in gpu.buffer_needs(SMOL, ecfg, 1 << 24) if n.what == "RoPE tables"]
    assert rope == [2 * (1 << 24) * 32 * 2]
    cpu = [n.nbytes for n in CpuOps().buffer_needs(SMOL, ecfg, 1 << 24) if n.what == "RoPE tables"]
    assert cpu == [2 * (1 << 24) * 32 * 4]


def test_cuda_graph_logits_and_plans_are_counted():
    """Each captured size (1, 2, ..., 512: 1023 rows) holds its own logits, twice in LServe mode: 32 GiB at a 2^22
    vocabulary, named by max_num_seqs; each size's device plan holds 2 x size x pages page pairs (int32): 16 GiB at a
    2^24-token context in 16-token pages, named by max_model_len."""
    logits, plans = graph_needs(1 << 22, 4096, 1 << 24, 16, sparse=True)
    assert logits.nbytes == 2 * 1023 * (1 << 22) * 4
    assert 16 * 1023 * 2**20 <= plans.nbytes < 16 * 1023 * 2**20 + 2**20
    logits_line = r"needs 32\.0 GiB of decode graphs' logits; this GPU has 30\.0 GiB: lower --max-num-seqs"
    with pytest.raises(InvalidRequestError, match=logits_line):
        check_needs([logits, plans], 30 * GIB, "this GPU")
    plans_line = r"needs 16\.0 GiB of decode graphs' plans; this GPU has 8\.0 GiB: lower --max-model-len"
    with pytest.raises(InvalidRequestError, match=plans_line):
        check_needs(graph_needs(1024, 4096, 1 << 24, 16, sparse=True), 8 * GIB, "this GPU")


def test_the_engine_refuses_them_before_loading_past_its_pools(wide_vocab):
    """A 2^20 vocabulary at max_num_batched_tokens 2^16: 256 GiB of logits, which the first step allocated (a
    MemoryError, or the OOM killer) after a start that said nothing."""
    from lserve_lite.engine.llm_engine import LLMEngine

    cfg = EngineConfig(max_num_seqs=4096, max_num_batched_tokens=1 << 16)
    with pytest.raises(InvalidRequestError, match=r"^max_num_batched_tokens 65536 x vocab 1048576 needs 256\.0 GiB "
                       r"of logits a step; the cpu backend's memory beside the weights and the KV cache has "):  # fmt: skip
        LLMEngine(str(wide_vocab), "cpu", cfg)


def test_each_tensor_parallel_rank_checks_its_buffers_before_building(tmp_path):
    """A rank holds its shard's activations and the whole vocabulary's logits (gathered): a rank refuses them in the
    same line, which the driver reports, before it builds its model and pools (they built, and the first step asked
    rank 0 for the 256 GiB)."""
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.errors import TensorParallelError

    model = wide_vocab_model(tmp_path / "m", 1 << 20, kv=2)
    cfg = EngineConfig(max_num_seqs=1, max_num_batched_tokens=1 << 16, tensor_parallel=2)
    with pytest.raises(TensorParallelError, match=r"failed: max_num_batched_tokens 65536 x vocab 1048576 needs 256\.0 "
                       r"GiB of logits a step; rank \d's share of the memory beside its weights and KV cache has "):  # fmt: skip
        LLMEngine(str(model), "cpu", cfg)


def test_under_an_address_space_limit_the_refusal_comes_first(wide_vocab):
    """In a process limited to 3 GiB of address space, `LLM(...)` with such limits ends in the one-line error (before,
    the engine started and the first step of 4096 prompts died in a MemoryError allocating the logits)."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from lserve_lite import LLM, SamplingParams\n"
        "from lserve_lite.errors import LServeError\n"
        "try:\n"
        f"    llm = LLM({str(wide_vocab)!r}, backend='cpu', max_num_seqs=4096, max_num_batched_tokens=1 << 16)\n"
        "    llm.generate(['hi'] * 4096, SamplingParams(max_new_tokens=1))\n"
        "except LServeError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.startswith(
        "REFUSED max_num_batched_tokens 65536 x vocab 1048576 needs 256.0 GiB of logits"
    ), run.stdout + run.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from tiny_models import make_tiny_numpy

    from lserve_lite.engine.llm_engine import LLMEngine

    return LLMEngine(str(make_tiny_numpy(tmp_path_factory.mktemp("tiny") / "m")), "cpu", EngineConfig())


class Unread:
    """A billion token ids that must not be read: only their count may be asked."""

    def __len__(self) -> int:
        return 10**9

    def __iter__(self):
        raise AssertionError("the ids were read")


@pytest.mark.parametrize("call, line", [
    (lambda e: e.add_request(Unread(), SamplingParams()), "prompt has 1000000000 tokens; the context limit is 2048 "
     "(prompt + output)"),
    (lambda e: e.score(Unread()), "scored sequence has 1000000000 tokens; the context limit is 2048"),
])  # fmt: skip
def test_token_ids_past_the_context_are_refused_before_they_are_read(tiny_engine, call, line):
    """10^9 prompt (or scored) ids were copied one by one into a list, then refused by their count."""
    with pytest.raises(InvalidRequestError) as e:
        call(tiny_engine)
    assert str(e.value) == line


def test_scored_logits_past_the_host_memory_left_are_refused_before_any_step(tmp_path, monkeypatch):
    """`score` returns [T, vocab] float32 logits to the host: T x vocab x 4 bytes are checked against what the host
    has beside the weights, the KV cache and a step's buffers (the startup check's count) before the first chunk
    runs; against the host's whole memory, logits that fit it but not what was left went on to a MemoryError."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.backends import cpu
    from lserve_lite.engine.llm_engine import LLMEngine

    model = str(make_tiny_numpy(tmp_path / "m"))
    probe = LLMEngine(model, "cpu", EngineConfig())
    e, blocks = probe.ecfg, probe.blocks
    kv = pools_bytes(probe.cfg, e.page_size, probe.kv_bytes, probe.layout, e.max_num_seqs, blocks.free.num_pages,
                     blocks.num_stream_pages, stat_itemsize=probe.itemsize)  # fmt: skip
    buffers = sum(n.nbytes for n in probe.ops.buffer_needs(probe.cfg, e, probe.max_len, probe.layout))
    logits = 100 * 320 * 4  # 100 tokens scored at the tiny vocabulary
    # a host with more than the logits, but half of them beside the weights, the KV pools and a step's buffers
    monkeypatch.setattr(cpu, "host_memory_bytes", lambda: probe.weight_bytes + kv + buffers + logits // 2)
    engine = LLMEngine(model, "cpu", EngineConfig())
    with pytest.raises(InvalidRequestError) as e:
        engine.score(list(range(3, 103)))
    assert str(e.value) == ("scoring 100 tokens x vocab 320 needs 0.1 MiB of logits; this host beside the weights, "
                            "the KV cache and a step's buffers has 0.1 MiB: lower the number of tokens scored")  # fmt: skip
    assert engine.blocks.num_used == 0  # refused before it took a page
    assert engine.score(list(range(3, 53))).shape == (50, 320)  # half as many fit


def prompt_logprobs(engine, ids: list[int]) -> list:
    """The prompt logprobs (top 5) of a greedy one-token request for `ids`, run to its end."""
    rid = engine.add_request(ids, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=5))
    while True:
        done = [o for o in engine.step() if o.request_id == rid and o.finished]
        if done:
            return [(e.token_id, e.logprob, e.top) if e else None for e in done[0].seq.prompt_logprobs]


def test_prompt_logprobs_take_the_log_softmax_a_few_rows_at_a_time(tiny_engine, monkeypatch):
    """A request's prompt logprobs took the log-softmax of its whole chunk at once: on the CPU two float64 copies of
    its logits (16 bytes a logit: 1.5 GiB for a 2048-token chunk at SmolLM2's 49k vocabulary). Now LOGPROB_ROWS rows
    at a time, with the same numbers."""
    from lserve_lite.engine import logprobs

    ids = [int(t) for t in np.random.default_rng(0).integers(3, 320, 300)]
    rows, real = [], tiny_engine.ops.logprobs
    monkeypatch.setattr(tiny_engine.ops, "logprobs", lambda x, c, k: rows.append(len(x)) or real(x, c, k))
    chunked = prompt_logprobs(tiny_engine, ids)
    assert max(rows) == logprobs.LOGPROB_ROWS < 299 and sum(rows) == 299
    monkeypatch.setattr(logprobs, "LOGPROB_ROWS", 10**6)
    assert prompt_logprobs(tiny_engine, ids) == chunked and chunked[0] is None and len(chunked) == 300
