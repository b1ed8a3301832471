"""Quantized KV cache on the CPU: the format rules (kv/quant.py), quantize-on-write, attention over quantized
pages (both pools, decode and prefill), the selector's statistics, engine runs and KV sizing."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_cpu_kernels import naive_attention

from lserve_lite.backends import cpu as C
from lserve_lite.backends import cpu_kernels as K
from lserve_lite.backends.cpu_half import NATIVE_HALF
from lserve_lite.backends.cpu_kv import kernel_view
from lserve_lite.backends.reference import attention as A
from lserve_lite.backends.reference import layers as L
from lserve_lite.config import EngineConfig, ModelConfig, SparseConfig
from lserve_lite.errors import InvalidRequestError
from lserve_lite.kv import quant as Q
from lserve_lite.kv.layout import pool_pages
from lserve_lite.sparse.plan import BatchLayout, build_plan

RNG: np.random.Generator  # each test's own (_fresh_rng)


@pytest.fixture(autouse=True)
def _fresh_rng(request):
    """Each test draws from its own seed (its name): its data do not depend on which tests ran before it."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


CPU_FORMATS = ["int8", "int4", "fp8"]


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("scale_dtype", [np.float64, np.float32, np.float16])
def test_round_trip_error_is_within_half_a_step(name, scale_dtype):
    fmt = Q.FORMATS[name]
    x = RNG.standard_normal((40, 3, 64)) * np.exp(RNG.uniform(-3, 3, (40, 3, 1))) + RNG.uniform(-2, 2, 64)
    x[0, 0] = 0.0  # an all-zero row: scale 0, values 0
    x[0, 1] = 3.5  # a constant row: scale 0, values the min
    vals, sc = Q.quantize(x, fmt, scale_dtype)
    assert vals.dtype == fmt.value_dtype and vals.shape[-1] == fmt.packed_dim(64)
    assert sc.shape == (40, 3, fmt.scale_cols(64)) and sc.dtype == scale_dtype
    y = Q.dequantize(vals, sc, fmt)
    step = Q.steps(sc, fmt, 64)
    if name == "fp8":  # 3 mantissa bits: half an ulp is 1/16 of the value (normals), 2^-10 steps (subnormals)
        bound = np.maximum(np.abs(x) / 16, step * 2.0**-10) * (1 + 1e-9)
    else:  # rounding to the integer grid, plus the clip of a scale (and int4's min) rounded (fp16 / fp32)
        ulp = 2.0 ** -np.finfo(scale_dtype).nmant
        bound = step * (0.5 + fmt.qmax * ulp) + (
            np.abs(x).max(-1, keepdims=True) * ulp if fmt.asymmetric else 0
        )
    assert (np.abs(y - x) <= bound + 1e-300).all()
    assert (y[0, 0] == 0).all() and (name != "int4" or np.allclose(y[0, 1], 3.5, rtol=1e-3))


def test_int4_is_asymmetric_in_groups_of_16():
    """(scale, min) per group of 16 channels (keys and values), value scale * q + min, q in 0..15, channel 2i in
    the low nibble of byte i."""
    fmt = Q.FORMATS["int4"]
    assert (fmt.group(64), fmt.scale_cols(64), fmt.group(128), fmt.scale_cols(128)) == (16, 8, 16, 16)
    vals, sc = Q.quantize(np.array([[-1.0, 14.0, 1.0, 0.0] * 4 + [0.0, 15.0] * 8]), fmt)
    assert (
        sc[0, :4].tolist() == [1.0, -1.0, 1.0, 0.0]
        and vals[0, 0] == (0 | 15 << 4)
        and vals[0, 1] == (2 | 1 << 4)
    )
    assert vals[0, 8] == (0 | 15 << 4)  # group 1 (channels 16-31): its own range
    assert fmt.kv_bytes(64, 4) == 2 * (32 + 8 * 4)  # values + float32 (scale, min) pairs, K and V alike
    codes = np.array([c for c in range(256) if c & 127 != 127], np.uint8)
    assert np.array_equal(Q.e4m3_encode(Q.e4m3_decode(codes)), codes)
    assert Q.e4m3_decode(np.array([0x7E, 0x08, 0x01], np.uint8)).tolist() == [448.0, 2.0**-6, 2.0**-9]


