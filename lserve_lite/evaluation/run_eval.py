"""`lserve-lite eval`: the RULER-style suite (evaluation/ruler.py) under a list of engine settings.

Every setting answers the same prompts (greedy, short answers); per (length, task, setting) the accuracy
with a 95% Wilson interval, and per (length, setting) the paired comparison with dense (exact McNemar
test on the discordant prompts). Writes <out>.json as prompts are answered (at most about once a second, and at
the end, on Ctrl-C or an error: `Throttled`) and, where matplotlib is installed, <out>.png (heatmap) at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import Throttled, path_name, write_text_atomic
from ..errors import InvalidRequestError
from . import ruler
from .eval_args import stem_file
from .plotting import finish_figure, load_result, pyplot
from .settings import Runner, config_dict, context_record, parse_configs, refuse_past_context

Z95 = 1.959963984540054
TOOL = "lserve-lite eval"  # the "tool" of its JSON, which --plot-only checks


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (valid at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Per length: per task and overall accuracy with Wilson CIs, and the paired comparison with dense, each
    over the prompts that setting (and dense) answered: a time-limited run may leave a setting fewer."""
    out: dict = {}
    for n in sorted({r["length"] for r in rows}):
        at = [r for r in rows if r["length"] == n]
        cell: dict = {}
        for task in [*dict.fromkeys(r["task"] for r in at), "all"]:
            cell[task] = {}
            for s in names:
                sub = [r for r in at if task in ("all", r["task"]) and s in r["correct"]]
                if sub:
                    cell[task][s] = _accuracy(sub, s)
        paired = {}
        for s in names:
            both = [r for r in at if s != "dense" and {s, "dense"} <= r["correct"].keys()]
            if both:
                b = sum(r["correct"]["dense"] and not r["correct"][s] for r in both)
                c = sum(r["correct"][s] and not r["correct"]["dense"] for r in both)
                paired[s] = {"n": len(both), "dense_only": b, "setting_only": c, "diff": (c - b) / len(both),
                             "mcnemar_p": mcnemar(b, c)}  # fmt: skip
        out[str(n)] = {"tasks": cell, "vs_dense": paired}
    return out


def _accuracy(rows: list[dict], s: str) -> dict:
    """Setting s on `rows`: prompts, correct ones, accuracy with its 95% Wilson interval, mean score."""
    k = sum(r["correct"][s] for r in rows)
    lo, hi = wilson(k, len(rows))
    return {"n": len(rows), "correct": k, "acc": k / len(rows), "ci95": [lo, hi],
            "mean_score": float(np.mean([r["score"][s] for r in rows]))}  # fmt: skip


def heatmap(result: dict, path: Path) -> bool:
    """One panel per length: accuracy per (setting, task). False (and a note) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    summ, names = result["summary"], list(result["configs"])
    lengths = list(summ)
    tasks = [t for t in result["tasks"] if any(t in summ[n]["tasks"] for n in lengths)] + ["all"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.2 + 0.75 * len(tasks) * len(lengths),
                                                        1.4 + 0.45 * len(names)), squeeze=False)  # fmt: skip
    for ax, n in zip(axes[0], lengths):
        m = np.array([[summ[n]["tasks"].get(t, {}).get(s, {}).get("acc", np.nan) for t in tasks]
                      for s in names])  # fmt: skip
        ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(names)):
            for j in range(len(tasks)):
                ax.text(j, i, "-" if np.isnan(m[i, j]) else f"{m[i, j]:.0%}", ha="center", va="center",
                        fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        most = max(v["n"] for v in summ[n]["tasks"]["all"].values())
        ax.set_title(f"{n} tokens (n={most})", fontsize=9)
    return finish_figure(plt, fig, path, f"RULER-style suite, accuracy: {result['model']}")


def evaluate(args: argparse.Namespace, log=print, clock=time.perf_counter) -> dict:
    """Run the suite as `args` (see eval_args.add_eval_args) describe; returns the result dict. `clock` is
    what --time-limit counts on (a test passes a fake one)."""
    tasks = list(ruler.TASKS) if args.tasks == ["all"] else args.tasks
    lengths = args.lengths
    configs = parse_configs(args.configs)
    t0 = clock()
    r = Runner(args.model, configs, max(lengths) + 128, args.pattern, args.shared_dense, args.backend,
               quantize=args.quantize, kv_dtype=args.kv_dtype, max_model_len=args.max_model_len)  # fmt: skip
    refuse_past_context(r.model_dir, max(lengths) + 128, f"--lengths {max(lengths)} + 128 tokens of question",
                        args.max_model_len)  # fmt: skip
    tok = r.tokenizer

    def prompts() -> Iterator[tuple[int, ruler.Sample]]:
        """The suite's prompts, each built when its turn comes (a run holds one at a time, never a task's all),
        sample i of every (length, task) before sample i + 1: a time-limited run stays balanced."""
        built = [
            (n, ruler.samples(t, tok, n, args.samples, args.seed, args.filler))
            for n in lengths
            for t in tasks
        ]
        return ((n, next(one)) for _ in range(args.samples) for n, one in built)

    for _ in itertools.islice(prompts(), len(lengths) * len(tasks)):
        pass  # a length too short for a task is refused before any prompt runs
    total = args.samples * len(lengths) * len(tasks)
    answered: list[Answered | None] = [None] * total
    outs: list[dict] = [{} for _ in range(total)]
    out = Path(args.out)
    stem_file(out, ".json").parent.mkdir(parents=True, exist_ok=True)
    result = {"tool": TOOL, "model": path_name(r.model_dir), "date": date.today().isoformat(),
              "configs": {k: config_dict(v) for k, v in configs.items()}, "shared_dense": args.shared_dense,
              "quantize": r.quantize, "kv_dtype": args.kv_dtype,
              "tasks": tasks, "lengths": lengths, "samples_per_task": args.samples, "seed": args.seed,
              "filler": args.filler, "pattern": args.pattern or "bundled", "machine": platform.machine(),
              **context_record(r.model_dir, args.max_model_len)}  # fmt: skip
    names = list(configs)

    def elapsed() -> float:
        return clock() - t0

    writer = Throttled(lambda: _write(result, answered, outs, names, out, elapsed()))
    left = len(r.group_names())
    try:
        for h, group in r.groups():
            end = group_deadline(args.time_limit, elapsed(), left)
            left -= 1
            _run_group(r, h, group, prompts(), answered, outs, (elapsed, end), log, writer.soon)
    finally:  # after Ctrl-C or an error too every prompt answered so far is in the file; none: no file replaced
        rows = writer.now() if any(outs) else []
    if not rows:  # e.g. a time limit spent on loading: say so instead of an empty table and plot
        raise InvalidRequestError(f"no prompt finished (time limit {args.time_limit} s, model load included)")
    result["png"] = heatmap(result, stem_file(out, ".png"))
    log(report(result))
    return {**result, "rows": rows}


def group_deadline(limit: float, elapsed: float, groups_left: int) -> float:
    """When (s from the start) a group of settings stops starting prompts: an equal share of the time left.

    Interleaving the groups per prompt would need every group's LLM at once; so each group, once its LLM is
    loaded, runs the prompts in their balanced order for its share, and what a fast one leaves goes to the
    groups after it. Every setting answers a prefix of the same prompts; no limit (0): never."""
    return elapsed + (limit - elapsed) / groups_left if limit else math.inf


class Answered(NamedTuple):
    """An answered prompt as the JSON reports it: its length and sample, the sample's token ids dropped."""

    length: int
    tokens: int
    sample: ruler.Sample


