"""The chat REPL survives what people type: a line that is not UTF-8, and a conversation that outgrows the
context (oldest exchanges are dropped, with a note), and still answers."""

from __future__ import annotations

import subprocess
import sys


def test_chat_repl_survives_bad_bytes_and_full_context(tiny_llama):
    long_msg = " ".join(["word"] * 60)
    lines = [b"\xff\xfe oops\n", b"hello\n"] + [long_msg.encode() + b"\n"] * 6 + [b"/exit\n"]
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-model-len", "256", "--kv-pages", "8", "--max-new-tokens", "8", "--temperature", "0"],
        input=b"".join(lines), capture_output=True, timeout=300,
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0, err[-2000:]
    assert "not valid UTF-8" in err
    assert "dropped the" in err and "oldest exchange" in err
    assert err.count("tokens, first after") == 7, err[-2000:]  # every valid message got a reply


def test_cli_refuses_absurd_numbers_in_one_line():
    """Absurd option values stop at the parser: one `error:` line, exit status 2, no traceback, no model load."""
    for argv in (["serve", "--port", "99999"], ["generate", "--prompt", "x", "--kv-pages", "-3"],
                 ["serve", "--max-num-batched-tokens", "0"], ["chat", "--max-model-len", "1e9"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "lserve_lite.cli", *argv], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 2, (argv, r.stderr)
        assert "error:" in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
