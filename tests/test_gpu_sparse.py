"""LServe sparse kernels on the GPU against their float32 references (gpu-marked; skipped without a GPU).

Kernels: two-pool block-sparse prefill/decode attention (kernels/attention_*.cu), the page selector
(kernels/page_select.cu), RoPE + two-pool K/V write + page statistics (kernels/layers.cu). References:
lserve_lite/backends/reference/. The per-kernel cases are the kernel harness's (`lserve-lite kernels test
sparse_attention page_select rope_write_kv_sparse`), one test per named setup here: fresh random inputs (never
zeros), NaN-poisoned outputs. On top: the sparse engine on the CUDA backend against the CPU backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends.cuda import SELECTORS
from lserve_lite.config import GROUP_REDUCE
from lserve_lite.harness import attention as HA
from lserve_lite.harness import layers as HL
from lserve_lite.harness import page_select as HP
from lserve_lite.harness.attention import SPARSE_DECODE, SPARSE_PREFILL
from lserve_lite.harness.common import Ctx, format_table
from lserve_lite.harness.layers import ROPE_SPARSE

CASES = {
    "sparse_prefill_one": HA.sparse_prefill_one,
    "sparse_decode_one": HA.sparse_decode_one,
    "page_select_one": HP.page_select_one,
    "rope_write_kv_sparse_one": HL.rope_write_kv_sparse_one,
}

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def hctx():
    return Ctx(seed=0)


def _run(hctx, case, name, *args):
    """Run harness case `case` for setup `name` on a fresh seed; assert every row passes."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    hctx.rng = np.random.default_rng(seed)  # as Ctx(seed): reproduce with CASES[case](Ctx(seed), name)
    results = CASES[case](hctx, name, *args)
    results = results if isinstance(results, list) else [results]
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    assert results and not bad, f"{case}(Ctx({seed}), {name!r}):\n" + format_table(bad)


@pytest.mark.parametrize("name", list(SPARSE_PREFILL))
def test_sparse_prefill_matches_reference(hctx, name, prefill_kernel):
    _run(hctx, "sparse_prefill_one", name)


@pytest.mark.parametrize("name", list(SPARSE_DECODE))
def test_sparse_decode_matches_reference(hctx, name):
    """Fresh selections (select_pages_ref), selections reused from a step ago (newest page missing), blocks
    without a budget, budgets over the context."""
    _run(hctx, "sparse_decode_one", name)


def test_mixed_prefill_and_selecting_decode_step(hctx, prefill_kernel):
    """Decode rows keep their page selection when a prefill chunk shares the step."""
    r = HA.sparse_mixed_one(hctx)
    assert r.ok, format_table([r])


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("group_reduce", GROUP_REDUCE)
@pytest.mark.parametrize("name", [*SPARSE_DECODE, *HP.SELECT_SETUPS])
def test_page_selector_matches_reference(hctx, name, group_reduce, selector):
    """Both launchers (page_select.cu, the Numba kernel), up to 17024-page lists (each page_topk path:
    registers, shared memory, L2), exact ties at the cut, query groups of 1 to 6."""
    _run(hctx, "page_select_one", name, group_reduce, selector)


@pytest.mark.parametrize("name", list(ROPE_SPARSE))
def test_rope_write_kv_sparse_matches_reference(hctx, name):
    _run(hctx, "rope_write_kv_sparse_one", name)


# ---------------------------------------------------------------------------------------------- engine


def _sparse_llm(path, backend, **kw):
    from lserve_lite import LLM, EngineConfig, SparseConfig

    knobs = dict(
        page_size=16, sub_pages=4, prefill_sink=32, prefill_local=128, decode_sink=32, decode_local=64
    )
    knobs.update(kw)
    sp = SparseConfig(enabled=True, **knobs).validate()
    return LLM(
        str(path), backend=backend, config=EngineConfig(page_size=16, max_num_batched_tokens=64, sparse=sp)
    )


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny random Llama with head_dim 64 (the GPU kernels are compiled for 64 and 128)."""
    from tiny_models import make_tiny

    return make_tiny(
        tmp_path_factory.mktemp("tiny64"), hidden_size=256, num_attention_heads=4, num_key_value_heads=2
    )


@pytest.fixture
def sparse_tiny(tiny64, tmp_path):
    import shutil

    p = tmp_path / "m"
    shutil.copytree(tiny64, p)
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    return p


def test_engine_sparse_cuda_matches_cpu(sparse_tiny):
    from lserve_lite import SamplingParams

    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(3, 320, int(n))] for n in (150, 420, 333)]
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    outs = {}
    for backend in ("cpu", "cuda"):
        llm = _sparse_llm(sparse_tiny, backend, token_budget=128, select_interval=2)
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.blocks.num_used == 0
    agree = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
        for x, y in zip(outs["cpu"], outs["cuda"])
    ]
    assert min(agree) >= 4 and sum(agree) >= 0.75 * sum(len(x) for x in outs["cpu"]), (agree, outs)


def test_engine_sparse_budget_over_context_equals_dense_cuda(sparse_tiny, tiny64):
    from lserve_lite import LLM, EngineConfig, SamplingParams

    ids = [int(t) for t in np.random.default_rng(5).integers(3, 320, 300)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    sparse = _sparse_llm(sparse_tiny, "cuda", static_sparsity=0.0, token_budget=1024, select_interval=1)
    dense = LLM(str(tiny64), backend="cuda", config=EngineConfig(page_size=16, max_num_batched_tokens=64))
    assert sparse.generate([ids], params)[0].token_ids == dense.generate([ids], params)[0].token_ids
