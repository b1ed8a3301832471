"""Selector diagnostics: how much exact attention mass the page selector keeps, against an oracle.

A dense-mode LLM teacher-forces a text; at decode steps (after prefilling C - T tokens, for several
context lengths C in one pass over the text) we take each layer's post-RoPE queries and the real KV cache.
Per layer and KV head, the exact softmax attention gives every page's mass (mean over the head's query
group). The selector (sparse/selector.py's `page_scores` + `top_pages`, on statistics of
backends/reference/page_stats.py's definition for each sub_pages) keeps `budget / page_size` pages; the
oracle keeps the newest page and the pages of largest exact mass under the same budget. Recall = selected
mass / oracle mass. Scoring variants (`VARIANTS`) are candidates for a better rule, measured the same way
(`lserve` and `group_mass` are the engine's group_reduce "max" and "mass").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..geometry import pages_for
from ..llm import LLM
from ..sparse.patterns import bundled_pattern, head_classes, load_pattern
from ..sparse.selector import page_scores, top_pages, visited_selection
from ..weights.loader import resolve_model_dir
from .harness import SparseHarness
from .settings import context_record, refuse_past_context
from .synthetic import corpus_text


def decode_step_queries(h: SparseHarness, seq) -> list[np.ndarray]:
    """One teacher-forced decode step through the runner's own model, ops and cache; each layer's
    post-RoPE queries [Hq, D]. It repeats LlamaModel.forward's layer loop (the model has no hook that
    exposes q) with the same calls in the same order, so the cache it writes is the engine's."""
    with h.llm.hold_engine():  # another thread's step would run in the middle of this one
        r = h.runner
        ids, pos, slots, plan, cache, classes, _ = r.executor.plan(r.prepare([seq], [1]))
        m, ops, eps = r.model, r.ops, h.cfg.rms_norm_eps
        x, residual, qs = ops.embed(m.embed, ids), None, []
        for i, layer in enumerate(m.layers):
            hh, residual = ops.add_rmsnorm(x, residual, layer.ln1, eps)
            q = ops.rope_write_kv(
                ops.linear(hh, layer.qkv, layer.qkv_bias), pos, slots, cache, i, m.rope_for(pos)
            )
            qs.append(np.array(ops.to_numpy(q)[0], np.float32))
            x = ops.linear(ops.attention(q, cache, i, plan, classes[i]), layer.o)
            hh, residual = ops.add_rmsnorm(x, residual, layer.ln2, eps)
            x = ops.linear(ops.gate_up_silu(hh, layer.gate_up), layer.down)
        r.advance([seq], [1])
    return qs


