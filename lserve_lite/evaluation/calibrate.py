"""`lserve-lite calibrate`: a DuoAttention-style head pattern for a model that has none.

Method (docs/SPARSE.md): synthetic passkey-retrieval samples (a 5-digit key hidden at several depths in
filler text, the question at the end; evaluation/synthetic.py). Per sample the context is prefilled once
with every head dense and that KV cache kept; then, for every (layer, KV head) alone, only the sample's
tail (the question and the teacher-forced answer) is re-run with that head made a streaming head (sink +
local window, LServe's decode window), and we measure how far the answer-token distribution moves:
KL(dense || one-head-streaming), averaged over answer positions and samples (the increase of the answer's
negative log-likelihood is recorded too). Gates are the scores divided by the largest one, in [0, 1]:
a high gate = the head retrieves from far away = keep it dense.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import MAX_POOL_PAGES, EngineConfig, path_name, write_text_atomic
from ..errors import InvalidRequestError, LServeError
from ..kv.layout import KVMemoryError
from ..llm import LLM
from ..sparse.patterns import head_classes, save_pattern
from ..weights.loader import resolve_model_dir
from .calibrate_args import BOUNDS
from .harness import SparseHarness, int_in
from .settings import context_limit, context_record, refuse_past_context
from .synthetic import ANSWER_ROOM, PasskeySample, corpus_text, passkey_sample


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class CalibrationResult:
    """Gates [L, Hkv] in [0, 1] and the raw per-head scores behind them."""

    gates: np.ndarray
    kl: np.ndarray
    dnll: np.ndarray
    info: dict = field(default_factory=dict)


def default_lengths(max_len: int) -> list[int]:
    """Sample lengths: 1/4, 3/8 and 1/2 of the context limit, at most 4096 tokens, at least 512."""
    return sorted({max(512, min(4096, int(max_len * f) // 64 * 64)) for f in (0.25, 0.375, 0.5)})


def _depths(n: int, rng: np.random.Generator) -> np.ndarray:
    """n stratified depths in [0.05, 0.95] (shuffled), so every region of the context gets a needle."""
    edges = np.linspace(0.05, 0.95, n + 1)
    return rng.permutation(edges[:-1] + rng.random(n) * (edges[1] - edges[0]))


def make_samples(
    tokenizer, lengths: list[int], num_samples: int, sink: int, local: int, tail: int, seed: int
) -> Iterator[PasskeySample]:
    """Calibration samples: lengths cycle over `lengths`, fillers alternate classic/corpus, needles at
    stratified depths, all placed outside the sink and beyond the local window of the tail. Each is built when
    asked for (a run holds one at a time, not all `num_samples`); a length too short is refused here, before any."""
    for n in dict.fromkeys(lengths):
        if n - tail - local - 64 <= sink + 32:  # no needle region the streaming window cannot see
            raise InvalidRequestError(
                f"samples of {n} tokens are too short: a needle between the sink and the tail's local window "
                f"needs more than sink {sink} + local {local} + tail {tail} + 96 = {sink + local + tail + 96}"
            )
    rng = np.random.default_rng(seed)
    depths = _depths(num_samples, rng)
    corpus_len = len(corpus_text())

    def build() -> Iterator[PasskeySample]:
        for i, d in enumerate(depths):
            n = lengths[i % len(lengths)]
            key = str(rng.integers(10000, 100000))
            lo, hi = sink + 32, n - tail - local - 64  # needle region the streaming window cannot see
            frac = (lo + d * (hi - lo)) / n
            filler = "classic" if i % 2 == 0 else "corpus"
            yield passkey_sample(tokenizer, n, frac, key, filler, offset=int(rng.integers(0, corpus_len)))

    return build()


def calibrate(
    model_dir: str | Path | None = None,
    out_path: str | Path | None = None,
    *,
    num_samples: int = 8,
    lengths: list[int] | None = None,
    sink: int = 128,
    local: int = 256,
    tail: int = 24,
    seed: int = 0,
    backend: str = "cpu",
    validate: bool = True,
    max_model_len: int | None = None,
    log: Callable[[str], None] = print,
) -> CalibrationResult:
    """Score every (layer, KV head) on synthetic passkey samples; write the gate TSV to `out_path`.

    Per sample: one dense prefill of all but the last `tail` prompt tokens (kept), then for each head
    alone a re-run of the tail + teacher-forced answer with that head streaming (sink/local window). The samples and
    their answers fit `max_model_len` (the engine's context limit) where given, else the model's context.
    Writes `out_path` (TSV) and `details_path(out_path)` (settings, raw scores, validation).
    """
    t0 = time.perf_counter()
    check_settings(
        num_samples=num_samples, lengths=lengths or [], sink=sink, local=local, tail=tail, seed=seed
    )
    if out_path is not None:
        check_out_path(out_path)
    path = resolve_model_dir(model_dir)
    lengths = sorted(lengths or default_lengths(context_limit(path, max_model_len)))
    # "1010 exceeds the model's context 1024" was said of a sample that fits: the answer after it does not
    refuse_past_context(path, max(lengths) + ANSWER_ROOM,
                        f"sample length {max(lengths)} + {ANSWER_ROOM} tokens of answer", max_model_len)  # fmt: skip
    page = 64
    pages = _sample_pages(lengths, num_samples, page) if validate else _sample_pages(lengths[-1:], 1, page)
    if pages > MAX_POOL_PAGES:
        raise _too_many_pages(num_samples, lengths, page, validate, MAX_POOL_PAGES, "a KV pool")
    try:
        config = EngineConfig(num_kv_pages=pages, page_size=page, max_model_len=max_model_len)
        llm = LLM(model_dir, backend=backend, config=config)
    except KVMemoryError as e:  # it named num_kv_pages, which the user did not set
        raise _too_many_pages(
            num_samples, lengths, page, validate, e.fits, "this device's KV memory"
        ) from None
    h = SparseHarness(llm)
    cfg = h.cfg
    L, H = cfg.num_layers, cfg.num_kv_heads
    samples = make_samples(llm.tokenizer, lengths, num_samples, sink, local, tail, seed)
    kl, dnll = np.zeros((L, H)), np.zeros((L, H))
    kept, per_sample = [], []
    dense = h.dense_classes()
    log(f"calibrating {L} layers x {H} KV heads on {num_samples} passkey samples {lengths} "
        f"(streaming window: sink {sink} + local {local}, tail {tail} tokens)")  # fmt: skip
    for si, smp in enumerate(samples):
        ts = time.perf_counter()
        ids = smp.prompt_ids + smp.answer_ids
        T, m = len(smp.prompt_ids), len(smp.answer_ids)
        prefix = T - tail
        seq = h.begin(ids)
        h.set_heads(dense, 0, 0)
        h.forward(seq, prefix, logits="last")
        log(f"  sample {si + 1}/{num_samples}: {T} tokens prefilled in {time.perf_counter() - ts:.0f} s")

        def run_tail(classes, s=sink, w=local, seq=seq, prefix=prefix, T=T, m=m):
            h.set_heads(classes, s, w)
            h.rewind(seq, prefix)
            h.forward(seq, T - 1 - prefix, logits="last")
            return _log_softmax(h.forward(seq, m, logits="all"))

        ref = run_tail(dense, 0, 0)
        ans = np.asarray(smp.answer_ids)
        rows = np.arange(m)
        ref_nll = -ref[rows, ans].sum()
        ok = bool(np.all(ref.argmax(-1) == ans))
        p_ref = np.exp(ref)
        for layer in range(L):
            for head in range(H):
                cls = [c.copy() for c in dense]
                cls[layer][head] = 1
                lp = run_tail(cls)
                kl[layer, head] += float((p_ref * (ref - lp)).sum(-1).mean())
                dnll[layer, head] += float(-lp[rows, ans].sum() - ref_nll)
            if (layer + 1) % 10 == 0 and layer + 1 < L:
                log(f"    {layer + 1}/{L} layers scored ({time.perf_counter() - ts:.0f} s)")
        per_sample.append({"tokens": T, "depth": round(smp.depth, 3), "needle_pos": smp.needle_pos,
                           "passkey": smp.passkey, "dense_nll": round(float(ref_nll), 4), "dense_correct": ok,
                           "seconds": round(time.perf_counter() - ts, 1)})  # fmt: skip
        log(f"  sample {si + 1}/{num_samples}: {T} tokens, needle at {smp.needle_pos} ({smp.depth:.2f}), "
            f"dense answer NLL {ref_nll:.3f} ({'correct' if ok else 'wrong'}), {L * H} heads in "
            f"{time.perf_counter() - ts:.0f} s")  # fmt: skip
        if validate:
            kept.append((seq, smp, run_tail, ref, ref_nll))
        else:
            h.end(seq)
    kl /= num_samples
    dnll /= num_samples
    bad = np.argwhere(~np.isfinite(kl))
    if len(bad):  # NaN compared false with the best score: every gate became 1, a pattern of ties, written
        layer, head = (int(i) for i in bad[0])
        raise LServeError(
            f"calibration scored {len(bad)} head(s) as {kl[layer, head]} (first: layer {layer}, KV head {head}): "
            f"the model's logits are not finite; no pattern written"
        )
    score = np.maximum(kl, 0.0)
    gates = score / score.max() if score.max() > 0 else np.ones_like(score)
    info = {
        "method": "per-head streaming ablation on synthetic passkey samples (docs/SPARSE.md)",
        "model": path_name(llm.engine.model_dir),  # its name, not this machine's path (as eval)
        "score": "mean KL(dense || head-streaming) over answer tokens; gate = score / max(score)",
        "num_samples": num_samples, "lengths": lengths, "sink": sink, "local": local, "tail": tail,
        "seed": seed, **context_record(path, max_model_len), "samples": per_sample,
    }  # fmt: skip
    if validate:
        info["validation"] = _validate(kept, gates, sink, local, seed, log)
        for seq, *_ in kept:
            h.end(seq)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    res = CalibrationResult(gates, kl, dnll, info)
    if out_path is not None:
        write_result(res, out_path)
        log(f"wrote {out_path} and {details_path(out_path)} in {info['seconds']:.0f} s")
    return res


def check_settings(**settings: object) -> None:
    """Refuse, before the model loads, a setting outside the command line's bounds (calibrate_args.BOUNDS): from
    Python, 0 samples was refused as a bad num_kv_pages, a negative sink or a zero window wrote a meaningless
    pattern, a zero tail failed after the first prefill and a fractional count in a slice."""
    for name, value in settings.items():
        lo, hi = BOUNDS[name]
        for v in value if name == "lengths" else [value]:
            if not int_in(v, lo, hi):
                what = "each of lengths" if name == "lengths" else name
                raise InvalidRequestError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.40}")


def _too_many_pages(
    num_samples: int, lengths: list[int], page: int, validate: bool, fits: int, holder: str
) -> InvalidRequestError:
    """The error, naming the option to change, of samples whose KV pages are more than the `fits` that `holder`
    holds: validation keeps every sample's at once (--samples), else one sample of the longest length (--lengths)."""
    pages = _sample_pages(lengths, num_samples, page) if validate else _sample_pages(lengths[-1:], 1, page)
    if not validate:
        return InvalidRequestError(f"--lengths: a sample of {lengths[-1]} tokens takes {pages} KV pages of {page} "
                                   f"tokens, more than {holder} holds ({fits}); use shorter lengths")  # fmt: skip
    cycle = _sample_pages(lengths, len(lengths), page)  # one sample of each length
    full, rest = divmod(fits, cycle)
    fit = full * len(lengths) + max(k for k in range(len(lengths)) if _sample_pages(lengths, k, page) <= rest)
    instead = f"use at most {fit} samples, or --no-validate" if fit else "use shorter --lengths"
    return InvalidRequestError(
        f"--samples {num_samples}: validation keeps every sample's KV cache at once, {pages} pages of {page} "
        f"tokens at lengths {lengths}, more than {holder} holds ({fits}); {instead}"
    )


def _sample_pages(lengths: list[int], num_samples: int, page: int) -> int:
    """KV pages `num_samples` samples take together (lengths cycling; prompt + answer, plus a page), counted
    without a list as long as the (untrusted) sample count."""
    per = [-(-(n + 64) // page) + 1 for n in lengths]
    full, rest = divmod(num_samples, len(per))
    return full * sum(per) + sum(per[:rest])


def details_path(out_path: str | Path) -> Path:
    """Where the details JSON of pattern `out_path` goes: `p.tsv` -> `p.json`, any other name + `.json` (with_suffix
    made `p.v2` -> `p.json`, the details of another pattern `p.tsv`)."""
    out = Path(out_path)
    return out.with_suffix(".json") if out.suffix.lower() == ".tsv" else out.with_name(out.name + ".json")


def check_out_path(out_path: str | Path) -> None:
    """Refuse, before hours of scoring, an output the results could not be written to: a directory, a place
    that cannot be written, or a .json name (the details JSON beside it would overwrite the pattern)."""
    out = Path(out_path)
    if out.suffix == ".json":
        raise InvalidRequestError(f"{out}: the pattern is a TSV; its details go to the .json beside it")
    if out.is_dir():
        raise InvalidRequestError(f"{out} is a directory; name the pattern file to write")
    if details_path(out).is_dir():
        raise InvalidRequestError(f"{details_path(out)} is a directory; the pattern's details go there")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise InvalidRequestError(f"{out}: cannot write there ({e.strerror or e})") from None


def _validate(
    kept: list, gates: np.ndarray, sink: int, local: int, seed: int, log: Callable[[str], None]
) -> dict:
    """At static sparsity 0.5: the calibrated choice against a random and the inverted one."""
    rng = np.random.default_rng(seed + 1)
    choices = {
        "calibrated": head_classes(gates, 0.5),
        "random": head_classes(rng.random(gates.shape), 0.5),
        "inverted": head_classes(-gates, 0.5),
    }
    out = {}
    for name, cls in choices.items():
        kls, dn, correct = [], [], 0
        for _seq, smp, run_tail, ref, ref_nll in kept:
            lp = run_tail(cls, sink, local)
            ans = np.asarray(smp.answer_ids)
            kls.append(float((np.exp(ref) * (ref - lp)).sum(-1).mean()))
            dn.append(float(-lp[np.arange(len(ans)), ans].sum() - ref_nll))
            correct += bool(np.all(lp.argmax(-1) == ans))
        out[name] = {"mean_kl": round(float(np.mean(kls)), 5), "mean_dnll": round(float(np.mean(dn)), 4),
                     "answers_correct": f"{correct}/{len(kept)}"}  # fmt: skip
        log(f"  validation, half the heads streaming, {name:>10}: mean KL {np.mean(kls):.4f}, "
            f"answer NLL {np.mean(dn):+.3f}, correct {correct}/{len(kept)}")  # fmt: skip
    return out


def write_result(res: CalibrationResult, out_path: str | Path) -> None:
    """The details JSON, then the pattern, each written whole or not at all: a pattern on disk is always a
    complete one, with its own details beside it."""
    out_path = Path(out_path)
    meta = dict(res.info)
    meta["kl"] = np.round(res.kl, 7).tolist()
    meta["dnll"] = np.round(res.dnll, 5).tolist()
    write_text_atomic(details_path(out_path), json.dumps(meta, indent=1) + "\n")
    save_pattern(out_path, res.gates)


def main(args: argparse.Namespace) -> int:
    """Run `lserve-lite calibrate`; returns the exit status."""
    calibrate(
        args.model, args.out, num_samples=args.samples, lengths=args.lengths, sink=args.sink, local=args.local,
        tail=args.tail, seed=args.seed, backend=args.backend, validate=not args.no_validate,
        max_model_len=args.max_model_len, log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    return 0
