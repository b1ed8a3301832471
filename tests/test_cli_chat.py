"""The chat REPL survives what people type: a line that is not UTF-8, and a conversation that outgrows the
context (oldest exchanges are dropped, with a note), and still answers."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest


def test_chat_repl_survives_bad_bytes_and_full_context(tiny_llama):
    long_msg = " ".join(["word"] * 60)
    lines = [b"\xff\xfe oops\n", b"/bogus\n", b"/help\n", b"hello\n"] + [long_msg.encode() + b"\n"] * 6
    lines += [b"//etc/hosts?\n", b"/exit\n"]
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-model-len", "256", "--kv-pages", "8", "--max-new-tokens", "8", "--temperature", "0"],
        input=b"".join(lines), capture_output=True, timeout=300,
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0, err[-2000:]
    assert "not valid UTF-8" in err
    assert "dropped the" in err and "oldest exchange" in err
    assert "unknown command /bogus: /reset clears" in err and "/help: /reset clears" in err
    assert err.count("tokens, first after") == 8, err[-2000:]  # every message got a reply, commands none


def test_chat_bad_bytes_under_a_strict_utf8_stdin_lose_only_their_line(tiny_llama):
    """Under a UTF-8 locale (stdin errors `strict`, not the C locale's surrogateescape) a byte that is not UTF-8
    failed the whole chunk read: the lines before and after it were lost with it, and piped input ended there."""
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu"],
        input=b"/help\n\xff\n/bogus\n/reset\n", capture_output=True, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0, err[-2000:]
    assert "/help: /reset clears" in err and "not valid UTF-8" in err, err[-2000:]
    assert "unknown command /bogus" in err and "(conversation cleared)" in err, err[-2000:]


def test_chat_drops_a_piped_line_over_the_limit_with_bounded_reads(tiny_llama, monkeypatch, capsys, tmp_path):
    """A piped line with no newline (`chat < /dev/zero`) was read whole by input(), memory growing without end: a
    line past MAX_LINE_CHARS is now read on in bounded pieces and dropped with one error line, and the next line is
    answered; a line of exactly the limit is a message."""
    from lserve_lite import cli

    class Piped(io.StringIO):
        def readline(self, size: int = -1) -> str:
            assert 0 < size <= 1 << 20, f"an unbounded read ({size})"
            return super().readline(size)

    monkeypatch.setattr(cli, "MAX_LINE_CHARS", 64)
    monkeypatch.setattr(sys, "stdin", Piped("x" * 5000 + "\n" + "y" * 64 + "\nhi\n"))
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["chat", "--model", str(tiny_llama), "--backend", "cpu", "--max-new-tokens", "1"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("error: that line is over 64 characters; it was dropped") == 1, err[-2000:]
    assert err.count("tokens, first after") == 2, err[-2000:]  # the 64-character line and "hi"


def test_chat_reads_a_windows_file(tiny_llama):
    """Questions piped from a file saved on Windows: its BOM made the first line's `/help` a message, and the CR of
    each CRLF end was sent with the message (the prompt's token count shows it)."""
    argv = [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
            "--max-new-tokens", "1"]  # fmt: skip
    windows = subprocess.run(argv, input=b"\xef\xbb\xbf/help\r\nhello\r\n", capture_output=True, timeout=300)
    unix = subprocess.run(argv, input=b"hello\n", capture_output=True, timeout=300)
    err = windows.stderr.decode()
    assert windows.returncode == 0 and "/help: /reset clears" in err, err[-2000:]
    assert err.count("tokens, first after") == 1, err[-2000:]

    def prompt_tokens(stderr: bytes) -> list[str]:
        return re.findall(r"/(\d+) prompt tokens cached", stderr.decode())

    assert prompt_tokens(windows.stderr) == prompt_tokens(unix.stderr), (err, unix.stderr)


@pytest.mark.parametrize(
    "locale",
    [
        {"PYTHONIOENCODING": "latin-1"},
        {"LC_ALL": "C"},
        {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"},
    ],
)
def test_chat_reads_utf8_whatever_the_locale(tiny_llama, locale):
    """stdin decoded by the locale: under Latin-1 a UTF-8 `héllo` reached the model as `hÃ©llo` (more prompt tokens)
    and the Latin-1 byte of `caf\xe9` as text; under a C locale without UTF-8 mode `héllo` was refused. Chat reads
    UTF-8 whatever the locale, and a line that is not UTF-8 is refused in one line, the chat going on."""
    argv = [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
            "--max-new-tokens", "1"]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL")}

    def run(env: dict) -> str:
        r = subprocess.run(argv, input="héllo\n".encode() + b"caf\xe9\n", capture_output=True, timeout=300,
                           env={**base, **env})  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr.decode()

    utf8, err = run({"PYTHONIOENCODING": "utf-8"}), run(locale)
    prompts = re.findall(r"/(\d+) prompt tokens cached", err)
    assert len(prompts) == 1 and prompts == re.findall(r"/(\d+) prompt tokens cached", utf8), (err, utf8)
    assert err.count("error: that line is not valid UTF-8 (chat reads UTF-8 whatever the locale)") == 1, err


def test_chat_commands_ignore_trailing_words(tiny_llama):
    """A command is its line's first word: `/reset now` resets, `/quit now` quits (the message after it never runs)."""
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-new-tokens", "2"],
        input=b"/reset now\n/help me\n/quit now\nhello\n", capture_output=True, timeout=300,
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 0, err[-2000:]
    assert "(conversation cleared)" in err and "/help: /reset clears" in err and "unknown command" not in err
    assert "tokens, first after" not in err, err[-2000:]


def test_piped_chat_writes_the_replies_alone_each_ending_its_line(tiny_llama):
    """`chat < questions > answers`: stdout held the prompts too and each reply ran into the next (`>>> reply>>> `):
    the prompt is shown on a terminal only, and a reply's newline goes to stdout (its status line to stderr)."""
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-new-tokens", "2", "--temperature", "0"],
        input="hello\nagain\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr.count("tokens, first after") == 2, r.stderr[-2000:]
    assert ">>>" not in r.stdout and r.stdout.endswith("\n"), r.stdout


def test_piped_chat_keeps_no_input_history(tiny_llama, tmp_path):
    """The REPL's line history (~/.lserve_lite_history) is for a terminal: a piped chat read and wrote it, so a
    script's questions landed in the user's history (and an empty file appeared for a chat that never had one)."""
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-new-tokens", "2", "--temperature", "0"],
        input="hello\n", capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr.count("tokens, first after") == 1, r.stderr[-2000:]
    assert not (tmp_path / ".lserve_lite_history").exists()


def test_cli_refuses_absurd_numbers_in_one_line():
    """Absurd option values stop at the parser: one `error:` line, exit status 2, no traceback, no model load."""
    for argv in (["serve", "--port", "99999"], ["generate", "--prompt", "x", "--kv-pages", "-3"],
                 ["serve", "--max-num-batched-tokens", "0"], ["chat", "--max-model-len", "1e9"],
                 ["bench", "--prompt-lens", "16,abc"], ["bench", "--steps", "0"], ["bench", "--batch", "100000"],
                 ["bench", "--context", "99999999"], ["bench", "--json", "/nonexistent-dir/x.json"],
                 ["eval", "--lengths", "2048,abc"], ["eval", "--lengths", "100"], ["eval", "--samples", "10000000"],
                 ["calibrate", "--out", "x.tsv", "--tail", "1"], ["calibrate", "--out", "x.tsv", "--samples", "0"], ["calibrate", "--out", "x.tsv", "--seed", "-1"],
                 ["serve", "--served-model-name", " "], ["serve", "--api-key", ""],
                 ["serve", "--api-key", "key "],
                 ["generate", "--prompt", "x", "--sparse", "--pattern", "/nonexistent/p.tsv"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "lserve_lite.cli", *argv], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 2, (argv, r.stderr)
        assert "error:" in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)


def test_calibrate_out_under_a_file_is_refused_by_the_parser(tmp_path, capsys):
    """`calibrate --out FILE/p.tsv` (a path under a file) was refused as "cannot write there (File exists)"; the
    parser names the file in the way, as eval's --out does."""
    from lserve_lite.cli import main

    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--out", str(tmp_path / "f" / "p.tsv")])
    assert e.value.code == 2 and f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err


def test_generate_into_a_closed_pipe_is_quiet(tiny_llama):
    """`lserve-lite generate ... | head -c 5`: the reader goes away; the writer stops without a BrokenPipeError
    traceback (status 141 as a shell reports SIGPIPE). The read end is closed before the first write."""
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(tiny_llama), "--backend", "cpu",
         "--prompt", "hello", "--max-new-tokens", "4"],
        stdout=w, stderr=subprocess.PIPE, text=True, timeout=300,
    )  # fmt: skip
    os.close(w)
    assert (p.returncode, p.stderr) == (141, "")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_generate_into_a_full_disk_is_one_line(tiny_llama):
    """`lserve-lite generate ... > /dev/full` (a disk that filled up) ended in an OSError traceback."""
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(tiny_llama), "--backend", "cpu",
             "--prompt", "hello", "--max-new-tokens", "4"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert (p.returncode, p.stderr) == (1, "error: No space left on device\n")


@pytest.mark.parametrize(
    "command,fd,msg",
    [("generate", 1, "standard output is closed"), ("chat", 1, "standard output is closed"),
     ("chat", 0, "standard input is closed"), ("serve", 1, "standard output is closed"),
     ("bench", 1, "standard output is closed")],
)  # fmt: skip
def test_closed_stdio_is_one_line(tiny_llama, command, fd, msg):
    """`generate >&-` or `chat <&-`: Python's stdout / stdin is None, and the first write or `input()` ended the
    command in a traceback (after the model loaded); `serve >&-` in uvicorn's log setup; `bench >&-` without --json
    ran its whole benchmark and printed its results nowhere (status 0)."""
    prompt = ["--prompt", "hello"] if command == "generate" else []
    p = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", command, "--model", str(tiny_llama), "--backend", "cpu", *prompt],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
        preexec_fn=lambda: os.close(fd),
    )  # fmt: skip
    assert p.returncode == 1 and p.stderr.startswith(f"error: {msg}") and "Traceback" not in p.stderr, (
        p.stderr
    )


