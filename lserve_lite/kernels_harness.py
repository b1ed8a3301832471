"""`lserve-lite kernels test`: every GPU kernel against its CPU reference on fresh random inputs.

Each case draws new random inputs (never zeros), poisons the outputs (NaN, or -1 for token ids) before
the launch, runs the kernel through its launcher and compares with the float32 reference of cpu.py or
engine/sampler.py evaluated on the same float16-rounded inputs. One row per kernel and shape:
max abs error, rel = max abs error / max |ref|, PASS/FAIL (a NaN left in an output fails). Exit status 1
on any failure; 0 with a note when no GPU is visible.

The same cases back `pytest -m gpu tests/test_gpu_ops.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .backends import cuda_available


@dataclass
class Result:
    kernel: str
    shape: str
    max_abs: float
    rel: float
    ok: bool
    note: str = ""


class Ctx:
    """What every case needs: CuPy, the ops, a fresh generator."""

    def __init__(self, seed: int):
        import cupy as cp

        from .backends.cuda import CudaOps

        self.cp = cp
        self.ops = CudaOps()
        self.rng = np.random.default_rng(seed)

    def f16(self, *shape, scale=1.0) -> np.ndarray:
        """Random normal float16 values (as float32 arrays holding float16-exact numbers); never zero-filled."""
        return (self.rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)

    def dev16(self, a: np.ndarray):
        return self.cp.asarray(a.astype(np.float16))

    def poison(self, shape, dtype):
        return self.cp.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


def compare(kernel: str, shape: str, got, ref, atol: float, rtol: float, nan_ok: bool = False) -> Result:
    """Elementwise |got - ref| <= atol + rtol |ref|; a non-finite value where ref is finite fails."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Result(kernel, shape, math.inf, math.inf, False, f"shape {got.shape} != {ref.shape}")
    both_nan = np.isnan(got) & np.isnan(ref)
    bad_nan = ~np.isfinite(got) & ~both_nan
    err = np.where(both_nan, 0.0, np.abs(got - ref))
    err = np.where(bad_nan, np.inf, err)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
    ok = bool(np.all(err <= atol + rtol * np.abs(np.nan_to_num(ref))))
    note = f"{int(bad_nan.sum())} non-finite" if bad_nan.any() else ""
    return Result(kernel, shape, max_abs, max_abs / max(scale, 1e-30), ok, note)


# -- cases: each returns a list of Results -----------------------------------------------------------
def case_embed(c: Ctx) -> list[Result]:
    out = []
    for vocab, hidden, n in [(1000, 576, 7), (333, 100, 5), (4096, 4096, 33)]:
        table = c.f16(vocab, hidden)
        ids = c.rng.integers(0, vocab, n)
        got = c.poison((n, hidden), np.float16)
        c.ops.embed(c.dev16(table), c.cp.asarray(ids), out=got)
        out.append(compare("embed_gather", f"V{vocab} H{hidden} N{n}", got.get(), table[ids], 0, 0))
    return out


def case_add_rmsnorm(c: Ctx) -> list[Result]:
    from .backends.cpu import rmsnorm_ref

    out = []
    for n, hidden in [(1, 576), (7, 100), (130, 4096), (3, 1000)]:
        for with_res in (False, True):
            x, w = c.f16(n, hidden), c.f16(hidden, scale=0.3) + 1.0
            w = w.astype(np.float16).astype(np.float32)
            res = c.rng.standard_normal((n, hidden)).astype(np.float32) * 2
            ref_res = x + res if with_res else x
            ref = rmsnorm_ref(ref_res, w, 1e-5)
            got = c.poison((n, hidden), np.float16)
            got_res = c.cp.asarray(res) if with_res else c.poison((n, hidden), np.float32)
            c.ops.add_rmsnorm(
                c.dev16(x), got_res if with_res else None, c.dev16(w), 1e-5, out=got, res_out=got_res
            )
            tag = f"N{n} H{hidden}" + (" +res" if with_res else "")
            out.append(compare("add_rmsnorm", tag, got.get(), ref, 2e-3, 4e-3))
            out.append(compare("add_rmsnorm.residual", tag, got_res.get(), ref_res, 1e-5, 1e-6))
    return out


