"""Teacher-forced perplexity of a long text, dense vs LServe sparse configs.

Text: `lserve_lite.evaluation.synthetic.corpus_text()`, the module docstrings of ~90 prose-rich standard-library
modules in a fixed order followed by Python's LICENSE.txt (about 25k SmolLM2 tokens; deterministic for a
given Python version, its SHA-256 is recorded). For each context length C the first C tokens are used:
the first C - N - 1 tokens are prefilled, the last N tokens are scored by N teacher-forced decode steps.
Sparsity acts where LServe applies it: streaming heads use the prefill window in prefill and the decode
window in decode; dense heads use page selection (token budget) in decode. So:
- `ppl_decode`: perplexity of the last N tokens, scored by decode steps (sparse decode vs dense decode);
- `ppl_prefill`: perplexity of the prefilled tokens (identical to dense whenever the prefill window
  covers the context, as LServe's default 8192-token window does for SmolLM2).
Configs and modes as in eval_passkey.py. Writes <out>.json and <out>.png.
Usage: python tools/eval_ppl.py [--lengths 1024,2048] [--decode-tokens 64] [--out tools/results/ppl]
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lserve_lite.config import path_name
from lserve_lite.engine_args import bounded_int
from lserve_lite.errors import InvalidRequestError, exit_status
from lserve_lite.evaluation.eval_args import add_sweep_args
from lserve_lite.evaluation.plotting import finish_figure, load_result, pyplot, save_result
from lserve_lite.evaluation.settings import (
    Runner,
    config_dict,
    context_record,
    parse_configs,
    refuse_past_context,
)
from lserve_lite.evaluation.synthetic import corpus_text


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return lse - x[np.arange(len(targets)), targets]


def prefill_nll(h, seq, n: int, chunk: int = 512) -> np.ndarray:
    """Prefill n tokens in chunks; NLL of tokens 1..n (row i predicts token i+1)."""
    ids = np.asarray(seq.all_ids)
    out, done = [], seq.num_cached
    while done < n:
        k = min(chunk, n - done)
        lg = h.forward(seq, k, logits="all")
        out.append(_nll(lg, ids[done + 1 : done + k + 1]))
        done += k
    return np.concatenate(out)


def eval_length(r: Runner, h, names: list[str], ids: list[int], n_dec: int, log) -> dict:
    """Prefill and decode perplexities of configs `names` for one context window, on harness h."""
    C = len(ids)
    P = C - n_dec - 1
    tgt = np.asarray(ids[P + 1 : P + n_dec + 1])
    seq = h.begin(ids, prompt_len=P)
    res: dict[str, dict] = {}
    key, pre = None, None
    try:
        for name in r.order(names, C):
            t = time.perf_counter()
            r.prepare(h, seq, name, "prefill")
            if r.prefill_key(name, C) != key or not h.can_rewind(seq, P):
                h.rewind(seq, 0)
                pre = prefill_nll(h, seq, P)
                key = r.prefill_key(name, C)
            h.rewind(seq, P)
            r.prepare(h, seq, name, "decode")
            dec = _nll(h.decode(seq, n_dec), tgt)
            res[name] = {"ppl_prefill": float(np.exp(pre.mean())), "ppl_decode": float(np.exp(dec.mean())),
                         "nll_decode": float(dec.mean()), "seconds": round(time.perf_counter() - t, 1),
                         "nll_decode_tokens": np.round(dec, 5).tolist()}  # per token: paired comparisons  # fmt: skip
            log(f"  {C} tokens, {name:>14}: ppl decode {res[name]['ppl_decode']:.3f}, "
                f"prefill {res[name]['ppl_prefill']:.3f} ({res[name]['seconds']:.0f} s)")  # fmt: skip
    finally:
        h.end(seq)
    return res


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    lengths = result["lengths"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, name in enumerate(result["configs"]):
        ys = [result["results"][str(n)][name]["ppl_decode"] for n in lengths]
        a1.plot(lengths, ys, marker="o", label=name, color=f"C{i}")
        if name != "dense":
            base = [result["results"][str(n)]["dense"]["ppl_decode"] for n in lengths]
            rel = [100 * (y / b - 1) for y, b in zip(ys, base, strict=True)]
            a2.plot(lengths, rel, marker="o", label=name, color=f"C{i}")
    a1.set_xlabel("context tokens")
    a1.set_ylabel(f"perplexity (last {result['decode_tokens']} tokens, decode)")
    a2.set_xlabel("context tokens")
    a2.set_ylabel("change vs dense (%)")
    a2.axhline(0, color="k", lw=0.5)
    a2.axhspan(-2, 2, color="g", alpha=0.1)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(lengths, [str(n) for n in lengths])
        a.legend(fontsize=8)
    return finish_figure(plt, fig, path, f"teacher-forced perplexity: {result['model']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(ap, "tools/results/ppl")
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None, help="quantize an HF model at load")
    ap.add_argument(
        "--decode-tokens", type=bounded_int(1), default=64, help="tokens scored by decode steps (64)"
    )
    args = ap.parse_args(argv)
    if args.plot_only:
        res = load_result(args.plot_only, "eval_ppl")
        return 0 if plot(res, Path(args.plot_only).with_suffix(".png")) else 1
    lengths = args.lengths
    if args.decode_tokens > min(lengths) - 2:  # at least one token is prefilled before the scored ones
        ap.error(f"--decode-tokens {args.decode_tokens} leaves nothing to prefill at length {min(lengths)}")
    configs = parse_configs(args.configs)
    t0 = time.perf_counter()
    r = Runner(args.model, configs, max(lengths) + 64, args.pattern, quantize=args.quantize, kv_dtype=args.kv_dtype,
               max_model_len=args.max_model_len)  # fmt: skip
    refuse_past_context(r.model_dir, max(lengths), f"--lengths {max(lengths)}", args.max_model_len)
    text = corpus_text()
    ids = r.tokenizer.encode(text)
    if len(ids) < max(lengths):
        raise InvalidRequestError(f"--lengths {max(lengths)}: the text has only {len(ids)} tokens")
    results: dict[str, dict] = {str(n): {} for n in lengths}
    for h, names in r.groups():
        for n in lengths:
            results[str(n)].update(
                eval_length(r, h, names, ids[:n], args.decode_tokens, lambda s: print(s, flush=True))
            )
    result = {
        "tool": "eval_ppl", "model": path_name(r.model_dir), "quantize": r.quantize, "kv_dtype": args.kv_dtype, "mode": args.mode,
        "pattern": args.pattern or "bundled", **context_record(r.model_dir, args.max_model_len),
        "text": {"source": "corpus_text(): stdlib module docstrings + LICENSE.txt", "tokens": len(ids),
                 "sha256": hashlib.sha256(text.encode()).hexdigest(), "python": platform.python_version()},
        "lengths": lengths, "decode_tokens": args.decode_tokens,
        "configs": {k: config_dict(v) for k, v in configs.items()},
        "results": results, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    wrote = save_result(args.out, result, plot)
    print("decode perplexity (change vs dense):")
    for n in lengths:
        d = results[str(n)]["dense"]["ppl_decode"]
        cells = [
            f"{k} {v['ppl_decode']:.3f} ({100 * (v['ppl_decode'] / d - 1):+.2f}%)"
            for k, v in results[str(n)].items()
        ]
        print(f"  {n}: " + ", ".join(cells))
    print(wrote)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
