"""Decode GEMV (one token: x is [1, K]) straight from packed quantized weights vs the float32 GEMV, at SmolLM2
and Llama shapes, on 1 and 2 threads: milliseconds per call and GB/s of weight bytes read.

    PYTHONPATH=. python tools/bench_quant_cpu.py [--quick] [--out FILE]

Prints a table and writes --out (default tools/results/bench_quant_cpu.json). Times are the minimum over
repeated calls of `linear_q` (activation quantization and Python overhead included); 1-thread rows also give
the minimum CPU time of the calling thread, which a host busy with other jobs inflates less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from lserve_lite.backends import cpu_kernels as K
from lserve_lite.backends import cpu_threads as C
from lserve_lite.backends.cpu_quant import linear_q
from lserve_lite.engine_args import output_file
from lserve_lite.errors import exit_status
from lserve_lite.weights.qtensor import FORMATS, LAYOUTS, QuantTensor, concat_rows
from lserve_lite.weights.quantize import from_gguf

# [out_features, in_features]: SmolLM2-135M q/o, down, gate/up, lm_head; a Llama-7B/8B square projection
SHAPES = [(576, 576), (576, 1536), (1536, 576), (49152, 576), (4096, 4096)]
OUT = Path(__file__).parent / "results" / "bench_quant_cpu.json"


class Spread:
    """A SplitRunner stand-in that always runs its parts on this and helper threads (cpu.py's helpers)."""

    def __init__(self, parts: int):
        self.parts = parts

    def run(
        self, key, part, bounds: list[int], joint: bool = False, native: C.NativeJob | None = None
    ) -> None:
        """SplitRunner.run's contract (its joint= and native= included) without the timing of the two ways."""
        if len(bounds) < 3 or not C._HELPERS.spread(part, bounds, native):
            for a, b in [(bounds[0], bounds[-1])] if joint else zip(bounds[:-1], bounds[1:]):
                part(a, b)


SCALE_BYTES = {
    "q8_0": (0, 2),
    "q4_0": (0, 2),
    "q4_1": (0, 4),
    "q4_k": (0, 4),
    "q6_k": (208, 210),
    "int4": (0, 2),
}


def random_weight(fmt: str, m: int, k: int, rng: np.random.Generator) -> QuantTensor:
    """Random packed bytes with small finite fp16 scales (speed does not depend on the values)."""
    lay = LAYOUTS[fmt]
    nb = k // lay.block
    data = rng.integers(0, 256, (m, lay.row_bytes(k)), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (m, nb, 2)).astype("<f2").view(np.uint8).reshape(m, nb, 4)
    if fmt == "int8":
        data[:, :2] = scales[:, 0, :2]
    else:
        a, b = SCALE_BYTES[fmt]
        data.reshape(m, nb, lay.block_bytes)[..., a:b] = scales[..., : b - a]
    return QuantTensor(fmt, (m, k), data)


def best_time(fn, budget: float) -> tuple[float, float]:
    """(minimum wall time, minimum CPU time of this thread) of fn() over `budget` seconds of calls."""
    fn()
    wall = cpu = float("inf")
    t_end = time.perf_counter() + budget
    while time.perf_counter() < t_end:
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.thread_time() - c)
    return wall, cpu


def time_f32(x: np.ndarray, w: np.ndarray, threads: int, budget: float) -> tuple[float, float]:
    """The float32 decode GEMV of the CPU backend (cpu_kernels.gemv_rows over row parts)."""
    y = np.empty((1, w.shape[0]), np.float32)
    bounds = C.even_bounds(0, w.shape[0], threads)
    return best_time(
        lambda: Spread(threads).run(None, lambda a, b: K.gemv_rows(x, w, y, a, b), bounds), budget
    )


def time_quant(x: np.ndarray, w: QuantTensor, threads: int, budget: float) -> tuple[float, float]:
    return best_time(lambda: linear_q(x, w, Spread(threads)), budget)


