"""The K/V-write cases of a quantized cache (rope_write_kv, rope_write_kv_sparse): fresh inputs, the reference
layers' outputs, and the checks of what a kernel wrote. One home for both runners: the harness rows on a GPU
(harness/kv_quant.py) and the kernels compiled as host code (tools/layers_host_check.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backends.reference.layers import rope_write_kv_ref, rope_write_kv_sparse_ref
from ..backends.reference.page_stats import update_page_stats
from ..kv.quant import FORMATS, KVFormat, dequantize, quantize, steps
from .common import Ctx, Result, compare
from .sparse_batch import head_classes

DENSE_WRITES = [(9, 3, 64, 64, 13), (32, 8, 128, 16, 70)]  # (Hq, Hkv, D, page, N) of the harness rows
SPARSE_DIMS = (64, 128)  # the head dims of the LServe write rows (D / 32 = 2 and 4 channels a lane)


@dataclass
class Pool:
    """One pool a write fills: its name, shape [pages, heads, page], format, the slots written and the float rows
    the reference wrote there (quantized by the kernel: compared within a step)."""

    name: str
    shape: tuple[int, int, int]
    fmt: KVFormat
    slots: np.ndarray
    ref: np.ndarray  # [pages, heads, page, D] float32


@dataclass
class WriteCase:
    """A write's inputs (float16-exact float32 host arrays; slots [N], or [2, N] for LServe's two pools) and
    its reference outputs; LServe's also its page statistics before (kmax, kmin) and after (want_*)."""

    kv: str
    tag: str
    hq: int
    hkv: int
    d: int
    page: int
    qkv: np.ndarray
    pos: np.ndarray
    slots: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    q_ref: np.ndarray
    pools: list[Pool]
    sparse: dict = field(default_factory=dict)  # hc, hs, nd, ns, sub, kmax, kmin, want_max, want_min

    @property
    def hadamard(self) -> bool:
        return FORMATS[self.kv].rotates_keys(self.d)


