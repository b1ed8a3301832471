"""The accuracy suite's small configuration: generators, scoring, confidence intervals, the refusal of
unimplemented settings, `lserve-lite eval` end to end on a tiny random model, the dense-equivalence of
`--shared-dense`, and the selector diagnostics' pieces against the references."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lserve_lite.errors import InvalidRequestError
from lserve_lite.evaluation import ruler
from lserve_lite.evaluation.run_eval import mcnemar, wilson


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama with a 2k context and a head pattern (one streaming head of four)."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.sparse.patterns import save_pattern

    path = make_tiny_numpy(tmp_path_factory.mktemp("tiny_eval"))
    save_pattern(path / "full_attention_heads.tsv", np.array([[1.0, 0.2], [0.9, 0.8]]))
    return path


@pytest.fixture(scope="module")
def tok(tiny):
    from lserve_lite.tokenizer import Tokenizer

    return Tokenizer(tiny)


def test_generators_deterministic_and_sized(tok):
    for task in ruler.TASKS:
        a = ruler.generate(task, tok, 1024, 2, seed=3)
        b = ruler.generate(task, tok, 1024, 2, seed=3)
        c = ruler.generate(task, tok, 1024, 2, seed=4)
        assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b], task
        assert [s.expected for s in a] == [s.expected for s in b], task
        assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c], task
        for s in a:
            assert 900 <= len(s.prompt_ids) <= 1024, (task, len(s.prompt_ids))
            text = tok.decode(s.prompt_ids)
            assert all(e in text for e in s.expected), task  # the answer is in the context


def test_generators_do_not_depend_on_string_hashing(tiny):
    """The same prompts in every process: nothing iterates a set of strings (PYTHONHASHSEED varies)."""
    code = ("import sys, hashlib, pathlib; from lserve_lite.tokenizer import Tokenizer; from lserve_lite.evaluation import ruler;"
            "t = Tokenizer(pathlib.Path(sys.argv[1])); h = hashlib.sha256();"
            "[h.update(bytes(str(s.prompt_ids), 'ascii')) for k in ruler.TASKS for s in ruler.generate(k, t, 1024, 2)];"
            "print(h.hexdigest())")  # fmt: skip
    digests = {
        subprocess.run(
            [sys.executable, "-c", code, str(tiny)],
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for h in ("1", "2", "3")
    }
    assert len(digests) == 1, digests


def test_scoring():
    s = ruler.Sample("t", [], ["1234567"], 8)
    assert s.score(" 1234567.") == 1.0 and s.correct("The number is 1234567")
    assert s.score(" 7654321.") == 0.0 and s.score(" 12345678") == 0.0  # whole numbers only
    m = ruler.Sample("t", [], ["silver-falcon", "tiger-ivory"], 8)
    assert m.score("Silver-Falcon, and more") == 0.5 and not m.correct("silver-falcon")
    assert m.score("silver-falconry tiger") == 0.0


def test_wilson_and_mcnemar_known_values():
    for (k, n), ref in {(0, 10): (0.0, 0.27753), (5, 10): (0.23659, 0.76341), (10, 10): (0.72247, 1.0),
                        (81, 263): (0.25529, 0.36621)}.items():  # fmt: skip
        assert wilson(k, n) == pytest.approx(ref, abs=1e-5), (k, n)
    assert mcnemar(0, 0) == 1.0 and mcnemar(5, 0) == pytest.approx(0.0625) and mcnemar(3, 3) == 1.0


def test_per_run_settings_refused_per_setting():
    from lserve_lite.cli import main
    from lserve_lite.evaluation.settings import parse_configs

    with pytest.raises(
        InvalidRequestError, match="kv_dtype is per run, not per setting: pass --kv-dtype int8"
    ):
        parse_configs("dense;q8:kv_dtype=int8")
    assert parse_configs("dense;lserve-b1024")["lserve-b1024"].token_budget == 1024
    assert main(["eval", "--quantize", "int4", "--model", "/nonexistent"]) == 1  # refused before loading


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--seed", "-1"], "--seed: -1 is outside [0,"),  # NumPy's generator raised after the model loaded
        (["--time-limit", "nan"], "--time-limit: nan is outside [0,"),  # was no limit at all
        (["--time-limit", "-1"], "--time-limit: -1.0 is outside [0,"),  # was a model load, then an error
        (["--out", "/"], "--out: /: a directory, not a file"),  # the stem '/' wrote '/.json'
        (["--lengths", "512,512"], "--lengths: 512 is given twice"),  # the same prompts counted twice
        (["--tasks", "qa, qa"], "--tasks: qa is given twice"),
        (["--tasks", ","], "--tasks: ',' has an empty name"),  # was "argument --tasks:  is given twice"
        (["--tasks", "qa,"], "--tasks: 'qa,' has an empty name"),
    ],
)
def test_eval_refuses_bad_seed_time_limit_and_out_at_the_parser(argv, msg, capsys):
    from lserve_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "/nonexistent", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("x:token_budget=abc", "config 'x': token_budget='abc' is not an integer"),
        ("x:static_sparsity=half", "config 'x': static_sparsity='half' is not a number"),
        ("x:budget=128", "config 'x': unknown sparse knob 'budget'"),
        ("x:token_budget", "config 'x': 'token_budget' is not knob=value"),
        ("x:token_budget=128,", "config 'x': '' is not knob=value"),
        (":token_budget=128", "expected a preset or NAME:knob=v"),
        ("dense,x:token_budget=128", "expected a preset or NAME:knob=v"),
        ("lserve;lserve", "config 'lserve' given twice"),
        ("dense:token_budget=128", "config 'dense' is the dense baseline"),
        ("x:token_budget=128,token_budget=256", "config 'x': a knob is given twice"),
        ("x:token_budget=-64", "config 'x': sparse config: token_budget must be"),
        ("x:select_interval=1000000000000", "config 'x': sparse config: select_interval must be in [1,"),
    ],
)
def test_bad_configs_are_one_line_errors(spec, msg):
    """Every malformed --configs entry is an InvalidRequestError naming the entry, never a ValueError."""
    from lserve_lite.evaluation.settings import parse_configs

    with pytest.raises(InvalidRequestError, match=re.escape(msg)):
        parse_configs(spec)


def test_plot_only_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    """--plot-only on a missing file, a TSV, another tool's JSON or a run with no finished prompt."""
    from lserve_lite.cli import main

    (tmp_path / "p.tsv").write_text("1.0\t0.5\n")
    (tmp_path / "passkey.json").write_text('{"tool": "eval_passkey", "results": []}')
    (tmp_path / "empty.json").write_text('{"tool": "lserve-lite eval", "summary": {}, "results": []}')
    cases = {"nonexistent.json": "file not found", "p.tsv": "not a JSON file",
             "passkey.json": "not the JSON written by lserve-lite eval", "empty.json": "nothing to plot"}  # fmt: skip
    for name, msg in cases.items():
        assert main(["eval", "--plot-only", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err, (name, err)


def test_pattern_checked_before_any_prompt(tiny, tmp_path):
    """A missing --pattern fails when the Runner is made (no LLM yet), and one no setting uses is refused."""
    from lserve_lite.errors import ModelLoadError
    from lserve_lite.evaluation.settings import Runner, parse_configs

    missing = str(tmp_path / "nonexistent.tsv")
    with pytest.raises(ModelLoadError, match="head pattern file not found"):
        Runner(str(tiny), parse_configs("dense;lserve"), 512, missing, backend="cpu")
    (tmp_path / "bad.tsv").write_text("1.0\n")
    with pytest.raises(ModelLoadError, match="bad.tsv"):
        Runner(str(tiny), parse_configs("dense;lserve"), 512, str(tmp_path / "bad.tsv"), backend="cpu")
    for spec in ("dense", "dense;s0:static_sparsity=0"):
        with pytest.raises(InvalidRequestError, match="no setting uses a head pattern"):
            Runner(str(tiny), parse_configs(spec), 512, missing, backend="cpu")


def test_quantize_recorded_only_where_applied(tiny, tmp_path):
    """--quantize on a GGUF whose matrices are all packed changes nothing, so results record None."""
    from test_gguf_import import write_tiny_gguf

    from lserve_lite.evaluation.settings import Runner
    from lserve_lite.weights.loader import load_model
    from lserve_lite.weights.qtensor import QuantTensor

    mixed, packed = tmp_path / "mixed.gguf", tmp_path / "packed.gguf"
    write_tiny_gguf(mixed)  # attn_q F32, attn_output F16: those get quantized
    write_tiny_gguf(packed, types={"attn_q": "Q8_0", "attn_output": "Q8_0"})
    for model, want in ((tiny, "int8"), (mixed, "int8"), (packed, None)):
        assert Runner(str(model), {"dense": None}, 256, None, quantize="int8").quantize == want, model
        packed_counts = [sum(isinstance(w, QuantTensor) for w in load_model(model, q).weights.values())
                         for q in (None, "int8")]  # fmt: skip
        assert (packed_counts[0] != packed_counts[1]) == (want is not None), model  # as the loader does


def test_eval_help_is_true_of_short_lengths_and_the_png(tiny, smollm2_dir, tmp_path, capsys):
    """`eval --help` said lengths "each >= 256" while `--tasks all --lengths 256` was refused for
    niah_multikey_uuids (SmolLM2), and promised a <out>.png that no run without matplotlib writes. It says what a
    short length and a missing matplotlib do, and the length it names for SmolLM2 fits every task."""
    from lserve_lite.cli import main
    from lserve_lite.tokenizer import Tokenizer

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "each >= 256; a length too short for a task is refused, naming it, before any prompt runs" in text
    assert (
        "SmolLM2's prompts of every task fit 512" in text
        and "<out>.png where matplotlib is installed" in text
    )
    smol = Tokenizer(smollm2_dir)
    for task in ruler.TASKS:
        for seed in (0, 1):
            assert all(len(s.prompt_ids) <= 512 for s in ruler.samples(task, smol, 512, 8, seed)), task
    out = tmp_path / "r"
    assert main(["eval", "--model", str(tiny), "--backend", "cpu", "--tasks", "all", "--lengths", "256",
                 "--out", str(out)]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: task niah_single_numbers: a prompt of 256 tokens is too short for this task "
                        r"\(this one needs \d+\)\n", err), err  # fmt: skip
    assert not out.with_suffix(".json").exists()


def test_eval_refuses_lengths_over_the_model_context(tiny, tmp_path, capsys):
    """A 2k-context model: 4096-token haystacks are refused with one line before any is built."""
    from lserve_lite.cli import main

    assert main(["eval", "--model", str(tiny), "--backend", "cpu", "--lengths", "1024,4096", "--out",
                 str(tmp_path / "r")]) == 1  # fmt: skip
    assert (
        "--lengths 4096 + 128 tokens of question exceeds the model's context 2048" in capsys.readouterr().err
    )


def test_eval_past_an_assumed_context_says_it_was_assumed(tmp_path, capsys):
    """A model that names no trained context length (no max_position_embeddings) was refused as 'exceeds the model's
    context 2048', a limit the model never named: the line says it was assumed, and how to name the real one."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.cli import main
    from lserve_lite.sparse.patterns import save_pattern

    model = make_tiny_numpy(tmp_path / "no_context")
    save_pattern(model / "full_attention_heads.tsv", np.array([[1.0, 0.2], [0.9, 0.8]]))
    cfg = json.loads((model / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (model / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(model), "--backend", "cpu", "--lengths", "4096", "--out",
                 str(tmp_path / "r")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assumed = "4096 + 128 tokens of question exceeds 2048 tokens, the context assumed for this model"
    assert assumed in err and "transformers' default for LlamaForCausalLM" in err
    assert "write that length as max_position_embeddings into its config.json" in err
    assert "the model's context" not in err and len(err.strip().splitlines()) == 1


def test_eval_cli_end_to_end(tiny, tmp_path):
    from lserve_lite.cli import main

    out = tmp_path / "r"
    rc = main(["eval", "--model", str(tiny), "--backend", "cpu", "--lengths", "1024", "--samples", "2",
               "--tasks", "niah_single_numbers,qa", "--configs", "dense;lserve;b128:token_budget=128",
               "--out", str(out), "--shared-dense"])  # fmt: skip
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    cell = res["summary"]["1024"]
    assert set(cell["tasks"]) == {"niah_single_numbers", "qa", "all"}
    for s in ("dense", "lserve", "b128"):
        a = cell["tasks"]["all"][s]
        assert a["n"] == 4 and 0 <= a["ci95"][0] <= a["acc"] <= a["ci95"][1] <= 1
    assert set(cell["vs_dense"]) == {"lserve", "b128"}
    assert len(res["results"]) == 4 and all(
        set(r["output"]) == {"dense", "lserve", "b128"} for r in res["results"]
    )


def test_eval_records_a_relative_model_by_its_folder(tiny, tmp_path, monkeypatch):
    """`lserve-lite eval --model .` recorded the model as "" (`Path(".").name`); calibrate did the same."""
    from lserve_lite.cli import main

    monkeypatch.chdir(tiny)
    out = tmp_path / "r"
    rc = main(["eval", "--model", ".", "--backend", "cpu", "--lengths", "512", "--samples", "1",
               "--tasks", "niah_single_numbers", "--configs", "dense", "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert json.loads(out.with_suffix(".json").read_text())["model"] == tiny.name


def test_eval_pattern_is_read_as_the_other_commands_read_it(tmp_path, monkeypatch, capsys):
    """`lserve-lite eval --pattern=~/p.tsv` (no shell expands that ~) was not found where `serve` and the sweep tools
    find it, and a missing pattern was refused only after the run's prompts were built: the parser's existing_file,
    as theirs."""
    from lserve_lite.cli import build_parser, main

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.tsv").write_text("0.5\n")
    assert build_parser().parse_args(["eval", "--pattern=~/p.tsv"]).pattern == str(tmp_path / "p.tsv")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "/nonexistent", "--pattern", str(tmp_path / "typo.tsv")])
    assert e.value.code == 2 and "--pattern: " in capsys.readouterr().err


def test_eval_json_rewrite_that_fails_keeps_the_answers_written_before(tmp_path, file_size_limit):
    """<out>.json is rewritten after every prompt so that an interrupted run keeps its answers; a rewrite that failed
    part-way (Ctrl-C, a full disk) truncated it, losing all of them. The previous version stays whole."""
    from types import SimpleNamespace

    from lserve_lite.evaluation.run_eval import Answered, _write

    smp = SimpleNamespace(task="qa", expected=["a"], info={}, score=len, correct=bool)
    answered, outs, out = [Answered(256, 2, smp)] * 2, [{"dense": "a"}, {}], tmp_path / "r"
    _write({}, answered, outs, ["dense"], out, 1.0)
    before = (tmp_path / "r.json").read_bytes()
    outs[1] = {"dense": "x" * len(before)}
    with file_size_limit(len(before) + 16), pytest.raises(OSError):
        _write({}, answered, outs, ["dense"], out, 2.0)
    assert (tmp_path / "r.json").read_bytes() == before and len(json.loads(before)["results"]) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_eval_time_limit_spent_before_any_prompt_is_one_clear_error(tiny, tmp_path, capsys):
    from lserve_lite.cli import main

    rc = main(["eval", "--model", str(tiny), "--backend", "cpu", "--lengths", "1024", "--samples", "1",
               "--tasks", "niah_single_numbers", "--configs", "dense", "--time-limit", "1e-9",
               "--out", str(tmp_path / "r")])  # fmt: skip
    assert rc == 1 and "no prompt finished" in capsys.readouterr().err


def test_time_limit_shares_time_between_groups_and_keeps_every_answer(tiny, tmp_path, monkeypatch):
    """Two LLMs (dense, then b128), 6 prompts of 10 s each on a fake clock, a 45 s limit: dense gets half
    (3 prompts), b128 the 15 s left (2). All 3 answered prompts are kept, and no write has fewer rows."""
    from lserve_lite.evaluation.eval_args import add_eval_args
    from lserve_lite.evaluation.run_eval import evaluate
    from lserve_lite.evaluation.settings import Runner

    now, out, rows_seen, greedy = [0.0], tmp_path / "r", [], Runner.greedy_all

    def slow(self, h, names, ids, max_new, stop_ids=()):
        if out.with_suffix(".json").exists():
            rows_seen.append(len(json.loads(out.with_suffix(".json").read_text())["results"]))
        now[0] += 10
        return greedy(self, h, names, ids, 2, stop_ids)

    monkeypatch.setattr(Runner, "greedy_all", slow)
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--model", str(tiny), "--backend", "cpu", "--lengths", "512", "--samples", "3",
                         "--tasks", "niah_single_numbers,qa", "--configs", "dense;b128:token_budget=128",
                         "--time-limit", "45", "--quantize", "int8", "--out", str(out)])  # fmt: skip
    logs: list[str] = []
    res = evaluate(args, log=logs.append, clock=lambda: now[0])
    assert res["finished"] == {"dense": 3, "b128": 2} and res["prompts"] == 6 and res["quantize"] == "int8"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["results"]) == 3 and set(saved["results"][2]["output"]) == {"dense"}
    assert rows_seen == sorted(rows_seen) and rows_seen[-1] <= 3
    cell = saved["summary"]["512"]
    assert cell["tasks"]["all"]["dense"]["n"] == 3 and cell["tasks"]["all"]["b128"]["n"] == 2
    assert cell["vs_dense"]["b128"]["n"] == 2
    text = "\n".join(logs)
    assert "time limit: dense stopped after 3 of 6 prompts (its share used)" in text
    assert "time limit: b128 stopped after 2 of 6 prompts" in text
    assert logs[-1].startswith("prompts finished: dense 3/6, b128 2/6")


def test_eval_builds_each_prompt_when_its_turn_comes(tiny, tok, tmp_path, monkeypatch):
    """Every prompt of the run was built before the first one ran (a 100k-sample task at long context held all
    of them at once): a prompt is built when its turn comes, after a check that builds one per (length, task),
    and each group of settings builds the same prompts again, in the same order as before."""
    from lserve_lite.evaluation.eval_args import add_eval_args
    from lserve_lite.evaluation.run_eval import evaluate
    from lserve_lite.evaluation.settings import Runner

    built, at_call, seen = [0], [], []
    for task in ("niah_single_numbers", "qa"):
        make = ruler.TASKS[task]

        def counting(*a, make=make):
            built[0] += 1
            return make(*a)

        monkeypatch.setitem(ruler.TASKS, task, counting)

    def greedy_all(self, h, names, ids, max_new, stop_ids=()):
        at_call.append(built[0])
        seen.append(ids)
        return {k: [] for k in names}

    monkeypatch.setattr(Runner, "greedy_all", greedy_all)
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--model", str(tiny), "--backend", "cpu", "--lengths", "512", "--samples", "3",
                         "--tasks", "niah_single_numbers,qa", "--configs", "dense;b128:token_budget=128",
                         "--out", str(tmp_path / "r")])  # fmt: skip
    res = evaluate(args, log=lambda s: None)
    assert at_call == list(range(3, 9)) + list(range(9, 15))  # 2 checked, then one per prompt, per group
    eager = {t: ruler.generate(t, tok, 512, 3) for t in ("niah_single_numbers", "qa")}
    order = [eager[t][i].prompt_ids for i in range(3) for t in ("niah_single_numbers", "qa")]
    assert seen == order + order
    assert [r["tokens"] for r in res["rows"]] == [len(ids) for ids in order]


def test_eval_task_listed_twice_from_python_repeats_its_prompts(tiny, tmp_path, monkeypatch):
    """evaluate() from Python with a task listed twice (the parser refuses it) drew one lazy builder twice per
    round and ended in 'generator raised StopIteration': each listing runs the task's prompts, as before."""
    from lserve_lite.evaluation.eval_args import add_eval_args
    from lserve_lite.evaluation.run_eval import evaluate
    from lserve_lite.evaluation.settings import Runner

    monkeypatch.setattr(Runner, "greedy_all", lambda self, h, names, *a, **kw: {k: [] for k in names})
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--model", str(tiny), "--backend", "cpu", "--lengths", "512", "--samples", "2",
                         "--tasks", "qa", "--configs", "dense", "--out", str(tmp_path / "r")])  # fmt: skip
    args.tasks = ["qa", "qa"]
    tokens = [r["tokens"] for r in evaluate(args, log=lambda s: None)["rows"]]
    assert len(tokens) == 4 and tokens[0] == tokens[1] and tokens[2] == tokens[3]