def case_rope_write_kv(c: Ctx) -> list[Result]:
    from .backends.base import KVCache, rope_tables
    from .backends.cpu import rope_write_kv_ref
    from .config import ModelConfig

    out = []
    for hq, hkv, d, page, n, scaling in [
        (9, 3, 64, 64, 13, None),
        (
            32,
            8,
            128,
            16,
            70,
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        ),
        (4, 4, 32, 64, 1, None),
    ]:
        cfg = ModelConfig(
            "LlamaForCausalLM", hq * d, 4 * d, 1, hq, hkv, d, 100, rope_theta=5e5, rope_scaling=scaling
        )
        max_len, num_pages = 20000, 40
        cos, sin = (t.astype(np.float16).astype(np.float32) for t in rope_tables(cfg, max_len))
        qkv = c.f16(n, (hq + 2 * hkv) * d)
        pos = c.rng.integers(0, max_len, n)
        slots = c.rng.permutation(num_pages * page)[:n]
        slots[c.rng.random(n) < 0.2] = -1  # padding rows write nothing
        shape = (num_pages, hkv, page, d)
        k_ref, v_ref = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        live = slots >= 0
        q_ref = rope_write_kv_ref(qkv, pos, np.maximum(slots, 0), k_ref.copy(), v_ref.copy(), cos, sin)
        rope_write_kv_ref(qkv[live], pos[live], slots[live], k_ref, v_ref, cos, sin)
        kc, vc = c.poison(shape, np.float16), c.poison(shape, np.float16)
        q = c.poison((n, hq, d), np.float16)
        cache = KVCache([kc], [vc], page, num_pages)
        c.ops.rope_write_kv(
            c.dev16(qkv),
            c.cp.asarray(pos),
            c.cp.asarray(slots),
            cache,
            0,
            (c.dev16(cos), c.dev16(sin)),
            out=q,
        )
        tag = f"Hq{hq} Hkv{hkv} D{d} page{page} N{n}" + (" llama3" if scaling else "")
        out.append(compare("rope_write_kv.q", tag, q.get(), q_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.k", tag, kc.get(), k_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.v", tag, vc.get(), v_ref, 0, 0))
    return out


def case_silu_mul(c: Ctx) -> list[Result]:
    from .backends.cpu import silu_mul_ref

    out = []
    for n, inter in [(1, 1536), (5, 100), (64, 14336), (3, 7)]:
        gu = c.f16(n, 2 * inter, scale=2.0)
        got = c.poison((n, inter), np.float16)
        c.ops.silu_mul(c.dev16(gu), out=got)
        out.append(compare("silu_mul", f"N{n} I{inter}", got.get(), silu_mul_ref(gu), 2e-3, 4e-3))
    return out


def case_linear(c: Ctx) -> list[Result]:
    out = []
    for n, k, m in [
        (1, 576, 960),
        (7, 100, 33),
        (3, 4096, 14336),
        (8, 1536, 576),
        (64, 4096, 1024),
        (300, 576, 1536),
    ]:
        x, w = c.f16(n, k), c.f16(m, k, scale=1 / math.sqrt(k))
        got = c.poison((n, m), np.float16)
        c.ops.linear(c.dev16(x), c.dev16(w), out=got)
        name = f"linear [{c.ops.gemm_path(n, k)}]"
        out.append(compare(name, f"N{n} K{k} M{m}", got.get(), x @ w.T, 4e-3, 4e-3))
    return out


def case_logits(c: Ctx) -> list[Result]:
    out = []
    for n, h, v in [(1, 576, 49152), (3, 4096, 32000), (20, 576, 49152)]:
        x, w = c.f16(n, h), c.f16(v, h, scale=1 / math.sqrt(h))
        got = c.poison((n, v), np.float32)
        c.ops.logits(c.dev16(x), c.dev16(w), out=got)
        name = f"logits fp32 [{c.ops.gemm_path(n, h)}]"
        out.append(compare(name, f"N{n} H{h} V{v}", got.get(), x @ w.T, 1e-4, 1e-4))
    return out


def case_sampling(c: Ctx) -> list[Result]:
    from .engine.sampler import sample as cpu_sample
    from .engine.sampler import sample_row
    from .engine.sequence import Sequence
    from .sampling_params import SamplingParams

    cp, sampler = c.cp, c.ops.sampler
    out = []
    for b, vocab, ties in [(1, 49152, False), (7, 1000, True), (64, 128256, False)]:
        x = (c.rng.standard_normal((b, vocab)) * 3).astype(np.float32)
        if ties:
            x = np.round(x)
        got = c.poison((b,), np.int32)
        sampler.k["argmax_rows"]((b,), (1024,), (cp.asarray(x), np.int64(vocab), np.int32(vocab), got))
        miss = int(np.sum(got.get() != np.argmax(x, axis=1)))
        out.append(Result("argmax_rows", f"B{b} V{vocab}" + (" ties" if ties else ""), miss, 0.0, miss == 0))
    for b, vocab in [(48, 49152), (9, 777)]:
        x = (c.rng.standard_normal((b, vocab)) * c.rng.uniform(1, 6, (b, 1))).astype(np.float32)
        temps = c.rng.choice([0.0, 0.4, 1.0, 1.7], b)
        topk = c.rng.choice([0, 1, 7, 50, vocab + 5], b)
        topp = c.rng.choice([1.0, 0.95, 0.5, 0.1], b)
        us = c.rng.random(b)
        params = np.stack([temps, topk, topp, us]).astype(np.float64)
        got = c.poison((b,), np.int32)
        sampler.k["sample_rows"](
            (b,), (1024,), (cp.asarray(x), np.int64(vocab), np.int32(vocab), cp.asarray(params), got)
        )
        want = [
            int(np.argmax(x[i])) if temps[i] == 0 else sample_row(x[i], float(temps[i]), int(topk[i]), float(topp[i]), us[i])
            for i in range(b)
        ]  # fmt: skip
        miss = int(np.sum(got.get() != np.asarray(want)))
        out.append(
            Result(
                "sample_rows", f"B{b} V{vocab} mixed T/top-k/top-p", miss, 0.0, miss == 0, "abs = mismatches"
            )
        )
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
    return out


