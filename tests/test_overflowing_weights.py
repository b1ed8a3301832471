"""Weights too large for float32 arithmetic (finite, so the loader takes them): a request whose activations overflow
fails in one line naming the cause, instead of sampling garbage tokens from NaN, inf or all-equal logits; the engine
goes on and other requests are not touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_numpy

from lserve_lite import LLM, EngineConfig, LServeError, SamplingParams
from lserve_lite.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
CAUSE = "non-finite activations at step {step} of request {rid}: its logits are NaN, inf or all equal"


def _with_weight(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of model `src` (`src` itself where dst is src) whose tensor `name` is `edit(tensor)`."""
    from safetensors.numpy import load_file, save_file

    if dst != src:
        shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A clean tiny model (head_dim 64: the GPU kernels run it too); prompts a and b; a token x in neither prompt nor
    in b's reply on the CPU; and two broken copies: `token` (x's embedding row 1e30: a norm over it overflows and its
    logits come out all equal, so a request meeting x fails) and `all` (layer 0's input norm weight 1e30: NaN logits
    for every request). The GPU keeps weights in float16 (1e30 is refused at load) and overflows there instead:
    `clean16` (embedding column 0 zero, layer 0's q / k weights of column 0 at 60000, which every token but x meets
    as zeros) and `token16` (x's column 0 at 10: its q and k pass float16's range, so its attention is NaN)."""
    tmp = tmp_path_factory.mktemp("overflow")
    clean = make_tiny_numpy(tmp / "clean", hidden=256)
    rng = np.random.default_rng(5)
    a, b = ([int(t) for t in rng.integers(3, 320, n)] for n in (10, 12))
    p0 = "model.layers.0.self_attn."

    def col0(v: float):
        def edit(w: np.ndarray) -> np.ndarray:
            w[:, 0] = v
            return w

        return edit

    clean16 = _with_weight(clean, tmp / "clean16", "model.embed_tokens.weight", col0(0.0))
    for name in (p0 + "q_proj.weight", p0 + "k_proj.weight"):
        _with_weight(clean16, clean16, name, col0(6e4))
    replies = [LLM(str(m), backend="cpu").generate([b], GREEDY)[0].token_ids for m in (clean, clean16)]
    x = next(t for t in range(3, 320) if t not in a + b + replies[0] + replies[1])

    def huge_row(w: np.ndarray) -> np.ndarray:
        w[x] = 1e30
        return w

    def x_col0(w: np.ndarray) -> np.ndarray:
        w[x, 0] = 10.0
        return w

    token = _with_weight(clean, tmp / "token", "model.embed_tokens.weight", huge_row)
    token16 = _with_weight(clean16, tmp / "token16", "model.embed_tokens.weight", x_col0)
    norm = "model.layers.0.input_layernorm.weight"
    every = _with_weight(clean, tmp / "all", norm, lambda w: np.full_like(w, 1e30))
    return dict(a=a, b=b, x=x, clean=clean, token=token, all=every, clean16=clean16, token16=token16)


def _run(path: Path, backend: str, overlap: bool, requests: list) -> tuple[LLMEngine, list[str], dict]:
    """Every request run to its end on an engine of `path`; `overlap`: the overlapped decode (forced on the CPU)."""
    eng = LLMEngine(str(path), backend, EngineConfig(async_scheduling=overlap))
    eng.ops.async_steps = overlap
    rids = [eng.add_request(p, sp) for p, sp in requests]
    outs: dict[str, list] = {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].append(o)
    return eng, rids, outs


@pytest.mark.parametrize(
    "backend, overlap",
    [("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=pytest.mark.gpu),
     pytest.param("cuda", True, marks=pytest.mark.gpu)],
)  # fmt: skip
def test_a_request_whose_activations_overflow_fails_alone(case, backend, overlap):
    """a is biased to sample x first (from sound logits); its next logits, from x's overflowed activations, are all
    equal (CPU) or NaN (GPU): it fails there, in the synchronous step or in the overlapped decode's read; b runs as
    on the clean model."""
    clean_model, token_model = (
        (case["clean"], case["token"]) if backend == "cpu" else (case["clean16"], case["token16"])
    )
    *_, clean = _run(clean_model, backend, overlap, [(case["b"], GREEDY)])
    b_out = [t for o in next(iter(clean.values())) for t in o.token_ids]
    assert case["x"] not in b_out  # (chosen so on the CPU)
    to_x = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logit_bias={case["x"]: 100})
    eng, (ra, rb), outs = _run(token_model, backend, overlap, [(case["a"], to_x), (case["b"], GREEDY)])
    last = outs[ra][-1]
    assert last.finished and last.finish_reason == "error", last
    assert last.error.startswith(CAUSE.format(step=2, rid=ra)) and "\n" not in last.error, last.error
    assert [t for o in outs[ra] for t in o.token_ids] == [case["x"]]  # nothing sampled from the broken row
    assert [t for o in outs[rb] for t in o.token_ids] == b_out
    assert outs[rb][-1].finish_reason == "length"
    assert eng.blocks.num_used == 0 and not eng.seqs


def test_the_synchronous_step_reads_ids_and_flags_back_together(case, monkeypatch):
    """The synchronous step read the rows' flags (sound_rows) and then their ids (sample) back in two waits on the
    device a step; both now come from one `sample_async`, and a failing row still fails alone."""
    eng = LLMEngine(str(case["token"]), "cpu", EngineConfig(async_scheduling=False))
    calls = []
    real = eng.ops.sample_async

    def counted(logits, seqs, out=None):
        calls.append(len(seqs))
        return real(logits, seqs, out)

    monkeypatch.setattr(eng.ops, "sample", lambda *a: pytest.fail("a second readback: sample"))
    monkeypatch.setattr(eng.ops, "sample_async", counted)
    to_x = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logit_bias={case["x"]: 100})
    ra, rb = eng.add_request(case["a"], to_x), eng.add_request(case["b"], GREEDY)
    outs: dict[str, list] = {ra: [], rb: []}
    steps = 0
    while eng.has_unfinished():
        steps += 1
        for o in eng.step():
            outs[o.request_id].append(o)
    assert len(calls) == steps and calls[:2] == [2, 2], (
        calls
    )  # one call a step; x's failing row was in the second
    assert outs[ra][-1].finish_reason == "error" and [t for o in outs[ra] for t in o.token_ids] == [case["x"]]
    assert outs[rb][-1].finish_reason == "length" and len([t for o in outs[rb] for t in o.token_ids]) == 6


def test_llm_generate_gives_the_failed_prompt_its_cause_and_the_others_their_outputs(case):
    """One failed prompt of a batch raised and aborted the rest, their outputs lost: each prompt gets its output,
    the failed one finish_reason "error" with the one line (not a list of garbage tokens) in `error`; the same LLM
    then serves other prompts. A stream, one request, still raises the line."""
    llm = LLM(str(case["token"]), backend="cpu")
    clean = LLM(str(case["clean"]), backend="cpu")
    want = clean.generate([case["b"]], GREEDY)[0]
    # x ends the second prompt: its first logits overflow; the first and third prompts run to their end
    outs = llm.generate([case["b"], case["a"] + [case["x"]], case["b"]], GREEDY)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"], outs
    assert outs[0].token_ids == outs[2].token_ids == want.token_ids and outs[0].error is None
    bad = outs[1]
    assert bad.error.startswith(CAUSE.format(step=1, rid=bad.request_id)) and "\n" not in bad.error, bad.error
    assert (bad.text, bad.token_ids, bad.prompt_token_ids) == ("", [], case["a"] + [case["x"]])
    assert llm.generate([case["b"]], GREEDY)[0].token_ids == want.token_ids
    assert llm.engine.blocks.num_used == 0 and not llm.engine.seqs
    every = LLM(str(case["all"]), backend="cpu")
    for _ in range(2):  # the engine survives its own failure
        with pytest.raises(LServeError, match=CAUSE.format(step=1, rid=r"req-\d+")):
            list(every.stream("hello"))


def test_bench_prefill_of_a_failing_model_is_an_error_not_a_figure(case):
    """generate returns a failed request's output instead of raising: the bench's prefill rate would then time
    requests that failed and print a figure; it raises their one line."""
    from lserve_lite.bench import prefill_tok_s

    with pytest.raises(LServeError, match=CAUSE.format(step=1, rid=r"req-\d+")):
        prefill_tok_s(LLM(str(case["all"]), backend="cpu"), 8, reps=1)


def test_tools_that_generate_on_a_failing_model_raise_not_a_figure_or_an_answer(case, monkeypatch):
    """generate and chat return a failed request's output instead of raising: bench_cpu's prefill, bench_prefix_cache's
    runs and eval_lm_harness's direct answers timed it or read its empty text as an answer; each raises its line, as
    the bench's prefill does (one home: lserve_lite.llm.succeeded)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_cpu
    import bench_prefix_cache
    import eval_lm_harness

    every, cause = LLM(str(case["all"]), backend="cpu"), CAUSE.format(step=1, rid=r"req-\d+")
    for run in (
        lambda: bench_cpu.bench_prefill(every, 8, 1),
        lambda: bench_prefix_cache.run_doc(every, [case["a"], case["b"]], GREEDY, "burst"),
        lambda: bench_prefix_cache.run_doc(every, [case["a"], case["b"]], GREEDY, "staggered"),
        lambda: eval_lm_harness.direct_chat(every),
    ):
        with pytest.raises(LServeError, match=cause):
            run()
    clean = LLM(str(case["clean"]), backend="cpu")  # a model that runs gives its figures and answers
    assert bench_cpu.bench_prefill(clean, 8, 1)["tok_s"] > 0
    assert len(bench_prefix_cache.run_doc(clean, [case["a"], case["b"]], GREEDY, "burst")["outputs"]) == 2
    assert len(eval_lm_harness.direct_chat(clean)) == len(eval_lm_harness.QUESTIONS)


