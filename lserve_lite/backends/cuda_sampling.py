"""GPU sampling (kernels/sampling.cu): the same decisions as backends/reference/sampling.py.

A step uploads a [4, B] float64 parameter block (temperature, top_k, top_p, and one uniform per row drawn
from the sequence's own seeded generator, exactly as the CPU sampler draws it), plus each penalized row's
unique ids, the (row, id, amount) triples of presence / frequency penalties and logit bias, the bitmasks
of grammar-constrained rows and the min_p of the rows that set it, and copies back only the B token ids (with
`sample_async`, also B flags of rows that could not be sampled, `sound_rows`; its ids also stay on the
device as the next step's inputs, and reach pinned host memory by a queued copy, or from a greedy batch's
argmax_rows itself, with no copy). Logprobs (`logprobs`) come back as the
chosen ids' values and the top-k ids and values, never a vocabulary-sized row. Same seed, same token as the CPU backend up to ties
(and up to float64 summation-order rounding at a CDF boundary).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..sampling_params import MAX_LOGPROBS
from ..sequence import Sequence
from .cuda_compile import load_module
from .pinned_ring import PinnedRing
from .reference.sampling import FLOAT32_MAX, bias_terms, penalty_terms

SAMPLING_KERNELS = (
    "argmax_rows",
    "sound_rows",
    "sample_bounds",
    "sample_fill",
    "sample_rows",
    "apply_penalty",
    "add_logits",
    "mask_logits",
    "min_p_mask",
    "logprob_rows",
)
THREADS = 1024  # sampling.cu's SAMPLE_THREADS
HIST_SMEM = 100 * 1024  # sampling.cu's HIST_SMEM: sample_rows' dynamic shared memory
HIST_BINS = 2048 + 1  # sampling.cu's SB + 1: value bins of a row's histogram, the last for the rest
FILL_THREADS = 256
MINP_THREADS = 1024  # sampling.cu's MINP_THREADS
LP_THREADS = 256  # sampling.cu's LP_THREADS
LP_K = MAX_LOGPROBS  # sampling.cu's LP_K: top logprobs a row at most
LIST_ELEMENTS = 1 << 21  # logits of a batch (rows x vocabulary) up to which sample_fill lists them by bin: an
# H200 measured 45-62 us for batches of 1-8 rows of 128k with lists against 49-103 us without, and 229-238 us
# against 108-153 us for 64 rows (the lists' scattered stores)
ARGMAX_THREADS = 256
ROW_CHUNK = 4096  # logits a block of the row-spread kernels takes (argmax_rows, sample_bounds / sample_fill,
# logprob_rows: 16 KB, four float4 loads a thread)


def row_blocks(vocab: int) -> int:
    """Blocks a row of `vocab` logits is spread over (ROW_CHUNK each)."""
    return -(-vocab // ROW_CHUNK)


def sampling_inputs(
    seqs: list, vocab: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Host side of a step: the [4, B] parameter block and the penalty triples (rows, ids, penalties).

    Draws one uniform from `seq.rng` for each non-greedy row, in row order, as backends/reference/sampling.py does.
    """
    b = len(seqs)
    params = np.zeros((4, b), np.float64)
    rows, ids, pens = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.all_ids, dtype=np.int64))
            seen = seen[seen < vocab]
            rows.append(np.full(seen.size, i, np.int32))
            ids.append(seen)
            pens.append(np.full(seen.size, p.repetition_penalty, np.float32))
        if not p.greedy:
            # a temperature past float32's range: the CPU sampler's clamp (the kernel's float cast would give inf, and
            # a masked -inf logit over inf is NaN)
            params[:, i] = (min(p.temperature, FLOAT32_MAX), p.top_k, p.top_p, seq.rng.random())
    pen = (np.concatenate(rows), np.concatenate(ids), np.concatenate(pens)) if rows else None
    return params, pen