def _attention_case(c: Ctx, hq, hkv, d, page, q_lens, ctx_lens, sink=0, local=0, n_stream=0) -> Result:
    from .backends.base import KVCache
    from .backends.cpu import paged_attention_ref
    from .sparse.plan import BatchLayout, build_plan

    need = [-(-t // page) for t in ctx_lens]
    num_pages = sum(need) + 3
    perm = list(c.rng.permutation(num_pages))
    tables = [[int(perm.pop()) for _ in range(k)] for k in need]
    k_cache = c.f16(num_pages, hkv, page, d)
    v_cache = c.f16(num_pages, hkv, page, d)
    q = c.f16(sum(q_lens), hq, d)
    head_class = np.zeros(hkv, np.int32)
    head_class[c.rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, sink=sink, local=local)
    ref = paged_attention_ref(q, k_cache, v_cache, plan, head_class)
    cache = KVCache([c.dev16(k_cache)], [c.dev16(v_cache)], page, num_pages)
    got = c.poison((sum(q_lens), hq * d), np.float16)
    dplan = c.ops.prepare_plan(plan)
    o = c.ops.attention(c.dev16(q), cache, 0, dplan, c.cp.asarray(head_class), out=got)
    kind = "decode" if all(n == 1 for n in q_lens) else "prefill"
    tag = f"Hq{hq}/{hkv} D{d} p{page} q{list(q_lens)[:4]} ctx{list(ctx_lens)[:4]}" + (
        f" stream{n_stream} {sink}/{local}" if n_stream else ""
    )
    return compare(f"attention.{kind}", tag, o.get(), ref, 2e-3, 1e-2)


def case_attention(c: Ctx) -> list[Result]:
    cases = [
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1, 1, 1, 1], ctx_lens=[1, 63, 64, 65, 3000]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[1, 1, 1], ctx_lens=[4096, 17, 200]),
        dict(hq=32, hkv=8, d=128, page=16, q_lens=[1], ctx_lens=[32768]),
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[5, 70, 1], ctx_lens=[5, 200, 1000]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[300], ctx_lens=[300]),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[129, 1], ctx_lens=[2000, 77]),
        dict(
            hq=8,
            hkv=8,
            d=64,
            page=32,
            q_lens=[33, 1, 1],
            ctx_lens=[33, 500, 1],
        ),
        dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1], ctx_lens=[1500, 700], sink=64, local=256, n_stream=2),
        dict(hq=32, hkv=8, d=128, page=64, q_lens=[200], ctx_lens=[1200], sink=128, local=256, n_stream=4),
    ]
    return [_attention_case(c, **kw) for kw in cases]


CASES: dict[str, Callable[[Ctx], list[Result]]] = {
    "embed": case_embed,
    "add_rmsnorm": case_add_rmsnorm,
    "rope_write_kv": case_rope_write_kv,
    "silu_mul": case_silu_mul,
    "linear": case_linear,
    "logits": case_logits,
    "sampling": case_sampling,
    "attention": case_attention,
}


def run_cases(names=None, seed: int | None = None) -> list[Result]:
    """Run the named cases (all by default); a case that raises becomes one failed row."""
    c = Ctx(int(time.time_ns() % (1 << 31)) if seed is None else seed)
    results = []
    for name in names or CASES:
        try:
            results.extend(CASES[name](c))
        except Exception as e:  # a crash is a failure of that kernel, not of the harness
            results.append(Result(name, "-", math.inf, math.inf, False, f"{type(e).__name__}: {e}"[:200]))
    return results


def format_table(results: list[Result]) -> str:
    rows = [f"{'kernel':34s} {'shape':44s} {'max abs':>10s} {'rel':>10s}  result"]
    for r in results:
        rows.append(
            f"{r.kernel:34s} {r.shape[:44]:44s} {r.max_abs:10.3g} {r.rel:10.3g}  {'PASS' if r.ok else 'FAIL'}"
            + (f"  ({r.note})" if r.note else "")
        )
    fails = sum(not r.ok for r in results)
    rows.append(f"{len(results) - fails} passed, {fails} failed")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lserve-lite kernels test", description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    argv = list(argv or [])
    if argv[:1] == ["test"]:  # `lserve-lite kernels test [cases]`
        argv = argv[1:]
    args = ap.parse_args(argv)
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if not cuda_available():
        print("kernels test: no NVIDIA GPU visible to CuPy; nothing to run (the CPU backend needs none).")
        return 0
    results = run_cases(args.cases or None, args.seed)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
