"""A prompt is encoded and checked once per request, not once per candidate: LLM.generate / chat and the server's
engine thread each checked (or tokenized) a prompt again for every one of its n candidates."""

from __future__ import annotations

import threading

import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, SamplingParams
from lserve_lite.engine.llm_engine import LLMEngine

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=32, max_model_len=128))


def _counted(monkeypatch, obj: object, name: str) -> list[str]:
    """Calls of obj.name, each as the name of the thread that made it."""
    calls, real = [], getattr(obj, name)

    def counted(*args, **kw):
        calls.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_generate_encodes_and_checks_a_prompt_once_for_its_candidates(llm, monkeypatch):
    encoded = _counted(monkeypatch, llm.engine, "encode_prompt")
    checked = _counted(monkeypatch, llm.engine, "check_ids")
    sp = SamplingParams(n=4, max_new_tokens=2, seed=0)
    outs = llm.generate(["the quick brown fox", [5, 6, 7]], sp)
    assert len(outs) == 8 and [o.index for o in outs] == [0, 1, 2, 3] * 2
    assert [o.prompt for o in outs] == ["the quick brown fox"] * 4 + [None] * 4
    assert len(encoded) == 1 and len(checked) == 1  # were 4 and 4
    for bad, message in (([5, 10**6], r"prompt token ids must be in \[0, "), ("", "prompt is empty")):
        with pytest.raises(InvalidRequestError, match=message):  # the same messages as before
            llm.generate(bad, sp)
    assert not llm.engine.has_unfinished()


def test_chat_checks_and_decodes_a_conversation_once_for_its_candidates(llm, monkeypatch):
    checked = _counted(monkeypatch, llm.engine, "check_ids")
    decoded: list[int] = []
    decode = llm.tokenizer.decode

    def counted(ids, *args, **kw):
        decoded.append(len(ids))
        return decode(ids, *args, **kw)

    monkeypatch.setattr(llm.tokenizer, "decode", counted)
    prompt_len = len(llm.tokenizer.encode_chat(MSGS))
    outs = llm.chat([MSGS, MSGS[1:]], SamplingParams(n=3, max_new_tokens=2, seed=0))
    assert len(outs) == 6 and len({o.prompt for o in outs[:3]}) == 1 and outs[0].prompt != outs[3].prompt
    assert outs[0].prompt == decode(outs[0].prompt_token_ids, skip_special_tokens=False)
    assert len(checked) == 2  # one a conversation, were 6
    assert decoded.count(prompt_len) == 1  # the rendered prompt decoded once for its 3 outputs, was 3 times


def test_the_servers_engine_thread_takes_prompts_checked(tiny_llama, monkeypatch):
    """The server checked a request's ids in a worker thread, then the engine thread checked them again for each
    candidate: 64 whole-context prompts are 524,288 ids a pass, every stream waiting. Now once, off the engine
    thread; and the vocabulary's rule has one home, the engine's (the server checked a prompt's ids itself, then
    the engine again: a text's ids three times, by encode_prompt, the server and check_ids)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lserve_lite.serve.app import create_app

    engine = LLMEngine(str(tiny_llama), "cpu", EngineConfig(num_kv_pages=32, max_model_len=128))
    # every check of a prompt's ids against the vocabulary: encode_prompt's (a text's) and vocab_ids (given ids)
    checked = _counted(monkeypatch, engine, "vocab_ids")
    encoded = _counted(monkeypatch, engine, "encode_prompt")
    with TestClient(create_app(engine, served_model_name="tiny")) as c:
        for body, prompts in (
            ({"prompt": [[5, 6, 7], [8, 9]]}, 2),
            ({"prompt": "hello world"}, 1),
            ({"messages": MSGS}, 1),
        ):
            checked.clear(), encoded.clear()
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = c.post(path, json=body | {"n": 3, "max_tokens": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 3 * prompts, r.text
            # were 3 a prompt, on the engine thread; then 2 a text
            assert len(checked) + len(encoded) == prompts and "lserve-engine" not in checked + encoded, (
                checked,
                encoded,
            )
        for body in ({"prompt": "hello world"}, {"messages": MSGS}):
            checked.clear(), encoded.clear()
            r = c.post("/tokenize", json=body)
            assert r.status_code == 200 and len(checked) + len(encoded) == 1, (r.text, checked, encoded)
        r = c.post("/v1/completions", json={"prompt": [5, 10**6], "max_tokens": 2})
        assert r.status_code == 400, r.text
        # the engine's message
        assert r.json()["error"]["message"] == "prompt token ids must be in [0, 320), got 1000000"