def additive_inputs(
    seqs: list, vocab: int, terms: Callable[[Sequence, int], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rows, ids, amounts) of every row's `terms` (bias_terms or penalty_terms: added before and after the
    repetition penalty) (None: none)."""
    rows, ids, deltas = [], [], []
    for i, seq in enumerate(seqs):
        t, d = terms(seq, vocab)
        if t.size:
            rows.append(np.full(t.size, i, np.int32))
            ids.append(t)
            deltas.append(d)
    return (np.concatenate(rows), np.concatenate(ids), np.concatenate(deltas)) if rows else None


def mask_inputs(seqs: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, bitmasks [R, words] int32) of the grammar-constrained rows (None: none)."""
    rows = [i for i, s in enumerate(seqs) if s.token_mask is not None]
    if not rows:
        return None
    return np.asarray(rows, np.int32), np.ascontiguousarray(
        np.stack([seqs[i].token_mask for i in rows]), np.int32
    )


def min_p_inputs(seqs: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, min_p values) of the sampled rows with vLLM's min_p on (None: none)."""
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy and s.params.min_p > 0]
    if not rows:
        return None
    return np.asarray(rows, np.int32), np.asarray([seqs[i].params.min_p for i in rows], np.float64)


def kernel_ptr(a):
    """A kernel argument for array `a`: a CuPy array as it is, pinned host memory (cupyx.empty_pinned) by its
    address, which is also its device address under unified addressing (every 64-bit platform CUDA supports)."""
    return np.uint64(a.ctypes.data) if isinstance(a, np.ndarray) else a


def pinned_rows(size: int) -> tuple[np.ndarray, np.ndarray]:
    """One pinned host allocation as a step's int64 ids [size] and its bool soundness flags [size]."""
    import cupyx

    buf = cupyx.empty_pinned(9 * size, np.uint8)
    return buf[: 8 * size].view(np.int64), buf[8 * size :].view(np.bool_)


class DeviceTokens:
    """A step's sampled ids on the device (`ids`) and in pinned host memory (`host_ids`: written by the kernels
    themselves, or with `copy` by a copy queued on the current stream right behind the sampling), and the rows'
    soundness flags, which the kernels wrote into pinned host memory (`GpuSampler.sample_async`): `tolist` and
    `sound` wait for that point (`_copied`), not for steps launched later."""

    def __init__(self, ids, host_ids: np.ndarray, host_sound: np.ndarray, copy: bool):
        import cupy as cp

        self.ids, self._host, self._host_sound = ids, host_ids, host_sound
        stream = cp.cuda.get_current_stream()
        if copy:
            cp.cuda.runtime.memcpyAsync(host_ids.ctypes.data, ids.data.ptr, ids.nbytes,
                                        cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)  # fmt: skip
        self._copied = stream.record()

    def tolist(self) -> list[int]:
        self._copied.synchronize()
        return self._host.tolist()

    def sound(self) -> list[bool]:
        self._copied.synchronize()
        return self._host_sound.tolist()

    def __del__(self):
        """The pinned buffers return to CuPy's pool (the sampler and its ring gone too) only after the writes into
        them are done."""
        self._copied.synchronize()


