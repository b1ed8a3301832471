"""CPU-side checks of the GPU code (no GPU needed; these run in CI).

- Every kernels/*.cu compiles through NVRTC for sm_80 and sm_90 with the flags used at run time
  (cuda_compile.compile_options + the launcher's own options) and exports the kernels its launcher asks for;
  arch-specific sources (cuda_compile.ARCH_SPECIFIC: the wgmma prefill, sm_90a) compile for their target only
  and refuse any other (the wgmma prefill's 12 quantized-cache kernels add about 7 s to its 3 s on a 2-core
  machine: all compiled).
- The launchers' shared-memory sizes equal the kernels' layout structs (static_asserts through NVRTC).
- The host side of GPU sampling draws the same uniforms as the CPU sampler.
- With nvcc (slow): page_select.cu's two kernels against select_pages_ref (tools/page_select_host_check.py);
  the gate_up GEMVs with SiLU-and-multiply (quant_gemv_split with SILU for int8 / int4 /
  q4_1, gemv_rows on fp16 weights), the q/k/v GEMVs with the RoPE + K/V write epilogue (both kernels, bit for bit
  against the plain kernel plus NumPy's RoPE), and the k-quants' split GEMV, logits, dequantize and gate_up kernels
  (their integer sub-scales), compiled as host code and run against float64 (tools/quant_host_check.py); the
  sampling kernels against the CPU sampler and logprobs (tools/sampling_host_check.py); the K/V writes into quantized
  caches against the reference layers (tools/layers_host_check.py); the spread norm's kernels
  (tools/spread_host_check.py).
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lserve_lite.backends.cuda_compile import ARCH_SPECIFIC, kernel_sources, kernels_dir, nvrtc_check

ARCHS = ("sm_80", "sm_90")


def _source_archs() -> list[tuple[str, str]]:
    """(source, arch) pairs to compile: ARCHS, or the one target of an arch-specific source."""
    return [
        (src, a)
        for src in kernel_sources()
        for a in ((ARCH_SPECIFIC[src],) if src in ARCH_SPECIFIC else ARCHS)
    ]


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

        for src in (att.PREFILL_SOURCE, att.PREFILL_SM90_SOURCE, att.DECODE_SOURCE, att.SELECT_SOURCE):
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


@pytest.fixture(scope="module")
def nvrtc_logs() -> dict[tuple[str, str], str | RuntimeError]:
    """Every (source, arch) of test_kernel_source_compiles compiled at once, one thread per core (NVRTC releases
    the GIL: a 2-core host compiles them in about half the time), each the compiler log or its error."""
    builds = _builds()

    def one(pair: tuple[str, str]) -> str | RuntimeError:
        names, options = builds.get(pair[0], ((), ()))
        try:
            return nvrtc_check(*pair, names, options)
        except RuntimeError as e:
            return e

    pairs = _source_archs()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(pairs, pool.map(one, pairs), strict=True))


@pytest.mark.skipif(
    not _nvrtc_available(), reason="NVRTC not installed (pip install 'lserve-lite[cuda12,ctk]')"
)
@pytest.mark.parametrize(("source", "arch"), _source_archs())
def test_kernel_source_compiles(nvrtc_logs, source, arch):
    log = nvrtc_logs[(source, arch)]
    if isinstance(log, RuntimeError):
        raise log
    assert "error" not in log.lower(), log


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC not installed")
@pytest.mark.parametrize("source", sorted(ARCH_SPECIFIC))
@pytest.mark.parametrize("arch", ARCHS)
def test_arch_specific_source_refuses_other_targets(source, arch):
    """The wgmma kernels must never be built for sm_80 (or plain sm_90, which lacks wgmma): the #error guard."""
    with pytest.raises(RuntimeError, match="sm_90a"):
        nvrtc_check(source, arch)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
