"""Check kernels/quant_gemv.cu, kernels/quant_gemv_split.cu and layers.cu's gemv_rows without a GPU: their kernels compiled unchanged as host code (tools/quant_host_emu.cu,
nvcc; a thread per CUDA thread, a barrier per warp) on the kernel harness's random weights, against the harness's
float64 references (gguf.quants.dequantize) and tolerances (lserve_lite/harness/quant.py).

What it checks: the format traits' byte layouts and decoders (v1's decode8 and v2's units), both GEMV kernels
(quant_gemv and quant_gemv2), v1's segment staging (rows that are not
16-byte aligned, partial segments), row counts 1..8, output strides, the dequantize kernel's row gather; the
split layout (backends/quant_split.py's repacking, the k-quants' integer sub-scales included) through
quant_gemv_split at 1, 2 and 4 rows per warp (its int8 activations within harness.quant.activation_bound), each
case run twice, with a row group per warp and with a 3-block grid whose warps loop over several (the persistent
grid's pipeline: K steps, ragged last groups), the two outputs equal bit for bit, and quant_dequant_split; the
gate_up GEMVs with SiLU-and-multiply in their epilogue (quant_gemv_split with SILU at 2 and 4 rows per warp, the
same two grids; gemv_rows<n, __half,
true> on fp16 weights) against silu_mul_ref of the float64 product (harness.common.silu_mul_atol), the
plain gemv_rows<n, float>, and the q/k/v GEMVs with the RoPE + K/V write epilogue (`rope`: quant_gemv_split and
gemv_rows with ROPE) bit for bit against the plain kernel's sums rotated in NumPy.
What it cannot: anything about the GPU itself (memory model, alignment faults, speed). The GPU rows
(`lserve-lite kernels test quant_gemv ...`) remain the test; this is for editing the kernels on a machine
without one.

    python3 tools/quant_host_check.py [--quick] [--formats q4_k int8] [--variants silu rows]

Prints one line per case; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lserve_lite.backends.quant_split import SPLIT_FORMATS, split  # noqa: E402
from lserve_lite.backends.reference.layers import silu_mul_ref  # noqa: E402
from lserve_lite.backends.reference.page_stats import merge_page_stats  # noqa: E402
from lserve_lite.engine_args import bounded_int  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.common import silu_mul_atol  # noqa: E402
from lserve_lite.harness.quant import (  # noqa: E402
    GEMV_SHAPES,
    U32,
    activation_bound,
    norm_linear_ref,
    random_quant,
    reference_matrix,
    silu_inputs,
)
from lserve_lite.weights.qtensor import FORMATS, LAYOUTS  # noqa: E402

QUICK_SHAPES = [(1, 96, 37), (3, 256, 9), (8, 2304, 5), (2, 2304, 301)]
# blocks of quant_gemv_split's second run of each case: 24 warps, so each loops over several row groups (K steps,
# M not a multiple of the warps or of R), as the persistent grid does on a GPU (LSERVE_QGEMV_SPLIT=persist); its
# output must equal the first run's (a row group per warp) bit for bit
PERSIST_BLOCKS = 3
# (n, k, I) of the gate_up GEMVs with SiLU-and-multiply (outputs I, weights [2I, K]): odd I, n over the NMAX
# instantiations; rows per warp 2 and 4 run on each
SILU_SHAPES = [(1, 96, 37), (3, 256, 21), (8, 2304, 5), (4, 768, 1), (2, 512, 19), (2, 2304, 61)]
QUICK_SILU_SHAPES = [(1, 256, 21), (5, 512, 9), (2, 2304, 61)]
# (n, k, m) of gemv_rows' NORM instantiations (outputs m; with SiLU m of them from 2m rows); the first runs without
# a residual (a model's first layer)
NORM_SHAPES = [(1, 256, 37), (3, 576, 21), (8, 1024, 9)]


ROW_SLICES = (1, 2)  # gemv_rows' warps per row that are checked
# (n, K, Hq, Hkv, D) of the q/k/v GEMVs with the RoPE epilogue (rope_out.cuh); gemv_rows' run takes n 1, 3 or 8
ROPE_SHAPES = [(1, 256, 4, 2, 64), (3, 512, 6, 3, 128), (8, 256, 4, 2, 32)]
ROPE_PAGE, ROPE_PAGES, ROPE_LEN = 16, 4, 64  # page size, pages and RoPE table rows of its cache


def gemv_rows_source() -> str:
    """The text of gemv_rows in kernels/layers.cu, from its comment to the closing brace of gemv_rows_rope, the last of
    its kernels (the emulator includes it alone: the rest of layers.cu has inline PTX, which cannot run on the host)."""
    src = (ROOT / "kernels" / "layers.cu").read_text()
    found = re.search(r"// Small-batch linear for decode.*?void gemv_rows_rope\(.*?\n}\n", src, re.S)
    if not found or "void gemv_rows(" not in found.group(0):
        raise RuntimeError("gemv_rows not found in kernels/layers.cu")
    return found.group(0)


def build(tmp: Path) -> Path:
    """The emulator, built once per version of its sources (nvcc takes about a minute; CI runs the check twice)."""
    srcs = [ROOT / "tools" / n for n in ("quant_host_emu.cu", "host_emu.cuh")]
    srcs += sorted((ROOT / "kernels").glob("*.cu*"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in srcs)).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / f"lserve_quant_host_emu_{key}"
    if cached.exists():
        return cached
    exe = tmp / "quant_host_emu"
    (tmp / "gemv_rows.inc").write_text(gemv_rows_source())
    cmd = [
        "nvcc",
        "-std=c++17",
        "-w",
        f"-I{ROOT / 'kernels'}",
        f"-I{tmp}",
        "-o",
        str(exe),
        str(ROOT / "tools" / "quant_host_emu.cu"),
    ]
    subprocess.run(cmd, check=True)
    shutil.copy2(exe, cached.with_suffix(".tmp"))
    cached.with_suffix(".tmp").replace(cached)  # atomic: a concurrent run sees all of it or nothing
    return cached


def write_split(tmp: Path, qt) -> list[str]:
    """The split arrays of qt as files q.bin, d.bin, m.bin, s.bin (m / s: the scales again where the format has
    none)."""
    s = split(qt)
    s.q.tofile(tmp / "q.bin")
    s.d.tofile(tmp / "d.bin")
    (s.d if s.m is None else s.m).tofile(tmp / "m.bin")
    (s.d if s.s is None else s.s).tofile(tmp / "s.bin")
    return [str(tmp / f) for f in ("q.bin", "d.bin", "m.bin", "s.bin")]


def check_gemv(
    exe: Path, tmp: Path, fmt: str, n: int, k: int, m: int, rng: np.random.Generator, mode: str = "gemv"
) -> bool:
    qt = random_quant(fmt, m, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float16)
    x[:, :32] *= 50.0  # one block of large activations: its int8 step is 50x the others'
    ldy = m + 3  # a column block of a wider output: columns past m must stay untouched
    x.tofile(tmp / "x.bin")
    outs = [str(tmp / f) for f in ("x.bin", "y.bin")]
    passes = 2 if mode.endswith("p2") else 1
    same = True  # the persistent grid's output equals the full grid's
    if mode.startswith("split"):  # split1 / split2 / split4: R rows per warp; "p2": the logits' two passes;
        # split2d: R = 2 with the deep register sets (quant_gemv_split's UX = 2)
        sizes = [str(v) for v in (n, m, k, ldy, "-2" if mode.startswith("split2d") else mode[5], passes)]
        arrays = write_split(tmp, qt)
        subprocess.run([str(exe), "split", fmt, *sizes, "0", *arrays, *outs], check=True)
        y = np.fromfile(tmp / "y.bin", np.float32).reshape(n, ldy)
        subprocess.run([str(exe), "split", fmt, *sizes, str(PERSIST_BLOCKS), *arrays, *outs], check=True)
        same = bool(np.array_equal(np.fromfile(tmp / "y.bin", np.float32).reshape(n, ldy), y))
    else:
        qt.data.tofile(tmp / "w.bin")
        args = [str(exe), mode, fmt, str(n), str(m), str(k), str(ldy), str(tmp / "w.bin"), *outs]
        subprocess.run(args, check=True)
        y = np.fromfile(tmp / "y.bin", np.float32).reshape(n, ldy)
    ref_w = reference_matrix(qt)
    x64 = x.astype(np.float64)
    bound = np.abs(x64) @ np.abs(ref_w).T
    err = np.abs(y[:, :m] - x64 @ ref_w.T)
    atol = (k / 32 + 20) * U32 * bound
    if mode.startswith("split"):
        atol = atol + activation_bound(x, ref_w, passes)
        bound = atol  # the ratio printed: error / tolerance
    ok = bool(np.all(err <= atol) and np.all(y[:, m:] == 12345.0)) and same
    print(f"{mode:7s} {fmt:5s} N{n} K{k} M{m}: max err / bound {float((err / bound).max()):.2e}"
          f"{'' if same else ', persistent grid differs'} {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return ok


def check_silu(
    exe: Path, tmp: Path, fmt: str | None, n: int, k: int, inter: int, rng: np.random.Generator, r: int = 2
) -> bool:
    """silu(x @ Wg^T) * (x @ Wu^T) in one kernel (fp16 out) against silu_mul_ref of the float64 product: through
    quant_gemv_split with SILU (a split format, R rows per warp), or gemv_rows<n, __half, true> (fmt None: an
    fp16 W). Tolerance: the GEMV's on [g | u] (+ the int8 activations' for split) through silu_mul_atol, plus
    the fp16 output's rounding (2^-10 relative)."""
    ldy = inter + 3 if fmt else inter
    if fmt:
        qt = random_quant(fmt, 2 * inter, k, rng)
        ref_w = reference_matrix(qt)
        args = [str(exe), "ssilu", fmt, *(str(v) for v in (n, inter, k, ldy, r)), "0", *write_split(tmp, qt)]
    else:
        w = (rng.standard_normal((2 * inter, k)) / np.sqrt(k)).astype(np.float16)
        w.tofile(tmp / "w.bin")
        ref_w = w.astype(np.float64)
        args = [str(exe), "gsilu", "-", str(n), str(inter), str(k), str(tmp / "w.bin")]
    x = silu_inputs(rng, n, ref_w).astype(np.float16)
    x[:, :32] *= 8.0  # one block of large activations: its int8 step is 8x the others'
    x.tofile(tmp / "x.bin")
    args += [str(tmp / "x.bin"), str(tmp / "y.bin")]
    subprocess.run(args, check=True)
    y = np.fromfile(tmp / "y.bin", np.float16).reshape(n, ldy).astype(np.float64)
    same = True  # quant_gemv_split's persistent grid gives the same bits
    if fmt:
        args[8] = str(PERSIST_BLOCKS)
        subprocess.run(args, check=True)
        y_persist = np.fromfile(tmp / "y.bin", np.float16).reshape(n, ldy).astype(np.float64)
        same = bool(np.array_equal(y_persist, y))
    x64 = x.astype(np.float64)
    gu = x64 @ ref_w.T
    agu = (k / 32 + 20) * U32 * (np.abs(x64) @ np.abs(ref_w).T)
    if fmt:
        agu = agu + activation_bound(x, ref_w, 1)
    ref = silu_mul_ref(gu)
    tol = silu_mul_atol(gu, agu) + 2.0**-10 * np.abs(ref)
    err = np.abs(y[:, :inter] - ref)
    ok = bool(np.all(err <= tol) and np.all(y[:, inter:] == 12344.0)) and same
    mode = f"ssilu{r}" if fmt else "gsilu"
    print(f"{mode:7s} {fmt or 'f16':5s} N{n} K{k} I{inter}: max err / bound {float((err / tol).max()):.2e}"
          f"{'' if same else ', persistent grid differs'} {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return ok


def check_gemv_rows(exe: Path, tmp: Path, n: int, k: int, m: int, rng: np.random.Generator) -> bool:
    """gemv_rows<n, float> (the plain decode GEMV of fp16 weights) against x @ W^T in float64."""
    x = rng.standard_normal((n, k)).astype(np.float16)
    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float16)
    x.tofile(tmp / "x.bin")
    w.tofile(tmp / "w.bin")
    args = [
        str(exe),
        "grows",
        "-",
        str(n),
        str(m),
        str(k),
        *(str(tmp / f) for f in ("w.bin", "x.bin", "y.bin")),
    ]
    subprocess.run(args, check=True)
    y = np.fromfile(tmp / "y.bin", np.float32).reshape(n, m)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    tol = (k / 32 + 20) * U32 * (np.abs(x64) @ np.abs(w64).T)
    err = np.abs(y - x64 @ w64.T)
    ok = bool(np.all(err <= tol))
    print(
        f"grows   f16   N{n} K{k} M{m}: max err / bound {float((err / tol).max()):.2e} {'PASS' if ok else 'FAIL'}"
    )
    return ok


