"""CPU-side checks of the GPU code (no GPU needed; these run in CI).

- Every kernels/*.cu compiles through NVRTC for sm_80 and sm_90 with the flags used at run time
  (cuda_compile.compile_options + the launcher's own options) and exports the kernels its launcher asks for.
- The host side of GPU sampling draws the same uniforms as the CPU sampler.
"""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends.cuda_compile import kernel_sources, nvrtc_check

ARCHS = ("sm_80", "sm_90")


def _builds() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """kernels/<file> -> (name expressions, extra options), as the launchers use them."""
    from lserve_lite.backends.cuda import LAYER_KERNELS
    from lserve_lite.backends.cuda_quant import QUANT_KERNELS, QUANT_SOURCE, SPLIT_KERNELS, SPLIT_SOURCE
    from lserve_lite.backends.cuda_sampling import SAMPLING_KERNELS

    builds = {
        "layers.cu": (LAYER_KERNELS, ()),
        "sampling.cu": (SAMPLING_KERNELS, ()),
        QUANT_SOURCE: (QUANT_KERNELS, ()),
        SPLIT_SOURCE: (SPLIT_KERNELS, ()),
    }
    try:
        from lserve_lite.backends import cuda_attention as att

        for src in (att.PREFILL_SOURCE, att.DECODE_SOURCE):
            builds[src] = (att.launcher_kernels(src), tuple(att.KERNEL_OPTIONS))
    except ImportError:
        pass
    return builds


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.mark.skipif(
    not _nvrtc_available(), reason="NVRTC not installed (pip install 'lserve-lite[cuda12,ctk]')"
)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", kernel_sources())
def test_kernel_source_compiles(source, arch):
    names, options = _builds().get(source, ((), ()))
    log = nvrtc_check(source, arch, names, options)
    assert "error" not in log.lower(), log


def test_every_launcher_source_exists():
    assert set(_builds()) <= set(kernel_sources())


def test_quant_traits_match_the_block_layouts():
    """kernels/quant_gemv.cu's format traits (BLOCK, BYTES, HEAD) against weights/qtensor.LAYOUTS, the single
    source of truth, and the launcher's rows per block against the kernel's."""
    import re

    from lserve_lite.backends.cuda_compile import read_source
    from lserve_lite.backends.cuda_quant import GEMV2_WARPS, GEMV_WARPS, QUANT_SOURCE
    from lserve_lite.weights.qtensor import LAYOUTS

    src = read_source(QUANT_SOURCE)
    traits = re.findall(
        r"struct (\w+) \{.*\n\s*static constexpr int BLOCK = (\d+), BYTES = (\d+), HEAD = (\d+)", src
    )
    got = {name.lower(): tuple(int(v) for v in vals) for name, *vals in traits}
    assert got == {f: (lay.block, lay.block_bytes, lay.row_head) for f, lay in LAYOUTS.items()}
    assert re.search(rf"constexpr int QWARPS = {GEMV_WARPS};", src)
    assert re.search(rf"constexpr int QWARPS2 = {GEMV2_WARPS};", src)


def test_gpu_sampling_draws_like_the_cpu_sampler():
    from lserve_lite.backends.cuda_sampling import sampling_inputs
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    ps = [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=2, repetition_penalty=1.2),
        SamplingParams(temperature=1.3, seed=3),
    ]
    seqs = [Sequence([5, 7, 7, 900, 3], p) for p in ps]
    twins = [Sequence([5, 7, 7, 900, 3], p) for p in ps]
    params, pen = sampling_inputs(seqs, vocab=100)
    assert params[:, 0].tolist() == [0, 0, 0, 0]  # greedy rows draw nothing
    assert params[3, 1] == twins[1].rng.random() and params[3, 2] == twins[2].rng.random()
    assert params[:3, 1].tolist() == [0.7, 5, 0.9]
    rows, ids, pens = pen
    assert rows.tolist() == [1, 1, 1] and ids.tolist() == [3, 5, 7] and np.allclose(pens, 1.2)


def test_fp16_conversion_refuses_overflow():
    from lserve_lite.backends.cuda import to_fp16
    from lserve_lite.errors import ModelLoadError

    ok = to_fp16(np.array([1.5, -65504.0], np.float32))
    assert ok.dtype == np.float16 and ok.tolist() == [1.5, -65504.0]
    with pytest.raises(ModelLoadError, match="model.layers.3.mlp.down_proj.weight"):
        to_fp16(np.array([1.0, 7e4], np.float32), "model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ModelLoadError):
        to_fp16(np.array([np.nan], np.float32), "w")