def test_shared_dense_equals_dense_engine(tiny, tok):
    """`--shared-dense` (a full-window request on the LServe LLM) gives the dense engine's logits."""
    from lserve_lite.evaluation.settings import Runner, parse_configs

    ids = ruler.generate("niah_single_words", tok, 700, 1)[0].prompt_ids
    logits = {}
    for shared in (False, True):
        r = Runner(str(tiny), parse_configs("dense;b128:token_budget=128"), 1024, None, shared, "cpu")
        h, names = next(r.groups())
        assert "dense" in names
        seq = h.begin(ids, prompt_len=len(ids) - 6)
        r.prepare(h, seq, "dense", "prefill")
        logits[shared] = np.concatenate([h.forward(seq, len(ids) - 6, logits="last"), h.decode(seq, 6)])
        h.end(seq)
    np.testing.assert_allclose(logits[True], logits[False], atol=2e-4, rtol=1e-4)


def test_every_page_size_holds_the_run_length(tiny):
    """The pool was sized in 64-token pages whatever a setting's page_size: page_size=16 held a quarter of the
    run's length (a 990-token prompt: "exceed the context limit 304")."""
    from lserve_lite.evaluation.settings import Runner, parse_configs

    knobs = "prefill_sink={0},decode_sink={0},prefill_local=256,decode_local=256,token_budget=512"
    spec = ";".join(f"p{ps}:page_size={ps},{knobs.format(ps)}" for ps in (16, 128))
    r = Runner(str(tiny), parse_configs(spec), 1000, None, backend="cpu")
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 990)]
    for h, names in r.groups():
        assert h.engine.max_len == 1000, names
        assert len(r.greedy_all(h, names, ids, 2)[names[0]]) == 2


