"""CPU check of the wgmma prefill's quantized-tile dequantization (kernels/attention_common.cuh dequant_tile_sw128<KV,
D, ROWS, NT> with kv_quant.cuh dequant16<KV, true>, as attention_prefill_sm90.cu calls it): a NumPy emulation of what
each thread of the CTA reads from a staged tile (stage_unit's layout: per 16-row unit the values, then the fp16
scales), converts (the same bit operations: prmt, magic-number halves, f16x2 sub / mul / fma, the e4m3 hardware
conversion) and writes into the 128B-swizzled fp16 tile, with the kernel's address arithmetic (a thread's addresses
formed once from its index, then advanced by constants per step). Checked: every 16-byte chunk of the tile written
once, the addresses equal to the item -> (row, chunk) mapping's, the tile read back through the swizzle (the layout
the fp16 path's cp.async writes and the wgmma descriptors read) equal to the reference dequantization (kv/quant.py)
rounded to fp16, bit for bit, and each 8-thread phase of the 16-byte shared-memory reads and writes on 8 distinct
bank groups. Also the "qreg" variant's Q operand: the Q tile written by the kernel's cp.async mapping, read back
into each thread's A fragments, against the PTX ISA's wgmma m64nNk16 A register-fragment layout. No GPU needed."""

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


def sw128(r: int, c: int, rows: int = ROWS) -> int:  # attention_common.cuh sw128<rows>
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


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
    for fmt in {FORMATS[kind].keys(), FORMATS[kind]}:  # K (int4: finer groups) and V
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


def wgmma_a_fragment(t: int, i: int) -> tuple[int, int]:
    """PTX ISA 9.7.15.5.1 (wgmma register fragments), matrix A of .m64nNk16 with .f16: element i (0..7; register
    i // 2, the even element in its low half) of thread t of the warpgroup is at (row, column) of the 64 x 16 A."""
    warp, lane = t // 32, t % 32
    group, tig = lane // 4, lane % 4
    return 16 * warp + group + 8 * (i // 2 % 2), 2 * tig + i % 2 + 8 * (i // 4)


@pytest.mark.parametrize(("d", "nwg"), [(64, 1), (64, 2), (128, 1), (128, 2)])
def test_q_register_fragments(d, nwg):
    """attention_prefill_sm90.cu, QREG: the Q tile as the kernel's cp.async loop writes it (thread tid copies 16-byte
    chunk tid % CH of rows tid / CH + k * THREADS / CH to sw128<BM>(r, c)), then qa[kk][i] = the 32-bit word at
    sw128<BM>(wrow + g + 8 (i & 1), 2 kk + (i >> 1)) + 4 t4, against Q[64 wg + A row][16 kk + A column] of the
    PTX layout for every thread, k-step and register: warpgroup wg's 64 rows are its M of the Q K^T wgmma."""
    bm, ch, threads = 64 * nwg, d // 8, 128 * nwg
    q = np.random.default_rng(d + nwg).standard_normal((bm, d)).astype(np.float16)
    tile = np.zeros(bm * d * 2, np.uint8)
    written = np.zeros(bm * d * 2 // 16, np.int32)
    for tid in range(threads):
        for it in range(bm // (threads // ch)):
            r, c = tid // ch + it * (threads // ch), tid % ch
            o = sw128(r, c, bm)
            tile[o : o + 16] = q[r, 8 * c : 8 * c + 8].view(np.uint8)
            written[o // 16] += 1
    assert (written == 1).all(), "every chunk of the Q tile written exactly once"
    for tid in range(threads):
        warp, lane = tid // 32, tid % 32
        g, t4, wrow, wg = lane >> 2, lane & 3, warp * 16, tid // 128
        for kk in range(d // 16):
            for i in range(4):
                o = sw128(wrow + g + 8 * (i & 1), 2 * kk + (i >> 1), bm) + 4 * t4
                got = tile[o : o + 4].view(np.float16)
                for e in range(2):
                    row, col = wgmma_a_fragment(tid % 128, 2 * i + e)
                    assert got[e] == q[64 * wg + row, 16 * kk + col], (tid, kk, i, e)


class _Ring:
    """One CTA's view of the K/V ring in program order: cp.async commit groups, wait_group, the barrier that
    publishes landed tiles (each thread fences its copies to the async proxy before it), stage refills and the
    wgmma reads in flight between an issue and wgmma.wait_group 0."""

    def __init__(self, stages: int):
        self.stages, self.groups, self.landed = stages, [], 0
        self.published: set[int] = set()
        self.stage_tile: dict[int, int] = {}
        self.in_flight: list[tuple[str, int]] = []

    def load(self, t: int) -> None:
        st = t % self.stages
        assert all(x % self.stages != st for _, x in self.in_flight), (
            "refill under a wgmma",
            t,
            self.in_flight,
        )
        self.stage_tile[st] = t

    def commit(self, tiles: list[int]) -> None:
        self.groups.append(set(tiles))

    def wait_group(self, n: int) -> None:  # all but the newest n groups complete
        self.landed = max(self.landed, len(self.groups) - n)

    def barrier(self) -> None:
        self.published.update(t for g in self.groups[: self.landed] for t in g)

    def read(self, what: str, t: int) -> None:
        assert self.stage_tile.get(t % self.stages) == t and t in self.published, (what, t)

    def issue(self, what: str, t: int) -> None:
        self.read(what, t)
        self.in_flight.append((what, t))

    def wgmma_wait0(self) -> None:
        self.in_flight.clear()


def _replay_tile_loop(overlap: bool, stages: int, ntiles: int) -> None:
    """attention_prefill_sm90.cu's fp16 tile loop, step by step (ss / qreg; OVERLAP: Q K^T(j + 1) before softmax(j))."""
    ring = _Ring(stages)
    pre = stages - 1  # prologue: Q with tile 0, tiles 0 .. stages - 2, one group each (empty past the list)
    for s in range(pre):
        if s < ntiles:
            ring.load(s)
        ring.commit([s] if s < ntiles else [])
    if overlap:  # the Q fragments' wait and barrier, then tile 0's Q K^T
        ring.wait_group(pre - 1)
        ring.barrier()
        if ntiles > 0:
            ring.issue("K", 0)
        ring.wgmma_wait0()
    for j in range(ntiles):
        ring.wait_group(stages - 3 if overlap else stages - 2)
        ring.barrier()
        jn = j + stages - 1
        if jn < ntiles:
            ring.load(jn)
        ring.commit([jn] if jn < ntiles else [])
        ring.read("key positions", j)  # need_mask
        if overlap:
            if j + 1 < ntiles:
                ring.issue("K", j + 1)
        else:
            ring.issue("K", j)
            ring.wgmma_wait0()
        ring.read("key positions", j)  # the mask
        ring.issue("V", j)
        ring.wgmma_wait0()


@pytest.mark.parametrize(("overlap", "stages"), [(False, 2), (False, 3), (True, 3), (True, 4)])
def test_ring_schedule(overlap, stages):
    """The fp16 tile loop replayed for 0 .. 8 tiles: each read (K by Q K^T, V by P V, key positions by the softmax)
    finds its tile in its stage, landed and published by a barrier before the read; no stage is refilled while a
    wgmma that reads it is in flight. The overlapped order with two stages fails (the model catches it)."""
    for ntiles in range(9):
        _replay_tile_loop(overlap, stages, ntiles)
    if overlap:
        with pytest.raises(AssertionError):
            for ntiles in range(9):
                _replay_tile_loop(overlap, 2, ntiles)
