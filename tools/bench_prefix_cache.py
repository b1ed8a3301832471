"""Prefix-cache figures (docs/PREFIX_CACHE.md).

chat: the chat REPL's case on the CPU with the default SmolLM2. A conversation of about `--history` tokens
(system prompt and earlier exchanges, from a deterministic corpus), then a first turn (cold: the whole history
is prefilled) and a second turn (its prompt is the first turn's plus the reply and a new question, as the REPL
sends it). Time to first token of each, the second as a fraction of the first; the second turn again on an
engine without the cache, for reference. Each trial uses its own conversation (nothing shared across trials).

doc: `--requests` requests sharing a `--doc-tokens`-token document, each with its own question, with and
without the cache: wall time, prompt tokens computed and taken from the cache. Arrival "staggered": one
request first, then the rest at once (a document is uploaded, then questioned); "burst": all at once (the
others wait for the first to compute the document, then attach it). Meant for the GPU (32 requests, 32k tokens: a long-context model, `--model`); small sizes run on the
CPU as a check of the tool itself.

Usage:
  python tools/bench_prefix_cache.py chat [--model DIR] [--backend cpu] [--trials 3] [--history 2000]
  python tools/bench_prefix_cache.py doc --model DIR [--backend cuda] [--requests 32] [--doc-tokens 32768]
        [--arrival staggered|burst] [--sparse] [--control]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig
from lserve_lite.backends import cuda_available
from lserve_lite.config import MAX_MODEL_LEN, MAX_NUM_SEQS, path_name
from lserve_lite.engine_args import bounded_int, existing_file, output_file
from lserve_lite.errors import exit_status
from lserve_lite.evaluation.synthetic import corpus_text
from lserve_lite.llm import succeeded

DOC_ROOM = 512  # doc: context beyond the document, for a question and the reply


def text_tokens(llm: LLM, n: int, offset: int) -> str:
    """About `n` tokens of corpus text starting `offset` characters in (wrapping around)."""
    text = corpus_text()
    start = offset % len(text)
    piece = (text[start:] + text) * (1 + 8 * n // len(text))
    ids = llm.tokenizer.encode(piece[: 8 * n], add_special_tokens=False)[:n]
    return llm.tokenizer.decode(ids)


def ttft(llm: LLM, messages: list[dict], params: SamplingParams) -> tuple[float, str, int, int]:
    """(seconds to the first token, reply text, prompt tokens, prompt tokens cached) of one chat turn."""
    t0, first, reply, last = time.perf_counter(), None, [], None
    for out in llm.stream_outputs(messages, params):
        first = first or time.perf_counter()
        reply.append(out.text)
        last = out
    return first - t0, "".join(reply), last.num_prompt_tokens, last.num_cached_tokens


def conversation(llm: LLM, tokens: int, trial: int) -> list[dict]:
    """A system prompt and earlier exchanges, about `tokens` tokens in the chat template."""
    msgs = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    k = 0
    while len(llm.tokenizer.encode_chat(msgs)) < tokens - 150:
        off = 7919 * (trial * 50 + k)
        msgs += [{"role": "user", "content": "Summarize: " + text_tokens(llm, 120, off)},
                 {"role": "assistant", "content": text_tokens(llm, 60, off + 3001)}]  # fmt: skip
        k += 1
    return msgs


def model_name(model: str | None) -> str:
    """The model as results name it: its folder or file name, never a path of the machine that ran it."""
    return path_name(model) if model else "default SmolLM2-135M-Instruct"


def bench_chat(args) -> dict:
    llm = LLM(args.model, backend=args.backend, config=EngineConfig(max_model_len=4096))
    cold = LLM(
        args.model, backend=args.backend, config=EngineConfig(max_model_len=4096, prefix_caching=False)
    )
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    rows = []
    for trial in range(args.trials):
        msgs = conversation(llm, args.history, trial) + [{"role": "user", "content": "What was this about?"}]
        t1, reply, p1, c1 = ttft(llm, msgs, params)
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Say more, please."}]
        t2, reply2, p2, c2 = ttft(llm, msgs, params)
        t2_cold, reply2_cold, *_ = ttft(cold, msgs, params)
        rows.append(dict(ttft_turn1_s=t1, ttft_turn2_s=t2, ttft_turn2_no_cache_s=t2_cold, ratio=t2 / t1,
                         prompt_tokens_turn1=p1, prompt_tokens_turn2=p2, cached_turn1=c1, cached_turn2=c2,
                         turn2_reply_equal=reply2 == reply2_cold))  # fmt: skip
        print(json.dumps(rows[-1]))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"scenario": "chat", "model": model_name(args.model), "backend": args.backend, "trials": rows,
            "median": med, "target_ratio": 0.10}  # fmt: skip


def run_doc(llm: LLM, prompts: list[list[int]], params: SamplingParams, arrival: str) -> dict:
    eng = llm.engine
    computed0, cached0 = eng.prompt_tokens_computed, eng.scheduler.prompt_tokens_cached
    t0 = time.perf_counter()
    if arrival == "staggered":
        outs = llm.generate([prompts[0]], params) + llm.generate(prompts[1:], params)
    else:
        outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    succeeded(outs)  # a failed request is an error, not a time
    return {"wall_s": wall, "prompt_tokens": sum(map(len, prompts)),
            "outputs": [o.token_ids for o in outs],
            "prompt_tokens_computed": eng.prompt_tokens_computed - computed0,
            "prompt_tokens_cached": eng.scheduler.prompt_tokens_cached - cached0}  # fmt: skip


def equal_count(a: list, b: list) -> str:
    """How many of two runs' outputs are equal, as "equal/total"."""
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def bench_doc(args) -> dict:
    sparse = SparseConfig(enabled=args.sparse, pattern_path=args.pattern)
    res = {"scenario": "doc", "model": model_name(args.model), "backend": args.backend, "requests": args.requests,
           "doc_tokens": args.doc_tokens, "arrival": args.arrival, "sparse": args.sparse}  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    for cache in (True, False):
        cfg = EngineConfig(max_model_len=args.doc_tokens + DOC_ROOM, prefix_caching=cache, sparse=sparse)
        llm = LLM(args.model, backend=args.backend, config=cfg)
        doc = llm.tokenizer.encode(text_tokens(llm, args.doc_tokens, 0), add_special_tokens=False)
        questions = [f"\n\nQuestion {i}: what does part {i} of this text say about {w}?\nAnswer:"
                     for i, w in enumerate(("files", "time", "errors", "numbers") * args.requests)]  # fmt: skip
        prompts = [
            doc + llm.tokenizer.encode(q, add_special_tokens=False) for q in questions[: args.requests]
        ]
        warm = prompts[0][:128][::-1]  # warm-up (kernels, graphs) on tokens no request starts with
        succeeded(llm.generate([warm], SamplingParams(max_new_tokens=1)))
        res["with_cache" if cache else "without_cache"] = run_doc(llm, prompts, params, args.arrival)
        if args.control and not cache:  # the same cold engine, the requests in the other arrival order
            other = "burst" if args.arrival == "staggered" else "staggered"
            res["control"] = run_doc(llm, prompts, params, other) | {"arrival": other}
        del llm
    w, wo = res["with_cache"], res["without_cache"]
    same = equal_count(w["outputs"], wo["outputs"])  # both kept in the JSON: runs can be compared later
    res["outputs_equal"] = w["outputs"] == wo["outputs"]  # greedy: the cache must not change them
    res["outputs_equal_count"] = same
    if args.control:  # without the cache both times: what batch composition alone changes
        res["control_outputs_equal_count"] = equal_count(wo["outputs"], res["control"]["outputs"])
    res["computed_ratio"] = wo["prompt_tokens_computed"] / max(1, w["prompt_tokens_computed"])
    res["speedup"] = wo["wall_s"] / w["wall_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["chat", "doc"])
    ap.add_argument("--trials", type=bounded_int(1, 1000), default=3)
    ap.add_argument(
        "--history", type=bounded_int(1, MAX_MODEL_LEN), default=2000, help="chat: tokens before turn 1"
    )
    ap.add_argument("--max-new-tokens", type=bounded_int(1, MAX_MODEL_LEN), default=32)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", choices=["cpu", "cuda"], default=None,
                    help="chat: cpu; doc: cuda when CuPy sees a GPU, else cpu")  # fmt: skip
    ap.add_argument("--requests", type=bounded_int(1, MAX_NUM_SEQS), default=32)
    ap.add_argument(
        "--doc-tokens",
        type=bounded_int(1, MAX_MODEL_LEN - DOC_ROOM),
        default=32768,
        help="doc: the shared document",
    )
    ap.add_argument("--arrival", choices=["staggered", "burst"], default="staggered")
    ap.add_argument("--sparse", action="store_true", help="LServe mode (needs a head pattern for the model)")
    ap.add_argument("--pattern", type=existing_file, default=None)
    ap.add_argument("--control", action="store_true", help="doc: run the cold engine again in the other arrival "
                    "order and count the outputs equal to its first run")  # fmt: skip
    ap.add_argument(
        "--out", type=output_file, default=None, help="JSON results file (default: tools/results/...)"
    )
    args = ap.parse_args()
    args.backend = args.backend or ("cuda" if args.scenario == "doc" and cuda_available() else "cpu")
    name = f"bench_prefix_cache_{args.scenario}_{args.backend}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the whole run
    res = bench_chat(args) if args.scenario == "chat" else bench_doc(args)
    res |= {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg()}  # fmt: skip
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
