"""Check kernels/sampling.cu without a GPU: argmax_rows, sound_rows, the sampling kernels (histogram path with and without bin
lists, and the radix path) logprob_rows and min_p_mask compiled as host code (tools/sampling_host_emu.cu, nvcc; a thread per
CUDA thread, a barrier per warp and per block), launched as backends/cuda_sampling.py launches them, against the
CPU references (np.argmax; backends/reference/sampling.py: sound_rows_ref, sample_row, logprobs_ref) on the
harness's rows (harness/sampling.py: mixed temperature / top-k / top-p rows, and "hard" rows that crowd a bin or mask the row).
What it cannot: anything about the GPU itself (memory model, speed). The GPU rows (`pytest -m gpu
tests/test_gpu_ops.py -k sampling`) remain the test; this is for CI and for editing the kernels without one.

    python3 tools/sampling_host_check.py

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

from lserve_lite.backends.cuda_sampling import LIST_ELEMENTS, ROW_CHUNK  # noqa: E402
from lserve_lite.backends.reference.sampling import logprobs_ref, sample_row, sound_rows_ref  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.sampling import sampling_rows  # noqa: E402


def run(exe: Path, tmp: Path, mode: str, rows: int, vocab: int, *args) -> None:
    """The emulator on DIR tmp: `mode rows vocab`, the launchers' chunk, then the mode's own arguments."""
    subprocess.run([str(exe), mode, str(tmp), *(str(a) for a in (rows, vocab, ROW_CHUNK, *args))], check=True)


def report(what: str, miss: int, ok: bool) -> bool:
    print(f"{what:48s} {miss} mismatches {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def check_argmax(exe: Path, tmp: Path, rng: np.random.Generator) -> bool:
    """argmax_rows, and with host ids (a greedy overlapped step's) the same ids in its second output (poisoned
    with -1)."""
    ok = True
    for b, vocab, ties, host in [(3, 9000, True, False), (2, 4099, False, False), (17, 8193, False, True)]:
        x = (rng.standard_normal((b, vocab)) * 3).astype(np.float32)
        x = np.round(x) if ties else x
        x.tofile(tmp / "logits.bin")
        run(exe, tmp, "argmax", b, vocab, 0, int(host))
        got, want = np.fromfile(tmp / "out.bin", np.int64), np.argmax(x, axis=1)
        miss = int(np.sum(got != want))
        if host:
            miss += int(np.sum(np.fromfile(tmp / "host.bin", np.int64) != want))
        what = f"argmax_rows B{b} V{vocab}{' ties' if ties else ''}{' + host ids' if host else ''}"
        ok &= report(what, miss, miss == 0)
    return ok


def check_sound(exe: Path, tmp: Path, rng: np.random.Generator) -> bool:
    """Rows with a NaN, +-inf, all equal (zeros), equal but for one logit, and random ones, over several chunks:
    sound_rows, and argmax_rows asked for the flags from its own pass (ids, flags and host ids: a greedy
    overlapped step)."""
    b, vocab = 7, 2 * ROW_CHUNK + 5
    x = rng.standard_normal((b, vocab)).astype(np.float32)
    x[0, vocab - 1] = np.nan
    x[1, ROW_CHUNK] = np.inf
    x[2, 3] = -np.inf
    x[3] = 0.0
    x[4] = 2.5
    x[4, ROW_CHUNK + 1] = 2.5000002
    x.tofile(tmp / "logits.bin")
    run(exe, tmp, "sound", b, vocab)
    got, want = np.fromfile(tmp / "out.bin", np.uint8), sound_rows_ref(x)
    assert want.tolist() == [False, False, False, False, True, True, True], want
    ok = report(f"sound_rows B{b} V{vocab}", int(np.sum(got != want)), np.array_equal(got, want))
    run(exe, tmp, "argmax", b, vocab, 1, 1)
    flags, ids = np.fromfile(tmp / "sound.bin", np.uint8), np.fromfile(tmp / "out.bin", np.int64)
    fine = want.astype(bool)  # argmax over NaN / inf rows is not asked of it
    miss = int(np.sum(flags != want)) + int(np.sum(ids[fine] != np.argmax(x[fine], axis=1)))
    miss += int(np.sum(np.fromfile(tmp / "host.bin", np.int64) != ids))
    return ok & report(f"argmax_rows + sound + host ids B{b} V{vocab}", miss, miss == 0)


def check_sample(exe: Path, tmp: Path, rng: np.random.Generator) -> bool:
    ok = True
    for b, vocab, kind in [(6, 9001, "mixed"), (8, 6000, "hard")]:
        x, params = sampling_rows(rng, b, vocab, kind)
        t, k, p, u = params
        want = [
            int(np.argmax(x[i])) if t[i] == 0 else sample_row(x[i], t[i], int(k[i]), p[i], u[i])
            for i in range(b)
        ]
        x.tofile(tmp / "logits.bin")
        params.tofile(tmp / "params.bin")
        for lists, radix in [(1, 0), (0, 0), (0, 1)]:
            run(exe, tmp, "sample", b, vocab, lists, radix)
            miss = int(np.sum(np.fromfile(tmp / "out.bin", np.int64) != np.asarray(want)))
            path = "radix path" if radix else ("bin lists" if lists else "a pass a selection")
            ok &= report(f"sample_rows B{b} V{vocab} {kind}, {path}", miss, miss == 0)
    return ok


def check_min_p(exe: Path, tmp: Path, rng: np.random.Generator) -> bool:
    """min_p_mask, then the sampling path (bin lists) on its output, against sample_row with min_p: mixed rows,
    ties, and rows where no logit passes the rule (a NaN, a +inf: only the first of the order is kept)."""
    b, vocab = 8, 5000
    x, params = sampling_rows(rng, b, vocab, "mixed")
    params[0] = np.where(params[0] == 0, 1.0, params[0])  # sampled rows: min_p does not apply to greedy ones
    x[1] = np.round(x[1])
    x[2, 17], x[3, 99] = np.nan, np.inf
    min_p = rng.choice([0.0, 0.01, 0.1, 0.5], b)
    min_p[1:4] = 0.05
    t, k, p, u = params
    want = [sample_row(x[i], t[i], int(k[i]), p[i], u[i], min_p[i]) for i in range(b)]
    x.tofile(tmp / "logits.bin")
    params.tofile(tmp / "params.bin")
    min_p.tofile(tmp / "minp.bin")
    run(exe, tmp, "minp", b, vocab)
    (tmp / "logits_out.bin").replace(tmp / "logits.bin")
    run(exe, tmp, "sample", b, vocab, 1, 0)
    miss = int(np.sum(np.fromfile(tmp / "out.bin", np.int64) != np.asarray(want)))
    return report(f"min_p_mask + sample_rows B{b} V{vocab}", miss, miss == 0)


def check_logprobs(exe: Path, tmp: Path, rng: np.random.Generator) -> bool:
    ok = True
    for b, vocab, k, ties in [(3, 9000, 20, True), (2, 4099, 5, False), (1, 777, 0, False)]:
        x = (rng.standard_normal((b, vocab)) * 4).astype(np.float32)
        x = np.round(x) if ties else x
        chosen = rng.integers(0, vocab, b)
        x.tofile(tmp / "logits.bin")
        chosen.astype(np.int64).tofile(tmp / "chosen.bin")
        run(exe, tmp, "logprobs", b, vocab, k)
        lp, ids = (
            np.fromfile(tmp / "lp.bin", np.float32),
            np.fromfile(tmp / "ids.bin", np.int64).reshape(b, k),
        )
        top = np.fromfile(tmp / "top.bin", np.float32).reshape(b, k)
        want_lp, want_ids, want_top = logprobs_ref(x, chosen, k)
        err = float(max(np.max(np.abs(lp - want_lp)), np.max(np.abs(top - want_top), initial=0.0)))
        miss = int(np.sum(ids != want_ids))
        good = miss == 0 and err <= 1e-5
        ok &= report(f"logprob_rows R{b} V{vocab} k{k}{' ties' if ties else ''} (err {err:.1e})", miss, good)
    return ok


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help; it takes no options
    assert LIST_ELEMENTS >= 8 * 9001, "these rows take the bin lists as the launcher would"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_emulator("sampling", 1, "sampling_host_emu", tmp)
        ok = (
            check_argmax(exe, tmp, rng)
            & check_sound(exe, tmp, rng)
            & check_sample(exe, tmp, rng)
            & check_logprobs(exe, tmp, rng)
        )
        ok &= check_min_p(exe, tmp, rng)
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
