"""What vLLM's LLM fills in for a request: generation_config.json's sampling fields make
`get_default_sampling_params()`, which a call without sampling_params runs with, and the engine's seed seeds
requests without one of their own."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, SamplingParams


def _with_generation_config(tiny_llama: Path, tmp_path: Path, fields: dict) -> str:
    """A copy of the tiny model whose generation_config.json also holds `fields`."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    gen = model / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), **fields}))
    return str(model)


@pytest.fixture(scope="module")
def creator_llm(tiny_llama, tmp_path_factory):
    """A model whose creator asks for greedy replies of 3 tokens (top_k 50 and repetition_penalty 1.0 are
    transformers' defaults, which vLLM does not read as the creator's)."""
    fields = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 50, "repetition_penalty": 1.0, "top_p": 0.9}
    model = _with_generation_config(tiny_llama, tmp_path_factory.mktemp("gen"), fields)
    return LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=16))


def test_default_sampling_params_are_the_generation_configs(creator_llm):
    sp = creator_llm.get_default_sampling_params()
    assert (sp.temperature, sp.max_tokens, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.0, 3, 0.9, 0, 1.0)
    sp.max_tokens = 1  # vLLM's examples set fields on it: a new object each call
    assert creator_llm.get_default_sampling_params().max_tokens == 3


def test_calls_without_sampling_params_run_with_the_models_defaults(creator_llm):
    explicit = SamplingParams(temperature=0.0, max_tokens=3, top_p=0.9)
    want = creator_llm.generate("hello world", explicit)[0].token_ids
    assert 1 <= len(want) <= 3
    assert creator_llm.generate("hello world")[0].token_ids == want
    assert creator_llm.generate(["the fox", "hello world"], [explicit, None])[1].token_ids == want
    msgs = [{"role": "user", "content": "hello"}]
    assert creator_llm.chat(msgs).token_ids == creator_llm.chat(msgs, explicit).token_ids
    streamed = [t for out in creator_llm.stream_outputs("hello world") for t in out.token_ids]
    assert streamed == want


def test_a_model_without_sampling_fields_defaults_as_sampling_params(tiny_llama):
    with LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16)) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()


def test_refused_generation_config_values_name_the_file(tiny_llama, tmp_path):
    model = _with_generation_config(tiny_llama, tmp_path, {"temperature": -1})
    with LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=16)) as llm:
        refused = r"generation_config\.json .*temperature.*pass sampling_params"
        with pytest.raises(InvalidRequestError, match=refused):
            llm.generate("hello")
        out = llm.generate("hello", SamplingParams(max_tokens=2))[0]  # the caller's own params still run
        assert out.token_ids


def test_an_engine_seed_repeats_unseeded_requests_as_vllms(tiny_llama):
    """vLLM's LLM(seed=...) makes requests without a seed of their own repeat from run to run; here it was refused.
    Each unseeded request (and candidate) gets its own seed from the engine's, in the order they are added."""
    hot = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, n=2)

    def run(seed: int) -> list[list[int]]:
        with LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16), seed=seed) as llm:
            return [o.token_ids for o in llm.generate([[5, 6], [7]], hot) + llm.generate([[5, 6]], hot)]

    first = run(5)
    assert run(5) == first and run(6) != first
    assert len({tuple(t) for t in first}) == len(first)  # every request and candidate drew its own numbers
    with pytest.raises(InvalidRequestError, match=r"^seed must be a non-negative integer, got -1$"):
        LLM(str(tiny_llama), backend="cpu", seed=-1)


CREATOR = {
    "temperature": 0.3,
    "top_p": 0.7,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.2,
    "max_new_tokens": 3,
}
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


@pytest.fixture(scope="module")
def creator_server(tiny_llama, tmp_path_factory):
    """A server of a model whose generation_config.json sets every sampling field vLLM's server reads from it;
    yields its URL and the SamplingParams its engine was given, in order."""
    pytest.importorskip("fastapi")
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    model = _with_generation_config(tiny_llama, tmp_path_factory.mktemp("gen_serve"), CREATOR)
    engine = LLMEngine(model, "cpu", EngineConfig(num_kv_pages=16))
    given: list[SamplingParams] = []
    add = engine.add_request

    def recording(prompt, params, *args, **kw):
        given.append(params)
        return add(prompt, params, *args, **kw)

    engine.add_request = recording
    with ServerThread(create_app(engine)) as url:
        yield url, given


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hello world"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
])  # fmt: skip
def test_server_requests_without_sampling_fields_take_the_models(creator_server, path, body):
    """vLLM's server (--generation-config auto) fills each field a request omits from generation_config.json; here
    a request without temperature sampled at 1.0 whatever the model's file said. A request's own value wins."""
    import httpx

    url, given = creator_server
    assert httpx.post(url + path, json=body, timeout=60).status_code == 200
    sp = given[-1]
    assert [getattr(sp, f) for f in FIELDS] == [0.3, 0.7, 20, 0.05, 1.2, 3]
    own = {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 5,
    }
    assert httpx.post(url + path, json=body | own, timeout=60).status_code == 200
    sp = given[-1]
    assert [getattr(sp, f) for f in FIELDS] == [0.0, 1.0, 0, 0.0, 1.0, 5]


