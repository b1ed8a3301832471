"""The CPU backend's Numba kernels and thread split against the NumPy references (float32)."""

import zlib

import numba as nb
import numpy as np
import pytest

from lserve_lite.backends import cpu as C
from lserve_lite.backends import cpu_kernels as K
from lserve_lite.backends import cpu_threads
from lserve_lite.backends.cpu_half import NATIVE_HALF, half_to_f32
from lserve_lite.backends.cpu_native import JOB_SIG, job_address
from lserve_lite.backends.reference import attention as A
from lserve_lite.backends.reference import layers as L
from lserve_lite.sparse.plan import BatchLayout, build_plan

RNG = np.random.default_rng(0)


@nb.njit
def _halves_to_f32(bits, out):
    for i in range(bits.shape[0]):
        out[i] = half_to_f32(bits[i])


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exp32_accuracy_over_the_softmax_domain():
    """Softmax feeds exp with s - max <= 0: about an ulp there (measured 0.95; 4.4 with fastmath "reassoc")."""
    x = np.linspace(-87, 0, 200_001).astype(np.float32)
    row = x.copy()
    K._exp_shift(row, np.float32(0.0))
    want = np.exp(x.astype(np.float64))
    assert (np.abs(row - want) <= 5 * np.spacing(want.astype(np.float32))).all()
    assert np.median(np.abs(row - want) / np.spacing(want.astype(np.float32))) <= 2.0


def test_exp_shift_keeps_its_accuracy_when_a_fastmath_kernel_compiles_it():
    """Numba compiles a kernel that sets no fastmath with the flags of the caller that first compiles it, and caches
    that on disk: `_exp_shift` first compiled for the decode kernel (`_attend_unit`, fastmath "reassoc") folded
    exp32's two-step reduction into one, 4.4 ulp here and 67 on a host without FMA (NUMBA_CPU_NAME=generic), the
    softmax of every later process with that cache. A fresh copy (same options, no disk cache) first compiled
    from a fastmath caller keeps exp32's own accuracy (0.95 ulp)."""
    opts = {k: v for k, v in K._exp_shift.targetoptions.items() if k not in ("cache", "nopython")}
    shift = nb.njit(**opts)(K._exp_shift.py_func)

    @nb.njit(fastmath=K.FAST)
    def caller(row):
        shift(row, np.float32(0.0))

    x = np.linspace(-87, 0, 200_001).astype(np.float32)
    row = x.copy()
    caller(row)
    ulps = np.abs(row - np.exp(x.astype(np.float64))) / np.spacing(np.exp(x).astype(np.float32))
    assert ulps.max() <= 1.5 and np.median(ulps) <= 0.5


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_and_elementwise_kernels(m):
    x, r = RNG.standard_normal((2, m, 576), dtype=np.float32)
    w = RNG.standard_normal((1000, 576), dtype=np.float32)
    y = np.empty((m, 1000), np.float32)
    K.gemv_rows(x, w, y, 0, 1000)
    assert rel(y, x @ w.T) < 1e-5
    g = RNG.standard_normal(576, dtype=np.float32)
    h, res = np.empty_like(x), np.empty_like(x)
    K.add_rmsnorm(x, r, g, 1e-5, h, res)
    assert rel(h, L.rmsnorm_ref(x + r, g, 1e-5)) < 1e-5 and np.array_equal(res, x + r)
    gu = RNG.standard_normal((m, 3072), dtype=np.float32) * 6
    out = np.empty((m, 1536), np.float32)
    K.silu_mul(gu, out)
    assert rel(out, L.silu_mul_ref(gu)) < 1e-5


def test_rope_write_kv_matches_ref():
    cos, sin = RNG.standard_normal((2, 100, 32), dtype=np.float32)
    qkv = RNG.standard_normal((4, 960), dtype=np.float32)
    pos, slots = np.array([5, 17, 99, 0]), np.array([3, 70, 200, 64])
    k1, v1 = np.zeros((2, 5, 3, 64, 64), np.float32)
    k2, v2 = k1.copy(), v1.copy()
    q1 = L.rope_write_kv_ref(qkv, pos, slots, k1, v1, cos, sin)
    q2 = np.empty_like(q1)
    K.rope_write_kv(qkv, pos, slots, k2, v2, C.NO_SCALES, C.NO_SCALES, cos, sin, q2)
    assert rel(q2, q1) < 1e-6 and np.array_equal(k1, k2) and np.array_equal(v1, v2)


