"""tools/bench_e2e on the CPU: the page tables and copies of the batched Llama decode benchmark, the KV capacity per
dtype (the engine's budget and pool sizing on a fake device), the command line and the tables."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_e2e import (  # noqa: E402
    batch_tables,
    format_capacity,
    format_sparse_summary,
    kv_capacity,
    llama3_8b_config,
    llama3_head_classes,
    parse_args,
    sparse_summary,
    tagged,
)


def test_private_rows_own_their_pages_and_get_row_0s_kv():
    tables, copies = batch_tables(3, ctx=130, ps=64, seq_pages=5, private=True, spare0=15)
    assert tables == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert sorted(copies) == sorted([(p, 5 + p) for p in range(3)] + [(p, 10 + p) for p in range(3)])


def test_shared_rows_read_row_0s_pages_and_write_their_own():
    tables, copies = batch_tables(3, ctx=130, ps=64, seq_pages=5, private=False, spare0=5)
    assert tables == [[0, 1, 2, 3, 4], [0, 1, 5, 3, 4], [0, 1, 6, 3, 4]]  # page 2 holds token 130
    assert copies == [(2, 5), (2, 6)]
    slots = {t[130 // 64] * 64 + 130 % 64 for t in tables}
    assert len(slots) == 3  # no two rows write one slot


def _fake_cuda_budget(free: int, fraction: float, weights: int) -> int:
    """CudaOps.kv_budget_bytes (the engine's rule) on a device that reports `free` bytes free."""
    from types import SimpleNamespace

    from lserve_lite.backends.cuda import CudaOps

    ops = CudaOps.__new__(CudaOps)  # no device: only the budget rule runs
    ops._runtime = SimpleNamespace(memGetInfo=lambda: (free, 150 << 30))
    ops.cp = SimpleNamespace(get_default_memory_pool=lambda: SimpleNamespace(free_bytes=lambda: 0))
    return ops.kv_budget_bytes(fraction, weights)


def _capacity(budget: int, supported=("fp16", "int8", "int4", "fp8")) -> list[dict]:
    from lserve_lite.backends.base import alloc_kv_cache
    from lserve_lite.config import EngineConfig

    cfg = llama3_8b_config(8192)
    classes, _ = llama3_head_classes(cfg.num_layers, cfg.num_kv_heads, 0.5)
    alloc = partial(alloc_kv_cache, np.zeros, np.asarray, np.float16)  # CudaOps.alloc_kv's pools, on the host
    return kv_capacity(cfg, EngineConfig(max_num_seqs=1), classes, budget, supported, 2, alloc)


def test_capacity_per_kv_dtype_on_an_h200_sized_budget():
    budget = _fake_cuda_budget(140 << 30, 0.8, 16_060_000_000)
    assert budget == int(((140 << 30) - 16_060_000_000) * 0.8) - (1 << 30)
    rows = {(r["kv_dtype"], r["mode"]): r for r in _capacity(budget)}
    assert len(rows) == 8 and not any("error" in r for r in rows.values())
    # Llama-3-8B: 32 layers x 8 KV heads; fp16 K+V 2 x 128 x 2 B, int8 / fp8 + one fp16 scale each, int4 packed
    # with (scale, min) pairs per 16 channels of K and of V
    per_head = {"fp16": 512, "int8": 260, "fp8": 260, "int4": 2 * (64 + 32)}
    for kv, b in per_head.items():
        d, s = rows[kv, "dense"], rows[kv, "lserve"]
        assert d["bytes_per_token"] == d["allocated_bytes_per_token"] == 32 * 8 * b
        assert (
            d["tokens"] == d["pages"] * 64
            and d["pages"] * d["page_bytes"] <= budget < (d["pages"] + 1) * d["page_bytes"]
        )
        assert d["stream_pages"] == 0 and s["stream_pages"] > 0
        # LServe: half the KV heads in the dense pool (plus its page statistics), the rest a constant ring
        assert s["bytes_per_token"] < 0.7 * d["bytes_per_token"] and s["tokens"] > 1.4 * d["tokens"]
        assert s["pages"] * s["page_bytes"] + s["stream_bytes"] <= budget
        # the sizing counts float32 page statistics; the GPU allocates them in fp16
        assert s["allocated_bytes_per_token"] <= s["bytes_per_token"]
        assert d["startup_line"].startswith(
            f"KV cache {kv}: {d['pages']} pages x 64 tokens = {d['tokens']} tokens"
        )
    assert rows["int8", "dense"]["tokens"] > 1.9 * rows["fp16", "dense"]["tokens"]
    assert rows["fp16", "dense"]["tokens"] > 700_000  # ~98 GiB of KV at 128 KiB a token
    table = format_capacity(list(rows.values()))
    assert "| int8 | dense | 66560 (66560) |" in table and "| fp16 | dense |" in table


def test_capacity_reports_a_dtype_the_gpu_lacks_and_a_budget_too_small():
    rows = _capacity(_fake_cuda_budget(140 << 30, 0.8, 16 << 30), supported=("fp16", "int8", "int4"))
    fp8 = [r for r in rows if r["kv_dtype"] == "fp8"]
    assert len(fp8) == 2 and all("sm_89" in r["error"] for r in fp8)
    small = _capacity(1 << 20)
    assert all("holds no KV page" in r["error"] for r in small)
    assert "holds no KV page" in format_capacity(small)


def test_kv_dtype_option_and_output_names(tmp_path):
    args = parse_args(
        ["--sparse", "--sparse-contexts", "262144", "--kv-dtype", "int8", "--out", str(tmp_path)]
    )
    assert args.kv_dtype == "int8" and args.sparse_contexts == [262144]
    assert args.out == str(tmp_path / "bench_e2e_sparse.json")
    args = parse_args(["--capacity", "--quantize", "int4", "--out", str(tmp_path)])
    assert args.capacity and args.out == str(tmp_path / "bench_e2e_capacity.json")
    args = parse_args([])
    assert args.kv_dtype == "auto" and args.llama_prefill_reps == 3 and not args.capacity
    with pytest.raises(SystemExit):
        parse_args(["--kv-dtype", "fp32"])  # no float32 cache on the GPU


def test_sparse_summary_records_the_kv_dtype():
    rows = [
        dict(context=262144, kind=k, mode=m, ms=ms)
        for k, m, ms in (
            ("decode_step", "sparse", 20.0),
            ("decode_step", "dense", 40.0),
            ("decode_step_overlapped", "sparse", 16.0),
            ("prefill", "dense", 9e4),
        )
    ]
    summary = sparse_summary(rows, 0.005, "int8")
    assert summary[0]["kv_dtype"] == "int8" and summary[0]["decode_step_speedup"] == 2.0
    table = format_sparse_summary(summary)
    assert "| 256k | int8 | 20.00 (50.0) | 40.00 (25.0) | 2.00x |" in table
    assert table.rstrip().endswith("| 16.00 / - |")  # the overlapped step: sparse measured, dense not


def test_tagged_emit_adds_the_kv_dtype_and_keeps_the_result():
    got = []

    def base(r):
        got.append(r)

    base.result, base.save = {"rows": got}, lambda: None
    out = tagged(base, kv_dtype="fp8")
    out(dict(model="m", what="w"))
    assert got == [dict(model="m", what="w", kv_dtype="fp8")] and out.result is base.result


def test_llama_cpp_peer_runs_llama_bench_and_reads_its_json(tmp_path):
    """bench_e2e --llama-bench / bench_cpu: llama-bench is called with the GPU flags and depths given, its folder on
    LD_LIBRARY_PATH (a source build's shared libraries sit beside it), and its JSON rows become our keys."""
    from bench_cpu import llama_cpp

    fake = tmp_path / "bin" / "llama-bench"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, sys\n"
        "a = sys.argv[1:]\n"
        f"open({str(tmp_path / 'calls')!r}, 'a').write(' '.join(a) + ' LD=' + os.environ['LD_LIBRARY_PATH'] + '\\n')\n"
        "p, n = int(a[a.index('-p') + 1]), int(a[a.index('-n') + 1])\n"
        "ds = [int(d) for d in a[a.index('-d') + 1].split(',')] if '-d' in a else [0]\n"
        "print(json.dumps([dict(n_prompt=p, n_gen=n, n_depth=d, avg_ts=1000.0 + d + p) for d in ds]))\n"
    )
    fake.chmod(0o755)
    got = llama_cpp(str(fake), "m.gguf", 4, ("-ngl", "99", "-fa", "1"), (512, 4096), 128)
    assert got == {"prefill_512": 1512.0, "decode_ctx512": 1512.0, "decode_ctx4096": 5096.0}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("-ngl 99 -fa 1" in c and f"LD={fake.parent}" in c for c in calls)
    assert "-n 128 -d 512,4096" in calls[1]
    # bench_cpu --alternate: one decode call per turn, one repetition, no prefill row
    assert llama_cpp(str(fake), "m.gguf", 2, depths=(2048,), reps=1, prefill=False) == {
        "decode_ctx2048": 3048.0
    }
    last = (tmp_path / "calls").read_text().splitlines()[2:]
    assert len(last) == 1 and "-r 1 " in last[0] and "-p 0 -n 64 -d 2048" in last[0]


def test_meter_lap_counts_other_processes(monkeypatch):
    """bench_cpu.Meter.lap (bench_e2e's per-row host load): CPUs busy beyond this process's own use since the last
    lap, then a new lap; a fake /proc/stat makes the host 1.5 CPUs busier than this process."""
    import bench_cpu

    # (busy, total) jiffies at each read: a lap reads twice (end of one, start of the next); 2 CPUs, 1.5 busy, then none
    busy = iter([(0.0, 200.0), (150.0, 400.0), (150.0, 400.0), (150.0, 600.0), (150.0, 600.0)])
    monkeypatch.setattr(bench_cpu, "busy_cpus", lambda: next(busy))
    monkeypatch.setattr(bench_cpu.os, "cpu_count", lambda: 2)
    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0])
    monkeypatch.setattr(bench_cpu.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(bench_cpu.time, "process_time", lambda: 0.0)
    m = bench_cpu.Meter().__enter__()
    assert m.lap() == pytest.approx(1.5)  # 2 CPUs x 150 / 200 jiffies busy, this process idle
    assert m.lap() == pytest.approx(0.0)
