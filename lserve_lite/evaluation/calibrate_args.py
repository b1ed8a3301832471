"""Options of `lserve-lite calibrate`, apart from the calibrator so the CLI builds its parser without
loading the engine."""

from __future__ import annotations

import argparse

from ..config import MAX_MODEL_LEN, SparseConfig
from ..engine_args import add_max_model_len, bounded_int, int_list, output_file
from .eval_args import CONTEXT_HELP, MAX_SAMPLES

# Bounds of calibrate()'s settings, the command line's and the Python API's: (lowest, highest).
BOUNDS = {
    "num_samples": (1, MAX_SAMPLES),
    "lengths": (64, MAX_MODEL_LEN),  # each sample length
    "sink": (0, MAX_MODEL_LEN),
    "local": (1, MAX_MODEL_LEN),
    "tail": (2, 4096),
    "seed": (0, 1 << 31),
}


def add_calibrate_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lserve-lite calibrate`."""
    parser.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    parser.add_argument(
        "--out",
        required=True,
        type=output_file,
        help="output pattern TSV (a .json with details goes beside it)",
    )
    parser.add_argument("--samples", type=bounded_int(*BOUNDS["num_samples"]), default=8,
                        help="number of synthetic passkey samples (8)")  # fmt: skip
    parser.add_argument("--lengths", type=int_list(*BOUNDS["lengths"]), default=None,
                        help="comma-separated sample lengths in tokens (default: 1/4, 3/8, 1/2 of the "
                             "context, --max-model-len's where given, at most 4096)")  # fmt: skip
    parser.add_argument("--sink", type=bounded_int(*BOUNDS["sink"]), default=SparseConfig.decode_sink,
                        help="streaming sink tokens")  # fmt: skip
    parser.add_argument("--local", type=bounded_int(*BOUNDS["local"]), default=SparseConfig.decode_local,
                        help="streaming local tokens")  # fmt: skip
    parser.add_argument(
        "--tail", type=bounded_int(*BOUNDS["tail"]), default=24, help="prompt tokens re-run per head (24)"
    )
    parser.add_argument("--seed", type=bounded_int(*BOUNDS["seed"]), default=0)
    parser.add_argument("--backend", default="cpu", help="cpu (default) or cuda")
    add_max_model_len(parser, CONTEXT_HELP)
    parser.add_argument("--no-validate", action="store_true", help="skip the sparsity-0.5 sanity check")
