"""Per-token cost of constrained decoding (response_format): llguidance's bitmask for the next token, feeding
it the sampled token, and applying the mask to a logit row on the CPU (the GPU applies an uploaded mask in
one kernel, mask_logits). The matcher is driven along a valid JSON reply tokenized by the model's tokenizer.

    python tools/bench_structured.py [--model DIR|FILE.gguf] [--out tools/results/bench_structured.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lserve_lite.backends import require_gpu
from lserve_lite.engine_args import bounded_int, output_file
from lserve_lite.errors import exit_status

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "skills": {"type": "array", "items": {"enum": ["python", "rust", "sql", "cuda"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "skills", "address"],
    "additionalProperties": False,
}  # fmt: skip
REPLY = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "skills": ["python", "cuda"],
         "address": {"city": "London", "zip": "W1 2AB"}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=bounded_int(1, 10_000), default=20, help="grammars compiled and walked")
    ap.add_argument("--gpu", action="store_true", help="also time the GPU path: mask upload + mask_logits")
    ap.add_argument("--out", type=output_file, default="tools/results/bench_structured.json")
    args = ap.parse_args()
    if args.gpu:
        require_gpu("bench_structured.py --gpu")
    from lserve_lite.backends.reference.sampling import allowed_tokens
    from lserve_lite.config import path_name
    from lserve_lite.engine.structured import Grammars
    from lserve_lite.weights.loader import load_model, resolve_model_dir

    loaded = load_model(resolve_model_dir(args.model), None)
    cfg, tok = loaded.cfg, loaded.tokenizer
    grammars = Grammars(tok, cfg.vocab_size, list(cfg.eos_token_ids))
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    t0 = time.perf_counter()
    grammars.matcher(fmt)  # (matcher, first mask); builds llguidance's tokenizer once
    t_tok = time.perf_counter() - t0
    ids = tok.encode(json.dumps(REPLY, separators=(",", ":")), add_special_tokens=False)
    logits = np.random.default_rng(0).standard_normal(cfg.vocab_size).astype(np.float32)
    compile_s, mask_s, apply_s, masks, steps = [], [], [], [], 0
    for i in range(args.repeats):
        t0 = time.perf_counter()  # a schema of its own each time: Grammars keeps the ones built lately
        m, _ = grammars.matcher(
            {"type": "json_schema", "json_schema": {"schema": SCHEMA | {"title": f"r{i}"}}}
        )
        compile_s.append(time.perf_counter() - t0)
        for t in ids:
            t0 = time.perf_counter()
            mask = np.frombuffer(m.compute_bitmask(), np.int32)
            masks.append(mask)
            ok = m.consume_token(t)
            t1 = time.perf_counter()
            x = logits.copy()
            x[~allowed_tokens(mask, cfg.vocab_size)] = -np.inf
            t2 = time.perf_counter()
            assert ok, f"token {t} refused: {m.get_error()}"
            mask_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            steps += 1
    report = {
        "model": path_name(resolve_model_dir(args.model)), "vocab": cfg.vocab_size, "reply_tokens": len(ids),
        "tokens_timed": steps, "llguidance_tokenizer_build_ms": round(t_tok * 1e3, 1),
        "grammar_compile_ms_median": round(float(np.median(compile_s)) * 1e3, 2),
        "mask_and_consume_us_median": round(float(np.median(mask_s)) * 1e6, 1),
        "mask_and_consume_us_p99": round(float(np.percentile(mask_s, 99)) * 1e6, 1),
        "cpu_mask_apply_us_median": round(float(np.median(apply_s)) * 1e6, 1),
    }  # fmt: skip
    if args.gpu:
        report.update(gpu_mask_cost(masks, logits))
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def gpu_mask_cost(masks: list[np.ndarray], logits: np.ndarray) -> dict:
    """Per-token GPU cost of a grammar mask: the bitmask's upload plus `mask_logits` on one row (CUDA events,
    median over the reply's masks), checked against the CPU's masked row."""
    import cupy as cp

    from lserve_lite.backends.cuda_sampling import GpuSampler
    from lserve_lite.backends.reference.sampling import allowed_tokens

    sampler, rows = GpuSampler(), np.zeros(1, np.int32)
    d_logits = cp.asarray(logits[None])
    start, stop, times = cp.cuda.Event(), cp.cuda.Event(), []
    for i, mask in enumerate(masks * 3):
        x = d_logits.copy()
        start.record()
        sampler.mask_logits(x, rows, mask[None])
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
        if i < len(masks):
            want = np.where(allowed_tokens(mask, logits.size), logits, -np.inf)
            assert np.array_equal(x.get()[0], want), f"GPU mask {i} differs from the CPU's"
    return {
        "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "gpu_mask_upload_and_apply_us_median": round(float(np.median(times[len(masks) :])), 1),
    }


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
