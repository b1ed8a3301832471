"""The scripts of tools/ on the CPU: their stand-ins keep up with the engine's interfaces, and bad input or a
missing GPU gives one line and a nonzero exit, before any output is written."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_quant_cpu  # noqa: E402

from lserve_lite.backends.cpu_threads import SplitRunner  # noqa: E402
from lserve_lite.errors import InvalidRequestError  # noqa: E402


def test_bench_quant_cpu_spread_takes_what_split_runner_takes():
    """linear_q passes SplitRunner.run's keywords (joint=, native=) to the benchmark's stand-in."""
    ours, theirs = inspect.signature(bench_quant_cpu.Spread.run), inspect.signature(SplitRunner.run)
    assert list(ours.parameters) == list(theirs.parameters)
    seen: list[tuple[int, int]] = []
    bench_quant_cpu.Spread(2).run(None, lambda a, b: seen.append((a, b)), [0, 4, 8], joint=True, native=None)
    assert sorted(seen) in ([(0, 8)], [(0, 4), (4, 8)])
    x = np.ones((1, 64), np.float32)
    w = bench_quant_cpu.random_weight("q8_0", 8, 64, np.random.default_rng(0))
    wall, _ = bench_quant_cpu.time_quant(x, w, 2, budget=0.01)
    assert 0 < wall < 1


GPU_TOOLS = [
    ("bench_attention", ["--out", "res"]),
    ("bench_e2e", ["--out", "res/e2e.json"]),
    ("bench_quant_gpu", ["--out", "res/q.json"]),
    ("bench_sampling", ["--out", "res/s.json"]),
    ("bench_sparse", ["--out", "res"]),
    ("bench_tp", ["--out", "res/tp.json"]),
    ("check_prefill_sm90", ["--out", "res/sm90.json"]),
    ("profile_decode", ["--out", "res/p.json"]),
    ("bench_structured", ["--gpu", "--out", "res/st.json"]),
]


@pytest.mark.parametrize("tool, argv", GPU_TOOLS)
def test_gpu_tools_stop_in_one_line_without_a_gpu(tool, argv, tmp_path, monkeypatch, capsys):
    """Without a GPU each GPU-only tool exits 2 with one line before it creates its output folder."""
    import lserve_lite.backends

    monkeypatch.setattr(lserve_lite.backends, "cuda_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
    with pytest.raises(SystemExit) as e:
        importlib.import_module(tool).main()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{tool}.py{' --gpu' * (tool == 'bench_structured')}: "
                                                    "needs an NVIDIA GPU: CuPy sees none on this host"]  # fmt: skip
    assert not (tmp_path / "res").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_numpy

    return make_tiny_numpy(tmp_path_factory.mktemp("tools") / "tiny-llama")


def run_tool(tool: str, argv: list[str], monkeypatch) -> int:
    """The tool's main as its `__main__` runs it (exit_status around main), with these arguments."""
    from lserve_lite.errors import exit_status

    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
    return exit_status(importlib.import_module(tool).main)