def test_settings_sharing_a_prefill_never_read_another_settings_decode(tiny):
    """Settings with one prefill share it, each rewinding to the prompt's end; a streaming head's ring keeps only
    its newest pages, so one setting's long decode overwrote the window the next one read back (its answer
    depended on the settings run before it). That setting now recomputes the prefill, and a rewind that would
    read overwritten K/V is refused."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness
    from lserve_lite.evaluation.settings import Runner, parse_configs

    knobs = "page_size=16,prefill_sink=16,prefill_local=32,decode_sink=16"
    spec = f"a:{knobs},decode_local=32,token_budget=32;b:{knobs},decode_local=16,token_budget=48"
    r = Runner(str(tiny), parse_configs(spec), 1024, None, backend="cpu")
    sp = SparseConfig(enabled=True, page_size=16, prefill_sink=16, prefill_local=32, decode_sink=16,
                      decode_local=32, token_budget=64, pattern_path=str(tiny / "full_attention_heads.tsv"))  # fmt: skip
    llm = LLM(
        str(tiny), backend="cpu", config=EngineConfig(page_size=16, max_num_batched_tokens=7, sparse=sp)
    )
    h = SparseHarness(llm)
    assert llm.engine.layout.ring_pages == 4  # 64 tokens: 80 decode steps wrap it
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 150)]
    assert r.greedy_all(h, ["a", "b"], ids, 80)["b"] == r.greedy_all(h, ["b"], ids, 80)["b"]
    seq = h.begin(ids, reserve=81)
    try:
        first = h.forward(seq, len(ids), logits="last")[-1]
        h.greedy(seq, 20, first)
        assert h.can_rewind(seq, len(ids))  # 20 tokens past the prompt: its window is held
        h.greedy(seq, 80, first)
        assert not h.can_rewind(seq, len(ids)) and h.can_rewind(seq, 0)
        with pytest.raises(InvalidRequestError, match="cannot rewind to 150 tokens"):
            h.rewind(seq, len(ids))
    finally:
        h.end(seq)


def test_harness_refuses_a_sequence_without_a_selection_slot(tiny):
    """Past max_num_seqs sequences at once, begin() handed out one without a page-selection slot: its selecting
    decode steps used another sequence's selection row (-1), and that one's logits changed. It is refused, with
    no page taken."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness

    sp = SparseConfig(
        enabled=True, page_size=16, token_budget=32, pattern_path=str(tiny / "full_attention_heads.tsv")
    )
    llm = LLM(str(tiny), backend="cpu", config=EngineConfig(page_size=16, max_num_seqs=1, sparse=sp))
    h = SparseHarness(llm)
    ids = list(range(3, 103))
    a = h.begin(ids)
    used = llm.engine.blocks.num_used
    with pytest.raises(InvalidRequestError, match="every page-selection slot is taken"):
        h.begin(ids)
    assert llm.engine.blocks.num_used == used
    assert llm.logits(ids).shape == (len(ids), 320)  # prefill only: scoring needs no slot
    h.end(a)
    h.end(h.begin(ids))  # its slot is back