def test_cli_generate_is_one_line(case):
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(case["all"]), "--backend", "cpu",
         "--prompt", "hello", "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout.strip() == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("error: non-finite activations at step 1"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_server_answers_the_failed_request_an_error_and_serves_the_others(case):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from lserve_lite.serve.app import ServerThread, create_app

    engine = LLMEngine(str(case["token"]), "cpu", EngineConfig())
    body = dict(model="tiny", max_tokens=6, temperature=0, ignore_eos=True)
    with ServerThread(create_app(engine, served_model_name="tiny")) as url:
        url += "/v1/completions"
        bad = httpx.post(url, json=body | {"prompt": case["a"] + [case["x"]]}, timeout=120)
        assert bad.status_code == 500, bad.text
        assert bad.json()["error"]["message"].startswith("non-finite activations at step 1"), bad.text
        to_x = body | {"prompt": case["a"], "logit_bias": {str(case["x"]): 100}, "stream": True}
        events = httpx.post(url, json=to_x, timeout=120).text  # x streamed, then the error event
        assert "non-finite activations at step 2" in events and events.endswith("data: [DONE]\n\n"), events
        good = httpx.post(url, json=body | {"prompt": case["b"]}, timeout=120)
        assert good.status_code == 200, good.text
        choice = good.json()["choices"][0]
        assert choice["finish_reason"] == "length" and good.json()["usage"]["completion_tokens"] == 6
    assert engine.blocks.num_used == 0
