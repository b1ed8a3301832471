"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1.

The tiny random model carries the heavy tests (concurrency, disconnects, errors); the default SmolLM2
checks that greedy server outputs equal LLM.generate on a real model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from lserve_lite import EngineConfig, SamplingParams  # noqa: E402
from lserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from lserve_lite.serve.app import ServerThread, create_app  # noqa: E402

API_KEY = "test-key"
CFG = dict(num_kv_pages=64, max_model_len=256, max_num_seqs=64)
PROMPTS = ["hello world", "the quick brown fox", "0123456789", "how are you today?"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama) -> Path:
    """The model of conftest's `server` and `llm`: the transformers-made tiny llama."""
    return tiny_llama


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", text, re.M)}


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@contextlib.contextmanager
def paused(engine: LLMEngine):
    """Hold the engine thread at its next step() until the block ends (deterministic queue states)."""
    gate, orig = threading.Event(), engine.step

    def step():
        gate.wait()
        return orig()

    engine.step = step
    try:
        yield
    finally:
        gate.set()
        del engine.step


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def chat_msgs(p: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]


# -- basics -----------------------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # with a trailing slash it is the list too (it was the card of a model named "", for any name served)
    assert httpx.get(url + "/v1/models/", headers=auth, timeout=60).json()["object"] == "list"
    assert httpx.get(url + "/v1/models/", timeout=60).status_code == 401
    # a POST with one is served too (it was a 307 with an empty body, which clients follow without the body)
    body = {"messages": chat_msgs("hi"), "max_tokens": 2, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions/", json=body, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    r = httpx.post(url + "/tokenize/", json={"prompt": "hi"}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["count"] > 0, r.text
    assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok"}
    m = metrics(url)
    assert m["lserve_kv_pages_total"] == 64 and "lserve_time_to_first_token_seconds_count" in m
    assert 'lserve_time_per_output_token_seconds_bucket{le="+Inf"}' in m


def test_tokenize_and_detokenize(server, llm):
    """vLLM's /tokenize (a prompt as completions encode it, a conversation as chat renders it) and /detokenize."""
    url, engine = server
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def post(path: str, **body):
        return httpx.post(url + path, json=body, headers=auth, timeout=30)

    r = post("/tokenize", prompt="hello world", model="tiny").json()
    assert r == {
        "count": len(r["tokens"]),
        "max_model_len": engine.max_len,
        "tokens": llm.tokenizer.encode("hello world"),
        "token_strs": None,
    }
    # vLLM's return_token_strs: the vocabulary's strings of the ids (transformers' convert_ids_to_tokens)
    r2 = post("/tokenize", prompt="hello world", return_token_strs=True).json()
    assert r2["tokens"] == r["tokens"] and r2["token_strs"] == [
        llm.tokenizer.tok.id_to_token(i) for i in r["tokens"]
    ]
    assert "".join(r2["token_strs"]).replace("\u0120", " ").endswith("hello world".split()[-1])
    # null is vLLM's Optional[bool] unset (it was a 400 "must be a boolean")
    assert post("/tokenize", prompt="hello world", model="tiny", return_token_strs=None).json() == r
    msgs = chat_msgs("hi")
    r = post("/tokenize", messages=msgs).json()
    assert r["tokens"] == llm.tokenizer.encode_chat(msgs)
    assert post("/tokenize", messages=msgs, add_generation_prompt=True, add_special_tokens=False).json() == r
    assert post("/detokenize", tokens=r["tokens"]).json()["prompt"] == llm.tokenizer.decode(
        r["tokens"], False
    )
    # an empty prompt is 0 tokens, as vLLM counts it (it was a 400 "the prompt is empty", which generating needs)
    assert post("/tokenize", prompt="").json() == {
        "count": 0,
        "max_model_len": engine.max_len,
        "tokens": [],
        "token_strs": None,
    }
    assert (
        post("/v1/completions", prompt="", max_tokens=1).json()["error"]["message"] == "the prompt is empty"
    )
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
        ("/tokenize", {"prompt": [1, 2]}, "prompt"),
        ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, "messages"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [1], "model": 5}, "model"),
        # vLLM's fields that change the ids: honoured at their defaults, refused otherwise (they were dropped)
        ("/tokenize", {"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
        ("/tokenize", {"prompt": "x", "return_token_strs": 1}, "return_token_strs"),
        ("/tokenize", {"messages": msgs, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": msgs, "chat_template": "{{ 1 }}"}, "chat_template"),
    ]:
        e = post(path, **body)
        assert e.status_code == 400 and e.json()["error"]["param"] == param, (path, body, e.text)
    assert post("/tokenize", prompt="x", model="other").status_code == 404
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}, timeout=60).status_code == 401


def test_cli_hook(monkeypatch):
    from lserve_lite import cli
    from lserve_lite.serve import run_from_args

    a = cli.build_parser().parse_args(
        ["serve", "--max-model-len", "512", "--api-key", "k", "--max-num-seqs", "8"]
    )
    assert (a.host, a.port, a.api_key, a.max_queue) == ("127.0.0.1", 8000, "k", 256)
    seen = {}
    monkeypatch.setattr("lserve_lite.serve.run_server", lambda *a, **k: seen.update(args=a, kw=k) or 0)
    assert run_from_args(a) == 0
    cfg = seen["args"][6]
    assert (cfg.max_model_len, cfg.max_num_seqs, seen["args"][1]) == (512, 8, "127.0.0.1")


def test_empty_api_key_means_none(monkeypatch, capsys):
    """`LSERVE_API_KEY=` sets no key (README: "$LSERVE_API_KEY, else none"); it used to require an empty bearer
    token, refusing every real client with 401. An empty or space-padded --api-key is refused in one line."""
    from lserve_lite import cli

    monkeypatch.setenv("LSERVE_API_KEY", "")
    assert cli.build_parser().parse_args(["serve"]).api_key is None
    monkeypatch.setenv("LSERVE_API_KEY", "k")
    assert cli.build_parser().parse_args(["serve"]).api_key == "k"
    for bad in ("", " k"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--api-key", bad])
        assert "must not be empty" in capsys.readouterr().err
    monkeypatch.setenv("LSERVE_API_KEY", "k ")  # a padded variable is refused too, not made unusable
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve"])
    # a key no client could send ('clé' was accepted, then every request got 401: the openai client refuses to
    # encode it, curl's UTF-8 bytes arrive as Latin-1) is refused at startup in one line
    for bad in ("clé", "k\tk"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--api-key", bad])
        assert "must be printable ASCII" in capsys.readouterr().err


# -- greedy equality with the embedded API ------------------------------------------------------------------
def test_chat_matches_llm(client, llm):
    for p in PROMPTS[:2]:
        want = llm.chat(chat_msgs(p), greedy(16))
        r = client.chat.completions.create(model="tiny", messages=chat_msgs(p), max_tokens=16, temperature=0)
        c = r.choices[0]
        assert (c.message.content, c.finish_reason, c.message.role) == (
            want.text,
            want.finish_reason,
            "assistant",
        )
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        chunks = list(client.chat.completions.create(model="tiny", messages=chat_msgs(p), max_tokens=16,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert all(ch.usage is None for ch in chunks[:-1])


def test_streamed_content_as_the_openai_helper_assembles_it(client):
    """An empty reply (EOS first, by logit_bias) streams as content "", as whole; text streams whole."""
    for bias in ({"2": 100}, {}):
        kw = dict(model="tiny", messages=chat_msgs("hi"), max_tokens=6, temperature=0, logit_bias=bias)
        whole = client.chat.completions.create(**kw).choices[0].message.content
        with client.chat.completions.stream(**kw) as s:
            s.until_done()
            assert s.current_completion_snapshot.choices[0].message.content == whole
        assert (whole == "") == bool(bias)


def test_completions_match_llm(client, llm):
    prompts = PROMPTS[2:] + [llm.tokenizer.encode("the lazy dog")]
    for p in prompts:
        want = llm.generate(p, greedy(12))[0]
        r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            len(want.prompt_token_ids),
            len(want.token_ids),
        )
        chunks = list(
            client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True)
        )
        assert "".join(ch.choices[0].text for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk


def test_stop_seed_top_p(client, llm):
    full = llm.generate(PROMPTS[1], greedy(24, ignore_eos=True))[0].text
    stop = full[5:8]
    cut = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    want = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7))[0]
    for _ in range(2):
        r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.8,
                                      seed=7)  # fmt: skip
        assert r.choices[0].text == want.text
    # vLLM's min_p reaches the sampler: the text LLM gives with it, not the one without
    want = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=1.0, min_p=0.8, seed=7))[0]
    free = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))[0]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=7,
                                  extra_body={"min_p": 0.8})  # fmt: skip
    assert r.choices[0].text == want.text != free.text


