"""Passkey retrieval over a grid of context lengths and needle depths, dense vs LServe sparse configs.

The tool writes its own prompts (a 5-digit pass key hidden in the classic grass/sky/sun filler, the
question at the end), decodes greedily and counts a pass when the key appears in the output.

Sparse configs: `dense` (baseline), `lserve` (SparseConfig defaults) and `lserve-b512` (token budget 512),
or NAME:knob=value,... (e.g. `s75:static_sparsity=0.75,token_budget=1024`). Two ways to run them:
- `--mode emulate` (default, CPU): one LLM; the tool applies LServe itself through the model runner
  (`SparseHarness`): streaming heads from the head pattern with the prefill window in prefill and the decode
  window in decode, and decode-time page selection for dense heads with the CPU reference selector.
  The dense prefill is shared by every config whose prefill window covers the whole prompt (then the
  streaming prefill is identical to the dense one).
- `--mode engine`: one `LLM(config=EngineConfig(sparse=SparseConfig(enabled=True, ...)))` per config,
  trusting the engine to apply the config (once it does).

Writes <out>.json and <out>.png (heatmap, needs matplotlib). Default grid: a few minutes on 2 CPU cores.
Usage: python tools/eval_passkey.py [--lengths 1024,2048] [--depths 0.1,0.5,0.9] [--out tools/results/passkey]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lserve_lite import LLM, EngineConfig, SparseConfig
from lserve_lite.sparse.calibrate import PasskeySample, SparseHarness, passkey_sample
from lserve_lite.sparse.patterns import head_classes, resolve_pattern

PRESETS = {"dense": None, "lserve": {}, "lserve-b512": {"token_budget": 512}}


def parse_configs(spec: str) -> dict[str, SparseConfig | None]:
    """'dense,lserve,name:knob=v,...' -> name -> SparseConfig (None: dense). Knobs as in SparseConfig."""
    out: dict[str, SparseConfig | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(";" if ":" in spec else ","))):
        name, _, knobs = item.partition(":")
        if not knobs:
            if name not in PRESETS:
                raise SystemExit(f"unknown config {name!r} (presets: {', '.join(PRESETS)})")
            kw = PRESETS[name]
            out[name] = None if kw is None else SparseConfig(enabled=True).with_updates(**kw)
            continue
        kw = {}
        for kv in knobs.split(","):
            k, _, v = kv.partition("=")
            f = SparseConfig.__dataclass_fields__.get(k.strip())
            if f is None:
                raise SystemExit(f"unknown sparse knob {k!r}")
            kw[k.strip()] = float(v) if k.strip() == "static_sparsity" else int(v)
        out[name] = SparseConfig(enabled=True).with_updates(**kw)
    if "dense" not in out:
        out = {"dense": None, **out}
    return out


def config_dict(c: SparseConfig | None) -> dict | None:
    return None if c is None else {k: v for k, v in asdict(c).items() if k != "pattern_path"}


class Runner:
    """Runs one prompt under every config (emulate or engine mode); keeps the prefill when it can."""

    def __init__(self, model: str | None, configs: dict, mode: str, max_len: int, pattern: str | None):
        self.configs, self.mode = configs, mode
        pages = -(-(max_len + 64) // 64) + 2
        self.ecfg = dict(num_kv_pages=pages, max_model_len=max_len, max_num_batched_tokens=2048)
        self.model, self.pattern = model, pattern
        if mode == "emulate":
            self.llm = LLM(model, backend="cpu", config=EngineConfig(**self.ecfg))
            self.h = SparseHarness(self.llm)
            c = self.h.cfg
            self.gates = resolve_pattern(self.llm.engine.model_dir, c.num_layers, c.num_kv_heads, pattern)
            self.tokenizer = self.llm.tokenizer
        else:
            self.tokenizer = LLM(model, backend="cpu", config=EngineConfig(**self.ecfg)).tokenizer

    def classes(self, sc: SparseConfig) -> list[np.ndarray]:
        return head_classes(self.gates, sc.static_sparsity)

    def prefill_shared(self, sc: SparseConfig | None, n: int) -> bool:
        """Whether this config's prefill equals the dense one for an n-token prompt."""
        return sc is None or sc.static_sparsity == 0 or sc.prefill_local >= n

    def run_ids(self, ids: list[int], max_new: int) -> dict[str, list[int]]:
        """Greedy output token ids of every config for prompt `ids`."""
        if self.mode == "engine":
            return self._run_engine(ids, max_new)
        h, out = self.h, {}
        seq = h.begin(ids, reserve=max_new + 1)
        try:
            T = len(ids)
            order = sorted(self.configs, key=lambda k: not self.prefill_shared(self.configs[k], T))
            dense_first = None
            for name in order:
                sc = self.configs[name]
                if self.prefill_shared(sc, T):
                    if dense_first is None:
                        h.rewind(seq, 0)
                        h.disable_selection()
                        h.set_heads(h.dense_classes(), 0, 0)
                        dense_first = h.forward(seq, T, logits="last")[-1]
                    first = dense_first
                else:
                    h.rewind(seq, 0)
                    h.disable_selection()
                    h.set_heads(self.classes(sc), sc.prefill_sink, sc.prefill_local)
                    first = h.forward(seq, T, logits="last")[-1]
                    dense_first = None  # the cache no longer holds the dense prefill
                h.rewind(seq, T)
                if sc is None:
                    h.disable_selection()
                    h.set_heads(h.dense_classes(), 0, 0)
                else:
                    h.set_heads(self.classes(sc), sc.decode_sink, sc.decode_local)
                    h.enable_selection(sc.token_budget, sc.select_interval, sc.sub_pages)
                out[name] = h.greedy(seq, max_new, first)
        finally:
            h.end(seq)
        return out

    def _run_engine(self, ids: list[int], max_new: int) -> dict:
        from lserve_lite import SamplingParams

        out = {}
        for name, sc in self.configs.items():
            ecfg = EngineConfig(**self.ecfg, sparse=sc or SparseConfig(enabled=False))
            llm = LLM(self.model, backend="auto", config=ecfg)
            res = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True))
            out[name] = res[0].token_ids
            del llm
        return out


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return False
    names, lengths, depths = list(result["configs"]), result["grid"]["lengths"], result["grid"]["depths"]
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.2 + 1.1 * len(lengths) * len(names), 3.2), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
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
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"passkey retrieval: {result['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    ap.add_argument("--lengths", default="1024,2048", help="context lengths in tokens (1024,2048)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (0.1,0.5,0.9)")
    ap.add_argument("--samples", type=int, default=1, help="prompts per (length, depth) cell (1)")
    ap.add_argument("--configs", default="dense,lserve,lserve-b512",
                    help="configs: presets dense, lserve, lserve-b512, or NAME:knob=v,... separated by ';'")  # fmt: skip
    ap.add_argument("--pattern", default=None, help="head pattern TSV (default: the model's bundled one)")
    ap.add_argument("--mode", choices=("emulate", "engine"), default="emulate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tools/results/passkey", help="output stem: <out>.json, <out>.png")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    configs = parse_configs(args.configs)
    t0 = time.perf_counter()
    runner = Runner(args.model, configs, args.mode, max(lengths) + 64, args.pattern)
    grid = make_grid(runner.tokenizer, lengths, depths, args.samples, args.seed)
    rows = []
    for i, (n, smp) in enumerate(grid):
        ts = time.perf_counter()
        outs = runner.run_ids(smp.prompt_ids, len(smp.answer_ids) + 2)
        texts = {k: runner.tokenizer.decode(v) for k, v in outs.items()}
        passed = {k: smp.passkey in t for k, t in texts.items()}
        rows.append({"length": n, "tokens": smp.num_tokens, "depth": smp.depth, "needle_pos": smp.needle_pos,
                     "passkey": smp.passkey, "output": texts, "pass": passed})  # fmt: skip
        marks = " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in passed.items())
        print(f"[{i + 1}/{len(grid)}] {smp.num_tokens} tokens, depth {smp.depth:.2f}: {marks} "
              f"({time.perf_counter() - ts:.0f} s)", flush=True)  # fmt: skip
    summary = {
        name: {str(n): float(np.mean([r["pass"][name] for r in rows if r["length"] == n])) for n in lengths}
        for name in configs
    }
    model_name = (
        Path(runner.llm.engine.model_dir).name if args.mode == "emulate" else (args.model or "default")
    )
    result = {
        "tool": "eval_passkey", "model": model_name, "mode": args.mode,
        "pattern": args.pattern or "bundled",
        "configs": {k: config_dict(v) for k, v in configs.items()},
        "grid": {"lengths": lengths, "depths": depths, "samples": args.samples, "seed": args.seed},
        "summary_pass_rate": summary, "results": rows,
        "seconds": round(time.perf_counter() - t0, 1), "machine": platform.machine(),
        "python": platform.python_version(),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    png = heatmap(result, out.with_suffix(".png"))
    print("pass rate by context length:")
    for name, s in summary.items():
        print(f"  {name:>14}: " + "  ".join(f"{n}: {v:.0%}" for n, v in s.items()))
    print(f"wrote {out.with_suffix('.json')}" + (f" and {out.with_suffix('.png')}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
