"""Which KV quantizer keeps attention closest to exact? The relative L2 error of every layer's attention
output at real decode steps (the default SmolLM2 or --model, dense, CPU, float32 cache), under the engine's
formats (kv/quant.py) and candidate int4 layouts: asymmetric groups, and keys quantized per channel over a
run of tokens (KIVI's layout; 16 tokens = one logical page of the selector, 64 = one page). Evidence for
the int4 design (docs/KV_QUANT.md); it changes nothing in the engine.

`--ppl`: teacher-forced perplexity instead, the text run in chunks of 16 tokens (one logical page) with each
chunk's K/V replaced by its quantized-then-dequantized values once the chunk is computed: every scheme alike,
a chunk attends to its own 16 tokens exactly (as the per-channel layout's fp16 tail would) and to every
earlier one quantized.

    python tools/kv_quant_error.py [--model DIR|FILE.gguf] [--context 2048] [--steps 4] [--ppl] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lserve_lite.config import EngineConfig, path_name
from lserve_lite.engine_args import bounded_int, output_file
from lserve_lite.errors import InvalidRequestError, exit_status
from lserve_lite.evaluation.harness import SparseHarness
from lserve_lite.evaluation.selector_recall import decode_step_queries
from lserve_lite.evaluation.synthetic import corpus_text
from lserve_lite.geometry import pages_for
from lserve_lite.kv.quant import FORMATS, dequantize, quantize
from lserve_lite.llm import LLM
from lserve_lite.weights.loader import load_config, load_tokenizer, resolve_model_dir

Quantizer = Callable[[np.ndarray], np.ndarray]  # [T, D] float64 -> its dequantized values


def engine_format(name: str) -> Quantizer:
    """The engine's own format of the K and V pools (kv/quant.py: int8 / fp8 one scale per token, int4 a (scale,
    min) per 16 channels; without int4's and fp8's Hadamard basis for keys)."""
    fmt = FORMATS[name]
    return lambda x: dequantize(*quantize(x, fmt), fmt)


def int4_symmetric(x: np.ndarray) -> np.ndarray:
    """The engine's int4 before issue 11's fix: symmetric, a scale amax / 7 per 32 channels (the baseline row)."""
    xg = x.reshape(len(x), -1, 32)
    s = np.abs(xg).max(-1, keepdims=True) / 7
    return (np.rint(np.divide(xg, s, out=np.zeros_like(xg), where=s > 0)) * s).reshape(x.shape)


def int4_groups(x: np.ndarray) -> np.ndarray:
    """Asymmetric 4-bit over the last axis: 16 levels from the group's min to its max."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 15, 1.0)
    return np.rint((x - lo) / step) * step + lo