def test_include_stop_str_and_special_tokens_as_vllms(client, llm):
    """vLLM's include_stop_str_in_output and skip_special_tokens=false (refused with a 400 before): the reply, whole
    or streamed, keeps the stop string that ended it, and the special tokens' text."""
    full = llm.generate(PROMPTS[1], greedy(24, ignore_eos=True))[0].text
    stop = full[5:8]
    kept = full[: full.index(stop) + len(stop)]
    ask = dict(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    body = {"ignore_eos": True, "include_stop_str_in_output": True}
    r = client.completions.create(**ask, extra_body=body)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (kept, "stop")
    chunks = list(client.completions.create(**ask, stream=True, extra_body=body))
    assert "".join(ch.choices[0].text for ch in chunks) == kept
    bos = llm.tokenizer.token_id("<|im_start|>")
    forced = dict(model="tiny", max_tokens=3, temperature=0, logit_bias={str(bos): 100})
    for special, want in ((True, ""), (False, "<|im_start|>" * 3)):
        r = client.chat.completions.create(messages=chat_msgs("hi"), **forced,
                                           extra_body={"ignore_eos": True, "skip_special_tokens": special})  # fmt: skip
        assert r.choices[0].message.content == want
    s = client.chat.completions.create(messages=chat_msgs("hi"), **forced, stream=True,
                                       extra_body={"ignore_eos": True, "skip_special_tokens": False})  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == "<|im_start|>" * 3


# -- concurrency and disconnects -------------------------------------------------------------------------------
def test_32_concurrent_streams(server, llm):
    url, _ = server
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    want = llm.chat([[{"role": "user", "content": p}] for p in prompts], greedy(24, ignore_eos=True))

    async def one(c: openai.AsyncOpenAI, i: int):
        stream = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        text, reason, used = [], None, None
        async for ch in stream:
            if ch.choices:
                text.append(ch.choices[0].delta.content or "")
                reason = ch.choices[0].finish_reason or reason
            if ch.usage:
                used = ch.usage.completion_tokens
        return "".join(text), reason, used

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == [w.text for w in want]
    assert all(r[1] == "length" and r[2] == 24 for r in results)
    m = metrics(url)
    assert m["lserve_kv_pages_used"] == 0 and m["lserve_requests_running"] == 0


def test_client_killed_mid_stream_frees_pages(server, client):
    url, _ = server
    aborted0 = metrics(url)['lserve_requests_total{finish_reason="abort"}']
    results: list = [None] * 4

    def normal(i: int):
        s = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=120, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(s)
        results[i] = (chunks[-1].choices[0].finish_reason, sum(1 for ch in chunks if ch.choices[0].text))

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    body = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 230, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data:")
                if got == 3:
                    break
    # the killed request is aborted (pages returned) while the others keep streaming
    assert wait_for(lambda: metrics(url)['lserve_requests_total{finish_reason="abort"}'] == aborted0 + 1)
    for t in threads:
        t.join()
    assert all(r is not None and r[0] == "length" for r in results)
    m = metrics(url)
    assert m["lserve_kv_pages_used"] == 0 and m["lserve_requests_in_flight"] == 0


def test_non_streaming_client_gone_aborts(server):
    url, engine = server
    aborted0 = metrics(url)['lserve_requests_total{finish_reason="abort"}']
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0}
    with paused(engine):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                url + "/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=0.5,
            )
        time.sleep(0.2)
    assert wait_for(lambda: metrics(url)['lserve_requests_total{finish_reason="abort"}'] == aborted0 + 1)
    assert wait_for(lambda: metrics(url)["lserve_kv_pages_used"] == 0)