def test_bench_prefix_cache_chat_takes_model_and_backend(tiny_model, tmp_path, monkeypatch):
    """chat runs the model and backend given, makes the --out folder, and names the model without its path."""
    out = tmp_path / "new" / "chat.json"
    argv = ["chat", "--model", str(tiny_model), "--backend", "cpu", "--trials", "1", "--history", "100",
            "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip
    assert run_tool("bench_prefix_cache", argv, monkeypatch) == 0
    res = json.loads(out.read_text())
    assert (res["model"], res["backend"]) == ("tiny-llama", "cpu")


def test_bench_prefix_cache_doc_on_cuda_without_a_gpu_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    import lserve_lite.backends

    monkeypatch.setattr(lserve_lite.backends, "cuda_available", lambda: False)
    argv = ["doc", "--model", str(tiny_model), "--backend", "cuda", "--out", str(tmp_path / "doc.json")]
    assert run_tool("bench_prefix_cache", argv, monkeypatch) == 1
    assert capsys.readouterr().err.startswith("error: backend 'cuda' asked for")
    assert not (tmp_path / "doc.json").exists()


BAD_ARGS = [
    ("eval_passkey", ["--lengths", "10"], "--lengths: 10 is outside [256,"),
    ("eval_passkey", ["--depths", "abc"], "--depths: 'abc' is not a number"),
    ("eval_passkey", ["--depths", "0.5,1.5"], "--depths: 1.5 is outside [0, 1]"),
    ("eval_passkey", ["--samples", "0"], "--samples: 0 is outside [1,"),
    ("eval_passkey", ["--depths", "0.5,0.5"], "--depths: 0.5 is given twice"),
    ("eval_passkey", ["--seed", "-1"], "--seed: -1 is outside [0,"),
    ("eval_passkey", ["--configs", "bogus"], "error: unknown config 'bogus'"),
    ("eval_passkey", ["--pattern", "/nonexist.tsv"], "--pattern: /nonexist.tsv: file not found"),
    ("eval_passkey", ["--model", "/nonexist"], "error: /nonexist"),
    (
        "eval_passkey",
        ["--model", "{tiny}", "--lengths", "99999", "--configs", "dense"],
        "--lengths 99999 exceeds the model's context 2048 (--max-model-len runs past it)",
    ),
    ("eval_ppl", ["--lengths", "8"], "--lengths: 8 is outside [256,"),
    ("eval_ppl", ["--decode-tokens", "0"], "--decode-tokens: 0 is outside [1,"),
    (
        "eval_ppl",
        ["--decode-tokens", "300", "--lengths", "256"],
        "--decode-tokens 300 leaves nothing to prefill",
    ),
    (
        "eval_ppl",
        ["--model", "{tiny}", "--lengths", "4096", "--configs", "dense"],
        "--lengths 4096 exceeds the model's context 2048",
    ),
    # the help said "each >= 256", a floor of no rule: the lengths' rules are check_grid's, which the help now names
    ("eval_selector", ["--lengths", "1"], "--lengths: 1 is outside [2,"),
    (
        "eval_selector",
        ["--lengths", "16"],
        "error: need 1 <= steps < every length, got steps 16, lengths [16]",
    ),
    (
        "eval_selector",
        ["--lengths", "100"],
        "error: every budget covers every length (budgets [512, 1024, 2048, 4096]",
    ),
    ("eval_selector", ["--lengths", "100", "--budgets", "64", "--model", "/nonexist"], "error: /nonexist"),
    ("eval_selector", ["--steps", "0"], "--steps: 0 is outside [1,"),
    (
        "eval_selector",
        ["--model", "{tiny}", "--budgets", "100"],
        "budgets must be positive multiples of the page",
    ),
    (
        "eval_selector",
        ["--model", "{tiny}", "--sub-pages", "3"],
        "sub_pages must divide the page size 64: [3]",
    ),
    ("eval_selector", ["--model", "{tiny}", "--variants", "bogus"], "error: unknown variant(s) ['bogus']"),
    ("eval_selector", ["--variants", "centroid,centroid"], "--variants: centroid is given twice"),
    (
        "eval_selector",
        ["--model", "{tiny}", "--lengths", "4096"],
        "length 4096 exceeds the model's context",
    ),
    ("eval_selector", ["--model", "/nonexist"], "error: /nonexist"),
    ("eval_passkey", ["--plot-only", "/nonexist.json"], "error: /nonexist.json: file not found"),
    ("eval_ppl", ["--plot-only", "/nonexist.json"], "error: /nonexist.json: file not found"),
    ("kv_quant_error", ["--steps", "0"], "--steps: 0 is outside [1,"),
    ("kv_quant_error", ["--model", "/nonexist"], "error: /nonexist"),
    (
        "kv_quant_error",
        ["--model", "{tiny}"],
        "head_dim 16 is not a multiple of 32 channels",
    ),  # a reshape error
    (
        "kv_quant_error",
        ["--context", "3000000"],
        "--context 3000000: the text has",
    ),  # a 3M-token KV pool first
    ("kv_quant_error", ["--context", "64", "--steps", "64"], "--steps 64 leaves no prompt in --context 64"),
    (
        "bench_cpu",
        ["--steps", "0"],
        "--steps: 0 is outside [1,",
    ),  # was a ZeroDivisionError after the prefills
    ("bench_cpu", ["--alternate", "-1"], "--alternate: -1 is outside [0,"),  # was an IndexError after loading
    (
        "bench_cpu",
        ["--kv-dtypes", "fp32,bogus"],
        "--kv-dtypes: unknown ['bogus']; choose from auto,",
    ),  # was after fp32's whole run
    (
        "bench_cpu",
        ["--llama-bench", "/nonexist"],
        "--llama-bench: /nonexist: file not found",
    ),  # after our runs
    (
        "bench_cpu",
        ["--float-model", "/nonexist"],
        "error: /nonexist: model directory not found",
    ),  # after the GGUF's
    ("bench_cpu", ["--llama-bench", sys.executable, "--model", "{tiny}"], "is not a GGUF"),
    ("bench_structured", ["--repeats", "0"], "--repeats: 0 is outside [1,"),  # was NumPy's IndexError
    (
        "bench_cpu_lserve",
        ["--mode", "dense", "--context", "100000000"],
        "--context: 100000000 is outside [16, 8189]",
    ),
    ("bench_cpu_lserve", ["--mode", "dense", "--context", "9000"], "--context: 9000 is outside [16, 8189]"),
    (
        "bench_cpu_lserve",
        ["--mode", "dense", "--kv-dtype", "bogus"],
        "argument --kv-dtype: invalid choice: 'bogus'",
    ),
    (
        "bench_prefix_cache",
        ["chat", "--trials", "0"],
        "--trials: 0 is outside [1,",
    ),  # an IndexError after the load
    (
        "bench_prefix_cache",
        ["doc", "--requests", "0"],
        "--requests: 0 is outside [1,",
    ),  # an IndexError after the load
    ("bench_prefix_cache", ["chat", "--history", "-5"], "--history: -5 is outside [1,"),  # ran, as if 0
    ("bench_prefix_cache", ["doc", "--doc-tokens", "1000000000"], "--doc-tokens: 1000000000 is outside [1,"),
    (
        "eval_lm_harness",
        ["--backend", "bogus"],
        "argument --backend: invalid choice: 'bogus'",
    ),  # after the model
    ("soak_serve", ["--seconds", "0"], "--seconds: 0.0 is outside [0.001, 1000000.0]"),
    ("soak_serve", ["--cases", "0"], "--cases: 0 is outside [1,"),  # was a ValueError once the server ran
    ("soak_serve", ["--long-words", "-1"], "--long-words: -1 is outside [1,"),
    ("soak_serve", ["--warmup-seconds", "nan"], "--warmup-seconds: nan is outside [0,"),
    (
        "bench_serve",
        ["--input-len", "0"],
        "--input-len: 0 is outside [1,",
    ),  # every request failed, empty prompt
    ("bench_serve", ["--input-len", "1000000000"], "--input-len: 1000000000 is outside [1,"),  # a 6 GB prompt
    ("bench_serve", ["--warmup", "-1"], "--warmup: -1 is outside [0,"),
    ("bench_serve", ["--output-len", "0"], "--output-len: 0 is outside [1,"),
    ("bench_serve", ["--concurrency", "0"], "--concurrency: 0 is outside [1,"),
    ("bench_serve", ["--url", "http://127.0.0.1:1"], "no OpenAI-compatible server answers there"),
]


@pytest.mark.parametrize("tool, argv, msg", BAD_ARGS)
def test_bad_arguments_are_one_line(tool, argv, msg, tiny_model, tmp_path, monkeypatch, capsys):
    """Bad input ends in one line and a nonzero status, before any result is written."""
    argv = [a.replace("{tiny}", str(tiny_model)) for a in argv] + ["--out", str(tmp_path / "out")]
    try:
        status = run_tool(tool, argv, monkeypatch)
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    err = capsys.readouterr().err
    assert status != 0 and msg in err.splitlines()[-1] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["bench_cpu", "bench_structured"])