@pytest.mark.parametrize(
    "args",
    [("--variants", "silu", "rows", "norm", "rope", "--formats", "int8", "int4", "q4_1"),
     ("--variants", "split", "silu", "--formats", "q4_k", "q6_k", "int8")],
    ids=["gate_up_silu_norm_and_rope", "k_quant_split"],
)  # fmt: skip
def test_split_kernels_on_the_host(args):
    """The kernels compiled as host code against float64 references (tools/quant_host_check.py); `norm`: gemv_rows
    with the residual add + RMSNorm in its prologue (rms_in.cuh), whose residual stream must be exact."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "quant_host_check.py"
    args = ["--quick", *args]
    run = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    if "norm" in args:
        sys.path.insert(0, str(tool.parent))
        from quant_host_check import NORM_SHAPES, ROW_SLICES

        assert run.stdout.count("residual exact PASS") == 2 * len(NORM_SHAPES) * len(ROW_SLICES)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
def test_spread_norm_kernels_on_the_host():
    """The spread norm's producer and consumers (tools/spread_host_check.py: q4_1, int8, q4_k) against float64 and bit
    for bit against the plain split kernels; every case must print, and pass."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "spread_host_check.py"
    run = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    # producer: 3 shapes (q4_k's 256-value blocks: 1) x 4 R x 2 grids; gate_up: 2 shapes (q4_k 1) x 2 R; q/k/v: 2 x 2
    assert run.stdout.count(" PASS") == (3 + 3 + 1) * 4 * 2 + (2 + 2 + 1) * 2 + 3 * 2 * 2