def test_serve_address_brackets_ipv6():
    """The startup line said "http://::1:8000" for --host ::1 (no URL a browser or client takes)."""
    from lserve_lite.serve import address

    assert address("::1", 8000) == "[::1]:8000" and address("0.0.0.0", 80) == "0.0.0.0:80"


def test_lserve_options_need_sparse(tmp_path):
    """--pattern or an LServe knob without --sparse was ignored without a word (dense attention ran)."""
    from lserve_lite.cli import build_parser
    from lserve_lite.engine_args import engine_config_from_args
    from lserve_lite.errors import InvalidRequestError

    pat = tmp_path / "p.tsv"
    pat.write_text("1\t0\n")
    for extra in (["--pattern", str(pat)], ["--token-budget", "512"]):
        args = build_parser().parse_args(["generate", "--prompt", "x", *extra])
        with pytest.raises(InvalidRequestError, match=f"{extra[0]} applies to LServe .* add --sparse"):
            engine_config_from_args(args)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--page-size", "32"])  # dense pages too
    assert engine_config_from_args(args).page_size == 32
    # these were refused as LServe's (its 128-token sinks are no multiple of them); dense mode has no sinks
    for size in ("256", "1024"):
        args = build_parser().parse_args(["generate", "--prompt", "x", "--page-size", size])
        assert engine_config_from_args(args).page_size == int(size)
    args = build_parser().parse_args(["serve", "--sparse", "--pattern", str(pat), "--token-budget", "512"])
    assert engine_config_from_args(args).sparse.token_budget == 512


def test_pattern_path_with_a_tilde_is_the_file_checked(tmp_path, monkeypatch):
    """`--pattern=~/p.tsv` (no shell expands it) passed the existence check, which expanded it, and the engine
    then read '~/p.tsv' literally: 'head pattern file not found'."""
    from lserve_lite.cli import build_parser
    from lserve_lite.engine_args import engine_config_from_args

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.tsv").write_text("1\t0\n")
    args = build_parser().parse_args(["generate", "--prompt", "x", "--sparse", "--pattern=~/p.tsv"])
    assert engine_config_from_args(args).sparse.pattern_path == str(tmp_path / "p.tsv")