# -- errors ------------------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    return err


def test_bad_requests_400(server, client):
    url, _ = server
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(
        url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=auth, timeout=60
    )
    assert "JSON" in _error(r, 400)["message"]
    r = httpx.post(url + "/v1/completions", content=b"[1, 2]", headers=auth, timeout=60)
    _error(r, 400)
    cases = [
        dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(n=0), dict(n=17),
        dict(stop=3), dict(seed="x"), dict(seed=-1), dict(presence_penalty=3.0), dict(messages=[]),
        dict(logit_bias={"x": 1}), dict(logit_bias={"²": 1}), dict(logit_bias={"5": 101}),
        dict(logit_bias={"99999": 1}), dict(top_logprobs=2), dict(tools=[{}]),
        dict(messages=[{"role": "wizard", "content": "hi"}]), dict(messages=None),
        # vLLM extensions without an implementation: refused, not ignored (guided_json had no effect); min_p outside
        # [0, 1]
        dict(min_p=1.5), dict(min_p=-0.1), dict(min_tokens=-1), dict(use_beam_search=True), dict(guided_json={"type": "object"}),
        dict(guided_choice=["a", "b"]),
    ]  # fmt: skip
    for kw in cases:
        body = {"model": "tiny", "messages": chat_msgs("hi")} | kw
        err = _error(httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60), 400)
        assert err["param"] == next(iter(kw)), (kw, err)
    # the values that mean "off", and min_p (taken since 2026-12-07)
    neutral = (dict(min_p=0.0), dict(min_p=0.5), dict(min_tokens=0), dict(use_beam_search=False))
    for off in neutral:
        body = {"model": "tiny", "messages": chat_msgs("hi"), "max_tokens": 2} | off
        assert (
            httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60).status_code == 200
        ), off
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=chat_msgs("hi"), n=99)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[5, 9999], max_tokens=4)


