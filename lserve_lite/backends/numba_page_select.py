"""LServe's page selector as ONE Numba CUDA kernel per layer: the alternative to kernels/page_select.cu's two
launches, chosen with LSERVE_SELECTOR=numba (default rawkernel; docs/SPARSE.md). Reference:
backends/reference/page_select.py::select_pages_ref (rule: sparse/selector.py). Written with warp-free
primitives (shared memory, syncthreads, atomics) so that CI runs it in Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, tests/test_numba_selector.py).

Grid (gx, plan capacity in query blocks, Hkv), one CTA of `threads`:
- score: CTA x of (query block qb, dense KV head g) scores physical pages x*PB, x*PB + gx*PB, ... of the
  block's class-0 list, PB pages per step; a thread sums CH channels of one logical page for every query
  head of the group, shared memory adds them up and keeps valid logical pages' max per head -> the page
  bound of each head (mass: / sqrt(D), a row per head) or of the group (max) in `scores`.
- top-k: the CTA that finishes last for (qb, g) (threadfence + a counter it resets) turns mass bounds into
  log weights (sparse/selector.py), copies the candidates' order keys into shared memory (lists up to
  MAX_KEYS; longer ones are read from the scores row), radix-selects the (keep - 1)-th largest (8 bits a
  pass, stopping once the threshold's bucket is taken whole), and writes the candidates above it plus the
  lowest-index ties in index order, then the newest entry -> sel_idx[slot, g], sel_cnt[slot, g].
Each (qb) region of `scores` starts on its own 128-byte line and no other CTA reads it, so the last CTA's
ordinary loads cannot hit a line another CTA brought into its SM's L1 earlier in the launch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32, int64

from .cuda_attention import _META, _QB_FIELDS

THREADS = 256  # per CTA on the GPU (tests run fewer in the simulator)
MAX_THREADS = 256  # shared arrays are sized for this many threads per CTA
MAX_GROUP = 8  # query heads per KV head
MIN_D, MAX_D = 32, 256
CH = 8  # channels a thread sums per logical page
MAX_LPI = MAX_THREADS // (MIN_D // CH)  # logical pages scored per step
CHUNK = 16  # two-level block scans: entries per chunk
MAX_KEYS = 4096  # candidates the top-k keeps in shared memory (256k tokens at page 64); longer lists read L2
NEG_INF = -math.inf
NQB_FIELDS = len(_QB_FIELDS)
# shared array sizes (Numba wants each a single constant)
QS_SIZE = MAX_GROUP * MAX_D
PART_SIZE = MAX_GROUP * MAX_THREADS
LBOUND_SIZE = MAX_GROUP * MAX_LPI
CHUNKS_SIZE = MAX_THREADS // CHUNK + 1
PAIRS_SIZE = 2 * MAX_THREADS


@cuda.jit(device=True)
def _lo(a, b):
    """min (the builtin does not type in every Numba CUDA version)."""
    return a if a < b else b


@cuda.jit(device=True)
def _hi(a, b):
    """max, as _lo."""
    return a if a > b else b


@cuda.jit(device=True)
def _offsets(cap_qb, cap_seq):
    """(qb field base, seq_ctx, kv_indptr, kv_pl) offsets into the plan buffer (cuda_attention.plan_offsets)."""
    seq_ctx = _META + NQB_FIELDS * cap_qb
    indptr = seq_ctx + cap_seq
    pl = indptr + 2 * cap_qb + 1
    pl += pl & 1
    return _META, seq_ctx, indptr, pl


@cuda.jit(device=True)
def _order_key(u):
    """uint32 bits of a float32 -> an int64 key that orders like the float."""
    k = int64(u)
    return int64(0xFFFFFFFF) - k if k >= 0x80000000 else k + 0x80000000


@cuda.jit(device=True)
def _key(i, keys, in_smem, scores_u, row0):
    """Order key of candidate i: from the shared copy (stored less 2^31, as int32) or from the scores row."""
    return int64(keys[i]) + 0x80000000 if in_smem else _order_key(scores_u[row0 + i])


@cuda.jit(device=True)
def _exclusive_sum(v, sh, chunks, tid, nt):
    """Block-wide exclusive prefix sum of one int per thread (thread order) and the total."""
    sh[tid] = v
    cuda.syncthreads()
    nc = (nt + CHUNK - 1) // CHUNK
    if tid < nc:
        s = 0
        for i in range(tid * CHUNK, _lo(nt, tid * CHUNK + CHUNK)):
            s += sh[i]
        chunks[tid] = s
    cuda.syncthreads()
    c = tid // CHUNK
    before = 0
    for i in range(c):
        before += chunks[i]
    for i in range(c * CHUNK, tid):
        before += sh[i]
    total = 0
    for i in range(nc):
        total += chunks[i]
    cuda.syncthreads()
    return before, total


@cuda.jit(device=True)
def _lse_merge(m, z, m2, z2):
    mx = _hi(m, m2)
    if mx == NEG_INF:
        return m, z
    return mx, z * math.exp(m - mx) + z2 * math.exp(m2 - mx)


@cuda.jit
def page_select_kernel(q, kmax, kmin, plan, cap_qb, cap_seq, head_class, head_slot, scores, scores_u, row_cap,
                       counter, sel_idx, sel_cnt, ps_shift, lp_shift, inv_sqrt_d):  # fmt: skip
    """One layer's page selection (module docstring); q [N, Hq, D], kmax/kmin [P, nd, sub, D], scores and
    scores_u one float32 buffer [Hq * row_cap] seen as float and as uint32, counter [cap_qb * Hkv] zeros."""
    qs = cuda.shared.array(QS_SIZE, float32)
    part = cuda.shared.array(PART_SIZE, float32)
    lbound = cuda.shared.array(LBOUND_SIZE, float32)
    ish = cuda.shared.array(MAX_THREADS, int32)
    chunks = cuda.shared.array(CHUNKS_SIZE, int32)
    hist = cuda.shared.array(256, int32)
    fsh = cuda.shared.array(PAIRS_SIZE, float32)  # (m, z) pairs of logsumexp reductions
    lse = cuda.shared.array(MAX_GROUP, float32)
    state = cuda.shared.array(4, int64)  # last CTA flag / prefix / need / done
    keys = cuda.shared.array(MAX_KEYS, int32)  # the top-k's candidate keys (less 2^31)

    x, qb, g = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    gx, nt, tid = cuda.gridDim.x, cuda.blockDim.x, cuda.threadIdx.x
    hkv = head_class.shape[0]
    hq, d = q.shape[1], q.shape[2]
    group = hq // hkv
    sub = kmax.shape[2]
    f, seq_ctx, indptr, pl = _offsets(cap_qb, cap_seq)
    if qb >= plan[0] or head_class[g] != 0:
        return
    keep = plan[f + 7 * cap_qb + qb]
    if keep <= 0 or plan[f + 8 * cap_qb + qb] == 0:
        return
    keep = _lo(keep, sel_idx.shape[2])
    lo = plan[indptr + 2 * qb]
    npages = plan[indptr + 2 * qb + 1] - lo
    slot = plan[f + 6 * cap_qb + qb]
    if npages <= keep:  # the context fits the budget: every page
        if x == 0:
            for i in range(tid, npages, nt):
                sel_idx[slot, g, i] = i
            if tid == 0:
                sel_cnt[slot, g] = npages
        return
    mass = plan[4] == 1
    ctx = plan[seq_ctx + plan[f + qb]]
    tok = plan[f + cap_qb + qb]
    for i in range(tid, group * d, nt):
        qs[i] = float32(q[tok, g * group + i // d, i % d])
    hslot = head_slot[g]
    tpl = d // CH  # threads per logical page
    lpi = nt // tpl  # logical pages per step
    pb = lpi // sub  # physical pages per step
    base = ((lo + 31) // 32) * 32 + 32 * qb  # this block's region in each scores row (own 128-byte lines)
    row0 = g * group * row_cap + base
    cuda.syncthreads()

    # ---- scores: PB physical pages per step
    for e0 in range(x * pb, npages, gx * pb):
        li, cc = tid // tpl, tid % tpl
        e = e0 + li // sub
        s = li % sub
        active = li < lpi and e < npages
        for h in range(group):
            part[h * nt + tid] = 0.0
        if active:
            phys = plan[pl + 2 * (lo + e)]
            for j in range(CH):
                c = cc * CH + j
                kx = float32(kmax[phys, hslot, s, c])
                kn = float32(kmin[phys, hslot, s, c])
                for h in range(group):
                    qv = qs[h * d + c]
                    part[h * nt + tid] += _hi(qv * kx, qv * kn)
        cuda.syncthreads()
        for t in range(tid, lpi * group, nt):
            li, h = t % lpi, t // lpi
            e = e0 + li // sub
            acc = float32(NEG_INF)
            if e < npages:
                lpage = plan[pl + 2 * (lo + e) + 1]
                if (lpage << ps_shift) + ((li % sub) << lp_shift) < ctx:
                    acc = float32(0.0)
                    for i in range(li * tpl, li * tpl + tpl):
                        acc += part[h * nt + i]
            lbound[h * lpi + li] = acc
        cuda.syncthreads()
        if tid < pb and e0 + tid < npages:
            best = float32(NEG_INF)
            for h in range(group):
                bh = float32(NEG_INF)
                for s in range(sub):
                    bh = _hi(bh, lbound[h * lpi + tid * sub + s])
                if mass:
                    scores[row0 + h * row_cap + e0 + tid] = bh * inv_sqrt_d
                best = _hi(best, bh)
            if not mass:
                scores[row0 + e0 + tid] = best

    # ---- the last CTA of (qb, g) selects
    cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        done = cuda.atomic.add(counter, qb * hkv + g, 1)
        state[0] = 1 if done == gx - 1 else 0
        if done == gx - 1:
            counter[qb * hkv + g] = 0  # ready for the next launch (graph replay)
    cuda.syncthreads()
    if state[0] == 0:
        return
    cuda.threadfence()
    if mass:  # row 0 <- logsumexp_h(bound - logsumexp over the list of head h's bounds)
        for h in range(group):
            m, z = float32(NEG_INF), float32(0.0)
            for i in range(tid, npages, nt):
                m, z = _lse_merge(m, z, scores[row0 + h * row_cap + i], float32(1.0))
            fsh[2 * tid], fsh[2 * tid + 1] = m, z
            cuda.syncthreads()
            # two levels: thread c merges pairs c * CHUNK .. c * CHUNK + CHUNK - 1 (from the chunk's first
            # pair, not its own: thread c's pair belongs to chunk c / CHUNK), then thread 0 the chunks
            if tid * CHUNK < nt:
                m, z = fsh[2 * tid * CHUNK], fsh[2 * tid * CHUNK + 1]
                for t in range(tid * CHUNK + 1, _lo(nt, tid * CHUNK + CHUNK)):
                    m, z = _lse_merge(m, z, fsh[2 * t], fsh[2 * t + 1])
            cuda.syncthreads()
            if tid * CHUNK < nt:
                fsh[2 * tid], fsh[2 * tid + 1] = m, z
            cuda.syncthreads()
            if tid == 0:
                for t in range(1, (nt + CHUNK - 1) // CHUNK):
                    m, z = _lse_merge(m, z, fsh[2 * t], fsh[2 * t + 1])
                lse[h] = m + math.log(z)
            cuda.syncthreads()
        for i in range(tid, npages, nt):
            m, z = float32(NEG_INF), float32(0.0)
            for h in range(group):
                m, z = _lse_merge(m, z, scores[row0 + h * row_cap + i] - lse[h], float32(1.0))
            scores[row0 + i] = m + math.log(z)
        cuda.syncthreads()

    n, k = npages - 1, keep - 1  # candidates (all but the newest), how many of them to keep
    seg = (n + nt - 1) // nt  # each thread owns candidates [tid * seg, tid * seg + seg)
    a, b = _lo(n, tid * seg), _lo(n, tid * seg + seg)
    in_smem = n <= MAX_KEYS
    if in_smem and k > 0:  # one coalesced read of the scores; the passes below read shared memory
        for i in range(tid, n, nt):
            keys[i] = int32(_order_key(scores_u[row0 + i]) - 0x80000000)
        cuda.syncthreads()
    if k > 0:
        prefix, mask, need = int64(0), int64(0), int64(k)
        state[3] = 0
        for shift in range(24, -8, -8):
            for i in range(tid, 256, nt):
                hist[i] = 0
            cuda.syncthreads()
            for i in range(a, b):
                key = _key(i, keys, in_smem, scores_u, row0)
                if (key & mask) == prefix:
                    cuda.atomic.add(hist, (key >> shift) & 255, 1)
            cuda.syncthreads()
            if tid < 16:  # chunk sums of 16 bins
                s = 0
                for i in range(tid * 16, tid * 16 + 16):
                    s += hist[i]
                chunks[tid] = s
            cuda.syncthreads()
            for i in range(tid, 256, nt):  # bins from the top: is the need-th largest in bin i?
                above = 0
                for c in range(i // 16 + 1, 16):
                    above += chunks[c]
                for j in range(i + 1, (i // 16) * 16 + 16):
                    above += hist[j]
                if above < need <= above + hist[i]:
                    state[1] = prefix | (int64(i) << shift)
                    state[2] = need - above
                    state[3] = 1 if need - above == hist[i] else 0  # the bucket is taken whole
            cuda.syncthreads()
            prefix, need = state[1], state[2]
            mask |= int64(255) << shift
            if state[3] == 1:
                break
            cuda.syncthreads()
        # ---- compaction in index order: keys above the threshold, and the first `need` ties
        gt, ties = 0, 0
        for i in range(a, b):
            key = _key(i, keys, in_smem, scores_u, row0) & mask
            gt += 1 if key > prefix else 0
            ties += 1 if key == prefix else 0
        tie0, _ = _exclusive_sum(ties, ish, chunks, tid, nt)
        take_ties = _lo(_hi(need - tie0, 0), ties)
        pos, _ = _exclusive_sum(gt + take_ties, ish, chunks, tid, nt)
        for i in range(a, b):
            key = _key(i, keys, in_smem, scores_u, row0) & mask
            take = key > prefix
            if key == prefix:
                take = take_ties > 0
                take_ties -= 1
            if take:
                sel_idx[slot, g, pos] = i
                pos += 1
    if tid == 0:
        sel_idx[slot, g, k] = n  # the newest page, always
        sel_cnt[slot, g] = k + 1


def score_rows(max_qblocks: int, max_pages: int) -> int:
    """Entries of one `scores` row: every block's region rounded to its own 128-byte lines."""
    return -(-(max_pages + 32 * max_qblocks + 32) // 32) * 32


def unsupported(hq: int, hkv: int, d: int, sub: int, threads: int = THREADS) -> str | None:
    """Why the kernel cannot select for this shape (its shared arrays' sizes), or None: the launcher checks it, and
    the CUDA backend at startup (LSERVE_SELECTOR=numba) so that a model it cannot serve is refused before its first
    decode step."""
    if hq // hkv > MAX_GROUP:
        return f"the Numba selector handles at most {MAX_GROUP} query heads per KV head, got {hq // hkv}"
    return _tiling_unsupported(d, sub, threads)


def _tiling_unsupported(d: int, sub: int, threads: int) -> str | None:
    """`unsupported`'s part that fixes the launch shape: the head_dim and sub_pages one CTA's threads tile."""
    if d % CH or not MIN_D <= d <= MAX_D or threads > MAX_THREADS or threads % 32:
        return f"head_dim {d} / {threads} threads not supported by the Numba selector"
    lpi = threads // (d // CH)
    if sub > lpi or lpi % sub:
        return f"sub_pages {sub} too large for the Numba selector at head_dim {d} and {threads} threads"
    return None


def launch_shape(
    max_qblocks: int, max_pages: int, hkv: int, d: int, sub: int, threads: int = THREADS
) -> tuple[tuple[int, int, int], tuple[int]]:
    """(grid, block): about 32 pages per scoring CTA for the longest list the capacity allows."""
    why = _tiling_unsupported(d, sub, threads)
    if why:
        raise ValueError(why)
    per_list = -(-max_pages // max(1, max_qblocks))
    gx = int(max(1, min(1024, -(-per_list // 32))))
    return (gx, max_qblocks, hkv), (threads,)


class NumbaSelector:
    """Launches `page_select_kernel` on the current CuPy stream with CuPy arrays (no copies, no Numba
    allocations, no stream synchronization: graph-capturable). Workspaces only grow, like CudaPlan's."""

    def __init__(self):
        self._views: dict = {}
        self._streams: dict = {}

    def _dev(self, a, cached: bool = True):
        """A Numba view of a CuPy array (sync=False: the producer is the same stream, and a sync would break a
        capture); views of long-lived arrays (caches, plans, workspaces) are kept, as as_cuda_array costs host
        time and a view keeps its array alive: per-step activations pass cached=False."""
        if not cached:
            return cuda.as_cuda_array(a, sync=False)
        key = (a.data.ptr, a.shape, a.dtype.str)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = cuda.as_cuda_array(a, sync=False)
        return v

    def __call__(self, q, kmax, kmin, plan, head_class, head_slot, sel_idx, sel_cnt) -> None:
        """Reference: reference/page_select.select_pages_ref; arguments as cuda_attention.select_pages."""
        import cupy as cp

        _, hq, d = q.shape
        hkv = int(head_class.shape[0])
        nd, sub = int(kmax.shape[1]), int(kmax.shape[2])
        if nd == 0 or plan.max_qblocks == 0:
            return
        why = unsupported(hq, hkv, d, sub)
        if why:
            raise ValueError(why)
        grid, block = launch_shape(plan.max_qblocks, plan.max_pages, hkv, d, sub)
        rows = score_rows(plan.max_qblocks, plan.max_pages)
        scores = plan.workspace("numba_sel_scores", hq * rows, np.float32)
        counter = plan.workspace("numba_sel_counter", plan.max_qblocks * hkv, np.int32, zeroed=True)
        ptr = cp.cuda.get_current_stream().ptr
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = cuda.external_stream(ptr)
        dev, ps_shift = self._dev, plan.page_size.bit_length() - 1
        page_select_kernel[grid, block, stream](
            dev(q, cached=False), dev(kmax), dev(kmin), dev(plan.buffer), plan.max_qblocks, plan.max_seqs, dev(head_class),
            dev(head_slot), dev(scores), dev(scores.view(np.uint32)), rows, dev(counter), dev(sel_idx),
            dev(sel_cnt), ps_shift, ps_shift - (sub.bit_length() - 1), np.float32(1 / math.sqrt(d)),
        )  # fmt: skip
