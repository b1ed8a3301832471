"""`lserve-lite bench`: prefill and decode throughput of the engine for one model and backend.

A quick figure for users; the tools/bench_*.py scripts are the full benchmarks with peers and rooflines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import MAX_MODEL_LEN, MAX_NUM_SEQS, write_text_atomic
from .engine_args import bounded_int, int_list, json_file
from .errors import InvalidRequestError, LServeError
from .sampling_params import SamplingParams

if TYPE_CHECKING:  # the CLI builds its parser without loading the engine
    from .engine.llm_engine import LLMEngine
    from .llm import LLM


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    """Random token ids (never a constant prompt: the attention pattern must be realistic)."""
    return [int(t) for t in np.random.default_rng(seed).integers(100, max(101, vocab - 1), n)]


def prefill_tok_s(llm: LLM, n: int, reps: int = 3) -> float:
    """Prompt tokens/s up to the first sampled token (chunked prefill as the scheduler runs it). Each run has
    its own prompt: a repeated one would be served from the prefix cache (about 3x the rate on the CPU)."""
    prompts = [random_prompt(n, llm.engine.cfg.vocab_size, seed=1000 * n + r) for r in range(reps + 1)]
    one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    _prefill(llm, prompts[0], one)  # warm-up: kernels, plan buffers, GEMM heuristics for these shapes
    times = []
    for ids in prompts[1:]:
        t = time.perf_counter()
        _prefill(llm, ids, one)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def _prefill(llm: LLM, ids: list[int], params: SamplingParams) -> None:
    """One request run to its end; one that failed (overflowing activations) raises its line, never a figure."""
    from .llm import succeeded  # loaded with the LLM given; the CLI's parser does not load it

    succeeded(llm.generate([ids], params))


def decode_tok_s(llm: LLM, ctx: int, steps: int, batch: int = 1) -> float:
    """Median steady-state decode rate (tokens/s summed over the batch) after `ctx` prompt tokens, over `steps`
    steps in which the whole batch decodes; fewer such steps is an error, never a lower figure."""
    eng = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=eng.max_len, ignore_eos=True)  # aborted once timed
    rids = [
        eng.add_request(random_prompt(ctx, eng.cfg.vocab_size, seed=ctx + b), params) for b in range(batch)
    ]
    try:
        stamps = _batch_step_stamps(eng, set(rids), steps + 2)
    finally:
        for rid in rids:
            eng.abort(rid)
        while eng.has_unfinished():
            eng.step()
    if len(stamps) < steps + 2:
        raise InvalidRequestError(
            f"the batch of {batch} decoded together for {max(0, len(stamps) - 2)} of {steps} steps (a sequence "
            "was preempted or reached the context limit); lower --batch, --context or --steps"
        )
    return batch / float(np.median(np.diff(stamps[1:])))  # stamps[0] ends the batch's prefill


def _batch_step_stamps(eng: LLMEngine, rids: set[str], count: int) -> list[float]:
    """End times of up to `count` consecutive steps that give every request of `rids` a token (the first of
    them ends the batch's prefill); stops at the first later step that leaves one of them out."""
    stamps: list[float] = []
    while len(stamps) < count and eng.has_unfinished():
        outs = eng.step()
        if {o.request_id for o in outs if o.token_ids} == rids:
            stamps.append(time.perf_counter())
        elif stamps:
            break
    return stamps


DEFAULT_PROMPT_LENS = (512, 2048)
DEFAULT_CONTEXT = 512


def fitted_defaults(args: argparse.Namespace, max_len: int) -> tuple[list[int], int]:
    """The prefill lengths and decode context to time: the caller's, else the defaults that fit a model of
    `max_len` tokens (a 2048-token model was refused its own default 2048-token prompt); the caller's are checked
    as given."""
    lens = args.prompt_lens
    if lens is None:
        lens = [n for n in DEFAULT_PROMPT_LENS if n < max_len] or [max_len - 1]
    context = (
        args.context if args.context is not None else max(1, min(DEFAULT_CONTEXT, max_len - args.steps - 2))
    )
    return lens, context


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-lens",
        type=int_list(1, MAX_MODEL_LEN),
        default=None,
        help=f"prefill lengths, comma-separated (default: those of {DEFAULT_PROMPT_LENS} under the context limit)",
    )
    p.add_argument(
        "--context",
        type=bounded_int(1, MAX_MODEL_LEN),
        default=None,
        help=f"prompt tokens before decoding (default: {DEFAULT_CONTEXT}, less where the context limit needs it)",
    )
    p.add_argument("--steps", type=bounded_int(2, 1 << 16), default=32, help="decode steps to time")
    p.add_argument(
        "--batch", type=bounded_int(1, MAX_NUM_SEQS), default=1, help="sequences decoding together"
    )
    p.add_argument(
        "--json",
        type=json_file,
        default=None,
        help="also write the figures, model and backend to this JSON file (before the table is printed)",
    )


def _check_decode_fits(llm: LLM, ctx: int, steps: int, batch: int) -> None:
    """The timed decode needs `ctx + steps + 2` tokens a sequence (its first two steps are not timed) and every
    sequence's KV pages at once: refused before any prompt runs."""
    eng, total = llm.engine, ctx + steps + 2
    if total > eng.max_len:
        raise InvalidRequestError(
            f"--context {ctx} + --steps {steps} + 2 untimed = {total} tokens; the context limit is {eng.max_len}"
        )
    fit = eng.blocks.seqs_that_fit(total - 1)  # the last token's K/V is never written
    if batch > fit:
        raise InvalidRequestError(
            f"--batch {batch}: the KV pool holds {fit} sequence(s) of {total} tokens at once (--kv-pages)"
        )


def main(args: argparse.Namespace, llm: LLM) -> int:
    if args.batch > llm.engine.ecfg.max_num_seqs:
        raise InvalidRequestError(
            f"--batch {args.batch} exceeds the engine's max_num_seqs ({llm.engine.ecfg.max_num_seqs}): raise "
            "--max-num-seqs"
        )
    lens, context = fitted_defaults(args, llm.engine.max_len)
    longest = max(context, *lens)
    if longest >= llm.engine.max_len:  # refused before a prompt of that many ids is built
        raise InvalidRequestError(f"a prompt of {longest} tokens; the context limit is {llm.engine.max_len}")
    _check_decode_fits(llm, context, args.steps, args.batch)
    rows = {f"prefill_{n}_tok_s": prefill_tok_s(llm, n) for n in lens}
    rows[f"decode_ctx{context}_b{args.batch}_tok_s"] = decode_tok_s(llm, context, args.steps, args.batch)
    if args.json:  # first: a stdout that is closed, full or gone costs the table only
        result = {"model": llm.engine.model_name, "backend": llm.engine.backend} | rows
        write_text_atomic(Path(args.json), json.dumps(result, indent=2))
    if sys.stdout is None:  # `>&-` with --json (the CLI refuses it without): print would write nowhere
        raise LServeError(
            f"standard output is closed (>&-): the table was not printed; the results are in {args.json}"
        )
    print(f"model {llm.engine.model_name}, backend {llm.engine.backend}")
    for k, v in rows.items():
        print(f"  {k:<28}{v:>12.1f}")
    return 0