def test_each_fields_range_has_one_message(server):
    """repetition_penalty 0 got pydantic's "Input should be greater than 0", 0.005 the engine's "[0.01, 100]" line;
    so did top_k (-2 / 2^31), min_tokens (-1 / past max_tokens) and chat's max_tokens (-1 / 0). Each field's
    out-of-range values now get one message, naming the field."""
    url, auth = server[0], {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": "tiny", "messages": chat_msgs("hi"), "max_tokens": 10}
    cases = {  # field: (path, body, values on both sides of the former split)
        "repetition_penalty": ("/v1/chat/completions", chat, [0, -1, 0.005, 101]),
        "top_k": ("/v1/chat/completions", chat, [-2, 2**31]),
        "min_tokens": ("/v1/chat/completions", chat, [-1, 11]),
        "max_tokens": ("/v1/chat/completions", chat, [-1, 0]),
        "max_completion_tokens": ("/v1/chat/completions", chat, [-1, 0]),
    }
    for field, (path, body, values) in cases.items():
        rules = set()
        for v in values:
            err = _error(httpx.post(url + path, json=body | {field: v}, headers=auth, timeout=60), 400)
            assert err["param"] == field and err["message"].startswith(field), (field, v, err)
            rule, _, got = err["message"].rpartition(", got ")
            assert float(got) == v, (field, v, err)
            rules.add(rule)
        assert len(rules) == 1, (field, rules)
    err = _error(httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": -1}, headers=auth,
                            timeout=60), 400)  # fmt: skip
    assert err["param"] == "max_tokens" and err["message"].startswith("max_tokens must be at least 0")


def test_bodies_are_validated_off_the_event_loop_with_the_same_errors(server, monkeypatch):
    """pydantic's validation of a chat body of 17,000 messages held the event loop 0.05 s, every stream with it:
    chat, completions and /tokenize bodies are validated in a worker thread, and a body with several problems gets
    the one it got first when validated on the loop (the prompt's size, then /tokenize's own fields, then the
    fields pydantic checks, then the model)."""
    import lserve_lite.serve.app as app_module

    url, auth = server[0], {"Authorization": f"Bearer {API_KEY}"}
    on_loop, real = [], app_module.parse

    def watched(model, body):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(model, body)

    monkeypatch.setattr(app_module, "parse", watched)
    chat, long = {"model": "tiny", "messages": chat_msgs("hi"), "max_tokens": 2}, "fox " * 5000
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/tokenize", {"prompt": "hi"}), ("/tokenize", {"messages": chat_msgs("hi")})):  # fmt: skip
        assert httpx.post(url + path, json=body, headers=auth, timeout=60).status_code == 200, path
    assert on_loop == [False] * 4
    cases = [  # (path, body, status, the param of the error reported first)
        ("/v1/chat/completions", chat | {"messages": chat_msgs(long), "stop": 3}, 400, "messages"),
        ("/v1/chat/completions", chat | {"model": "other", "stop": 3}, 400, "stop"),
        ("/v1/chat/completions", chat | {"model": "other"}, 404, "model"),
        ("/v1/chat/completions", chat | {"messages": [], "stream_options": {}}, 400, "messages"),
        ("/v1/completions", {"prompt": long, "n": 0}, 400, "prompt"),
        ("/tokenize", {"prompt": long, "return_token_strs": "x"}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "return_token_strs": "x", "model": 5}, 400, "return_token_strs"),
        ("/tokenize", {"prompt": "hi", "model": 5}, 400, "model"),
        ("/tokenize", {"prompt": 5, "model": 5}, 400, "prompt"),
    ]
    for path, body, status, param in cases:
        err = _error(httpx.post(url + path, json=body, headers=auth, timeout=60), status)
        assert err["param"] == param, (path, body, err)
    assert httpx.post(url + "/v1/chat/completions", json=chat | {"messages": chat_msgs(long)}, headers=auth,
                      timeout=60).json()["error"]["code"] == "context_length_exceeded"  # fmt: skip


