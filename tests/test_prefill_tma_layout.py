"""CPU check of the Hopper prefill's TMA tile loads (kernels/attention_prefill_sm90.cu `issue_tma`, with the tensor
maps of backends/cuda_tma.py): the lanes of warp 0 issue one box each (16 rows x 64 columns, 128-byte swizzle), and
together they must write every 16-byte chunk of the stage's K and V tiles exactly once, at the address the wgmma
descriptors (and the cp.async path's `sw128`) expect, with the transaction bytes the mbarrier is told to expect. The
hardware's swizzle is emulated from the PTX ISA's definition (address bits [4:6] XOR bits [7:9]); the lane -> box
arithmetic is the kernel's, re-stated here. No GPU needed."""

from __future__ import annotations

import pytest

from lserve_lite.backends import cuda_tma

BN = 64  # keys per tile (both Hopper kernels)


def sw128(rows: int, r: int, c: int) -> int:  # attention_common.cuh sw128<R>(r, c)
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


def tma_swizzle_128b(addr: int) -> int:
    """Where the hardware puts the 16-byte chunk of linear box offset `addr` (1024-byte aligned box start)."""
    return addr ^ (((addr >> 7) & 7) << 4)


@pytest.mark.parametrize("d", [64, 128])
def test_tma_boxes_cover_the_stage_once_in_the_wgmma_layout(d):
    groups, blocks = BN // 16, d // 64
    copies = groups * blocks * 2
    assert copies <= 32  # one box per lane of warp 0
    kv_bytes = BN * d * 2
    written: dict[tuple[int, int], tuple[int, int, int]] = {}  # (tile, byte offset) -> (row, chunk)
    for lane in range(copies):
        u, b, isv = lane % groups, (lane // groups) % blocks, lane // (groups * blocks)
        dst = b * BN * 128 + u * 16 * 128  # offset in the stage's K (isv 0) or V tile
        assert dst % 1024 == 0  # the swizzle pattern is a function of the address: boxes start on an atom
        for r in range(cuda_tma.BOX_ROWS):  # box row r = key row 16u + r, columns 64b .. 64b + 63
            for c in range(cuda_tma.BOX_COLS * 2 // 16):
                off = dst + tma_swizzle_128b(r * 128 + c * 16)
                key = (isv, off)
                assert key not in written, f"lane {lane} overwrites {written[key]}"
                written[key] = (16 * u + r, 8 * b + c)
                assert off == sw128(BN, 16 * u + r, 8 * b + c)
    assert len(written) * 16 == 2 * kv_bytes  # the bytes mbar_expect_tx announces: 2 * L::KV_BYTES


def test_key_positions_one_row_per_lane_pass():
    rows = sorted(lane + 32 * h for lane in range(32) for h in range(BN // 32))
    assert rows == list(range(BN))
