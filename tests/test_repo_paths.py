"""No path of the machines this project is built on in the repository: results files record commands with `$OUT`
and relative paths (a device's output folder or checkout written into a JSON or a profile is a leak, and means
nothing to a reader). Reads every tracked file (`git ls-files`: caches and local model files are not the
repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a home directory of root, the workplace's checkout and tool folders, or the shared folder beside a checkout
# (split so this file does not match itself)
MACHINE_PATH = re.compile(
    "/ro" + r"ot/|/wo" + r"rk/(main|notes|\.device|\.library|\.mirror)\b|\.\./sha" + r"red/"
)


def test_no_machine_paths():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    hits = []
    for name in filter(None, files):
        p = ROOT / name.decode()
        if not p.is_file() or p.stat().st_size > (8 << 20):
            continue
        text = p.read_bytes().decode("utf-8", errors="ignore")
        for m in MACHINE_PATH.finditer(text):
            hits.append(f"{name.decode()}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
    assert len(files) > 100, "git ls-files listed almost nothing: not the repository"
    assert not hits, "machine paths in the repository:\n" + "\n".join(hits[:20])
