"""`lserve-lite calibrate`: a DuoAttention-style head pattern for a model that has none.

Method (docs/SPARSE.md): the tool writes its own synthetic passkey-retrieval samples (a 5-digit key hidden
at several depths in filler text, the question at the end). Per sample it prefills the context once with
every head dense and keeps that KV cache; then, for every (layer, KV head) alone, it re-runs only the
sample's tail (the question and the teacher-forced answer) with that head made a streaming head
(sink + local window, LServe's decode window) and measures how far the answer-token distribution moves:
KL(dense || one-head-streaming), averaged over answer positions and samples (the increase of the answer's
negative log-likelihood is recorded too). Gates are the scores divided by the largest one, in [0, 1]:
a high gate = the head retrieves from far away = keep it dense.

Also here: the synthetic text sources and a runner-level harness (`SparseHarness`) that the evaluation
tools share: it runs one sequence through the engine's ModelRunner with chosen head classes and windows
and can emulate decode-time page selection with the CPU reference selector.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import EngineConfig, SparseConfig
from ..engine.sequence import Sequence
from ..errors import InvalidRequestError
from ..kv.page_stats import alloc_page_stats, update_page_stats
from ..sampling_params import SamplingParams
from ..weights.loader import load_config, resolve_model_dir
from .patterns import head_classes, save_pattern
from .plan import AttentionPlan
from .selector import SelectorState

# ----------------------------------------------------------------------------------------------------------
# Synthetic text
# ----------------------------------------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"

# Prose-rich standard-library modules, in a fixed order: their docstrings make a long English-ish text.
CORPUS_MODULES = (
    "argparse", "collections", "difflib", "json", "logging", "email", "decimal", "doctest", "unittest",
    "pickle", "threading", "subprocess", "pathlib", "typing", "dataclasses", "functools", "itertools", "re",
    "string", "random", "statistics", "heapq", "bisect", "contextlib", "abc", "asyncio", "calendar",
    "datetime", "fractions", "shutil", "tarfile", "zipfile", "csv", "configparser", "sqlite3",
    "urllib.parse", "socket", "ssl", "tempfile", "glob", "fnmatch", "inspect", "pdb", "enum", "copy",
    "pprint", "weakref", "queue", "sched", "struct", "codecs", "locale", "gettext", "optparse", "getopt",
    "io", "time", "uuid", "hashlib", "hmac", "secrets", "base64", "zlib", "gzip", "bz2", "lzma",
    "traceback", "warnings", "ast", "dis", "tokenize", "operator", "numbers", "math", "types", "mailbox",
    "mimetypes", "smtplib", "imaplib", "ftplib", "poplib", "wave", "colorsys", "cmd", "shlex",
)  # fmt: skip


def corpus_text(min_chars: int = 0) -> str:
    """Deterministic long English-ish text: module docstrings of the standard library, then its LICENSE.

    The same Python version gives the same text; stops once `min_chars` characters are reached (0: all).
    """
    parts: list[str] = []
    n = 0
    for name in CORPUS_MODULES:
        try:
            doc = inspect.getdoc(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            doc = None
        if doc:
            parts.append(doc.strip() + "\n\n")
            n += len(parts[-1])
            if min_chars and n >= min_chars:
                return "".join(parts)
    lic = Path(inspect.getfile(inspect)).with_name("LICENSE.txt")
    if lic.is_file():
        parts.append(lic.read_text(errors="replace"))
    return "".join(parts)


@dataclass
class PasskeySample:
    """A passkey prompt (token ids), the expected answer tokens and where the needle sits."""

    prompt_ids: list[int]
    answer_ids: list[int]
    passkey: str
    depth: float
    needle_pos: int  # token index of the needle's first token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)


def _sentence_cuts(tokenizer, ids: list[int]) -> np.ndarray:
    """Token indices just after a sentence or line end (good places to cut or insert)."""
    ends = [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip(" ").endswith((".", "\n"))]
    return np.asarray(ends or [len(ids)])


def passkey_sample(
    tokenizer,
    num_tokens: int,
    depth: float,
    passkey: str,
    filler: str = "classic",
    offset: int = 0,
) -> PasskeySample:
    """A passkey-retrieval prompt of about `num_tokens` tokens with the needle at `depth` of the filler.

    filler "classic" repeats the grass/sky/sun sentences (the usual passkey test); "corpus" takes
    `corpus_text()` from character `offset`. Cuts happen after sentence ends, so lengths are approximate
    (within a sentence). The answer is " <passkey>." (the period too: stopping after the key is part of
    retrieving it).
    """
    intro = tokenizer.encode(INTRO)
    needle = tokenizer.encode(f" The pass key is {passkey}. Remember it. {passkey} is the pass key.", False)
    question = tokenizer.encode(QUESTION, False)
    answer = tokenizer.encode(f" {passkey}.", False)
    budget = num_tokens - len(intro) - len(needle) - len(question)
    if budget < 16:
        raise InvalidRequestError(f"passkey sample of {num_tokens} tokens is too short")
    if filler == "classic":
        text = FILLER * (budget // 8 + 2)
    elif filler == "corpus":
        corpus = corpus_text()
        need = budget * 6 + 1000
        text = (corpus * (1 + (offset + need) // max(1, len(corpus))))[offset : offset + need]
        text = text[text.find(" ") + 1 :]  # start at a word
    else:
        raise ValueError(f"unknown filler {filler!r}")
    fill = tokenizer.encode(text, False)
    cuts = _sentence_cuts(tokenizer, fill[: budget + 64])
    end = int(cuts[cuts <= budget].max()) if np.any(cuts <= budget) else budget
    if end < budget - 32:  # no sentence end near the budget: cut at a token
        end = budget
    fill = fill[:end]
    cuts = np.r_[cuts[cuts <= end], 0, end]
    at = int(cuts[np.abs(cuts - depth * end).argmin()]) if depth > 0 else 0
    prompt = intro + fill[:at] + needle + fill[at:] + question
    return PasskeySample(prompt, answer, passkey, depth, len(intro) + at)


# ----------------------------------------------------------------------------------------------------------
# Runner-level harness
# ----------------------------------------------------------------------------------------------------------


class SparseHarness:
    """Runs single sequences through an LLM's ModelRunner, step by step, for calibration and evaluation.

    Two ways to get LServe behaviour:
    - emulation (a dense-mode CPU LLM): `set_heads` makes chosen KV heads streaming heads with a window
      (ModelRunner.set_head_classes), and `enable_selection` restricts dense heads at decode steps to the
      pages chosen by the CPU reference selector (logical-page stats are tracked from the start);
    - engine (an LLM built with `SparseConfig(enabled=True)`): the engine applies its own config;
      `set_request_sparse` sets per-request knobs (budget, interval, windows).
    Decode steps are the runner's: a sequence is decoding once its prompt is cached, so tokens that should
    be scored by decode steps go after `prompt_len` (`begin`).
    """

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self.runner = llm.engine.runner
        self.cfg = llm.engine.cfg
        self.chunk = llm.engine.ecfg.max_num_batched_tokens
        self.engine_sparse = getattr(llm.engine, "layout", None) is not None
        self.decoding = False
        self._sel: _SelectionEmulator | None = None
        if not self.engine_sparse and self.runner.ops.name == "cpu":
            # one emulator per runner (it wraps the runner's ops); it tracks page stats from the first write on
            self._sel = getattr(self.runner, "_selection_emulator", None) or _SelectionEmulator(self)
            self._sel.h = self
            self.runner._selection_emulator = self._sel

    # classes ------------------------------------------------------------------------------------------
    def dense_classes(self) -> list[np.ndarray]:
        return [np.zeros(self.cfg.num_kv_heads, np.int32) for _ in range(self.cfg.num_layers)]

    def set_heads(self, classes: list[np.ndarray], sink: int, local: int) -> None:
        """Emulation: per-layer KV-head classes (1 = streaming with the sink/local window)."""
        if self.engine_sparse:
            raise InvalidRequestError("this LLM applies its own sparse config; set_heads is for dense mode")
        self.runner.set_head_classes([np.asarray(c, np.int32) for c in classes], sink=sink, local=local)

    def set_request_sparse(self, seq: Sequence, sc: SparseConfig) -> None:
        """Engine mode: this sequence's per-request knobs (token budget, interval, windows)."""
        knobs = {k: getattr(sc, k) for k in ("token_budget", "select_interval", "prefill_sink",
                                             "prefill_local", "decode_sink", "decode_local")}  # fmt: skip
        req = getattr(self.engine, "_request_sparse", None)
        seq.sparse = req(knobs) if req is not None else sc

    # sequences ----------------------------------------------------------------------------------------
    def begin(self, ids: list[int], prompt_len: int | None = None, reserve: int = 0) -> Sequence:
        """A sequence of `ids` (prompt = the first `prompt_len`, the rest teacher-forced outputs) with KV
        pages for len(ids) + reserve tokens; nothing computed yet."""
        p = len(ids) if prompt_len is None else prompt_len
        seq = Sequence(list(ids[:p]), SamplingParams(max_new_tokens=max(1, reserve)))
        seq.output_ids = list(ids[p:])
        blocks = self.engine.blocks
        total = len(ids) + reserve
        if total > self.engine.max_len:
            raise InvalidRequestError(f"{total} tokens exceed the context limit {self.engine.max_len}")
        if not blocks.can_grow(seq, total):
            raise InvalidRequestError("not enough free KV pages for this sequence")
        blocks.grow(seq, total)
        return seq

    def end(self, seq: Sequence) -> None:
        if self._sel is not None:
            self._sel.state.drop(seq.seq_id)
        self.engine.blocks.release(seq)

    def rewind(self, seq: Sequence, num_cached: int, keep_outputs: bool = True) -> None:
        """Forget computed K/V beyond `num_cached` tokens (overwritten when recomputed); restart the
        page-selection schedule. `keep_outputs=False` also drops output ids beyond that point."""
        seq.num_cached = num_cached
        if hasattr(seq, "decode_steps"):
            seq.decode_steps = 0
        if not keep_outputs:
            del seq.output_ids[max(0, num_cached - len(seq.prompt_ids)) :]
        if self._sel is not None:
            self._sel.state.drop(seq.seq_id)

    def forward(self, seq: Sequence, n: int, logits: str = "all") -> np.ndarray:
        """Compute the next `n` tokens (in chunks); logits of every row ("all") or the last one."""
        out = []
        ops = self.runner.ops
        if self._sel is not None:
            self._sel.table = seq.page_table
            self._sel.seq_id = seq.seq_id
        while n > 0:
            k = min(n, self.chunk)
            lg = ops.to_numpy(self.runner.run([seq], [k], all_logits=logits == "all"))
            n -= k
            if logits == "all" or n == 0:
                out.append(lg)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.vocab_size), np.float32)

    def decode(self, seq: Sequence, n: int) -> np.ndarray:
        """Teacher-force the next `n` tokens (outputs) by one decode step each; logits [n, vocab]."""
        if seq.num_cached < len(seq.prompt_ids) or seq.num_cached + n > seq.num_tokens:
            raise InvalidRequestError("decode() needs the prompt cached and n teacher-forced outputs left")
        self.decoding = True
        try:
            return np.concatenate([self.forward(seq, 1) for _ in range(n)])
        finally:
            self.decoding = False

    def greedy(self, seq: Sequence, max_new: int, first_logits: np.ndarray, stop_ids=()) -> list[int]:
        """Greedy generation by decode steps after the cached prompt, from the prompt's last logits."""
        self.rewind(seq, len(seq.prompt_ids), keep_outputs=False)
        tok = int(np.argmax(first_logits))
        out = [tok]
        self.decoding = True
        try:
            while len(out) < max_new and tok not in stop_ids:
                seq.output_ids.append(tok)
                tok = int(np.argmax(self.forward(seq, 1)[-1]))
                out.append(tok)
        finally:
            self.decoding = False
        return out

    # page selection -----------------------------------------------------------------------------------
    def enable_selection(self, token_budget: int, select_interval: int, sub_pages: int) -> None:
        """Emulation: decode-time page selection for dense heads (no effect on prefill or streaming heads)."""
        if self._sel is None:
            raise InvalidRequestError("page-selection emulation needs a dense-mode LLM on the cpu backend")
        self._sel.configure(token_budget, select_interval, sub_pages)

    def disable_selection(self) -> None:
        if self._sel is not None:
            self._sel.active = False