def check_norm(exe: Path, tmp: Path, n: int, k: int, m: int, rng: np.random.Generator, mode: str,
               first: bool = False) -> bool:  # fmt: skip
    """gemv_rows' NORM instantiation (rms_in.cuh: x + res, RMSNorm, then the GEMV; CudaOps.rmsnorm_linear), `mode`
    grows (plain) or gsilu (gate_up + SiLU-and-multiply), fp16 W: against rmsnorm_ref of the float32 sum rounded
    to fp16 (add_rmsnorm's output) times W in float64, with harness.quant.norm_linear_ref's tolerance. The residual
    stream written must equal x + res in float32 exactly (`first`: no res, it equals x)."""
    silu = mode == "gsilu"
    w = (rng.standard_normal((2 * m if silu else m, k)) / np.sqrt(k)).astype(np.float16)
    x = rng.standard_normal((n, k)).astype(np.float16)
    res = (3.0 * rng.standard_normal((n, k))).astype(np.float32)
    lnw = (1.0 + 0.5 * rng.standard_normal(k)).astype(np.float16)
    eps = 1e-5
    for a, f in ((w, "w.bin"), (x, "x.bin"), (res, "res.bin"), (lnw, "lnw.bin")):
        a.tofile(tmp / f)
    ref, tol, r = norm_linear_ref(x, None if first else res, lnw, eps, w.astype(np.float64), silu, False)
    head = [
        "norm",
        "-" if first else str(tmp / "res.bin"),
        str(tmp / "lnw.bin"),
        str(tmp / "ro.bin"),
        str(eps),
    ]
    files = [str(tmp / f) for f in ("w.bin", "x.bin", "y.bin")]
    subprocess.run([str(exe), *head, mode, "-", str(n), str(m), str(k), *files], check=True)
    y = np.fromfile(tmp / "y.bin", np.float16).reshape(n, m).astype(np.float64)
    tol = tol + 2.0**-10 * np.abs(ref)
    err = np.abs(y - ref)
    res_ok = bool(np.array_equal(np.fromfile(tmp / "ro.bin", np.float32).reshape(n, k), r))
    ok = bool(np.all(err <= tol)) and res_ok
    print(f"n{mode:6s} f16   N{n} K{k} M{m}{' first' if first else ''}: max err / bound "
          f"{float((err / tol).max()):.2e}, residual {'exact' if res_ok else 'WRONG'} {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return ok


# LServe runs of the epilogue's check: dense-pool slots per row count (page 16, logical pages of 8; -1 padding).
# Rows 0-2 of 8 continue a logical page from its offset 5 (merged with its stored statistics), 3-4 start the next
# logical page at its offset 0 (fresh), 5 a new page, 6 a lone row past offset 0, 7 padding.
ROPE_DENSE_SLOTS = {1: [13], 3: [21, 22, 40], 8: [21, 22, 23, 24, 25, 32, 50, -1]}
ROPE_SUB = 2


def rope_rotated(y: np.ndarray, pos, cos, sin, hq: int, hkv: int, d: int) -> np.ndarray:
    """[n, Hq + 2 Hkv, D] fp16 from the plain kernel's float32 sums y: each rounded to fp16, q / k rotated in float32
    with each operation rounded (rope_pairs8's order), then rounded to fp16."""
    h = y.astype(np.float16).reshape(len(y), hq + 2 * hkv, d).astype(np.float32)
    a, b = h[:, : hq + hkv, : d // 2], h[:, : hq + hkv, d // 2 :]
    c = cos[pos][:, None, :].astype(np.float32)
    s = sin[pos][:, None, :].astype(np.float32)
    h[:, : hq + hkv] = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    return h.astype(np.float16)


def rope_scene(rng: np.random.Generator, n: int, hkv: int, d: int, sparse: bool) -> dict[str, np.ndarray]:
    """The epilogue's inputs and sentinel-filled outputs (KV pools, statistics) for one check."""
    p, page = ROPE_PAGES, ROPE_PAGE
    if not sparse:
        slots = rng.choice(p * page, n, replace=False).astype(np.int64)
        if n > 1:
            slots[1] = -1  # a padding row of a captured batch
        return {"slots": slots, "kc": np.full((p, hkv, page, d), 5.0, np.float16),
                "vc": np.full((p, hkv, page, d), 6.0, np.float16)}  # fmt: skip
    hc = np.zeros(hkv, np.int32)
    hc[rng.choice(hkv, hkv // 2, replace=False)] = 1  # half the KV heads streaming
    hs = np.zeros(hkv, np.int32)
    for c in (0, 1):
        hs[hc == c] = np.arange(int((hc == c).sum()))
    nd, ns = int((hc == 0).sum()), int((hc == 1).sum())
    dense = np.asarray(ROPE_DENSE_SLOTS[n], np.int64)
    stream = rng.choice(p * page, n, replace=False).astype(np.int64)
    stream[dense < 0] = -1
    stats = (rng.standard_normal((2, p, nd, ROPE_SUB, d)) * 2).astype(np.float16)
    return {"slots": np.concatenate([dense, stream]), "kc": np.full((p, nd, page, d), 5.0, np.float16),
            "vc": np.full((p, nd, page, d), 6.0, np.float16), "ks": np.full((p, ns, page, d), 3.0, np.float16),
            "vs": np.full((p, ns, page, d), 4.0, np.float16), "hc": hc, "hs": hs,
            "kmax": np.maximum(stats[0], stats[1]), "kmin": np.minimum(stats[0], stats[1])}  # fmt: skip


def rope_expected(h16: np.ndarray, sc: dict[str, np.ndarray], hq: int, hkv: int) -> None:
    """What the epilogue must write into the scene's arrays, from rope_rotated's values: K / V into each KV head's
    pool row at its slot, and the dense pool's statistics through reference/page_stats.merge_page_stats."""
    n = len(h16)
    hc = sc.get("hc", np.zeros(hkv, np.int32))
    hs = sc.get("hs", np.arange(hkv, dtype=np.int32))
    for g in range(hkv):
        cls = int(hc[g])
        kc, vc = (sc["kc"], sc["vc"]) if cls == 0 else (sc["ks"], sc["vs"])
        for r in range(n):
            slot = int(sc["slots"][cls * n + r])
            if slot >= 0:
                kc[slot // ROPE_PAGE, hs[g], slot % ROPE_PAGE] = h16[r, hq + g]
                vc[slot // ROPE_PAGE, hs[g], slot % ROPE_PAGE] = h16[r, hq + hkv + g]
    if "kmax" in sc:
        keys = np.zeros((n, sc["kc"].shape[1], h16.shape[-1]), np.float16)
        dense = np.nonzero(hc == 0)[0]
        keys[:, hs[dense]] = h16[:, hq + dense]
        merge_page_stats(sc["kmax"], sc["kmin"], keys, sc["slots"][:n], ROPE_PAGE)


def check_rope(exe: Path, tmp: Path, fmt: str | None, n: int, k: int, hq: int, hkv: int, d: int,
               rng: np.random.Generator, sparse: bool = False) -> bool:  # fmt: skip
    """The q/k/v GEMV with the RoPE + K/V write epilogue (quant_gemv_split with ROPE for a split format, R = 2;
    gemv_rows<n, __half, false, false, true> for fp16 W, fmt None) against the plain kernel's sums of the same W
    and x (a consistency check: those are checked against float64 above) rotated in NumPy as rope_write_kv
    rounds: q and the written K/V slots equal bit for bit, every other cache value its sentinel (a negative slot
    writes nothing). `sparse`: an LServe cache (two pools by head class, the dense pool's key statistics over runs
    of logical pages, merged or fresh) against reference/page_stats.merge_page_stats."""
    m = (hq + 2 * hkv) * d
    x = rng.standard_normal((n, k)).astype(np.float16)
    pos = rng.integers(0, ROPE_LEN, n).astype(np.int64)
    ang = rng.uniform(0, 2 * np.pi, (ROPE_LEN, d // 2))
    cos, sin = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
    sc = rope_scene(rng, n, hkv, d, sparse)
    sc["q"] = np.full((n, hq, d), 7.0, np.float16)
    order = ("q", "kc", "vc", "ks", "vs", "hc", "hs", "kmax", "kmin")
    for f, a in {"x": x, "pos": pos, "cos": cos, "sin": sin, **sc}.items():
        a.tofile(tmp / f"r_{f}.bin")  # (write_split's files are q / d / m / s.bin)
    tail = [str(tmp / f"r_{f}.bin") for f in ("pos", "slots", "cos", "sin")]
    tail += [str(tmp / f"r_{f}.bin") if f in sc else "-" for f in order]
    nd, ns = sc["kc"].shape[1], sc["ks"].shape[1] if sparse else 0
    sizes = [
        str(v) for v in (n, hq, hkv, d, k, ROPE_PAGE, ROPE_LEN, ROPE_PAGES, nd, ns, ROPE_SUB if sparse else 1)
    ]
    if fmt:
        qt = random_quant(fmt, m, k, rng)
        arrays = write_split(tmp, qt)
        subprocess.run([str(exe), "srope", fmt, *sizes, str(PERSIST_BLOCKS), *arrays, str(tmp / "r_x.bin"), *tail],
                       check=True)  # fmt: skip
        plain = [str(exe), "split", fmt, str(n), str(m), str(k), str(m), "2", "1", "0", *arrays]
    else:
        w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float16)
        w.tofile(tmp / "w.bin")
        subprocess.run(
            [str(exe), "grope", "-", *sizes, str(tmp / "w.bin"), str(tmp / "r_x.bin"), *tail], check=True
        )
        plain = [str(exe), "grows", "-", str(n), str(m), str(k), str(tmp / "w.bin")]
    outs = [f for f in order if f in sc and f not in ("hc", "hs")]
    got = {f: np.fromfile(tmp / f"r_{f}.bin", np.float16).reshape(sc[f].shape) for f in outs}
    subprocess.run([*plain, str(tmp / "r_x.bin"), str(tmp / "y.bin")], check=True)
    h16 = rope_rotated(np.fromfile(tmp / "y.bin", np.float32).reshape(n, m), pos, cos, sin, hq, hkv, d)
    sc["q"][:] = h16[:, :hq]
    rope_expected(h16, sc, hq, hkv)
    bad = [f for f in outs if not np.array_equal(got[f], sc[f])]
    print(f"{'srope2' if fmt else 'grope':7s} {fmt or 'f16':5s} N{n} K{k} Hq{hq} Hkv{hkv} D{d}"
          f"{' LServe' if sparse else ''}: {'PASS' if not bad else 'FAIL (' + ', '.join(bad) + ' differ)'}")  # fmt: skip
    return not bad


def check_dequant(exe: Path, tmp: Path, fmt: str, rng: np.random.Generator, mode: str = "dequant") -> bool:
    m, k, n = 301, 768, 13
    qt = random_quant(fmt, m, k, rng)
    ids = rng.integers(0, m, n).astype(np.int64)
    ids[-1] = m - 1  # the last row: its reads reach the padding
    ids.tofile(tmp / "ids.bin")
    outs = [str(tmp / f) for f in ("ids.bin", "o.bin")]
    if mode == "dsplit":
        args = [str(exe), mode, fmt, str(m), str(k), str(n), *write_split(tmp, qt), *outs]
    else:
        qt.data.tofile(tmp / "w.bin")
        args = [str(exe), mode, fmt, str(m), str(k), str(n), str(tmp / "w.bin"), *outs]
    subprocess.run(args, check=True)
    got = np.fromfile(tmp / "o.bin", np.float16).reshape(n, k).astype(np.float64)
    ref = reference_matrix(qt)[ids]
    ok = bool(np.all(np.abs(got - ref) <= U32 + 2.0**-10 * np.abs(ref)))
    print(f"{mode:7s} {fmt:5s} V{m} H{k} N{n}: {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="three small GEMV shapes per format (seconds, not minutes)"
    )
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--seed", type=bounded_int(0), default=0)  # NumPy refuses a negative seed
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=("gemv", "gemv2", "split", "silu", "rows", "norm", "rope"),
        default=["gemv", "gemv2", "split", "silu", "rows", "norm", "rope"],
        help="quant_gemv (v1), quant_gemv2 (v2), quant_gemv_split (the split formats' default), the split "
        "formats' gate_up GEMV with SiLU-and-multiply (silu), gemv_rows of layers.cu, fp16 weights (rows: "
        "plain, and with SiLU-and-multiply), and gemv_rows' NORM instantiations (norm: residual add + RMSNorm "
        "in the prologue), and the q/k/v GEMVs with the RoPE + K/V write epilogue (rope: split formats and fp16)",
    )
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shapes = QUICK_SHAPES if args.quick else GEMV_SHAPES
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(tmp)
        for fmt in args.formats:
            for n, k, m in shapes:
                if k % LAYOUTS[fmt].block == 0:
                    for mode in args.variants:
                        if mode in ("gemv", "gemv2"):
                            ok &= check_gemv(exe, tmp, fmt, n, k, m, rng, mode)
                        elif mode == "split" and fmt in SPLIT_FORMATS:
                            for r in ("1", "2", "2d", "4", "1p2", "4p2"):
                                ok &= check_gemv(exe, tmp, fmt, n, k, m, rng, f"split{r}")
            ok &= check_dequant(exe, tmp, fmt, rng)
            if "split" in args.variants and fmt in SPLIT_FORMATS:
                ok &= check_dequant(exe, tmp, fmt, rng, "dsplit")
            if "rope" in args.variants and fmt in SPLIT_FORMATS:
                for n, k, hq, hkv, d in ROPE_SHAPES:
                    if k % LAYOUTS[fmt].block == 0:
                        for sparse in (False, True):
                            ok &= check_rope(exe, tmp, fmt, n, k, hq, hkv, d, rng, sparse)
            if "silu" in args.variants and fmt in SPLIT_FORMATS:
                for n, k, inter in QUICK_SILU_SHAPES if args.quick else SILU_SHAPES:
                    if k % LAYOUTS[fmt].block == 0:
                        ok &= all([check_silu(exe, tmp, fmt, n, k, inter, rng, r) for r in (2, 4)])
        for slices in ROW_SLICES:  # gemv_rows with one and with two warps per row (CudaOps.gemv_slices)
            os.environ["EMU_GEMV_SLICES"] = str(slices)
            print(f"gemv_rows, {slices} warp(s) per row:")
            if "rows" in args.variants:
                for n, k, m in shapes:
                    if k % 8 == 0:
                        ok &= check_gemv_rows(exe, tmp, n, k, m, rng)
                for n, k, inter in QUICK_SILU_SHAPES if args.quick else SILU_SHAPES:
                    ok &= check_silu(exe, tmp, None, n, k, inter, rng)
            if "rope" in args.variants:
                for n, k, hq, hkv, d in ROPE_SHAPES:
                    for sparse in (False, True):
                        ok &= check_rope(exe, tmp, None, n, k, hq, hkv, d, rng, sparse)
            if "norm" in args.variants:
                for i, (n, k, m) in enumerate(NORM_SHAPES):
                    ok &= all(
                        [
                            check_norm(exe, tmp, n, k, m, rng, mode, first=i == 0)
                            for mode in ("grows", "gsilu")
                        ]
                    )
    print("all passed" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
