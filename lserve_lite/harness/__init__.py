"""`lserve-lite kernels test`: every GPU kernel against its CPU reference on fresh random inputs.

One module per kernel family, named after kernels/<family>.cu and backends/reference/<family>.py:
layers (layers.cu, and the GEMMs), quant (quant_gemv.cu: quantized weights, against float64), attention
(attention_prefill.cu + attention_decode.cu), page_select, sampling, kv_quant (the quantized KV cache in those
kernels, per KV dtype). Each case draws new random inputs (never zeros), poisons the outputs (NaN, or -1 for
token ids) before the launch, runs the kernel through its launcher and compares with the float32 reference
evaluated on the same float16-rounded inputs. One row per kernel and shape: max abs error, rel = max abs error /
max |ref|, PASS/FAIL (a NaN left in an output fails). Exit status 1 on any failure; 2 with a note when no
GPU is visible (nothing was tested). `--json FILE`: one object, the seed, the cases asked for, the counts, the rows
(`not_run`: why nothing was tested). Rows this GPU does not run (wgmma prefill below compute capability 9.x, fp8
KV below 8.9) are listed as SKIP with the reason, counted apart.

LServe's named setups (attention.SPARSE_PREFILL / SPARSE_DECODE, layers.ROPE_SPARSE) run one at a time
through the `*_one(ctx, name)` functions; the same cases back `pytest -m gpu` (tests/test_gpu_ops.py,
tests/test_gpu_sparse.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict

from ..backends import cuda_available
from ..engine_args import bounded_int, distinct, json_file
from .attention import case_attention, case_prefill_kernels, case_sparse_attention
from .common import Ctx, Result, counts, format_table
from .kv_quant import case_kv_quant
from .layers import (
    case_add_rmsnorm,
    case_clear_pages,
    case_embed,
    case_gate_up_silu,
    case_linear,
    case_logits,
    case_qkv_rope,
    case_rmsnorm_linear,
    case_rope_write_kv,
    case_rope_write_kv_sparse,
    case_silu_mul,
)
from .page_select import case_page_select
from .quant import (
    case_quant_embed,
    case_quant_gate_up_silu,
    case_quant_gemv,
    case_quant_prefill,
    case_quant_rowstack,
    case_quant_split_rowstack,
)
from .sampling import case_sampling

CASES: dict[str, Callable[[Ctx], list[Result]]] = {
    "embed": case_embed,
    "add_rmsnorm": case_add_rmsnorm,
    "rope_write_kv": case_rope_write_kv,
    "clear_pages": case_clear_pages,
    "silu_mul": case_silu_mul,
    "gate_up_silu": case_gate_up_silu,
    "rmsnorm_linear": case_rmsnorm_linear,
    "qkv_rope": case_qkv_rope,
    "linear": case_linear,
    "logits": case_logits,
    "quant_gemv": case_quant_gemv,
    "quant_prefill": case_quant_prefill,
    "quant_rowstack": case_quant_rowstack,
    "quant_split_rowstack": case_quant_split_rowstack,
    "quant_embed": case_quant_embed,
    "quant_gate_up_silu": case_quant_gate_up_silu,
    "sampling": case_sampling,
    "attention": case_attention,
    "sparse_attention": case_sparse_attention,
    "prefill_kernels": case_prefill_kernels,
    "page_select": case_page_select,
    "rope_write_kv_sparse": case_rope_write_kv_sparse,
    "kv_quant": case_kv_quant,
}


def run_cases(names, seed: int) -> list[Result]:
    """Run the named cases (all when None; none when an empty list: a filter that matched nothing) on inputs drawn
    from `seed`; a case that raises becomes one failed row, and so does a context that cannot be made (CuPy sees
    the GPU but the ops do not start: the kernels' compiler, an unsupported device)."""
    try:
        c = Ctx(seed)
    except Exception as e:
        return [_crashed("CudaOps", e)]
    results = []
    for name in CASES if names is None else names:
        try:
            results.extend(CASES[name](c))
        except Exception as e:  # a crash is a failure of that kernel, not of the harness
            results.append(_crashed(name, e))
    return results


def _crashed(what: str, e: Exception) -> Result:
    """The failed row of a step that raised `e`."""
    return Result(what, "-", math.inf, math.inf, False, f"{type(e).__name__}: {e}"[:200])


def _json_row(r: Result) -> dict:
    """A row as strict JSON: the infinite error of a case that crashed is null (json writes `Infinity`, which
    JSON parsers other than Python's refuse)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}


def write_json(
    path: str, seed: int | None, cases: list[str], results: list[Result], not_run: str = ""
) -> None:
    """The run as one JSON object: its seed (what draws the inputs again), the cases it ran, the counts (a skipped
    row: not run on this device, its note says why), the rows; `not_run`: why nothing was tested (a script reading
    the file must not take no rows for a pass)."""
    passed, failed, skips = counts(results)
    report = {
        "seed": seed,
        "cases": cases,
        "passed": passed,
        "failed": failed,
        "skipped": skips,
        "not_run": not_run or None,
        "rows": [_json_row(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lserve-lite kernels test", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--seed", type=bounded_int(0), default=None, help="random seed (default: fresh each run)")
    ap.add_argument(
        "--json",
        type=json_file,
        default=None,
        help="also write the seed, the counts and the rows to this file",
    )
    argv = list(argv or [])
    if argv[:1] == ["test"]:  # `lserve-lite kernels test [cases]`
        argv = argv[1:]
    args = ap.parse_args(argv)
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    try:  # a case named twice ran twice, its rows counted twice
        distinct(args.cases)
    except argparse.ArgumentTypeError as e:
        ap.error(f"case {e}")
    cases = args.cases or list(CASES)
    if (
        not cuda_available()
    ):  # exit 2, not 0: a script that asked for the harness must not read this as passing
        why = "no NVIDIA GPU visible to CuPy; nothing was tested"
        print(f"kernels test: {why} (the CPU backend needs none).")
        if args.json:
            write_json(args.json, None, cases, [], why)
        return 2
    seed = int(time.time_ns() % (1 << 31)) if args.seed is None else args.seed
    print(f"kernels test: random inputs from seed {seed} (--seed {seed} draws them again)", flush=True)
    results = run_cases(cases, seed)
    print(format_table(results))
    if args.json:
        write_json(args.json, seed, cases, results)
    return 0 if all(r.ok for r in results) else 1
