"""`lserve-lite kernels test`: every GPU kernel against its CPU reference on fresh random inputs.

One module per kernel family, named after kernels/<family>.cu and backends/reference/<family>.py:
layers (layers.cu, and the GEMMs), quant (quant_gemv.cu: quantized weights, against float64), attention
(attention_prefill.cu + attention_decode.cu), page_select, sampling, kv_quant (the quantized KV cache in those
kernels, per KV dtype), spread (spread_norm.cuh: the residual add + RMSNorm spread over two split GEMVs). Each case draws new random inputs (never zeros; from the seed and its name, so `CASE
--seed N` draws again what CASE drew in the run that printed N), poisons the outputs (NaN, or -1 for token ids)
before the launch, runs the kernel through its launcher and compares with the float32 reference evaluated on the
same float16-rounded inputs. One row per kernel and shape: max abs error, rel = max abs error / max |ref|,
PASS/FAIL (a NaN left in an output fails); each case's rows are printed under a `-- CASE` line as it ends. Exit
status 1 on any failure; 2 with a note when no GPU is visible (nothing was tested). `--json FILE`: one object, the
seed, the cases asked for, the counts, the rows (each with its case), and `not_run`: each case asked for that has
not run, with why ({} when every case ran). It is rewritten (atomically, at most about once a second) as cases
end, and at the end, on Ctrl-C, SIGTERM or an error, so a run cut short leaves what ran (a case's rows come when
it ends). Rows this GPU does not run (wgmma prefill below compute capability 9.x, fp8 KV below 8.9) are listed as
SKIP with the reason, counted apart.

LServe's named setups (attention.SPARSE_PREFILL / SPARSE_DECODE, layers.ROPE_SPARSE) run one at a time
through the `*_one(ctx, name)` functions; the same cases back `pytest -m gpu` (tests/test_gpu_ops.py,
tests/test_gpu_sparse.py).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..backends import cuda_available
from ..config import Throttled, write_text_atomic, written_in_place
from ..engine_args import bounded_int, distinct, json_file
from .attention import case_attention, case_prefill_kernels, case_sparse_attention
from .common import TABLE_HEADER, Ctx, Result, counts, table_row, table_summary
from .common import format_table as format_table  # the GPU tests print their rows with it
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
from .spread import case_spread_norm

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
    "spread_norm": case_spread_norm,
    "sampling": case_sampling,
    "attention": case_attention,
    "sparse_attention": case_sparse_attention,
    "prefill_kernels": case_prefill_kernels,
    "page_select": case_page_select,
    "rope_write_kv_sparse": case_rope_write_kv_sparse,
    "kv_quant": case_kv_quant,
}


def run_cases(names: list[str] | None, seed: int) -> Iterator[tuple[str, list[Result]]]:
    """Run the named cases (all when None; none when an empty list: a filter that matched nothing), each on inputs
    drawn from `seed` and its name (the same alone as in a whole run), yielding each case's name and rows as it
    ends; a case that raises is one failed row. A context that cannot be made (CuPy sees the GPU but the ops do not
    start: the kernels' compiler, an unsupported device) raises NoContext, whose row says why: no case can run."""
    try:
        c = Ctx(seed)
    except Exception as e:
        raise NoContext(_crashed("CudaOps", e)) from e
    for name in CASES if names is None else names:
        c.seed_case(seed, name)
        try:
            rows = CASES[name](c)
        except Exception as e:  # a crash is a failure of that kernel, not of the harness
            rows = [_crashed(name, e)]
        yield name, rows


class NoContext(Exception):
    """The CUDA ops did not start; args[0] is the failed row that says why."""


def _crashed(what: str, e: Exception) -> Result:
    """The failed row of a step that raised `e`, its note one line (a compiler's log spans many)."""
    return Result(what, "-", math.inf, math.inf, False, " ".join(f"{type(e).__name__}: {e}".split())[:200])


def _json_row(r: Result) -> dict:
    """A row as strict JSON: the infinite error of a case that crashed is null (json writes `Infinity`, which
    JSON parsers other than Python's refuse)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}


def _stopped(e: BaseException) -> str:
    """Why the cases after a run's end did not run, in one line."""
    if isinstance(e, KeyboardInterrupt):
        what = "Ctrl-C"
    elif isinstance(e, SystemExit):  # the CLI's SIGTERM handler raises SystemExit(128 + SIGTERM)
        what = "SIGTERM" if e.code == 128 + signal.SIGTERM else f"exit status {e.code}"
    else:
        what = f"{type(e).__name__}: {e}"
    return " ".join(f"the run stopped before it ({what})".split())[:200]


NOT_REACHED = "not reached when this file was written (the run was going on, or was killed)"


@dataclass
class Run:
    """A run as `--json` reports it, rewritten as its cases end: the seed (what draws the inputs again), the cases
    asked for, the counts (a skipped row: not run on this device, its note says why), the rows so far, and
    `not_run`: each case asked for that has not run, with why (a script reading the file must not take no rows, or
    the rows of a run cut short, for a pass)."""

    seed: int | None
    cases: list[str]
    rows: list[Result] = field(default_factory=list)
    # each row's case: what `CASE --seed N` runs again
    case_of: list[str | None] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    stopped: str = NOT_REACHED  # why the cases not done did not run

    def add(self, case: str | None, rows: list[Result]) -> None:
        """A case's rows (None: the context's, no case's)."""
        self.rows.extend(rows)
        self.case_of.extend([case] * len(rows))
        if case is not None:
            self.done.add(case)

    def not_run(self) -> dict[str, str]:
        return {n: self.stopped for n in self.cases if n not in self.done}

    def json_text(self) -> str:
        passed, failed, skips = counts(self.rows)
        report = {
            "seed": self.seed,
            "cases": self.cases,
            "passed": passed,
            "failed": failed,
            "skipped": skips,
            "not_run": self.not_run(),
            "rows": [{"case": c, **_json_row(r)} for c, r in zip(self.case_of, self.rows, strict=True)],
        }
        return json.dumps(report, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lserve-lite kernels test", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--seed", type=bounded_int(0), default=None, help="random seed (default: fresh each run)")
    ap.add_argument(
        "--json",
        type=json_file,
        default=None,
        help="also write the run to this file as JSON (seed, cases, counts, rows, not_run), rewritten as cases end",
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
    path = Path(args.json) if args.json else None

    def write(run: Run) -> None:
        if path is not None:
            write_text_atomic(path, run.json_text())

    if (
        not cuda_available()
    ):  # exit 2, not 0: a script that asked for the harness must not read this as passing
        why = "no NVIDIA GPU visible to CuPy"
        print(f"kernels test: {why}; nothing was tested (the CPU backend needs none).")
        print(
            "Without a GPU, a source checkout's tools/*_host_check.py run some kernels compiled as host code (with"
            " nvcc): the GEMVs and their fused epilogues, the K/V writes into quantized caches, page_select, sampling."
        )
        write(Run(None, cases, stopped=why))
        return 2
    seed = int(time.time_ns() % (1 << 31)) if args.seed is None else args.seed
    print(f"kernels test: random inputs from seed {seed} (--seed {seed} draws them again)", flush=True)
    run = Run(seed, cases)
    writer = Throttled(lambda: write(run))
    # a device, FIFO or descriptor (`--json /dev/stdout`) is appended to: once, at the end, so it holds one object
    rewrite = path is not None and not written_in_place(path)
    print(TABLE_HEADER, flush=True)
    try:
        for name, rows in run_cases(cases, seed):
            run.add(name, rows)
            print(f"-- {name}" + "".join(f"\n{table_row(r)}" for r in rows), flush=True)
            if rewrite:
                writer.soon()
    except NoContext as e:
        run.add(None, [e.args[0]])
        run.stopped = "the CUDA ops did not start (the failed row CudaOps says why)"
        print(table_row(e.args[0]))
    except BaseException as e:  # Ctrl-C, SIGTERM, an error of the harness itself
        run.stopped = _stopped(e)
        raise
    finally:  # every row so far is in the file, and the cases not run with why
        left = run.not_run()
        try:
            print(table_summary(run.rows) + (f"; not run: {', '.join(left)} ({run.stopped})" if left else ""))
        finally:  # after the table: `--json /dev/stdout` ends the output
            writer.now()
    return 0 if all(r.ok for r in run.rows) else 1
