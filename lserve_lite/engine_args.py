"""Engine options on the command line, shared by every subcommand that runs a model (chat, generate, bench,
serve): one parser and one EngineConfig builder, with argument types that refuse absurd values at once."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import (
    KV_DTYPES,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MAX_POOL_PAGES,
    EngineConfig,
    SparseConfig,
    is_utf8,
    user_path,
    written_in_place,
)
from .errors import InvalidRequestError, ModelLoadError


def _bounded(kind: type, what: str, lo: float, hi: float):
    """An argparse type: a `kind` in [lo, hi] (NaN is outside), else a one-line usage error."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi}]")
        return v

    return parse


def utf8_text(text: str) -> str:
    """An argparse type: a text argument's bytes read as UTF-8 whatever the locale, as chat's stdin (a Latin-1 locale
    turned a UTF-8 `é` into `Ã©`, a C one without UTF-8 mode refused it); bytes that are not UTF-8 are refused."""
    try:
        raw = os.fsencode(text)  # the bytes the OS passed (the locale's decoding undone)
    except UnicodeEncodeError:  # no bytes of the OS: text given from Python, outside the locale's encoding
        raw = None
    text = text if raw is None else raw.decode("utf-8", "surrogateescape")
    if not is_utf8(text):
        raise argparse.ArgumentTypeError(
            "not valid UTF-8 text (arguments are read as UTF-8 whatever the locale)"
        )
    return text


def bounded_int(lo: int, hi: int = 1 << 31) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""
    return _bounded(int, "an integer", lo, hi)


def bounded_float(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number in [lo, hi]."""
    return _bounded(float, "a number", lo, hi)


def int_list(lo: int, hi: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated distinct integers, each in [lo, hi]."""
    one = bounded_int(lo, hi)
    return lambda text: distinct([one(t) for t in text.split(",")])


def float_list(lo: float, hi: float) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated distinct numbers, each in [lo, hi]."""
    one = bounded_float(lo, hi)
    return lambda text: distinct([one(t) for t in text.split(",")])


def name_list(text: str) -> list[str]:
    """An argparse type: comma-separated distinct names (blanks around each dropped; an empty one refused)."""
    names = [t.strip() for t in text.split(",")]
    if "" in names:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name (a comma too many?)")
    return distinct(names)


def choice_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated distinct names, each one of `allowed` (a typo would otherwise select
    nothing, and a run would time and write nothing of it)."""

    def parse(text: str) -> list[str]:
        names = name_list(text)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def distinct(values: list) -> list:
    """`values`, refused if one repeats: a setting given twice runs twice and, in an evaluation, counts the same
    prompts twice as if they were independent samples."""
    for i, v in enumerate(values):
        if v in values[:i]:
            raise argparse.ArgumentTypeError(f"{v} is given twice")
    return values


def results_folder(text: str) -> str:
    """An argparse type: a folder a tool writes its results into (a name ending in .json would become a folder)."""
    if text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{text!r} names a file; --out is a folder for the results")
    return text


def json_file(text: str) -> str:
    """An argparse type: a file to write results into (write_text_atomic), in a directory that exists, writable
    (checked before the run, which would otherwise end in an OSError after all its work: a new file is created and
    removed here; a file there is replaced through a temporary file beside it, so its directory must be writable)."""
    path = Path(text)
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its directory does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a directory, not a file")
    # the text as the run will open it (Path drops a trailing slash: `out/` read as the file `out`)
    if os.path.exists(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: cannot be written (permission denied)")
        if not written_in_place(text) and not os.access(path.resolve().parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text}: its directory cannot be written (permission denied)")
        return text
    try:
        open(text, "x").close()
        os.unlink(text)
    except OSError as e:  # a folder we may not write in, a read-only file system, /proc, a trailing slash
        raise argparse.ArgumentTypeError(f"{text}: cannot be written ({e.strerror.lower()})") from None
    return text


def output_file(text: str) -> str:
    """An argparse type: a results file (or the stem of several) that a tool writes after its run, making missing
    folders: refused now if it names a directory, lies under a file or in a folder no file can be made in (the write
    would fail after all the work)."""
    path = Path(text)  # as the tools open it (no ~ expansion: the shell does that)
    # Path drops a trailing slash: `out/` (a new folder) would be written as the file `out`
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text}: a directory, not a file")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
    try:  # the nearest folder that exists: a read-only one, a read-only file system, /proc
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"{text}: cannot be written ({(e.strerror or str(e)).lower()})"
        ) from None
    return text


def existing_file(text: str) -> str:
    """An argparse type: a path to a file that exists, checked before a long run needs it; `~` expanded, as the
    check found it (`--pattern=~/p.tsv`, which no shell expands, passed here and was then not found)."""
    try:
        path = user_path(text)
    except ModelLoadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: file not found")
    return str(path)


