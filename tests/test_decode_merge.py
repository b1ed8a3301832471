"""CPU checks of the decode kernels' CTA merge (kernels/attention_decode.cu: MergeSmem, cta_merge, the epilogues of
decode_body and decode_body_v2) and of what the combine does with the merged partials (combine_body), no GPU:

- the math, in float64: per-warp partials (un-normalized O, running max, sum) over the kernel's warp ranges ->
  the CTA merge's formula -> one normalized partial + base-2 log-sum-exp per live CTA -> the combine's formula (or,
  with one live CTA, its merged rows as the output), against softmax attention over the visible keys; empty warps,
  ranges whose keys are all masked, lists with no visible key at all, and v2's PGAIN (O carried scaled, divided out
  in the merge);
- the index math: each lane's accumulator fragment (v1: dim n * 8 + 2 t4 + j of row g + 8 h; v2: dim
  (2 t4 + j) * D/8 + nt, the permuted PV columns) through MergeSmem::at into shared memory and back through the
  merge's float4 chunk reads gives every (row, dim) once in plain order, inside the warp's region, with no bank
  conflicts on the stores (a half warp per 64-bit store, a quarter warp per 128-bit one) or the merge's loads;
- the live splits (live_splits): the CTAs a short list uses on a grid sized for a long one, which cover it;
- the launcher: the combine's shared memory, and when the decode kernel may write the output.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

WARPS = 4  # DC_WARPS
UNIT = 16  # DC_UNIT


# ---- the formulas (mirrors of the kernel code, float64)


def live_splits(nunits: int, grid: int, min_units: int) -> int:
    """live_splits: the CTAs of a grid of `grid` splits that take part, at least min_units units a warp."""
    per_cta = WARPS * max(1, min_units)
    return max(1, min(grid, -(-nunits // per_cta)))


def warp_ranges(nunits: int, live: int) -> list[tuple[int, int]]:
    """[u0, u1) of warp ws = blockIdx.x * 4 + warp: NWR = live * 4 ranges (decode_body's u0 / u1)."""
    nwr = live * WARPS
    return [(ws * nunits // nwr, (ws + 1) * nunits // nwr) for ws in range(nwr)]


def warp_partial(s, v, vis, scale_log2, gain):
    """A warp's state after its loop over keys `vis` (boolean, its range): m_run (raw score max, -inf if no
    visible key), l (sum of exp2((s - m_use) * scale_log2)), o = gain * sum p v (un-normalized)."""
    s = np.where(vis[None, :], s, -np.inf)
    m = s.max(axis=1) if s.shape[1] else np.full(s.shape[0], -np.inf)
    m_use = np.where(m == -np.inf, 0.0, m)
    p = np.exp2((s - m_use[:, None]) * scale_log2)
    return m, p.sum(axis=1), gain * (p @ v)


def warp_store(m, lsum, scale_log2):
    """What a warp parks for the merge: m = m_run * scale_log2 if l > 0 else -inf, and l."""
    return np.where(lsum > 0, m * scale_log2, -np.inf), lsum


def cta_merge(mw, lw, ow, ogain):
    """cta_merge: mw, lw [4, H], ow [4, H, D] -> O [H, D] (normalized), lse [H] (base 2)."""
    mx = mw.max(axis=0)
    m_use = np.where(mx == -np.inf, 0.0, mx)
    a = np.exp2(mw - m_use[None])  # 0 for an empty warp
    lsum = (a * lw).sum(axis=0)
    acc = (a[:, :, None] * ow).sum(axis=0)
    inv = np.where(lsum > 0, 1.0 / np.where(lsum > 0, lsum * ogain, 1.0), 0.0)
    lse = np.where(lsum > 0, mx + np.log2(np.where(lsum > 0, lsum, 1.0)), -np.inf)
    return acc * inv[:, None], lse


CB_WARPS, CB_BATCH = 8, 8  # combine_body: CB_THREADS / 32, CB_BATCH


def combine(po, plse):
    """combine_body: po [SW, H, D], plse [SW, H] -> out [H, D]. Warp w folds splits w, w + 8, ... in batches of 8
    into a running max, weight sum and O sum; thread d then merges the 8 warps'."""
    sw = plse.shape[0]
    m_w, ws_w, acc_w = [], [], []
    for w in range(CB_WARPS):
        m_run = np.full(plse.shape[1], -np.inf)
        wsum, acc = np.zeros(plse.shape[1]), np.zeros(po.shape[1:])
        for s0 in range(w, sw, CB_WARPS * CB_BATCH):
            idx = [s for s in range(s0, s0 + CB_WARPS * CB_BATCH, CB_WARPS) if s < sw]
            mb = np.maximum(m_run, plse[idx].max(axis=0)) if idx else m_run
            m_use = np.where(mb == -np.inf, 0.0, mb)
            a = np.exp2(m_run - m_use)
            wgt = np.exp2(plse[idx] - m_use[None])
            wsum = wsum * a + wgt.sum(axis=0)
            acc = acc * a[:, None] + (wgt[:, :, None] * po[idx]).sum(axis=0)
            m_run = mb
        m_w.append(m_run), ws_w.append(wsum), acc_w.append(acc)
    m_w, ws_w, acc_w = np.array(m_w), np.array(ws_w), np.array(acc_w)
    mx = m_w.max(axis=0)
    f = np.exp2(m_w - np.where(mx == -np.inf, 0.0, mx)[None])
    a, ws = (f[:, :, None] * acc_w).sum(axis=0), (f * ws_w).sum(axis=0)
    return np.where(ws[:, None] > 0, a / np.where(ws > 0, ws, 1.0)[:, None], 0.0)


def decode(q, k, v, vis, splits, gain=1.0, min_units=1):
    """The kernel's pipeline for one (query block, KV head) on a grid of `splits`: the live CTAs' warps -> CTA
    merges -> combine over the live partials (or, one live CTA, its merged rows). Returns (out [H, D], the live
    CTAs' lse [live, H])."""
    d = q.shape[1]
    scale_log2 = math.log2(math.e) / math.sqrt(d)
    s = q @ k.T
    nunits = k.shape[0] // UNIT
    live = live_splits(nunits, splits, min_units)
    ranges = warp_ranges(nunits, live)
    po, plse = [], []
    for cta in range(live):
        mw, lw, ow = [], [], []
        for u0, u1 in ranges[cta * WARPS : (cta + 1) * WARPS]:
            sl = slice(u0 * UNIT, u1 * UNIT)
            m, lsum, o = warp_partial(s[:, sl], v[sl], vis[sl], scale_log2, gain)
            mm, ll = warp_store(m, lsum, scale_log2)
            mw.append(mm), lw.append(ll), ow.append(o)
        o, lse = cta_merge(np.array(mw), np.array(lw), np.array(ow), gain)
        po.append(o), plse.append(lse)
    po, plse = np.array(po), np.array(plse)
    return (po[0] if live == 1 else combine(po, plse)), plse


def reference(q, k, v, vis):
    """Softmax attention over the visible keys (scale 1/sqrt(D)); no visible key: 0."""
    s = (q @ k.T) / math.sqrt(q.shape[1])
    s = np.where(vis[None, :], s, -np.inf)
    if not vis.any():
        return np.zeros((q.shape[0], v.shape[1])), np.full(q.shape[0], -np.inf)
    mx = s.max(axis=1, keepdims=True)
    p = np.exp(s - mx)
    lse2 = (mx[:, 0] + np.log(p.sum(axis=1))) * math.log2(math.e)
    return (p / p.sum(axis=1, keepdims=True)) @ v, lse2


def _case(rng, nkeys, heads, d, vis):
    q = rng.standard_normal((heads, d)) * 2
    k = rng.standard_normal((nkeys, d))
    v = rng.standard_normal((nkeys, d))
    return q, k, v, vis


def _lse_total(plse):
    mx = plse.max(axis=0)
    m_use = np.where(mx == -np.inf, 0.0, mx)
    tot = np.exp2(plse - m_use[None]).sum(axis=0)
    return np.where(tot > 0, m_use + np.log2(np.where(tot > 0, tot, 1.0)), -np.inf)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    ("nunits", "splits", "mask"),
    [
        (64, 4, "none"),  # every warp busy
        (40, 3, "window"),  # uneven ranges; a sink + local window leaves whole ranges masked
        (6, 4, "none"),  # 16 warps, 6 units: empty warps
        (3, 1, "none"),  # one split (the direct-output path), one warp empty
        (1, 2, "none"),  # one unit: a single busy warp
        (12, 2, "last"),  # only the newest key is visible
        (8, 2, "all"),  # nothing visible: O = 0, lse = -inf everywhere
        (0, 2, "none"),  # an empty list
        (600, 70, "window"),  # more splits than the combine's 8 warps x 8 take in one batch
    ],
)
@pytest.mark.parametrize("gain", [1.0, 64.0])
@pytest.mark.parametrize("min_units", [1, 4])
def test_merge_then_combine_is_softmax(d, nunits, splits, mask, gain, min_units):
    rng = np.random.default_rng(nunits * 131 + splits * 7 + d)
    n = nunits * UNIT
    pos = np.arange(n)
    vis = {
        "none": np.ones(n, bool),
        "window": (pos < 16) | (pos >= n - 100),
        "last": pos == n - 1,
        "all": np.zeros(n, bool),
    }[mask]
    q, k, v, vis = _case(rng, n, 8, d, vis)
    out, plse = decode(q, k, v, vis, splits, gain, min_units)
    ref, ref_lse = reference(q, k, v, vis)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_lse_total(plse), ref_lse, rtol=1e-12)
    if mask == "all" or nunits == 0:
        assert (out == 0).all() and (plse == -np.inf).all()


def test_live_splits_cover_the_list_and_leave_no_cta_empty():
    """Every unit of a list falls in exactly one live warp range; live <= the grid, every live warp but where the
    list is shorter than the grid's warps has min_units units at least, and no live CTA is empty but the one of an
    empty list (the CTAs past `live` exit without writing: the combine reads `live` partials only)."""
    for nunits in [0, 1, 3, 5, 16, 17, 63, 64, 65, 300, 8192]:
        for grid in [1, 2, 3, 16, 40, 132]:
            for min_units in [1, 2, 4, 8]:
                live = live_splits(nunits, grid, min_units)
                assert 1 <= live <= grid
                ranges = warp_ranges(nunits, live)
                covered = [u for u0, u1 in ranges for u in range(u0, u1)]
                assert covered == list(range(nunits))
                if live > 1:
                    assert nunits >= (live - 1) * WARPS * min_units
                for c in range(live):
                    cta = ranges[c * WARPS : (c + 1) * WARPS]
                    assert nunits == 0 or any(u1 > u0 for u0, u1 in cta)


def test_empty_warps_have_weight_zero():
    """Warps with empty ranges (more warps than units) enter the merge with m = -inf and weight 0; a CTA of an empty
    list writes O = 0, lse = -inf."""
    rng = np.random.default_rng(5)
    d, n = 64, 2 * UNIT
    q, k, v, vis = _case(rng, n, 4, d, np.ones(n, bool))
    out, plse = decode(q, k, v, vis, 4)
    assert plse.shape[0] == 1  # two units: one live CTA, two of its warps empty
    np.testing.assert_allclose(out, reference(q, k, v, vis)[0], rtol=1e-10, atol=1e-12)
    mw = np.full((WARPS, 4), -np.inf)
    o, lse = cta_merge(mw, np.zeros((WARPS, 4)), np.zeros((WARPS, 4, d)), 1.0)
    assert (o == 0).all() and (lse == -np.inf).all()


# ---- the index math: MergeSmem and the fragment layouts


def merge_at(r, dim, d, v2):
    """MergeSmem<D, V2>::at (float offset in a warp's region)."""
    rs = d + (16 if v2 and d == 128 else 8)
    q = dim >> 2
    c = q ^ ((q >> 3) & 3) if v2 else q
    return r * rs + 4 * c + (dim & 3)


def merge_bytes(d, v2):
    rs = d + (16 if v2 and d == 128 else 8)
    return (16 * rs + 32) * 4


def test_merge_layout_mirrors_the_kernel():
    """The formulas above are the kernel's (a drift guard)."""
    from lserve_lite.backends.cuda_compile import read_source

    src = read_source("attention_decode.cu")
    assert "static constexpr int RS = D + (V2 && D == 128 ? 16 : 8);" in src
    assert "return V2 ? q ^ ((q >> 3) & 3) : q;" in src
    assert "return r * RS + 4 * chunk(d >> 2) + (d & 3);" in src
    assert "static constexpr int M_OFF = 16 * RS, L_OFF = M_OFF + 16;" in src
    assert re.search(r"cta_merge<D, false>\(.*L::WARP_BYTES / 4, nh, 1\.f,", src)
    assert re.search(r"cta_merge<D, true>\(.*WARP_BYTES / 4, nh,\s+F::PGAIN,", src)


def _stores(d, v2):
    """Per store instruction of the epilogue: [(lane, row, dim of the first float, floats)] for h = 0 and 1."""
    nt = d // 8
    insts = []
    for h in range(2):
        if v2:
            for j in range(2):
                for i in range(nt // 4):
                    insts.append(
                        [(ln, ln // 4 + 8 * h, (2 * (ln % 4) + j) * nt + 4 * i, 4) for ln in range(32)]
                    )
        else:
            for n in range(nt):
                insts.append([(ln, ln // 4 + 8 * h, n * 8 + 2 * (ln % 4), 2) for ln in range(32)])
    return insts


def _fragment_dims(d, v2, lane, idx):
    """v2 accumulator o[nt][2 h + j] of lane (g, t4) holds dim (2 t4 + j) * D/8 + nt; v1 o[n][2 h + j] dim
    n * 8 + 2 t4 + j (the row is g + 8 h either way)."""
    t4 = lane % 4
    nt_or_n, j = idx
    return (2 * t4 + j) * (d // 8) + nt_or_n if v2 else nt_or_n * 8 + 2 * t4 + j


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("v2", [False, True])
def test_merge_layout_round_trip_and_banks(d, v2):
    region = np.full(merge_bytes(d, v2) // 4, -1.0)
    # every lane's fragment values (value = row * 1000 + dim) stored as the epilogue does
    for inst in _stores(d, v2):
        for _lane, r, dim, nf in inst:
            for e in range(nf):
                off = merge_at(r, dim + e, d, v2)
                assert merge_at(r, dim, d, v2) + e == off  # a vector store covers consecutive floats
                assert region[off] == -1.0, "two values, one place"
                region[off] = r * 1000 + dim + e
        # bank conflicts: a half warp (64-bit) or quarter warp (128-bit) touches distinct banks
        per = 16 if inst[0][3] == 2 else 8
        for p0 in range(0, 32, per):
            banks = [
                (merge_at(r, dim, d, v2) + e) % 32 for _, r, dim, nf in inst[p0 : p0 + per] for e in range(nf)
            ]
            assert len(set(banks)) == len(banks), (d, v2, p0)
    # each lane's values are the dims its fragments hold (v2: the permuted PV columns)
    for lane in range(32):
        g = lane // 4
        for h in range(2):
            for a in range(d // 8):
                for j in range(2):
                    dim = _fragment_dims(d, v2, lane, (a, j))
                    assert region[merge_at(g + 8 * h, dim, d, v2)] == (g + 8 * h) * 1000 + dim
    # the merge's float4 reads: thread i -> row i // (D/4), chunk i % (D/4) gives dims 4q .. 4q + 3 in order
    qn = d // 4
    for i in range(16 * qn):
        r, q = divmod(i, qn)
        base = merge_at(r, 4 * q, d, v2)
        assert base % 4 == 0
        assert list(region[base : base + 4]) == [r * 1000 + 4 * q + e for e in range(4)]
    for t0 in range(0, 16 * qn, 8):  # a quarter warp of 128-bit loads: 8 distinct 16-byte bank groups
        groups = [(merge_at(i // qn, 4 * (i % qn), d, v2) // 4) % 8 for i in range(t0, t0 + 8)]
        assert len(set(groups)) == 8
    assert merge_bytes(d, v2) <= region.size * 4


def test_merge_fits_every_warp_region():
    """Each warp's ring region holds its merge rows (the kernels static_assert the same): launcher sizes."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.kv.quant import FORMATS

    for d, st in att.DECODE_STAGES.items():
        for kv in att.KV_TRAITS:
            unit, raw = 16 * d * 2, 16 * FORMATS[kv].row_bytes(d, 2)
            warp_bytes = st * 2 * raw + (0 if kv == "fp16" else 2 * unit)
            assert warp_bytes >= merge_bytes(d, False), (d, kv)
            if kv != "fp16":
                v2 = att._decode_v2_smem(d, att.DECODE_V2_STAGES[kv], kv) // WARPS
                assert v2 >= merge_bytes(d, True), (d, kv)


# ---- the launcher


class _Out:
    def __init__(self, contiguous=True, ptr=1 << 20):
        self.flags = type("F", (), {"c_contiguous": contiguous})()
        self.data = type("P", (), {"ptr": ptr})()


def test_launcher_partials_and_direct_output():
    from lserve_lite.backends import cuda_attention as att

    # per warp: D sums, a max, a weight sum; the same for any split count
    assert att.combine_smem(128) == (8 * 128 + 2 * 8) * 4
    assert att.decode_can_write_output(_Out())
    assert not att.decode_can_write_output(_Out(contiguous=False))
    assert not att.decode_can_write_output(_Out(ptr=(1 << 20) + 2))


def test_decode_grid_is_capped(monkeypatch):
    """decode_splits fills the GPU once, at most DECODE_MAX_SPLITS CTAs per (query block, KV head, head tile), and
    caps short selected lists at about 4 units a warp."""
    from types import SimpleNamespace

    from lserve_lite.backends import cuda_attention as att

    monkeypatch.setattr(att, "_kernels", lambda: SimpleNamespace(num_sms=132, smem_per_sm=228 * 1024))
    plan = SimpleNamespace(max_qblocks=1, fixed_visit_pages=None, visit_pages=None, page_size=64)
    smol = att.decode_splits(plan, 3, 1, 64, per_sm=3)  # SmolLM2: 396 // 3, capped
    assert smol == att.DECODE_MAX_SPLITS == 64
    assert att.decode_splits(plan, 8, 1, 128, per_sm=1) == 16  # Llama-3-8B: 132 // 8
    plan.max_qblocks = 64
    assert att.decode_splits(plan, 8, 1, 128, per_sm=1) == 1
    plan.max_qblocks, plan.fixed_visit_pages = 1, 4  # 16 units: one CTA of 4 warps
    assert att.decode_splits(plan, 3, 1, 64, per_sm=3) == 1


def test_live_split_rule_matches_the_kernel():
    """The emulation's live_splits is the kernel's rule (its source text), and the kernel writes the combine's count."""
    from lserve_lite.backends.cuda_compile import read_source

    src = read_source("attention_decode.cu")
    assert "const int per_cta = DC_WARPS * max(1, min_units);" in src
    assert "return max(1, min((int)gridDim.x, (nunits + per_cta - 1) / per_cta));" in src
    assert src.count("if (blockIdx.x >= live) return;") == 2  # decode_body and decode_body_v2
    assert src.count("const int NWR = live * DC_WARPS") == 2
    # idle CTAs of whole lists leave before pdl_enter, by the same rule (both entry macros)
    assert src.count("return blockIdx.x >= live_splits(npages << (ps_shift - 4), min_units);") == 1
    idle = "if (lsattn::idle_before_wait(pv, head_class, sel_idx, ps_shift, n_htiles, min_units)) return;"
    assert src.count(idle) == 2
    for part in src.split(idle)[1:]:
        assert part.index("lserve::pdl_enter();") < part.index("decode_body")


def test_combine_layout_matches_the_kernel():
    """combine_body's shared memory: the float4 sums first (16-byte aligned at any D % 4 == 0), then the warps'
    maxima and weight sums; the kernel's batch and warp counts are the ones the emulation above uses."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.cuda_compile import read_source

    src = read_source("attention_decode.cu")
    assert "float* m_s = acc_s + NW * D;" in src
    assert f"constexpr int CB_THREADS = {CB_WARPS * 32}, CB_BATCH = {CB_BATCH};" in src
    assert att._COMBINE_THREADS == CB_WARPS * 32