class _SelectionEmulator:
    """Wraps the runner's ops: keeps logical-page stats current on every K write, and at decode steps
    restricts each dense KV head to its selected pages (CPU reference attention, one call per head)."""

    def __init__(self, h: SparseHarness, sub_pages: int = 4):
        self.h = h
        ops = h.runner.ops
        self._write, self._attn = ops.rope_write_kv, ops.attention
        self.cache, self.group = h.runner.cache, h.cfg.group_size
        self.stats = self._alloc(sub_pages)
        self.state = SelectorState(2 * self.cache.page_size, self.cache.page_size)
        ops.rope_write_kv = self.rope_write_kv
        ops.attention = self.attention
        self.active = False
        self.table: list[int] = []
        self.seq_id = -1

    def _alloc(self, sub_pages: int) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.h.cfg
        return [
            alloc_page_stats(self.cache.num_pages, c.num_kv_heads, sub_pages, c.head_dim)
            for _ in range(c.num_layers)
        ]

    def configure(self, token_budget: int, interval: int, sub_pages: int) -> None:
        if self.stats[0][0].shape[2] != sub_pages:  # rebuild from the cache (whole pages: slots past a
            self.stats = self._alloc(sub_pages)  # context only touch the newest page, which is always kept)
            everything = np.arange(self.cache.num_pages * self.cache.page_size)
            for layer, (kmax, kmin) in enumerate(self.stats):
                update_page_stats(kmax, kmin, self.cache.k[layer], everything)
        self.state = SelectorState(token_budget, self.cache.page_size, interval)
        self.active = True

    def rope_write_kv(self, qkv, positions, slots, cache, layer, rope):
        q = self._write(qkv, positions, slots, cache, layer, rope)
        if self.stats is not None:
            update_page_stats(*self.stats[layer], cache.k[layer], np.asarray(slots))
        return q

    def attention(self, q, cache, layer, plan: AttentionPlan, head_class):
        if not (self.active and self.h.decoding):
            return self._attn(q, cache, layer, plan, head_class)
        hc = np.asarray(head_class)
        dense = np.nonzero(hc == 0)[0]
        out = self._attn(q, cache, layer, plan, np.where(hc == 1, 1, -1)).reshape(q.shape)
        if dense.size:
            ctx = int(plan.seq_ctx[0])
            kmax, kmin = self.stats[layer]
            pages, lpages = self.state.select(
                self.seq_id, layer, q[0], kmax, kmin, self.table, ctx, self.group
            )
            for h in dense:
                k = np.array([0, pages.shape[1], pages.shape[1]], np.int32)
                sub = dataclasses.replace(plan, kv_indptr=k, kv_page=pages[h], kv_lpage=lpages[h])
                only = np.full_like(hc, -1)
                only[h] = 0
                o = self._attn(q, cache, layer, sub, only).reshape(q.shape)
                rows = slice(h * self.group, (h + 1) * self.group)
                out[:, rows] = o[:, rows]
        return out.reshape(q.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------


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
):
    """Calibration samples: lengths cycle over `lengths`, fillers alternate classic/corpus, needles at
    stratified depths, all placed outside the sink and beyond the local window of the tail."""
    rng = np.random.default_rng(seed)
    out = []
    corpus_len = len(corpus_text())
    for i, d in enumerate(_depths(num_samples, rng)):
        n = lengths[i % len(lengths)]
        key = str(rng.integers(10000, 100000))
        lo, hi = sink + 32, n - tail - local - 64  # needle region the streaming window cannot see
        if hi <= lo:
            raise InvalidRequestError(f"samples of {n} tokens are too short for sink {sink} + local {local}")
        frac = (lo + d * (hi - lo)) / n
        filler = "classic" if i % 2 == 0 else "corpus"
        out.append(passkey_sample(tokenizer, n, frac, key, filler, offset=int(rng.integers(0, corpus_len))))
    return out


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
    log: Callable[[str], None] = print,
) -> CalibrationResult:
    """Score every (layer, KV head) on synthetic passkey samples; write the gate TSV to `out_path`.

    Per sample: one dense prefill of all but the last `tail` prompt tokens (kept), then for each head
    alone a re-run of the tail + teacher-forced answer with that head streaming (sink/local window).
    Writes `out_path` (TSV) and `out_path.with_suffix(".json")` (settings, raw scores, validation).
    """
    from ..llm import LLM  # late: the engine imports sparse modules

    t0 = time.perf_counter()
    max_len = load_config(resolve_model_dir(model_dir)).max_position_embeddings
    lengths = sorted(lengths or default_lengths(max_len))
    if max(lengths) > max_len - 16:
        raise InvalidRequestError(f"sample length {max(lengths)} exceeds the model's context {max_len}")
    page = 64
    need = sum(-(-(lengths[i % len(lengths)] + 64) // page) + 1 for i in range(num_samples))
    pages = need if validate else -(-(max(lengths) + 64) // page) + 1
    llm = LLM(model_dir, backend=backend, config=EngineConfig(num_kv_pages=pages, page_size=page))
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
    score = np.maximum(kl, 0.0)
    gates = score / score.max() if score.max() > 0 else np.ones_like(score)
    info = {
        "method": "per-head streaming ablation on synthetic passkey samples (docs/SPARSE.md)",
        "model": str(llm.engine.model_dir),
        "score": "mean KL(dense || head-streaming) over answer tokens; gate = score / max(score)",
        "num_samples": num_samples, "lengths": lengths, "sink": sink, "local": local, "tail": tail,
        "seed": seed, "samples": per_sample,
    }  # fmt: skip
    if validate:
        info["validation"] = _validate(h, kept, gates, sink, local, seed, log)
        for seq, *_ in kept:
            h.end(seq)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    res = CalibrationResult(gates, kl, dnll, info)
    if out_path is not None:
        write_result(res, out_path)
        log(f"wrote {out_path} and {Path(out_path).with_suffix('.json')} in {info['seconds']:.0f} s")
    return res


def _validate(h: SparseHarness, kept, gates, sink, local, seed, log) -> dict:
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
            f"answer NLL +{np.mean(dn):.3f}, correct {correct}/{len(kept)}")  # fmt: skip
    return out


def write_result(res: CalibrationResult, out_path: str | Path) -> None:
    out_path = Path(out_path)
    save_pattern(out_path, res.gates)
    meta = dict(res.info)
    meta["kl"] = np.round(res.kl, 7).tolist()
    meta["dnll"] = np.round(res.dnll, 5).tolist()
    out_path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lserve-lite calibrate`."""
    parser.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    parser.add_argument(
        "--out", required=True, help="output pattern TSV (a .json with details goes beside it)"
    )
    parser.add_argument("--samples", type=int, default=8, help="number of synthetic passkey samples (8)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sample lengths in tokens (default: 1/4, 3/8, 1/2 of the "
                             "context, at most 4096)")  # fmt: skip
    parser.add_argument("--sink", type=int, default=SparseConfig.decode_sink, help="streaming sink tokens")
    parser.add_argument("--local", type=int, default=SparseConfig.decode_local, help="streaming local tokens")
    parser.add_argument("--tail", type=int, default=24, help="prompt tokens re-run per head (24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-validate", action="store_true", help="skip the sparsity-0.5 sanity check")


def main(args: argparse.Namespace) -> int:
    """Run `lserve-lite calibrate`; returns the exit status."""
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    if args.samples < 1 or args.tail < 2:
        raise InvalidRequestError("--samples must be >= 1 and --tail >= 2")
    calibrate(
        args.model, args.out, num_samples=args.samples, lengths=lengths, sink=args.sink, local=args.local,
        tail=args.tail, seed=args.seed, backend=args.backend, validate=not args.no_validate,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    return 0


if __name__ == "__main__":  # python -m lserve_lite.sparse.calibrate --out X.tsv
    p = argparse.ArgumentParser(prog="lserve-lite calibrate", description=__doc__.splitlines()[0])
    add_args(p)
    sys.exit(main(p.parse_args()))
