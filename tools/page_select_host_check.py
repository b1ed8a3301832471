"""Check kernels/page_select.cu without a GPU: page_score and page_topk compiled as host code
(tools/page_select_host_emu.cu, nvcc; a thread per CUDA thread, a barrier per warp and per block) on the kernel
harness's setups, against backends/reference/page_select.py::select_pages_ref with the harness's rule
(harness/page_select.py: selected sets equal up to near-ties in fp32 summation order; exact for the integer
SELECT_TIES setups with group_reduce max).

Modes: `select` runs both kernels on the key statistics (short lists: the score kernel's grid is emulated block
by block); `topk` writes the reference's page bounds where page_score would (max: the group max in row 0;
mass: each query head's bound / sqrt(D) in its row) and runs page_topk alone, for long lists (its register,
shared-memory and L2 paths).
What it cannot: anything about the GPU itself (memory model, speed). The GPU rows (`pytest -m gpu
tests/test_gpu_sparse.py -k page_selector`) remain the test; this is for editing the kernels without one.

    python3 tools/page_select_host_check.py [--quick] [--long]

Prints one line per case; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_emu_build import build_emulator  # noqa: E402

from lserve_lite.backends.cuda_attention import (  # noqa: E402
    pack_plan,
    plan_offsets,
    score_grid_x,
    topk_stage_entries,
)
from lserve_lite.backends.reference.page_select import select_pages_ref  # noqa: E402
from lserve_lite.engine_args import bounded_int  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.attention import SPARSE_DECODE, decode_setup  # noqa: E402
from lserve_lite.harness.common import HostCtx  # noqa: E402
from lserve_lite.harness.page_select import (  # noqa: E402
    SELECT_GROUPS,
    SELECT_LONG,
    SELECT_SETUPS,
    SELECT_TIES,
    integer_stats,
    selection_mismatches,
)
from lserve_lite.sparse.selector import page_scores  # noqa: E402

# (mode, setup, page_score's CTAs per list: None = the launcher's score_grid_x; 1 = a warp walks many pages,
# through page-table batches of 32)
QUICK = [("select", "mixed_select", None), ("select", "reused_and_unselected", None),
         ("select", "one_long_15_short", 1), ("select", "group3_smollm2", None), ("topk", "ties_20k_p16", None)]  # fmt: skip
FULL = [
    *(("select", n, gx) for n in [*SPARSE_DECODE, "one_long_15_short", *SELECT_GROUPS] for gx in (None, 1)),
    *(("topk", n, None) for n in SELECT_TIES),
]
LONG = [("topk", n, None) for n in SELECT_LONG if n != "one_long_15_short"]


def bucket(x: int) -> int:
    """CudaOps.prepare_plan's capacity: the next power of two."""
    return 1 << max(0, int(x) - 1).bit_length()


def reference_bounds(b, kmax, kmin, scores: np.ndarray, cap_nnz: int, lse: np.ndarray) -> None:
    """What page_score writes for every selecting (block, dense head): max: the group max in row 0; mass:
    head h's bound / sqrt(D) in row h (scores [Hq * cap_nnz], head g's group at g * group * cap_nnz) and
    its logsumexp as one partial (m, z) of the list's row in lse [cap_qb, Hq, gx, 2] (the others (-inf, 0))."""
    plan = b.plan
    hkv = b.hc.size
    group, d = b.q.shape[1] // hkv, b.q.shape[2]
    for qb in range(plan.num_qblocks):
        keep, lo = int(plan.qb_keep[qb]), int(plan.kv_indptr[2 * qb])
        if keep == 0 or not plan.qb_refresh[qb]:
            continue
        table, _ = plan.pages(qb, 0)
        ctx = int(plan.qb_pos[qb]) + 1
        for g in np.nonzero(b.hc == 0)[0]:
            st = (kmax[:, b.slot[g] : b.slot[g] + 1], kmin[:, b.slot[g] : b.slot[g] + 1])
            qg = b.q[plan.qb_start[qb]].reshape(hkv, group, d)[g]
            row = g * group * cap_nnz + lo
            if plan.group_reduce == "max":
                s = page_scores(qg, *st, table, ctx, group, plan.page_size, "max")[0]
                scores[row : row + s.size] = s
                continue
            for h in range(group):
                s = page_scores(qg[h : h + 1], *st, table, ctx, 1, plan.page_size, "max")[0]
                s = s * np.float32(1 / np.sqrt(d))
                scores[row + h * cap_nnz : row + h * cap_nnz + s.size] = s
                m = np.float32(s.max())
                lse[qb, g * group + h, 0] = (m, np.exp(s - m, dtype=np.float32).sum(dtype=np.float32))


