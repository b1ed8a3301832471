"""Shared fixtures: tiny random HF models (oracle: transformers on the CPU) and GPU skipping."""

from __future__ import annotations

import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_llama"))