def test_a_missing_model_is_one_line_when_run_as_a_script(tool, tmp_path):
    """`python tools/<tool>.py` ends a refused model in one `error:` line and status 1, not a traceback."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "tools" / f"{tool}.py"), "--model", "/nonexistent.gguf", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert (r.returncode, r.stderr.splitlines()) == (1, ["error: /nonexistent.gguf: GGUF file not found"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["bench_attention", "bench_sparse"])
def test_results_folder_named_like_a_file_is_refused(tool, tmp_path, monkeypatch, capsys):
    """--out names a folder: `x.json` would become a folder of that name (refused before anything is made)."""
    with pytest.raises(SystemExit) as e:
        run_tool(tool, ["--out", str(tmp_path / "x.json")], monkeypatch)
    assert e.value.code == 2 and "names a file; --out is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_rss_chat_says_why_chat_exited_and_help_is_no_error(monkeypatch, capsys):
    """A chat that cannot start is reported with its own error line (its stderr was discarded: `chat exited: `
    and nothing else); --help prints the usage and returns (it exited with status 1)."""
    import rss_chat

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setattr(sys, "argv", ["rss_chat.py", "--model", "/nonexistent"])
    with pytest.raises(SystemExit) as e:
        rss_chat.main()
    assert (
        e.value.code == "rss_chat: chat exited with status 1: error: /nonexistent: model directory not found"
    )
    monkeypatch.setattr(sys, "argv", ["rss_chat.py", "--help"])
    rss_chat.main()
    assert "Usage: python tools/rss_chat.py" in capsys.readouterr().out


def test_rss_chat_measures_a_piped_chat(smollm2_gguf, tmp_path):
    """`python tools/rss_chat.py` (README, docs/QUANT.md) reports RSS after load and after each reply; it waited for a
    `>>> ` prompt on stdout, which a piped chat no longer writes, so it hung before printing anything."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    tool = str(root / "tools" / "rss_chat.py")
    cmd = [sys.executable, tool, "--model", str(smollm2_gguf), "--max-new-tokens", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert len(lines) == 3 and lines[0].startswith("loaded in ") and lines[0].endswith(" MB")
    assert all(line.startswith("after '") and line.endswith(" MB") for line in lines[1:])


RESULT_FILE_TOOLS = [
    ("bench_quant_cpu", []), ("bench_structured", []), ("bench_serve", []), ("soak_serve", []),
    ("kv_quant_error", []), ("bench_prefix_cache", ["chat"]), ("bench_tp", []), ("bench_sampling", []),
    ("bench_quant_gpu", []), ("check_prefill_sm90", []), ("profile_decode", []),
    ("eval_ppl", []), ("eval_passkey", []), ("eval_selector", []),  # stems: <out>.json, <out>.png
    ("eval_lm_harness", []),
]  # fmt: skip


@pytest.mark.parametrize("tool, argv", RESULT_FILE_TOOLS)
def test_results_file_that_cannot_be_written_is_refused_first(tool, argv, tmp_path, monkeypatch, capsys):
    """--out names a JSON file written after the run: an existing folder there (`--out tools/results`, as
    bench_cpu.py takes), a new folder (`--out results/`, which Path reads as the file `results`) or a file among its
    folders was an OSError traceback after all the work, or a file written beside the folder meant."""
    (tmp_path / "file").write_text("x")
    for out, msg in (
        (tmp_path, "a directory, not a file"),
        (f"{tmp_path}/new/", "a directory, not a file"),
        (tmp_path / "file" / "r.json", "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            run_tool(tool, [*argv, "--out", str(out)], monkeypatch)
        assert e.value.code == 2 and msg in capsys.readouterr().err.splitlines()[-1], out


@pytest.mark.parametrize("tool", ["eval_ppl", "eval_passkey", "eval_selector", "lserve-lite eval"])
@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_results_stem_whose_file_is_a_directory_is_refused_first(tool, suffix, tmp_path, monkeypatch, capsys):
    """--out is a stem: a directory named <out>.json or <out>.png passed the check of the stem alone, and the run
    ended in an IsADirectoryError traceback after all its work."""
    (tmp_path / f"r{suffix}").mkdir()
    with pytest.raises(SystemExit) as e:
        if tool == "lserve-lite eval":
            from lserve_lite.cli import main

            main(["eval", "--model", "/nonexistent", "--out", str(tmp_path / "r")])
        else:
            run_tool(tool, ["--model", "/nonexistent", "--out", str(tmp_path / "r")], monkeypatch)
    assert e.value.code == 2
    assert f"--out: {tmp_path / f'r{suffix}'}: a directory, not a file" in capsys.readouterr().err


def test_results_stem_keeps_its_dots(tiny_model, tmp_path, monkeypatch):
    """`--out ppl_s0.5` wrote ppl_s0.json (with_suffix took `.5` for a suffix: another run's file); the stem is
    kept whole, and a stem ending in .json still names the JSON itself."""
    argv = ["--model", str(tiny_model), "--lengths", "256", "--decode-tokens", "4", "--configs", "dense"]
    for out, want in (("ppl_s0.5", "ppl_s0.5.json"), ("r.json", "r.json")):
        assert run_tool("eval_ppl", [*argv, "--out", str(tmp_path / out)], monkeypatch) == 0
        assert json.loads((tmp_path / want).read_text())["tool"] == "eval_ppl"
    assert sorted(f.name for f in tmp_path.glob("*.json")) == ["ppl_s0.5.json", "r.json"]  # with a PNG or not


def test_bench_cpu_llama_bench_failure_is_one_line(tmp_path):
    """llama-bench failing (a bad build, a GGUF it cannot read) was a CalledProcessError traceback after our
    runs; it is one error naming the command and llama-bench's last line."""
    import bench_cpu

    from lserve_lite.errors import InvalidRequestError

    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'main: error: failed to load model' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(
        InvalidRequestError, match=r"llama-bench -p 512 -n 0: main: error: failed to load model$"
    ):
        bench_cpu.llama_cpp(str(fake), "m.gguf", 1)


def test_bench_cpu_rows_run_a_model_of_any_vocabulary(tiny_model):
    """Its random prompts drew ids up to 40000 whatever the model: a smaller vocabulary (the tiny model's 320)
    was refused by the engine ('prompt token ids must be in [0, 320)')."""
    import bench_cpu

    from lserve_lite import LLM, EngineConfig

    llm = LLM(str(tiny_model), backend="cpu", config=EngineConfig(prefix_caching=False))
    assert (
        bench_cpu.bench_prefill(llm, 32, 1)["tok_s"] > 0 and bench_cpu.bench_decode(llm, 32, 2)["tok_s"] > 0
    )
    assert bench_cpu.prompt(512, 49152) == [
        int(t) for t in np.random.default_rng(512).integers(100, 40000, 512)
    ]


def test_bench_serve_names_a_refused_key_and_takes_a_client_base_url(tmp_path, monkeypatch, capsys):
    """A server that wants a key (401) was a KeyError traceback, and so was `--url .../v1` (an OpenAI client's
    base_url: the tool asked for /v1/v1/models); the /v1 is dropped and a refusal is one line with the status."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b'{"error": {"message": "invalid API key"}}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Refuse) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        status = run_tool(
            "bench_serve", ["--url", url + "/v1/", "--out", str(tmp_path / "b.json")], monkeypatch
        )
        srv.shutdown()
    assert status == 1 and seen == ["/v1/models"]
    assert capsys.readouterr().err.splitlines() == [
        f'error: {url}/v1/models answered HTTP 401 (--api-key): {{"error": {{"message": "invalid API key"}}}}'
    ]
    assert list(tmp_path.iterdir()) == []


GPU_TOOL_BAD_ARGS = [
    ("bench_sampling", ["--vocab", "0"]), ("bench_sampling", ["--batches", "1", "-8"]),
    ("bench_sampling", ["--reps", "0"]), ("bench_quant_gpu", ["--batches", "0"]),
    ("bench_quant_gpu", ["--prefill-rows", "-1"]), ("bench_tp", ["--tensor-parallel", "0"]),
    ("bench_tp", ["--contexts", "99999999999"]), ("bench_sparse", ["--sub-pages", "0"]),
    ("bench_e2e", ["--decode-steps", "0"]), ("bench_e2e", ["--smol-prompts", "512", "-1"]),
    ("bench_e2e", ["--llama-batches", "100000"]), ("bench_e2e", ["--batch-kv-gib", "nan"]),
    ("bench_e2e", ["--sparse-contexts", "1e9"]), ("bench_e2e", ["--sparse-sub-pages", "0"]),
    ("bench_attention", ["--sections", "prefil"]), ("bench_attention", ["--kv-dtypes", "fp16,int9"]),
    ("bench_attention", ["--prefill-kernels", "wgma"]), ("check_prefill_sm90", ["--kernels", "mma,tmaa"]),
    ("check_prefill_sm90", ["--seqs", "4096,abc"]),
]  # fmt: skip


@pytest.mark.parametrize("tool, argv", GPU_TOOL_BAD_ARGS)
def test_gpu_tools_refuse_absurd_numbers_at_the_parser(tool, argv, tmp_path, monkeypatch, capsys):
    """Counts, sizes and names of the GPU benchmarks are checked where they are parsed: on a GPU a negative batch
    or a vocabulary of 0 failed inside a kernel's launch or allocation, and a misspelt section or kernel selected
    nothing (a run that timed nothing of it, exit 0); here: the usage line, before the GPU check."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_tool(tool, argv, monkeypatch)
    assert e.value.code == 2 and f"argument {argv[0]}: " in capsys.readouterr().err


def test_every_tool_script_runs_its_main_under_exit_status():
    """Ctrl-C in a tool was a KeyboardInterrupt traceback (and a refused input another) where its `__main__` called
    main() bare; every script runs it through exit_status (status 130, or one `error:` line), eval_ruler through
    the CLI's main."""
    bare = []
    for path in sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py")):
        block = path.read_text().partition('if __name__ == "__main__":')[2]
        if block and "exit_status(main)" not in block and path.name != "eval_ruler.py":
            bare.append(path.name)
    assert bare == []


def test_eval_ppl_text_shorter_than_the_length_is_one_error_line(tiny_model, tmp_path, monkeypatch, capsys):
    """A corpus shorter than --lengths ended eval_ppl through SystemExit: a bare line without `error:` (the form every
    other refusal of the tools has)."""
    import eval_ppl

    monkeypatch.setattr(eval_ppl, "corpus_text", lambda: "a short text")
    argv = [
        "--model",
        str(tiny_model),
        "--configs",
        "dense",
        "--lengths",
        "256",
        "--out",
        str(tmp_path / "ppl"),
    ]
    assert run_tool("eval_ppl", argv, monkeypatch) == 1
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --lengths 256: the text has only")
    )


def test_results_name_a_relative_model_by_its_folder(tiny_model, monkeypatch):
    """`bench_cpu --model .` (run inside the model's folder) recorded the model as "" (`Path(".").name`), as did
    the other tools that record a model's folder; the absolute path's name is recorded."""
    import bench_cpu
    import bench_prefix_cache

    monkeypatch.setattr(bench_cpu, "bench_prefill", lambda *a: {})
    monkeypatch.setattr(bench_cpu, "bench_decode", lambda *a: {})
    monkeypatch.chdir(tiny_model)
    assert bench_cpu.bench_model(".", 1)["model"] == "tiny-llama"
    assert bench_prefix_cache.model_name(".") == "tiny-llama"
    monkeypatch.chdir(tiny_model / "..")
    assert bench_prefix_cache.model_name("tiny-llama/") == "tiny-llama"


def test_bench_cpu_table_says_llama_cpp_not_run():
    """Without --llama-bench the llama.cpp column printed `nan`, where the tool's help says "not run"."""
    import bench_cpu

    r = {"tok_s": 54.4, "cpu_tok_s": 37.7, "others_busy_cpus": 1.0}
    assert bench_cpu.table_row("decode_ctx512", "native_gguf", r, {}).split()[-2:] == ["not", "run"]
    assert bench_cpu.table_row("decode_ctx512", "native_gguf", r, {"decode_ctx512": 60.3}).endswith(" 60.3")


# The evaluation and calibration tools: how to run one, its arguments past a 2048-token context, and what it refuses
# past the trained context (its lengths, with its question or answer where they count) and past --max-model-len (the
# engine's limit, which the answer generated after a passkey prompt must fit too)
CONTEXT_TOOLS = [
    ("lserve-lite eval", ["--configs", "dense", "--lengths", "4096"], "--lengths 4096 + 128 tokens of question", ""),
    ("eval_ppl", ["--configs", "dense", "--lengths", "4096"], "--lengths 4096", ""),
    ("eval_passkey", ["--configs", "dense", "--lengths", "4096"], "--lengths 4096", " + 16 tokens of answer"),
    ("eval_selector", ["--lengths", "4096", "--steps", "2", "--budgets", "512", "--sub-pages", "1"], "length 4096", ""),
    ("lserve-lite calibrate", ["--lengths", "4096", "--samples", "1"], "sample length 4096 + 16 tokens of answer", ""),
]  # fmt: skip


def run_context_tool(tool: str, argv: list[str], out: Path, monkeypatch) -> int:
    """A tool of CONTEXT_TOOLS with these arguments and its output under `out`."""
    from lserve_lite.cli import main

    if tool.startswith("lserve-lite "):
        cmd = tool.split()[1]
        return main([cmd, *argv, "--out", str(out / ("p.tsv" if cmd == "calibrate" else "r"))])
    return run_tool(tool, [*argv, "--out", str(out / "r")], monkeypatch)


@pytest.fixture(scope="module")
def unnamed_context(tmp_path_factory) -> Path:
    """A tiny model whose config.json names no trained context length: 2048 tokens are assumed (transformers')."""
    from tiny_models import make_tiny_numpy

    model = make_tiny_numpy(tmp_path_factory.mktemp("tools") / "no-context")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("tool, argv, what, answer", CONTEXT_TOOLS)
def test_evaluation_tools_take_max_model_len(
    tool, argv, what, answer, unnamed_context, tmp_path, monkeypatch, capsys
):
    """The evaluation and calibration tools had no --max-model-len: past a context the model never named (2048
    assumed) they were refused, and nothing but editing config.json raised the limit, which chat and serve's
    --max-model-len raise. Now the flag sets the limit their lengths must fit, reaches the engine, and a bad value
    gets chat's one-line error."""
    from lserve_lite.cli import main
    from lserve_lite.evaluation import calibrate, selector_recall, settings

    argv = ["--model", str(unnamed_context), *argv]
    assert run_context_tool(tool, argv, tmp_path, monkeypatch) == 1  # refused at the assumed context
    err = capsys.readouterr().err.strip()
    assert (
        f"{what} exceeds 2048 tokens, the context assumed for this model" in err and "--max-model-len" in err
    )
    assert len(err.splitlines()) == 1

    seen: list[int | None] = []

    def engine(model, backend="auto", config=None):  # the LLM the tool would run: its limit recorded, no run
        seen.append(config.max_model_len)
        raise InvalidRequestError("engine started")

    for module in (settings, calibrate, selector_recall):
        monkeypatch.setattr(module, "LLM", engine)
    assert run_context_tool(tool, [*argv, "--max-model-len", "5000"], tmp_path, monkeypatch) == 1
    assert seen == [5000] and capsys.readouterr().err.strip().endswith("error: engine started")

    assert run_context_tool(tool, [*argv, "--max-model-len", "4095"], tmp_path, monkeypatch) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {what}{answer} exceeds --max-model-len 4095"
    ]
    assert seen == [5000]  # refused before any engine

    with pytest.raises(SystemExit) as e:
        main(["chat", "--max-model-len", "0"])
    chat = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as e:
        run_context_tool(tool, [*argv, "--max-model-len", "0"], tmp_path, monkeypatch)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(chat.split(": ", 1)[1])
    assert list(tmp_path.iterdir()) == []


def test_eval_ppl_runs_past_an_assumed_context_with_max_model_len(unnamed_context, tmp_path, monkeypatch):
    """Past the assumed 2048 tokens, --max-model-len 4096 runs a whole perplexity sweep of 4096 tokens on the real
    engine, whose context limit is the flag's."""
    from lserve_lite.evaluation import settings

    limits: list[int] = []
    real = settings.LLM

    def engine(*args, **kw):
        llm = real(*args, **kw)
        limits.append(llm.engine.ecfg.max_model_len)
        return llm

    monkeypatch.setattr(settings, "LLM", engine)
    argv = ["--model", str(unnamed_context), "--configs", "dense", "--lengths", "4096", "--decode-tokens", "8",
            "--max-model-len", "4096", "--out", str(tmp_path / "ppl")]  # fmt: skip
    assert run_tool("eval_ppl", argv, monkeypatch) == 0
    assert limits == [4096]
    assert np.isfinite(
        json.loads((tmp_path / "ppl.json").read_text())["results"]["4096"]["dense"]["ppl_decode"]
    )


@pytest.mark.parametrize("tool", ["eval_ppl", "eval_passkey", "eval_selector", "lserve-lite eval",
                                  "lserve-lite calibrate", "eval_lm_harness"])  # fmt: skip
def test_evaluation_tools_help_names_max_model_len(tool, monkeypatch, capsys):
    """--help lists --max-model-len in each tool, as chat's."""
    with pytest.raises(SystemExit):
        if tool.startswith("lserve-lite "):
            from lserve_lite.cli import main

            main([tool.split()[1], "--help"])
        else:
            run_tool(tool, ["--help"], monkeypatch)
    assert "--max-model-len N" in capsys.readouterr().out


# Each evaluation or calibration tool on a tiny model, its shortest run, and the JSON its results go to under --out
SHORT_RUNS = [
    ("lserve-lite eval", ["--configs", "dense", "--lengths", "512", "--samples", "1", "--tasks", "niah_single_numbers"],
     "r.json"),
    ("eval_ppl", ["--configs", "dense", "--lengths", "256", "--decode-tokens", "4"], "r.json"),
    ("eval_passkey", ["--configs", "dense", "--lengths", "256", "--depths", "0.5"], "r.json"),
    ("eval_selector", ["--lengths", "256", "--steps", "2", "--budgets", "128", "--sub-pages", "1", "--variants",
                       "lserve"], "r.json"),
    ("lserve-lite calibrate", ["--lengths", "512", "--samples", "1", "--no-validate"], "p.json"),
]  # fmt: skip


@pytest.mark.parametrize("tool, argv, result", SHORT_RUNS)
def test_evaluation_results_record_the_context_limit(
    tool, argv, result, tiny_model, unnamed_context, tmp_path, monkeypatch
):
    """A tool's results JSON did not record --max-model-len: a run past the model's trained context (or one that
    only assumed a context) read as one within it. Each records the flag (or null), the limit, where it came from,
    and the model's own context."""
    runs = [
        (tiny_model, [], {"limit": 2048, "source": "stated", "model": 2048, "model_assumed": False}),
        (unnamed_context, [], {"limit": 2048, "source": "assumed", "model": 2048, "model_assumed": True}),
        (unnamed_context, ["--max-model-len", "3000"],
         {"limit": 3000, "source": "max_model_len", "model": 2048, "model_assumed": True}),
    ]  # fmt: skip
    for model, flag, context in runs:
        out = tmp_path / f"{model.name}{len(flag)}"
        assert run_context_tool(tool, ["--model", str(model), *argv, *flag], out, monkeypatch) == 0
        res = json.loads((out / result).read_text())
        assert (res["max_model_len"], res["context"]) == (3000 if flag else None, context)


def test_eval_lm_harness_takes_max_model_len(tiny_model, tmp_path, monkeypatch, capsys):
    """tools/eval_lm_harness.py had no --max-model-len (chat, serve and the other evaluation tools have): its engine
    ran at the model's context whatever the server should hold. The flag reaches the engine, and a bad value gets
    chat's one-line error before any model loads."""
    import types

    import lserve_lite
    from lserve_lite.cli import main

    # lm-eval is not a test dependency: the tool stops at the engine, before lm-eval runs
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", types.SimpleNamespace(TaskManager=None))
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # the tool sets them where unset
        monkeypatch.setenv(name, "1")
    seen: list[int | None] = []

    def engine(model, backend="auto", config=None, **kw):  # the LLM the tool would serve: its limit recorded
        seen.append(kw["max_model_len"])
        raise InvalidRequestError("engine started")

    monkeypatch.setattr(lserve_lite, "LLM", engine)
    argv = ["--model", str(tiny_model), "--out", str(tmp_path / "r.json")]
    assert run_tool("eval_lm_harness", [*argv, "--max-model-len", "5000"], monkeypatch) == 1
    assert run_tool("eval_lm_harness", argv, monkeypatch) == 1
    assert seen == [5000, None] and capsys.readouterr().err.strip().endswith("error: engine started")

    with pytest.raises(SystemExit):
        main(["chat", "--max-model-len", "0"])
    chat = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as e:
        run_tool("eval_lm_harness", [*argv, "--max-model-len", "0"], monkeypatch)
    assert e.value.code == 2 and seen == [5000, None]
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(chat.split(": ", 1)[1])
    assert list(tmp_path.iterdir()) == []