def test_engine_requests_wait_for_a_selection_slot_a_harness_sequence_holds(tiny):
    """A harness sequence held one of max_num_seqs page-selection slots while generate ran max_num_seqs
    requests: admission did not count slots, so one request ran with slot -1 and selected in the other's row
    (its greedy tokens changed). A request now waits for a slot: the tokens are each request's solo ones."""
    from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness

    sp = SparseConfig(
        enabled=True, page_size=16, token_budget=32, select_interval=1,
        pattern_path=str(tiny / "full_attention_heads.tsv"),
    )  # fmt: skip
    llm = LLM(str(tiny), backend="cpu", config=EngineConfig(page_size=16, max_num_seqs=2, sparse=sp))
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": [int(t) for t in rng.integers(3, 300, 120)]} for _ in range(2)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    solo = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    h = SparseHarness(llm)
    held = h.begin(list(range(3, 103)))
    both = llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)  # one seat of two is free
    assert [o.outputs[0].token_ids for o in both] == solo
    both = llm.generate(prompts, params)  # the second waits for the first's slot
    assert [o.outputs[0].token_ids for o in both] == solo
    h.end(held)
    assert len(llm.engine.blocks.slots) == 2


def test_a_prefill_chunk_after_decode_steps_restarts_the_selection_schedule(tiny):
    """A page selection is recomputed at the first decode step after a prefill (docs/SPARSE.md). A harness
    forward() of several teacher-forced outputs after decode steps left the count running: the next decode
    step reused the selection made before the chunk, pages ago. It selects anew, as after a rewind."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness

    sp = SparseConfig(
        enabled=True, page_size=16, token_budget=32, select_interval=64,
        pattern_path=str(tiny / "full_attention_heads.tsv"),
    )  # fmt: skip
    llm = LLM(
        str(tiny), backend="cpu", config=EngineConfig(page_size=16, max_num_batched_tokens=64, sparse=sp)
    )
    h = SparseHarness(llm)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 300, 140)]

    def decode_after_a_chunk(restart: bool) -> np.ndarray:
        seq = h.begin(ids, prompt_len=60)
        h.forward(seq, 60, logits="last")
        h.decode(seq, 2)  # selects at 61 tokens
        h.forward(seq, 40, logits="last")  # a prefill chunk of outputs
        if restart:
            h.rewind(seq, seq.num_cached)  # restarts the schedule, and nothing else
        try:
            return h.decode(seq, 1)
        finally:
            h.end(seq)

    np.testing.assert_array_equal(decode_after_a_chunk(False), decode_after_a_chunk(True))


@pytest.mark.parametrize("before,after", [(32, 64), (64, 32)])
def test_a_budget_changed_mid_decode_selects_anew(tiny, before: int, after: int):
    """set_request_sparse between decode steps left the selection schedule running: the next steps reused the
    selection stored under the old budget (its page count, e.g. 4 pages where the new budget allows 2, more than a
    step's visit list is sized for). The next decode step selects with the new budget, as after a rewind."""
    from lserve_lite import LLM, EngineConfig, SparseConfig
    from lserve_lite.evaluation.harness import SparseHarness

    sp = SparseConfig(
        enabled=True, page_size=16, token_budget=64, select_interval=64,
        pattern_path=str(tiny / "full_attention_heads.tsv"),
    )  # fmt: skip
    llm = LLM(str(tiny), backend="cpu", config=EngineConfig(page_size=16, sparse=sp))
    h = SparseHarness(llm)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 300, 120)]

    def switched(restart: bool) -> tuple[np.ndarray, list[int]]:
        seq = h.begin(ids, prompt_len=100)
        h.set_request_sparse(seq, sp.with_updates(token_budget=before))
        h.forward(seq, 100, logits="last")
        h.decode(seq, 2)  # selects at 101 tokens, reuses at 102
        h.set_request_sparse(seq, sp.with_updates(token_budget=after))
        if restart:
            h.rewind(seq, seq.num_cached)  # restarts the schedule, and nothing else
        try:
            logits = h.decode(seq, 1)
            return logits, [int(c[seq.sel_slot].max()) for c in h.runner.cache.sel_cnt]
        finally:
            h.end(seq)

    logits, counts = switched(False)
    assert counts == [after // 16] * 2  # the new budget's pages, in both layers
    ref, ref_counts = switched(True)
    np.testing.assert_array_equal(logits, ref)
    assert counts == ref_counts


def test_selector_diagnostics_pieces(tiny):
    from lserve_lite import LLM, EngineConfig
    from lserve_lite.backends.reference.page_stats import page_stats_reference
    from lserve_lite.evaluation.harness import SparseHarness
    from lserve_lite.evaluation.selector_recall import VARIANTS, decode_step_queries, page_mass, page_stats
    from lserve_lite.sparse.selector import top_pages

    rng = np.random.default_rng(0)
    k = rng.standard_normal((5, 2, 64, 16)).astype(np.float32)
    for sub in (1, 2, 4, 8):
        ref = page_stats_reference(k, np.arange(5), 300, sub)
        got = page_stats(k, 300, sub)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    q = rng.standard_normal((4, 16)).astype(np.float32)
    mass = page_mass(q, k, 300)
    np.testing.assert_allclose(mass.sum(1), 1.0, rtol=1e-5)
    assert np.all(mass[:, -1] == mass[:, -1]) and mass.shape == (2, 5)
    oracle = np.take_along_axis(mass, top_pages(mass, 3), 1).sum(1)
    for fn in VARIANTS.values():
        sel = np.take_along_axis(mass, top_pages(fn(q, *page_stats(k, 300, 4), 300, 64), 3), 1).sum(1)
        assert np.all(sel <= oracle + 1e-6) and np.all(sel > 0)

    # the recording step writes the cache exactly as the engine's own step does
    llm = LLM(str(tiny), backend="cpu", config=EngineConfig(num_kv_pages=40, max_model_len=1024))
    h = SparseHarness(llm)
    ids = rng.integers(3, 300, 400).tolist()
    a, b = h.begin(ids, prompt_len=399), h.begin(ids, prompt_len=399)
    for s in (a, b):
        h.forward(s, 399, logits="last")
    h.forward(a, 1)
    qs = decode_step_queries(h, b)
    assert len(qs) == 2 and qs[0].shape == (4, 16)
    cache = h.runner.cache
    for layer in range(2):
        ka, kb = (cache.k[layer][s.page_table[399 // 64], :, 399 % 64] for s in (a, b))
        np.testing.assert_array_equal(ka, kb)


def test_selector_grid_refuses_lengths_closer_than_steps():
    """One text runs every length in turn, each length's decode steps after the previous one's: lengths less
    than `steps` apart decoded past the text's end and failed with an IndexError after the first length's
    compute; they are refused before the model loads."""
    from lserve_lite.evaluation.selector_recall import check_grid

    check_grid(16, (300, 316), (64,), (4,), ("lserve",))
    for lengths in ((300, 310), (310, 300), (300, 300)):
        with pytest.raises(InvalidRequestError, match="less than steps"):
            check_grid(16, lengths, (64,), (4,), ("lserve",))


def test_selector_grid_refuses_budgets_that_cover_every_length():
    """`tools/eval_selector.py --lengths 512` (the default budgets start at 512) decoded and scored every step, then
    printed empty tables: a budget covering a length's pages is left out of the results. Refused before the model
    loads; one budget under one length is enough."""
    from lserve_lite.evaluation.selector_recall import check_grid

    check_grid(2, (512, 1024), (512,), (4,), ("lserve",))
    with pytest.raises(InvalidRequestError, match="every budget covers every length"):
        check_grid(2, (500, 512), (512, 1024), (4,), ("lserve",))


def test_selector_budget_covers_a_length_in_one_home(monkeypatch):
    """check_grid and _summary each computed "the budget covers the length": both now ask `covers`, so the grid's
    refusal and the rows left out of the results cannot drift apart."""
    from lserve_lite.evaluation import selector_recall as sr

    assert sr.covers(512, 512) and not sr.covers(512, 513)
    assert sr.covers(128, 65, 64) and not sr.covers(64, 65)
    acc = {512: {("lserve", 4, 512): np.ones((2, 2, 3)), ("lserve", 4, 64): np.ones((2, 2, 3))}}
    dense = np.ones(3, dtype=bool)
    assert [r["budget"] for r in sr._summary(acc, dense, [512], 64)] == [64]  # 512 covers 512: left out
    with pytest.raises(InvalidRequestError, match="every budget covers every length"):
        sr.check_grid(2, (512,), (512,), (4,), ("lserve",))
    monkeypatch.setattr(sr, "covers", lambda budget, length, page=sr.PAGE_SIZE: False)
    assert [r["budget"] for r in sr._summary(acc, dense, [512], 64)] == [512, 64]
    sr.check_grid(2, (512,), (512,), (4,), ("lserve",))  # the same rule refuses nothing now


def test_default_model_short_run(smollm2_dir, tmp_path):
    """SmolLM2 at 1k tokens, two single-needle prompts (24 s on 2 quiet cores). Recorded 2026-12-01:
    dense 2/2, budget 256 with a 128-token decode window 1/2; a regression below either fails."""
    from lserve_lite.cli import main

    out = tmp_path / "smol"
    rc = main(["eval", "--model", str(smollm2_dir), "--backend", "cpu", "--lengths", "1024", "--samples", "2",
               "--tasks", "niah_single_numbers", "--configs", "dense;b256:token_budget=256,decode_local=128",
               "--shared-dense", "--out", str(out)])  # fmt: skip
    assert rc == 0
    acc = json.loads(out.with_suffix(".json").read_text())["summary"]["1024"]["tasks"]["all"]
    assert acc["dense"]["acc"] == 1.0 and acc["b256"]["acc"] >= 0.5, acc


def test_eval_json_rewrites_are_throttled_and_flushed():
    """After a prompt the JSON is rewritten only when the last rewrite is over max(1 s, 10 x its time) old (a
    rewrite per prompt was quadratic in the run's size); `now` always writes."""
    from lserve_lite.config import Throttled

    t, calls = [0.0], []

    def write():
        calls.append(t[0])
        t[0] += 0.05 if len(calls) < 3 else 0.3  # the third rewrite takes 0.3 s: the next waits 3 s
        return [len(calls)]

    w = Throttled(write, clock=lambda: t[0])
    for step in (0.0, 0.5, 0.5, 0.1, 0.5, 1.0, 1.0, 1.0, 0.1):
        t[0] += step
        w.soon()
    assert calls == pytest.approx([0.0, 1.05, 2.7]) and w.now() == [4] and calls[-1] == pytest.approx(5.1)


def test_eval_interrupted_keeps_every_answered_prompt(tiny, tmp_path, monkeypatch):
    """Ctrl-C at the third prompt of a run whose rewrites are throttled: the two answered prompts are in the JSON."""
    from lserve_lite.evaluation.eval_args import add_eval_args
    from lserve_lite.evaluation.run_eval import evaluate
    from lserve_lite.evaluation.settings import Runner

    out, greedy, n = tmp_path / "r", Runner.greedy_all, [0]

    def interrupted(self, h, names, ids, max_new, stop_ids=()):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return greedy(self, h, names, ids, 2, stop_ids)

    monkeypatch.setattr(Runner, "greedy_all", interrupted)
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--model", str(tiny), "--backend", "cpu", "--lengths", "512", "--samples", "3",
                         "--tasks", "niah_single_numbers", "--configs", "dense", "--out", str(out)])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        evaluate(args, log=lambda s: None)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["results"]) == 2 and saved["finished"] == {"dense": 2}
