"""Bad input gets one clear line and loses nothing: model files, prompts, sampling values, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, ModelLoadError, SamplingParams
from lserve_lite.engine.llm_engine import LLMEngine


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **kw):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(tiny_llama, tmp_path):
    p = _copy(tiny_llama, tmp_path / "m")
    _edit_config(p, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"config.json: unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(p), backend="cpu")


def test_unsupported_rope_scaling(tiny_llama, tmp_path):
    p = _copy(tiny_llama, tmp_path / "m")
    _edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling type 'yarn'"):
        LLM(str(p), backend="cpu")


def test_directory_holding_only_a_gguf_names_it(tmp_path):
    """A directory with a GGUF but no config.json (a llama.cpp download folder) was refused as not a Hugging Face
    model directory, naming no way on: the refusal names the GGUF file to give instead."""
    from lserve_lite.weights.loader import resolve_model_dir

    (tmp_path / "SmolLM2-Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"no config.json .*it holds SmolLM2-Q4_1.gguf: give that file"):
        resolve_model_dir(tmp_path)


@pytest.mark.parametrize(
    "damage,msg",
    [
        ("no_config", "no config.json"),
        ("bad_json", r"config.json: not valid JSON"),
        ("truncated", r"model.safetensors: truncated"),
        ("garbage_header", r"model.safetensors: corrupt"),
        ("missing_tensor", r"missing tensor model.layers.1.mlp.down_proj.weight"),
        ("no_weights", r"no model.safetensors"),
        ("pickle_only", r"pickle weights"),
        ("no_tokenizer", r"tokenizer.json: file not found"),
        ("missing_field", r"missing required field 'hidden_size'"),
    ],
)
def test_damaged_model_dir(tiny_llama, tmp_path, damage, msg):
    p = _copy(tiny_llama, tmp_path / "m")
    st = p / "model.safetensors"
    if damage == "no_config":
        (p / "config.json").unlink()
    elif damage == "bad_json":
        (p / "config.json").write_text("{not json")
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "garbage_header":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 64)
    elif damage == "missing_tensor":
        from safetensors.numpy import load_file, save_file

        w = load_file(st)
        del w["model.layers.1.mlp.down_proj.weight"]
        save_file(w, st)
    elif damage == "no_weights":
        st.unlink()
    elif damage == "pickle_only":
        st.unlink()
        (p / "pytorch_model.bin").write_bytes(b"x")
    elif damage == "no_tokenizer":
        (p / "tokenizer.json").unlink()
    elif damage == "missing_field":
        cfg = json.loads((p / "config.json").read_text())
        del cfg["hidden_size"]
        (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=msg):
        LLM(str(p), backend="cpu")


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        LLM(str(tmp_path / "nope"), backend="cpu")
    with pytest.raises(ModelLoadError, match="nope.gguf: GGUF file not found"):
        LLM(str(tmp_path / "nope.gguf"), backend="cpu")
    # vLLM's LLM("org/name") downloads from the Hub: here the line says nothing is, and how to fetch it
    with pytest.raises(ModelLoadError, match=r"^HuggingFaceTB/SmolLM2-135M-Instruct: model directory not found "
                       r"\(nothing is downloaded: fetch a Hub model with `huggingface-cli download"):  # fmt: skip
        LLM("HuggingFaceTB/SmolLM2-135M-Instruct", backend="cpu")
    from lserve_lite.weights.gguf_import import convert_gguf

    with pytest.raises(ModelLoadError, match="is a directory; a GGUF file"):  # `lserve-lite convert DIR OUT`
        convert_gguf(tmp_path, tmp_path / "out")
    (tmp_path / "weights.bin").write_bytes(b"0" * 64)
    with pytest.raises(ModelLoadError, match="weights.bin: not a .gguf file"):
        LLM(str(tmp_path / "weights.bin"), backend="cpu")


@pytest.mark.parametrize(
    ("name", "served"),
    [("model.GGUF", "model"), ("model-q4_0.bin", "model-q4_0.bin"), ("model", "model"),
     ("Llama-3.2-1B.gguf", "Llama-3.2-1B"), ("Llama-3.2-1B", "Llama-3.2-1B")],
)  # fmt: skip
def test_gguf_file_known_by_its_magic_or_any_case_suffix(tiny_gguf, tmp_path: Path, name: str, served: str):
    """A downloaded GGUF is not always named *.gguf: its magic bytes make it one, as for llama.cpp. It is served
    under its name without `.gguf` (once "Llama-3" for a file named "Llama-3.2-1B": the text after a dot was cut)."""
    from lserve_lite.weights.loader import load_config, model_name, resolve_model_dir

    _, _, src = tiny_gguf
    path = tmp_path / name
    shutil.copyfile(src, path)
    assert resolve_model_dir(str(path)) == path
    assert load_config(path).vocab_size > 0 and model_name(path) == served


@pytest.mark.parametrize(("cwd", "relative"), [("", "."), ("", "./"), ("sub", ".."), ("sub", "../sub/..")])
def test_a_relative_model_path_is_served_under_its_directory_name(
    tmp_path, monkeypatch, cwd: str, relative: str
):
    """`lserve-lite serve --model .` (run inside the model's directory) served the model as "" (Path(".").name),
    and `..` as "..": README promises the model directory's name."""
    from lserve_lite.weights.loader import model_name

    (tmp_path / "SmolModel" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "SmolModel" / cwd)
    assert model_name(Path(relative)) == "SmolModel"


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-3),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0.0),
        dict(seed="x"),
        dict(seed=-1),
        dict(stop=[""]),
    ],
)
def test_invalid_sampling_values(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)