class GpuSampler:
    """Launches kernels/sampling.cu; `sample(logits, seqs)` returns one token id per row."""

    def __init__(self):
        import cupy as cp

        self.cp = cp
        mod = load_module("sampling.cu", SAMPLING_KERNELS)
        self.k = {n: mod.get_function(n) for n in SAMPLING_KERNELS}
        self.k["sample_rows"].max_dynamic_shared_size_bytes = HIST_SMEM
        self._part = self._tick = None  # argmax_rows' / sound_rows' partials and tickets (`_row_scratch`)
        self._hist = None  # sample_fill's rows: mass, count, bounds (zeroed each launch), then the bin lists
        self._lp_tick = self._lp_buf = None  # logprob_rows' tickets, and its partials and outputs
        self._pinned = PinnedRing(pinned_rows)  # sample_async's host ids and flags

    def _row_scratch(self, b: int, g: int):
        """argmax_rows' and sound_rows' partials (two 8-byte words a block: argmax_rows' keys, then the (max, min)
        pairs of sound_rows or of argmax_rows asked for soundness) and tickets (left at 0 by each launch), grown to
        the largest launch; the kernels run one after the other on the stream, so they share them."""
        cp = self.cp
        if self._tick is None or self._tick.size < b or self._part.size < 2 * b * g:
            self._part = cp.empty(max(2 * b * g, 0 if self._part is None else self._part.size), cp.uint64)
            self._tick = cp.zeros(max(b, 0 if self._tick is None else self._tick.size), cp.uint32)
        return self._part[: b * g], self._part[b * g :], self._tick

    def argmax(self, logits, out, sound=None, host_ids=None) -> None:
        """out[r] (int64) = np.argmax(logits[r]) for contiguous float32 logits [B, V] (two-level argmax_rows); with
        `sound` (a contiguous [B] bool device or pinned host array), also `sound_rows`' flags of the rows, from the
        same pass; with `host_ids` (a contiguous [B] int64 pinned host array), the ids there too."""
        b, vocab = int(logits.shape[0]), int(logits.shape[1])
        g = row_blocks(vocab)
        keys, pairs, tick = self._row_scratch(b, g)
        flags, hids = (np.uint64(0) if a is None else kernel_ptr(a) for a in (sound, host_ids))
        args = (logits, np.int64(vocab), np.int32(vocab), np.int32(ROW_CHUNK), keys, tick, out, pairs, flags,
                hids)  # fmt: skip
        self.k["argmax_rows"]((g, b), (ARGMAX_THREADS,), args)

    def sample(self, logits, seqs: list) -> list[int]:
        return [int(t) for t in self._launch(logits, seqs)[0].get()] if seqs else []

    def sample_async(self, logits, seqs: list, out=None) -> DeviceTokens:
        """The ids as the next step's int64 inputs on the device (in `out`, a contiguous [B] int64 device
        array, when given) and on the host once the returned tokens' event completes, and the rows' `sound_rows`
        flags."""
        b = len(seqs)
        # the kernels write the flags (and a greedy batch's ids) straight into pinned host memory (the same address
        # on the device under unified addressing): no device-to-host copy but a sampled batch's ids
        slot = self._pinned.take(b)
        host_ids, sound = slot.bufs[0][:b], slot.bufs[1][:b]
        ids, on_host = self._launch(logits, seqs, out, sound, host_ids)
        tokens = DeviceTokens(ids, host_ids, sound, copy=not on_host)
        slot.hold(tokens, tokens._copied)
        return tokens

    def sound_rows(self, logits, out=None):
        """Reference: reference/sampling.sound_rows_ref, on the caller's (raw) logits: bools [B] on the device (in
        `out` when given: a device or pinned host array), one launch (two-level sound_rows; CuPy's isfinite / all /
        max / min took six)."""
        cp = self.cp
        x = cp.asarray(logits)
        if x.dtype != cp.float32 or not x.flags.c_contiguous:
            x = cp.ascontiguousarray(x, dtype=cp.float32)
        b, vocab = int(x.shape[0]), int(x.shape[1])
        out = cp.empty(b, cp.bool_) if out is None else out
        if b:
            g = row_blocks(vocab)
            _keys, pairs, tick = self._row_scratch(b, g)
            args = (x, np.int64(vocab), np.int32(vocab), np.int32(ROW_CHUNK), pairs, tick, kernel_ptr(out))
            self.k["sound_rows"]((g, b), (ARGMAX_THREADS,), args)
        return out

    def _launch(self, logits, seqs: list, out=None, sound=None, host_ids=None):
        """Queue the sampling kernels of a non-empty batch; the [B] int64 ids on the device, and whether they were
        written into `host_ids` (a [B] int64 pinned host array) too: by argmax_rows, where the batch is greedy.
        `sound` (a [B] bool device or pinned host array): the rows' `sound_rows` flags of the caller's logits,
        written by argmax_rows' own pass where the batch is greedy and nothing changed the logits (one launch less
        a step), else by sound_rows."""
        cp = self.cp
        b = len(seqs)
        logits = cp.asarray(logits)
        if logits.dtype != cp.float32 or not logits.flags.c_contiguous:
            logits = cp.ascontiguousarray(logits, dtype=cp.float32)
        raw = logits
        if logits.shape[0] != b:
            raise ValueError(f"{logits.shape[0]} logit rows for {b} sequences")
        vocab = int(logits.shape[1])
        params, pen = sampling_inputs(seqs, vocab)
        bias, add = additive_inputs(seqs, vocab, bias_terms), additive_inputs(seqs, vocab, penalty_terms)
        masks, min_p = mask_inputs(seqs), min_p_inputs(seqs)
        if any(t is not None for t in (pen, bias, add, masks, min_p)):
            logits = logits.copy()  # never change the caller's logits (logprobs read them raw)
        if bias is not None:  # vLLM's order: logit bias and min_tokens' mask, then the penalties
            self.add_logits(logits, *bias)
        if pen is not None:
            self.apply_penalty(logits, *pen)
        if add is not None:
            self.add_logits(logits, *add)
        if masks is not None:
            self.mask_logits(logits, *masks)
        if out is None:
            out = cp.empty(b, cp.int64)
        elif out.shape != (b,) or out.dtype != cp.int64 or not out.flags.c_contiguous:
            raise ValueError(
                f"ids output of shape {out.shape} {out.dtype} for {b} rows: a contiguous [B] int64"
            )
        greedy = not params[0].any()  # all greedy (min_p: sampled rows only)
        fused = sound is not None and logits is raw and greedy
        if greedy:
            self.argmax(logits, out, sound if fused else None, host_ids)
        else:
            dparams = cp.asarray(params)
            if min_p is not None:
                self.min_p_mask(logits, dparams, *min_p)
            self.sample_rows(logits, dparams, out)
        if sound is not None and not fused:
            self.sound_rows(raw, sound)
        return out, greedy and host_ids is not None

    def sample_rows(self, logits, params, out, radix: bool = False) -> None:
        """out[r] (int64) <- row r of contiguous float32 `logits` sampled by params [4, B]: sample_bounds and sample_fill
        make each sampled row's histogram (and, for few rows, its bin lists) over the whole GPU, then sample_rows
        selects (one block a row). `radix`: the radix path the histogram path falls back to, for the harness."""
        cp = self.cp
        b, vocab = int(logits.shape[0]), int(logits.shape[1])
        g = row_blocks(vocab)
        lists = b * vocab <= LIST_ELEMENTS
        null = np.uint64(0)
        stat = count = mass = idx = loc = null
        if not radix:
            zeroed = HIST_BINS * 12 + 8  # bytes a row: mass, count, bounds
            listed = (
                vocab * 4 + g * (HIST_BINS + 1) * 4 if lists else 0
            )  # indices by bin, each block's starts
            if self._hist is None or self._hist.size < b * (zeroed + listed):
                self._hist = cp.empty(b * (zeroed + listed), cp.uint8)
            buf = self._hist
            buf[: b * zeroed].fill(0)
            mass = buf[: b * HIST_BINS * 8].view(cp.float64)
            count = buf[b * HIST_BINS * 8 : b * HIST_BINS * 12].view(cp.int32)
            stat = buf[b * HIST_BINS * 12 : b * zeroed].view(cp.uint32)
            if lists:
                idx = buf[b * zeroed : b * (zeroed + vocab * 4)].view(cp.int32)
                loc = buf[b * (zeroed + vocab * 4) : b * (zeroed + listed)].view(cp.int32)
            head = (logits, np.int64(vocab), np.int32(vocab), np.int32(ROW_CHUNK), params)
            self.k["sample_bounds"]((g, b), (FILL_THREADS,), (*head, stat))
            self.k["sample_fill"]((g, b), (FILL_THREADS,), (*head, stat, count, mass, idx, loc))
        args = (logits, np.int64(vocab), np.int32(vocab), params, stat, count, mass, idx, loc, np.int32(g),
                np.int32(ROW_CHUNK), np.int32(radix), out)  # fmt: skip
        self.k["sample_rows"]((b,), (THREADS,), args, shared_mem=HIST_SMEM)

    def apply_penalty(self, logits, rows: np.ndarray, ids: np.ndarray, pens: np.ndarray) -> None:
        """In place on contiguous float32 `logits`: the repetition penalty of each (row, id)."""
        self._per_entry("apply_penalty", logits, rows, ids, pens)

    def add_logits(self, logits, rows: np.ndarray, ids: np.ndarray, deltas: np.ndarray) -> None:
        """In place: logits[rows[i], ids[i]] += deltas[i]."""
        self._per_entry("add_logits", logits, rows, ids, deltas)

    def _per_entry(self, kernel: str, logits, rows: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
        """One thread per (row, id, value) entry of a sparse update of `logits` (nothing to launch for none)."""
        cp, n = self.cp, int(rows.size)
        if n:
            args = (
                logits,
                np.int64(logits.shape[1]),
                cp.asarray(rows),
                cp.asarray(ids),
                cp.asarray(values),
                np.int32(n),
            )
            self.k[kernel]((-(-n // 256),), (256,), args)

    def mask_logits(self, logits, rows: np.ndarray, masks: np.ndarray) -> None:
        """In place: -inf outside each masked row's allowed tokens."""
        cp, vocab = self.cp, int(logits.shape[1])
        args = (
            logits,
            np.int64(vocab),
            np.int32(vocab),
            cp.asarray(rows),
            cp.asarray(masks),
            np.int32(masks.shape[1]),
        )
        self.k["mask_logits"]((-(-vocab // 256), int(rows.size)), (256,), args)

    def min_p_mask(self, logits, params, rows: np.ndarray, min_p: np.ndarray) -> None:
        """In place: -inf on each listed row's logits below min_p times its most probable one (after the
        temperature of device params [4, B]), as the reference's sample_row drops them."""
        cp, vocab = self.cp, int(logits.shape[1])
        args = (logits, np.int64(vocab), np.int32(vocab), params, cp.asarray(rows), cp.asarray(min_p))
        self.k["min_p_mask"]((int(rows.size),), (MINP_THREADS,), args)

    def logprobs(self, logits, chosen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw-logit logprobs of `chosen` [R] and the top-k [R, k]; reference: logprobs_ref. The outputs share one
        reused device buffer (top ids, chosen logprobs, top logprobs), copied back in one transfer."""
        cp = self.cp
        if not 0 <= k <= LP_K:
            raise ValueError(f"top logprobs k must be in [0, {LP_K}], got {k}")
        logits = cp.ascontiguousarray(cp.asarray(logits), dtype=cp.float32)
        r, vocab = int(logits.shape[0]), int(logits.shape[1])
        if not r:
            return np.zeros(0, np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        g = row_blocks(vocab)
        if self._lp_tick is None or self._lp_tick.size < r:
            self._lp_tick = cp.zeros(r, cp.uint32)  # logprob_rows resets each ticket it takes
        outs = r * k * 12 + r * 4  # top ids, chosen logprobs, top logprobs: copied back together
        p0 = -(-outs // 8) * 8  # then the partials: part_s, part_k (8-byte aligned), part_m
        size = p0 + r * g * (8 + 8 * LP_K + 4)
        if self._lp_buf is None or self._lp_buf.size < size:
            self._lp_buf = cp.empty(size, cp.uint8)
        buf = self._lp_buf
        out = buf[:outs]
        cut, types = (0, r * k * 8, r * k * 8 + r * 4, outs), (np.int64, np.float32, np.float32)
        ids, lp, top = (out[cut[i] : cut[i + 1]].view(t) for i, t in enumerate(types))
        part_s = buf[p0 : p0 + r * g * 8].view(cp.float64)
        part_k = buf[p0 + r * g * 8 : p0 + r * g * 8 * (1 + LP_K)].view(cp.uint64)
        part_m = buf[p0 + r * g * 8 * (1 + LP_K) : size].view(cp.float32)
        args = (logits, np.int64(vocab), np.int32(vocab), np.int32(ROW_CHUNK),
                cp.asarray(np.asarray(chosen, np.int64)), np.int32(k), part_m, part_s, part_k, self._lp_tick,
                lp, ids, top)  # fmt: skip
        self.k["logprob_rows"]((r, g), (LP_THREADS,), args)
        host = out.get()
        h_ids, h_lp, h_top = (host[cut[i] : cut[i + 1]].view(t) for i, t in enumerate(types))
        return h_lp.copy(), h_ids.reshape(r, k).copy(), h_top.reshape(r, k).copy()