def test_a_long_chat_is_validated_in_calls_with_model_validates_errors(monkeypatch):
    """pydantic-core holds the GIL for a whole call, from a worker thread too: 32,768 messages held every stream
    ~0.05-0.1 s. A long chat's messages are validated MESSAGES_PER_CALL at a time; the request, and the first error
    of a body with several, are model_validate's."""
    from pydantic import ValidationError

    from lserve_lite.serve import protocol
    from lserve_lite.serve.protocol import MESSAGES_PER_CALL, ApiError, ChatCompletionRequest, _located, parse

    sizes, real = [], protocol._MESSAGES

    class Counted:  # the messages' validator, the size of each call kept
        def validate_python(self, msgs):
            sizes.append(len(msgs))
            return real.validate_python(msgs)

    monkeypatch.setattr(protocol, "_MESSAGES", Counted())

    def whole(body: dict) -> str:  # model_validate's first error, as parse words it
        try:
            ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where, hint = _located(err["loc"])
            return f"{where}: {hint or err['msg']}"
        raise AssertionError("valid")

    n = 3 * MESSAGES_PER_CALL + 5
    msgs = [{"role": "user", "content": f"m{i}"} for i in range(n)]
    body = {"model": "tiny", "messages": msgs}
    assert (
        parse(ChatCompletionRequest, body).model_dump()
        == ChatCompletionRequest.model_validate(body).model_dump()
    )
    assert max(sizes) == MESSAGES_PER_CALL and sum(sizes) == n

    def bad(i: int, message: object) -> list:
        return msgs[:i] + [message] + msgs[i + 1 :]

    late = n - 3
    cases = [
        {"messages": bad(late, {"role": "wizard"})},
        {"messages": bad(late, {"role": "user", "content": 5})},  # a union's hint
        {"messages": bad(late, "x")},
        {"messages": bad(5, "x")[:late] + [{"role": "wizard"}] + msgs[late + 1 :]},  # the earlier one
        {"messages": bad(late, {"role": "wizard"}), "temperature": "x"},  # declared before messages
        {"messages": bad(late, {"role": "wizard"}), "model": 5},
        {"messages": bad(late, {"role": "wizard"}), "max_completion_tokens": "x"},  # declared after
        {"messages": bad(late, {"role": "wizard"}), "tools": "x"},
        {"messages": msgs, "temperature": "x", "tools": "x"},
    ]
    for case in cases:
        with pytest.raises(ApiError) as e:
            parse(ChatCompletionRequest, body | case)
        assert e.value.message == whole(body | case), e.value.message


def test_vllm_extensions_that_would_change_the_reply_are_refused(server):
    """vLLM's fields that change what a reply holds were ignored with 200 (a client asking for prompt_logprobs,
    allowed_token_ids or usage in every chunk got none of it): set to
    anything but their off value they are refused, naming the field; their off values pass."""
    url, auth = server[0], {"Authorization": f"Bearer {API_KEY}"}
    both = [dict(prompt_logprobs=1),
            dict(allowed_token_ids=[5]), dict(bad_words=["fox"]), dict(truncate_prompt_tokens=4),
            dict(return_tokens_as_token_ids=True), dict(return_token_ids=True), dict(logits_processors=["x"]),
            dict(structured_outputs={"choice": ["a"]}), dict(stream=True, stream_options={"continuous_usage_stats": True})]  # fmt: skip
    off = dict(prompt_logprobs=None, bad_words=[],
               return_tokens_as_token_ids=False, return_token_ids=False, structured_outputs=None)  # fmt: skip
    for path, prompt, own, own_off in (
        ("/v1/chat/completions", {"messages": chat_msgs("hi")}, [dict(echo=True), dict(add_special_tokens=True),
         dict(documents=[{"title": "t", "text": "x"}])], dict(echo=False, add_special_tokens=False, documents=[])),
        ("/v1/completions", {"prompt": "hi"}, [dict(add_special_tokens=False)], dict(add_special_tokens=True)),
    ):  # fmt: skip
        for kw in both + own:
            err = _error(httpx.post(url + path, json=prompt | kw, headers=auth, timeout=60), 400)
            assert err["param"] == list(kw)[-1], (path, kw, err)
        body = prompt | {"max_tokens": 2} | off | own_off
        assert httpx.post(url + path, json=body, headers=auth, timeout=60).status_code == 200, path