def smollm2_token(budget: float) -> list[dict]:
    """All matrix products of one SmolLM2 decode token from the bundled GGUF's own tensors (30 layers of fused
    q/k/v, o, fused gate/up, down, and the tied Q8_0 head), quantized vs their float32 copies."""
    from lserve_lite.weights.default_model import GGUF_NAME, weights_home
    from lserve_lite.weights.gguf_reader import read_gguf

    path = weights_home() / GGUF_NAME
    if not path.is_file():
        print(f"(no {path}: SmolLM2 per-token figures skipped)")
        return []
    tensors = read_gguf(path)[1]
    q = lambda name: from_gguf(tensors[name])  # noqa: E731
    mats = [q("token_embd.weight")]
    for i in range(30):
        b = f"blk.{i}."
        mats += [concat_rows([q(b + f"attn_{n}.weight") for n in "qkv"]), q(b + "attn_output.weight")]
        mats += [concat_rows([q(b + "ffn_gate.weight"), q(b + "ffn_up.weight")]), q(b + "ffn_down.weight")]
    f32 = [m.dequantize() for m in mats]
    xs = {m.shape[1]: np.ones((1, m.shape[1]), np.float32) for m in mats}
    rows = []
    for threads in (1, 2):
        wall, _ = best_time(lambda: [linear_q(xs[m.shape[1]], m, Spread(threads)) for m in mats], budget)  # noqa: B023
        nbytes = sum(m.nbytes for m in mats)
        rows.append(dict(fmt="smollm2_gguf", threads=threads, ms=wall * 1e3, gbps=nbytes / wall / 1e9))
        wall, _ = best_time(lambda: [time_f32_once(xs[w.shape[1]], w, threads) for w in f32], budget)  # noqa: B023
        nbytes = sum(w.nbytes for w in f32)
        rows.append(dict(fmt="smollm2_f32", threads=threads, ms=wall * 1e3, gbps=nbytes / wall / 1e9))
    for r in rows:
        print(f"SmolLM2 one token, all matmuls, {r['fmt']}, {r['threads']} thread(s): {r['ms']:.2f} ms "
              f"({r['gbps']:.1f} GB/s)")  # fmt: skip
    return rows


def time_f32_once(x: np.ndarray, w: np.ndarray, threads: int) -> None:
    y = np.empty((1, w.shape[0]), np.float32)
    Spread(threads).run(None, lambda a, b: K.gemv_rows(x, w, y, a, b), C.even_bounds(0, w.shape[0], threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per case")
    ap.add_argument(
        "--out",
        type=lambda t: Path(output_file(t)),
        default=OUT,
        help="JSON results file (default tools/results/bench_quant_cpu.json)",
    )
    args = ap.parse_args()
    budget = 0.15 if args.quick else 0.5
    rng = np.random.default_rng(0)
    rows = []
    for m, k in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float32)
        weights = {"f32": rng.standard_normal((m, k)).astype(np.float32)}
        weights.update({f: random_weight(f, m, k, rng) for f in FORMATS if k % LAYOUTS[f].block == 0})
        for fmt, w in weights.items():
            for threads in (1, 2):
                dt, cpu = (time_f32 if fmt == "f32" else time_quant)(x, w, threads, budget)
                row = dict(fmt=fmt, shape=[m, k], threads=threads, ms=dt * 1e3, gbps=w.nbytes / dt / 1e9)
                if threads == 1:  # all on this thread: its CPU time excludes waits for a busy host's cores
                    row.update(cpu_ms=cpu * 1e3, cpu_gbps=w.nbytes / cpu / 1e9)
                rows.append(row)
    print_table(rows)
    rows += smollm2_token(4 * budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(cpu=platform.processor() or platform.machine(), cpus=C.usable_cpus(), loadavg=os.getloadavg())
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}  (load average during the run: {meta['loadavg'][0]:.1f})")


def print_table(rows: list[dict]) -> None:
    by = {(r["fmt"], tuple(r["shape"]), r["threads"]): r for r in rows}
    print("GB/s of weight bytes per GEMV: 1 thread wall / 1 thread CPU time / 2 threads wall")
    print("format " + "".join(f"{m}x{k}".rjust(18) for m, k in SHAPES))
    for fmt in ("f32", *FORMATS):
        cells = []
        for m, k in SHAPES:
            one, two = by.get((fmt, (m, k), 1)), by.get((fmt, (m, k), 2))
            cells.append(f"{one['gbps']:.1f}/{one['cpu_gbps']:.1f}/{two['gbps']:.1f}" if one else "n/a")
        print(fmt.ljust(7) + "".join(c.rjust(18) for c in cells))
    big = [r for r in rows if r["shape"] == [49152, 576] and r["threads"] == 1]
    print(
        "ms at 49152x576, 1 thread (wall / CPU): "
        + ", ".join(f"{r['fmt']} {r['ms']:.2f}/{r['cpu_ms']:.2f}" for r in big)
    )


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