def _chat(tiny_llama, *flags: str, lines: bytes | None = None) -> list[tuple[int, int]]:
    """(cached, prompt) tokens from the status line of each reply (default: to three long messages)."""
    import re

    msg = b" ".join([b"the quick brown fox"] * 30) + b"\n"
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-new-tokens", "8", "--temperature", "0", *flags],
        input=(msg * 3 if lines is None else lines) + b"/exit\n", capture_output=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) prompt tokens cached", r.stderr.decode())]


def test_chat_refused_message_keeps_the_history(tiny_llama):
    """A message too long for the context is refused without dropping the earlier exchanges."""
    first, after = _chat(tiny_llama, "--max-model-len", "128", lines=b"hi\n" + b"hello " * 300 + b"\nhi\n")
    assert after[1] > first[1] + 4  # the second "hi" carries the first exchange


def test_chat_says_why_a_reply_was_cut(tiny_llama):
    """A reply that ran into the context limit stopped mid-sentence with the usual status line: nothing said the
    context was full (nor, for a reply cut at --max-new-tokens, that the limit cut it)."""
    msg = " ".join(["word"] * 100) + "\n"
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-model-len", "256", "--max-new-tokens", "200", "--temperature", "0"],
        input="hi\n" + msg + "/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [s for s in r.stderr.splitlines() if "tokens, first after" in s]
    assert len(lines) == 2, r.stderr[-2000:]
    assert lines[0].endswith("; cut at --max-new-tokens 200]"), lines
    assert lines[1].endswith("; cut: the context is full (--max-model-len 256)]"), lines


def test_chat_ctrl_c_at_the_prompt_keeps_the_conversation(tiny_llama, monkeypatch, capsys, tmp_path):
    """A Ctrl-C that came just after a reply ended (meant to stop it) ended the chat and lost the conversation;
    at the prompt it now clears the line, as Python's REPL does, and Ctrl-D or /exit quits."""
    from lserve_lite import cli

    typed = iter([KeyboardInterrupt(), "hi", EOFError()])

    def fake_input(prompt: str = "") -> str:
        item = next(typed)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setenv("HOME", str(tmp_path))  # the REPL's history file
    monkeypatch.setattr(cli, "_read_line", fake_input)
    argv = ["chat", "--model", str(tiny_llama), "--backend", "cpu", "--max-new-tokens", "2"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "(Ctrl-D or /exit quits)" in err and err.count("tokens, first after") == 1, err[-2000:]


def test_chat_ctrl_c_while_a_paste_is_read_keeps_the_conversation(tiny_llama, monkeypatch, capsys, tmp_path):
    """Ctrl-C while a long paste was being tokenized (seconds for megabytes) ended the chat: it drops that
    message only, and the next one is answered."""
    from lserve_lite import cli
    from lserve_lite.tokenizer import Tokenizer

    typed = iter(["a long paste", "hi", "/exit"])
    monkeypatch.setenv("HOME", str(tmp_path))  # the REPL's history file
    monkeypatch.setattr(cli, "_read_line", lambda prompt="": next(typed))
    encode_chat = Tokenizer.encode_chat

    def interrupted_once(self, messages, *a, **kw):
        if messages[-1]["content"] == "a long paste":
            raise KeyboardInterrupt
        return encode_chat(self, messages, *a, **kw)

    monkeypatch.setattr(Tokenizer, "encode_chat", interrupted_once)
    argv = ["chat", "--model", str(tiny_llama), "--backend", "cpu", "--max-new-tokens", "2"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "(stopped: that message was not sent)" in err and err.count("tokens, first after") == 1, err[
        -2000:
    ]


def test_chat_reply_cut_by_a_small_kv_pool_names_the_pool(tiny_llama):
    """A context cut to what --kv-pages holds was reported as `(--max-model-len 64)`, a flag the user did not give
    and whose raise would not help."""
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--kv-pages", "4", "--page-size", "16", "--max-new-tokens", "200", "--temperature", "0"],
        input="hi\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "; cut: the context is full (the KV pool (--kv-pages) holds 64 tokens)]" in r.stderr, r.stderr[
        -2000:
    ]


def test_generate_says_when_the_context_cut_the_reply(tiny_llama):
    """`generate` stopped silently at the context limit (a reply cut mid-sentence read as the model's own ending);
    it now says so on stderr as chat's status line does, and says nothing when --max-new-tokens ended it."""
    argv = [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(tiny_llama), "--backend", "cpu",
            "--kv-pages", "4", "--page-size", "16", "--temperature", "0", "--prompt", "hello"]  # fmt: skip
    r = subprocess.run([*argv, "--max-new-tokens", "200"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.endswith("cut: the context is full (the KV pool (--kv-pages) holds 64 tokens)\n"), (
        r.stderr
    )
    r = subprocess.run([*argv, "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cut" not in r.stderr, r.stderr


def test_chat_refuses_an_overlong_paste_with_one_encode():
    """A paste past the context was re-tokenized whole once per earlier exchange dropped before it was refused
    (a megabyte a second on the CPU: 30 exchanges made a 1 MB paste wait half a minute for its error)."""
    from types import SimpleNamespace

    from lserve_lite.cli import _fit_context

    calls = []

    def encode_chat(messages):
        calls.append(len(messages))
        return [0] * sum(len(m["content"]) for m in messages)

    llm = SimpleNamespace(
        tokenizer=SimpleNamespace(encode_chat=encode_chat), engine=SimpleNamespace(max_len=100)
    )
    history = [{"role": "system", "content": "s"}] + [{"role": "user", "content": "x"}] * 60
    assert _fit_context(llm, history + [{"role": "user", "content": "p" * 1000}], keep=1) is None
    assert calls == [2]  # the system prompt and the paste alone
    assert _fit_context(llm, history + [{"role": "user", "content": "p" * 50}], keep=1) is not None
    calls.clear()
    assert _fit_context(llm, history[:1], keep=1) == history[:1] and calls == [1, 1]  # the system prompt once


def test_chat_refusal_of_a_long_message_gives_the_limit(tiny_llama, monkeypatch, capsys, tmp_path):
    """The refusal advised "/reset", which keeps the system prompt and so never makes such a message fit, and
    did not say how long a message may be."""
    from lserve_lite import cli

    typed = iter(["hello " * 300, "/exit"])
    monkeypatch.setenv("HOME", str(tmp_path))  # the REPL's history file
    monkeypatch.setattr(cli, "_read_line", lambda prompt="": next(typed))
    argv = [
        "chat",
        "--model",
        str(tiny_llama),
        "--backend",
        "cpu",
        "--max-model-len",
        "128",
        "--system",
        "hi",
    ]
    assert cli.main(argv) == 0
    refusals = [s for s in capsys.readouterr().err.splitlines() if "does not fit" in s]
    assert refusals == [
        "error: this message alone does not fit the context of 128 tokens (less 16 kept for a reply); shorten it"
    ]


def _with_template(tiny_llama, dest, template: str | None):
    """A copy of the tiny model whose tokenizer_config.json has this chat template (None: none)."""
    import shutil

    shutil.copytree(tiny_llama, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(
        json.dumps(cfg | ({"chat_template": template} if template else {}))
    )
    return dest


def test_chat_without_a_template_is_refused_before_the_prompt(tiny_llama, tmp_path):
    """It showed the prompt, then ended with status 1 at the first message (whatever was typed was lost)."""
    model = _with_template(tiny_llama, tmp_path / "m", None)
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(model), "--backend", "cpu"],
        input="hi\n/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (1, "") and r.stderr.splitlines() == [
        "error: this model has no chat template; chat needs one (`lserve-lite generate --prompt` takes a plain prompt)"
    ]


def test_chat_template_refusing_a_message_keeps_the_repl(tiny_llama, tmp_path):
    """A template's raise_exception (roles must alternate, ...) on one message ended the REPL and its history."""
    tmpl = ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('no boom here') }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")  # fmt: skip
    model = _with_template(tiny_llama, tmp_path / "m", tmpl)
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(model), "--backend", "cpu",
         "--max-new-tokens", "2"],
        input="boom\nhello\n/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error: chat template: no boom here" in r.stderr and r.stderr.count("tokens, first after") == 1


def test_chat_refuses_a_system_prompt_that_cannot_fit(tiny_llama):
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
         "--max-model-len", "64", "--system", "word " * 200],
        input="hi\n/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        r.returncode == 1 and "system prompt alone does not fit" in r.stderr and "Traceback" not in r.stderr
    )


