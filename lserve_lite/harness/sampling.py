"""Harness rows of kernels/sampling.cu against backends/reference/sampling.py."""

from __future__ import annotations

import numpy as np

from ..backends.reference.sampling import logprobs_ref, sample_row, sound_rows_ref
from ..backends.reference.sampling import sample as cpu_sample
from ..sampling_params import SamplingParams
from ..sequence import Sequence
from .common import Ctx, Result


def case_sampling(c: Ctx) -> list[Result]:
    cp, sampler = c.cp, c.ops.sampler
    out = []
    for b, vocab, ties in [
        (1, 49152, False),
        (7, 1000, True),
        (64, 128256, False),
        (4, 128256, True),
        (3, 4097, True),
        (2, 4099, False),
    ]:
        x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
        if ties:
            x = np.round(x)
        got = c.poison((b,), np.int64)
        sampler.argmax(cp.asarray(x), got)
        miss = int(np.sum(got.get() != np.argmax(x, axis=1)))
        out.append(Result("argmax_rows", f"B{b} V{vocab}" + (" ties" if ties else ""), miss, 0.0, miss == 0))
    out += _case_sound_rows(c)
    for b, vocab, kind in [
        (48, 49152, "mixed"),
        (9, 777, "mixed"),
        (16, 128256, "mixed"),
        (12, 32000, "hard"),
    ]:
        x, params = sampling_rows(c.rng, b, vocab, kind)
        t, k, p, u = params
        want = [
            int(np.argmax(x[i])) if t[i] == 0 else sample_row(x[i], t[i], int(k[i]), p[i], u[i])
            for i in range(b)
        ]
        for radix in (False, True):
            got = c.poison((b,), np.int64)
            sampler.sample_rows(cp.asarray(x), cp.asarray(params), got, radix=radix)
            miss = int(np.sum(got.get() != np.asarray(want)))
            name = f"B{b} V{vocab} {kind} T/top-k/top-p" + (" radix path" if radix else "")
            out.append(Result("sample_rows", name, miss, 0.0, miss == 0, "abs = mismatches"))
    # the whole path: penalties, per-sequence seeded uniforms, greedy and sampled rows in one batch
    b, vocab = 12, 5000
    x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
    prompts = [list(c.rng.integers(0, vocab + 20, int(c.rng.integers(1, 300)))) for _ in range(b)]
    mk = [
        SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), repetition_penalty=float(r), seed=int(s))
        for t, k, p, r, s in zip(
            c.rng.choice([0.0, 0.8, 1.3], b), c.rng.choice([0, 40], b), c.rng.choice([1.0, 0.9], b),
            c.rng.choice([1.0, 1.3, 0.8], b), c.rng.integers(0, 1 << 30, b), strict=True,
        )
    ]  # fmt: skip
    want = cpu_sample(x, [Sequence(pr, sp) for pr, sp in zip(prompts, mk, strict=True)])
    got = c.ops.sample(cp.asarray(x), [Sequence(pr, sp) for pr, sp in zip(prompts, mk, strict=True)])
    miss = int(np.sum(np.asarray(got) != np.asarray(want)))
    out.append(
        Result("sample (penalty + seeded rng)", f"B{b} V{vocab}", miss, 0.0, miss == 0, "abs = mismatches")
    )
    out.append(_case_api_options(c))
    out.append(_case_penalty_order(c))
    out.append(_case_min_p(c))
    out += _case_logprobs(c)
    return out


