"""CPU benchmark of the default model: prefill tokens/s (512 prompt tokens) and batch-1 decode tokens/s at
512 and 2048 context, for the model run natively from its Q4_1 GGUF and, beside it, for the same weights as
the float32 checkpoint (`lserve-lite convert`, made on first use by `default_model_dir`).

Prefill is the time to the first token of a fresh prompt (one forward, last row's logits, as llama-bench's
pp test); decode is the median gap between tokens after a prompt of 512 or 2048 tokens. Beside each wall-clock
figure: the process CPU seconds it used, and the host's load, since a shared host skews wall time. The decode
floor of the float32 path is its weight bytes read per token over the best weight-streaming rate measured
here (a GEMV over a 512 MB matrix on one thread and on two); the quantized GEMV is bound by instructions, not
bytes (docs/QUANT.md), so it has no such floor. Prints a table and writes JSON.

llama.cpp, the peer, runs in the same invocation on the same GGUF and threads when `--llama-bench` names a
llama-bench binary (built from source: see docs/QUANT.md): prefill 512 (`-p 512`) and decode at 512 and 2048
context (`-n 64 -d 512,2048`), median of `-r 3`. Without it the llama.cpp column says "not run".

Usage: python tools/bench_cpu.py [--model GGUF] [--float-model DIR] [--llama-bench PATH] [--out tools/results]
       [--steps 48] [--kv-dtypes fp32,int8,int4,fp8   (only the GGUF, once per KV cache format)]
       [--alternate N   (with --llama-bench: only decode, ours and llama.cpp's in turn for N rounds; on a shared
                         host the per-round ratios are steadier than two tables made minutes apart)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from lserve_lite import LLM, EngineConfig, SamplingParams
from lserve_lite.backends import cpu_kernels
from lserve_lite.backends.cpu_threads import SplitRunner, even_bounds
from lserve_lite.config import KV_DTYPES, path_name
from lserve_lite.engine_args import bounded_int, choice_list, existing_file, results_folder
from lserve_lite.errors import InvalidRequestError, exit_status
from lserve_lite.llm import succeeded
from lserve_lite.weights.default_model import default_gguf_path, default_model_dir
from lserve_lite.weights.loader import resolve_model_dir


def llama_cpp(
    binary: str, gguf: str, threads: int, extra: tuple[str, ...] = (), depths: tuple[int, ...] = (512, 2048),
    new: int = 64, reps: int = 3, prefill: bool = True,
) -> dict[str, float]:  # fmt: skip
    """llama-bench's tokens/s on the same rows as ours: prefill 512 (unless not `prefill`), decode (`new` tokens) at
    each depth, mean of `reps` runs. `extra`: more llama-bench flags (the GPU build: -ngl 99 -fa 1); its own folder
    goes on LD_LIBRARY_PATH (a build's shared libraries sit beside it)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(Path(binary).parent), env.get("LD_LIBRARY_PATH")])
    )
    cmd = [binary, "-m", gguf, "-t", str(threads), "-r", str(reps), "-o", "json", *extra]

    def run(*args: str) -> list[dict]:
        try:
            done = subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, env=env)
            return json.loads(done.stdout)
        except (
            OSError,
            subprocess.CalledProcessError,
            json.JSONDecodeError,
        ) as e:  # after minutes of our runs
            why = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or ["no output"]
            raise InvalidRequestError(f"{binary} {' '.join(args)}: {why[-1]}") from None

    rows = (run("-p", "512", "-n", "0") if prefill else []) + run(
        "-p", "0", "-n", str(new), "-d", ",".join(map(str, depths))
    )
    out = {}
    for r in rows:
        key = "prefill_512" if r["n_prompt"] else f"decode_ctx{r.get('n_depth', 0)}"
        out[key] = float(r["avg_ts"])
    return out