@pytest.mark.parametrize(
    "argv", [["chat", "--system"], ["generate", "--chat", "--prompt"], ["serve", "--served-model-name"]]
)
def test_text_options_not_utf8_are_refused_naming_the_option(tiny_llama, argv, capsys):
    """Bytes that are not UTF-8 (a lone surrogate in argv) are refused naming the option, before the model loads:
    the tokenizer's refusal pointed at an index in the rendered chat template instead (and a served model name
    could not be sent as JSON)."""
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "ab\udcffcd", "--model", str(tiny_llama), "--backend", "cpu"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err.endswith(f"error: argument {argv[-1]}: {NOT_UTF8}"), err


NOT_UTF8 = "not valid UTF-8 text (arguments are read as UTF-8 whatever the locale)"


@pytest.fixture(scope="module")
def latin1_locale(tmp_path_factory) -> dict:
    """The environment of a Latin-1 locale (en_US.ISO-8859-1), built with localedef where none is installed."""
    if shutil.which("localedef") is None:
        pytest.skip("no localedef to build a Latin-1 locale")
    where = tmp_path_factory.mktemp("locales")
    r = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(where / "en_US.ISO-8859-1")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode in (0, 1) and (where / "en_US.ISO-8859-1").is_dir(), r.stderr  # 1: warnings only
    return {"LOCPATH": str(where), "LC_ALL": "en_US.ISO-8859-1"}


