"""`lserve-lite` command line: chat, generate, serve, convert, bench, calibrate, eval, kernels."""

from __future__ import annotations

import argparse
import io
import signal
import sys
import time

from . import __version__
from .config import is_utf8
from .engine_args import add_engine_args, engine_config_from_args, utf8_text
from .errors import InvalidRequestError, LServeError, exit_status
from .evaluation.calibrate_args import add_calibrate_args
from .evaluation.eval_args import add_eval_args
from .serve import add_serve_args, run_from_args


def _make_llm(args):
    from .llm import LLM

    return LLM(args.model, backend=args.backend, config=engine_config_from_args(args))


def _sampling(args, **extra):
    from .sampling_params import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, **extra,
    )  # fmt: skip


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, help="vLLM's min-p (0: off)")
    p.add_argument("--seed", type=int, default=None)


def _check_stdio(reads_stdin: bool) -> None:
    """Refuse a closed stdout (`>&-`), or stdin (`<&-`) where the command reads it, before the model loads: Python
    sets them to None and the first write, `input()` or uvicorn's log setup ended the command in a traceback."""
    if sys.stdout is None:
        raise InvalidRequestError("standard output is closed (>&-); give it a file or /dev/null")
    if reads_stdin and sys.stdin is None:
        raise InvalidRequestError("standard input is closed; chat reads its messages there")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_stdio(reads_stdin=False)
    params = _sampling(args)
    llm = _make_llm(args)
    prompt = (
        llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    )
    last = None
    for out in llm.stream_outputs(prompt, params):
        last = out
        if out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    why = _cut(last, params, llm.engine)
    if why.startswith("; cut: the context"):  # else a reply the context cut reads as the model's own ending
        print(f"lserve-lite generate: {why[2:]}", file=sys.stderr)
    return 0