def test_context_limit_400(server, client):
    long = "the quick brown fox jumps over the lazy dog " * 60
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert "256" in str(e.value) and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=chat_msgs("hi"), max_tokens=250, stream=True)
    assert "256" in str(e.value) and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # the field the client sent is named
        client.chat.completions.create(model="tiny", messages=chat_msgs("hi"), max_completion_tokens=250)
    assert e.value.param == "max_completion_tokens" and "max_completion_tokens is 250" in str(e.value)


def test_auth_401_and_model_404(server):
    url, _ = server
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=chat_msgs("hi"), max_tokens=2)
    _error(httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=60), 401)
    _error(
        httpx.post(
            url + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": API_KEY}, timeout=60
        ),
        401,
    )
    assert httpx.get(url + "/health", timeout=60).status_code == 200  # health and metrics stay open
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model="gpt-4o", messages=chat_msgs("hi"), max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        good.models.retrieve("gpt-4o")
    assert good.models.retrieve("tiny").id == "tiny"
    _error(
        httpx.get(url + "/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60), 404
    )


def test_overload_429(tiny_dir):
    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**(CFG | {"max_num_seqs": 1})))
    with ServerThread(create_app(engine, served_model_name="tiny", max_queue=1)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        body = dict(model="tiny", prompt="hello", max_tokens=8, temperature=0)
        results: list = []
        with paused(engine):  # 1 request running + 1 queued fill the server
            threads = [
                threading.Thread(target=lambda: results.append(c.completions.create(**body)))
                for _ in range(2)
            ]
            for t in threads:
                t.start()
            assert wait_for(lambda: metrics(url)["lserve_requests_in_flight"] == 2)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(**body)
        for t in threads:
            t.join()
        assert [r.choices[0].finish_reason for r in results] == ["length", "length"]
        assert c.completions.create(**body).choices[0].finish_reason == "length"  # room again
        assert metrics(url)['lserve_request_errors_total{status="429"}'] == 1
        with pytest.raises(openai.BadRequestError, match="at most 2") as e:  # never admissible: 400, not 429
            c.completions.create(**(body | {"n": 3}))
        assert e.value.param == "n"
        with pytest.raises(openai.BadRequestError, match="at most 2") as e:  # the prompts' count: it named n
            c.completions.create(**(body | {"prompt": ["a", "b", "c"]}))
        assert e.value.param == "prompt"
        with paused(engine):  # one running: a request of two sequences is refused whole, none of it starts
            t = threading.Thread(target=lambda: results.append(c.completions.create(**body)))
            t.start()
            assert wait_for(lambda: metrics(url)["lserve_requests_in_flight"] == 1)
            # it counts sequences, as the limit does: it read "1 requests in flight" (and "2" for one request of n=2)
            with pytest.raises(
                openai.RateLimitError, match="1 sequences in flight, and this request's 2 would pass"
            ):
                c.completions.create(**(body | {"n": 2}))
            assert metrics(url)["lserve_requests_in_flight"] == 1
        t.join()


def test_concurrent_requests_refused_whole(tiny_dir):
    """Two requests of two sequences each arriving together where two fit: one is admitted whole, the other
    refused (429) with none of its sequences queued (room was checked first and taken per sequence later, so
    a concurrent request could slip between and be refused half started)."""
    from lserve_lite.serve.async_engine import AsyncEngine, RequestHandle
    from lserve_lite.serve.protocol import ApiError

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**(CFG | {"max_num_seqs": 1})))
    params = SamplingParams(max_new_tokens=2)
    reached: list[str] = []
    add_request = engine.add_request
    engine.add_request = lambda ids, p, rid, **kw: (reached.append(rid), add_request(ids, p, rid, **kw))[1]

    async def both():
        aengine = AsyncEngine(engine, max_queue=1)
        aengine.start(asyncio.get_running_loop())
        try:
            jobs = [[([5, 6, 7], params, f"{r}-{i}") for i in range(2)] for r in "ab"]
            got = await asyncio.gather(*(aengine.submit(j) for j in jobs), return_exceptions=True)
            finished = 0
            for h in got[0] if isinstance(got[0], list) else []:
                finished += sum([out.finished async for out in h])
            return got, finished
        finally:
            aengine.shutdown()

    (a, b), finished = asyncio.run(both())
    assert isinstance(a, list) and all(isinstance(h, RequestHandle) for h in a) and finished == 2
    assert isinstance(b, ApiError) and b.status == 429
    assert sorted(reached) == ["a-0", "a-1"]  # none of the refused request's sequences reached the engine


