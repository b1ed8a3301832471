"""The K/V-write cases of the kernel harness (harness/kv_write.py), which the GPU rows and the CUDA kernels' host
emulation check against, run through the CPU backend's Numba writes: the cases and their checks pass for every
quantized format (dense and LServe's two pools), and fail for int4 when the keys skip the Hadamard basis (the
check can fail). Consistency of our own kernels with our reference layers, not an independent reference. Also the
harness's clear_pages case (NumPy's zeroed pages) with the CPU clear and broken ones as its kernel."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lserve_lite.backends import cpu as C
from lserve_lite.backends import cpu_kernels as K
from lserve_lite.backends.cpu_kv import kernel_view
from lserve_lite.harness.common import HostCtx
from lserve_lite.harness.kv_write import SPARSE_DIMS, WriteCase, check_write, dense_case, sparse_case
from lserve_lite.harness.layers import case_clear_pages
from lserve_lite.kv.quant import quantize


def _empty_pools(case: WriteCase) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (
            np.zeros((*p.shape, p.fmt.packed_dim(case.d)), p.fmt.value_dtype),
            np.full((*p.shape, p.fmt.scale_cols(case.d)), np.nan, np.float32),
        )
        for p in case.pools
    ]


def _dense_write(case: WriteCase, hadamard: bool) -> list:
    pools = _empty_pools(case)
    (kq, ks), (vq, vs) = pools
    n, live = case.pos.size, case.slots >= 0
    q = np.empty((n, case.hq, case.d), np.float32)
    scratch = [
        a.copy() for pair in pools for a in pair
    ]  # the padding rows' q, as a captured batch computes it
    K.rope_write_kv(case.qkv, case.pos, np.maximum(case.slots, 0), kernel_view(scratch[0], scratch[1]),
                    kernel_view(scratch[2], scratch[3]), scratch[1], scratch[3], case.cos, case.sin, q, None,
                    hadamard)  # fmt: skip
    q_live = np.empty((int(live.sum()), case.hq, case.d), np.float32)  # the same rows' q again
    K.rope_write_kv(case.qkv[live], case.pos[live], case.slots[live], kernel_view(kq, ks), kernel_view(vq, vs), ks,
                    vs, case.cos, case.sin, q_live, None, hadamard)  # fmt: skip
    return check_write(case, "cpu.rope_write_kv", q, pools)


def _sparse_write(case: WriteCase, hadamard: bool) -> list:
    """The CPU backend's LServe write of the live rows (it takes no slot -1: it runs no captured batches), and of
    every row into scratch pools for q, as _dense_write."""
    pools, sp = _empty_pools(case), case.sparse
    kmax, kmin = sp["kmax"].copy(), sp["kmin"].copy()
    live = case.slots[0] >= 0

    def write(rows, slots, pools, kmax, kmin):
        vals, scales = [v for v, _ in pools], tuple(s for _, s in pools)
        return C.rope_write_kv_sparse_numba(case.qkv[rows], case.pos[rows], *slots, *vals, sp["hc"], sp["hs"],
                                            case.cos, case.sin, kmax, kmin, scales, hadamard)  # fmt: skip

    scratch = [tuple(a.copy() for a in pair) for pair in pools]
    q = write(slice(None), np.maximum(case.slots, 0), scratch, kmax.copy(), kmin.copy())
    write(live, case.slots[:, live], pools, kmax, kmin)
    return check_write(case, "cpu.rope_write_kv_sparse", q, pools, (kmax, kmin))


@pytest.mark.parametrize("kv", ["int8", "int4", "fp8"])
def test_write_cases_pass_through_the_cpu_kernels(kv):
    c = HostCtx(7)
    for dims in [(9, 3, 64, 64, 13), (8, 2, 128, 16, 11)]:
        case = dense_case(c, kv, *dims)
        results = _dense_write(case, case.hadamard)
        assert all(r.ok for r in results), results
    for d in SPARSE_DIMS:
        case = sparse_case(c, kv, d)
        results = _sparse_write(case, case.hadamard)
        assert all(r.ok for r in results), results
        assert (case.hadamard, len(results)) == (kv in ("int4", "fp8"), 11)


def test_write_cases_fail_int4_keys_left_in_the_plain_basis():
    c = HostCtx(8)
    case = dense_case(c, "int4", 9, 3, 64, 64, 13)
    assert case.hadamard
    bad = {r.kernel for r in _dense_write(case, False) if not r.ok}
    assert {"cpu.rope_write_kv.q", "cpu.rope_write_kv.k"} <= bad and "cpu.rope_write_kv.v" not in bad
    case = sparse_case(c, "int4")
    bad = {r.kernel for r in _sparse_write(case, False) if not r.ok}
    assert {"cpu.rope_write_kv_sparse.kd", "cpu.rope_write_kv_sparse.kmax"} <= bad


def test_write_cases_fail_lserve_scales_too_large():
    """The step bound is taken from the scales a kernel wrote, so an LServe write with int8 scales 40x too large
    (values rounded against them: 5 bits lost) passed every row; its scale rows must fail."""
    c = HostCtx(9)
    case = sparse_case(c, "int8")
    pools = []
    for p in case.pools:
        vals = np.zeros((*p.shape, case.d), np.int8)
        sc = np.full((*p.shape, 1), np.nan, np.float16)
        pg, off = p.slots // case.page, p.slots % case.page
        rows = p.ref[pg, :, off]
        big = (np.abs(rows).max(-1, keepdims=True) / 127 * 40).astype(np.float16)
        vals[pg, :, off] = np.round(rows / big.astype(np.float64))
        sc[pg, :, off] = big
        pools.append((vals, sc))
    stats = (case.sparse["want_max"], case.sparse["want_min"])
    bad = {r.kernel for r in check_write(case, "w", case.q_ref, pools, stats) if not r.ok}
    assert bad == {"w.kd_scale", "w.vd_scale", "w.ks_scale", "w.vs_scale"}


def test_write_cases_fail_a_padding_row_written():
    """Only the live slots were read back, so a quantized write that also stored its padding rows (slot -1 taken
    as the pool's last slot) passed; the scales of every other row must keep their NaN poison."""
    c = HostCtx(3)
    case = dense_case(c, "int8", 9, 3, 64, 64, 13)
    assert (case.slots < 0).any() and case.pools[0].shape[0] * case.page - 1 not in case.slots
    pools = _empty_pools(case)
    for (vals, sc), p in zip(pools, case.pools, strict=True):
        pg, off = p.slots // case.page, p.slots % case.page
        vals[pg, :, off], sc[pg, :, off] = quantize(p.ref[pg, :, off], p.fmt, np.float32)
        vals[-1, :, -1], sc[-1, :, -1] = vals[pg[0], :, off[0]], sc[pg[0], :, off[0]]  # the stray write
    bad = {r.kernel: r.note for r in check_write(case, "w", case.q_ref, pools) if not r.ok}
    assert bad == {f"w.{n}_scale": "3 written where nothing should be" for n in "kv"}


def test_write_cases_fail_an_lserve_padding_row_written():
    """The LServe write cases had no padding row (the GPU harness's and the host emulation's), so a quantized
    rope_write_kv_sparse that stored one (its slot -1 check removed: the emulation still passed all 116 rows) went
    unseen; a captured decode batch pads with such rows. A stray write of a padding row must fail."""
    c = HostCtx(5)
    case = sparse_case(c, "int8")
    pad = case.slots[0] < 0
    assert pad.any() and (case.slots[1][pad] < 0).all() and case.q_ref.shape[0] == case.pos.size
    pools = _empty_pools(case)
    for (vals, sc), p in zip(pools, case.pools, strict=True):
        pg, off = p.slots // case.page, p.slots % case.page
        vals[pg, :, off], sc[pg, :, off] = quantize(p.ref[pg, :, off], p.fmt, np.float32)
    stats = (case.sparse["want_max"], case.sparse["want_min"])
    assert all(r.ok for r in check_write(case, "w", case.q_ref, pools, stats))
    vals, sc = pools[0]  # the padding row's keys at slot -1, taken as the dense pool's last slot
    assert vals.shape[0] * case.page - 1 not in case.slots[0]
    vals[-1, :, -1], sc[-1, :, -1] = vals[0, :, 0], 1.0
    bad = {r.kernel: r.note for r in check_write(case, "w", case.q_ref, pools, stats) if not r.ok}
    assert bad == {"w.kd_scale": "2 written where nothing should be"}


def _clear_pages_rows(clear) -> list:
    """The harness's clear_pages case with the host as its device and `clear(cache, pages, stream_pages)` as its
    kernel."""
    c = HostCtx(4)
    c.cp = SimpleNamespace(asarray=np.array, asnumpy=np.asarray)
    c.ops = SimpleNamespace(clear_pages=clear)
    return case_clear_pages(c)


def test_clear_pages_case_passes_the_cpu_clear_and_fails_broken_ones():
    """clear_pages is a GPU kernel `kernels test` had no case for (README: every GPU kernel); its case passes the
    CPU backend's clear and fails a clear that misses the streaming pools, one a page off, and one that does
    nothing."""
    rows = _clear_pages_rows(lambda cache, p, s: C.CpuOps.clear_pages(None, cache, p, s))
    assert len(rows) == 7 and all(r.ok for r in rows), rows

    def dense_only(cache, pages, stream_pages):
        C.CpuOps.clear_pages(None, cache, pages, np.array([], np.int64))

    def off_by_one(cache, pages, stream_pages):
        C.CpuOps.clear_pages(None, cache, (pages + 1) % 12, stream_pages)

    def nothing(cache, pages, stream_pages):
        pass

    for broken, bad in ((dense_only, 2), (off_by_one, 4), (nothing, 6)):
        assert sum(not r.ok for r in _clear_pages_rows(broken)) == bad, broken.__name__


def test_compare_fails_a_stray_or_missing_value_under_an_infinite_tolerance():
    """An infinite atol marks entries a kernel must leave alone (qkv_rope's unwritten cache slots, NaN on both
    sides); a value written there, or a NaN left where the reference has one, must still fail."""
    from lserve_lite.harness.common import compare

    ref, tol = np.array([1.0, np.nan]), np.array([1e-3, np.inf])
    assert compare("k", "s", [1.0, np.nan], ref, tol, 0).ok
    stray = compare("k", "s", [1.0, 5.0], ref, tol, 0)
    assert not stray.ok and stray.note == "1 written where nothing should be"
    assert not compare("k", "s", [np.nan, np.nan], ref, np.inf, 0).ok
