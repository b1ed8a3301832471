"""The GPU's split layout of the 32-value block formats (backends/quant_split.py), on the CPU: repacking is
lossless. Reference: the `gguf` package's own dequantization for the GGUF formats (independent), our
QuantTensor.dequantize for int8 / int4 (itself checked against the documented layout in test_quant_kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends.quant_split import SPLIT_FORMATS, dequantize, split
from lserve_lite.harness.quant import random_quant, reference_matrix


@pytest.mark.parametrize("fmt", list(SPLIT_FORMATS))
def test_split_layout_keeps_every_value(fmt):
    rng = np.random.default_rng(3)
    qt = random_quant(fmt, 7, 384, rng)
    s = split(qt)
    f = SPLIT_FORMATS[fmt]
    assert s.q.shape == (7, 384 * f.bits // 8) and s.q.dtype == np.uint8
    assert s.d.shape == (7, f.groups(384)) and s.d.dtype == np.float16
    assert (s.m is not None) == f.has_min
    np.testing.assert_array_equal(dequantize(s, fmt), reference_matrix(qt))


def test_split_rejects_the_k_quants():
    with pytest.raises(ValueError, match="no split layout"):
        split(random_quant("q4_k", 2, 256, np.random.default_rng(0)))