def test_abort_while_the_request_enters_the_engine(tiny_dir):
    """A client gone while the engine thread adds its request (taken from the inbox, not yet in the engine) still
    aborts it: the engine aborts only requests it holds, so the async engine applies such an abort right after."""
    from lserve_lite.serve.async_engine import AsyncEngine

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)

    async def go():
        aengine = AsyncEngine(engine, max_queue=4)
        add_request = engine.add_request

        def abort_then_add(ids, p, rid, **kw):  # the event loop's abort lands inside the hand-over
            aengine.abort(rid)
            return add_request(ids, p, rid, **kw)

        engine.add_request = abort_then_add
        aengine.start(asyncio.get_running_loop())
        try:
            (h,) = await aengine.submit([([5, 6, 7], params, "gone")])
            return [out async for out in h]
        finally:
            aengine.shutdown()

    outs = asyncio.run(go())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and outs[-1].num_output_tokens < 50
    assert engine.blocks.num_used == 0


def test_submit_cancelled_just_after_admission_aborts(tiny_dir):
    """submit() cancelled in the instant after its sequences were admitted (their handles made, submit not yet
    resumed) aborts them: only those not yet admitted were, and the others ran unread to their end."""
    from lserve_lite.serve.async_engine import AsyncEngine

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)

    async def go():
        loop = asyncio.get_running_loop()
        aengine = AsyncEngine(engine, max_queue=4)
        queues: list[asyncio.Queue] = []
        deliver = aengine._deliver

        def deliver_then_cancel(posts):  # the admissions land, then the cancel comes after their handles
            if not queues:
                queues.extend(aengine._queues[f"c-{i}"] for i in range(2))
                loop.call_soon(loop.call_soon, task.cancel)
            deliver(posts)

        aengine._deliver = deliver_then_cancel
        aengine.start(loop)
        try:
            task = asyncio.create_task(aengine.submit([([5, 6, 7], params, f"c-{i}") for i in range(2)]))
            with pytest.raises(asyncio.CancelledError):
                await task
            lasts = []
            for q in queues:
                while not getattr(out := await q.get(), "finished", False):
                    pass
                lasts.append(out)
            return lasts
        finally:
            aengine.shutdown()

    lasts = asyncio.run(go())
    assert len(lasts) == 2 and all(o.finish_reason == "abort" and o.num_output_tokens < 200 for o in lasts)
    assert engine.blocks.num_used == 0


def test_internal_errors_500_without_trace(server, client, monkeypatch):
    url, engine = server

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    with monkeypatch.context() as mp:
        mp.setattr(engine.tokenizer, "encode_chat", boom)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": chat_msgs("hi")},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)  # fmt: skip
        err = _error(r, 500)
        assert "secret" not in r.text and err["message"] == "internal server error"
    # a failing engine step fails the requests in flight, then the server carries on
    orig = engine.step
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("secret step failure")
        return orig()

    with monkeypatch.context() as mp:
        mp.setattr(engine, "step", flaky)
        with pytest.raises(openai.APIError) as e:
            client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0)
        assert "secret" not in str(e.value)
    assert wait_for(lambda: metrics(url)["lserve_kv_pages_used"] == 0)
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert httpx.get(url + "/health", timeout=60).status_code == 200