def test_prompt_of_the_whole_context_takes_one_token(tiny_llama):
    """A prompt of exactly the context limit may take one token (scoring: sampled from its last position, it needs
    no KV slot) and ends by length; asking for more is refused as before."""
    eng = LLMEngine(str(tiny_llama), "cpu", EngineConfig(max_model_len=128))
    with pytest.raises(InvalidRequestError, match="context limit is 128"):
        eng.add_request(list(range(3, 131)), SamplingParams(max_new_tokens=2))
    eng.add_request(list(range(3, 131)), SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=0))
    outs = [o for _ in range(20) if eng.has_unfinished() for o in eng.step()]
    assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 1
    assert eng.blocks.num_used == 0


def test_prompt_over_context_limit_and_engine_survives(tiny_llama):
    eng = LLMEngine(str(tiny_llama), "cpu", EngineConfig(max_model_len=128))
    with pytest.raises(InvalidRequestError, match="context limit is 128"):
        eng.add_request(list(range(3, 200)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        eng.add_request([5, 99999], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request([], SamplingParams())
    rid = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert outs[0].request_id == rid and outs[0].finish_reason == "length"
    assert outs[0].num_output_tokens == 128 - 3  # stopped at the context limit, not the max_new_tokens


def test_empty_text_prompt_and_a_refused_batch_leave_nothing_queued(tiny_llama):
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(max_model_len=128))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate([""], SamplingParams(max_new_tokens=2))  # no tokens once tokenized (no BOS added)
    with pytest.raises(
        InvalidRequestError, match="context limit"
    ):  # the first prompt was fine, the second not
        llm.generate([[5, 6, 7], list(range(3, 200))], SamplingParams(max_new_tokens=2))
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert len(out) == 1 and len(out[0].token_ids) == 3
    assert not llm.engine.has_unfinished() and not llm.engine.scheduler.has_work()


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lserve_lite.cli", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "model directory not found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "env, msg",
    [
        ({"LSERVE_CPU_SELECTOR": "fast"}, "LSERVE_CPU_SELECTOR must be one of numba, ref"),
        ({"LSERVE_CPU_SPIN_US": "soon"}, "LSERVE_CPU_SPIN_US must be a number"),
    ],
)
def test_cli_bad_backend_knob_is_one_line(tmp_path, monkeypatch, capsys, env, msg):
    """README's CPU kernel switches: a bad value ends the command with one `error:` line and status 1, as any
    other bad setting does (it was a ValueError's traceback)."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.cli import main

    model = make_tiny_numpy(tmp_path / "m")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--backend", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1
