"""Options of `lserve-lite eval` (and those the passkey / perplexity sweeps in tools/ share), apart from the suite
so the CLI builds its parser without loading the engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import KV_DTYPES, MAX_MODEL_LEN
from ..engine_args import (
    add_max_model_len,
    bounded_float,
    bounded_int,
    existing_file,
    int_list,
    name_list,
    output_file,
)

MAX_SAMPLES = 100_000  # prompts per (task, length) or passkey samples, at most
MAX_TIME_LIMIT = 1e7  # seconds (115 days); 0 is no limit
OUT_HELP = "output stem: <out>.json, and <out>.png where matplotlib is installed"
CONTEXT_HELP = (
    "context limit in tokens, as chat's: the lengths, with the tool's question or answer tokens, must fit it, past the "
    "model's trained context too (extrapolated); default: the trained context, or the one assumed where the model "
    "names none, which the lengths must fit"
)


def stem_file(out: str | Path, suffix: str) -> Path:
    """The file `<out><suffix>` of an output stem, the stem's own dots kept (`ppl_s0.5` gives `ppl_s0.5.json`:
    with_suffix wrote `ppl_s0.json`, another run's file); a stem ending in .json or .png names its files without it."""
    out = Path(out)
    return out.with_suffix(suffix) if out.suffix in (".json", ".png") else out.with_name(out.name + suffix)


def output_stem(text: str) -> str:
    """An argparse type: an output stem (`<out>.json`, `<out>.png` written after the run), refused now where one of
    those files could not be written (an IsADirectoryError after all the work)."""
    output_file(text)
    for suffix in (".json", ".png"):
        if stem_file(text, suffix).is_dir():
            raise argparse.ArgumentTypeError(f"{stem_file(text, suffix)}: a directory, not a file")
    return text


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `lserve-lite eval` (and tools/eval_ruler.py)."""
    p.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    p.add_argument(
        "--tasks", type=name_list, default="all", help="comma-separated tasks (default all; see ruler.TASKS)"
    )
    p.add_argument("--lengths", type=int_list(256, MAX_MODEL_LEN), default=[2048],
                   help="comma-separated context lengths in tokens (2048), each >= 256; a length too short for a "
                        "task is refused, naming it, before any prompt runs (SmolLM2's prompts of every task fit "
                        "512)")  # fmt: skip
    p.add_argument(
        "--samples", type=bounded_int(1, MAX_SAMPLES), default=4, help="prompts per (task, length) (4)"
    )
    p.add_argument("--configs", default="dense;lserve",
                   help="settings separated by ';': presets dense, lserve, lserve-b512, lserve-b1024, "
                        "lserve-b2048, or NAME:knob=v,... (SparseConfig knobs)")  # fmt: skip
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV-cache format for every setting of the run (docs/KV_QUANT.md)")  # fmt: skip
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize a float model's weights at load, for every setting of the run")  # fmt: skip
    p.add_argument("--filler", choices=("classic", "corpus"), default="classic", help="haystack text")
    p.add_argument("--shared-dense", action="store_true",
                   help="run dense as a full-window request on the LServe LLM (one prefill for all)")  # fmt: skip
    p.add_argument("--pattern", type=existing_file, default=None,
                   help="head pattern TSV (default: the model's bundled one)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="auto, cpu or cuda")
    add_max_model_len(p, CONTEXT_HELP)
    p.add_argument("--seed", type=bounded_int(0), default=0)
    p.add_argument(
        "--time-limit",
        type=bounded_float(0, MAX_TIME_LIMIT),
        default=0,
        help="start no new prompt after this many s (0: no limit; counted from the start, model loads included); "
        "settings needing their own LLM split the time left equally",
    )
    p.add_argument("--out", type=output_stem, default="tools/results/ruler", help=OUT_HELP)
    p.add_argument("--plot-only", metavar="JSON", help="redraw the heatmap of an earlier run and exit")


def add_sweep_args(p: argparse.ArgumentParser, out: str) -> None:
    """Options tools/eval_passkey.py and tools/eval_ppl.py share: the model, context lengths, configs, pattern,
    KV format, context limit and output stem (default `out`)."""
    p.add_argument("--model", default=None, help="model directory or GGUF (default: the bundled SmolLM2)")
    p.add_argument("--lengths", type=int_list(256, MAX_MODEL_LEN), default=[1024, 2048],
                   help="context lengths in tokens, each >= 256 (1024,2048)")  # fmt: skip
    p.add_argument("--configs", default="dense,lserve,lserve-b512",
                   help="configs: presets dense, lserve, lserve-b512, or NAME:knob=v,... separated by ';'")  # fmt: skip
    p.add_argument(
        "--pattern",
        type=existing_file,
        default=None,
        help="head pattern TSV (default: the model's bundled one)",
    )
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto", help="KV-cache format (docs/KV_QUANT.md)")
    add_max_model_len(p, CONTEXT_HELP)
    p.add_argument("--mode", choices=("engine",), default="engine", help="kept for old command lines")
    p.add_argument("--out", type=output_stem, default=out, help=OUT_HELP)
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of an earlier run's JSON and exit")
