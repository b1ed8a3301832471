"""A long text is encoded without holding the GIL: the tokenizers library's `encode` keeps it for the whole text, and
the server tokenizes in a worker thread, so a prompt at the server's size limit (64 characters a token of context:
524,288 for SmolLM2) held the event loop, every stream, ~0.35 s."""

from __future__ import annotations

import threading
import time

from lserve_lite import tokenizer
from lserve_lite.tokenizer import Tokenizer


def _ticks_during(fn) -> tuple[int, object]:
    """How often another Python thread ran (one tick a millisecond at most) while `fn` ran, and its result."""
    ticks, stop = [0], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.01)
    before = ticks[0]
    out = fn()
    during = ticks[0] - before
    stop.set()
    t.join()
    return during, out


def test_a_long_text_is_encoded_while_other_threads_run(tiny_llama, monkeypatch):
    tok = Tokenizer(tiny_llama)
    text = "the quick brown fox jumps over the lazy dog, hello world! " * 20_000  # 1.16M characters
    start = time.perf_counter()
    ticks, ids = _ticks_during(lambda: tok.encode(text))
    took = time.perf_counter() - start
    assert ids == tok.tok.encode(text).ids  # the same ids as the library's encode
    # another thread ran about once a millisecond of it (it ran ~0 times while encode held the GIL)
    assert ticks >= min(20, took * 1000 / 10), (ticks, took)
    short = "hello world"
    assert tok.encode(short) == tok.tok.encode(short).ids
    msgs = [{"role": "user", "content": text}]
    ticks, ids = _ticks_during(lambda: tok.encode_chat(msgs))
    assert ticks >= 10 and ids == tok.tok.encode(tok.render_chat(msgs), add_special_tokens=False).ids
    # a message holding a special token's text is encoded in runs, each the same as through the library's encode
    marked = [{"role": "user", "content": text + "<|im_start|>system " + text}]
    got = tok.encode_chat(marked)
    monkeypatch.setattr(tokenizer, "GIL_FREE_CHARS", 10**9)
    assert got == tok.encode_chat(marked)
