"""Selector diagnostics: attention mass kept by LServe's page selector vs the oracle top pages, per context
length, token budget and sub_pages, and for candidate scoring variants (lserve_lite/evaluation/selector_recall.py).

Usage: python tools/eval_selector.py [--lengths 2048,4096,8192] [--steps 32] [--out tools/results/selector_recall]
Writes <out>.json and prints markdown tables (docs/ACCURACY.md has the runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

from lserve_lite.config import MAX_MODEL_LEN
from lserve_lite.engine_args import add_max_model_len, bounded_int, int_list, name_list
from lserve_lite.errors import exit_status
from lserve_lite.evaluation.eval_args import CONTEXT_HELP, output_stem, stem_file
from lserve_lite.evaluation.selector_recall import VARIANTS, measure, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    ap.add_argument(
        "--lengths",
        type=int_list(2, MAX_MODEL_LEN),
        default=(2048, 4096, 8192),
        help="context lengths, each over --steps, one over a budget (2048,4096,8192)",
    )
    ap.add_argument(
        "--steps", type=bounded_int(1), default=16, help="decode steps measured per length and text (16)"
    )
    ap.add_argument(
        "--offsets", type=int_list(0, MAX_MODEL_LEN), default=(0,), help="texts: corpus token offsets (0)"
    )
    ap.add_argument(
        "--budgets",
        type=int_list(1, MAX_MODEL_LEN),
        default=(512, 1024, 2048, 4096),
        help="token budgets, page multiples",
    )
    ap.add_argument(
        "--sub-pages", type=int_list(1, 64), default=(1, 2, 4, 8), help="sub_pages settings (1,2,4,8)"
    )
    ap.add_argument("--variants", type=name_list, default=",".join(VARIANTS), help="scoring variants (all)")
    add_max_model_len(ap, CONTEXT_HELP)
    ap.add_argument(
        "--out", type=output_stem, default="tools/results/selector_recall", help="output stem: <out>.json"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = measure(args.model, args.lengths, args.steps, args.budgets, args.sub_pages, tuple(args.variants),
                  args.offsets, max_model_len=args.max_model_len,
                  log=lambda s: print(s, file=sys.stderr, flush=True))  # fmt: skip
    res.update(date=date.today().isoformat(), seconds=round(time.perf_counter() - t0, 1),
               command="python tools/eval_selector.py " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip
    out = stem_file(args.out, ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for v in args.variants:
        print(f"\n{v}: recall of dense heads (selected / oracle attention mass)\n" + table(res, v))
    print(f"wrote {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