def _readline_history() -> None:
    """Line editing and a persistent input history for the REPL, where readline exists."""
    try:
        import atexit
        import os
        import readline
    except ImportError:
        return
    path = os.path.join(os.path.expanduser("~"), ".lserve_lite_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline, path: str) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


CHAT_COMMANDS = (
    "/reset clears the conversation, /exit or /quit (or Ctrl-D) quits, /help lists these, // starts a message with a "
    "slash, Ctrl-C stops a reply."
)


def cmd_chat(args: argparse.Namespace) -> int:
    _check_stdio(reads_stdin=True)
    # stdin is UTF-8 whatever the locale: a Latin-1 one garbled UTF-8 text (é read as Ã©) and took Latin-1 bytes as
    # text, and a C one without UTF-8 mode refused all but ASCII. A byte that is not UTF-8 is escaped (strict, one
    # failed the whole chunk read, the lines around it lost too) and refused by the line's is_utf8 check below. A
    # file saved on Windows: its CRLF ends were sent with each message, and its BOM made a first-line command a message.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(encoding="utf-8-sig", errors="surrogateescape", newline=None)
    if sys.stdin.isatty():  # a piped chat's lines are a script's, not the user's history
        _readline_history()
    params = _sampling(args)
    llm = _make_llm(args)
    if not llm.tokenizer.chat_template:  # else the first message would end the REPL with this error
        raise InvalidRequestError(
            "this model has no chat template; chat needs one (`lserve-lite generate --prompt` takes a plain prompt)"
        )
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
        if _fit_context(llm, history, keep=1) is None:
            print(
                "error: the system prompt alone does not fit the context (--max-model-len)", file=sys.stderr
            )
            return 1
    print(f"lserve-lite chat ({llm.engine.kv_summary()}): {CHAT_COMMANDS}", file=sys.stderr)
    prompt = (
        ">>> " if sys.stdin.isatty() else ""
    )  # `chat < questions > answers`: the file holds the replies alone
    while True:
        try:
            line = _read_line(prompt)
        except LineTooLong:
            print(f"error: that line is over {MAX_LINE_CHARS} characters; it was dropped", file=sys.stderr)
            continue
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # often one meant for a reply that just ended: the conversation stays
            print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        except UnicodeDecodeError:
            line = "\udcff"  # reported below, like bytes that a surrogate-escaping stdin let through
        if not is_utf8(line):
            print("error: that line is not valid UTF-8 (chat reads UTF-8 whatever the locale); type it again",
                  file=sys.stderr)  # fmt: skip
            continue
        cmd = line.strip()
        if not cmd:
            continue
        word = cmd.split()[0]  # a command's trailing words are ignored, as most REPLs do
        if word in ("/exit", "/quit"):
            return 0
        if word == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd.startswith("//"):  # a message that starts with a slash
            line = line.lstrip()[1:]
        elif cmd.startswith("/"):
            known = word if word == "/help" else f"unknown command {word}"
            print(f"{known}: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        try:  # the template may refuse a conversation (raise_exception): the REPL and its history go on
            fitted = _fit_context(
                llm, history + [{"role": "user", "content": line}], keep=1 if args.system else 0
            )
        except LServeError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # while a long paste is tokenized (seconds a megabyte): that message only
            print("\n(stopped: that message was not sent)", file=sys.stderr)
            continue
        if fitted is None:  # /reset would not help: it keeps the system prompt
            print(
                f"error: this message alone does not fit the context of {llm.engine.max_len} tokens "
                f"(less {REPLY_ROOM} kept for a reply); shorten it",
                file=sys.stderr,
            )
            continue
        history = fitted
        reply, n, t0, t1, last = [], 0, time.perf_counter(), None, None
        stream = llm.stream_outputs(history, params)
        try:
            for out in stream:
                t1, last = t1 or time.perf_counter(), out
                n += len(out.token_ids)
                reply.append(out.text)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        except LServeError as e:
            history.pop()
            if reply:  # the part written ends its line
                print()
            print(f"error: {e}", file=sys.stderr)
            if llm.engine.fault():  # no step can run any more (a tensor-parallel worker died): the chat ends
                return 1
            continue
        t2 = time.perf_counter()
        rate = (n - 1) / (t2 - t1) if t1 and n > 1 and t2 > t1 else 0.0
        cached = f", {last.num_cached_tokens}/{last.num_prompt_tokens} prompt tokens cached" if last else ""
        why = _cut(last, params, llm.engine)
        print()  # on stdout, each reply on its own line(s) where stdout is a file or pipe
        print(
            f"[{n} tokens, first after {(t1 or t2) - t0:.2f} s, {rate:.1f} tokens/s{cached}{why}]",
            file=sys.stderr,
        )
        history.append({"role": "assistant", "content": "".join(reply)})


def _cut(out, params, engine) -> str:
    """Why a reply ended before the model finished it, for the status line: else a reply cut mid-sentence by the
    context limit reads as the model's own ending (the next message drops the oldest exchanges)."""
    if out is None or out.finish_reason != "length":
        return ""
    if out.num_output_tokens >= params.max_new_tokens:
        return f"; cut at --max-new-tokens {params.max_new_tokens}"
    if engine.max_len < engine.ecfg.resolve_max_len(engine.cfg):  # a larger --max-model-len would not help
        return f"; cut: the context is full (the KV pool (--kv-pages) holds {engine.max_len} tokens)"
    return f"; cut: the context is full (--max-model-len {engine.max_len})"


MAX_LINE_CHARS = 1 << 24  # a piped chat line's characters at most: a longer one is read on and dropped


class LineTooLong(Exception):
    """A piped chat line past MAX_LINE_CHARS (its rest read and dropped)."""


def _read_line(prompt: str) -> str:
    """The chat's next line: `input()` at a terminal (line editing, history); from a pipe or a file a bounded read,
    as `input()` read a line with no newline whole (`chat < /dev/zero` grew memory without end)."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline(MAX_LINE_CHARS + 1)
    if not line:
        raise EOFError
    if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
        while (rest := sys.stdin.readline(1 << 20)) and not rest.endswith("\n"):
            pass
        raise LineTooLong
    return line.removesuffix("\n")


REPLY_ROOM = 16  # tokens a chat prompt leaves free at least, so that a reply can start


def _fit_context(llm, messages: list[dict], keep: int) -> list[dict] | None:
    """`messages` without their oldest exchanges (after the first `keep` messages), as few dropped as leave room
    for a reply; None when even the newest message alone does not fit (the caller's history stays as it was)."""

    def too_long(msgs: list[dict]) -> bool:
        return len(llm.tokenizer.encode_chat(msgs)) >= llm.engine.max_len - REPLY_ROOM

    # first the kept messages and the newest alone: a paste past the context is tokenized once, not once a drop
    if too_long(messages[:keep] + messages[max(keep, len(messages) - 1) :]):
        return None
    fitted, dropped = list(messages), 0
    while too_long(fitted):
        del fitted[keep : keep + 2]  # a user message and the reply to it
        dropped += 1
    if dropped:
        print(
            f"(context full: dropped the {dropped} oldest exchange(s); /reset starts afresh)", file=sys.stderr
        )
    return fitted


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights.gguf_import import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, progress=True)
    print(f"converted {args.gguf} -> {out}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    if not args.json:  # with --json the results are written there first, whatever stdout is
        _check_stdio(reads_stdin=False)
    return bench_main(args, _make_llm(args))


def cmd_kernels(args: argparse.Namespace) -> int:
    from .harness import main as harness_main

    return harness_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lserve-lite", description=__doc__)
    ap.add_argument("--version", action="version", version=f"lserve-lite {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive chat REPL (streams replies)")
    add_engine_args(p)
    _sampling_args(p, temperature=0.7)
    p.add_argument("--system", type=utf8_text, default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt; prints only the completion")
    add_engine_args(p)
    _sampling_args(p, temperature=0.0)
    p.add_argument("--prompt", type=utf8_text, required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert a llama or qwen2 GGUF into a HF safetensors directory")
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="prefill and decode tokens/s of this model on this backend")
    add_engine_args(p)
    from .bench import add_args as add_bench_args

    add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    # every word after `kernels` goes to the harness's own parser: with "-" prefixes here, `kernels --seed 3` was
    # refused as an unknown option of `lserve-lite`, and `kernels --help` did not list the cases
    p = sub.add_parser(
        "kernels",
        help="kernel harness: `kernels test` checks every GPU kernel vs its reference",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="test [CASE ...]",
        help="`kernels test --help` lists the cases",
    )
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the `serve` extra)")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="derive a streaming-head pattern (full_attention_heads.tsv)")
    add_calibrate_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="RULER-style accuracy suite: dense vs LServe settings, with 95%% CIs")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    return ap


def cmd_serve(args: argparse.Namespace) -> int:
    _check_stdio(reads_stdin=False)
    return run_from_args(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .evaluation.calibrate import main as calibrate_main

    return calibrate_main(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.run_eval import main as eval_main

    return eval_main(args)


def _terminate(signum: int, frame) -> None:
    """SIGTERM ends a command as Ctrl-C does, through `finally` blocks and exit hooks (tensor-parallel workers
    stopped, their shared memory released: killed outright, the resource tracker warned of leaks); status 143."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # a reply's character past stdout's encoding (a Latin-1 locale, a Windows code page) ended it in a traceback
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