def _run_group(
    r: Runner, h, group: list[str], prompts, answered: list, outs: list[dict], until, log, write
) -> None:
    """Answer the prompts in order with the settings `group` of harness h, starting none once elapsed() > end
    (`until` = (elapsed, end)); record each prompt (`answered`) and its answers (`outs`); `write` after each (the JSON,
    throttled)."""
    tok, eos = r.tokenizer, set(h.cfg.eos_token_ids)
    elapsed, end = until
    for i, (n, smp) in enumerate(prompts):
        if elapsed() > end:
            log(f"time limit: {', '.join(group)} stopped after {i} of {len(outs)} prompts (its share used)")
            return
        ts = time.perf_counter()
        stop = eos | {t for s in smp.stop for t in tok.encode(s, False)[:1]}
        got = r.greedy_all(h, group, smp.prompt_ids, smp.max_new, tuple(stop))
        answered[i] = Answered(n, len(smp.prompt_ids), replace(smp, prompt_ids=[]))
        outs[i].update({k: tok.decode(v) for k, v in got.items()})
        marks = " ".join(f"{k}={'ok' if smp.correct(v) else 'x'}" for k, v in outs[i].items())
        log(f"[{i + 1}/{len(outs)}] {n} {smp.task}: {marks} ({time.perf_counter() - ts:.0f} s)")
        write()


def _write(result: dict, answered: list, outs, names: list[str], out: Path, seconds: float) -> list[dict]:
    """Rows of the prompts some setting has answered (only those settings in each), their summary and the
    prompts each setting finished, into <out>.json: answers only accumulate, so no write has fewer rows."""
    rows = [_row(a, o) for a, o in zip(answered, outs) if o]
    finished = {k: sum(k in o for o in outs) for k in names}
    result.update(summary=summarize(rows, names) if rows else {}, prompts=len(outs), finished=finished,
                  seconds=round(seconds, 1))  # fmt: skip
    text = json.dumps({**result, "results": rows}, indent=1, default=float) + "\n"
    write_text_atomic(stem_file(out, ".json"), text)  # Ctrl-C mid-write keeps the prompts answered before
    return rows


def _row(a: Answered, out: dict[str, str]) -> dict:
    """The JSON's row of an answered prompt: what it asked and each setting's answer, score and verdict."""
    s = a.sample
    return {"length": a.length, "task": s.task, "tokens": a.tokens, "expected": [str(e) for e in s.expected],
            "info": s.info, "output": out, "score": {k: s.score(v) for k, v in out.items()},
            "correct": {k: s.correct(v) for k, v in out.items()}}  # fmt: skip


def report(result: dict) -> str:
    """A plain-text table: overall accuracy [95% CI] per setting and length, and the paired test."""
    done = ", ".join(f"{s} {k}/{result['prompts']}" for s, k in result["finished"].items())
    lines = [f"prompts finished: {done}"]
    for n, cell in result["summary"].items():
        lines.append(f"{n} tokens:")
        for s, v in cell["tasks"]["all"].items():
            pr = cell["vs_dense"].get(s)
            tail = f"  vs dense {pr['diff']:+.1%} (-{pr['dense_only']}/+{pr['setting_only']}, McNemar p={pr['mcnemar_p']:.2f})" if pr else ""  # fmt: skip
            lines.append(f"  {s:>14}: {v['correct']}/{v['n']} = {v['acc']:.1%} [{v['ci95'][0]:.1%}, "
                         f"{v['ci95'][1]:.1%}]{tail}")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run `lserve-lite eval`; returns the exit status."""
    if args.plot_only:
        res = load_result(args.plot_only, TOOL)
        if not res.get("results"):
            raise InvalidRequestError(f"{args.plot_only}: no prompt finished in that run: nothing to plot")
        return 0 if heatmap(res, Path(args.plot_only).with_suffix(".png")) else 1
    evaluate(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0
