"""The one-launch Numba page selector (backends/numba_page_select.py): against select_pages_ref in Numba's CUDA
simulator, and compiled to PTX for the GPU. The simulator is chosen when numba.cuda is first imported, so the checks run in a subprocess with
NUMBA_ENABLE_CUDASIM=1 and this process's numba.cuda (other tests, a real GPU) is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# SPARSE_DECODE's format (harness/attention.py): contexts, Hq, head classes, D, page, sub_pages, budget in
# pages per sequence, (sink, local) per sequence, refresh per sequence (None: all). Small: the simulator runs
# every thread in Python.
CASES = {
    "mixed": ([300, 200, 16 * 9], 8, "0110", 32, 16, 8, [6, 8, 9], [(16, 32)] * 3, None),
    "ragged_reuse_fits": (
        [16 * 8 + 1, 100, 50, 150],
        6,
        "010",
        32,
        16,
        2,
        [5, 3, 0, 4],
        [(16, 32)] * 4,
        [0, 1, 1, 1],
    ),  # fmt: skip
    "gqa4_d64": ([330], 8, "00", 64, 32, 4, [4], [(0, 0)], None),
    # more pages (41) than a chunk of the mass logsumexp's two-level reduction (CHUNK 16 of THREADS 32
    # partials); one page dominates the first head of each group (_one_page_dominates)
    "mass_one_page": ([16 * 40 + 3], 4, "00", 32, 16, 2, [6], [(0, 0)], None),
}
THREADS = 32
# the subprocesses import lserve_lite from this checkout, installed or not (pytest's own sys.path is not inherited)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                  os.environ.get("PYTHONPATH")]))}  # fmt: skip


def test_numba_selector_matches_reference_in_simulator():
    """The cases split over one simulator process per core (each runs every thread in Python)."""
    env = {**ENV, "NUMBA_ENABLE_CUDASIM": "1"}
    parts = max(1, min(os.cpu_count() or 1, len(CASES)))
    procs = [
        subprocess.Popen([sys.executable, __file__, "sim", str(i), str(parts)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(parts)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    assert sum(out.count("ok") for out, _ in outs) == 2 * len(CASES) + 1, outs


def test_numba_selector_limits_are_named_before_a_launch():
    """The shapes the kernel's shared arrays cannot hold (more than MAX_GROUP query heads a KV head, a head_dim or a
    sub_pages it does not tile) are named by `unsupported`, which the CUDA backend checks at startup with
    LSERVE_SELECTOR=numba (a 16-query-head group failed at its first page selection)."""
    code = (
        "from lserve_lite.backends.numba_page_select import MAX_GROUP, unsupported\n"
        "assert unsupported(32, 8, 128, 4) is None and unsupported(8 * MAX_GROUP, 8, 128, 4) is None\n"
        "assert 'query heads per KV head' in unsupported(16 * MAX_GROUP, 8, 128, 4)\n"
        "assert 'head_dim 100' in unsupported(32, 8, 100, 4)\n"
        "assert 'sub_pages 64' in unsupported(32, 8, 128, 64)\n"
        "print('ok')\n"
    )
    env = {**ENV, "NUMBA_ENABLE_CUDASIM": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-2000:]


def test_numba_selector_compiles_for_the_gpu():
    """PTX for sm_80 and sm_90 with the GPU's argument types (float16 statistics), as NVRTC checks the
    RawKernels (tests/test_kernels_compile.py); skipped where Numba finds no NVVM."""
    r = subprocess.run(
        [sys.executable, __file__, "ptx"], env=ENV, capture_output=True, text=True, timeout=600
    )
    if r.returncode == 0 and r.stdout.startswith("skip"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.count("ptx ok") == 2, r.stdout + r.stderr[-3000:]


def _ptx() -> int:
    import types

    import numba.cuda.dispatcher
    from numba import cuda
    from numba import types as nt
    from numba.cuda.cudadrv.error import NvvmSupportError

    from lserve_lite.backends.numba_page_select import page_select_kernel

    a = lambda dt, n: nt.Array(dt, n, "C")  # noqa: E731
    i32, i64, f16 = nt.int32, nt.int64, nt.float16
    sig = (a(f16, 3), a(f16, 4), a(f16, 4), a(i32, 1), i64, i64, a(i32, 1), a(i32, 1), a(nt.float32, 1),
           a(nt.uint32, 1), i64, a(i32, 1), a(i32, 3), a(i32, 2), i64, i64, nt.float32)  # fmt: skip
    for cc in ((8, 0), (9, 0)):
        # device functions take the compute capability of the current device: there is none here
        numba.cuda.dispatcher.get_current_device = lambda cc=cc: types.SimpleNamespace(compute_capability=cc)
        try:
            ptx, _ = cuda.compile_ptx(page_select_kernel.py_func, sig, cc=cc)
        except NvvmSupportError as e:
            print(f"skip: no NVVM ({e})")
            return 0
        assert ".local" not in ptx and ".f64" not in ptx  # no spills to local memory, no double math
        print(f"sm_{cc[0]}{cc[1]} ptx ok ({len(ptx)} chars)")
    return 0


def _run_case(name: str, spec: tuple, group_reduce: str, seed: int) -> None:
    from numba import cuda

    from lserve_lite.backends.cuda_attention import pack_plan, plan_offsets
    from lserve_lite.backends.numba_page_select import launch_shape, page_select_kernel, score_rows
    from lserve_lite.backends.reference.page_select import select_pages_ref
    from lserve_lite.harness.attention import decode_setup
    from lserve_lite.harness.common import Ctx
    from lserve_lite.harness.page_select import selection_mismatches

    assert cuda.simulator.__name__ in type(cuda.to_device(np.zeros(1))).__module__
    c = Ctx.__new__(Ctx)  # the host half of a harness context: its generator (no CuPy here)
    c.rng = np.random.default_rng(seed)
    b, kmax, kmin, cap = decode_setup(c, name, spec)
    plan = b.plan
    plan.group_reduce = group_reduce
    if name == "mixed":
        b.q[0] = 0  # every score of the first sequence ties: the lowest indices win, as in top_pages
    if name == "mass_one_page":
        _one_page_dominates(b, kmax, kmin, 16)
    hkv = b.hc.size
    want_sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    want_cnt = np.full((b.num_slots, hkv), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, plan, b.hc, b.slot, want_sel, want_cnt)

    cap_qb, cap_seq, cap_pages = plan.num_qblocks + 1, len(plan.seq_ctx) + 1, int(plan.kv_page.size) + 5
    offs = plan_offsets(cap_qb, cap_seq, cap_pages)
    buf = np.zeros(offs["kv_pl"][1], np.int32)
    pack_plan(buf, offs, plan)
    d, sub, ps = b.q.shape[2], kmax.shape[2], plan.page_size
    grid, block = launch_shape(cap_qb, cap_pages, hkv, d, sub, THREADS)
    rows = score_rows(cap_qb, cap_pages)
    # device arrays, as on the GPU: scores and its uint32 view share memory (numpy arguments would be copied)
    scores = cuda.to_device(np.full(b.q.shape[1] * rows, np.nan, np.float32))
    counter = cuda.to_device(np.zeros(cap_qb * hkv, np.int32))
    d_sel, d_cnt = cuda.to_device(np.full_like(want_sel, -1)), cuda.to_device(np.full_like(want_cnt, -1))
    f16 = lambda a: np.ascontiguousarray(a, np.float16)  # noqa: E731  (the GPU's storage)
    launches = 2 if name == "mixed" else 1  # twice: the counters the last CTAs reset serve the next launch
    for _ in range(launches):
        page_select_kernel[grid, block](
            f16(b.q), f16(kmax), f16(kmin), buf, cap_qb, cap_seq, b.hc, b.slot, scores, scores.view(np.uint32),
            rows, counter, d_sel, d_cnt, ps.bit_length() - 1, ps.bit_length() - sub.bit_length(),
            np.float32(1 / np.sqrt(d)),
        )  # fmt: skip
        assert not counter.copy_to_host().any()
    sel, cnt = d_sel.copy_to_host(), d_cnt.copy_to_host()
    hard, near = selection_mismatches(b, kmax, kmin, sel, cnt, want_sel, want_cnt)
    diff = [
        (s, g, sel[s, g].tolist(), want_sel[s, g].tolist(), int(cnt[s, g]), int(want_cnt[s, g]))
        for s in range(sel.shape[0])
        for g in range(hkv)
        if not np.array_equal(sel[s, g], want_sel[s, g])
    ]
    assert hard == 0, (name, group_reduce, hard, diff)
    print(f"{name} {group_reduce}: ok ({near} near-tie swaps)")


def _one_page_dominates(b, kmax, kmin, e: int) -> None:
    """Entry e of the first block's list gets a bound about 90 (after / sqrt(D)) above the rest for the first
    query head of each group only (channel 0; the group's other heads have q = 0 there): with mass, that
    head's logsumexp over the list is its bound at e, so its weight elsewhere is ~0 and the selection follows
    the other heads. A logsumexp reduction that drops the partial holding e (thread e of the 32 here) makes
    the first head's other weights ~1/n and changes the selection (it did: the chunk reduction started from
    its own pair, not the chunk's first)."""
    plan, hkv = b.plan, b.hc.size
    group = b.q.shape[1] // hkv
    table, _ = plan.pages(0, 0)
    phys, tok = int(table[e]), int(plan.qb_start[0])
    for g in range(hkv):
        b.q[tok, g * group, 0] = 8.0
        b.q[tok, g * group + 1 : (g + 1) * group, 0] = 0.0
        kmax[phys, b.slot[g], :, 0] = 64.0
        kmin[phys, b.slot[g], :, 0] = np.minimum(kmin[phys, b.slot[g], :, 0], 64.0)


def _main(part: int, parts: int) -> int:
    """Cases part, part + parts, ... (the last part also the short key copy's case)."""
    import lserve_lite.backends.numba_page_select as nps
    from lserve_lite.config import GROUP_REDUCE

    for i, (name, spec) in enumerate(CASES.items()):
        if i % parts == part:
            for group_reduce in GROUP_REDUCE:
                _run_case(name, spec, group_reduce, seed=100 + i)
    if part == parts - 1:
        # lists longer than the shared key copy: the top-k reads the scores rows (the simulator reads module
        # constants when it runs)
        nps.MAX_KEYS = 4
        _run_case("mixed", CASES["mixed"], "max", seed=7)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["ptx"]:
        sys.exit(_ptx())
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or len(sys.argv) != 4 or sys.argv[1] != "sim":
        sys.exit("usage: NUMBA_ENABLE_CUDASIM=1 python3 tests/test_numba_selector.py sim PART PARTS")
    sys.exit(_main(int(sys.argv[2]), int(sys.argv[3])))
