"""tools/profile_decode.py's summary of an ncu CSV log (a synthetic log in ncu's --csv layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_summarize_refuses_what_is_not_an_ncu_log_in_one_line(tmp_path, capsys):
    """A missing log, --steps 0, a file without ncu's header, a unit it does not know and a log without kernel
    times were tracebacks (FileNotFoundError, ZeroDivisionError, IndexError / ValueError, KeyError)."""
    from lserve_lite.errors import exit_status

    cases = {
        "other.csv": ("a,b,c,d,e,f\n1,2,3,4,5,6\n", "not an ncu --csv log"),
        "empty.csv": ("", "not an ncu --csv log"),
        "unit.csv": (HEAD + "\n" + _row(0, "k", "furlong", "3"), "a kernel time of '3' 'furlong' is not a time"),
        "none.csv": (HEAD + "\n" + _row(0, "k", "usecond", "3", metric="sm__throughput.avg"), "no gpu__time_duration.sum rows"),
    }  # fmt: skip
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        assert exit_status(lambda log=str(tmp_path / name): profile_decode.main(["--summarize", log])) == 1
        assert msg in capsys.readouterr().err.splitlines()[-1], name
    for argv, msg in ((["--summarize", str(tmp_path / "missing.csv")], "file not found"),
                      (["--summarize", str(tmp_path / "unit.csv"), "--steps", "0"], "--steps: 0 is outside [1,")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            profile_decode.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
