"""The GPU's split layout of every format (backends/quant_split.py), on the CPU: repacking is exact.
Reference: the `gguf` package's own dequantization for the GGUF formats (independent), our
QuantTensor.dequantize for int8 / int4 (itself checked against the documented layout in test_quant_kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends.quant_split import SPLIT_FORMATS, dequantize, split
from lserve_lite.harness.quant import random_quant, reference_matrix


@pytest.mark.parametrize("fmt", list(SPLIT_FORMATS))
def test_split_layout_keeps_every_value(fmt):
    """Exactly QuantTensor.dequantize, and gguf.quants.dequantize up to its own float32 rounding: it computes
    q4_k's d * sc * q - dmin * m (and q6_k's d * sc * q, q4_1's d * q + m) in float32, exact products but one
    rounding of the result, so |gguf - exact| <= 2^-24 |exact|."""
    rng = np.random.default_rng(3)
    k = 768 if SPLIT_FORMATS[fmt].sub else 384
    qt = random_quant(fmt, 7, k, rng)
    s = split(qt)
    f = SPLIT_FORMATS[fmt]
    assert s.q.shape == (7, k * f.bits // 8) and s.q.dtype == np.uint8
    assert s.d.shape == (7, f.groups(k)) and s.d.dtype == np.float16
    assert (s.m is not None) == f.has_min
    assert (s.s is not None) == bool(f.sub)
    if f.sub:
        assert s.s.shape == (7, k // 16) and s.s.dtype == np.int8
    got = dequantize(s, fmt)
    np.testing.assert_array_equal(got, qt.dequantize(np.float64))
    assert np.all(np.abs(got - reference_matrix(qt)) <= 2.0**-24 * np.abs(got))


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_k_quant_split_on_many_blocks(fmt):
    """The k-quants' re-nibbling and sub-scales over 4096 random blocks (every scale and min bit pattern)."""
    qt = random_quant(fmt, 64, 64 * 256, np.random.default_rng(5))
    got = dequantize(split(qt), fmt)
    assert np.all(np.abs(got - reference_matrix(qt)) <= 2.0**-24 * np.abs(got))


def test_split_bytes_per_weight():
    """What the split layout holds a weight in, against its blocks: the same bytes but for q4_k (its 12 bytes of
    6-bit sub-scales become 16 of int8) and q6_k (a byte per 6-bit integer)."""
    rows, k = 4, 4096
    want = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "int8": 8 + 16 / k, "int4": 4.125, "q4_k": 4.625,
            "q6_k": 8.5625}  # fmt: skip
    for fmt, bits in want.items():
        s = split(random_quant(fmt, rows, k, np.random.default_rng(0)))
        nbytes = sum(a.nbytes for a in (s.q, s.d, s.m, s.s) if a is not None)
        assert 8 * nbytes / (rows * k) == bits and SPLIT_FORMATS[fmt].nbytes(rows, k) == nbytes, fmt


@pytest.mark.parametrize("fmt", sorted(SPLIT_FORMATS))
def test_every_split_gemv_name_parses(fmt):
    """CudaQuant.prepare sizes each split GEMV's shared memory from its instantiation's name (split_name_shape):
    every name a split weight compiles, the RoPE-epilogue kernels' included (their names once broke every split
    weight's upload on CUDA), gives the NMAX and passes its template arguments say."""
    from lserve_lite.backends.cuda_quant import SPLIT_ROWS, kernel_names, split_name_shape

    names = [n for n in kernel_names(fmt, ("split",)) if n.startswith("quant_gemv_split")]
    assert any(n.startswith("quant_gemv_split_rope<") for n in names)
    for name in names:
        args = [a.strip() for a in name[name.index("<") + 1 : name.rindex(">")].split(",")]
        nmax, passes = split_name_shape(name)
        want = (
            (int(args[1]), 1) if name.startswith("quant_gemv_split_rope<") else (int(args[2]), int(args[3]))
        )
        assert (nmax, passes) == want and nmax in SPLIT_ROWS and passes in (1, 2)