def busy_cpus() -> tuple[float, float]:
    """(jiffies busy, jiffies total) summed over all CPUs, from /proc/stat (0, 0 where unreadable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = v[3] + v[4]
    return float(sum(v) - idle), float(sum(v))


class Meter:
    """Wall seconds, this process's CPU seconds and the whole host's busy CPUs over a `with` block."""

    def __enter__(self):
        self.t, self.c, self.b = time.perf_counter(), time.process_time(), busy_cpus()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c
        (b0, t0), (b1, t1) = self.b, busy_cpus()
        ncpu = os.cpu_count() or 1
        host = ncpu * (b1 - b0) / (t1 - t0) if t1 > t0 else float("nan")
        self.others = max(0.0, host - self.cpu / self.wall)  # CPUs kept busy by other processes

    def lap(self) -> float:
        """`others` since the block began or the last lap, and the next lap begun (a bench's rows, one a lap)."""
        self.__exit__()
        self.__enter__()
        return self.others


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Single-thread np.copyto bandwidth (bytes read + written per second), median of `reps`."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(ts)


def gemv_bandwidth(threads: int, nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Weight bytes/s of the decode GEMV kernel over one big matrix on `threads` threads (best run)."""
    w = np.random.default_rng(0).standard_normal((nbytes // 4 // 576, 576), dtype=np.float32)
    x, y = w[:1].copy(), np.empty((1, w.shape[0]), np.float32)
    runner, bounds = SplitRunner(parts=threads, first=1 << 30), even_bounds(0, w.shape[0], threads)
    part = lambda a, b: cpu_kernels.gemv_rows(x, w, y, a, b)  # noqa: E731
    runner.run("bw", part, bounds)  # warm up
    if threads > 1:
        runner._keys["bw"].spread = True
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.run("bw", part, bounds)
        ts.append(time.perf_counter() - t)
    return w.nbytes / min(ts)


def prompt(n: int, vocab: int) -> list[int]:
    """n random token ids of the model's vocabulary (SmolLM2's 49152: ids 100-39999, as in every recorded run)."""
    return [int(t) for t in np.random.default_rng(n).integers(min(100, vocab // 2), min(40000, vocab), n)]


def bench_prefill(llm: LLM, n: int, reps: int) -> dict:
    """Time to first token of an n-token prompt: the median run of `reps`, with its CPU time and load."""
    ids = prompt(n, llm.engine.cfg.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    succeeded(llm.generate([ids[:100]], params))
    runs = []
    for _ in range(reps):
        with Meter() as m:
            outs = llm.generate([ids], params)
        succeeded(outs)  # a failed request is an error, not a time
        runs.append(m)
    m = sorted(runs, key=lambda r: r.wall)[len(runs) // 2]
    return {"tok_s": n / m.wall, "cpu_tok_s": n / m.cpu, "others_busy_cpus": m.others}


def bench_decode(llm: LLM, ctx: int, steps: int) -> dict:
    """Median wall gap between decode tokens after a ctx-token prompt, CPU seconds per token, host load."""
    params = SamplingParams(temperature=0, max_new_tokens=steps + 1, ignore_eos=True)
    stream = llm.stream_outputs(prompt(ctx, llm.engine.cfg.vocab_size), params)
    next(stream)  # the first token comes after the prefill
    stamps, cpus = [time.perf_counter()], [time.process_time()]
    with Meter() as m:
        for _ in stream:
            stamps.append(time.perf_counter())
            cpus.append(time.process_time())
    return {
        "tok_s": 1.0 / float(np.median(np.diff(stamps))),
        "mean_tok_s": (len(stamps) - 1)
        / (stamps[-1] - stamps[0]),  # llama-bench's definition (tokens / time)
        "cpu_tok_s": (len(cpus) - 1) / (cpus[-1] - cpus[0]),
        "others_busy_cpus": m.others,
    }


def weight_bytes(llm: LLM) -> int:
    """Bytes of all weights as the engine holds them (tied lm_head counted once): what a decode step reads."""
    model = llm.engine.runner.model
    arrays = {id(a): a for a in [model.embed, model.lm_head, model.norm]}
    for layer in model.layers:
        arrays.update({id(a): a for a in vars(layer).values() if a is not None})
    return sum(a.nbytes for a in arrays.values())


def bench_model(model: str | None, steps: int, kv_dtype: str = "auto") -> dict:
    """One engine's rows: prefill 512, decode at 512 and 2048 context (KV cache in `kv_dtype`)."""
    llm = LLM(
        model, backend="cpu", config=EngineConfig(prefix_caching=False, kv_dtype=kv_dtype)
    )  # each prefill computes its prompt
    rows = {
        "prefill_512": bench_prefill(llm, 512, 3),
        "decode_ctx512": bench_decode(llm, 512, steps),
        "decode_ctx2048": bench_decode(llm, 2048, steps),
    }
    return {"model": path_name(llm.engine.model_dir), "weight_bytes": weight_bytes(llm), "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--float-model", default=None, help="float32 directory (default: the converted SmolLM2)")
    ap.add_argument("--out", default="tools/results", type=results_folder, help="folder for the results")
    ap.add_argument("--steps", type=bounded_int(1, 4096), default=48, help="decode steps timed per context")
    ap.add_argument(
        "--llama-bench",
        type=existing_file,
        default=None,
        help="a llama-bench binary: run llama.cpp beside us",
    )
    ap.add_argument(
        "--kv-dtypes", type=choice_list(KV_DTYPES), default=None,
        help="e.g. fp32,int8,int4,fp8: only the GGUF, once per KV format",
    )  # fmt: skip
    ap.add_argument(
        "--alternate", type=bounded_int(0, 1000), default=0, metavar="N",
        help="with --llama-bench: only decode, ours and llama.cpp's alternated N rounds (per-round ratios)",
    )  # fmt: skip
    args = ap.parse_args()
    for model in (args.model, args.float_model):  # before minutes of the other model's runs
        if model is not None:
            resolve_model_dir(model)
    if args.llama_bench and args.model and Path(args.model).suffix != ".gguf":
        ap.error(f"--llama-bench runs llama.cpp on the same file: --model {args.model} is not a GGUF")
    load0 = os.getloadavg()[0]
    if args.kv_dtypes:
        return bench_kv(args, load0)
    if args.alternate:
        if not args.llama_bench:
            ap.error("--alternate needs --llama-bench")
        return bench_alternating(args, load0)
    runs = {"native_gguf": bench_model(args.model, args.steps)}
    runs["float32"] = bench_model(args.float_model or str(default_model_dir()), args.steps)
    gguf = args.model or str(default_gguf_path())
    peer = llama_cpp(args.llama_bench, gguf, os.cpu_count() or 1) if args.llama_bench else {}
    bw = {"copy": copy_bandwidth(), "gemv_1_thread": gemv_bandwidth(1), "gemv_2_threads": gemv_bandwidth(2)}
    wf32 = runs["float32"]["weight_bytes"]
    floors = {k: v / wf32 for k, v in bw.items() if k.startswith("gemv")}
    result = {
        **host_record(load0),
        "bandwidth_GBs": {k: v / 1e9 for k, v in bw.items()},
        "float32_decode_floor_tok_s": floors,
        "runs": runs,
        "llama_cpp_same_run": peer or "not run (no --llama-bench)",
    }
    print(
        f"{'tokens/s':<16}{'path':<13}{'wall':>8}{'per CPU-s':>11}{'others busy':>13}{'llama.cpp (same run)':>22}"
    )
    for path, run in runs.items():
        for k, r in run["results"].items():
            print(table_row(k, path, r, peer))
    print(", ".join(f"{p}: weights {r['weight_bytes'] / 1e6:.0f} MB/token" for p, r in runs.items()))
    print("float32 GEMV streaming " + ", ".join(
        f"{k.split('_', 1)[1]} {bw[k] / 1e9:.1f} GB/s -> floor {floors[k]:.1f} tok/s" for k in floors
    ) + f"; copy {bw['copy'] / 1e9:.1f} GB/s; load average {load0:.1f} -> {result['loadavg_1min_at_end']:.1f}")  # fmt: skip
    write_json(args.out, "bench_cpu.json", result)


def table_row(k: str, path: str, r: dict, peer: dict) -> str:
    """One row of the table; llama.cpp's cell says "not run" where it has no figure (no --llama-bench)."""
    theirs = f"{peer[k]:>22.1f}" if k in peer else f"{'not run':>22}"
    return f"{k:<16}{path:<13}{r['tok_s']:>8.1f}{r['cpu_tok_s']:>11.1f}{r['others_busy_cpus']:>8.1f} CPUs{theirs}"


def host_record(load0: float) -> dict:
    """When and where a run was made, and the host's load around it (a shared host skews wall time)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min_at_start": load0,
        "loadavg_1min_at_end": os.getloadavg()[0],
    }


def write_json(out_dir: str, name: str, result: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2))


def bench_alternating(args, load0: float) -> None:
    """Batch-1 decode of the GGUF at 512 and 2048 context, ours and llama.cpp's in turn for `args.alternate` rounds
    (the one going first swapped every round), so that a shared host's drift lands on both alike: each round's
    ratio, and their median. Both sides as llama-bench counts (tokens generated / their time, not a median gap).
    Writes bench_cpu_alternating.json."""
    llm = LLM(args.model, backend="cpu", config=EngineConfig(prefix_caching=False))
    gguf, threads = args.model or str(default_gguf_path()), os.cpu_count() or 1
    rounds = []
    print(f"{'round':<7}{'context':>8}{'ours tok/s':>12}{'llama.cpp':>11}{'ratio':>8}")
    for i in range(args.alternate):
        row = {}
        for ctx in (512, 2048):
            key = f"decode_ctx{ctx}"
            measure = {
                "ours": lambda ctx=ctx: bench_decode(llm, ctx, args.steps)["mean_tok_s"],
                "llama_cpp": lambda ctx=ctx, key=key: llama_cpp(
                    args.llama_bench, gguf, threads, depths=(ctx,), reps=1, prefill=False
                )[key],
            }  # fmt: skip
            order = list(measure) if i % 2 == 0 else list(measure)[::-1]
            got = {name: measure[name]() for name in order}
            row[key] = {**got, "ratio": got["ours"] / got["llama_cpp"], "first": order[0]}
            print(f"{i:<7}{ctx:>8}{got['ours']:>12.1f}{got['llama_cpp']:>11.1f}{row[key]['ratio']:>8.2f}")
        rounds.append(row)
    summary = {
        key: {"median_ratio": statistics.median(r[key]["ratio"] for r in rounds),
              "ratios": [r[key]["ratio"] for r in rounds]}
        for key in rounds[0]
    }  # fmt: skip
    for key, v in summary.items():
        print(
            f"{key}: median ratio {v['median_ratio']:.2f} ("
            + ", ".join(f"{x:.2f}" for x in v["ratios"])
            + ")"
        )
    write_json(
        args.out, "bench_cpu_alternating.json", {**host_record(load0), "rounds": rounds, "summary": summary}
    )


def bench_kv(args, load0: float) -> None:
    """The native GGUF with each KV cache format: what decode gains (fewer KV bytes) or loses (dequantizing each
    row in the Numba kernel) on the CPU. Writes bench_cpu_kv.json."""
    runs = {kv: bench_model(args.model, args.steps, kv) for kv in args.kv_dtypes}
    print(f"{'tokens/s':<16}{'kv':<7}{'wall':>8}{'per CPU-s':>11}{'others busy':>13}")
    for kv, run in runs.items():
        for k, r in run["results"].items():
            print(
                f"{k:<16}{kv:<7}{r['tok_s']:>8.1f}{r['cpu_tok_s']:>11.1f}{r['others_busy_cpus']:>8.1f} CPUs"
            )
    result = {
        **host_record(load0),
        "runs": runs,
    }
    write_json(args.out, "bench_cpu_kv.json", result)


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
