"""CPU check of the wgmma prefill's quantized-tile dequantization (kernels/attention_common.cuh dequant_tile_sw128<KV,
D, ROWS, NT> with kv_quant.cuh dequant16<KV, true>, as attention_prefill_sm90.cu calls it): a NumPy emulation of what
each thread of the CTA reads from a staged tile (stage_unit's layout: per 16-row unit the values, then the fp16
scales), converts (the same bit operations: prmt, magic-number halves, f16x2 sub / mul / fma, the e4m3 hardware
conversion) and writes into the 128B-swizzled fp16 tile, with the kernel's address arithmetic (a thread's addresses
formed once from its index, then advanced by constants per step). Checked: every 16-byte chunk of the tile written
once, the addresses equal to the item -> (row, chunk) mapping's, the tile read back through the swizzle (the layout
the fp16 path's cp.async writes and the wgmma descriptors read) equal to the reference dequantization (kv/quant.py)
rounded to fp16, bit for bit, and each 8-thread phase of the 16-byte shared-memory reads and writes on 8 distinct
bank groups. No GPU needed."""

from __future__ import annotations

import numpy as np
import pytest
from test_kvq_decode_v2_layout import e4m3_hw, hfma2, hsub2, join, prmt, split

from lserve_lite.kv.quant import FORMATS, dequantize, quantize

ROWS = 64  # BN: keys per tile


def hmul2(a, b):  # mul.rn.f16x2: the exact product, rounded once to fp16
    (a0, a1), (b0, b1) = split(a), split(b)
    return join(np.float16(a0 * b0), np.float16(a1 * b1))


def bytes_h2(x, sel, bias2):  # kv_quant.cuh bytes_h2
    return hsub2(prmt(x, 0x64646464, sel), bias2)


def dequant16_h2(kind: str, group: int, words: list[int], sc: list[int]) -> list[int]:
    """dequant16<KV, true>: a 16-byte chunk (4 words) -> fp16 words (channel 2i in the low half of h[i]);
    sc: the fp16 scale entries from the chunk's first group on (bits)."""
    h = []
    if kind == "int4":
        for i, w in enumerate(words):  # word i: channels 8i .. 8i + 7
            g = 8 * i // group
            s2, m2 = sc[2 * g] * 0x10001, sc[2 * g + 1] * 0x10001
            lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
            a, b = prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)
            h += [hfma2(bytes_h2(x, sel, 0x64006400), s2, m2) for x in (a, b) for sel in (0x4140, 0x4342)]
    else:
        s2 = sc[0] * 0x10001
        for w in words:
            if kind == "fp8":
                h += [hmul2(e4m3_hw(w & 0xFFFF), s2), hmul2(e4m3_hw(w >> 16), s2)]
            else:
                x = w ^ 0x80808080
                h += [hmul2(bytes_h2(x, sel, 0x64806480), s2) for sel in (0x4140, 0x4342)]
    return h


