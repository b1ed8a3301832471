"""Resident memory of `lserve-lite chat` (the issue-10 target: under 300 MB with the default model): RSS once the
prompt shows (model loaded), and after each greedy reply. Usage: python tools/rss_chat.py [chat options]."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from lserve_lite.errors import exit_status

QUESTIONS = ["What is the capital of France?", "Write two sentences about the sea."]


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (2^20 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def wait_for_prompt(proc: subprocess.Popen, err) -> str:
    """Stdout up to the next '>>> ' prompt (input() writes it to stdout when stdin is a pipe); if chat exits
    instead, the last line it wrote to stderr (`err`, a file) says why."""
    text = b""
    while not text.endswith(b">>> "):
        c = os.read(proc.stdout.fileno(), 1)
        if not c:
            err.seek(0)
            why = (err.read().decode(errors="replace").strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise SystemExit(f"rss_chat: chat exited with status {proc.wait()}: {why}")
        text += c
    return text[:-4].decode()


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    cmd = [sys.executable, "-m", "lserve_lite.cli", "chat", "--backend", "cpu", "--temperature", "0",
           "--max-new-tokens", "64", *sys.argv[1:]]  # fmt: skip
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would stall the chat
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        t = time.perf_counter()
        wait_for_prompt(proc, err)
        print(f"loaded in {time.perf_counter() - t:.1f} s: RSS {rss_mb(proc.pid):.0f} MB")
        for q in QUESTIONS:
            proc.stdin.write(q.encode() + b"\n")
            proc.stdin.flush()
            reply = wait_for_prompt(proc, err).strip()
            print(f"after {q!r} -> {reply[:60]!r}: RSS {rss_mb(proc.pid):.0f} MB")
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
