"""tools/profile_decode.py's summary of an ncu CSV log (a synthetic log in ncu's --csv layout)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import profile_decode  # noqa: E402

HEAD = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'


def _row(i: int, name: str, unit: str, value: str, metric: str = "gpu__time_duration.sum") -> str:
    return f'"{i}","1","python3","h","{name}","1","7","(256, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics","{metric}","{unit}","{value}"'


def test_summary_groups_by_kernel_family_per_step(tmp_path):
    log = tmp_path / "prof.csv"
    log.write_text("\n".join([
        "==PROF== Connected to process",
        HEAD,
        _row(0, "void add_rmsnorm<true>(const __half *, const float *, float *, const __half *, __half *, int, float)", "nsecond", "3,000"),
        _row(1, "void gemv_rows<1, __half>(const __half *, const __half *, __half *, int, int)", "usecond", "20.5"),
        _row(2, "paged_attn_decode_d128_s2", "usecond", "6"),
        _row(3, "void add_rmsnorm<true>(const __half *, const float *, float *, const __half *, __half *, int, float)", "ns", "5,000"),  # the H200 image's ncu prints "ns"
        _row(4, "paged_attn_decode_d128_s2", "usecond", "99", metric="sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ]))  # fmt: skip
    out = profile_decode.summarize(log, steps=2, replay_ms=0.05)
    by = {d["kernel"]: d for d in out["kernels"]}
    assert set(by) == {"add_rmsnorm", "gemv_rows", "paged_attn_decode_d128_s2"}
    assert by["add_rmsnorm"]["per_step"] == 1 and abs(by["add_rmsnorm"]["us_per_step"] - 4.0) < 1e-9
    assert abs(by["gemv_rows"]["us_per_step"] - 10.25) < 1e-9
    assert abs(out["sum_us"] - (4.0 + 10.25 + 3.0)) < 1e-9
    assert out["kernels"][0]["kernel"] == "gemv_rows"  # the largest first
