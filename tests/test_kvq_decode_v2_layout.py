"""CPU check of the quantized decode v2's index math (kernels/attention_decode.cu, decode_body_v2): a NumPy
emulation of what each of the 32 lanes loads from the swizzled shared-memory unit and converts (the same bit
operations: prmt, magic-number halves, f16x2 sub / fma, e4m3 hardware and software conversions), assembled
into the mma.sync m16n8k16 fragments by the PTX layouts, against Q K^T and P V over the reference
dequantization (kv/quant.py). No GPU needed; the GPU rows are in tests/test_gpu_kv_quant.py."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.kv.quant import FORMATS, dequantize, e4m3_decode, quantize


def prmt(a, b, sel):
    src = [(int(a) >> (8 * i)) & 255 for i in range(4)] + [(int(b) >> (8 * i)) & 255 for i in range(4)]
    d = 0
    for i in range(4):
        d |= src[(sel >> (4 * i)) & 7] << (8 * i)
    return d


def h(x):  # half bits -> float
    return float(np.array([x & 0xFFFF], np.uint16).view(np.float16)[0])


def hb(f):
    return int(np.array([f], np.float16).view(np.uint16)[0])


def split(x):
    return h(x & 0xFFFF), h(x >> 16)


def join(lo, hi):
    return hb(lo) | (hb(hi) << 16)


def hsub2(a, b):
    (a0, a1), (b0, b1) = split(a), split(b)
    return join(np.float16(a0 - b0), np.float16(a1 - b1))


def hfma2(a, b, c):  # fma.rn.f16x2: the exact a * b + c, rounded once to fp16
    (a0, a1), (b0, b1), (c0, c1) = split(a), split(b), split(c)
    return join(np.float16(a0 * b0 + c0), np.float16(a1 * b1 + c1))


def nib2(x, s2, m2):  # nib2_v2: nibbles at bits 0 and 16 -> q * scale + min
    return hfma2(hsub2((x & 0x000F000F) | 0x64006400, 0x64006400), s2, m2)


def e4m3_hw(x):
    lo, hi = x & 255, (x >> 8) & 255
    return join(e4m3_decode(np.array([lo], np.uint8))[0], e4m3_decode(np.array([hi], np.uint8))[0])


def e4m3_sw(x):
    y = prmt(x, 0, 0x1404)
    return ((y >> 1) & 0x3F803F80) | (y & 0x80008000)


def swz(i):
    return (i ^ ((i >> 3) & 7)) << 4


def run(kvname, D, sw_fp8, rng):  # noqa: N803
    fmt = FORMATS[kvname]
    BITS = 4 if kvname == "int4" else 8
    Q4 = BITS == 4
    RB = D * BITS // 8
    kfmt = fmt.keys()
    SCALES = 2 * D // fmt.group(D) if Q4 else 1  # Row::SCALES of V: a (scale, min) pair per group for int4
    KSCALES = 2 * D // kfmt.group(D) if Q4 else 1  # and of K (int4: finer groups)
    KG = D // 4 // kfmt.group(D) if Q4 else 1  # FragV2::KG: key groups of a lane's D/4 channels
    KB, VB = D // 4 * BITS // 8, D // 8 * BITS // 8
    NT = D // 8
    UNITS = 256.0 if (kvname == "fp8" and sw_fp8) else 1.0
    PGAIN = 1.0 if (kvname == "int4" or UNITS != 1.0) else 64.0  # FragV2::PGAIN
    conv = e4m3_sw if sw_fp8 else e4m3_hw
    kf = (rng.standard_normal((16, D)) + rng.uniform(-3, 3, D)).astype(np.float16)  # channel offsets, as keys
    vf = rng.standard_normal((16, D)).astype(np.float16) * 3
    kq, ks = quantize(kf.astype(np.float32)[None, None], kfmt, np.float16)
    vq, vs = quantize(vf.astype(np.float32)[None, None], fmt, np.float16)
    kd = dequantize(kq, ks, kfmt)[0, 0]
    vd = dequantize(vq, vs, fmt)[0, 0]
    kq, ks, vq, vs = kq[0, 0], ks[0, 0], vq[0, 0], vs[0, 0]

    def smem_unit(vals, sc, scales):
        raw = np.frombuffer(np.ascontiguousarray(vals).tobytes(), np.uint8)
        assert raw.size == 16 * RB and sc.shape[-1] == scales
        buf = np.zeros(16 * RB + 16 * scales * 2, np.uint8)
        for i in range(raw.size // 16):
            buf[swz(i) : swz(i) + 16] = raw[i * 16 : (i + 1) * 16]
        buf[16 * RB :] = np.frombuffer(sc.astype(np.float16).tobytes(), np.uint8)
        return buf

    kbuf, vbuf = smem_unit(kq, ks, KSCALES), smem_unit(vq, vs, SCALES)

    def words(buf, r, b, nb):
        i = r * (RB // 16) + (b >> 4)
        out = []
        if nb >= 16:
            for c in range(nb // 16):
                o = swz(i + c)
                out += list(buf[o : o + 16].view(np.uint32))
        else:
            o = swz(i) + (b & 15)
            out = list(buf[o : o + nb].view(np.uint32))
        return [int(x) for x in out]

    def sc_half(buf, idx):
        o = 16 * RB + 2 * idx
        return int(buf[o : o + 2].view(np.uint16)[0])

    def sc_word(buf, idx):  # the u32 load of halves idx, idx + 1
        return sc_half(buf, idx) | (sc_half(buf, idx + 1) << 16)

    def kchan(kk, j):
        t, hi, lo = (j & 7) >> 1, j >> 3, j & 1
        return t * (D // 4) + (8 * (kk >> 1) + 2 * (kk & 1) + hi + 4 * lo if Q4 else 4 * kk + 2 * hi + lo)

    # permutation is a bijection per kk-step set
    chans = sorted(kchan(kk, j) for kk in range(D // 16) for j in range(16))
    assert chans == list(range(D)), "kchan not a bijection"
    q = rng.standard_normal((16, D)).astype(np.float16)
    # S via fragments
    S = np.zeros((16, 16))
    for kk in range(D // 16):
        A = np.zeros((16, 16))
        B = np.zeros((16, 16))  # B[j][key]
        for lane in range(32):
            g, t4 = lane >> 2, lane & 3
            for r in range(4):
                j = 2 * t4 + 8 * (r >> 1)
                row = g + 8 * (r & 1)
                A[row, j] = q[row, kchan(kk, j)]
                A[row, j + 1] = q[row, kchan(kk, j + 1)]
            for n in range(2):
                key = g + 8 * n
                w = words(kbuf, key, t4 * KB, KB)
                if Q4:
                    j = 8 * (kk >> 1) * KG // (D // 4)  # the lane's key group of this k-step
                    sm = sc_word(kbuf, key * KSCALES + 2 * (t4 * KG + j))
                    s2, m2 = prmt(sm, 0, 0x1010), prmt(sm, 0, 0x3232)
                    x = w[kk >> 1] >> (8 * (kk & 1))
                    b0, b1 = nib2(x, s2, m2), nib2(x >> 4, s2, m2)
                elif kvname == "int8":
                    x = w[kk] ^ 0x80808080
                    b0 = hsub2(prmt(x, 0x64646464, 0x4140), 0x64806480)
                    b1 = hsub2(prmt(x, 0x64646464, 0x4342), 0x64806480)
                else:
                    b0, b1 = conv(w[kk] & 0xFFFF), conv(w[kk] >> 16)
                B[2 * t4, key], B[2 * t4 + 1, key] = split(b0)
                B[2 * t4 + 8, key], B[2 * t4 + 9, key] = split(b1)
        S += A @ B
    # per-token K scale applied to the score
    if not Q4:
        for key in range(16):
            S[:, key] *= h(sc_half(kbuf, key)) * UNITS
    S_ref = q.astype(np.float64) @ kd.T
    errS = np.abs(S - S_ref).max() / np.abs(S_ref).max()
    # P and O
    P = np.exp((S_ref - S_ref.max(1, keepdims=True)) / 4)
    Pd = P.copy()
    if not Q4:
        for key in range(16):
            Pd[:, key] = P[:, key] * h(sc_half(vbuf, key)) * (UNITS * PGAIN)
    Pd = Pd.astype(np.float16).astype(np.float64)
    out_o = np.zeros((16, D))
    for w_ in range(VB // 4):
        PER = 8 if Q4 else 4
        Bs = [np.zeros((16, 8)) for _ in range(PER)]
        for lane in range(32):
            g, t4 = lane >> 2, lane & 3
            vw = [words(vbuf, 2 * t4 + (r & 1) + 8 * (r >> 1), g * VB, VB) for r in range(4)]
            vs2, vm2 = [0, 0], [0, 0]
            if Q4:
                gv = 2 * (g * (D // 8) // fmt.group(D))
                for hh in range(2):
                    k0 = 2 * t4 + 8 * hh
                    a, b = sc_word(vbuf, k0 * SCALES + gv), sc_word(vbuf, (k0 + 1) * SCALES + gv)
                    vs2[hh], vm2[hh] = prmt(a, b, 0x5410), prmt(a, b, 0x7632)
            for half, (ra, rb) in enumerate(((0, 1), (2, 3))):
                a, b = vw[ra][w_], vw[rb][w_]
                out = []
                if Q4:
                    for i in range(4):
                        y = prmt(a, b, i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12))
                        out += [nib2(y, vs2[half], vm2[half]), nib2(y >> 4, vs2[half], vm2[half])]
                else:
                    x0, x1 = prmt(a, b, 0x5140), prmt(a, b, 0x7362)
                    if kvname == "int8":
                        y0, y1 = x0 ^ 0x80808080, x1 ^ 0x80808080
                        out = [
                            hsub2(prmt(y, 0x64646464, sel), 0x64806480)
                            for y in (y0, y1)
                            for sel in (0x4140, 0x4342)
                        ]
                    else:
                        out = [conv(x0 & 0xFFFF), conv(x0 >> 16), conv(x1 & 0xFFFF), conv(x1 >> 16)]
                for i in range(PER):
                    lo, hi = split(out[i])
                    Bs[i][2 * t4 + 8 * half, g], Bs[i][2 * t4 + 1 + 8 * half, g] = lo, hi
        for i in range(PER):
            nt = w_ * PER + i
            C = Pd @ Bs[i]  # 16 x 8: column c <-> dim c * NT + nt
            for c in range(8):
                out_o[:, c * NT + nt] += C[:, c]
    out_o /= PGAIN
    O_ref = P @ vd
    errO = np.abs(out_o - O_ref).max() / np.abs(O_ref).max()
    return errS, errO


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kv,sw_fp8", [("int8", False), ("int4", False), ("fp8", False), ("fp8", True)])
def test_v2_fragments_match_reference(kv, d, sw_fp8):
    err_s, err_o = run(kv, d, sw_fp8, np.random.default_rng(0))
    assert err_s < 1e-3 and err_o < 2e-3, (err_s, err_o)