def test_sse_wire_format(server):
    url, _ = server
    body = {"model": "tiny", "messages": chat_msgs("hi"), "max_tokens": 3, "stream": True, "temperature": 0}
    r = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_sse_lines_hold_no_character_that_splitlines_splits_on(server):
    """U+2028, U+2029 and U+0085 went raw into a data line: httpx's iter_lines (httpx-sse and clients built on it)
    splits lines as str.splitlines does, cutting the chunk's JSON in two. They are escaped, as JSON allows."""
    url, _ = server
    prompt = "a\u2028b\u2029c\x85d"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True, "stream": True}
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]", lines
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["text"].startswith(prompt)


# -- the default model ------------------------------------------------------------------------------------------
def test_default_model_matches_llm(smollm2_cpu):
    """Greedy chat through the server equals LLM.chat on SmolLM2 (same engine config: the defaults)."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    want = smollm2_cpu.chat(msgs, greedy(8))
    engine = LLMEngine(str(smollm2_cpu.engine.model_dir), "cpu", smollm2_cpu.engine.ecfg)
    with ServerThread(create_app(engine)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        name = "SmolLM2-135M-Instruct"
        assert c.models.list().data[0].id == name
        r = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        s = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in s) == want.text


def test_usage_and_metrics_report_cached_prompt_tokens(server, client, llm):
    """A second request sharing a long system prompt: OpenAI's usage.prompt_tokens_details.cached_tokens and
    the /metrics counters show the cached pages; the reply equals a cold run."""
    url, _ = server
    system = " ".join(["the lazy dog jumps over the quick brown fox"] * 12)
    before = metrics(url)
    usages = []
    for q in ("hello world", "how are you today?"):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == llm.chat(msgs, greedy(4)).text
        usages.append(r.usage)
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens >= 64
    after = metrics(url)
    cached = after["lserve_prompt_tokens_cached_total"] - before["lserve_prompt_tokens_cached_total"]
    computed = after["lserve_prompt_tokens_computed_total"] - before["lserve_prompt_tokens_computed_total"]
    assert cached == usages[1].prompt_tokens_details.cached_tokens
    assert computed == sum(u.prompt_tokens for u in usages) - cached


@pytest.mark.parametrize("static_sparsity", [0.5, 1.0])
def test_lserve_metrics_count_each_pool_apart(tmp_path, static_sparsity):
    """LServe: kv_pages_used counted both pools' pages against kv_pages_total of the dense pool alone, and with no
    dense head (its pages are ids without bytes) /metrics said 2^20 pages and 16.7M tokens where the startup line
    says what the streaming pool holds."""
    from fastapi.testclient import TestClient
    from tiny_models import make_tiny_numpy

    d = make_tiny_numpy(tmp_path / "m")
    (d / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    sparse = dict(enabled=True, static_sparsity=static_sparsity, page_size=16, token_budget=64, prefill_sink=16,
                  prefill_local=64, decode_sink=16, decode_local=32)  # fmt: skip
    eng = LLMEngine(str(d), "cpu", EngineConfig(page_size=16, max_num_seqs=2, sparse=sparse))
    eng.add_request(list(range(3, 100)), greedy(4))  # 97 tokens: 7 pages in each pool
    eng.step()
    text = TestClient(create_app(eng)).get("/metrics").text  # no lifespan: the engine thread never steps
    m = {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, re.M)}
    b = eng.blocks
    pages = b.num_stream_pages if static_sparsity == 1.0 else b.num_pages
    assert (m["lserve_kv_pages_used"], m["lserve_kv_pages_total"]) == (7, pages)
    assert m["lserve_kv_capacity_tokens"] == 16 * pages and f"= {16 * pages} tokens" in eng.kv_summary()
    stream = (m.get("lserve_kv_stream_pages_used"), m.get("lserve_kv_stream_pages_total"))
    assert stream == ((None, None) if static_sparsity == 1.0 else (7, b.num_stream_pages))


def test_exit_signal_aborts_streams(tiny_dir):
    """Ctrl-C / SIGTERM: uvicorn waits for open connections, and a stream could run to the context limit (the
    server seemed to hang); the requests in flight are aborted, their streams end with [DONE], the server stops."""
    import signal

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**{**CFG, "max_model_len": 1024}))
    srv = ServerThread(create_app(engine, served_model_name="tiny"))
    with srv as url:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": engine.max_len - 8, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            srv.server.handle_exit(signal.SIGINT, None)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "abort"
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()
    assert engine.blocks.num_used == 0