def check(
    exe: Path, tmp: Path, mode: str, name: str, grid_x: int | None, group_reduce: str, seed: int
) -> bool:
    c = HostCtx(seed)
    spec = SELECT_SETUPS.get(name)
    b, kmax, kmin, cap = decode_setup(c, name, spec)
    if name in SELECT_TIES:
        integer_stats(c, b, kmax, kmin)
    plan = b.plan
    plan.group_reduce = group_reduce
    hkv, hq, d = b.hc.size, b.q.shape[1], b.q.shape[2]
    want_sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    want_cnt = np.full((b.num_slots, hkv), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, plan, b.hc, b.slot, want_sel, want_cnt)

    cap_qb, cap_nnz, cap_seq = (bucket(x) for x in (plan.num_qblocks, plan.kv_page.size, len(plan.seq_ctx)))
    offs = plan_offsets(cap_qb, cap_seq, cap_nnz)
    buf = np.zeros(offs["kv_pl"][1], np.int32)
    pack_plan(buf, offs, plan)
    scores = np.full(hq * cap_nnz, np.nan, np.float32)
    gx = grid_x or score_grid_x(cap_nnz, cap_qb, kmax.shape[1], 132)
    lse = np.full((cap_qb, hq, gx, 2), np.nan, np.float32)
    if mode == "topk":
        lse[..., 0], lse[..., 1] = -np.inf, 0.0
        reference_bounds(b, kmax, kmin, scores, cap_nnz, lse)
    files = {
        "plan": buf, "hc": b.hc.astype(np.int32), "hs": b.slot.astype(np.int32), "scores": scores, "lse": lse,
        "sel": np.full_like(want_sel, -1), "cnt": np.full_like(want_cnt, -1),
        "q": b.q.astype(np.float16), "kmax": kmax.astype(np.float16), "kmin": kmin.astype(np.float16),
    }  # fmt: skip
    for k, v in files.items():
        np.ascontiguousarray(v).tofile(tmp / f"{k}.bin")
    sizes = (d, cap_qb, cap_seq, hkv, hq, kmax.shape[1], kmax.shape[2], cap_nnz, plan.page_size.bit_length() - 1,
             gx, cap, topk_stage_entries(cap_nnz))  # fmt: skip
    subprocess.run([str(exe), mode, str(tmp), *(str(x) for x in sizes)], check=True)
    sel = np.fromfile(tmp / "sel.bin", np.int32).reshape(want_sel.shape)
    cnt = np.fromfile(tmp / "cnt.bin", np.int32).reshape(want_cnt.shape)
    hard, near = selection_mismatches(b, kmax, kmin, sel, cnt, want_sel, want_cnt)
    exact = name in SELECT_TIES and group_reduce == "max"
    if exact:
        hard, near = hard + near, 0
    pages = int((plan.kv_indptr[1::2] - plan.kv_indptr[0:-1:2]).max())  # class-0 lists
    ok = hard == 0
    print(
        f"{mode:6s} {name:22s} {group_reduce:4s} grid x {gx:3d} longest list {pages:6d}: {hard} wrong rows, {near} near-tie"
        f" swaps{' (exact)' if exact else ''} {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three setups (CI)")
    ap.add_argument("--long", action="store_true", help="also SELECT_LONG (4096 to 17024 pages; minutes)")
    ap.add_argument("--seed", type=bounded_int(0), default=0)  # NumPy refuses a negative seed
    a = ap.parse_args()
    cases = QUICK if a.quick else FULL + (LONG if a.long else [])
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_emulator("page_select", 2, "page_select_host_emu", tmp)
        for i, (mode, name, grid_x) in enumerate(cases):
            for reduce in ("max", "mass"):
                ok &= check(exe, tmp, mode, name, grid_x, reduce, a.seed + i)
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
