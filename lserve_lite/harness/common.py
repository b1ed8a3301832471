"""What every harness case shares: a context with CuPy, the CUDA ops and a fresh generator; the row type and
the comparison rule."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Result:
    kernel: str
    shape: str
    max_abs: float
    rel: float
    ok: bool
    note: str = ""
    skipped: bool = False  # not run on this device (the note says why): neither passed nor failed

    def __post_init__(self) -> None:
        """Plain Python numbers (cases compute them with NumPy/CuPy), so rows serialise to JSON."""
        self.max_abs, self.rel, self.ok = float(self.max_abs), float(self.rel), bool(self.ok)
        self.skipped = bool(self.skipped)


def skipped(kernel: str, shape: str, why: str) -> Result:
    """A row this device does not run, and why: listed, so a run without it does not read as having checked it."""
    return Result(kernel, shape, 0.0, 0.0, True, why, skipped=True)


@contextmanager
def setting(owner: Any, name: str, value: Any) -> Iterator[None]:
    """owner.name = value inside the block, restored after (None leaves it as it is): a kernel switch such as
    cuda_attention.PREFILL_KERNEL or a backend's QuantKernels.gemv_variant, for a harness row or a benchmark."""
    saved = getattr(owner, name)
    if value is not None:
        setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class Ctx:
    """What every case needs: CuPy, the ops, a fresh generator."""

    def __init__(self, seed: int):
        import cupy as cp

        from ..backends.cuda import CudaOps

        self.cp = cp
        self.ops = CudaOps()
        self.rng = np.random.default_rng(seed)

    def seed_case(self, seed: int, case: str) -> None:
        """A fresh generator of (seed, the case's name) for a case: drawn from one generator, a case's inputs
        depended on the cases run before it, so `kernels test CASE --seed N` did not draw again what CASE drew in
        the whole run that printed N."""
        self.rng = np.random.default_rng([seed, zlib.crc32(case.encode())])

    def f16(self, *shape, scale=1.0) -> np.ndarray:
        """Random normal float16 values (as float32 arrays holding float16-exact numbers); never zero-filled."""
        return (self.rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)

    def dev16(self, a: np.ndarray):
        return self.cp.asarray(a.astype(np.float16))

    def poison(self, shape, dtype):
        return self.cp.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


class HostCtx(Ctx):
    """The host half of a context (no CuPy, no ops): its generator and `f16`, for the cases' inputs and references
    where the kernels run elsewhere (the host emulations in tools/, the CPU backend in tests)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)


def bf16_bits(x):
    """Values -> their bf16 bits (uint16), round to nearest even: the inputs of the bf16 kernels (CuPy and NumPy have
    no bfloat16 dtype). A NumPy or CuPy array in, the same kind out; finite values only."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> their float32 values (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


BF16_NAN = 0x7FC0  # the bits a bf16 output is poisoned with


def compare(kernel: str, shape: str, got, ref, atol: float, rtol: float) -> Result:
    """Elementwise |got - ref| <= atol + rtol |ref|; a non-finite value where ref is finite fails, and so does a
    value where ref is NaN (what a kernel must leave unwritten, poisoned)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Result(kernel, shape, math.inf, math.inf, False, f"shape {got.shape} != {ref.shape}")
    both_nan = np.isnan(got) & np.isnan(ref)
    bad_nan = ~np.isfinite(got) & ~both_nan
    stray = np.isnan(ref) & np.isfinite(got)
    err = np.where(both_nan, 0.0, np.abs(got - ref))
    err = np.where(bad_nan | stray, np.inf, err)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
    # whatever the tolerance (an infinite one marks entries no kernel writes): a NaN left or a value written fails
    ok = bool(np.all(err <= atol + rtol * np.abs(np.nan_to_num(ref)))) and not (bad_nan | stray).any()
    notes = [f"{int(bad_nan.sum())} non-finite"] if bad_nan.any() else []
    notes += [f"{int(stray.sum())} written where nothing should be"] if stray.any() else []
    note = "; ".join(notes)
    return Result(kernel, shape, max_abs, max_abs / max(scale, 1e-30), ok, note)


SILU_SLOPE = 1.1  # max |d/dx x sigmoid(x)| = 1.0998 (at x ~ 2.4)


def silu_mul_atol(gu: np.ndarray, agu: np.ndarray, rounded: bool = False) -> np.ndarray:
    """|error| bound [n, I] of silu(g) * u from the float64 gate_up product gu = [g | u] [n, 2I] and the bound
    agu on its error: 1.1 ag (|u| + au) + |silu(g)| au (silu's slope is at most 1.1). `rounded`: g and u were
    stored in fp16 before silu_mul (the unfused path: 2^-11 relative more each). The output's own fp16 rounding
    is the caller's rtol; 2^-24 covers fp16's subnormal step."""
    i = gu.shape[-1] // 2
    g, u = gu[:, :i], np.abs(gu[:, i:])
    ag, au = agu[:, :i], agu[:, i:]
    if rounded:
        ag, au = ag + 2.0**-11 * np.abs(g), au + 2.0**-11 * u
    silu = np.abs(g) * 0.5 * (1.0 + np.tanh(g / 2))
    return SILU_SLOPE * ag * (u + au) + silu * au + 2.0**-24


# -- cases: each returns a list of Results -----------------------------------------------------------


def format_table(results: list[Result]) -> str:
    return "\n".join([TABLE_HEADER, *map(table_row, results), table_summary(results)])


TABLE_HEADER = f"{'kernel':34s} {'shape':44s} {'max abs':>10s} {'rel':>10s}  result"


def table_row(r: Result) -> str:
    """One row of the table (the CLI prints each case's rows as it ends)."""
    verdict = "SKIP" if r.skipped else "PASS" if r.ok else "FAIL"
    return f"{r.kernel:34s} {r.shape[:44]:44s} {r.max_abs:10.3g} {r.rel:10.3g}  {verdict}" + (
        f"  ({r.note})" if r.note else ""
    )


def table_summary(results: list[Result]) -> str:
    passed, failed, skips = counts(results)
    return f"{passed} passed, {failed} failed" + (f", {skips} skipped" if skips else "")


def counts(results: list[Result]) -> tuple[int, int, int]:
    """(passed, failed, skipped) rows."""
    skips = sum(r.skipped for r in results)
    failed = sum(not r.ok for r in results)
    return len(results) - failed - skips, failed, skips