def sw128(r: int, c: int) -> int:  # attention_common.cuh sw128<ROWS>
    return (c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


def staged(vals: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """A tile as stage_unit copies it: per unit of 16 rows, [16][row bytes] values then [16][scales] fp16."""
    v = np.frombuffer(np.ascontiguousarray(vals).tobytes(), np.uint8).reshape(ROWS, -1)
    s = np.frombuffer(scales.astype(np.float16).tobytes(), np.uint8).reshape(ROWS, -1)
    return np.concatenate(
        [np.concatenate([v[u : u + 16].ravel(), s[u : u + 16].ravel()]) for u in range(0, ROWS, 16)]
    )


def emulate(kind: str, fmt, d: int, raw: np.ndarray, nt: int):
    """dequant_tile_sw128<KV, d, ROWS, nt>: the fp16 tile, the write count per 16-byte chunk, and the (read, write)
    byte addresses of each 8-thread phase of each loop step."""
    rb = d * (4 if kind == "int4" else 8) // 8  # Row::BYTES
    chunks, out_chunks = rb // 16, 128 // (4 if kind == "int4" else 8) // 8
    group = fmt.group(d) if fmt.asymmetric else d
    n_sc = fmt.scale_cols(d)
    unit = 16 * (rb + 2 * n_sc)
    items, rstep = ROWS * chunks, nt // chunks
    assert nt % 8 == 0 and nt % chunks == 0 and rstep % 16 == 0 and (items % nt == 0 or items < nt)
    tile = np.zeros(ROWS * d * 2, np.uint8)
    writes = np.zeros(ROWS * d * 2 // 16, np.int32)
    phases: dict = {}
    for t in range(min(nt, items)):  # threads t >= items (int4 at d 64 with two warpgroups) return at once
        c = t % chunks
        r0 = (t // chunks) ^ ((c * out_chunks >> 3) * (8 // chunks))  # the row of step 0
        vals = (r0 >> 4) * unit + (r0 & 15) * rb + c * 16
        group0 = 0 if group == d else c * (128 // 4 // group)  # int4: the chunk's first group
        sc_at = (r0 >> 4) * unit + 16 * rb + 2 * ((r0 & 15) * n_sc + group0 * (2 if fmt.asymmetric else 1))
        for step in range(-(-items // nt)):
            src_off, dst_off = step * (rstep // 16) * unit, step * rstep * 128
            # the item -> (row, chunk) mapping the constant steps must reproduce
            i = t + step * nt
            r = (i // chunks) ^ ((c * out_chunks >> 3) * (8 // chunks))
            assert i % chunks == c and r == r0 + step * rstep and r < ROWS
            src = vals + src_off
            assert src == (r >> 4) * unit + (r & 15) * rb + c * 16
            words = [int(x) for x in raw[src : src + 16].view(np.uint32)]
            sc = [int(x) for x in raw[sc_at + src_off : sc_at + src_off + 8].view(np.uint16)]
            h = dequant16_h2(kind, group, words, sc)
            dst = []
            for k in range(out_chunks):
                o = sw128(r0, c * out_chunks + k) + dst_off
                assert o == sw128(r, c * out_chunks + k)
                tile[o : o + 16] = np.array(h[4 * k : 4 * k + 4], np.uint32).view(np.uint8)
                writes[o // 16] += 1
                dst.append(o)
            phases.setdefault((step, t // 8), []).append((src, dst))
    return tile, writes, phases


@pytest.mark.parametrize(
    (
        "kind",
        "d",
        "nt",
    ),  # nt: two warpgroups per CTA, and one (the same mapping, fewer threads) for two cases
    [(k, d, 256) for k in ("int8", "int4", "fp8") for d in (64, 128)]
    + [("int8", 128, 128), ("int4", 64, 128)],
)
def test_dequant_tile_sw128(kind, d, nt):
    rng = np.random.default_rng(d + nt)
    fmt = FORMATS[kind]  # K's and V's
    x = (rng.standard_normal((ROWS, d)) * 2 + rng.uniform(-3, 3, d)).astype(np.float16).astype(np.float32)
    vals, scales = quantize(x[None, None], fmt, np.float16)
    vals, scales = vals[0, 0], scales[0, 0]
    tile, writes, phases = emulate(kind, fmt, d, staged(vals, scales), nt)
    assert (writes == 1).all(), "every chunk of the fp16 tile written exactly once"
    got = np.array(
        [
            [tile[sw128(r, k // 8) + 2 * (k % 8) :][:2].view(np.float16)[0] for k in range(d)]
            for r in range(ROWS)
        ]
    )
    want = dequantize(vals, scales, fmt).astype(np.float16)
    np.testing.assert_array_equal(got, want)
    for key, acc in phases.items():
        assert len(acc) == 8, key
        assert len({(src // 16) % 8 for src, _ in acc}) == 8, ("read bank conflict", fmt.group_size, key)
        for k in range(len(acc[0][1])):
            assert len({(dst[k] // 16) % 8 for _, dst in acc}) == 8, ("write bank conflict", key, k)


# ---- fp16 path of attention_prefill_sm90.cu: the K/V tile copies (load_kv), the key positions, the Q tile copy and
# the output staging, emulated per thread as the kernel forms them. The copies' page-list entries were read by every
# thread for every copy row (kv_pl[lo + e], 4-byte-per-thread use of a broadcast sector, right after the barrier);
# they are now fetched once per warp and tile by lanes 0 .. 3 (one 16-row group each: pages are >= 16 tokens),
# one tile ahead, and handed to the copying threads by shuffles; the key positions are written by threads 0 .. 63
# (one row each) instead of 2 lanes of every warp per copy row. The shared-memory destinations are unchanged.
KPOS_NONE = 0x7FFFFFFF


def sw128_rows(r: int, c: int, rows: int) -> int:  # attention_common.cuh sw128<rows>
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


def swz(r: int, c: int, chunks: int) -> int:  # attention_common.cuh swz<chunks>
    return (r * chunks + (c ^ (r & 7))) * 16


def wavefronts(addrs: list[int], width: int) -> int:
    """Shared-memory wavefronts of one warp-wide access of `width` bytes per lane (active lanes' byte addresses):
    4-byte accesses, one wavefront per distinct word sharing the busiest bank (same-word lanes are merged);
    16-byte accesses, per 8-lane phase the same count over the 8 bank groups of 16 bytes."""
    if not addrs:
        return 0
    if width == 4:
        per_bank: dict = {}
        for a in addrs:
            per_bank.setdefault((a >> 2) % 32, set()).add(a >> 2)
        return max(len(v) for v in per_bank.values())
    assert width == 16 and len(addrs) == 32
    total = 0
    for p in range(4):
        per_group: dict = {}
        for a in addrs[8 * p : 8 * p + 8]:
            per_group.setdefault((a >> 4) % 8, set()).add(a >> 4)
        total += max(len(v) for v in per_group.values())
    return total


def emulate_load_kv(
    new: bool, d: int, nwg: int, ps: int, nkeys: int, j: int, pl: list, pool_heads: int, slot: int
):
    """One call of load_kv(j, st = 0) of the fp16 path. Returns {dst byte: (src element or None, ok, src)}, the key
    positions written {row: value}, the copies' warp instructions (lists of 32 dst byte addresses) and the key-position
    stores (lists of active lanes' byte offsets), and the page-list loads (lists of the active lanes' entry indices)."""
    threads, ch, bn = 128 * nwg, d // 8, 64
    rpp = threads // ch
    shift = ps.bit_length() - 1
    copies, kpos, copy_insts, kpos_insts, pl_loads = {}, {}, [], [], []
    grp = {}  # (warp, lane) -> fetch_groups(j)
    if new:
        page_rows = pool_heads << shift
        for w in range(threads // 32):
            idx = []
            for lane in range(32):
                gq = j * bn + 16 * lane
                off = gq & (ps - 1)
                x, y = (0, 0)
                if lane < bn // 16 and gq < nkeys:
                    x, y = pl[gq >> shift]
                    idx.append(gq >> shift)
                grp[w, lane] = ((x * page_rows + off) % 2**32, (y << shift) + off)
            pl_loads.append(idx)
    for it in range(bn // rpp):
        for w in range(threads // 32):
            inst, kinst, ld = [], [], []
            for lane in range(32):
                tid = 32 * w + lane
                c_ld, r_ld = tid % ch, tid // ch
                r = r_ld + it * rpp
                g = j * bn + r
                ok = g < nkeys
                if new:
                    prow = grp[w, r >> 4][0] + (r & 15)
                    base = (slot * ps + prow) * d + c_ld * 8  # kc_h = kc + slot * ps * D
                else:
                    e, off = g >> shift, g & (ps - 1)
                    x, y = pl[e] if ok else (0, 0)
                    if ok:
                        ld.append(e)
                    base = ((x * pool_heads + slot) * ps + off) * d + c_ld * 8
                    if c_ld == 0:
                        kpos[r] = (y << shift) + off if ok else KPOS_NONE
                        kinst.append(4 * r)
                dst = sw128_rows(r, c_ld, bn)
                assert dst not in copies
                copies[dst] = (base if ok else None, ok, base)
                inst.append(dst)
            copy_insts.append(inst)
            if not new:
                kpos_insts.append(kinst)
                pl_loads.append(ld)
    if new:
        for w in range(threads // 32):
            kinst = []
            for lane in range(32):
                tid = 32 * w + lane
                kp0 = grp[w, (tid >> 4) & (bn // 16 - 1)][1]
                if tid < bn:
                    kpos[tid] = kp0 + (tid & 15) if j * bn + tid < nkeys else KPOS_NONE
                    kinst.append(4 * tid)
            if kinst:
                kpos_insts.append(kinst)
    return copies, kpos, copy_insts, kpos_insts, pl_loads


@pytest.mark.parametrize(("d", "nwg"), [(64, 1), (64, 2), (128, 1), (128, 2)])
@pytest.mark.parametrize("ps", [16, 32, 64, 128, 1024])
def test_fp16_load_kv_same_tile_fewer_requests(d, nwg, ps):
    rng = np.random.default_rng(d * nwg + ps)
    pool_heads, slot, bn = 3, 2, 64
    for npages in (1, 3, 7):
        nkeys = npages * ps
        pool_pages = npages + 5
        pl = np.stack(
            [rng.permutation(pool_pages)[:npages], np.sort(rng.choice(50, npages, replace=False))], 1
        )
        pl = [(int(a), int(b)) for a, b in pl]
        for j in range((nkeys + bn - 1) // bn):
            old = emulate_load_kv(False, d, nwg, ps, nkeys, j, pl, pool_heads, slot)
            new = emulate_load_kv(True, d, nwg, ps, nkeys, j, pl, pool_heads, slot)
            # (a) every 16-byte chunk of the K (and V: the same offsets) tile written once, from the same source
            assert sorted(old[0]) == sorted(new[0]) == [16 * i for i in range(bn * d * 2 // 16)]
            for dst, (src, ok, _base) in old[0].items():
                nsrc, nok, nbase = new[0][dst]
                assert (src, ok) == (nsrc, nok), (j, dst)
                assert 0 <= nbase < pool_pages * pool_heads * ps * d, "zero-fill copies read in bounds"
            assert old[1] == new[1] and sorted(new[1]) == list(range(bn)), "key positions"
            # (b) the copies: conflict-free 16-byte phases (4 wavefronts a warp instruction), before and after
            for insts in (old[2], new[2]):
                assert all(wavefronts(a, 16) == 4 for a in insts)
            # key-position stores: one wavefront each; 8 warps x copy rows before, 2 full warps after (d128 w2: 32 -> 2)
            assert all(wavefronts(a, 4) == 1 for a in old[3] + new[3])
            assert len(old[3]) == 4 * nwg * (bn // (128 * nwg // (d // 8)))
            assert len(new[3]) == 2 and all(len(a) == 32 for a in new[3])
            # page-list loads: before, one warp instruction per warp and copy row (all lanes on one entry); after, one
            # per warp and tile, its lanes on the tile's <= 4 consecutive entries (<= 32 bytes)
            assert all(len(set(a)) == 1 for a in old[4] if a)
            assert len(new[4]) == 4 * nwg and all(
                len(set(a)) <= 4 and max(a) - min(a) <= 3 for a in new[4] if a
            )


@pytest.mark.parametrize(("d", "nwg"), [(64, 1), (64, 2), (128, 1), (128, 2)])
def test_fp16_q_copy_and_output_staging_conflict_free(d, nwg):
    """The other shared stores of the fp16 path: the Q tile's cp.async copies (sw128<BM>) and the output staging
    (pack_half2 words into swz<D / 8> rows, then LDS.128 read-back): one wavefront per 4-byte warp store, four per
    16-byte one, i.e. no bank conflicts."""
    threads, ch = 128 * nwg, d // 8
    bm, rpp = 64 * nwg, threads // ch
    for it in range(bm // rpp):
        for w in range(threads // 32):
            dst = [sw128_rows((32 * w + ln) // ch + it * rpp, (32 * w + ln) % ch, bm) for ln in range(32)]
            assert wavefronts(dst, 16) == 4
    for w in range(threads // 32):
        for h in range(2):
            for n in range(d // 8):
                a = [swz(16 * w + ln // 4 + 8 * h, n, ch) + (ln % 4) * 4 for ln in range(32)]
                assert wavefronts(a, 4) == 1
        for it in range(16 * ch // 32):
            a = [swz(16 * w + (ln + 32 * it) // ch, (ln + 32 * it) % ch, ch) for ln in range(32)]
            assert wavefronts(a, 16) == 4