_SPARSE_KNOBS = {
    "static_sparsity": (float, "fraction of KV heads that become streaming heads"),
    "page_size": (int, "tokens per physical KV page"),
    "sub_pages": (int, "logical pages per physical page (selector granularity)"),
    "prefill_sink": (int, "streaming heads' sink tokens in prefill"),
    "prefill_local": (int, "streaming heads' local window in prefill"),
    "decode_sink": (int, "streaming heads' sink tokens in decode"),
    "decode_local": (int, "streaming heads' local window in decode"),
    "token_budget": (int, "dense heads' KV token budget per decode step"),
    "select_interval": (int, "decode steps between page selections"),
    "group_reduce": (
        str,
        "selector score of a GQA group: mass (summed softmax weight, the default) or max (LServe's); "
        "oracle (evaluation, CPU only): pages by exact attention",
    ),
}


def add_max_model_len(p: argparse.ArgumentParser, text: str) -> None:
    """--max-model-len, one flag and one check for every command that sets the engine's context limit (chat,
    generate, bench, serve, and the evaluation and calibration tools, whose `text` says what their lengths must fit)."""
    p.add_argument(
        "--max-model-len", type=bounded_int(1, MAX_MODEL_LEN), default=None, metavar="N", help=text
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, backend, limits and the LServe knobs (shared by chat, generate and serve)."""
    p.add_argument(
        "--model",
        default=None,
        help="HF model directory or llama / qwen2 GGUF file (default: bundled SmolLM2-135M-Instruct, Q4_1 GGUF)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4"],
        help="quantize an HF model's projection matrices at load (round to nearest: int8 per output "
        "channel, int4 in groups of 128); on a GGUF, only its float (F32/F16) matrices and those of types it reads "
        "as floats (BF16, Q5_0, ...): packed ones stay as stored",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--tensor-parallel",
        type=bounded_int(1, 64),
        default=None,
        metavar="N",
        help="split the model over N GPUs, one worker process each (NCCL); 1 runs the worker path on one GPU",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=KV_DTYPES,
        help="KV-cache format: auto (fp16; fp32 on a CPU without F16C), fp16, fp32, int8 (scale per token and head), "
        "int4 (scale and min per 16 channels), fp8 (e4m3; CPU, CUDA sm_89+)",
    )
    add_max_model_len(p, "context limit in tokens (prompt + output)")
    p.add_argument(
        "--max-num-seqs",
        type=bounded_int(1, MAX_NUM_SEQS),
        default=64,
        help="sequences (a request's prompts x n) batched together at most",
    )
    p.add_argument(
        "--kv-pages",
        type=bounded_int(1, MAX_POOL_PAGES),
        default=None,
        help="KV pages in the pool (default: sized from memory)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sparse", dest="sparse", action="store_true", help="LServe sparse attention")
    g.add_argument("--dense", dest="sparse", action="store_false", help="dense attention (the default)")
    p.set_defaults(sparse=False)
    p.add_argument(
        "--pattern",
        type=existing_file,
        default=None,
        help="DuoAttention full_attention_heads.tsv for --sparse",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt instead of reusing cached KV pages of equal prefixes",
    )
    p.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        help="plan each decode step only after the previous one's tokens are back (the GPU's default overlaps them)",
    )
    for name, (typ, text) in _SPARSE_KNOBS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the parsed options describe (raises InvalidRequestError for bad combinations)."""
    knobs = {k: getattr(args, k) for k in _SPARSE_KNOBS if getattr(args, k, None) is not None}
    lserve_only = [k for k in knobs if k != "page_size"] + (["pattern"] if args.pattern else [])
    if lserve_only and not args.sparse:  # silently ignored, a user would believe LServe runs
        flag = "--" + lserve_only[0].replace("_", "-")
        raise InvalidRequestError(f"{flag} applies to LServe sparse attention only; add --sparse or drop it")
    sparse = SparseConfig(enabled=args.sparse, pattern_path=args.pattern)
    if args.sparse:  # dense mode: --page-size is the KV's alone, never checked against LServe's windows
        sparse = sparse.with_knobs(knobs)
    return EngineConfig(
        quantize=args.quantize,
        kv_dtype=getattr(args, "kv_dtype", "auto"),
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        num_kv_pages=args.kv_pages,
        page_size=knobs.get("page_size", sparse.page_size),
        sparse=sparse,
        prefix_caching=getattr(args, "prefix_caching", True),
        async_scheduling=getattr(args, "async_scheduling", True),
        tensor_parallel=args.tensor_parallel,
    )