def test_fp16_kv_write_rounds_as_numpy():
    """An fp16 cache written by the Numba kernel (float32 -> fp16 bits in compiled code) holds NumPy's float16 of
    the reference's rotated K/V, bit for bit, Inf on overflow included; its load converts back exactly."""
    if not NATIVE_HALF:  # the engine offers no fp16 KV there; compiling the write would abort the process
        pytest.skip("fp16 KV needs the host's half conversions")
    cos, sin = RNG.standard_normal((2, 100, 32), dtype=np.float32)
    qkv = RNG.standard_normal((4, 960), dtype=np.float32) * np.float32(3000.0)
    qkv[0, 9 * 64 : 10 * 64] = 1e6  # a key beyond fp16's range
    pos, slots = np.array([5, 17, 99, 0]), np.array([3, 70, 200, 64])
    k1, v1 = np.zeros((2, 5, 3, 64, 64), np.float32)
    L.rope_write_kv_ref(qkv, pos, slots, k1, v1, cos, sin)
    k2, v2 = np.zeros((2, 5, 3, 64, 64), np.float16)
    with np.errstate(over="ignore"):
        k16, v16 = k1.astype(np.float16), v1.astype(np.float16)
    q = np.empty((4, 9, 64), np.float32)
    K.rope_write_kv(
        qkv, pos, slots, k2.view(np.uint16), v2.view(np.uint16), C.NO_SCALES, C.NO_SCALES, cos, sin, q
    )
    assert np.array_equal(k2.view(np.uint16), k16.view(np.uint16)) and np.isinf(k2).any()
    assert np.array_equal(v2.view(np.uint16), v16.view(np.uint16))
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    out = np.empty(bits.size, np.float32)
    _halves_to_f32(bits, out)
    assert np.array_equal(out[finite], bits.view(np.float16)[finite].astype(np.float32))
    assert np.array_equal(np.isinf(out), np.isinf(bits.view(np.float16)))


def test_fp16_bits_convert_without_native_half(monkeypatch):
    """A host without F16C (or NUMBA_CPU_NAME=generic) converts fp16 bits in integer code (cpu_half.half_ir), which
    int4's nibbles go through: inside the kernels' fastmath loops its conversion once met int4's scale factor 2^24
    (`cpu_kv.NIBBLE_UNIT`) as a folded constant 2^136 = Inf, so every int4 score was NaN (0 * Inf) or Inf. Compiled
    here with that path: a nibble times its scale as `_dots_int4` forms it, and every fp16 code, exactly."""
    from lserve_lite.backends import cpu_half, cpu_kv

    monkeypatch.setattr(cpu_half, "NATIVE_HALF", False)  # read as the functions below compile

    @nb.njit(fastmath=K.FAST)
    def scaled_nibbles(b, s, out):
        for i in range(b.shape[0]):
            lo, hi = cpu_kv._nibbles(b[i])
            out[i, 0], out[i, 1] = lo * (s[i] * cpu_kv.NIBBLE_UNIT), hi * (s[i] * cpu_kv.NIBBLE_UNIT)

    b, s = np.arange(256, dtype=np.uint8), RNG.random(256).astype(np.float32) + np.float32(0.5)
    out = np.empty((256, 2), np.float32)
    scaled_nibbles(b, s, out)
    np.testing.assert_allclose(out, np.stack([b & 15, b >> 4], 1) * s[:, None].astype(np.float64), rtol=1e-7)
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    nb.njit(_halves_to_f32.py_func)(bits, got)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan]) and np.isnan(got[nan]).all()


