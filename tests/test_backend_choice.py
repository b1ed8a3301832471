"""Choosing the backend: a run that ends up on the CPU leaves no trace of CuPy behind."""

from __future__ import annotations

import os
import subprocess
import sys

from tiny_models import make_tiny_numpy

from lserve_lite.backends import driver_gpu_count


def test_a_cpu_run_creates_nothing_under_home_cupy(tmp_path):
    """Importing CuPy creates ~/.cupy/kernel_cache, and `--backend auto` (the default) imported it to count GPUs, so a
    CPU-only run left that folder in the user's home. A stand-in `cupy` that does what CuPy's import does (ahead of
    any installed one) shows whether the CPU run imports it."""
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(
        "import os\nos.makedirs(os.path.expanduser('~/.cupy/kernel_cache'), exist_ok=True)\n"
    )
    model = make_tiny_numpy(tmp_path / "m")
    home = tmp_path / "home"
    home.mkdir()
    backend = "cpu" if driver_gpu_count() else "auto"  # the CPU run this host makes
    path = os.pathsep.join(p for p in (str(fake), os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(model), "--backend", backend,
         "--prompt", "hi", "--max-new-tokens", "2"],
        env={**os.environ, "HOME": str(home), "PYTHONPATH": path}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (home / ".cupy").exists(), sorted(p.name for p in home.rglob("*"))