@pytest.mark.parametrize("locale", ["C", "C without UTF-8 mode", "Latin-1"])
def test_text_arguments_are_utf8_whatever_the_locale(tiny_llama, latin1_locale, locale):
    """Arguments were decoded by the locale: under Latin-1 a UTF-8 `--system héllo` reached the model as `hÃ©llo`
    (more prompt tokens) and a Latin-1 byte as text; under a C locale without UTF-8 mode `héllo` was refused. Text
    arguments are read as UTF-8 whatever the locale, as chat's stdin is; bytes that are not UTF-8 are refused in
    one line."""
    env = {"C": {"LC_ALL": "C"}, "C without UTF-8 mode": {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0"}, "Latin-1": latin1_locale}[locale]  # fmt: skip
    base = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LANG")
    }
    argv = [sys.executable, "-m", "lserve_lite.cli", "chat", "--model", str(tiny_llama), "--backend", "cpu",
            "--max-new-tokens", "1", "--system"]  # fmt: skip

    def prompt_tokens(env: dict) -> list[str]:
        r = subprocess.run([*argv, "héllo wörld".encode()], input=b"hi\n", capture_output=True, timeout=300,
                           env={**base, **env})  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return re.findall(r"/(\d+) prompt tokens cached", r.stderr.decode())

    utf8 = prompt_tokens({"LC_ALL": "C.UTF-8"})
    assert len(utf8) == 1 and prompt_tokens(env) == utf8
    r = subprocess.run(
        [*argv, b"caf\xe9"], input=b"hi\n", capture_output=True, timeout=300, env={**base, **env}
    )
    err = r.stderr.decode("utf-8", "replace").strip()
    assert r.returncode == 2 and err.endswith(f"error: argument --system: {NOT_UTF8}"), err


def test_generate_text_past_the_stdout_encoding_is_replaced(tiny_llama, monkeypatch):
    """A stdout whose encoding lacks a character of the reply (a Latin-1 locale, a Windows code page): the reply
    ended in a UnicodeEncodeError traceback; it is written with `?` in that character's place."""
    import io
    from types import SimpleNamespace

    from lserve_lite import LLM
    from lserve_lite.cli import main

    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii"))
    steps = [SimpleNamespace(text=t, finish_reason=None) for t in ("caf", "\u00e9 ok")]
    monkeypatch.setattr(LLM, "stream_outputs", lambda self, prompt, params: iter(steps))
    assert main(["generate", "--prompt", "hi", "--model", str(tiny_llama), "--backend", "cpu"]) == 0
    sys.stdout.flush()
    assert out.getvalue() == b"caf? ok\n"


def test_top_level_help():
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "eval" in r.stdout, r.stderr


def test_version_is_the_package_version():
    import lserve_lite

    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.split() == ["lserve-lite", lserve_lite.__version__], (
        r.stdout,
        r.stderr,
    )


def test_chat_status_line_reports_cached_tokens(tiny_llama):
    on, off = _chat(tiny_llama), _chat(tiny_llama, "--no-prefix-caching")
    assert [p for _, p in on] == [p for _, p in off] and len(on) == 3
    assert on[0][0] == 0 and all(c >= 64 for c, _ in on[1:]) and all(c == 0 for c, _ in off)


def _bench(tiny_llama, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "bench", "--model", str(tiny_llama), "--backend", "cpu", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_bench_refuses_what_the_engine_cannot_run(tiny_llama):
    """After the model loads, before any prompt runs: a batch over the engine's max_num_seqs, a prompt over the
    context, a decode that would run past it, a batch the KV pool cannot hold at once; and a batch that did not
    decode together for every step (its prefill took several steps, so the first sequence reaches the context
    limit first) is an error too, never a low or 0.0 figure (one line, exit 1)."""
    short = ["--prompt-lens", "16"]
    for flags, msg in ((["--batch", "65"], "exceeds the engine's max_num_seqs (64): raise --max-num-seqs"),
                       (["--context", "300", "--max-model-len", "256"], "the context limit is 256"),
                       ([*short, "--context", "100", "--steps", "50", "--kv-pages", "2"],
                        "152 tokens; the context limit is 128"),
                       ([*short, "--context", "60", "--steps", "8", "--batch", "4", "--kv-pages", "2"],
                        "the KV pool holds 1 sequence(s) of 70 tokens"),
                       ([*short, "--context", "100", "--steps", "28", "--batch", "2", "--kv-pages", "4"],
                        "the KV pool holds 1 sequence(s) of 130 tokens"),
                       ([*short, "--context", "900", "--steps", "122", "--batch", "4"], "of 122 steps")):  # fmt: skip
        r = _bench(tiny_llama, *flags)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "decode_ctx" not in r.stdout


def test_every_engine_command_takes_max_num_seqs():
    """--max-num-seqs is an engine option of chat, generate, bench and serve (one definition, engine_args): `bench
    --batch 65` was refused as over max_num_seqs 64 with no flag to raise it, and the tensor-parallel /dev/shm advice
    had to tell chat / generate / bench users to set it from Python."""
    from lserve_lite import cli
    from lserve_lite.engine_args import engine_config_from_args

    rest = {"chat": [], "generate": ["--prompt", "x"], "bench": [], "serve": []}
    for cmd, extra in rest.items():
        a = cli.build_parser().parse_args([cmd, "--max-num-seqs", "96", *extra])
        assert engine_config_from_args(a).max_num_seqs == 96, cmd
        assert engine_config_from_args(cli.build_parser().parse_args([cmd, *extra])).max_num_seqs == 64, cmd
    r = subprocess.run(  # out of range: argparse's one line, exit 2, before any model loads
        [sys.executable, "-m", "lserve_lite.cli", "bench", "--max-num-seqs", "0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--max-num-seqs" in r.stderr and "Traceback" not in r.stderr


def test_bench_defaults_fit_a_short_context_model(tiny_llama, tmp_path):
    """With no --prompt-lens / --context, a model whose context is under the defaults times what fits (a 2048-token
    model was refused its own default 2048-token prompt); the caller's own values are still checked as given."""
    out = tmp_path / "bench.json"
    r = _bench(tiny_llama, "--max-model-len", "256", "--steps", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(json.loads(out.read_text())) == {
        "model",
        "backend",
        "prefill_255_tok_s",
        "decode_ctx246_b1_tok_s",
    }


def test_bench_times_a_batch_that_just_fits(tiny_llama, tmp_path):
    """Two sequences of 100 + 27 + 2 tokens hold 2 pages each of a 4-page pool: every step is timed."""
    out = tmp_path / "bench.json"
    flags = ["--prompt-lens", "16", "--context", "100", "--steps", "27", "--batch", "2", "--kv-pages", "4"]
    r = _bench(tiny_llama, *flags, "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["decode_ctx100_b2_tok_s"] > 0
    assert (d["model"], d["backend"]) == (tiny_llama.name, "cpu")  # only the printed table named them


def test_bench_prefill_computes_every_timed_prompt(tiny_llama):
    """The prefill rate is of prompts computed, not served from the prefix cache (the same prompt each rep was:
    about 3x the rate on the CPU)."""
    from lserve_lite import LLM, EngineConfig
    from lserve_lite.bench import prefill_tok_s

    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=64))
    assert prefill_tok_s(llm, 200, reps=3) > 0
    assert llm.engine.prompt_tokens_computed == 4 * 200  # the warm-up and three timed prompts, each whole


def test_kernels_test_without_a_gpu_is_not_a_pass():
    """Without a GPU the harness tests nothing: exit 2, so that a script asking for it does not read a pass."""
    from lserve_lite.backends import cuda_available

    if cuda_available():
        pytest.skip("a GPU is visible: the harness runs (tests/test_gpu_ops.py covers it)")
    r = subprocess.run([sys.executable, "-m", "lserve_lite.cli", "kernels", "test"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 2 and "nothing was tested" in r.stdout


@pytest.mark.parametrize(
    "argv, msg",
    [
        (
            ["--json", "/nonexistent-dir/k.json"],
            "its directory does not exist",
        ),  # was an OSError after the run
        (["--seed", "-1"], "--seed: -1 is outside [0,"),  # was NumPy's ValueError before the first case
        (["--json", "/proc/k.json"], "/proc/k.json: cannot be written"),  # was an OSError after the run
        (["attention", "linear", "attention"], "case attention is given twice"),  # its rows ran twice
    ],
)
def test_kernels_test_refuses_bad_options_before_running(argv, msg, capsys):
    """The harness's options are checked before any case runs (a whole run takes minutes on a GPU)."""
    from lserve_lite.harness import main

    with pytest.raises(SystemExit) as e:
        main(["test", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_kernels_options_right_after_kernels_reach_the_harness(capsys):
    """`lserve-lite kernels --seed 3` (the word `test` may be left out) was refused by lserve-lite's own parser as an
    unrecognized argument, and `kernels --help` showed a help without the cases: every word goes to the harness."""
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["kernels", "--seed", "-1"])
    assert (
        e.value.code == 2 and "kernels test: error: argument --seed: -1 is outside" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:
        main(["kernels", "--help"])
    assert e.value.code == 0 and "subset of: embed, add_rmsnorm" in capsys.readouterr().out


def test_kernels_test_refuses_a_json_path_with_a_trailing_slash(tmp_path, capsys):
    """`--json out/` (no such folder) passed as the file `out` and ended in IsADirectoryError after the run."""
    from lserve_lite.harness import main

    with pytest.raises(SystemExit) as e:
        main(["test", "--json", f"{tmp_path}/out/"])
    assert e.value.code == 2 and "out/: cannot be written (is a directory)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_kernels_test_refuses_a_json_file_in_a_directory_it_cannot_write(tmp_path, monkeypatch, capsys):
    """`--json` names a file that is replaced through a temporary file beside it: a writable file in a folder the
    user may not write passed the check, and the run's first write ended in a PermissionError traceback."""
    from lserve_lite.harness import main

    out = tmp_path / "k.json"
    out.write_text("{}")
    access = os.access

    def as_a_user(path, mode: int) -> bool:  # the tests may run as root, whom os.access never refuses
        return access(path, mode) and os.fspath(path) != str(tmp_path)

    monkeypatch.setattr(os, "access", as_a_user)
    with pytest.raises(SystemExit) as e:
        main(["test", "--json", str(out)])
    assert e.value.code == 2 and "k.json: its directory cannot be written" in capsys.readouterr().err


def test_kernels_test_prints_the_seed_it_drew(monkeypatch, capsys):
    """Each run draws fresh inputs; the seed was never shown, so a FAIL on them could not be run again."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import Result

    seeds: list[int] = []
    monkeypatch.setattr(harness, "cuda_available", lambda: True)
    monkeypatch.setattr(
        harness,
        "run_cases",
        lambda names, seed: seeds.append(seed) or [("k", [Result("k", "s", 1, 1, False)])],
    )
    assert harness.main(["test"]) == 1
    assert (
        f"random inputs from seed {seeds[0]} (--seed {seeds[0]} draws them again)" in capsys.readouterr().out
    )
    assert harness.main(["test", "--seed", "7"]) == 1 and seeds[1] == 7


def test_kernels_test_json_is_strict_json(monkeypatch, tmp_path):
    """A crashed case's row has infinite errors, written as `Infinity`, which no strict JSON parser reads."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import Result

    rows = [
        Result("k", "s", 0.5, 0.1, True),
        Result("attention", "-", math.inf, math.inf, False, "RuntimeError: x"),
    ]
    monkeypatch.setattr(harness, "cuda_available", lambda: True)
    monkeypatch.setattr(
        harness, "run_cases", lambda names, seed: [("linear", rows[:1]), ("attention", rows[1:])]
    )
    assert (
        harness.main(["test", "--seed", "5", "linear", "attention", "--json", str(tmp_path / "k.json")]) == 1
    )
    text = (tmp_path / "k.json").read_text()
    got = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert got["rows"][1] == {"case": "attention", "kernel": "attention", "shape": "-", "max_abs": None,
                              "rel": None, "ok": False, "note": "RuntimeError: x", "skipped": False}  # fmt: skip
    # the rows alone did not say which seed drew them (so a FAIL could not be run again) nor what was asked
    assert {k: got[k] for k in ("seed", "cases", "passed", "failed", "skipped", "not_run")} == {
        "seed": 5, "cases": ["linear", "attention"], "passed": 1, "failed": 1, "skipped": 0, "not_run": {}}  # fmt: skip


def test_kernels_test_json_without_a_gpu_says_nothing_was_tested(monkeypatch, tmp_path, capsys):
    """Without a GPU, `--json` wrote no file: a script reading it found none, or an old run's. The note names what
    does check kernels without a GPU (it said only that the CPU backend needs none)."""
    import lserve_lite.harness as harness

    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    assert harness.main(["test", "embed", "--json", str(tmp_path / "k.json")]) == 2
    assert (
        "nothing was tested" in (out := capsys.readouterr().out)
        and "tools/*_host_check.py run some kernels" in out
    )
    got = json.loads((tmp_path / "k.json").read_text())
    assert got == {"seed": None, "cases": ["embed"], "passed": 0, "failed": 0, "skipped": 0, "rows": [],
                   "not_run": {"embed": "no NVIDIA GPU visible to CuPy"}}  # fmt: skip


def _fake_cases(monkeypatch, cases: dict) -> None:
    """The harness with a GPU and `cases` as its cases (each a function of the context)."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import HostCtx

    monkeypatch.setattr(harness, "cuda_available", lambda: True)
    monkeypatch.setattr(harness, "Ctx", HostCtx)
    monkeypatch.setattr(harness, "CASES", cases)


@pytest.mark.parametrize("stop, why", [(KeyboardInterrupt(), "Ctrl-C"), (SystemExit(143), "SIGTERM")])
def test_kernels_test_json_of_an_interrupted_run_keeps_the_cases_that_ran(
    stop, why, monkeypatch, tmp_path, capsys
):
    """`--json` was written only at the end: a run stopped midway (Ctrl-C, the time limit's SIGTERM, a killed
    process) left no file. It is rewritten as cases end (throttled, and at the stop), its `not_run` naming the rest."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import Result

    out = tmp_path / "k.json"
    seen: list[dict] = []

    def second(c):
        seen.append(json.loads(out.read_text()))  # a run killed now leaves this file
        return [Result("b", "s", 0.5, 0.1, False)]

    def interrupted(c):
        raise stop  # the CLI's SIGTERM handler raises SystemExit(143)

    _fake_cases(monkeypatch, {"a": lambda c: [Result("a", "s", 0, 0, True)], "b": second, "c": interrupted,
                              "d": lambda c: pytest.fail("ran after Ctrl-C")})  # fmt: skip
    with pytest.raises(type(stop)):
        harness.main(["test", "--seed", "1", "--json", str(out)])
    assert [r["kernel"] for r in seen[0]["rows"]] == ["a"] and seen[0]["passed"] == 1
    assert seen[0]["not_run"] == dict.fromkeys("bcd", harness.NOT_REACHED)
    got = json.loads(out.read_text())
    assert [r["kernel"] for r in got["rows"]] == ["a", "b"] and (got["passed"], got["failed"]) == (1, 1)
    assert got["not_run"] == dict.fromkeys("cd", f"the run stopped before it ({why})") and got["seed"] == 1
    printed = capsys.readouterr().out  # each case's rows as it ended, then the counts and what did not run
    assert printed.index(" PASS") < printed.index(" FAIL") and printed.rstrip().endswith(
        f"1 passed, 1 failed; not run: c, d (the run stopped before it ({why}))"
    )


def test_kernels_test_names_the_case_of_each_row(monkeypatch, tmp_path, capsys):
    """A row is named by its kernel (`argmax_rows`, `logprob_rows`), not by the case that ran it (`sampling`), and
    neither the table nor the JSON said which case that was: `kernels test CASE --seed N`, to draw a FAIL's inputs
    again, needed the source to find CASE."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import Result

    rows = {"sampling": [Result("argmax_rows", "B1", 0, 0, True), Result("logprob_rows", "R1", 1, 1, False)],
            "embed": [Result("embed_gather", "V9", 0, 0, True)]}  # fmt: skip
    _fake_cases(monkeypatch, {n: (lambda c, n=n: rows[n]) for n in rows})
    assert harness.main(["test", "--seed", "3", "--json", str(tmp_path / "k.json")]) == 1
    got = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [(r["case"], r["kernel"]) for r in got] == [
        ("sampling", "argmax_rows"), ("sampling", "logprob_rows"), ("embed", "embed_gather")]  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == "-- sampling" and printed[3].startswith("argmax_rows") and printed[5] == "-- embed"


def test_kernels_test_json_to_a_pipe_is_one_object(monkeypatch):
    """`--json /dev/stdout` (a pipe): written once, at the end, where a file is rewritten as cases end."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import Result

    _fake_cases(monkeypatch, {n: (lambda c, n=n: [Result(n, "s", 0, 0, True)]) for n in "ab"})
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        with os.fdopen(w, "w"):  # closed after the run: the reader sees the end
            assert harness.main(["test", "--json", f"/dev/fd/{w}"]) == 0
        got = json.loads(reader.read())
    assert (got["passed"], got["not_run"]) == (2, {})


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_bench_json_is_written_whatever_stdout_is(tiny_llama, tmp_path, stdout):
    """`bench --json out >&-` or `> /dev/full`: the table was printed first, so a full stdout ended the run before the
    JSON was written, and a closed one (print writing nowhere) ended it silently, status 0, its table lost. The JSON
    is written first, then the failing stdout is one line (status 1)."""
    if stdout == "full" and not os.path.exists("/dev/full"):
        pytest.skip("needs Linux's /dev/full")
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "lserve_lite.cli", "bench", "--model", str(tiny_llama), "--backend", "cpu",
            "--prompt-lens", "16", "--context", "16", "--steps", "4", "--json", str(out)]  # fmt: skip
    with open("/dev/full" if stdout == "full" else os.devnull, "w") as sink:
        p = subprocess.run(argv, stdout=sink, stderr=subprocess.PIPE, text=True, timeout=300,
                           preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)  # fmt: skip
    msg = {
        "closed": "standard output is closed (>&-): the table was not printed",
        "full": "No space left on device",
    }
    assert p.returncode == 1 and p.stderr.startswith(f"error: {msg[stdout]}"), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert json.loads(out.read_text())["decode_ctx16_b1_tok_s"] > 0


def test_bench_json_path_that_is_a_directory(tiny_llama, tmp_path):
    r = _bench(tiny_llama, "--json", str(tmp_path))
    assert r.returncode == 2 and "a directory, not a file" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_an_address_it_cannot_bind_before_loading(tmp_path):
    """A port in use or an unknown host is one line before the model loads (the model path here does not exist)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for host, p in (("127.0.0.1", port), ("999.1.1.1", 8000)):
            r = subprocess.run(
                [sys.executable, "-m", "lserve_lite.cli", "serve", "--model", str(tmp_path / "none"),
                 "--host", host, "--port", str(p)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 1 and f"cannot listen on {host}:{p}" in r.stderr, r.stderr


def test_kernels_run_cases_of_an_empty_filter_runs_none(monkeypatch):
    """`run_cases([])` (a filter over CASES that matched nothing) ran every case, minutes on a GPU."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import HostCtx, Result

    ran: list[str] = []
    cases = {n: (lambda c, n=n: ran.append(n) or [Result(n, "s", 0, 0, True)]) for n in ("a", "b")}
    monkeypatch.setattr(harness, "Ctx", HostCtx)
    monkeypatch.setattr(harness, "CASES", cases)
    assert list(harness.run_cases([], 0)) == [] and ran == []
    assert [r.kernel for _, rows in harness.run_cases(None, 0) for r in rows] == ["a", "b"] == ran


def test_kernels_case_run_alone_draws_its_inputs_of_the_whole_run(monkeypatch):
    """The seed a run prints is to draw a failing case's inputs again, alone: they came from one generator shared in
    order, so `kernels test CASE --seed N` drew other inputs than CASE had in the whole run."""
    import lserve_lite.harness as harness
    from lserve_lite.harness.common import HostCtx, Result

    def draw(c):
        return [Result("k", str(c.rng.integers(1 << 62)), 0, 0, True)]

    monkeypatch.setattr(harness, "Ctx", HostCtx)
    monkeypatch.setattr(harness, "CASES", {"a": draw, "b": draw})

    def drawn(names, seed):
        return {name: rows[0].shape for name, rows in harness.run_cases(names, seed)}

    whole = drawn(["a", "b"], 5)
    assert drawn(["b"], 5)["b"] == whole["b"] != whole["a"] and drawn(["b"], 6)["b"] != whole["b"]


def test_kernels_test_lists_rows_this_gpu_does_not_run(monkeypatch, tmp_path, capsys):
    """Rows a GPU does not run (wgmma prefill below 9.x, fp8 KV below 8.9) were left out silently, so `0 failed`
    read as if they had been checked; they are SKIP rows now, with the reason, counted apart, exit status 0."""
    from types import SimpleNamespace

    import lserve_lite.harness as harness
    from lserve_lite.harness import attention as HA
    from lserve_lite.harness import kv_quant as HK
    from lserve_lite.harness.common import Result

    def row(*a, **kw):
        return Result("k", "s", 0, 0, True)

    monkeypatch.setattr(HA, "prefill_kernels_available", lambda: ["mma"])
    monkeypatch.setattr(HA, "_attention_case", row)
    monkeypatch.setattr(HA, "sparse_prefill_one", row)
    rows = HA.case_prefill_kernels(None)
    assert [r.kernel for r in rows if r.skipped] == [
        f"attention.prefill[{k}]" for k in ("wgmma", "tma", "wgmma bf16")
    ]
    for name in ("kv_attention_one", "kv_sparse_one"):
        monkeypatch.setattr(HK, name, row)
    for name in ("kv_write_one", "kv_write_fused_one", "kv_write_sparse_one"):
        monkeypatch.setattr(HK, name, lambda *a, **kw: [])
    monkeypatch.setattr(HK, "prefill_kernels", lambda c: [None])
    kv_rows = HK.case_kv_quant(SimpleNamespace(ops=SimpleNamespace(kv_dtypes=("fp16", "int8", "int4"))))
    assert [r.shape for r in kv_rows if r.skipped] == ["fp8"] and "sm_89" in kv_rows[0].note
    assert len(kv_rows) > 1 and all(r.ok for r in kv_rows)

    monkeypatch.setattr(harness, "cuda_available", lambda: True)
    monkeypatch.setattr(harness, "run_cases", lambda names, seed: [("prefill_kernels", rows[-3:] + [row()])])
    assert harness.main(["test", "prefill_kernels", "--json", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "SKIP  (needs compute capability 9.x)" in out and "1 passed, 0 failed, 3 skipped" in out
    got = json.loads((tmp_path / "k.json").read_text())
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 0, 3) and got["rows"][0]["skipped"] is True


def test_kernels_test_ops_that_do_not_start_are_one_failed_row(monkeypatch, tmp_path, capsys):
    """CuPy seeing a GPU whose ops cannot start (the kernels' compiler missing, say) ended in a traceback before
    any row, and no JSON."""
    import lserve_lite.harness as harness

    def no_ops(seed):
        raise RuntimeError("nvrtc: libnvrtc.so.12 not found")

    monkeypatch.setattr(harness, "cuda_available", lambda: True)
    monkeypatch.setattr(harness, "Ctx", no_ops)
    assert harness.main(["test", "embed", "--json", str(tmp_path / "k.json")]) == 1
    assert "RuntimeError: nvrtc: libnvrtc.so.12 not found" in capsys.readouterr().out
    got = json.loads((tmp_path / "k.json").read_text())
    assert (got["failed"], got["rows"][0]["kernel"]) == (1, "CudaOps")
    assert got["not_run"] == {"embed": "the CUDA ops did not start (the failed row CudaOps says why)"}


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_min_p_help_names_no_backend_restriction(command, capsys):
    """`--min-p`'s help said "CPU backend only" after the GPU sampler gained min_p (kernels/sampling.cu's
    min_p_mask): a GPU user read that the option would be refused or ignored."""
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--min-p MIN_P vLLM's min-p (0: off) --seed" in help_text


def test_kv_dtype_help_says_what_auto_is(capsys):
    """`--kv-dtype`'s help read "auto (the backend's float type)", the CPU's being float32, though auto has stored
    fp16 on the CPU too since 2026-12-04 (CpuOps.kv_dtypes; fp32 only on a CPU without F16C), as the README says."""
    from lserve_lite.backends.cpu import NATIVE_HALF, CpuOps
    from lserve_lite.backends.cuda import CudaOps
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "auto (fp16; fp32 on a CPU without F16C)" in help_text
    assert (CudaOps.kv_dtypes[0], CpuOps.kv_dtypes[0]) == ("fp16", "fp16" if NATIVE_HALF else "fp32")


NO_USER = "~lserve-lite-no-such-user"  # a `~user` prefix naming no user of this machine


@pytest.mark.parametrize(
    "argv, env, status",
    [
        (["generate", "--prompt", "x", "--model", f"{NO_USER}/m"], None, 1),
        (["generate", "--prompt", "x", "--backend", "cpu"], f"{NO_USER}/w", 1),  # the default model's home
        (["convert", f"{NO_USER}/m.gguf", "out"], None, 1),
        (["generate", "--prompt", "x", "--sparse", "--pattern", f"{NO_USER}/p.tsv"], None, 2),
    ],
)
def test_a_tilde_naming_no_user_is_one_line(argv, env, status, monkeypatch, capsys, tmp_path):
    """`--model ~nosuchuser/m` (or such a `convert` input, `--pattern` or LSERVE_LITE_HOME) ended in pathlib's
    RuntimeError "Could not determine home directory." and a traceback; now one `error:` line naming the path."""
    from lserve_lite.cli import main

    monkeypatch.chdir(tmp_path)
    if env:
        monkeypatch.setenv("LSERVE_LITE_HOME", env)
    try:
        code = main(argv)
    except SystemExit as e:  # the parser's refusal
        code = e.code
    err = capsys.readouterr().err
    assert code == status and "error:" in err and NO_USER in err and "names no user" in err, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no file can be made in"
)
def test_eval_results_in_a_folder_that_cannot_be_written_are_refused_by_the_parser(capsys):
    """`eval --out /proc/x` (or a read-only folder) ran every prompt, then failed to write its results ("error:
    /proc/.x.json.N.tmp: No such file or directory"); the parser now refuses it before the model loads, as
    calibrate's own check did."""
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--out", "/proc/lserve-lite-results"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "/proc/lserve-lite-results: cannot be written" in err, err


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_eval_plot_only_of_a_fifo_or_device_is_one_line(special, tmp_path):
    """`eval --plot-only` read its JSON with read_text: a FIFO hung the command, /dev/zero grew memory without end
    (here a MemoryError traceback under a 4 GiB address-space limit); now a results file is read as every JSON
    file is (config.read_text_file: a regular file of at most 64 MB), and each is one `error:` line."""
    import resource

    path = special
    if special == "fifo":
        path = str(tmp_path / "run.json")
        os.mkfifo(path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "eval", "--plot-only", path],
        capture_output=True, text=True, timeout=20, preexec_fn=limit,
    )  # fmt: skip
    msg = f"error: {path}: not a regular file (a FIFO, device or directory)\n"
    assert (r.returncode, r.stderr) == (1, msg)
