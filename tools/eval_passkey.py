"""Passkey retrieval over a grid of context lengths and needle depths, dense vs LServe sparse configs.

The tool writes its own prompts (a 5-digit pass key hidden in the classic grass/sky/sun filler, the
question at the end), decodes greedily and counts a pass when the first number in the output is the key.

Sparse configs: `dense` (baseline), `lserve` (SparseConfig defaults) and `lserve-b512` (token budget 512),
or NAME:knob=value,... (e.g. `s75:static_sparsity=0.75,token_budget=1024`). Each group of configs that share
the KV layout (static sparsity, page size, sub-pages) runs on one `LLM(config=EngineConfig(sparse=...))`
through `SparseHarness`: the engine's own LServe mode (two pools, windows, page selector), with the other
knobs set per request. (Earlier versions also had an `emulate` mode with a second selector implementation;
the engine's gave the same perplexities to 5 digits, so only the engine's is kept.)

Writes <out>.json and <out>.png (heatmap, needs matplotlib). Default grid: a few minutes on 2 CPU cores.
Usage: python tools/eval_passkey.py [--lengths 1024,2048] [--depths 0.1,0.5,0.9] [--out tools/results/passkey]
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from lserve_lite.config import path_name
from lserve_lite.engine_args import bounded_int, float_list
from lserve_lite.errors import exit_status
from lserve_lite.evaluation.eval_args import MAX_SAMPLES, add_sweep_args
from lserve_lite.evaluation.plotting import finish_figure, load_result, pyplot, save_result
from lserve_lite.evaluation.settings import (
    Runner,
    config_dict,
    context_record,
    parse_configs,
    refuse_past_context,
)
from lserve_lite.evaluation.synthetic import ANSWER_ROOM, PasskeySample, passkey_sample


def passed(text: str, passkey: str) -> bool:
    """A pass: the first run of digits in the output is exactly the pass key (no extra digits)."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == passkey


def make_grid(tokenizer, lengths, depths, samples, seed) -> list[tuple[int, PasskeySample]]:
    rng = np.random.default_rng(seed)
    grid = []
    for n in lengths:
        for d in depths:
            for _ in range(samples):
                key = str(rng.integers(10000, 100000))
                grid.append((n, passkey_sample(tokenizer, n, d, key, "classic")))
    return grid


def heatmap(result: dict, path: Path) -> bool:
    """One panel per config: pass rate by (depth, length). False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    names, lengths, depths = list(result["configs"]), result["grid"]["lengths"], result["grid"]["depths"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    w = 1.2 + 1.0 * len(lengths)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, 0.5 + 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        m = np.zeros((len(depths), len(lengths)))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = [r["pass"][name] for r in result["results"] if r["length"] == n and r["depth"] == d]
                m[i, j] = np.mean(cell) if cell else np.nan
        ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{m[i, j]:.0%}" if np.isfinite(m[i, j]) else "-", ha="center", va="center")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_title(name, fontsize=10)
    for r in range(rows):
        axes[r][0].set_ylabel("needle depth")
    return finish_figure(plt, fig, path, f"passkey retrieval: {result['model']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(ap, "tools/results/passkey")
    ap.add_argument(
        "--depths", type=float_list(0, 1), default=[0.1, 0.5, 0.9], help="needle depths (0.1,0.5,0.9)"
    )
    ap.add_argument(
        "--samples", type=bounded_int(1, MAX_SAMPLES), default=1, help="prompts per (length, depth) cell (1)"
    )
    ap.add_argument("--seed", type=bounded_int(0), default=0)
    args = ap.parse_args(argv)
    if args.plot_only:
        res = load_result(args.plot_only, "eval_passkey")
        return 0 if heatmap(res, Path(args.plot_only).with_suffix(".png")) else 1
    lengths, depths = args.lengths, args.depths
    configs = parse_configs(args.configs)
    t0 = time.perf_counter()
    runner = Runner(args.model, configs, max(lengths) + 64, args.pattern, kv_dtype=args.kv_dtype,
                    max_model_len=args.max_model_len)  # fmt: skip
    refuse_past_context(
        runner.model_dir, max(lengths), f"--lengths {max(lengths)}", args.max_model_len, ANSWER_ROOM
    )
    grid = make_grid(runner.tokenizer, lengths, depths, args.samples, args.seed)
    outs: list[dict] = [{} for _ in grid]
    for h, names in runner.groups():
        for i, (_, smp) in enumerate(grid):
            ts = time.perf_counter()
            got = runner.greedy_all(h, names, smp.prompt_ids, len(smp.answer_ids) + 2)
            outs[i].update(got)
            marks = " ".join(
                f"{k}={'ok' if passed(runner.tokenizer.decode(v), smp.passkey) else 'FAIL'}"
                for k, v in got.items()
            )
            print(f"[{i + 1}/{len(grid)}] {smp.num_tokens} tokens, depth {smp.depth:.2f}: {marks} "
                  f"({time.perf_counter() - ts:.0f} s)", flush=True)  # fmt: skip
    rows = []
    for (n, smp), o in zip(grid, outs, strict=True):
        texts = {k: runner.tokenizer.decode(o[k]) for k in configs}
        rows.append({"length": n, "tokens": smp.num_tokens, "depth": smp.depth, "needle_pos": smp.needle_pos,
                     "passkey": smp.passkey, "output": texts,
                     "pass": {k: passed(t, smp.passkey) for k, t in texts.items()}})  # fmt: skip
    summary = {
        name: {str(n): float(np.mean([r["pass"][name] for r in rows if r["length"] == n])) for n in lengths}
        for name in configs
    }
    model_name = path_name(runner.model_dir)
    result = {
        "tool": "eval_passkey", "model": model_name, "kv_dtype": args.kv_dtype, "mode": args.mode,
        "pattern": args.pattern or "bundled", **context_record(runner.model_dir, args.max_model_len),
        "configs": {k: config_dict(v) for k, v in configs.items()},
        "grid": {"lengths": lengths, "depths": depths, "samples": args.samples, "seed": args.seed},
        "summary_pass_rate": summary, "results": rows,
        "seconds": round(time.perf_counter() - t0, 1), "machine": platform.machine(),
        "python": platform.python_version(),
    }  # fmt: skip
    wrote = save_result(args.out, result, heatmap)
    print("pass rate by context length:")
    for name, s in summary.items():
        print(f"  {name:>14}: " + "  ".join(f"{n}: {v:.0%}" for n, v in s.items()))
    print(wrote)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
