"""kernels/page_select.cu's page_topk, emulated in NumPy step by step, against sparse/selector.py::top_pages
(no GPU needed).

The emulation follows the kernel's plan exactly: canonical scores (NaN -> -inf, -0 -> +0), the coarse pass of
256 equal-width fp32 bins over [min, max] found by warp 0's scan from the top bin (lane l holds bins
255 - 8l .. 248 - 8l, read as two int4), the radix refinement inside the cut's bin (8 bits a pass on key - kmin
over the bits where the bin's keys differ, stopping once a bucket is taken whole), then the compaction: each
thread owns a contiguous run of ceil(tile / threads) entries, one exclusive scan of per-thread (above, ties)
counts gives every taken entry its output position. Tiles (lists longer than threads x run) carry the
counts over. Small thread counts exercise several tiles on short lists; the kernel's shape (512 x 8) runs
at the 256k-token page count.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lserve_lite.sparse.selector import top_pages

BINS = 256
F32 = np.float32


def canonical(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isnan(x), F32(-np.inf), x).astype(F32)
    return np.where(x == 0, F32(0), x).astype(F32)


def order_key(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, F32).view(np.uint32)
    return np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)


def key_float(k: int) -> F32:
    k = np.uint32(k)
    u = k & np.uint32(0x7FFFFFFF) if k & np.uint32(0x80000000) else ~k
    return np.array([u], np.uint32).view(F32)[0]


class Coarse:
    def __init__(self, lo: F32, hi: F32):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = F32(255) / F32(hi - lo)
        self.xmin, self.scale = lo, (s if (s > 0 and s < np.inf) else F32(0))

    def bin(self, x: np.ndarray) -> np.ndarray:
        if self.scale == 0:
            return np.zeros(x.shape, np.int64)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.minimum((x - self.xmin).astype(F32) * self.scale, F32(255))
        return v.astype(np.int64)  # truncation, as cvt.rzi


def find_cut(hist: np.ndarray, need: int) -> tuple[int, int, int]:
    """Warp 0's scan: (bin, entries in higher bins, entries in the bin)."""
    lanes = np.arange(32)
    c = np.stack([hist[255 - 8 * lanes - j] for j in range(8)], axis=1)  # [lane, j]: bins 255 - 8l - j
    assert np.array_equal(c[:, :4], hist.reshape(-1, 4)[(BINS - 4 - 8 * lanes) // 4][:, ::-1])  # hi4 w..x
    assert np.array_equal(c[:, 4:], hist.reshape(-1, 4)[(BINS - 8 - 8 * lanes) // 4][:, ::-1])  # lo4 w..x
    incl = np.cumsum(c.sum(axis=1))
    hits = np.nonzero(incl >= need)[0]
    lane = int(hits[0]) if hits.size else 31
    above, pick, count = int(incl[lane] - c[lane].sum()), 7, int(c[lane, 7])
    for j in range(7):
        if above + c[lane, j] >= need:
            pick, count = j, int(c[lane, j])
            break
        above += int(c[lane, j])
    return BINS - 1 - 8 * lane - pick, above, count


def refine(keys: np.ndarray, inb: np.ndarray, need: int) -> tuple[int, int, int, int, int]:
    """Radix select inside the cut's coarse bin: (kmin, thr, lo, need, passes)."""
    kmin = int(keys[inb].min())
    nk = (keys - np.uint32(kmin)).astype(np.uint32)  # wraps outside the bin, as u32 does; masked by inb
    top = (int(keys[inb].max()) - kmin).bit_length()
    thr = lo = passes = 0
    while top > 0:
        passes += 1
        shift = max(top - 8, 0)
        fixed = 0 if top >= 32 else (0xFFFFFFFF << top) & 0xFFFFFFFF
        match = inb & (((nk ^ np.uint32(thr)) & np.uint32(fixed)) == 0)
        digit = ((nk[match] >> np.uint32(shift)) & np.uint32(BINS - 1)).astype(np.int64)
        d, above, count = find_cut(np.bincount(digit, minlength=BINS), need)
        need -= above
        thr |= d << shift
        lo = top = shift
        if count == need:
            break
    return kmin, thr, lo, need, passes


def ranks(x: np.ndarray, k: int, stats: dict | None = None) -> tuple[np.ndarray, int]:
    """Threshold.rank of every candidate (2 above the cut, 1 a tie, 0 below) and the ties to take."""
    keys = order_key(x)
    cb = Coarse(key_float(keys.min()), key_float(keys.max()))
    b = cb.bin(x)
    hist0 = np.bincount(b, minlength=BINS)
    cut_bin, above, count = find_cut(hist0, k)
    need = k - above
    rank = np.where(b > cut_bin, 2, np.where(b < cut_bin, 0, 1))
    passes, whole = 0, count == need  # whole: the coarse bin is taken whole
    if not whole:
        kmin, thr, lo, need, passes = refine(keys, b == cut_bin, need)
        a = ((keys - np.uint32(kmin)).astype(np.uint32) >> np.uint32(lo)).astype(np.int64)
        t = thr >> lo
        rank = np.where(b == cut_bin, np.where(a > t, 2, np.where(a == t, 1, 0)), rank)
    if stats is not None:
        stats.update(coarse_max=int(hist0.max()), passes=passes, whole=bool(whole))
    return rank, need


def compact(rank: np.ndarray, need: int, k: int, threads: int, run: int) -> np.ndarray:
    """Tiles of threads x run entries; a thread owns a contiguous run; one exclusive scan per tile."""
    n = rank.size
    out = np.full(k, -1, np.int64)
    carry_a = carry_t = 0
    for base in range(0, n, threads * run):
        tile_n = min(n - base, threads * run)
        per = -(-tile_n // threads)
        first = base + np.arange(threads) * per
        cnt = np.clip(base + tile_n - first, 0, per)
        up = np.array([np.sum(rank[f : f + c] == 2) for f, c in zip(first, cnt, strict=True)])
        eq = np.array([np.sum(rank[f : f + c] == 1) for f, c in zip(first, cnt, strict=True)])
        ex_a = carry_a + np.cumsum(up) - up  # the one exclusive scan (a pair of counts)
        ex_t = carry_t + np.cumsum(eq) - eq
        for t in range(threads):
            a, e = int(ex_a[t]), int(ex_t[t])
            for i in range(first[t], first[t] + cnt[t]):
                pos = -1
                if rank[i] == 2:
                    pos, a = a + min(e, need), a + 1
                elif rank[i] == 1:
                    pos, e = (a + e if e < need else -1), e + 1
                if 0 <= pos < k:
                    assert out[pos] == -1, "two entries written to one position"
                    out[pos] = i
        carry_a += int(up.sum())
        carry_t += int(eq.sum())
    return out


def select(scores, k: int, threads: int = 512, run: int = 8, stats: dict | None = None) -> np.ndarray:
    """page_topk's candidates for `scores` (the list minus its newest entry), keeping k (0 < k < n)."""
    rank, need = ranks(canonical(np.asarray(scores, F32)), k, stats)
    return compact(rank, need, k, threads, run)


def _check(scores, k, **kw):
    got = select(scores, k, **kw)
    full = np.append(np.asarray(scores, F32), F32(0))  # the newest entry, always kept
    want = top_pages(full[None, :], k + 1)[0]
    assert np.array_equal(np.append(got, scores.size), want), (got, want[:-1])


def _lists(rng):
    n = 999
    heavy_ties = rng.integers(-3, 4, n).astype(F32)
    return {
        "normal": rng.standard_normal(n).astype(F32),
        "heavy_ties": heavy_ties,
        "all_equal": np.full(n, 2.5, F32),
        "signed_zeros": np.where(rng.random(n) < 0.5, F32(-0.0), F32(0.0)) + (rng.random(n) < 0.05),
        "nan_lowest": np.where(rng.random(n) < 0.3, F32(np.nan), rng.standard_normal(n).astype(F32)),
        "neg_inf": np.where(rng.random(n) < 0.5, F32(-np.inf), heavy_ties),
        "wide_range": (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(F32),
        "few_ulps": (F32(1) + np.spacing(F32(1)) * rng.integers(0, 40, n)).astype(F32),
        "outlier": np.append(F32(1e4), rng.standard_normal(n - 1).astype(F32)),
        "huge": np.append(F32(3e38), -np.full(n - 1, 3e38, F32) + rng.integers(0, 3, n - 1) * F32(1e31)),
    }


@pytest.mark.parametrize("name", list(_lists(np.random.default_rng(0))))
@pytest.mark.parametrize("shape", [(32, 4), (64, 32)], ids=["8_tiles", "resident"])
def test_page_topk_plan_matches_top_pages(name, shape):
    """Every tie rule case, in several tiles (32 threads x 4) and in one (64 x 32), for small and large k."""
    rng = np.random.default_rng(1)
    scores = _lists(rng)[name]
    threads, run = shape
    for k in (1, 2, 37, 500, scores.size - 1):
        _check(scores, k, threads=threads, run=run)


def test_page_topk_plan_at_256k_pages():
    """The kernel's shape (512 threads x 8) at the 256k-token page count (4095 candidates, keep 64): a
    normal score distribution is decided by the coarse pass and at most two refinement passes, with few
    collisions on one coarse bin (shared-memory atomics)."""
    rng = np.random.default_rng(2)
    for _ in range(3):
        scores = (rng.standard_normal(4095) * 3 + 20).astype(F32)
        st: dict = {}
        _check(scores, 63, stats=st)
        assert st["passes"] <= 2 and st["coarse_max"] < 200, st
    _check(rng.integers(0, 50, 4095).astype(F32), 63)  # ties at the cut


def test_kernel_constants_match_the_launcher():
    """page_select.cu's shape constants against cuda_attention's launcher and config.MASS_MAX_GROUP."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.cuda_compile import read_source
    from lserve_lite.config import MASS_MAX_GROUP

    src = read_source(att.SELECT_SOURCE)

    def const(name: str) -> int:
        return int(re.search(rf"constexpr int {name} = (\d+);", src).group(1))

    assert const("PS_THREADS") == att._SELECT_THREADS
    assert const("TK_THREADS") == att._TOPK_THREADS
    assert const("MASS_MAX_GROUP") == MASS_MAX_GROUP
    assert att.topk_stage_entries(1) == 0  # no candidate
    assert att.topk_stage_entries(4097) == 4096  # every list is staged with mass
    assert att.topk_stage_entries(1 << 20) == att._TOPK_STAGE_MAX
    e = att._TOPK_STAGE_MAX
    assert att.topk_stage_bytes(e) >= 4 * (e - 1 + (e - 1) // 32 + 1)  # staged_at(e - 1) fits