@pytest.mark.parametrize(
    "tool",
    ["quant_host_check.py", "page_select_host_check.py", "layers_host_check.py", "spread_host_check.py"],
)
def test_host_checks_refuse_a_negative_seed_before_building(tool):
    """`--seed -1` built the emulator (nvcc, a minute) and then ended in NumPy's ValueError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / tool
    run = subprocess.run(
        [sys.executable, str(path), "--seed", "-1"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "--seed: -1 is outside [0," in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
def test_page_select_on_the_host():
    """page_score + page_topk compiled as host code (tools/page_select_host_check.py --quick) against
    select_pages_ref: two SPARSE_DECODE setups and SmolLM2's query group of 3 through both kernels, a 1200-page
    list on one CTA (a warp walks 150 pages through page-table batches), exact integer ties through page_topk,
    both group reductions."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "page_select_host_check.py"
    run = subprocess.run([sys.executable, str(tool), "--quick"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count(" PASS") == 10


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
def test_quantized_kv_writes_on_the_host():
    """rope_write_kv and rope_write_kv_sparse into int8 / int4 / fp8 caches compiled as host code
    (tools/layers_host_check.py) against the reference layers: int4's and fp8's queries, keys and page statistics
    in the randomized Hadamard basis (LServe's at head dims 64 and 128: the statistics' warp holds 2 or 4 channels a
    lane), int8's and a head dim of 96 in the plain one; then the q/k/v GEMV writing them in its epilogue against
    that pair, bit for bit (15 rows, 10 of them in the Hadamard basis)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "layers_host_check.py"
    run = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count(" PASS") == 131 and run.stdout.count(" hadamard ") == 84


@pytest.mark.parametrize("end", ["exit 3", "kill -SEGV $$"], ids=["ticket_left", "killed"])
def test_layers_host_check_emulator_failure_is_a_fail_row(end, tmp_path, capsys):
    """An emulator that failed (a ticket left nonzero exits 3; a kernel's stray access kills it) ended
    tools/layers_host_check.py in a CalledProcessError traceback, with no FAIL line and no row after it: now it is
    the row's FAIL, with why."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from layers_host_check import check_qrope, run_case

    from lserve_lite.harness.common import HostCtx
    from lserve_lite.harness.kv_write import dense_case

    exe = tmp_path / "emu"
    exe.write_text(f"#!/bin/sh\n{end}\n")
    exe.chmod(0o755)
    why = "exited with status 3" if end == "exit 3" else "died of signal 11"
    c = HostCtx(0)
    rows = run_case(exe, tmp_path, dense_case(c, "int8", 9, 3, 64, 64, 13))
    assert [(r.kernel, r.ok) for r in rows] == [("rope_write_kv", False)] and why in rows[0].note
    assert check_qrope(exe, tmp_path, c.rng, "int8", 64, False, 37, 1) is False
    assert f"FAIL (the emulator {why})" in capsys.readouterr().out


def test_host_emulation_that_does_not_build_is_one_line(tmp_path, monkeypatch):
    """A kernel edit nvcc refuses ended every host check in a CalledProcessError traceback under nvcc's errors; it
    is one line that names the emulator (nvcc's own errors stay above it)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from host_emu_build import build_emulator

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'layers.inc(1): error: expected a ;' >&2\nexit 2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{nvcc.parent}:{os.environ['PATH']}")
    with pytest.raises(
        SystemExit, match=r"^layers_host_emu: nvcc could not build the host emulation \(status 2\)$"
    ):
        build_emulator("layers", 1, "layers_host_emu", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
def test_sampling_kernels_on_the_host():
    """argmax_rows (with and without its soundness flags and host ids), sound_rows, sample_bounds + sample_fill + sample_rows (bin lists, a pass a selection, the radix
    path), logprob_rows and min_p_mask compiled as host code (tools/sampling_host_check.py) against np.argmax,
    sound_rows_ref, sample_row and logprobs_ref on the harness's mixed and crowded rows."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "sampling_host_check.py"
    run = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count(" PASS") == 15


EMU_SELF_TEST = r"""
#include "host_emu.cuh"
#include <cstdlib>
// mode 0: every thread of 64 reduces its warp by shuffles, block 0 meets at __syncthreads and checks every
// warp's sum; mode 1: half a warp waits at a __syncthreads the rest never reaches.
__global__ void sums(int* out) {
  int v = threadIdx.x + 1;
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __shared__ int w[2];
  if ((threadIdx.x & 31) == 0) w[threadIdx.x >> 5] = v;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = w[0] + w[1];
}
__global__ void divergent() {
  if (threadIdx.x < 16) __syncthreads();
}
int main(int argc, char** argv) {
  if (atoi(argv[1]) == 1) {
    launch({1, 1, 1}, 32, [] { divergent(); });
    return 0;
  }
  static int out[3 * 64];
  launch({3, 1, 1}, 64, [] { sums(out); });
  for (int i = 0; i < 3 * 64; ++i)
    if (out[i] != 64 * 65 / 2) return 1;
  printf("sums ok\n");
  return 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not installed (the host emulation builds with it)"
)
def test_host_emulator_barriers(tmp_path):
    """tools/host_emu.cuh itself: warp shuffles and __syncthreads across coroutines give every thread the block's
    sums; a barrier only part of a block reaches stops the program with its message instead of hanging."""
    import subprocess
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    (tmp_path / "emu_self_test.cu").write_text(EMU_SELF_TEST)
    exe = tmp_path / "emu_self_test"
    subprocess.run(["nvcc", "-std=c++17", "-w", f"-I{tools}", "-o", str(exe), str(tmp_path / "emu_self_test.cu")],
                   check=True, timeout=600)  # fmt: skip
    ok = subprocess.run([str(exe), "0"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "sums ok" in ok.stdout, ok.stdout + ok.stderr
    hang = subprocess.run([str(exe), "1"], capture_output=True, text=True, timeout=60)
    assert hang.returncode == 4 and "cannot open" in hang.stderr, hang.stderr


def test_prefill_kernel_choice():
    """auto: wgmma on 9.x for every cache format at head dim 64 / 128; other devices: mma.sync. "mma" forces the
    mma.sync kernel (quantized caches too: the benchmarks' comparison), "wgmma" the wgmma one (9.x only), "ws" its
    warp-specialized variant for fp16 caches."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.harness.common import setting

    kvs = ("fp16", "int8", "int4", "fp8")
    with setting(att, "PREFILL_KERNEL", "auto"):
        for kv in kvs:
            assert att.prefill_kernel_for(128, kv, "90") == "wgmma", kv
            assert att.prefill_kernel_for(64, kv, "90") == "wgmma", kv
            for cc in ("80", "89", "100"):
                assert att.prefill_kernel_for(128, kv, cc) == "mma", (kv, cc)
        assert att.prefill_kernel_for(96, "int8", "90") == "mma"  # a head dim the wgmma kernel lacks
    with setting(att, "PREFILL_KERNEL", "mma"):
        for kv in kvs:
            assert att.prefill_kernel_for(128, kv, "90") == "mma", kv
    with setting(att, "PREFILL_KERNEL", "wgmma"):
        for kv in kvs:
            assert att.prefill_kernel_for(64, kv, "90") == "wgmma", kv
        with pytest.raises(ValueError, match="9.x"):
            att.prefill_kernel_for(64, "int8", "89")
    for variant in ("ws", "tma"):  # fp16 caches only; the wgmma kernel for the others
        with setting(att, "PREFILL_KERNEL", variant):
            for kv in kvs:
                assert att.prefill_kernel_for(128, kv, "90") == (variant if kv == "fp16" else "wgmma"), kv
            assert att.prefill_kernel_for(96, "fp16", "90") == "mma"
            with pytest.raises(ValueError, match="9.x"):
                att.prefill_kernel_for(64, "fp16", "80")
    assert att.prefill_kernel_for(128, "bf16", "90") == "wgmma"  # bf16: the plain wgmma kernel only
    for bad in (("bf16", "89", "auto", 128), ("bf16", "90", "tma", 128), ("bf16", "90", "auto", 96)):
        with setting(att, "PREFILL_KERNEL", bad[2]), pytest.raises(ValueError, match="bf16"):
            att.prefill_kernel_for(bad[3], bad[0], bad[1])
    with setting(att, "PREFILL_KERNEL", "tmx"), pytest.raises(ValueError, match="PREFILL_KERNEL"):
        att.prefill_kernel_for(64, "fp16", "90")


def test_prefill_sm90_shared_memory_fits():
    """Every wgmma prefill configuration fits shared memory, the quantized ones two CTAs per SM (228 KiB per SM
    on Hopper, 1 KiB of it reserved per CTA), and each entry point the CTAs per SM its __launch_bounds__ ask for
    (the register cap they set would be wasted otherwise)."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.cuda_compile import read_source

    for (d, w, kv), st in att.PREFILL_SM90_STAGES.items():
        smem = att._prefill_sm90_smem(d, w, st, kv)
        assert smem <= 227 * 1024, (d, w, kv)
        if kv != "fp16":
            assert 2 * (smem + 1024) <= 228 * 1024, (d, w, kv, smem)
    inst = re.findall(
        r"^LSERVE_PREFILL_SM90_KERNEL\((\d+), (\d+), (\d+), (\d+), lskv::(\w+), _?(\w*)\)$",
        read_source(att.PREFILL_SM90_SOURCE),
        flags=re.M,
    )
    assert len(inst) >= len(att.PREFILL_SM90_STAGES)
    for d, w, st, minb, _, kv in inst:
        smem = att._prefill_sm90_smem(int(d), int(w), int(st), kv or "fp16")
        assert int(minb) * (smem + 1024) <= 228 * 1024, (d, w, st, kv, minb, smem)
    tma = re.findall(
        r"^LSERVE_PREFILL_TMA_KERNEL\((\d+), (\d+), (\d+), (\d+)\)$",
        read_source(att.PREFILL_SM90_SOURCE),
        flags=re.M,
    )
    assert set(att.PREFILL_TMA_STAGES.items()) <= {((int(d), int(w)), int(st)) for d, w, st, _ in tma}
    for d, w, st, minb in tma:
        smem = att._prefill_sm90_smem(int(d), int(w), int(st))
        assert int(minb) * (smem + 1024) <= 228 * 1024, f"d{d} w{w} s{st}: {minb} CTAs of {smem} bytes"
    ws = re.findall(
        r"^LSERVE_PREFILL_WS_KERNEL\((\d+), (\d+), (\d+)\)$", read_source(att.PREFILL_SM90_SOURCE), flags=re.M
    )
    assert {(int(d), int(nc)): int(st) for d, nc, st in ws} == att.PREFILL_WS_STAGES
    for (d, nc), st in att.PREFILL_WS_STAGES.items():  # one CTA per SM
        assert att._prefill_ws_smem(d, nc, st) + 1024 <= 228 * 1024, (d, nc, st)


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC not installed")
def test_prefill_smem_matches_the_kernels():
    """The launchers' shared-memory sizes against the kernels' layout structs (lsattn::sm90::Smem<D, NWG, STAGES,
    KV> + 1024 and lsattn::PrefillSmem<D, MT, BN, KV> + 256 of alignment slack), every configuration the launcher
    uses: static_asserts appended to each source with its instantiation lines removed, so NVRTC evaluates the
    templates without compiling a kernel."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.cuda_compile import nvrtc_check, read_source

    checks = {
        att.PREFILL_SM90_SOURCE: (
            "sm_90a",
            [
                (f"lsattn::sm90::Smem<{d}, {w}, {st}, {att.SM90_TRAITS[kv]}>::BYTES + 1024",
                 att._prefill_sm90_smem(d, w, st, kv))
                for (d, w, kv), st in att.PREFILL_SM90_STAGES.items()
            ] + [
                (f"lsattn::sm90::WsSmem<{d}, {nc}, {st}>::BYTES + 1024", att._prefill_ws_smem(d, nc, st))
                for (d, nc), st in att.PREFILL_WS_STAGES.items()
            ],
        ),
        att.PREFILL_SOURCE: (
            "sm_90",
            [
                (f"lsattn::PrefillSmem<{d}, {mt}, {bn}, {att.KV_TRAITS[kv]}>::BYTES + 256",
                 att._prefill_smem(d, mt, bn, kv))
                for (d, mt), bn in att.PREFILL_BN.items()
                for kv in att.KV_TRAITS
            ],
        ),
    }  # fmt: skip
    for src, (arch, sizes) in checks.items():
        text = re.sub(r"^LSERVE_\w+\(.*\)$", "", read_source(src), flags=re.M)
        text += "".join(f'static_assert({expr} == {n}, "{expr} != {n}");\n' for expr, n in sizes)
        nvrtc_check(src, arch, source=text)  # raises with the failed assertion in the log


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC not installed")
def test_decode_smem_matches_the_kernels():
    """The decode launcher's shared-memory sizes (which `_ctas_per_sm` and `decode_splits` turn into CTAs per SM)
    against lsattn::DecodeSmem<D, STAGES, KV> + 256 and DecodeSmemV2<D, STAGES, KV>, every configuration the
    launcher uses (the CTA merge lives inside the warps' ring regions: no extra bytes; the kernels static_assert
    that it fits)."""
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.backends.cuda_compile import nvrtc_check, read_source

    sizes = [
        (f"lsattn::DecodeSmem<{d}, {st}, {att.KV_TRAITS[kv]}>::BYTES + 256", att._decode_smem(d, st, kv))
        for d, st in att.DECODE_STAGES.items()
        for kv in att.KV_TRAITS
    ]
    sizes += [
        (f"lsattn::DecodeSmemV2<{d}, {st}, {att.KV_TRAITS[kv]}>::BYTES", att._decode_v2_smem(d, st, kv))
        for d in att.DECODE_STAGES
        for kv, st in att.DECODE_V2_STAGES.items()
    ]
    text = re.sub(r"^LSERVE_\w+\(.*\)$", "", read_source(att.DECODE_SOURCE), flags=re.M)
    text += "".join(f'static_assert({expr} == {n}, "{expr} != {n}");\n' for expr, n in sizes)
    nvrtc_check(att.DECODE_SOURCE, "sm_90", source=text)  # raises with the failed assertion in the log


def test_rope_out_struct_matches_the_kernels():
    """backends/rope_out.ROPE_OUT (the NumPy struct the fused QKV GEMVs take by value) against lserve::RopeOut in
    kernels/rope_out.cuh: the members in order (pointers 8 bytes, ints 4, each at its natural alignment) at the
    NumPy fields' offsets, and the size (the header's static_assert, which NVRTC checks in every source above)."""
    from lserve_lite.backends.rope_out import ROPE_OUT

    text = (kernels_dir() / "rope_out.cuh").read_text()
    body = re.search(r"struct RopeOut \{(.*?)\n\};", text, re.S).group(1)
    members = []  # (name, size) in declaration order
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        d = " ".join(decl.split())
        if d:
            assert "*" in d or d.startswith("int "), d  # the two kinds of member the struct has
            size, names = (8, d.rsplit("*", 1)[1]) if "*" in d else (4, d[4:])
            members += [(n.strip(), size) for n in names.split(",")]
    offset, offsets = 0, {}
    for name, size in members:
        offset = -(-offset // size) * size
        offsets[name], offset = offset, offset + size
    cpp = {"cos": "cos_t", "sin": "sin_t"}  # NumPy field -> C++ member where they differ
    assert [cpp.get(f, f) for f in ROPE_OUT.names] == list(offsets)
    assert all(offsets[cpp.get(f, f)] == ROPE_OUT.fields[f][1] for f in ROPE_OUT.names)
    assert [ROPE_OUT.fields[f][0].itemsize for f in ROPE_OUT.names] == [size for _, size in members]
    assert f"sizeof(RopeOut) == {ROPE_OUT.itemsize}" in text


def test_rope_out_format_index_matches_the_kernels():
    """rope_out.KV_FORMAT_INDEX (the host's part of the ROPE argument) names the trait rope_out.cuh's KvOf<i>
    gives each index: a reordered KV_TRAITS or KvOf would make the epilogue write one format with another's rows."""
    from lserve_lite.backends.cuda_attention import KV_TRAITS
    from lserve_lite.backends.rope_out import KV_FORMAT_INDEX

    text = (kernels_dir() / "rope_out.cuh").read_text()
    kv_of = {int(i): t for i, t in re.findall(r"struct KvOf<(\d+)> \{ typedef (lskv::\w+) T; \}", text)}
    assert kv_of == {i: KV_TRAITS[fmt] for fmt, i in KV_FORMAT_INDEX.items()}


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


def test_norm_chunks_match_the_kernel():
    """add_rmsnorm's launcher sends rows to the vector path only up to NORM_CHUNKS chunks a thread: the kernel's own
    register array must be that size (a larger launcher value would drop the rows past it)."""
    import re

    from lserve_lite.backends.cuda import NORM_CHUNKS
    from lserve_lite.backends.cuda_compile import read_source

    assert re.search(rf"^constexpr int NORM_CHUNKS = {NORM_CHUNKS};$", read_source("layers.cu"), flags=re.M)


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


def test_gpu_min_p_rows_are_the_sampled_rows_that_set_it():
    """min_p_mask's launch list: sampled rows with min_p > 0 and their values; greedy rows (min_p does not apply)
    and rows without min_p stay out, and a batch without any launches nothing."""
    from lserve_lite.backends.cuda_sampling import min_p_inputs
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    ps = [SamplingParams(temperature=0.0, min_p=0.3), SamplingParams(temperature=0.8, min_p=0.05),
          SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, min_p=1.0)]  # fmt: skip
    rows, values = min_p_inputs([Sequence([1], p) for p in ps])
    assert rows.dtype == np.int32 and rows.tolist() == [1, 3] and values.tolist() == [0.05, 1.0]
    assert min_p_inputs([Sequence([1], p) for p in ps[::2]]) is None


def test_a_top_k_past_the_gpu_samplers_int32_is_refused_up_front():
    """A top_k over float64's range (the server took any JSON integer: 10**400) made the GPU step's parameter block
    raise OverflowError, failing every request in flight; one past int32 (the kernel's cast) was undefined there.
    SamplingParams refuses top_k past MAX_TOP_K in one line; the largest it takes fills the block."""
    from lserve_lite.backends.cuda_sampling import sampling_inputs
    from lserve_lite.errors import InvalidRequestError
    from lserve_lite.sampling_params import MAX_TOP_K, SamplingParams
    from lserve_lite.sequence import Sequence

    for k in (MAX_TOP_K + 1, 10**400):
        with pytest.raises(InvalidRequestError, match="^top_k must be an integer >= 0 .* at most 2147483647"):
            SamplingParams(top_k=k)
    params, _ = sampling_inputs([Sequence([1], SamplingParams(top_k=MAX_TOP_K, temperature=1.0))], vocab=100)
    assert params[1, 0] == MAX_TOP_K


def test_a_temperature_past_float32_is_clamped_in_the_gpu_parameter_block():
    """The kernel casts the block's temperature to float: 1e308 became inf there (a masked -inf logit over inf is NaN)
    where the CPU sampler clamps to float32's largest; the block carries the clamped value (finite as a float32)."""
    from lserve_lite.backends.cuda_sampling import sampling_inputs
    from lserve_lite.sampling_params import SamplingParams
    from lserve_lite.sequence import Sequence

    params, _ = sampling_inputs([Sequence([1], SamplingParams(temperature=1e308))], vocab=100)
    assert np.isfinite(np.float32(params[0, 0])) and params[0, 0] == float(np.finfo(np.float32).max)


def test_fp16_conversion_refuses_overflow():
    from lserve_lite.backends.cuda import to_fp16
    from lserve_lite.errors import ModelLoadError

    ok = to_fp16(np.array([1.5, -65504.0], np.float32))
    assert ok.dtype == np.float16 and ok.tolist() == [1.5, -65504.0]
    with pytest.raises(ModelLoadError, match="model.layers.3.mlp.down_proj.weight"):
        to_fp16(np.array([1.0, 7e4], np.float32), "model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ModelLoadError):
        to_fp16(np.array([np.nan], np.float32), "w")