def int4_groups_clipped(x: np.ndarray, ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> np.ndarray:
    """int4_groups over [min * r, max * r] (values past it clipped), per group the ratio r with the least squared
    error: the range search weight quantizers use (the engine keeps min / max)."""
    best, err = None, None
    for r in ratios:
        lo, hi = x.min(-1, keepdims=True) * r, x.max(-1, keepdims=True) * r
        step = np.where(hi > lo, (hi - lo) / 15, 1.0)
        y = np.clip(np.rint((x - lo) / step), 0, 15) * step + lo
        e = ((y - x) ** 2).sum(-1, keepdims=True)
        best, err = (y, e) if best is None else (np.where(e < err, y, best), np.minimum(e, err))
    return best


def per_token(group: int, inner: Callable[[np.ndarray], np.ndarray] = int4_groups) -> Quantizer:
    """Asymmetric int4 (`inner`), `group` channels of one token per scale and zero point."""
    return lambda x: inner(x.reshape(len(x), -1, group)).reshape(x.shape)


def per_channel(tokens: int) -> Quantizer:
    """Asymmetric int4, one channel over `tokens` consecutive tokens per scale and zero point."""

    def q(x: np.ndarray) -> np.ndarray:
        t, d = x.shape
        xp = np.pad(x, ((0, -t % tokens), (0, 0)), mode="edge").reshape(-1, tokens, d)
        return int4_groups(xp.transpose(0, 2, 1)).transpose(0, 2, 1).reshape(-1, d)[:t]

    return q


def grouped(inner: Quantizer, group: int) -> Quantizer:
    """`inner` (a format with one scale per row) applied to each `group` channels of a token on their own."""
    return lambda x: inner(x.reshape(-1, group)).reshape(x.shape)


def centered(inner: Quantizer, prefix: int) -> Quantizer:
    """Keys minus one offset per channel before `inner` (added back after): the mean of the first `prefix` tokens'
    keys. A constant offset shifts every score of a query equally, so the engine could store keys minus a static
    offset and attend without adding it back; what it buys is a smaller range to quantize."""

    def q(x: np.ndarray) -> np.ndarray:
        mu = x[:prefix].mean(0, keepdims=True)
        return inner(x - mu) + mu

    return q


def schemes() -> dict[str, tuple[Quantizer, Quantizer]]:
    """name -> (key quantizer, value quantizer)."""
    exact: Quantizer = lambda x: x  # noqa: E731
    return {
        "int8 (engine)": (engine_format("int8"), engine_format("int8")),
        "int4 (engine: asymmetric, 16 channels)": (engine_format("int4"), engine_format("int4")),
        "int4 asymmetric, K 16 / V 32 channels (the engine's until 2026-12-05)": (
            per_token(16),
            per_token(32),
        ),
        "int4 keys only (engine)": (engine_format("int4"), exact),
        "int4 values only (engine)": (exact, engine_format("int4")),
        "int4 symmetric, 32 channels (the old engine format)": (int4_symmetric, int4_symmetric),
        "int4 asymmetric, 32 channels": (per_token(32), per_token(32)),
        "int4 asymmetric, K 8 / V 32 channels (K as many bytes as int8)": (per_token(8), per_token(32)),
        "int4 asymmetric K 16 / V 32, clipped range (least squares)": (
            per_token(16, int4_groups_clipped),
            per_token(32, int4_groups_clipped),
        ),
        "int4 K per channel / 64 tokens, V asym 32 ch": (per_channel(64), per_token(32)),
        "int4 K per channel / 16 tokens, V asym 32 ch": (per_channel(16), per_token(32)),
        "fp8 (engine)": (engine_format("fp8"), engine_format("fp8")),
        "fp8, a scale per 32 channels": (
            grouped(engine_format("fp8"), 32),
            grouped(engine_format("fp8"), 32),
        ),
        "fp8, K minus the channel means of its first 256 tokens": (
            centered(engine_format("fp8"), 256),
            engine_format("fp8"),
        ),
        "int4 (engine), K minus the channel means of its first 256 tokens": (
            centered(engine_format("int4"), 256),
            engine_format("int4"),
        ),
        "int8 (engine), K minus the channel means of its first 256 tokens": (
            centered(engine_format("int8"), 256),
            engine_format("int8"),
        ),
    }


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact softmax attention of q [Hkv, G, D] over k, v [Hkv, T, D], float64."""
    s = np.einsum("hgd,htd->hgt", q, k) / math.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hgt,htd->hgd", w / w.sum(-1, keepdims=True), v)


def measure(model: str | None, context: int, steps: int, page: int = 64) -> dict:
    llm = LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=pages_for(context, page) + 2,
                                                        max_model_len=context, page_size=page))  # fmt: skip
    h, cache = SparseHarness(llm), llm.engine.runner.cache
    seq = h.begin(llm.tokenizer.encode(corpus_text())[:context], prompt_len=context - steps)
    h.forward(seq, context - steps, logits="last")
    quantizers = schemes()
    errors: dict[str, list[float]] = {name: [] for name in quantizers}
    for _ in range(steps):
        qs = decode_step_queries(h, seq)
        ctx, table = seq.num_cached, np.asarray(seq.page_table[: pages_for(seq.num_cached, page)])
        for layer, q in enumerate(qs):
            k, v = (np.asarray(llm.engine.runner.ops.to_numpy(a[layer]))[table] for a in (cache.k, cache.v))
            hkv, d = k.shape[1], k.shape[3]
            k, v = (a.transpose(1, 0, 2, 3).reshape(hkv, -1, d)[:, :ctx].astype(np.float64) for a in (k, v))
            qg = q.reshape(hkv, -1, d).astype(np.float64)
            ref = attention(qg, k, v)
            for name, (fk, fv) in quantizers.items():
                out = attention(qg, np.stack([fk(x) for x in k]), np.stack([fv(x) for x in v]))
                errors[name].append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    h.end(seq)
    rows = {n: {"mean": float(np.mean(e)), "p90": float(np.percentile(e, 90)), "max": float(np.max(e))}
            for n, e in errors.items()}  # fmt: skip
    return {"model": path_name(llm.engine.model_dir), "context": context, "decode_steps": steps,
            "layers": llm.engine.cfg.num_layers, "relative_error": rows}  # fmt: skip


def perplexity(model: str | None, context: int, names: list[str], chunk: int = 16, page: int = 64) -> dict:
    """Teacher-forced perplexity of the text's first `context` tokens per scheme (see the module's `--ppl`)."""
    llm = LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=pages_for(context, page) + 2,
                                                        max_model_len=context, page_size=page))  # fmt: skip
    h, cache = SparseHarness(llm), llm.engine.runner.cache
    ids = llm.tokenizer.encode(corpus_text())[:context]
    out, quantizers = {}, schemes()
    for name in names:
        fk, fv = (lambda x: x, lambda x: x) if name == "exact" else quantizers[name]
        seq, nll = h.begin(ids), []
        for c in range(0, context, chunk):
            logits = h.forward(seq, min(chunk, context - c)).astype(np.float64)
            tgt = np.asarray(ids[c + 1 : c + 1 + len(logits)])
            lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
            nll += list(lse[: len(tgt)] - logits[np.arange(len(tgt)), tgt])
            page_id, at = seq.page_table[c // page], c % page
            for layer in range(len(cache.k)):
                for arr, f in ((cache.k[layer], fk), (cache.v[layer], fv)):
                    rows = arr[page_id, :, at : at + len(logits)].astype(np.float64)  # [Hkv, chunk, D]
                    arr[page_id, :, at : at + len(logits)] = np.stack([f(r) for r in rows])
        h.end(seq)
        out[name] = float(np.exp(np.mean(nll)))
        print(f"  {name:46s} perplexity {out[name]:.3f}", flush=True)
    return {"model": path_name(llm.engine.model_dir), "context": context, "chunk": chunk, "perplexity": out}


def check_inputs(model: str | None, context: int, steps: int, ppl: bool) -> None:
    """Refused before the LLM sizes a KV pool for `context` tokens: a context past the text's tokens (it ran on,
    sizing the pool by the number given), no prompt left before the decode steps, and a head size that the
    schemes' groups of 32 channels do not divide."""
    path = resolve_model_dir(model)
    if load_config(path).head_dim % 32:
        raise InvalidRequestError(
            f"{path}: head_dim {load_config(path).head_dim} is not a multiple of 32 channels"
        )
    have = len(load_tokenizer(path).encode(corpus_text()))
    if context > have:
        raise InvalidRequestError(
            f"--context {context}: the text has {have} tokens in this model's tokenizer"
        )
    if not ppl and steps >= context:
        raise InvalidRequestError(f"--steps {steps} leaves no prompt in --context {context}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=bounded_int(64), default=2048)
    ap.add_argument("--steps", type=bounded_int(1), default=4)
    ap.add_argument("--ppl", action="store_true", help="teacher-forced perplexity per scheme instead")
    ap.add_argument("--out", type=output_file, default=None, help="JSON results file")
    args = ap.parse_args()
    check_inputs(args.model, args.context, args.steps, args.ppl)
    if args.ppl:
        res = perplexity(args.model, args.context, ["exact", *schemes()])
        write(args.out, res)
        return
    res = measure(args.model, args.context, args.steps)
    print(f"context {res['context']}, {res['decode_steps']} decode steps x {res['layers']} layers: relative L2 "
          "error of the attention output (mean / p90 / max)")  # fmt: skip
    for name, r in res["relative_error"].items():
        print(f"  {name:46s} {r['mean']:.4f} / {r['p90']:.4f} / {r['max']:.4f}")
    write(args.out, res)


def write(out: str | None, res: dict) -> None:
    """The results as JSON at `out` (if given), its folders made as needed."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