def _case_sound_rows(c: Ctx) -> list[Result]:
    """sound_rows against sound_rows_ref: a NaN, +-inf, all-zero and all-equal rows, one logit apart, random ones;
    and argmax_rows asked for the same flags from its own pass (a greedy step's check), its ids against np.argmax
    on the sound rows and its copy of them in pinned host memory (poisoned with -1) against its device ids."""
    import cupyx

    b, vocab = 9, 128256
    x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
    x[0, vocab - 1], x[1, 4096], x[2, 0], x[3], x[4] = np.nan, np.inf, -np.inf, 0.0, 2.5
    x[5] = 2.5
    x[5, 70000] = np.nextafter(np.float32(2.5), np.float32(3))
    want = sound_rows_ref(x)
    got = c.ops.sampler.sound_rows(c.cp.asarray(x)).get()
    miss = int(np.sum(got != want))
    out = [Result("sound_rows", f"B{b} V{vocab}", miss, 0.0, miss == 0 and int(want.sum()) == 4)]
    ids, flags = c.poison((b,), np.int64), c.cp.full((b,), 7, c.cp.uint8)  # 7: neither flag
    host = cupyx.empty_pinned(b, np.int64)
    host[:] = -1
    c.ops.sampler.argmax(c.cp.asarray(x), ids, flags, host)
    c.cp.cuda.get_current_stream().synchronize()  # the kernel's writes into host memory are done
    fine = want.astype(bool)
    miss = int(np.sum(flags.get() != want)) + int(np.sum(ids.get()[fine] != np.argmax(x[fine], axis=1)))
    miss += int(np.sum(host != ids.get()))
    out.append(Result("argmax_rows + sound + host ids", f"B{b} V{vocab}", miss, 0.0, miss == 0))
    return out


def sampling_rows(rng: np.random.Generator, b: int, vocab: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits [b, vocab] and params [4, b] (temperature, top_k, top_p, u). "hard": rows whose crossing bins are
    crowded or odd for the histogram path (equal logits, a few allowed tokens with -inf elsewhere and a top-k past
    them, a huge temperature, a tiny spread), so both of sample_rows' paths run."""
    x = (rng.standard_normal((b, vocab)) * rng.uniform(1, 6, (b, 1))).astype(np.float32)
    temps = rng.choice([0.0, 0.4, 1.0, 1.7], b)
    topk = rng.choice([0, 1, 7, 50, vocab + 5], b)
    topp = rng.choice([1.0, 0.95, 0.5, 0.1], b)
    if kind == "hard":
        for i in range(b):
            shape = i % 4
            if shape == 0:  # many equal logits
                x[i] = np.round(x[i] / 8)
            elif shape == 1:  # a grammar's mask: a few allowed ids, top-k past them
                allowed = rng.choice(vocab, 5, replace=False)
                y = np.full(vocab, -np.inf, np.float32)
                y[allowed] = x[i, allowed]
                x[i], topk[i] = y, 40
            elif shape == 2:  # a huge temperature: a near-uniform distribution
                temps[i] = 1e4
            else:  # a tiny spread
                x[i] = 1.0 + x[i] * 1e-6
            temps[i] = temps[i] or 1.0
    return x, np.stack([temps, topk, topp, rng.random(b)]).astype(np.float64)


def _case_api_options(c: Ctx) -> Result:
    """add_logits + mask_logits in the whole path: logit bias, repetition, presence / frequency penalties, grammar
    bitmasks (some rows with a handful of allowed ids), greedy and sampled rows."""
    b, vocab = 10, 3001
    x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)

    def make() -> list[Sequence]:
        r = np.random.default_rng(7)
        seqs = []
        for i in range(b):
            sp = SamplingParams(
                temperature=[0.0, 0.9][i % 2], presence_penalty=float(r.uniform(-2, 2)),
                frequency_penalty=float(r.uniform(-2, 2)), seed=i, repetition_penalty=[1.3, 1.0, 0.8, 2.0][i % 4],
                logit_bias={int(t): float(r.uniform(-100, 100)) for t in r.integers(0, vocab, 5)},
            )  # fmt: skip
            seq = Sequence(list(r.integers(0, vocab, 20)), sp)
            seq.output_ids = list(r.integers(0, 50, int(r.integers(0, 40))))
            if i % 3:
                allowed = np.zeros((vocab + 31) // 32 * 32, bool)
                allowed[r.integers(0, vocab, [3, 200][i % 2])] = True
                seq.token_mask = np.packbits(allowed, bitorder="little").view(np.int32)
            seqs.append(seq)
        return seqs

    want = cpu_sample(x, make())
    got = c.ops.sample(c.cp.asarray(x), make())
    miss = int(np.sum(np.asarray(got) != np.asarray(want)))
    return Result(
        "sample (penalties + bias + mask)", f"B{b} V{vocab}", miss, 0.0, miss == 0, "abs = mismatches"
    )


def _case_penalty_order(c: Ctx) -> Result:
    """vLLM's order on the device: logit bias, then the repetition penalty, then presence. Token 5 (prompt, logit
    -1, bias +2, penalty 2) is 0.5 and wins both rows; the penalty first makes it 0, below token 7's 0.3, and
    presence before the penalty lifts token 6 (logit 3, generated) to 0.875 (tests/test_sampling.py's rows)."""
    vocab = 3001
    x = np.full((2, vocab), -5.0, np.float32)
    x[:, 5], x[:, 7], x[1, 6] = -1.0, 0.3, 3.0
    plain = Sequence([5], SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={5: 2.0}))
    pres = Sequence([5], SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={5: 2.0},
                                        presence_penalty=1.25))  # fmt: skip
    pres.output_ids = [6]
    miss = int(np.sum(np.asarray(c.ops.sample(c.cp.asarray(x), [plain, pres])) != 5))
    return Result("sample (bias, penalty, presence order)", f"B2 V{vocab}", miss, 0.0, miss == 0,
                  "abs = mismatches")  # fmt: skip