def test_hadamard_is_the_orthonormal_sylvester_matrix_after_the_signs():
    """kv/quant.hadamard = (x * signs) @ H / sqrt(D) with H the Sylvester Hadamard matrix built here in float64
    (independent of the butterflies), orthonormal (q . k kept); int4 and fp8 ask for it, only for power-of-two heads."""
    for d in (2, 32, 64, 128, 256):
        h = np.array([[1.0]])
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        signs = Q.hadamard_signs(d)
        assert set(np.unique(signs)) == {-1.0, 1.0} or d == 2
        x = RNG.standard_normal((5, d)).astype(np.float32)
        y = Q.hadamard(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, (x * signs).astype(np.float64) @ h / np.sqrt(d), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose((y[0] * y[1]).sum(), (x[0] * x[1]).sum(), rtol=1e-4, atol=1e-4)
    assert [n for n, f in Q.FORMATS.items() if f.rotates_keys(64)] == ["int4", "fp8"]
    assert not Q.FORMATS["int4"].rotates_keys(96) and Q.FORMATS["int4"].rotates_keys(128)
    assert not Q.FORMATS["int4"].rotates_keys(512)


def test_hadamard_signs_are_the_cuda_kernels_words():
    """The sign words of kernels/kv_quant.cuh's hadamard_sign are kv/quant.HADAMARD_SIGN_WORDS, in order."""
    src = (Path(__file__).parents[1] / "kernels" / "kv_quant.cuh").read_text()
    body = src[src.index("float hadamard_sign(int c)") :].split("}", 1)[0]
    words = tuple(int(w, 16) for w in re.findall(r"0x([0-9A-Fa-f]{16})ull", body))
    assert words == Q.HADAMARD_SIGN_WORDS


def test_int4_keys_with_outlier_channels_score_closer_in_the_hadamard_basis():
    """Why int4 keys are rotated: with one large RoPE pair of channels (as post-RoPE keys have) the rotated keys'
    q . k error is well below the plain keys' (measured ~0.57x: the groups holding the pair lose their other
    channels' precision; rotated, every group shares the pair's magnitude)."""
    fmt = Q.FORMATS["int4"]
    k = RNG.standard_normal((512, 64)).astype(np.float32)
    k[:, [3, 35]] *= 30.0
    q = RNG.standard_normal((64, 64)).astype(np.float32)
    exact = q.astype(np.float64) @ k.T.astype(np.float64)

    def score_err(keys: np.ndarray, queries: np.ndarray) -> float:
        vals, sc = Q.quantize(keys, fmt, np.float32)
        return float(np.abs(queries.astype(np.float64) @ Q.dequantize(vals, sc, fmt).T - exact).mean())

    plain, rotated = score_err(k, q), score_err(Q.hadamard(k), Q.hadamard(q))
    assert rotated < 0.75 * plain, (plain, rotated)


def _quantized_pools(fmt, shape):
    """Random float K/V pools (keys with channel offsets, as post-RoPE keys), their quantized (values, scales)
    and the float64 dequantized copies."""
    k, v = RNG.standard_normal((2, *shape)).astype(np.float32)
    k += RNG.uniform(-2, 2, shape[-1]).astype(np.float32)
    (kq, ks), (vq, vs) = Q.quantize(k, fmt, np.float32), Q.quantize(v, fmt, np.float32)
    return (k, v), (kq, ks, vq, vs), (Q.dequantize(kq, ks, fmt), Q.dequantize(vq, vs, fmt))


@pytest.mark.parametrize("name", CPU_FORMATS)
@pytest.mark.parametrize(
    "q_lens,ctx_lens,sink,local,hc",
    [([1, 1, 1], [700, 1, 64], 0, 0, [0, 0, 0]), ([5, 8, 1], [1000, 130, 65], 64, 100, [1, 1, 0]),
     ([40], [600], 64, 300, [0, 1, 0])],
)  # fmt: skip
def test_attention_over_a_quantized_cache(name, q_lens, ctx_lens, sink, local, hc):
    """Decode (Numba) and prefill (NumPy) kernels = float64 attention over the dequantized cache (tight), and
    near attention over the unquantized one (loose: the quantization error)."""
    fmt = Q.FORMATS[name]
    (k, v), (kq, ks, vq, vs), (kd, vd) = _quantized_pools(fmt, (40, 3, 64, 64))
    tables, perm = [], [int(p) for p in RNG.permutation(40)]
    for c in ctx_lens:
        tables.append(perm[: -(-c // 64)])
        perm = perm[-(-c // 64) :]
    plan = build_plan(BatchLayout(q_lens, ctx_lens, tables), 64, sink=sink, local=local)
    q = RNG.standard_normal((sum(q_lens), 9, 64)).astype(np.float32)
    hc = np.array(hc, np.int32)
    want, exact = naive_attention(q, kd, vd, plan, hc), naive_attention(q, k, v, plan, hc)
    got = [A.paged_attention_ref(q, kq, vq, plan, hc, ks, vs, fmt)]
    if max(q_lens) <= C.SMALL_ROWS:
        got.append(C.paged_attention_numba(q, kq, vq, plan, hc, None, ks, vs))
    for out in got:
        assert rel(out, want) < 1e-5
        assert rel(out, exact) < (0.02 if name == "int8" else 0.25)


@pytest.mark.parametrize("name", CPU_FORMATS)
def test_sparse_attention_reads_both_quantized_pools(name):
    """LServe attention (dense-head pool + streaming ring) over quantized pools equals it over the same
    pools dequantized."""
    fmt = Q.FORMATS[name]
    ps, ctx, q_len, hc = 16, 300, 20, np.array([0, 1, 1, 0], np.int32)
    slot = np.array([0, 0, 1, 1], np.int32)
    (_, _), (kq, ks, vq, vs), (kd, vd) = _quantized_pools(fmt, (30, 2, ps, 32))
    (_, _), (sq, ss, tq, ts), (sd, td) = _quantized_pools(fmt, (12, 2, ps, 32))
    table, ring = [int(p) for p in RNG.permutation(30)[: -(-ctx // ps)]], (2, 10)
    stable = [0, 1] + [2 + (i % 10) for i in range(2, -(-ctx // ps))]
    lay = BatchLayout([q_len], [ctx], [table], stream_tables=[stable], windows=[(32, 80)])
    plan = build_plan(lay, ps, q_block=8, ring=ring)
    q = RNG.standard_normal((q_len, 8, 32)).astype(np.float32)
    got = A.paged_attention_sparse_ref(q, kq, vq, sq, tq, plan, hc, slot, scales=(ks, vs, ss, ts), fmt=fmt)
    f32 = [a.astype(np.float32) for a in (kd, vd, sd, td)]
    want = A.paged_attention_sparse_ref(q, *f32, plan, hc, slot)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [*CPU_FORMATS, "fp16", "fp32"])
@pytest.mark.parametrize("reuse", [False, True])
def test_sparse_decode_numba_equals_the_reference(name, reuse):
    """LServe decode rows through the Numba kernel (cpu.sparse_attention_numba: both pools, per-sequence windows,
    each dense head its own selection plus the newest page, permuted pool rows) = paged_attention_sparse_ref on
    the same stored pools and selections (float32 both; the reference is independent NumPy code)."""
    _sparse_steps_equal_the_reference(name, reuse, [1, 1, 1])


@pytest.mark.parametrize("name", [*CPU_FORMATS, "fp16", "fp32"])
def test_sparse_prefill_with_decode_rows_equals_the_reference(name):
    """A step with a prefill chunk beside selecting decode rows (cpu.sparse_prefill_attention: each pool through
    dense mode's prefill attention, the decode rows' selections through the Numba kernel) = the reference."""
    _sparse_steps_equal_the_reference(name, False, [1, 20, 1])


def _sparse_steps_equal_the_reference(name: str, reuse: bool, q_lens: list[int]) -> None:
    if name == "fp16" and not NATIVE_HALF:
        pytest.skip("fp16 KV needs the host's half conversions")
    ps, ctx, hc = 16, [300, 97, 40], np.array([0, 1, 0, 1], np.int32)
    slot = np.array([1, 0, 0, 1], np.int32)  # dense heads 0, 2 in rows 1, 0; streaming 1, 3 in rows 0, 1
    shape_d, shape_s = (40, 2, ps, 32), (36, 2, ps, 32)
    if name in CPU_FORMATS:
        fmt = Q.FORMATS[name]
        (_, _), (kd, ksd, vd, vsd), _ = _quantized_pools(fmt, shape_d)
        (_, _), (kst, kss, vst, vss), _ = _quantized_pools(fmt, shape_s)
        scales = (ksd, vsd, kss, vss)
    else:
        dt = np.float16 if name == "fp16" else np.float32
        kd, vd = RNG.standard_normal((2, *shape_d)).astype(dt)
        kst, vst = RNG.standard_normal((2, *shape_s)).astype(dt)
        fmt, scales = None, (None,) * 4
    perm = [int(p) for p in RNG.permutation(40)]
    tables, stables = [], []
    for i, c in enumerate(ctx):
        n = -(-c // ps)
        tables.append(perm[:n])
        perm = perm[n:]
        stables.append([12 * i, 12 * i + 1] + [12 * i + 2 + (j % 10) for j in range(2, max(n, 2))])
    keep = [6, 4, 0]  # pages per sequence (the third fits: no selection)
    lay = BatchLayout(q_lens, ctx, tables, stream_tables=stables, windows=[(32, 80), (16, 48), (0, 32)],
                      sel_slots=[2, 0, 1], sel_keep=keep, sel_refresh=[0 if reuse else 1] * 3)  # fmt: skip
    plan = build_plan(lay, ps, q_block=8, ring=(2, 10))
    sel, cnt = np.full((3, 4, 8), -1, np.int32), np.zeros((3, 4), np.int32)
    for qb, k in enumerate(keep):
        n = -(-ctx[qb] // ps) - reuse  # a reused selection was made a page ago
        for g in (0, 2):
            pick = np.sort(RNG.choice(n, min(k, n), replace=False)) if k else np.arange(0)
            sel[lay.sel_slots[qb], g, : pick.size], cnt[lay.sel_slots[qb], g] = pick, pick.size
    q = RNG.standard_normal((sum(q_lens), 8, 32)).astype(np.float32)
    pools = (kd, vd, kst, vst)
    want = A.paged_attention_sparse_ref(q, *pools, plan, hc, slot, sel, cnt, scales=scales, fmt=fmt)
    if max(q_lens) == 1:
        got = C.sparse_attention_numba(q, pools, plan, hc, slot, sel, cnt, None, scales)
    else:
        assert plan.selects  # the decode rows beside the chunk select pages
        got = C.sparse_prefill_attention(q, pools, plan, hc, slot, sel, cnt, None, scales, fmt)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("kv", ["fp16", "fp32", *CPU_FORMATS])
def test_sparse_write_numba_equals_the_reference(kv):
    """The CPU LServe write (cpu.rope_write_kv_sparse_numba: dense mode's Numba write per pool, then the merged
    key statistics) = rope_write_kv_sparse_ref (NumPy; statistics recomputed from a float cache, merged from the
    unquantized keys for a quantized one) over three steps of two sequences appended in order: a prefill chunk
    that ends inside a logical page, then decode rows. Float pools and scales within float32 rounding; quantized
    values within a step of the format (the two round their own float32 rotations)."""
    if kv == "fp16" and not NATIVE_HALF:
        pytest.skip("fp16 KV needs the host's half conversions")
    fmt = Q.FORMATS[kv] if kv in CPU_FORMATS else None
    ps, sub, d, hq = 16, 4, 32, 8
    hc, slot = np.array([0, 1, 0, 1], np.int32), np.array([1, 0, 0, 1], np.int32)
    cos, sin = RNG.standard_normal((2, 200, d // 2), dtype=np.float32)
    stale = RNG.standard_normal((2, 12, 2, sub, d)).astype(np.float32)  # statistics until a page is written

    def pool(pages: int, f) -> tuple:
        if fmt is None:
            return np.zeros((pages, 2, ps, d), np.float16 if kv == "fp16" else np.float32), None
        return np.zeros((pages, 2, ps, f.packed_dim(d)), f.value_dtype), np.zeros(
            (pages, 2, ps, f.scale_cols(d)), np.float32
        )

    states = []
    for _ in range(2):
        (kd, kds), (vd, vds), (ks, kss), (vs, vss) = pool(12, fmt), pool(12, fmt), pool(8, fmt), pool(8, fmt)
        states.append(((kd, vd, ks, vs), (kds, vds, kss, vss), [*stale.copy()]))
    tables, stables = [[3, 7, 1, 9], [0, 4, 11]], [[0, 1, 2, 3], [4, 5, 6, 7]]
    steps = [
        ([0, 0], [37, 21]),
        ([37, 21], [1, 1]),
        ([38, 22], [1, 1]),
    ]  # (first position, tokens) per sequence
    for first, count in steps:
        pos = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count, strict=True)])
        seq = np.repeat([0, 1], count)
        dense = np.array([tables[s][p // ps] * ps + p % ps for s, p in zip(seq, pos, strict=True)], np.int64)
        stream = np.array(
            [stables[s][p // ps] * ps + p % ps for s, p in zip(seq, pos, strict=True)], np.int64
        )
        qkv = RNG.standard_normal((pos.size, (hq + 8) * d)).astype(np.float32)
        (pools_r, sc_r, st_r), (pools_n, sc_n, st_n) = states
        q_r = L.rope_write_kv_sparse_ref(
            qkv, pos, dense, stream, *pools_r, hc, slot, cos, sin, *st_r, scales=sc_r, fmt=fmt
        )
        rot = fmt is not None and fmt.rotates_keys(d)
        q_n = C.rope_write_kv_sparse_numba(
            qkv, pos, dense, stream, *pools_n, hc, slot, cos, sin, *st_n, sc_n, rot
        )
        np.testing.assert_allclose(q_n, q_r, rtol=1e-6, atol=1e-6)
        for got, want in zip(st_n, st_r, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        for i, (got, want) in enumerate(zip(pools_n, pools_r, strict=True)):
            if fmt is None:
                np.testing.assert_allclose(
                    got.astype(np.float32), want.astype(np.float32), rtol=1e-6, atol=1e-6
                )
                continue
            np.testing.assert_allclose(sc_n[i], sc_r[i], rtol=1e-5, atol=1e-7)
            step = Q.steps(sc_r[i], fmt, d)
            err = np.abs(Q.dequantize(got, sc_n[i], fmt) - Q.dequantize(want, sc_r[i], fmt))
            assert (err <= step * 1.001 + 1e-6).all()


@pytest.mark.parametrize("name", CPU_FORMATS)
def test_rope_write_quantizes_on_write(name):
    """The Numba write kernel and the NumPy reference store the rotated K/V within half a step, same scales (the
    float rows in the format's basis: int4's keys and queries Hadamard-rotated)."""
    fmt = Q.FORMATS[name]
    cos, sin = RNG.standard_normal((2, 100, 32), dtype=np.float32)
    qkv = RNG.standard_normal((4, 960), dtype=np.float32)
    pos, slots = np.array([5, 17, 99, 0]), np.array([3, 70, 200, 64])
    k_f, v_f = np.zeros((2, 5, 3, 64, 64), np.float32)
    q_f = L.rope_write_kv_ref(qkv, pos, slots, k_f, v_f, cos, sin, fmt=fmt)
    caches = []
    for write in ("ref", "numba"):
        kq, vq = np.zeros((2, 5, 3, 64, fmt.packed_dim(64)), fmt.value_dtype)
        ks, vs = np.zeros((2, 5, 3, 64, fmt.scale_cols(64)), np.float32)
        q = L.rope_write_kv_ref(qkv, pos, slots, kq, vq, cos, sin, ks, vs, fmt)
        if write == "numba":
            kq[:], vq[:], ks[:], vs[:] = 0, 0, 0, 0
            rot = fmt.rotates_keys(64)
            K.rope_write_kv(
                qkv, pos, slots, kernel_view(kq, ks), kernel_view(vq, vs), ks, vs, cos, sin, q, None, rot
            )
        np.testing.assert_allclose(q, q_f, rtol=1e-6, atol=1e-6)
        caches.append((ks, vs))
        for vals, sc, ref in ((kq, ks, k_f), (vq, vs, v_f)):
            step = Q.steps(sc, fmt, 64)
            bound = np.maximum(np.abs(ref) / 16, step * 2.0**-10) if name == "fp8" else step * 0.5
            assert (np.abs(Q.dequantize(vals, sc, fmt) - ref) <= bound * (1 + 1e-5) + 1e-6).all()
        if name == "fp8":  # one algorithm on both paths: the same bits
            caches[-1] = (*caches[-1], kq.copy(), vq.copy())
    for ref_a, numba_a in zip(*caches, strict=True):
        np.testing.assert_allclose(ref_a, numba_a, rtol=1e-6)


_WRITE_INT4 = """
import numpy as np
from lserve_lite.backends import cpu_kernels as K
from lserve_lite.kv import quant as Q
fmt = Q.FORMATS["int4"]
rng = np.random.default_rng(0)
cos, sin = rng.standard_normal((2, 8, 32), dtype=np.float32)
qkv = rng.standard_normal((1, 320), dtype=np.float32)  # 1 query head, 2 KV heads of 64 channels
kq, vq = np.zeros((2, 1, 2, 4, 32), np.uint8)
ks, vs = np.zeros((2, 1, 2, 4, fmt.scale_cols(64)), np.float32)
K.rope_write_kv(qkv, np.array([3]), np.array([1]), kq, vq, ks, vs, cos, sin, np.empty((1, 1, 64), np.float32))
print(Q.dequantize(vq[0, 0, 1], vs[0, 0, 1], fmt).sum())
"""


def test_cached_kernels_follow_a_changed_kv_format(tmp_path):
    """Numba's disk cache keys a kernel by its own file only: after cpu_kv.py (the int4 store compiled into
    cpu_kernels.rope_write_kv) changes, the cached kernel must not keep the old format (it did: a dense int4
    engine wrote the old symmetric int4 that the prefill attention read as garbage, eval_ppl 2.7e11)."""
    import os
    import shutil
    import subprocess
    import sys

    import lserve_lite

    shutil.copytree(Path(lserve_lite.__file__).parent, tmp_path / "lserve_lite",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}

    def run() -> float:
        out = subprocess.run([sys.executable, "-c", _WRITE_INT4], env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return float(out.stdout.split()[-1])

    before = run()  # compiles and caches rope_write_kv
    kv = tmp_path / "lserve_lite" / "backends" / "cpu_kv.py"
    src = kv.read_text()
    old = "scales[pg, h, off, 2 * k + 1] = lo\n"
    assert src.count(old) == 1
    kv.write_text(src.replace(old, "scales[pg, h, off, 2 * k + 1] = lo + 1.0\n"))  # every value 1 higher
    assert run() == pytest.approx(before + 64, abs=1e-3)


def test_kernel_caches_follow_every_module_compiled_in():
    """The CPU kernels compile in cpu_kv.py's format loops and, through them, cpu_half.py's fp16 conversions (int4's
    nibbles, fp8's codes, fp16 KV), and cpu_native.py's array views (the native attention job): a change to any
    flushes their disk cache (the stamp beside it covers them; cpu_half.py was left out, so a fixed conversion could
    keep running its cached old code)."""
    from lserve_lite.backends import cpu_half, cpu_kv, cpu_native, cpu_select
    from lserve_lite.backends.numba_cache import deps_stamp

    kernels = (K, [cpu_kv, cpu_half, cpu_native])
    select = (cpu_select, [cpu_kv, cpu_half, K])  # cpu_select: K.nan_max
    for mod, deps in (kernels, select):
        stamp = Path(K.paged_attention._cache.cache_path) / f"{mod.__name__.rsplit('.', 1)[-1]}.deps.sha256"
        assert stamp.read_text() == deps_stamp(deps)


def test_merged_stats_equal_recomputed_ones():
    """Token-by-token and chunked merges give the stats of the keys themselves (update_page_stats)."""
    from lserve_lite.backends.reference.page_stats import merge_page_stats, update_page_stats

    keys = RNG.standard_normal((150, 2, 16)).astype(np.float32)
    slots = np.arange(150) + 64  # the sequence starts at page 1
    k_cache = np.zeros((5, 2, 64, 16), np.float32)
    k_cache[slots // 64, :, slots % 64] = keys
    want = np.zeros((2, 5, 2, 4, 16), np.float32)
    update_page_stats(*want, k_cache, slots)
    got = np.full_like(want, 9.0)
    for a, b in ((0, 1), (1, 2), (2, 37), (37, 101), (101, 150)):
        merge_page_stats(*got, keys[a:b], slots[a:b], 64)
    np.testing.assert_array_equal(got[:, 1:3], want[:, 1:3])
    np.testing.assert_array_equal(got[:, 3, :, :2], want[:, 3, :, :2])


def test_numba_merged_stats_keep_nan_keys_as_the_reference():
    """The CPU statistics merge (cpu_kernels.merge_key_stats) = merge_page_stats with NaN keys: a NaN key at any
    offset of a logical page, in a chunk or merged alone, makes its channel's max and min NaN (Python's max kept
    the page's finite value unless the NaN came first, so the selector scored the page as if the key were not
    there)."""
    from lserve_lite.backends.reference.page_stats import merge_page_stats

    keys = RNG.standard_normal((40, 2, 8)).astype(np.float32)
    keys[[1, 18, 33], [0, 1, 0], [2, 5, 7]] = np.nan  # inside a chunk, inside a chunk, a token merged alone
    slots = np.arange(40, dtype=np.int64)
    want = np.zeros((2, 3, 2, 4, 8), np.float32)
    got = np.zeros_like(want)
    for a, b in ((0, 20), (20, 33), (33, 34), (34, 40)):
        merge_page_stats(*want, keys[a:b], slots[a:b], 16)
        K.merge_key_stats(*got, keys[a:b], slots[a:b], 16)
    assert np.isnan(want).sum() == 6
    np.testing.assert_array_equal(got, want)


def _llm(path, kv: str, sparse: bool = False, chunk: int = 2048):
    from lserve_lite import LLM

    knobs = dict(page_size=16, sub_pages=4, prefill_sink=16, prefill_local=64, decode_sink=16, decode_local=32,
                 token_budget=64)  # fmt: skip
    sp = SparseConfig(enabled=True, static_sparsity=0.5, **knobs) if sparse else SparseConfig()
    cfg = EngineConfig(kv_dtype=kv, page_size=16, sparse=sp, max_num_batched_tokens=chunk, num_kv_pages=64)
    return LLM(str(path), backend="cpu", config=cfg)


@pytest.mark.parametrize("sparse", [False, True])
def test_engine_greedy_with_quantized_kv(tiny_lserve, sparse):
    """fp16 / int8 / int4 / fp8 KV: greedy tokens as fp32 KV's on the tiny model (fp16, int8), logits close; chunked prefill over
    cached quantized pages = one-chunk prefill."""
    from lserve_lite import SamplingParams

    # a prompt of its own (not the module RNG's next draw, which moves with the tests before it): the int8
    # greedy check compares near-tie argmaxes of a random tiny model, so the prompt is fixed
    ids = [int(t) for t in np.random.default_rng(230).integers(3, 300, 230)]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    ref = _llm(tiny_lserve, "fp32", sparse)
    ref_tokens, ref_logits = ref.generate([ids], greedy)[0].token_ids, ref.logits(ids)
    for kv, tol in (("fp16", 2e-3), ("int8", 0.02), ("int4", 0.2), ("fp8", 0.05)):
        if kv == "fp16" and not NATIVE_HALF:
            continue  # no fp16 KV on this host
        llm = _llm(tiny_lserve, kv, sparse)
        assert llm.engine.kv_format.name == kv and f"KV cache {kv}" in llm.engine.kv_summary()
        lg = llm.logits(ids)
        assert rel(lg, ref_logits) < tol
        if kv in ("fp16", "int8"):
            assert llm.generate([ids], greedy)[0].token_ids == ref_tokens
        np.testing.assert_allclose(
            _llm(tiny_lserve, kv, sparse, chunk=48).logits(ids), lg, rtol=1e-4, atol=1e-4
        )


def test_selector_stats_of_a_quantized_cache_are_the_unquantized_keys(tiny_lserve):
    """Layer 0 keys do not depend on the cache format: its stats must equal the fp32 cache's exactly, after
    chunked prefill and decode steps (merged, never read back from quantized keys); int4's are those of the
    Hadamard-rotated keys (the basis its queries meet them in), i.e. of the fp32 cache's keys rotated."""
    from lserve_lite.evaluation.harness import SparseHarness

    ids = [int(t) for t in RNG.integers(3, 300, 140)]
    stats, keys = {}, None
    for kv in ("fp32", "int8", "int4"):
        h = SparseHarness(_llm(tiny_lserve, kv, sparse=True, chunk=40))
        seq = h.begin(ids, prompt_len=130)
        try:
            h.forward(seq, 130, logits="last")
            h.decode(seq, 10)
            cache, pages = h.runner.cache, seq.page_table
            stats[kv] = cache.kmax[0][pages].copy(), cache.kmin[0][pages].copy()
            if kv == "fp32":
                keys = cache.k[0][pages].copy()  # [pages, dense heads, page, D]
        finally:
            h.end(seq)
    np.testing.assert_array_equal(stats["int8"][0], stats["fp32"][0])
    np.testing.assert_array_equal(stats["int8"][1], stats["fp32"][1])
    assert Q.FORMATS["int4"].rotates_keys(keys.shape[-1])
    sub = stats["int4"][0].shape[2]
    rows = Q.hadamard(keys.transpose(1, 0, 2, 3).reshape(keys.shape[1], -1, sub, keys.shape[-1]))
    written = 140  # the 130 prompt tokens and the 10 decode steps' inputs
    lp = keys.shape[2] // sub
    for i in range(-(-written // lp)):  # every logical page holding written tokens
        n = min(lp, written - i * lp)
        got = (stats["int4"][0][i // sub, :, i % sub], stats["int4"][1][i // sub, :, i % sub])
        block = rows.reshape(keys.shape[1], -1, keys.shape[-1])[:, i * lp : i * lp + n]
        np.testing.assert_array_equal(got[0], block.max(1))
        np.testing.assert_array_equal(got[1], block.min(1))


def test_prefix_cache_snapshot_copies_scales(tiny_lserve):
    """copy_stream_pages moves the streaming pool's scales with its values."""
    llm = _llm(tiny_lserve, "int8", sparse=True)
    cache = llm.engine.runner.cache
    for a in (*cache.ks, *cache.ks_scale, *cache.vs_scale):
        a[2] = RNG.integers(1, 100, a[2].shape).astype(a.dtype)
    llm.engine.ops.copy_stream_pages(cache, np.array([2]), np.array([5]))
    for a in (*cache.ks, *cache.ks_scale, *cache.vs_scale):
        assert np.array_equal(a[5], a[2])


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kv", ["fp32", "fp16", *CPU_FORMATS])
def test_stale_nan_past_a_context_does_not_reach_another_request(tiny_lserve, kv, sparse):
    """A freed page's slots past the next owner's context keep what the last one wrote, NaN included (an fp16 cache
    stores a value past its range as inf, and the request that wrote it turned NaN): attention must not read them
    (0 * NaN = NaN), in prefill or decode, dense or LServe. Every pool poisoned after a first run (prefix caching off:
    nothing is reused) gives the same logprobs, bit for bit; the prompts end mid-page."""
    if kv == "fp16" and not NATIVE_HALF:
        pytest.skip("fp16 KV needs the host's half conversions")
    check_stale_nan(tiny_lserve, "cpu", kv, sparse, np.random.default_rng(5))


def check_stale_nan(model, backend: str, kv: str, sparse: bool, rng: np.random.Generator, **engine) -> None:
    """Two prompts ending mid-page (prefix caching off: nothing is reused) run twice, every pool NaN-poisoned
    between the runs (int8 / int4 values 127, fp8's NaN code): the logprobs must be equal bit for bit (also run
    on the CUDA backend by tests/test_gpu_kv_quant.py)."""
    from lserve_lite import LLM, SamplingParams

    knobs = dict(page_size=16, sub_pages=4, prefill_sink=16, prefill_local=32, decode_sink=16, decode_local=32,
                 token_budget=32, select_interval=2)  # fmt: skip
    sp = SparseConfig(enabled=True, static_sparsity=0.5, **knobs) if sparse else SparseConfig()
    cfg = EngineConfig(kv_dtype=kv, page_size=16, sparse=sp, max_num_batched_tokens=24, num_kv_pages=16,
                       prefix_caching=False, **engine)  # fmt: skip
    llm = LLM(str(model), backend=backend, config=cfg)
    if kv not in llm.engine.ops.kv_dtypes:
        pytest.skip(f"kv_dtype {kv} is not available on this device")
    prompts = [[int(t) for t in rng.integers(3, 300, n)] for n in (37, 5)]
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=1)

    def run() -> list[list[float]]:
        return [[t.logprob for t in o.logprobs] for o in llm.generate(prompts, params)]

    clean = run()
    cache = llm.engine.runner.cache
    for a in cache.dense_pools() + cache.stream_pools():
        a[...] = np.nan if a.dtype.kind == "f" else 127
    assert run() == clean


@pytest.mark.parametrize("sparse", [False, True])
def test_pages_handed_out_read_as_fresh(tiny_lserve, sparse):
    """Every pool NaN-poisoned, then one prefill step of a 37-token prompt: the pages the step got were cleared
    before it wrote them, so their slots past the context hold zeros (a fresh pool's), not the earlier values;
    pages nobody got keep theirs."""
    from lserve_lite import LLM, SamplingParams

    knobs = dict(page_size=16, sub_pages=4, prefill_sink=16, prefill_local=32, decode_sink=16, decode_local=32,
                 token_budget=32)  # fmt: skip
    sp = SparseConfig(enabled=True, static_sparsity=0.5, **knobs) if sparse else SparseConfig()
    cfg = EngineConfig(kv_dtype="int4", page_size=16, sparse=sp, num_kv_pages=16, prefix_caching=False)
    llm = LLM(str(tiny_lserve), backend="cpu", config=cfg)
    eng, cache = llm.engine, llm.engine.runner.cache
    for a in cache.dense_pools() + cache.stream_pools():
        a[...] = np.nan if a.dtype.kind == "f" else 127
    eng.add_request([int(t) for t in RNG.integers(3, 300, 37)], SamplingParams(max_new_tokens=4), "r")
    eng.step()
    seq = eng.seqs["r"]
    assert seq.page_table and bool(seq.stream_table) == sparse == bool(cache.stream_pools())
    for table, pools in ((seq.page_table, cache.dense_pools()), (seq.stream_table, cache.stream_pools())):
        for a in pools:
            assert np.isfinite(a[table].astype(np.float32)).all() if a.dtype.kind == "f" else True
            others = np.setdiff1d(np.arange(a.shape[0]), table)
            assert np.isnan(a[others]).all() if a.dtype.kind == "f" else (a[others] == 127).all(), others
    last = seq.page_table[-1]
    for a in (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale):
        if a.shape[1]:
            assert (a[last, :, 37 % 16 :] == 0).all()  # the slots past the context: a fresh pool's zeros


def test_grow_records_clears_in_order_with_copies():
    """Pages handed out by grow become one merged clear op per schedule, after any copy recorded before them."""
    from lserve_lite.kv.block_manager import BlockManager
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    b = BlockManager(8, 4, num_stream_pages=6, stream_per_seq=2, max_seqs=2)
    a, c = (Sequence(list(range(n)), SamplingParams(max_new_tokens=1)) for n in (9, 3))
    b.grow(a, 9)
    b.page_ops.append(("copy", [0], [1]))
    b.grow(c, 3)
    b.grow(a, 13)  # a fourth page for a; its stream table is whole
    assert b.take_page_ops() == [
        ("clear", a.page_table[:3], a.stream_table),
        ("copy", [0], [1]),
        ("clear", [c.page_table[0], a.page_table[3]], c.stream_table),
    ]
    assert b.take_page_ops() == [] and not b.grow(a, 13) and b.page_ops == []


def test_kv_sizing_counts_real_bytes():
    """Same memory: int8 ~2x and int4 ~2.67x the tokens of fp16 (GPU: fp16 scales), more vs CPU fp32."""
    cfg = ModelConfig.from_dict(
        dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144)
    )  # fmt: skip
    pages = {
        n: pool_pages(cfg, 64, Q.FORMATS[n].kv_bytes(128, 2), 40 << 30, None, 1, stat_itemsize=2)[0]
        for n in Q.FORMATS
    }
    assert 1.95 < pages["int8"] / pages["fp16"] < 2.0 and 2.66 < pages["int4"] / pages["fp16"] < 2.67
    assert pages["fp8"] == pages["int8"] and pages["fp32"] * 2 == pages["fp16"]


def test_kv_dtype_errors_are_one_line():
    with pytest.raises(InvalidRequestError, match="kv_dtype must be one of"):
        EngineConfig(kv_dtype="int3")
    no_half = ("fp32", "int8", "int4", "fp8")  # the CPU backend's formats on a host without fp16 conversions
    with pytest.raises(
        InvalidRequestError, match="kv_dtype fp16 is not available here.*has fp32, int8, int4, fp8$"
    ):
        Q.resolve_kv_format("fp16", no_half, 64)
    assert Q.resolve_kv_format("auto", no_half, 64).name == "fp32"
    pre_ada = ("fp16", "int8", "int4")  # the CUDA backend's formats below sm_89
    with pytest.raises(
        InvalidRequestError, match="kv_dtype fp8 needs an sm_89 or newer GPU .or the CPU backend.; "
    ):
        Q.resolve_kv_format("fp8", pre_ada, 64)
    assert Q.resolve_kv_format("auto", C.CpuOps.kv_dtypes, 64).name == ("fp16" if NATIVE_HALF else "fp32")
    assert Q.resolve_kv_format("fp8", C.CpuOps.kv_dtypes, 64).name == "fp8"


def test_numba_e4m3_matches_the_reference_codec():
    """cpu_kv's scalar e4m3 encode and its value decode (the CPU cache's fp8 as the kernels read it: the code's
    bits moved into an fp16, the value / 256, the 256 folded into the row scale) = kv/quant's vectorized reference,
    on every code's value, the midpoints between neighbours (ties to the even code), saturation, signs and zero;
    the decode bit for bit. A plain uint8 fp8 pool (not through `kernel_view`) is refused, not read as int4."""
    import numba as nb

    from lserve_lite.backends.cpu_kv import e4m3_code, kv_store, to_f32

    @nb.njit
    def decode(vals):
        out = np.empty(vals.shape[0], np.float32)
        for i in range(vals.shape[0]):
            out[i] = to_f32(vals[i])
        return out

    @nb.njit
    def store(x, vals, scales):
        kv_store(x, vals, scales, 0, 0, 0)

    mids = (Q.E4M3[1:] + Q.E4M3[:-1]) / 2
    y = np.concatenate(
        [Q.E4M3, mids, -mids, [0.0, -0.0, 448.0, 449.0, 1e9, -1e9, 1e-12, np.inf, np.nan, -np.nan]]
    )
    y = np.concatenate([y, np.nextafter(mids, 0), np.nextafter(mids, 1e9)])  # either side of every tie
    y = np.concatenate([y, RNG.standard_normal(2000) * 50])
    want = Q.e4m3_encode(y)
    got = np.array([e4m3_code(float(v)) for v in y], np.uint8)
    np.testing.assert_array_equal(got, want)
    codes = np.array([c for c in range(256) if c & 127 != 127], np.uint8)  # 127 / 255 (NaN) are never written
    scales = np.ones((1, 1, 1, 1), np.float32)
    got = decode(kernel_view(codes, scales))
    np.testing.assert_array_equal(got, Q.e4m3_decode(codes).astype(np.float32) / np.float32(256))
    vals = np.zeros((1, 1, 1, 64), np.uint8)
    with pytest.raises(ValueError, match="kernel_view"):
        store(np.ones(64, np.float32), vals, scales)


@pytest.mark.parametrize("name", CPU_FORMATS)
def test_numba_store_equals_the_reference_bit_for_bit(name):
    """cpu_kv.kv_store stores what kv/quant.quantize (float32 scales) gives, values and scales, bit for bit: each
    value rounded to nearest against the stored scale in float64. The first row's first value is one whose float32
    quotient 1.435258 / 0.013604342 rounds onto the tie 105.5 (int8 stored 106 until the quotient was float64)."""
    import numba as nb

    from lserve_lite.backends.cpu_kv import kv_store

    @nb.njit
    def store(x, vals, scales):
        for r in range(x.shape[0]):
            kv_store(x[r], vals, scales, r, 0, 0)

    fmt = Q.FORMATS[name]
    x = (RNG.standard_normal((3000, 64)) * np.exp(RNG.uniform(-5, 5, (3000, 1)))).astype(np.float32)
    x[0, :4] = np.array([1.435258, 1.7277515, -0.26284197, -1.4170293], np.float32)
    x[0, 4:] = 0
    x[1, 7] = x[2, 0] = x[3, 63] = (
        np.nan
    )  # a NaN row: NaN scales (int4: its group's), as a float cache holds NaN
    vals = np.zeros((len(x), 1, 1, fmt.packed_dim(64)), fmt.value_dtype)
    sc = np.zeros((len(x), 1, 1, fmt.scale_cols(64)), np.float32)
    store(x, kernel_view(vals, sc), sc)
    want_vals, want_sc = Q.quantize(x, fmt, np.float32)
    np.testing.assert_array_equal(sc[:, 0, 0], want_sc)
    np.testing.assert_array_equal(vals[:, 0, 0], want_vals)
    assert np.isnan(Q.dequantize(vals[1:4, 0, 0], sc[1:4, 0, 0], fmt)).any(-1).all()


@pytest.mark.parametrize("name", ["fp16", "fp32", *CPU_FORMATS])
def test_prefill_gather_equals_the_reference(name):
    """The CPU prefill's Numba page gather (cpu.gather_pages_numba) = reference/attention.gather_rows (kv/quant's float64
    dequantize, rounded to float32), pages in any order."""
    if name == "fp16" and not NATIVE_HALF:
        pytest.skip("fp16 KV needs the host's half conversions")
    x = RNG.standard_normal((7, 3, 16, 64)).astype(np.float32) * RNG.uniform(0.1, 20, (7, 3, 16, 1))
    x += RNG.uniform(-2, 2, 64).astype(np.float32)
    pages = np.array([5, 0, 3, 3, 6])
    fmt = Q.FORMATS[name]
    for f in (fmt,) if fmt.quantized else (None,):
        vals, sc = (
            Q.quantize(x, f, np.float32)
            if f
            else (x.astype(np.float16 if name == "fp16" else np.float32), None)
        )
        for h in range(3):
            want = A.gather_rows(vals, sc, f, pages, h)
            got = C.gather_pages_numba(vals, sc, f, pages, h)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-30)


@pytest.mark.parametrize("name", ["fp16", *CPU_FORMATS])
@pytest.mark.parametrize("d", [32, 40, 128])
def test_quantized_pages_at_other_head_dims(name, d):
    """The page loops off SmolLM2's unrolled D = 64: decode attention (paged_attention_numba) = float64 attention
    over the dequantized cache, and the prefill gather = gather_rows, at D 32, 128 and 40 (int4: one (scale, min)
    pair for the whole head, 40 not being a multiple of the groups)."""
    if name == "fp16" and not NATIVE_HALF:
        pytest.skip("fp16 KV needs the host's half conversions")
    fmt = Q.FORMATS[name]
    if fmt.quantized:
        (_, _), (kq, ks, vq, vs), (kd, vd) = _quantized_pools(fmt, (12, 2, 16, d))
    else:
        kd, vd = RNG.standard_normal((2, 12, 2, 16, d)).astype(np.float16)
        (kq, vq), (ks, vs) = (kd, vd), (None, None)
    if name == "int4" and d == 40:
        assert fmt.scale_cols(d) == 2
    plan = build_plan(BatchLayout([1, 1], [150, 37], [[3, 0, 7, 9, 11, 2, 5, 1, 4, 6], [8, 10, 3]]), 16)
    q = RNG.standard_normal((2, 6, d)).astype(np.float32)
    hc = np.array([0, 0], np.int32)
    want = naive_attention(q, np.asarray(kd, np.float64), np.asarray(vd, np.float64), plan, hc)
    assert rel(C.paged_attention_numba(q, kq, vq, plan, hc, None, ks, vs), want) < 1e-5
    for vals, sc, f in ((kq, ks, fmt), (vq, vs, fmt)):
        np.testing.assert_allclose(
            C.gather_pages_numba(vals, sc, f, np.array([4, 0, 9]), 1),
            A.gather_rows(vals, sc, f if sc is not None else None, np.array([4, 0, 9]), 1),
            rtol=2e-7,
            atol=1e-30,
        )


@pytest.mark.parametrize("name", CPU_FORMATS)
def test_rows_near_float32_range_read_as_their_finite_values(name):
    """K / V rows of magnitude 1e36 (float32 scales hold them; queries of 1e-36 keep the scores near 1): decode
    attention = float64 attention over the dequantized cache and the prefill gather = gather_rows, all finite.
    int4 multiplied each group scale by 2^24 (its nibbles are read as fp16 subnormals) and read such rows as NaN."""
    fmt = Q.FORMATS[name]
    k, v = RNG.standard_normal((2, 6, 2, 16, 64)) * 1e36
    (kq, ks), (vq, vs) = Q.quantize(k, fmt, np.float32), Q.quantize(v, fmt, np.float32)
    kd, vd = Q.dequantize(kq, ks, fmt), Q.dequantize(vq, vs, fmt)
    assert np.isfinite(kd).all() and np.isfinite(vd).all()
    plan = build_plan(BatchLayout([1, 1], [70, 9], [[3, 0, 5, 1, 2], [4]]), 16)
    q = (RNG.standard_normal((2, 6, 64)) * 1e-36).astype(np.float32)
    hc = np.array([0, 0], np.int32)
    want = naive_attention(q, kd, vd, plan, hc)
    got = C.paged_attention_numba(q, kq, vq, plan, hc, None, ks, vs)
    assert np.isfinite(got).all() and rel(got, want) < 1e-5
    for vals, sc in ((kq, ks), (vq, vs)):
        pages = np.array([4, 0, 2])
        got = C.gather_pages_numba(vals, sc, fmt, pages, 1)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, A.gather_rows(vals, sc, fmt, pages, 1), rtol=2e-7, atol=1e-30)