def dense_case(
    c: Ctx,
    kv: str,
    hq: int,
    hkv: int,
    d: int,
    page: int,
    n: int,
    pages: int = 40,
    qkv: np.ndarray | None = None,
    nan: bool = False,
) -> WriteCase:
    """rope_write_kv into a dense-mode cache of format kv, padding rows (slot -1) included; `qkv` [n, (Hq + 2 Hkv)
    D]: the rows to write (a GEMV's output: the fused rows, whose slots are all live), else random ones. `nan`: one
    live row's K head and another's V head hold a NaN, which must reach their stored rows (a NaN scale)."""
    fmt = FORMATS[kv]
    pad = 0.2 if qkv is None else 0.0
    qkv = c.f16(n, (hq + 2 * hkv) * d) if qkv is None else qkv
    cos, sin = c.f16(512, d // 2), c.f16(512, d // 2)
    pos = c.rng.integers(0, 512, n)
    slots = c.rng.permutation(pages * page)[:n]
    slots[c.rng.random(n) < pad] = -1
    live = slots >= 0
    if nan:
        rows, heads, chans = (
            c.rng.choice(np.flatnonzero(live), 2),
            c.rng.integers(0, hkv, 2),
            c.rng.integers(0, d, 2),
        )
        for part, r, h, ch in zip((hq, hq + hkv), rows, heads, chans, strict=True):  # K, then V
            qkv[r, (part + h) * d + ch] = np.nan
    k_ref, v_ref = np.zeros((2, pages, hkv, page, d), np.float32)
    q_ref = rope_write_kv_ref(qkv, pos, np.maximum(slots, 0), k_ref.copy(), v_ref.copy(), cos, sin, fmt=fmt)
    rope_write_kv_ref(qkv[live], pos[live], slots[live], k_ref, v_ref, cos, sin, fmt=fmt)
    shape = (pages, hkv, page)
    pools = [Pool("k", shape, fmt, slots[live], k_ref), Pool("v", shape, fmt, slots[live], v_ref)]
    tag = f"{kv} Hq{hq} Hkv{hkv} D{d} page{page} N{n}" + (" hadamard" if fmt.rotates_keys(d) else "")
    tag += " NaN rows" if nan else ""
    return WriteCase(kv, tag, hq, hkv, d, page, qkv, pos, slots, cos, sin, q_ref, pools)


def sparse_case(c: Ctx, kv: str, d: int = 64) -> WriteCase:
    """rope_write_kv_sparse into LServe's two pools (pattern 0110), head dim d: a chunk appended at an unaligned
    position (its logical page holds earlier tokens: the statistics merge), a fresh prompt and two padding rows
    (slots -1 in both pools, as a captured decode batch pads: they write q and nothing else)."""
    fmt, (hc, hs), ps, sub, gsize = FORMATS[kv], head_classes("0110"), 16, 4, 2
    hkv, nd, ns = hc.size, 2, 2
    hq = gsize * hkv
    starts, lens, pad = [37, 0], [45, 20], 2
    n_live = sum(lens)
    need = [-(-(s + m) // ps) for s, m in zip(starts, lens, strict=True)]
    n_pages, n_spages = sum(need) + 3, -(-n_live // ps) + 3
    perm, offs = c.rng.permutation(n_pages), np.cumsum([0, *need])
    tables = [perm[offs[i] : offs[i + 1]] for i in range(len(lens))]
    spans = [np.arange(s, s + m) for s, m in zip(starts, lens, strict=True)]
    pos = np.concatenate([*spans, c.rng.integers(0, max(starts), pad)]).astype(np.int64)
    live = np.arange(pos.size) < n_live
    dslots, sslots = np.full(pos.size, -1, np.int64), np.full(pos.size, -1, np.int64)
    dslots[live] = np.concatenate([t[p // ps] * ps + p % ps for t, p in zip(tables, spans, strict=True)])
    sslots[live] = c.rng.permutation(n_spages * ps)[:n_live]
    qkv = c.f16(pos.size, (hq + 2 * hkv) * d)
    cos, sin = c.f16(256, d // 2), c.f16(256, d // 2)
    hist_k = np.zeros((n_pages, nd, ps, d), np.float32)  # earlier tokens' keys: only their stats matter
    hist = tables[0][np.arange(starts[0]) // ps] * ps + np.arange(starts[0]) % ps
    hist_k[hist // ps, :, hist % ps] = c.f16(hist.size, nd, d)
    kmax, kmin = np.zeros((2, n_pages, nd, sub, d), np.float32)
    update_page_stats(kmax, kmin, hist_k, hist)
    kmax, kmin = kmax.astype(np.float16).astype(np.float32), kmin.astype(np.float16).astype(np.float32)
    floats = [np.zeros((n_pages, nd, ps, d), np.float32) for _ in "kv"]
    floats += [np.zeros((n_spages, ns, ps, d), np.float32) for _ in "kv"]
    q_ref = rope_write_kv_sparse_ref(  # q of every row, padding included (its K/V writes are thrown away)
        qkv,
        pos,
        np.maximum(dslots, 0),
        np.maximum(sslots, 0),
        *[a.copy() for a in floats],
        hc,
        hs,
        cos,
        sin,
        fmt=fmt,
    )
    live_in = (qkv[live], pos[live], dslots[live], sslots[live])
    rope_write_kv_sparse_ref(*live_in, *floats, hc, hs, cos, sin, fmt=fmt)
    host = [np.zeros((*a.shape[:3], fmt.packed_dim(d)), fmt.value_dtype) for a in floats]  # kd, vd, ks, vs
    hsc = [np.zeros((*a.shape[:3], fmt.scale_cols(d)), np.float16) for a in floats]
    want_max, want_min = kmax.copy(), kmin.copy()
    rope_write_kv_sparse_ref(
        *live_in, *host, hc, hs, cos, sin, want_max, want_min, scales=tuple(hsc), fmt=fmt
    )
    names, slots = ("kd", "vd", "ks", "vs"), (dslots[live], dslots[live], sslots[live], sslots[live])
    pools = [Pool(nm, a.shape[:3], fmt, s, a) for nm, a, s in zip(names, floats, slots, strict=True)]
    tag = f"{kv} 0110 Hq{hq} D{d} p{ps} sub{sub} pad{pad}" + (" hadamard" if fmt.rotates_keys(d) else "")
    extra = dict(
        hc=hc, hs=hs, nd=nd, ns=ns, sub=sub, kmax=kmax, kmin=kmin, want_max=want_max, want_min=want_min
    )
    return WriteCase(
        kv, tag, hq, hkv, d, ps, qkv, pos, np.stack([dslots, sslots]), cos, sin, q_ref, pools, extra
    )


def within_step(
    kernel: str, tag: str, vals, scales, ref: np.ndarray, fmt: KVFormat, rotated: bool = False
) -> Result:
    """Written rows dequantized vs the float rows: within half a step (int) or 1/16 (fp8) plus the fp16
    rounding of the key and of its scale (`fmt`: the pool's). `rotated`: keys in the Hadamard basis,
    rotated by the kernels from fp16-rounded values, whose rounding each rotated channel carries from the whole
    row (about 2^-12 of the row's RMS), not from itself. A row whose reference holds NaN must read NaN there
    (its scale NaN, as kv/quant.quantize gives it); its other channels may read NaN too (the same scale)."""
    got = dequantize(vals, scales, fmt)
    nan_row = np.isnan(ref).any(-1, keepdims=True)
    lost = np.isnan(ref) & ~np.isnan(got)  # a NaN stored as a finite value
    got, ref = np.where(nan_row, 0.0, got), np.where(nan_row, 0.0, ref)
    step = np.where(nan_row, 0.0, steps(scales, fmt, ref.shape[-1]))
    if fmt.name == "fp8":
        bound = np.abs(ref) * (1 / 16 + 2e-3) + step * 2.0**-9
    else:
        bound = step * 0.57 + np.abs(ref) * 2e-3
    if rotated:
        bound = bound + 2e-3 * np.sqrt(np.mean(np.square(ref, dtype=np.float64), -1, keepdims=True))
    err = np.abs(got - ref)
    ok = bool(np.all(err <= bound + 1e-6)) and np.isfinite(got).all() and not lost.any()
    worst = float(np.max(err / (bound + 1e-6))) if err.size else 0.0
    why = f"{int(lost.sum())} NaN stored finite" if lost.any() else "beyond the step bound"
    return Result(kernel, tag, float(err.max(initial=0)), worst, ok, "" if ok else why)


def check_write(
    case: WriteCase, prefix: str, q, pools: list[tuple], stats: tuple | None = None
) -> list[Result]:
    """What a kernel wrote (host arrays: q [N, Hq, D], per pool its (values, fp16 scales NaN-poisoned before the
    write), LServe's (kmax, kmin))
    against the case: q within fp16 rounding, values within the step bound, every pool's scales as the format's
    rule gives them (rotated keys: within the fp16 rounding of the keys the kernels rotate), the page
    statistics as the reference's."""
    # a Hadamard-rotated q carries each channel's fp16 rounding from the whole head (2^-11 of its RMS), not from itself
    rms = (
        np.sqrt(np.mean(np.square(case.q_ref, dtype=np.float64), -1, keepdims=True)) if case.hadamard else 0.0
    )
    out = [compare(f"{prefix}.q", case.tag, q, case.q_ref, 2e-3 + 2e-3 * rms, 4e-3)]
    for p, (vals, sc) in zip(case.pools, pools, strict=True):
        pg, off = p.slots // case.page, p.slots % case.page
        rows, got_sc = p.ref[pg, :, off], sc[pg, :, off]
        rotated = case.hadamard and p.name.startswith("k")
        out.append(
            within_step(f"{prefix}.{p.name}", case.tag, vals[pg, :, off], got_sc, rows, p.fmt, rotated)
        )
        # every pool's scales (the step bound above is taken from them: a scale too large passes it), the whole
        # pool: rows no write is for keep their NaN poison (a padding row written at slot -1 fails); rotated keys
        # come from fp16-rounded values (kernels) or float32 ones (the reference)
        atol = 2e-3 * float(np.abs(np.nan_to_num(rows)).max(initial=0)) if rotated else 1e-6
        want = np.full(sc.shape, np.nan)
        want[pg, :, off] = quantize(rows, p.fmt, np.float16)[1]
        out.append(compare(f"{prefix}.{p.name}_scale", case.tag, sc, want, atol, 2e-3))
    if stats is not None:
        out.append(compare(f"{prefix}.kmax", case.tag, stats[0], case.sparse["want_max"], 2e-3, 4e-3))
        out.append(compare(f"{prefix}.kmin", case.tag, stats[1], case.sparse["want_min"], 2e-3, 4e-3))
    return out