def test_a_server_of_refused_generation_config_values_names_the_file(tiny_llama, tmp_path, capsys):
    """The model's own values are checked once, when the server starts, not blamed on each request's fields."""
    pytest.importorskip("fastapi")
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve import run_server
    from lserve_lite.serve.app import create_app

    model = _with_generation_config(tiny_llama, tmp_path, {"top_p": 0})
    engine = LLMEngine(model, "cpu", EngineConfig(num_kv_pages=16))
    refused = r"the model's generation_config\.json sampling defaults \{'top_p': 0\} are refused \(top_p must"
    with pytest.raises(InvalidRequestError, match="^" + refused):
        create_app(engine)
    engine.close()
    assert run_server(model, port=0, backend="cpu", engine_config=EngineConfig(num_kv_pages=16)) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f"lserve-lite serve: {refused}[^\n]*\n", err), err


def test_min_tokens_past_the_models_max_new_tokens_names_it(creator_server):
    """A request without max_tokens is bounded by the model's max_new_tokens: a min_tokens past it says so."""
    import httpx

    r = httpx.post(creator_server[0] + "/v1/completions", json={"prompt": "hi", "min_tokens": 5}, timeout=60)
    assert r.status_code == 400
    want = (
        "min_tokens must be an integer in [0, the model's generation_config.json max_new_tokens (3)], got 5"
    )
    assert r.json()["error"]["message"] == want


def test_generation_config_vllm_or_a_folder_as_vllms(tiny_llama, tiny_gguf, tmp_path):
    """vLLM's generation_config: "auto" (the model's file), "vllm" (none: SamplingParams' defaults) or a folder
    holding a generation_config.json; anything else is refused in one line before the model loads."""
    model = _with_generation_config(tiny_llama, tmp_path, {"temperature": 0.3, "max_new_tokens": 3})
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "max_new_tokens": 7}))
    want = {
        "auto": (0.3, 1.0, 3),
        "vllm": (1.0, 1.0, SamplingParams().max_tokens),
        str(other): (1.0, 0.5, 7),
        other: (1.0, 0.5, 7),
    }
    for source, fields in want.items():
        with LLM(model, backend="cpu", num_kv_pages=16, generation_config=source) as llm:
            sp = llm.get_default_sampling_params()
            assert (sp.temperature, sp.top_p, sp.max_tokens) == fields, source
    gguf = tiny_gguf[2]  # no sampling defaults of its own; a folder's apply
    for source, fields in (("auto", (1.0, 1.0, SamplingParams().max_tokens)), (other, (1.0, 0.5, 7))):
        with LLM(str(gguf), backend="cpu", num_kv_pages=16, generation_config=source) as llm:
            sp = llm.get_default_sampling_params()
            assert (sp.temperature, sp.top_p, sp.max_tokens) == fields, source
    for bad in ("none", str(tmp_path / "missing"), str(other / "generation_config.json"), 3, None):
        with pytest.raises(
            InvalidRequestError, match=r"^generation_config must be 'auto', 'vllm' or a folder "
        ):
            EngineConfig(generation_config=bad)


def test_serve_generation_config_switch(tiny_llama, tmp_path, capsys):
    """`lserve-lite serve --generation-config vllm` serves without the model's sampling defaults; a value that is
    neither auto, vllm nor a folder with the file stops it in one line before the model loads."""
    pytest.importorskip("fastapi")
    from lserve_lite.cli import build_parser
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve import run_from_args

    model = _with_generation_config(tiny_llama, tmp_path, {"temperature": 0.3})
    for source, want in (("auto", {"temperature": 0.3}), ("vllm", {})):
        engine = LLMEngine(model, "cpu", EngineConfig(num_kv_pages=16, generation_config=source))
        assert engine.sampling_defaults == want
        engine.close()
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation_config.json").write_text('{"top_p": 0}')
    engine = LLMEngine(model, "cpu", EngineConfig(num_kv_pages=16, generation_config=str(tmp_path / "gen")))
    with pytest.raises(
        InvalidRequestError, match=re.escape(f"{tmp_path / 'gen' / 'generation_config.json'} sampling")
    ):
        _ = engine.sampling_defaults
    engine.close()
    args = build_parser().parse_args(
        ["serve", "--model", model, "--port", "8123", "--generation-config", "nope"]
    )
    assert run_from_args(args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"lserve-lite serve: generation_config must be 'auto', 'vllm' or a folder [^\n]*\n", err
    )
    assert build_parser().parse_args(["serve"]).generation_config == "auto"