def page_stats(k: np.ndarray, ctx: int, sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised page_stats_reference for one sequence, plus the mean key: k [P, Hkv, page, D] (its pages
    in order) -> kmax, kmin, kmean [P, Hkv, sub, D] over the valid tokens (< ctx) of each logical page."""
    p, hkv, page, d = k.shape
    valid = (np.arange(p * page) < ctx).reshape(p, 1, sub, page // sub, 1)
    ks = k.reshape(p, hkv, sub, page // sub, d)
    kmax = np.where(valid, ks, -np.inf).max(axis=3)
    kmin = np.where(valid, ks, np.inf).min(axis=3)
    cnt = valid.sum(axis=3)
    kmean = np.where(valid, ks, 0).sum(axis=3) / np.maximum(cnt, 1)
    empty = cnt == 0
    return tuple(np.where(empty, 0, a).astype(np.float32) for a in (kmax, kmin, kmean))


def page_mass(q: np.ndarray, k: np.ndarray, ctx: int) -> np.ndarray:
    """Exact attention mass per page [Hkv, P], mean over each KV head's query group; q [Hq, D]."""
    p, hkv, page, d = k.shape
    kk = k.transpose(1, 0, 2, 3).reshape(hkv, p * page, d)[:, :ctx]
    s = np.einsum("hgd,htd->hgt", q.reshape(hkv, -1, d), kk) / math.sqrt(d)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = np.pad((w / w.sum(-1, keepdims=True)).mean(1), ((0, 0), (0, p * page - ctx)))
    return w.reshape(hkv, p, page).sum(-1)


def _masked(x: np.ndarray, ctx: int, page: int) -> np.ndarray:
    """x [Hkv, G, P, sub] with logical pages that start at or past ctx set to -inf."""
    p, sub = x.shape[2], x.shape[3]
    start = np.arange(p)[:, None] * page + np.arange(sub)[None, :] * (page // sub)
    return np.where(start < ctx, x, -np.inf)


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.exp(x - m).sum(axis=axis))


def _group_mass(x: np.ndarray) -> np.ndarray:
    """[Hkv, G, P] log-weights -> [Hkv, P]: each query head's softmax over pages, mean over the group."""
    return np.exp(x - _lse(x, 2)[..., None]).mean(1)


def _bounds(q, kmax, kmin, ctx, page) -> np.ndarray:
    """LServe's per-query-head upper bound of q.k/sqrt(D) per logical page: [Hkv, G, P, sub]."""
    hkv, d = kmax.shape[1], kmax.shape[3]
    qg = q.reshape(hkv, -1, d)
    b = np.einsum("hgd,phsd->hgps", np.maximum(qg, 0), kmax)
    b += np.einsum("hgd,phsd->hgps", np.minimum(qg, 0), kmin)
    return _masked(b / math.sqrt(d), ctx, page)


def _centroid(q, kmean, ctx, page) -> np.ndarray:
    hkv, d = kmean.shape[1], kmean.shape[3]
    return _masked(np.einsum("hgd,phsd->hgps", q.reshape(hkv, -1, d), kmean) / math.sqrt(d), ctx, page)


# Page scores [Hkv, P] from (q, kmax, kmin, kmean, ctx, page_size); higher = keep.
VARIANTS: dict[str, Callable[..., np.ndarray]] = {
    # the engine's rule: max over logical pages of the bound, max over the query group
    "lserve": lambda q, kx, kn, km, ctx, page: page_scores(
        q, kx, kn, np.arange(kx.shape[0]), ctx, q.shape[0] // kx.shape[1], page
    ),
    # logical pages combined by logsumexp (a page with several high logical pages holds more mass)
    "lse_sub": lambda q, kx, kn, km, ctx, page: _lse(_bounds(q, kx, kn, ctx, page), 3).max(1),
    # query group combined by mean softmax weight (the mass the group's heads attend with): the engine's
    # group_reduce="mass", in log space
    "group_mass": lambda q, kx, kn, km, ctx, page: page_scores(
        q, kx, kn, np.arange(kx.shape[0]), ctx, q.shape[0] // kx.shape[1], page, "mass"
    ),
    "lse_sub+group_mass": lambda q, kx, kn, km, ctx, page: _group_mass(
        _lse(_bounds(q, kx, kn, ctx, page), 3)
    ),
    # q . mean key of each logical page (needs a third statistic), as lse_sub+group_mass
    "centroid": lambda q, kx, kn, km, ctx, page: _group_mass(_lse(_centroid(q, km, ctx, page), 3)),
}


def _dense_heads(model_dir, num_layers: int, num_kv_heads: int, sparsity: float) -> np.ndarray:
    """[L, Hkv] bool: the heads LServe keeps dense at `sparsity` (all of them without a pattern)."""
    path = bundled_pattern(model_dir)
    if path is None:
        return np.ones((num_layers, num_kv_heads), bool)
    return np.stack(head_classes(load_pattern(path, num_layers, num_kv_heads), sparsity)) == 0


PAGE_SIZE = 64  # tokens per page of the measured engine


def covers(budget: int, length: int, page: int = PAGE_SIZE) -> bool:
    """Whether a token budget keeps every page of a context: the selector picks them all, so nothing is measured."""
    return pages_for(length, page) <= budget // page


def check_grid(steps: int, lengths, budgets, subs, variants) -> None:
    """Refuses, before the model loads, a grid that would measure nothing or fail after the compute."""
    if steps < 1 or min(lengths) <= steps:
        raise InvalidRequestError(
            f"need 1 <= steps < every length, got steps {steps}, lengths {list(lengths)}"
        )
    # one text runs every length in turn: a length's decode steps start where the previous length's ended
    ordered = sorted(lengths)
    close = [(a, b) for a, b in zip(ordered, ordered[1:]) if b - a < steps]
    if close:
        raise InvalidRequestError(
            f"lengths {close[0][0]} and {close[0][1]} are less than steps ({steps}) apart: each length's "
            f"{steps} decode steps follow the previous length's"
        )
    if any(b < PAGE_SIZE or b % PAGE_SIZE for b in budgets):
        raise InvalidRequestError(
            f"budgets must be positive multiples of the page size {PAGE_SIZE}: {list(budgets)}"
        )
    if all(covers(b, n) for n in lengths for b in budgets):
        raise InvalidRequestError(
            f"every budget covers every length (budgets {list(budgets)}, lengths {list(lengths)}): the selector "
            "would pick every page; give a budget under a length"
        )
    if any(s < 1 or PAGE_SIZE % s for s in subs):
        raise InvalidRequestError(f"sub_pages must divide the page size {PAGE_SIZE}: {list(subs)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InvalidRequestError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")


def measure(
    model: str | None = None,
    lengths: tuple[int, ...] = (2048, 4096, 8192),
    steps: int = 16,
    budgets: tuple[int, ...] = (512, 1024, 2048, 4096),
    subs: tuple[int, ...] = (1, 2, 4, 8),
    variants: tuple[str, ...] = tuple(VARIANTS),
    offsets: tuple[int, ...] = (0,),
    interval: int = 4,
    sparsity: float = 0.5,
    max_model_len: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Selected vs oracle attention mass at `steps` decode steps ending at each context length, in one
    pass per text (corpus_text() from each token offset); per (length, variant, sub_pages, budget) and
    step, summed per (layer, head); `lserve_reuse<interval>` is the engine's rule with selection reuse. The lengths
    fit `max_model_len` (the engine's context limit) where given, else the model's context."""
    check_grid(steps, lengths, budgets, subs, variants)
    lengths = tuple(sorted(lengths))
    model_dir = resolve_model_dir(model)
    refuse_past_context(model_dir, lengths[-1], f"length {lengths[-1]}", max_model_len)
    page = PAGE_SIZE
    limit = lengths[-1] if max_model_len is None else max_model_len
    llm = LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=pages_for(lengths[-1], page) + 2,
                                                        max_model_len=limit, page_size=page))  # fmt: skip
    h, cfg = SparseHarness(llm), llm.engine.cfg
    dense = _dense_heads(llm.engine.model_dir, cfg.num_layers, cfg.num_kv_heads, sparsity)
    all_ids = llm.tokenizer.encode(corpus_text())
    if max(offsets) + lengths[-1] > len(all_ids):
        raise InvalidRequestError(
            f"offset {max(offsets)} + length {lengths[-1]} is past the text's {len(all_ids)} tokens"
        )
    cells = [(v, s, b) for v in variants for s in subs for b in budgets]
    cells += (
        [(f"lserve_reuse{interval}", 4, b) for b in budgets] if "lserve" in variants and 4 in subs else []
    )
    shape = (
        len(offsets) * steps,
        2,
        cfg.num_layers,
        cfg.num_kv_heads,
    )  # [text x step, selected/oracle, L, H]
    acc = {n: {c: np.zeros(shape) for c in cells} for n in lengths}
    for ti, off in enumerate(offsets):
        seq = h.begin(all_ids[off : off + lengths[-1]], prompt_len=lengths[0] - steps)
        for n in lengths:
            h.forward(seq, n - steps - seq.num_cached, logits="last")
            stored: dict = {}
            for t in range(steps):
                qs = decode_step_queries(h, seq)
                ctx, row = seq.num_cached, ti * steps + t
                table = np.asarray(seq.page_table[: pages_for(ctx, page)])
                for layer, q in enumerate(qs):
                    k = np.asarray(h.runner.ops.to_numpy(h.runner.cache.k[layer]))[table]
                    mass = page_mass(q, k, ctx)
                    orc = {b: np.take_along_axis(mass, top_pages(mass, b // page), 1).sum(1) for b in budgets}
                    for s in subs:
                        stats = page_stats(k, ctx, s)
                        for v in variants:
                            sc = VARIANTS[v](q, *stats, ctx, page)
                            for b in budgets:
                                sel = top_pages(sc, b // page)
                                acc[n][v, s, b][row, :, layer] = (
                                    np.take_along_axis(mass, sel, 1).sum(1),
                                    orc[b],
                                )
                                if (f"lserve_reuse{interval}", s, b) in acc[n] and v == "lserve":
                                    if t % interval == 0:
                                        stored[layer, b] = sel
                                    vis = [visited_selection(x, ctx, page) for x in stored[layer, b]]
                                    got = [mass[g, x].sum() for g, x in enumerate(vis)]
                                    acc[n][f"lserve_reuse{interval}", s, b][row, :, layer] = got, orc[b]
                log(
                    f"  text {ti + 1}/{len(offsets)}, {n} tokens: decode step {t + 1}/{steps} (context {ctx})"
                )
        h.end(seq)
    out = {"page_size": page, "steps": steps, "offsets": list(offsets), "dense_heads": int(dense.sum()),
           "sparsity": sparsity, "text": "corpus_text() tokens from each offset",
           **context_record(model_dir, max_model_len)}  # fmt: skip
    return {**out, "results": _summary(acc, dense, lengths, page)}


def _recall_ci(a: np.ndarray, m: np.ndarray, rng: np.random.Generator) -> list[float]:
    """95% bootstrap interval of recall (ratio of summed masses) over the (text, step) rows of a."""
    sel, orc = a[:, 0][:, m].sum(1), a[:, 1][:, m].sum(1)
    idx = rng.integers(0, len(sel), (1000, len(sel)))
    boot = sel[idx].sum(1) / orc[idx].sum(1)
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def _summary(acc: dict, dense: np.ndarray, lengths, page: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for n in lengths:
        for (v, s, b), a in acc[n].items():
            if covers(b, n, page):
                continue  # everything is selected
            d = {"length": n, "variant": v, "sub_pages": s, "budget": b}
            for name, m in (("dense_heads", dense), ("all_heads", np.ones_like(dense))):
                sel, orc = a[:, 0][:, m].sum(), a[:, 1][:, m].sum()
                cnt = m.sum() * len(a)
                d[name] = {"selected_mass": sel / cnt, "oracle_mass": orc / cnt, "recall": sel / orc,
                           "recall_ci95": _recall_ci(a, m, rng)}  # fmt: skip
            d["per_head_recall"] = np.round(a[:, 0].sum(0) / a[:, 1].sum(0), 4).tolist()
            out.append(d)
    return out


def table(summary: dict, variant: str = "lserve", heads: str = "dense_heads") -> str:
    """Markdown table: recall (selected / oracle mass) [95% CI] per length and budget, a column per
    sub_pages."""
    rows = [r for r in summary["results"] if r["variant"] == variant]
    subs = sorted({r["sub_pages"] for r in rows})
    lines = ["| length | budget | oracle mass | " + " | ".join(f"sub_pages {s}" for s in subs) + " |",
             "|---|---|---|" + "---|" * len(subs)]  # fmt: skip
    for n, b in sorted({(r["length"], r["budget"]) for r in rows}):
        cell = {r["sub_pages"]: r[heads] for r in rows if r["length"] == n and r["budget"] == b}
        orc = next(iter(cell.values()))["oracle_mass"]
        lines.append(f"| {n} | {b} | {orc:.3f} | " + " | ".join(
            _fmt(cell[s]) if s in cell else "-" for s in subs) + " |")  # fmt: skip
    return "\n".join(lines)


def _fmt(c: dict) -> str:
    lo, hi = c["recall_ci95"]
    return f"{c['recall']:.3f} [{lo:.3f}, {hi:.3f}]"
