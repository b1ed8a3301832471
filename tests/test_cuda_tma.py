"""backends/cuda_tma.py without a GPU: the tensor maps it refuses to encode (the kernel's int32 row coordinates, its
64-column boxes, TMA's 16-byte alignment) are refused before the driver is called."""

from __future__ import annotations

import pytest

from lserve_lite.backends.cuda_tma import MAX_ROWS, encode_pool


@pytest.mark.parametrize(
    "ptr, rows, d",
    [(4096, 0, 128), (4096, MAX_ROWS + 1, 128), (4096, 10, 96), (4104, 10, 128), (4096, -5, 64)],
)
def test_encode_pool_refuses_what_the_kernel_cannot_address(ptr, rows, d):
    with pytest.raises(ValueError, match="no TMA map"):
        encode_pool(ptr, rows, d)