def _case_min_p(c: Ctx) -> Result:
    """min_p_mask in the whole path: vLLM's min_p with temperature, top-k and top-p, a grammar mask, greedy rows
    (min_p does not apply), ties, and rows where no logit passes (a NaN, a +inf: only the first is kept)."""
    b, vocab = 12, 7001
    x = (c.rng.standard_normal((b, vocab)) * c.rng.uniform(1, 5, (b, 1))).astype(np.float32)
    x[1], x[2, 17], x[3, 99] = np.round(x[1]), np.nan, np.inf

    def make() -> list[Sequence]:
        r = np.random.default_rng(11)
        seqs = []
        for i in range(b):
            sp = SamplingParams(
                temperature=[0.0, 0.7, 1.0, 1.6][i % 4] if i > 3 else 1.0, top_k=[0, 40][i % 2],
                top_p=[1.0, 0.9, 1.0][i % 3], min_p=float(r.choice([0.0, 0.02, 0.1, 0.4])) if i > 3 else 0.05, seed=i,
            )  # fmt: skip
            seq = Sequence([1, 2, 3], sp)
            if i == 5:
                allowed = np.zeros((vocab + 31) // 32 * 32, bool)
                allowed[r.integers(0, vocab, 50)] = True
                seq.token_mask = np.packbits(allowed, bitorder="little").view(np.int32)
            seqs.append(seq)
        return seqs

    with np.errstate(invalid="ignore"):  # the +inf row's reference
        want = cpu_sample(x, make())
    got = c.ops.sample(c.cp.asarray(x), make())
    miss = int(np.sum(np.asarray(got) != np.asarray(want)))
    return Result("sample (min_p)", f"B{b} V{vocab}", miss, 0.0, miss == 0, "abs = mismatches")


def _case_logprobs(c: Ctx) -> list[Result]:
    """logprob_rows against logprobs_ref: chosen logprobs and top-k (ids exact, values within 1e-5)."""
    out = []
    for r, vocab, k, ties in [
        (1, 49152, 0, False),
        (37, 1000, 5, True),
        (200, 32000, 20, False),
        (3, 128256, 1, False),
        (4, 128256, 20, True),
        (2, 4099, 7, False),
    ]:
        x = (c.rng.standard_normal((r, vocab)) * 4).astype(np.float32)
        if ties:
            x = np.round(x)
        chosen = c.rng.integers(0, vocab, r)
        lp, ids, top = c.ops.logprobs(c.cp.asarray(x), chosen, k)
        want_lp, want_ids, want_top = logprobs_ref(x, chosen, k)
        # one NumPy max over both (Python's max(a, NaN) is a: a NaN in the top-k values passed)
        err = float(np.max(np.abs(np.concatenate([np.ravel(lp - want_lp), np.ravel(top - want_top)]))))
        ok = err <= 1e-5 and np.array_equal(ids, want_ids)
        name = f"R{r} V{vocab} k{k}" + (" ties" if ties else "")
        out.append(Result("logprob_rows", name, err, 0.0, ok, "abs = max |logprob error|; ids exact"))
    return out
