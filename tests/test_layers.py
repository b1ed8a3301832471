"""The layering of docs/ARCHITECTURE.md holds: imports point down only (import-linter's layers contract in
pyproject.toml), the engine knows no backend, and no module sets another's private attributes."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lserve_lite"


def test_import_layers_contract():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the test extra: pip install -e '.[test]')")
    r = subprocess.run([exe, "--config", str(PKG.parent / "pyproject.toml")], capture_output=True, text=True,
                       cwd=PKG.parent)  # fmt: skip
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_engine_knows_no_backend():
    """The engine asks the Ops interface; it never imports CuPy, names NCCL or compares backend names."""
    for f in (PKG / "engine").glob("*.py"):
        src = f.read_text()
        for lib in ("cupy", "nccl"):
            assert lib not in src.lower(), f"{f.name} mentions {lib}"
        for name in ('"cuda"', "'cuda'", '"cpu"', "'cpu'", "ops.name"):
            assert name not in src, f"{f.name} branches on a backend ({name})"


def _private_attribute_writes(tree: ast.AST) -> list[str]:
    """`x._name = ...` where x is not self/cls (a module setting another object's private attribute)."""
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            for sub in ast.walk(t) if t is not None else ():
                if (
                    isinstance(sub, ast.Attribute)
                    and sub.attr.startswith("_")
                    and not sub.attr.startswith("__")
                ):
                    base = sub.value
                    if not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                        bad.append(f"{ast.unparse(sub)} (line {sub.lineno})")
    return bad


def test_no_private_attribute_set_from_outside():
    found = {}
    for f in PKG.rglob("*.py"):
        bad = _private_attribute_writes(ast.parse(f.read_text()))
        if bad:
            found[str(f.relative_to(PKG))] = bad
    assert not found, found


def test_cli_starts_without_the_server_stack():
    """`lserve-lite --help` and the parser do not import FastAPI, uvicorn or the engine."""
    code = ("import sys; from lserve_lite.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('fastapi', 'uvicorn', 'lserve_lite.engine') if m in sys.modules))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", r.stdout


# packages whose modules the map names by their folder alone (applications, model files, the CPU references)
MAPPED_BY_FOLDER = ("serve", "evaluation", "harness", "weights", "backends/reference")


def test_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md's layer table is the module map: every module of the other packages is named there by
    its file name, so a new module cannot go unplaced (six had, until 2026-12-06), and every module it names exists."""
    layers = (
        (PKG.parent / "docs" / "ARCHITECTURE.md")
        .read_text()
        .split("## The layers", 1)[1]
        .split("\n## ", 1)[0]
    )
    unnamed = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if f.name == "__init__.py" or rel.startswith(tuple(p + "/" for p in MAPPED_BY_FOLDER)):
            continue
        if f"`{f.name}`" not in layers and f"`{rel}`" not in layers:
            unnamed.append(rel)
    assert not unnamed, f"modules missing from docs/ARCHITECTURE.md's layer table: {unnamed}"
    for folder in MAPPED_BY_FOLDER:
        assert f"{folder.split('/')[-1]}/" in layers, folder
    names = {f.name for f in PKG.rglob("*.py")} | {f.relative_to(PKG).as_posix() for f in PKG.rglob("*.py")}
    stale = [n for n in re.findall(r"`([\w/]+\.py)`", layers) if n not in names]
    assert not stale, f"docs/ARCHITECTURE.md's layer table names modules that do not exist: {stale}"
