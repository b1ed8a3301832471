"""Native jobs for the CPU backend's helper threads: a kernel part run without the GIL, start to end.

A helper thread handed a Python callable must take the GIL before it can call the kernel, and the GIL and
a sleeping thread both wake through the OS: tens of microseconds on a small VM, as long as a whole decode
GEMV of SmolLM2. A native job is a Numba `cfunc` with the signature `JOB_SIG` (args address, j0, j1) whose
int64 args array holds the kernel's array addresses and shapes; the helper spins in compiled
code (`serve`), calls it through its address and signals completion, so no Python runs between jobs.
"""

from __future__ import annotations

import functools
import sys

import llvmlite.binding as llvm
import numba as nb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

JOB_SIG = types.void(types.int64, types.int64, types.int64)  # (args address, j0, j1)
# a helper's control row: the job posted (sequence number, function, args address, j0, j1), the job done
POSTED, FN, ARGS, J0, J1, DONE = range(6)
CTL_COLS = 8  # one 64-byte line per helper (the rows are written by different threads)
_X86 = llvm.get_process_triple().startswith(("x86_64", "i686"))
_LINUX_X86_64 = sys.platform == "linux" and llvm.get_process_triple().startswith("x86_64")
if _LINUX_X86_64:
    llvm.initialize_native_asmparser()  # the JIT assembles `_sched_yield`'s inline `syscall`
YIELD_EVERY = 32  # pauses between sched_yield calls of a spinning thread (a core it shares gets a turn)


@intrinsic
def _load_acquire(typingctx, arr, i):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
        return builder.load_atomic(builder.gep(data, [args[1]]), "acquire", 8)

    return types.int64(arr, i), codegen


@intrinsic
def _store_release(typingctx, arr, i, v):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
        builder.store_atomic(args[2], builder.gep(data, [args[1]]), "release", 8)
        return context.get_dummy_value()

    return types.void(arr, i, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """x86 `pause` (a spinning core yields its pipeline); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _sched_yield(typingctx):
    """The sched_yield system call (Linux x86-64; nothing elsewhere), without a Python or ctypes call, so the
    spinning kernels stay cacheable."""

    def codegen(context, builder, sig, args):
        if _LINUX_X86_64:
            i64 = ir.IntType(64)
            fty = ir.FunctionType(i64, [i64])
            builder.asm(fty, "syscall", "={rax},{rax},~{rcx},~{r11},~{memory}", [i64(24)], True)
        return context.get_dummy_value()

    return types.void(), codegen


@nb.njit(inline="always")
def _spin(idle):
    _pause()
    if idle % YIELD_EVERY == YIELD_EVERY - 1:
        _sched_yield()


@intrinsic
def _call_job(typingctx, fn, args, j0, j1):
    """Call the JOB_SIG function at address fn."""

    def codegen(context, builder, sig, a):
        i64 = ir.IntType(64)
        fty = ir.FunctionType(ir.VoidType(), [i64, i64, i64])
        builder.call(builder.inttoptr(a[0], fty.as_pointer()), [a[1], a[2], a[3]])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def _pointer(typingctx, addr, dtype):
    ty = dtype.dtype

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(ty)))

    return types.CPointer(ty)(types.int64, dtype), codegen


@nb.njit(inline="always")
def view(addr, shape, dtype):
    """The C-contiguous array of `shape` at address addr (inside a native job)."""
    return nb.carray(_pointer(addr, dtype), shape)


@nb.njit(nogil=True, cache=True)
def serve(ctl, row, last, spins):
    """Run the native jobs posted to ctl[row] until `spins` pauses pass without one (returns the last sequence
    number served) or a Python job (function 0) is posted (returns minus its sequence number; not done)."""
    o, idle = row * CTL_COLS, 0
    while True:
        seq = _load_acquire(ctl, o + POSTED)
        if seq != last:
            if ctl[o + FN] == 0:
                return -seq
            _call_job(ctl[o + FN], ctl[o + ARGS], ctl[o + J0], ctl[o + J1])
            _store_release(ctl, o + DONE, seq)
            last, idle = seq, 0
        elif idle < spins:
            _spin(idle)
            idle += 1
        else:
            return last


@nb.njit(nogil=True, cache=True)
def finish(ctl, row, seq):
    _store_release(ctl, row * CTL_COLS + DONE, seq)


@nb.njit(nogil=True, cache=True)
def post(ctl, row, seq, fn, args, j0, j1):
    """Post job `seq` to helper `row`: the JOB_SIG function at address fn (0: a Python part) over the int64
    `args` (its address taken here, in compiled code: `ndarray.ctypes` costs ~3 us), rows j0..j1."""
    o = row * CTL_COLS
    ctl[o + FN], ctl[o + ARGS], ctl[o + J0], ctl[o + J1] = fn, args.ctypes.data, j0, j1
    _store_release(ctl, o + POSTED, seq)


@nb.njit(nogil=True, cache=True)
def wait_done(ctl, rows, seq):
    """Spin until rows 0..rows-1 of ctl have finished job `seq`."""
    idle = 0
    for r in range(rows):
        while _load_acquire(ctl, r * CTL_COLS + DONE) < seq:
            _spin(idle)
            idle += 1


@nb.njit(nogil=True, cache=True)
def spin_for(spins):
    """`spins` steps of an idle helper's spin (calibrates how long one takes)."""
    for i in range(spins):
        _spin(i)


@nb.njit(nogil=True, cache=True)
def run_job(fn, args, j0, j1):
    """The JOB_SIG function at address fn over the int64 `args`, rows j0..j1, on this thread: a split call's own
    parts run the helpers' compiled job, so no kernel dispatcher of its own is loaded beside it (~1 MB each)."""
    _call_job(fn, args.ctypes.data, j0, j1)


@functools.cache
def job_address(body) -> int:
    """A job body compiled as a C callback, on first use: after its module's `flush_if_deps_changed` at import,
    so that its disk cache is never older than the kernels it calls (the body's module lists this one)."""
    return nb.cfunc(JOB_SIG, error_model="numpy", cache=True)(body).address


def native_job(body, pack, *values) -> tuple[int, object]:
    """(job address, int64 args) for `SplitRunner.run`'s `native`: `body` over the operands packed by the
    compiled `pack` (`ndarray.ctypes` would cost ~3 us an array)."""
    return job_address(body), pack(*values)
