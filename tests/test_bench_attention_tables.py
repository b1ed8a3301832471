"""tools/bench_attention's chunked section on the CPU: the spot-check of a chunk's rows against the reference, the
ratios to fp16 and the table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_attention import CHECK_ROWS, check_chunked, format_chunked, with_fp16_ratios  # noqa: E402

from lserve_lite.backends.reference.attention import paged_attention_ref  # noqa: E402
from lserve_lite.kv.quant import FORMATS, quantize  # noqa: E402
from lserve_lite.sparse.plan import BatchLayout, build_plan  # noqa: E402


@pytest.mark.parametrize("kv", ["fp16", "int8", "int4"])
def test_check_chunked_passes_the_reference_output_and_catches_a_wrong_row(kv):
    """A 2 * CHECK_ROWS + 64-row chunk over 300 cached tokens, shuffled pages of 16: the reference's own output of
    the whole chunk passes; one wrong value in a checked row fails."""
    rng = np.random.default_rng(0)
    hq, hkv, d, page, cached, n = 4, 2, 32, 16, 300, 2 * CHECK_ROWS + 64
    pages = -(-(cached + n) // page) + 2
    table = [int(p) for p in rng.permutation(pages)[: -(-(cached + n) // page)]]
    layout = BatchLayout([n], [cached + n], [table])
    q = rng.standard_normal((n, hq, d)).astype(np.float16)
    k, v = (rng.standard_normal((pages, hkv, page, d)).astype(np.float16) for _ in "kv")
    scales = ()
    if kv != "fp16":
        fmt = FORMATS[kv]
        (k, ks), (v, vs) = quantize(k, fmt, np.float16), quantize(v, fmt, np.float16)
        scales = (ks, vs)
    plan = build_plan(layout, page)
    fmt = FORMATS[kv] if scales else None
    out = paged_attention_ref(q.astype(np.float32), k, v, plan, np.zeros(hkv, np.int32), *scales, fmt=fmt)
    out = out.astype(np.float16)
    got = check_chunked(q, k, v, scales, kv, layout, out)
    assert got["ok"] and got["rows"] == 2 * CHECK_ROWS and got["max_abs_err"] < 2e-3
    out[n - 1, 5] += 0.2  # the last row: the one that sees the whole context
    bad = check_chunked(q, k, v, scales, kv, layout, out)
    assert not bad["ok"] and bad["max_abs_err"] > 0.1


def test_ratios_to_fp16_and_the_chunked_table():
    row = {
        "cached": 32768, "chunk": 2048,
        "ours": {"kv": "fp16", "kernel": "wgmma", "ms": 2.0, "tflops": 300.0,
                 "check": {"rows": 128, "max_abs_err": 1e-4, "rel_err": 3e-3, "ok": True}},
        "ours_int8": {"kv": "int8", "kernel": "mma", "ms": 2.6, "tflops": 230.0,
                      "check": {"rows": 128, "max_abs_err": 2e-4, "rel_err": 5e-3, "ok": False}},
        "ours_fp8": {"error": "RuntimeError: no sm_89"},
        "ours_mma": {"kv": "fp16", "kernel": "mma", "ms": 2.5, "tflops": 240.0},
    }  # fmt: skip
    with_fp16_ratios(row)
    assert row["ours_int8"]["x_fp16"] == pytest.approx(1.3)
    assert row["ours_int8"]["x_fp16_mma"] == pytest.approx(1.04)
    assert (
        "x_fp16" not in row["ours"]
        and "x_fp16_mma" not in row["ours_mma"]
        and "x_fp16" not in row["ours_fp8"]
    )
    lines = format_chunked([row])
    assert "| 2048 new over 32k | int8 | mma | 2.6 | 230 | 1.300 | 1.040 | 0.0002 (0.005) FAIL |" in lines
    assert "| 2048 new over 32k | fp16 | wgmma | 2 | 300 | - | - | 0.0001 (0.003) |" in lines
    assert "| 2048 new over 32k | ours_fp8 | n/a | n/a | n/a | - | - |  |" in lines