def naive_attention(q, k_cache, v_cache, plan, head_class):
    """Dense float64 attention with the plan's masks, one (row, head) at a time."""
    n, hq, d = q.shape
    page, group = k_cache.shape[2], hq // k_cache.shape[1]
    out = np.zeros((n, hq, d))
    for qb in range(plan.num_qblocks):
        ctx = plan.seq_ctx[plan.qb_seq[qb]]
        for hh in range(hq):
            cls = head_class[hh // group]
            pages, lpages = plan.pages(qb, cls)
            kpos = (lpages[:, None] * page + np.arange(page)).reshape(-1)
            k = k_cache[pages, hh // group].reshape(-1, d).astype(np.float64)
            v = v_cache[pages, hh // group].reshape(-1, d).astype(np.float64)
            for r in range(plan.qb_len[qb]):
                row, qpos = plan.qb_start[qb] + r, plan.qb_pos[qb] + r
                ok = (kpos <= qpos) & (kpos < ctx)
                if cls == 1:
                    ok &= (kpos < plan.sink) | (qpos - kpos < plan.local)
                s = np.where(ok, k @ q[row, hh] / np.sqrt(d), -np.inf)
                p = np.exp(s - s.max())
                out[row, hh] = p @ v / p.sum()
    return out.reshape(n, -1)


@pytest.mark.parametrize(
    "q_lens,ctx_lens,sink,local,hc",
    [
        ([1], [512], 0, 0, [0, 0, 0]),
        ([1, 1, 1], [700, 1, 64], 0, 0, [0, 0, 0]),
        ([1, 1], [900, 300], 128, 256, [1, 0, 1]),
        ([5, 8, 1], [1000, 130, 65], 64, 100, [1, 1, 0]),
        ([200], [1500], 64, 300, [0, 1, 0]),
    ],
)
def test_attention_paths_agree(q_lens, ctx_lens, sink, local, hc):
    kc, vc = RNG.standard_normal((2, 64, 3, 64, 64), dtype=np.float32)
    perm, tables = [int(p) for p in RNG.permutation(64)], []
    for c in ctx_lens:
        tables.append(perm[: -(-c // 64)])
        perm = perm[-(-c // 64) :]
    plan = build_plan(BatchLayout(q_lens, ctx_lens, tables), 64, sink=sink, local=local)
    q = RNG.standard_normal((sum(q_lens), 9, 64), dtype=np.float32)
    hc = np.array(hc, np.int32)
    want = naive_attention(q, kc, vc, plan, hc)
    assert rel(A.paged_attention_ref(q, kc, vc, plan, hc), want) < 1e-5
    assert rel(C.paged_attention_numba(q, kc, vc, plan, hc), want) < 1e-5


@pytest.mark.parametrize("n", [1, 3, 8, 20])
@pytest.mark.parametrize("fmt", ["f32", "int8", "q4_1+f32"])
def test_gate_up_silu_is_silu_mul_of_linear(n, fmt):
    """CpuOps.gate_up_silu composes linear and silu_mul (nothing fused on the CPU): bit-identical results, for
    float, quantized and row-stacked weights, decode and prefill rows."""
    from lserve_lite.harness.quant import random_quant
    from lserve_lite.weights.qtensor import RowStack
    from lserve_lite.weights.quantize import quantize_int8

    ops = C.CpuOps()
    k, inter = 256, 37
    w = RNG.standard_normal((2 * inter, k), dtype=np.float32) / 16
    if fmt == "int8":
        w = quantize_int8(w)
    elif fmt == "q4_1+f32":
        w = RowStack((random_quant("q4_1", inter, k, RNG), w[inter:]))
    x = RNG.standard_normal((n, k), dtype=np.float32)
    got = ops.gate_up_silu(x, ops.upload(w))
    assert got.shape == (n, inter) and got.dtype == np.float32
    assert np.array_equal(got, ops.silu_mul(ops.linear(x, ops.upload(w))))


def test_sound_rows_is_sound_rows_ref_in_one_pass():
    """The CPU sampler's soundness check (every logit finite, not all equal), one Numba pass over integer order keys
    instead of NumPy's max and min, flags what sound_rows_ref flags: NaN of either sign, +-inf at either end or
    inside, rows all equal (+0.0 and -0.0 mixed), float32's extremes, random bit patterns; any layout."""
    from lserve_lite.backends.reference.sampling import sound_rows_ref

    rng = np.random.default_rng(5)
    x = rng.standard_normal((24, 37)).astype(np.float32)
    for row, (col, v) in enumerate([(0, np.nan), (36, -np.nan), (5, np.nan), (0, np.inf), (36, -np.inf),
                                    (9, np.inf), (3, -np.inf)]):  # fmt: skip
        x[row, col] = v
    x[7], x[8], x[9, ::2] = 2.5, -0.0, 0.0  # all equal: 2.5, -0.0, +0.0 and -0.0 mixed
    x[9, 1::2] = -0.0
    x[10, 0], x[10, 1:] = np.nextafter(np.float32(1), np.float32(2)), 1.0
    x[11, 0], x[11, 1] = np.finfo(np.float32).max, np.finfo(np.float32).min
    x[12], x[12, 4] = np.finfo(np.float32).max, np.inf
    x[13], x[13, 2] = -0.0, np.float32(1e-45)  # the smallest subnormal above zeros
    bits = rng.integers(-(2**31), 2**31, (10, 37)).astype(np.int32)
    x[14:] = bits.view(np.float32)  # NaNs, infs, subnormals among them
    with np.errstate(invalid="ignore"):
        want = sound_rows_ref(x)
    assert want[:14].tolist() == [False] * 10 + [True, True, False, True] and 0 < want[14:].sum() < 10
    for view in (x, x[::2], x[:, 1:-1], np.asfortranarray(x)):
        got = np.ones(len(view), np.bool_)
        with np.errstate(invalid="ignore"):
            want = sound_rows_ref(view)
        assert K.sound_rows(view, got) == want.sum() and got.tolist() == want.tolist()


def test_split_runner_results_do_not_depend_on_threads():
    ops = C.CpuOps()
    ops.split = C.SplitRunner(parts=2, first=1 << 30)
    x = RNG.standard_normal((300, 576), dtype=np.float32)
    w = RNG.standard_normal((960, 576), dtype=np.float32)
    one, many = ops.linear(x[:1], w), ops.linear(x, w)
    for st in ops.split._keys.values():
        st.spread = True
    assert np.array_equal(one, ops.linear(x[:1], w)) and np.array_equal(many, ops.linear(x, w))


def test_split_runner_passes_helper_errors_to_the_caller():
    runner = C.SplitRunner(parts=2, first=1 << 30)
    runner.run("k", lambda a, b: None, [0, 1, 2])
    runner._keys["k"].spread = True

    def part(a, b):
        if a == 1:
            raise ValueError("helper part")

    with pytest.raises(ValueError, match="helper part"):
        runner.run("k", part, [0, 1, 2])


def _decode_case(rng, ctx, page, fmt_name, streaming, selected):
    """One batch-1 decode step (9 query heads on 3 KV heads, head dim 64) over a fresh random cache in format
    `fmt_name`: (q, stored K/V and scales, the float64 dequantized K/V, plan, head classes)."""
    from lserve_lite.kv import quant as Q

    n_pages = -(-ctx // page)
    pool = (n_pages + 3, 3, page, 64)
    k, v = rng.standard_normal((2, *pool))
    k += rng.uniform(-2, 2, 64)  # channel offsets, as post-RoPE keys
    if fmt_name in ("fp32", "fp16"):
        kq, vq = k.astype(fmt_name.replace("fp", "float")), v.astype(fmt_name.replace("fp", "float"))
        ks = vs = None
        kd, vd = kq.astype(np.float64), vq.astype(np.float64)
    else:
        fmt = Q.FORMATS[fmt_name]
        (kq, ks), (vq, vs) = Q.quantize(k, fmt, np.float32), Q.quantize(v, fmt, np.float32)
        kd, vd = Q.dequantize(kq, ks, fmt), Q.dequantize(vq, vs, fmt)
    table = [int(p) for p in rng.permutation(pool[0])[:n_pages]]
    sink, local = (page, 2 * page + 5) if streaming else (0, 0)
    plan = build_plan(BatchLayout([1], [ctx], [table]), page, sink=sink, local=local)
    if selected and n_pages > 2:  # dense heads visit a random subset of their pages (the last one kept)
        keep = np.append(rng.random(n_pages - 1) < 0.5, True)
        lists = [(p[keep], lp[keep]) for p, lp in [plan.pages(0, 0)]] + [plan.pages(0, 1)]
        plan.kv_page = np.concatenate([p for p, _ in lists]).astype(np.int32)
        plan.kv_lpage = np.concatenate([lp for _, lp in lists]).astype(np.int32)
        plan.kv_indptr = np.cumsum([0, *(len(p) for p, _ in lists)]).astype(np.int32)
    hc = np.array([1, 0, 1] if streaming else [0, 0, 0], np.int32)
    q = rng.standard_normal((1, 9, 64)).astype(np.float32)
    return q, (kq, vq, ks, vs), (kd, vd), plan, hc


@pytest.mark.parametrize("fmt_name", ["fp32", "fp16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("ctx", [1, 63, 64, 65, 517, 2049])
@pytest.mark.parametrize("streaming,selected", [(False, False), (True, False), (False, True), (True, True)])
def test_batch1_decode_attention_matches_float64(fmt_name, page, ctx, streaming, selected):
    """The decode kernels (pages cut into runs whose softmax sums are merged) = float64 attention over the
    dequantized cache, GQA, streaming heads' sink + local window, selected page lists; the same bits on one
    thread and spread over threads in any number of parts."""
    rng = np.random.default_rng(zlib.crc32(f"{fmt_name} {page} {ctx} {streaming} {selected}".encode()))
    q, (kq, vq, ks, vs), (kd, vd), plan, hc = _decode_case(rng, ctx, page, fmt_name, streaming, selected)
    want = naive_attention(q, kd, vd, plan, hc)
    got = C.paged_attention_numba(q, kq, vq, plan, hc, None, ks, vs)
    assert rel(got, want) < 1e-5
    for parts in (2, 3):
        runner = C.SplitRunner(parts=parts, first=1 << 30)
        C.paged_attention_numba(q, kq, vq, plan, hc, runner, ks, vs)
        for st in runner._keys.values():
            st.spread = True
        assert np.array_equal(C.paged_attention_numba(q, kq, vq, plan, hc, runner, ks, vs), got)


@pytest.mark.parametrize("kv", ["float32", "uint16"])
def test_each_float_cache_type_has_a_decode_attention_job_of_its_own(kv):
    """The decode attention job of a float cache type (fp32, or fp16 as its bits) holds paged_attention compiled
    for that type only: one job for both held both, so an fp16 process loaded the fp32 code too (the chat's RSS,
    docs/QUANT.md)."""
    job = nb.cfunc(JOB_SIG, error_model="numpy", cache=True)(K.ATTENTION_JOBS[np.dtype(kv)])
    compiled = {f.name for f in job._library._shared_module.functions if "15paged_attention" in f.name}
    assert len(compiled) == 1


@pytest.mark.parametrize("fmt_name", ["fp32", "fp16", "int8"])
def test_spread_decode_attention_of_a_float_cache_is_a_native_job(fmt_name, monkeypatch):
    """Decode attention spread over a float cache (fp32, fp16) runs the helpers' parts as a native job: a Python
    part waits for the GIL and an OS wake-up (as long as the whole call at 512 keys), so spreading lost to one
    thread. This thread's parts run the job too, spread or not: `paged_attention`'s own dispatcher is never
    called (nor loaded). Quantized caches keep Python parts. The bits are one thread's either way."""
    rng = np.random.default_rng(zlib.crc32(fmt_name.encode()))
    q, (kq, vq, ks, vs), _, plan, hc = _decode_case(rng, 517, 64, fmt_name, False, False)
    native, spread = [], cpu_threads._HELPERS.spread

    def spy(part, bounds, job=None):
        native.append(job is not None and job()[0] != 0)
        return spread(part, bounds, job)

    monkeypatch.setattr(cpu_threads._HELPERS, "spread", spy)
    want = C.paged_attention_numba(q, kq, vq, plan, hc, None, ks, vs)
    if fmt_name != "int8":  # the job compiled before the kernel's name it calls is rebound below
        job_address(K.ATTENTION_JOBS[C.kernel_view(kq, ks).dtype])
    calls, kernel = [], K.paged_attention
    monkeypatch.setattr(K, "paged_attention", lambda *a: calls.append(a[-3:]) or kernel(*a))
    runner = C.SplitRunner(parts=2, first=1 << 30)
    assert np.array_equal(C.paged_attention_numba(q, kq, vq, plan, hc, runner, ks, vs), want)  # one thread
    for st in runner._keys.values():
        st.spread = True
    assert np.array_equal(C.paged_attention_numba(q, kq, vq, plan, hc, runner, ks, vs), want)
    assert native == [fmt_name != "int8"]
    assert sorted(calls) == ([] if fmt_name != "int8" else [(0, 1, 2), (0, 2, 2), (1, 2, 2)])
