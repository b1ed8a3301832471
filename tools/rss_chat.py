"""Resident memory of `lserve-lite chat` (the issue-10 target: under 300 MB with the default model): RSS once the
model is loaded (chat's banner), and after each greedy reply (its status line).
Usage: python tools/rss_chat.py [chat options]."""

from __future__ import annotations

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


def wait_for_status(proc: subprocess.Popen, err, count: int) -> None:
    """Until chat's stderr (`err`, a file) holds `count` lines of its banner and status lines: a piped chat shows no
    `>>> ` prompt, its banner says the model is loaded and a status line ends each reply. If chat exits instead,
    its last stderr line says why."""
    while True:
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
        if sum(line.startswith(("lserve-lite chat (", "[")) for line in lines) >= count:
            return
        failed = [line for line in lines if line.startswith("error: ")]
        if failed or proc.poll() is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # a reply's error leaves chat waiting for the next question
                proc.kill()
            why = (failed or lines or ["(nothing on stderr)"])[-1].strip()
            raise SystemExit(f"rss_chat: chat exited with status {proc.wait()}: {why}")
        time.sleep(0.05)


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    cmd = [sys.executable, "-m", "lserve_lite.cli", "chat", "--backend", "cpu", "--temperature", "0",
           "--max-new-tokens", "64", *sys.argv[1:]]  # fmt: skip
    # files, not pipes: a full pipe would stall the chat
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err)
        t = time.perf_counter()
        wait_for_status(proc, err, 1)
        print(f"loaded in {time.perf_counter() - t:.1f} s: RSS {rss_mb(proc.pid):.0f} MB")
        read = 0
        for i, q in enumerate(QUESTIONS):
            proc.stdin.write(q.encode() + b"\n")
            proc.stdin.flush()
            wait_for_status(proc, err, 2 + i)
            rss = rss_mb(proc.pid)
            out.seek(read)
            reply = out.read()
            read += len(reply)
            print(f"after {q!r} -> {reply.decode(errors='replace').strip()[:60]!r}: RSS {rss:.0f} MB")
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
