"""The request edge, in-process: strict JSON types, size and depth limits, bad Unicode, stop-string limits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lserve_lite import EngineConfig, InvalidRequestError, SamplingParams  # noqa: E402
from lserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from lserve_lite.engine.scheduler import SchedulerStalled  # noqa: E402
from lserve_lite.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, logit_bias_ids  # noqa: E402
from lserve_lite.serve.app import create_app  # noqa: E402
from lserve_lite.serve.protocol import MAX_CHOICES  # noqa: E402
from lserve_lite.tokenizer import Tokenizer  # noqa: E402

CFG = dict(num_kv_pages=32, max_model_len=128, max_num_seqs=8)
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tiny_llama):
    engine = LLMEngine(str(tiny_llama), "cpu", EngineConfig(**CFG))
    with TestClient(
        create_app(engine, served_model_name="tiny", max_body_bytes=300_000, max_prompt_chars=200)
    ) as c:
        yield c


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    return err


def post(c: TestClient, body: dict | str | bytes, chat: bool = False):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if isinstance(body, dict):
        return c.post(path, json=body)
    return c.post(path, content=body if isinstance(body, bytes) else body.encode())


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", True), ("max_tokens", 2.5), ("max_tokens", "4"), ("temperature", "0"),
        ("temperature", True), ("top_p", False), ("top_k", True), ("seed", 1.5), ("seed", 2**64),
        ("stream", "yes"), ("stream", 1), ("ignore_eos", 1), ("stop", [1]), ("stop", [True]),
        ("stop_token_ids", [True]), ("stop_token_ids", "2"), ("n", True), ("model", 5),
        ("stream_options", {"include_usage": "yes"}), ("repetition_penalty", "1"),
    ],
)  # fmt: skip
def test_strict_types(client, field, value):
    for chat in (False, True):
        body = {"max_tokens": 2} | ({"messages": MSGS} if chat else {"prompt": "hi"}) | {field: value}
        assert error(post(client, body, chat))["param"] == field


def test_integer_parameters_take_whole_floats_as_vllm_does(client):
    """`max_tokens: 2.0` was refused; vLLM (pydantic's lax mode) takes a whole float for every integer parameter.
    So does this server, on both endpoints; a fraction, a boolean or a string is still refused naming the field."""
    whole = {"max_tokens": 2.0, "n": 2.0, "seed": 7.0, "top_k": -1.0, "min_tokens": 1.0, "best_of": 2.0}
    for base, ints, chat in (
        ({"prompt": "hi"}, whole | {"logprobs": 1.0}, False),
        (
            {"messages": MSGS, "logprobs": True},
            whole | {"top_logprobs": 2.0, "max_completion_tokens": 2.0},
            True,
        ),
    ):
        r = post(client, base | ints, chat)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == 2 and all(c["finish_reason"] == "length" for c in choices), choices
        for field in ints:
            for bad in (2.5, True, "2"):
                assert error(post(client, base | ints | {field: bad}, chat))["param"] == field, (field, bad)
    msg = error(post(client, {"prompt": "hi", "max_tokens": 2.5}))["message"]
    assert msg == "max_tokens: Input should be a valid integer, got a number with a fractional part", msg


@pytest.mark.parametrize(
    "prompt",
    [[True, False], [[True]], [1.0, 2.0], {"text": "hi"}, None, [["a"]], [[1], []], ["a", ""], [[1], "a"]],
)
def test_prompt_types(client, prompt):
    err = error(post(client, {"prompt": prompt, "max_tokens": 2}))
    assert err["param"] == "prompt"


def test_batch_prompts(client):
    """A list of prompts (strings or token-id lists) gets one choice per prompt, in order; at most 64 choices."""
    for prompt in ([[1], [2, 3]], ["a", "b"]):
        r = post(client, {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert "at most 64" in error(post(client, {"prompt": ["a"] * 33, "n": 2}))["message"]
    # an n out of its range is that, not "prompts x n" over the limit (param "prompt")
    for n in (17, 65, 10**30):
        err = error(post(client, {"prompt": "a", "max_tokens": 2, "n": n}))
        assert err["param"] == "n" and err["message"].startswith("n must be an integer in [1, 16]"), err


@pytest.mark.parametrize(
    "messages",
    [[{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
     [{"role": True, "content": "x"}], [{"content": "x"}], ["hi"], "hi", [{"role": "user", "content": [5]}]],
)  # fmt: skip
def test_message_types(client, messages):
    assert error(post(client, {"messages": messages, "max_tokens": 2}, chat=True))["param"] == "messages"


def test_a_nested_fields_error_names_its_path(client):
    """A bad value inside a message is named by its whole path, as OpenAI names it: the message said only
    'messages[1][0]: Input should be a valid string' for a tool call's arguments sent as an object."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    cases = [
        ([MSGS[0], {"role": "assistant", "content": None, "tool_calls": [call]}],
         "messages[1].tool_calls[0].function.arguments: Input should be a valid string"),
        ([{"role": "tool", "content": "x", "tool_call_id": 7}], "messages[0].tool_call_id: Input should be"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
         "messages[0].content: must be a string or a list of text parts"),
    ]  # fmt: skip
    for messages, start in cases:
        err = error(post(client, {"messages": messages, "max_tokens": 2}, chat=True))
        assert err["param"] == "messages" and err["message"].startswith(start), err
    # a logit_bias key named like a field of several types is a key: no hint of that field's types
    err = error(post(client, {"prompt": "hi", "logit_bias": {"stop": "x"}}))
    assert err["param"] == "logit_bias" and err["message"].startswith(
        "logit_bias.stop: Input should be a valid number"
    )
    for key in ("k" * 10_000, "1" * 10_000):  # a client's key is named in 40 characters at most
        assert len(error(post(client, {"prompt": "hi", "logit_bias": {key: "x"}}))["message"]) < 100


def test_error_messages_quote_a_clients_value_in_bounded_room(client):
    """A refusal quoted the client's value whole: a 3 MB model name or logit_bias key made a 3 MB error message
    (and as long an exception in the client's logs). A long message keeps its start and end, the middle cut."""
    r = post(client, {"model": "m" * 100_000, "prompt": "hi"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["type"] == "not_found_error", err
    assert len(err["message"]) <= 1000 and err["message"].endswith("(this server serves 'tiny')"), err
    assert err["message"].startswith("model 'mmm") and " characters) ... " in err["message"]
    err = error(post(client, {"prompt": "hi", "logit_bias": {"x" * 100_000: 1}}))
    assert len(err["message"]) <= 1000 and err["message"].startswith("logit_bias keys must be token ids")


def test_deep_nesting_and_bad_json(client):
    """Nesting past Python's recursion limit is a 400, not a RecursionError's 500; 100,000 levels are more arrays than
    a valid request holds, refused before parsing."""
    assert "JSON arrays and objects" in error(post(client, "[" * 100_000 + "]" * 100_000), 413)["message"]
    for depth in (5_000, 40):
        nest = "[" * depth + "]" * depth
        assert "nested deeper" in error(post(client, '{"prompt": ' + nest + "}"))["message"]
        assert (
            "nested deeper"
            in error(post(client, '{"messages": [{"content": ' + nest + "}]}", True))["message"]
        )
        error(post(client, nest))
    for body in ('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", '{"prompt": "hi", "temperature": NaN}',
                 '{"prompt": "hi", "top_p": Infinity}', "[1]", "3", "null", '{"prompt": "hi"', b"\xff\xfe"):  # fmt: skip
        assert "JSON" in error(post(client, body))["message"]


def test_surrogates_400(client):
    cases = [
        ('{"prompt": "a\\ud800b", "max_tokens": 2}', False, "prompt"),
        ('{"prompt": ["\\udfff"], "max_tokens": 2}', False, "prompt"),
        ('{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}', False, "stop"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', True, "messages"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', True, "messages"),
        ('{"model": "\\ud800", "prompt": "hi"}', False, "model"),
        ('{"\\ud800": 1, "prompt": "hi"}', False, None),
    ]  # fmt: skip
    for body, chat, param in cases:
        err = error(post(client, body, chat))
        assert err["param"] == param and "surrogate" in err["message"]
    r = post(client, '{"prompt": "\\ud83d\\ude00", "max_tokens": 2, "temperature": 0}')  # a valid pair
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_size_limits(client):
    assert error(post(client, {"prompt": "x" * 300_000}), 413)["code"] is None
    err = error(post(client, {"prompt": "x" * 201, "max_tokens": 2}))
    assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded") and "200" in err["message"]
    err = error(post(client, {"messages": [{"role": "user", "content": "y" * 150}] * 2}, chat=True))
    assert err["param"] == "messages"
    chunked = client.post("/v1/completions", content=iter([b'{"prompt": "', b"z" * 300_000, b'"}']))
    error(chunked, 413)  # no content-length: counted while read


def test_context_errors_carry_openais_sentence(client):
    """Every refusal of a prompt (or prompt + output) over the context says "this model's maximum context length
    is N tokens", as OpenAI's and vLLM's do: clients match that sentence, not the code (LiteLLM's
    ContextWindowExceededError, which its context-window fallbacks catch, read 'the context limit is' as a plain
    400)."""
    sentence = "this model's maximum context length is 128 tokens"
    for body in (
        {"prompt": "x" * 201},  # characters, before tokenizing
        {"prompt": [1] * 129},  # token ids, before validation
        {"prompt": [1] * 128, "max_tokens": 2},  # the whole context, nothing left to generate
        {"prompt": [1] * 100, "max_tokens": 50},  # prompt + max_tokens
    ):
        err = error(post(client, body))
        assert err["code"] == "context_length_exceeded" and sentence in err["message"].lower(), (body, err)
    err = error(post(client, {"messages": MSGS, "max_completion_tokens": 500}, chat=True))
    assert err["param"] == "max_completion_tokens" and sentence in err["message"].lower(), err


def test_prompt_size_before_validation(client):
    """Text parts, message counts and token-id lists are measured on the raw body, so an oversized prompt is
    refused before validation or tokenization costs time in its size; an assistant turn's null content is empty
    text."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 201}]}]
    assert error(post(client, {"messages": parts}, chat=True))["code"] == "context_length_exceeded"
    many = [{"role": "user", "content": ""}] * 13  # 13 x 16 characters of template text > 200
    assert error(post(client, {"messages": many}, chat=True))["code"] == "context_length_exceeded"
    for ids in ([1] * 128, [1.5] * 50_000):  # the context is 128 tokens; wrong types are not validated first
        err = error(post(client, {"prompt": ids, "max_tokens": 2}))
        assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded") and "128" in err[
            "message"
        ]
    assert "at most 64 prompts" in error(post(client, {"prompt": [[1]] * 65, "max_tokens": 2}))["message"]
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for field in ({"tool_call_id": "i" * 201}, {"role": "r" * 201}, {"tool_calls": [call] * 3}):
        # every field that can reach the template counts (tool_call_id did not: the template rendered it whole)
        msgs = [{"role": "tool", "content": "x"} | field]
        assert error(post(client, {"messages": msgs}, chat=True))["code"] == "context_length_exceeded", field
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []},
             {"role": "user", "content": "x"}]  # fmt: skip
    r = post(client, {"messages": turns, "max_tokens": 2, "temperature": 0}, chat=True)
    assert r.status_code == 200, r.text
    # only an assistant turn may leave its content out, as OpenAI's rule (a user turn without was taken as empty)
    for i, m in ((2, {"role": "user"}), (1, {"role": "tool", "content": None})):
        err = error(post(client, {"messages": turns[:i] + [m], "max_tokens": 2}, chat=True))
        assert err["param"] == "messages" and err["message"].startswith(f"messages[{i}].content: "), err


def test_stop_limits(client):
    ok = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    r = post(client, ok | {"stop": ["s" * MAX_STOP_CHARS] + ["x"] * (MAX_STOP_STRINGS - 1)})
    assert r.status_code == 200
    for stop in (["x"] * (MAX_STOP_STRINGS + 1), ["s" * (MAX_STOP_CHARS + 1)], [""], ["a", ""]):
        assert error(post(client, ok | {"stop": stop}))["param"] == "stop"
    assert error(post(client, ok | {"stop_token_ids": list(range(300))}))["param"] == "stop_token_ids"


def test_subnormal_temperature_is_greedy(client):
    """Dividing logits by 1e-30 overflows float32: such temperatures sample greedily, never NaN."""
    body = {"prompt": "the quick", "max_tokens": 8, "ignore_eos": True}
    texts = [post(client, body | {"temperature": t}).json()["choices"][0]["text"] for t in (0, 1e-30, 5e-324)]
    assert texts[0] == texts[1] == texts[2]


def test_huge_numbers(client):
    for field, value in (
        ("max_tokens", 10**30),
        ("top_k", 10**30),
        ("temperature", 1e308),
        ("seed", 2**64 - 1),
    ):
        r = post(client, {"prompt": "hi", "max_tokens": 2} | {field: value})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert error(r)["param"] == field
    for prompt in ([10**30], [-1], [], "", [[]]):
        assert error(post(client, {"prompt": prompt, "max_tokens": 2}))["param"] == "prompt"


def test_stalled_step_gives_503_then_recovers(client, monkeypatch):
    engine = client.app.state.engine.engine

    def stalled():
        raise SchedulerStalled("no sequence can be scheduled: test")

    with monkeypatch.context() as mp:
        mp.setattr(engine, "step", stalled)
        r = post(client, {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["message"] == "no sequence can be scheduled: test"
    assert post(client, {"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert engine.blocks.num_used == 0


def test_a_streams_error_event_is_counted(client, monkeypatch):
    """A stream that failed after its 200 (a failed engine step: an error event, then [DONE]) was missing from
    /metrics' request_errors_total, which counted the same failure unstreamed: error-rate alerts missed every
    streaming client's. It is counted by its status."""

    def stalled():
        raise SchedulerStalled("no sequence can be scheduled: test")

    def errors_503() -> float:
        line = next(
            (x for x in client.get("/metrics").text.splitlines() if 'errors_total{status="503"}' in x), ""
        )
        return float(line.split()[-1]) if line else 0.0

    before = errors_503()
    with monkeypatch.context() as mp:
        mp.setattr(client.app.state.engine.engine, "step", stalled)
        r = post(client, {"prompt": "hi", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and '"message": "no sequence can be scheduled: test"' in r.text, r.text
    assert r.text.endswith("data: [DONE]\n\n") and errors_503() == before + 1


def test_sampling_params_limits():
    with pytest.raises(InvalidRequestError, match="at most 16"):
        SamplingParams(stop=["a"] * 17)
    with pytest.raises(InvalidRequestError, match="at most 256"):
        SamplingParams(stop=["a" * 257])
    for kw in (dict(max_new_tokens=True), dict(top_k=False), dict(seed=True), dict(ignore_eos=1),
               dict(stop_token_ids=[True]), dict(stop=5), dict(stop_token_ids=list(range(257)))):  # fmt: skip
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kw)
    assert SamplingParams(stop=("a", "b"), stop_token_ids=[3]).stop == ("a", "b")
    assert SamplingParams(temperature=5e-324).greedy and not SamplingParams(temperature=1e-4).greedy
    assert json.dumps(SamplingParams(stop="x").stop) == '["x"]'


def test_list_limits_are_checked_before_their_items():
    """A list's length is checked before each item: 2.7 million stop_token_ids (an 8 MiB body) were typed one by one
    first, 0.9 s on the server's event loop for a request refused anyway. An item of the wrong type past the limit
    is never looked at: the refusal is the count's."""
    cases = [
        (dict(stop=["a"] * MAX_STOP_STRINGS + [5]), "stop has 17 strings"),
        (dict(stop_token_ids=[1] * 256 + ["x"]), "stop_token_ids has 257 ids"),
    ]
    for kw, msg in cases:
        with pytest.raises(InvalidRequestError, match=msg):
            SamplingParams(**kw)
    with pytest.raises(InvalidRequestError, match="at most 1024 token ids"):
        logit_bias_ids({"x": 1.0} | {str(i): 1.0 for i in range(1024)})


def test_logit_bias_keys_naming_one_id_twice_are_refused(client):
    """Keys "42" and "042" name one token id: a dict would keep one bias silently, so the request is a 400."""
    for chat in (False, True):
        body = {"max_tokens": 2} | ({"messages": MSGS} if chat else {"prompt": "hi"})
        err = error(post(client, body | {"logit_bias": {"42": 100, "042": -100}}, chat))
        assert err["param"] == "logit_bias" and "'42' and '042' name the same token id 42" in err["message"]
        assert post(client, body | {"logit_bias": {"042": 1, "43": 1}}, chat).status_code == 200
    with pytest.raises(InvalidRequestError, match="same token id 7"):
        logit_bias_ids({"0007": 1.0, "7": 2.0})
    assert logit_bias_ids({"07": 1.0, "8": -2.0}) == {7: 1.0, 8: -2.0}


def test_max_completion_tokens_on_completions_is_refused_not_ignored(client):
    """Chat's max_completion_tokens on /v1/completions was ignored (vLLM's way): the reply ran to max_tokens'
    default instead of the limit asked for. OpenAI's completions refuse it, and so does this server."""
    err = error(post(client, {"prompt": "hi", "max_completion_tokens": 3}))
    assert err["param"] == "max_completion_tokens" and "send max_tokens" in err["message"]
    assert post(client, {"prompt": "hi", "max_completion_tokens": None, "max_tokens": 1}).status_code == 200
    r = post(client, {"messages": MSGS, "max_completion_tokens": 3, "ignore_eos": True}, chat=True)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_min_tokens_holds_off_eos_on_both_endpoints(client, tiny_llama):
    """vLLM's min_tokens (a 400 before): EOS, biased to come first, ends the reply only after that many tokens;
    over max_tokens it is a 400 naming it."""
    eos = json.loads((tiny_llama / "config.json").read_text())["eos_token_id"]
    for chat in (False, True):
        body = {"max_tokens": 6} | ({"messages": MSGS} if chat else {"prompt": "hi"})
        first = post(client, body | {"logit_bias": {str(eos): 100}}, chat).json()
        assert first["usage"]["completion_tokens"] == 1
        held = post(client, body | {"logit_bias": {str(eos): 100}, "min_tokens": 3}, chat).json()
        assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"
        err = error(post(client, body | {"min_tokens": 7}, chat))
        assert err["param"] == "min_tokens" and "max_tokens (6)" in err["message"]
    # echo's scoring (max_tokens 0) generates nothing: min_tokens 1 was taken, 2 refused over "max_tokens (1)"
    for m in (1, 2):
        err = error(
            post(client, {"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1, "min_tokens": m})
        )
        assert err["param"] == "min_tokens" and "max_tokens (0)" in err["message"]


def test_min_tokens_error_names_the_field_that_set_the_most(client):
    """Over max_completion_tokens (chat), min_tokens' 400 said "max_tokens (6)", a field the client did not send;
    with no maximum sent either, it named max_tokens for the context the prompt leaves."""
    err = error(post(client, {"messages": MSGS, "max_completion_tokens": 6, "min_tokens": 7}, chat=True))
    assert err["param"] == "min_tokens" and "max_completion_tokens (6)" in err["message"]
    assert "max_tokens" not in err["message"]
    for chat in (False, True):
        err = error(
            post(client, ({"messages": MSGS} if chat else {"prompt": "hi"}) | {"min_tokens": 500}, chat)
        )
        assert err["param"] == "min_tokens" and "the context the prompt leaves (" in err["message"]


@pytest.mark.parametrize(
    "chat,field,value",
    [
        (False, "top_logprobs", 3), (False, "tools", [{"type": "function", "function": {"name": "f"}}]),
        (False, "tool_choice", "required"), (False, "parallel_tool_calls", False), (False, "functions", [{"name": "f"}]),
        (False, "function_call", "auto"), (False, "continue_final_message", True), (False, "chat_template", "x"),
        (False, "chat_template_kwargs", {"a": 1}), (False, "messages", MSGS),
        (False, "add_generation_prompt", True), (False, "documents", [{"text": "x"}]),
        (True, "prompt", "hi"), (True, "suffix", "x"), (True, "best_of", 2),
    ],
)  # fmt: skip
def test_the_other_endpoints_fields_are_refused_not_ignored(client, chat: bool, field: str, value: object):
    """Chat's top_logprobs / tools / template fields on /v1/completions, and the completions' prompt / suffix /
    best_of on chat, were ignored: the reply lacked what the client asked for. Each is a 400 naming it; its off
    value (null, an empty tools list) is taken."""
    body = {"max_tokens": 2} | ({"messages": MSGS} if chat else {"prompt": "hi"})
    assert error(post(client, body | {field: value}, chat))["param"] == field
    off = [] if field == "tools" else None
    assert post(client, body | {field: off}, chat).status_code == 200


@pytest.mark.parametrize(
    "field,value,off",
    [
        ("length_penalty", 2.0, 1), ("structural_tag", "{}", None),
        ("guided_whitespace_pattern", " *", None), ("priority", 1, 0),
        ("kv_transfer_params", {"do_remote_prefill": True}, None), ("vllm_xargs", {"k": 1}, None),
        ("prompt_embeds", "AAAA", None), ("audio", {"voice": "alloy", "format": "wav"}, None),
        ("modalities", ["text", "audio"], ["text"]), ("web_search_options", {}, None),
    ],
)  # fmt: skip
def test_fields_that_would_change_the_reply_are_refused_not_ignored(
    client, field: str, value: object, off: object
):
    """vLLM's and OpenAI's request fields this server does not implement were dropped as unknown: a client that
    asked for audio or web search, a whitespace pattern, a priority or prompt embeddings got a reply without them
    (LLM's SamplingParams already refused length_penalty and spaces_between_special_tokens). Each is a 400 naming
    it, as vLLM refuses what it cannot do; its off value passes. (cache_salt, refused so until 2026-12-07, is
    taken: test_cache_salt.py.)"""
    for chat in (False, True):
        body = {"max_tokens": 2} | ({"messages": MSGS} if chat else {"prompt": "hi"})
        err = error(post(client, body | {field: value}, chat))
        assert err["param"] == field and err["message"].startswith(f"{field} is not supported ("), err
        assert post(client, body | {field: off}, chat).status_code == 200


@pytest.mark.parametrize("value", ["0", "high", 10**30, 0.5, True, [0]])
def test_a_priority_other_than_the_integer_0_is_refused(client, value: object):
    """vLLM's priority is an integer (0: its default, what first come, first served means); a string, a number past
    any integer type or a fraction is a 400 naming it, not taken as 0 nor a 500."""
    for chat in (False, True):
        body = {"max_tokens": 2} | ({"messages": MSGS} if chat else {"prompt": "hi"})
        err = error(post(client, body | {"priority": value}, chat))
        assert err["param"] == "priority" and err["message"].startswith("priority is not supported ("), err


def test_spaces_between_special_tokens_false_is_taken(client):
    """vLLM's spaces_between_special_tokens: false was a 400: the tokenizers library's byte-level and SentencePiece
    decoders put no space between special tokens' texts, so the reply is that of true (vLLM's fast detokenizer too).
    Not a boolean: a 400 naming it."""
    for chat in (False, True):
        body = {"max_tokens": 3, "temperature": 0, "skip_special_tokens": False}
        body |= {"messages": MSGS} if chat else {"prompt": "hi"}
        replies = [post(client, body | {"spaces_between_special_tokens": v}, chat) for v in (True, False)]
        assert [r.status_code for r in replies] == [200, 200]
        texts = [r.json()["choices"][0]["message" if chat else "text"] for r in replies]
        assert texts[0] == texts[1]
        assert error(post(client, body | {"spaces_between_special_tokens": "x"}, chat))["param"] == (
            "spaces_between_special_tokens"
        )


def test_client_compat_fields(client):
    """vLLM's top_k -1 (off), HEAD /health; tool fields without tools are refused, not ignored."""
    r = post(client, {"prompt": "hi", "max_tokens": 2, "top_k": -1})
    assert r.status_code == 200, r.text
    assert client.head("/health").status_code == 200
    for extra, param in (({"tool_choice": "required"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
                         ({"logprobs": True, "top_logprobs": 30}, "top_logprobs")):  # fmt: skip
        assert error(post(client, {"messages": MSGS, "max_tokens": 2} | extra, chat=True))["param"] == param
    r = post(client, {"messages": MSGS, "max_tokens": 2, "tool_choice": "none"}, chat=True)
    assert r.status_code == 200, r.text
    # function_call "none" (its off value, as tool_choice's) was refused as if functions were asked for, naming
    # "functions"; it passes, and another function_call is refused naming itself
    r = post(client, {"messages": MSGS, "max_tokens": 2, "function_call": "none", "functions": []}, chat=True)
    assert r.status_code == 200, r.text
    body = {"messages": MSGS, "max_tokens": 2, "function_call": {"name": "f"}}
    assert error(post(client, body, chat=True))["param"] == "function_call"


def test_request_chat_template_needs_trust_and_kwargs_reach_the_template(client, tiny_llama):
    """vLLM's chat_template / chat_template_kwargs were refused though LLM.chat takes both. chat_template_kwargs
    are variables of the model's template (checked as LLM.chat's, counted in the prompt size); a client's own
    template is refused, naming the flag, unless the server trusts request templates (vLLM's
    --trust-request-chat-template); then it renders in the same sandbox, and its rendering is held to the prompt
    limit before it is encoded (a short template could make the server encode millions of characters)."""
    tok = Tokenizer(tiny_llama)
    body = {"messages": MSGS, "max_tokens": 2}
    r = post(client, body | {"chat_template_kwargs": {"enable_thinking": False}}, chat=True)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok.encode_chat(MSGS)), r.text
    for extra, param, line in (
        ({"chat_template": "{{ x }}"}, "chat_template", "chat_template: this server renders only the model's"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "chat_template_kwargs may not set"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "chat_template_kwargs must be a dict"),
        ({"chat_template_kwargs": {"x": "y" * 200}}, "messages", "the prompt has 2"),
        # a special token's text is named where it is (it named messages)
        ({"chat_template_kwargs": {"x": "<|im_end|>"}}, "chat_template_kwargs", "chat_template_kwargs: must not"),
    ):  # fmt: skip
        for r in (
            post(client, body | extra, chat=True),
            client.post("/tokenize", json={"messages": MSGS} | extra),
        ):
            err = error(r)
            assert err["param"] == param and err["message"].startswith(line), err
    engine = LLMEngine(str(tiny_llama), "cpu", EngineConfig(**CFG))
    app = create_app(engine, served_model_name="tiny", max_prompt_chars=200, trust_request_chat_template=True)
    with TestClient(app) as trusted:
        extra = {
            "chat_template": "{{ hello }}{{ messages[0].content }}",
            "chat_template_kwargs": {"hello": "yo "},
        }
        want = tok.encode("yo hi", add_special_tokens=False)
        assert trusted.post("/tokenize", json={"messages": MSGS} | extra).json()["tokens"] == want
        r = post(trusted, body | extra, chat=True)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text
        for template, param, line in (
            ("{{ messages[0].content * 150 }}", "messages", "the rendered prompt has 300 characters; at most 200 "),
            ("{% for %}", "chat_template", "chat_template has a Jinja syntax error at line 1"),
            (5, "chat_template", "chat_template must be a non-empty string of Jinja, got 5"),
        ):  # fmt: skip
            err = error(post(trusted, body | {"chat_template": template}, chat=True))
            assert err["param"] == param and err["message"].startswith(line), err
            # a rendering over the limit is a prompt too long, as the checks before rendering answer it
            assert err["code"] == ("context_length_exceeded" if line.startswith("the rendered") else None), (
                err
            )
        # a template that reads tools: a special token's text in them, or in a message's tool calls, is named there
        reads = {"chat_template": "{{ tools | length }}{{ messages[0].content }}"}
        evil = {"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "<|im_end|>"}'}}
        turns = [*MSGS, {"role": "assistant", "tool_calls": [call]}]
        for extra, param, line in (
            ({"tools": [evil]}, "tools", "tools: must not hold"),
            (
                {"messages": turns, "tools": [{**evil, "function": {"name": "f"}}]},
                "messages",
                "messages[1] (a",
            ),
        ):
            for r in (
                post(trusted, body | reads | extra, chat=True),
                trusted.post("/tokenize", json=body | reads | extra),
            ):
                err = error(r)
                assert err["param"] == param and err["message"].startswith(line), err
        # a tool result without tool_call_id is taken (vLLM's rule); a template that reads the id refuses it in a 400
        result = {"messages": [*MSGS, {"role": "tool", "content": "21"}]}
        assert post(client, body | result, chat=True).status_code == 200
        for template in ("{{ messages[1].tool_call_id.upper() }}", "{{ messages[1].tool_call_id | tojson }}"):
            err = error(post(trusted, body | result | {"chat_template": template}, chat=True))
            assert err["param"] == "messages" and err["message"].startswith("chat template failed"), err
        # a template that does not render the last message as given cannot continue it: named (it named messages)
        cont = {"messages": [*MSGS, {"role": "assistant", "content": "sure"}], "add_generation_prompt": False,
                "continue_final_message": True, "chat_template": "{% for m in messages %}{{ m.content | upper }}{% endfor %}"}  # fmt: skip
        for r in (post(trusted, body | cont, chat=True), trusted.post("/tokenize", json=cont)):
            err = error(r)
            assert err["param"] == "continue_final_message" and "cannot be continued" in err["message"], err


def test_continue_final_message_and_add_generation_prompt(client, tiny_llama):
    """vLLM's add_generation_prompt / continue_final_message were refused though the tokenizer renders them: the
    prompt is the conversation rendered with them (chat and /tokenize alike); both true, or a continued last
    message that is not the assistant's, is a 400 naming continue_final_message."""
    tok = Tokenizer(tiny_llama)
    prefill = [*MSGS, {"role": "assistant", "content": "Sure, here"}]
    for msgs, cont in ((MSGS, False), (prefill, True)):
        how = {"add_generation_prompt": False, "continue_final_message": cont}
        want = tok.encode_chat(msgs, None, False, cont)
        assert want != tok.encode_chat(msgs)
        assert client.post("/tokenize", json={"messages": msgs} | how).json()["tokens"] == want
        r = post(client, {"messages": msgs, "max_tokens": 2} | how, chat=True)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text
    for msgs, how in ((prefill, {"continue_final_message": True}),
                      (prefill, {"add_generation_prompt": True, "continue_final_message": True}),
                      (MSGS, {"add_generation_prompt": False, "continue_final_message": True})):  # fmt: skip
        for r in (post(client, {"messages": msgs, "max_tokens": 2} | how, chat=True),
                  client.post("/tokenize", json={"messages": msgs} | how)):  # fmt: skip
            assert error(r)["param"] == "continue_final_message", r.text


def test_stream_options_without_stream_is_refused(client):
    """stream_options with stream false (or left out) was accepted and ignored; OpenAI and vLLM refuse it: a 400
    naming stream_options on both endpoints, and with stream true it passes."""
    for chat, main in ((False, {"prompt": "hi"}), (True, {"messages": MSGS})):
        for stream in ({}, {"stream": False}, {"stream": None}):
            body = main | {"max_tokens": 2, "stream_options": {"include_usage": True}} | stream
            err = error(post(client, body, chat))
            assert err["param"] == "stream_options" and err["message"] == (
                "stream_options is only allowed when stream is true"
            )
        body = main | {"max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
        r = post(client, body, chat)
        assert r.status_code == 200 and '"usage": {"prompt_tokens"' in r.text, r.text


def test_wrong_method_405_names_the_allowed_ones(client):
    """A 405 (GET on a POST route) came back without the Allow header RFC 9110 requires of it: the error handler
    rebuilt Starlette's HTTP errors without their headers. It keeps them, in the OpenAI error shape."""
    for path, allowed in (
        ("/v1/chat/completions", "POST"),
        ("/v1/completions", "POST"),
        ("/v1/models", "GET"),
    ):
        r = client.request("DELETE" if allowed == "GET" else "GET", path)
        assert r.status_code == 405 and r.headers.get("allow") == allowed, (path, r.headers)
        assert r.json()["error"]["message"] == "Method Not Allowed"


def test_wide_bodies_are_checked_without_a_walk_over_every_value(client, monkeypatch):
    """decode walked every value of a body (a tuple on its stack each) on the event loop: an 8 MiB prompt of token
    ids held every stream for ~1.5 s and the walk's stack took 40x the body's size. Only containers are walked,
    strings only checked where a \\uD8xx-style escape could have made a surrogate, and decode runs in a worker
    thread; raw surrogate bytes (which json.loads let through) are malformed UTF-8."""
    import asyncio
    import tracemalloc

    from lserve_lite.serve import app as app_module
    from lserve_lite.serve.protocol import decode

    raw = (
        b'{"prompt": ['
        + b",".join([b"0"] * 1_000_000)
        + b'], "stop": ['
        + b",".join([b'"ab"'] * 200_000)
        + b"]}"
    )
    tracemalloc.start()
    try:
        decode(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(raw), peak  # the parsed body itself is ~10x the text; the walk took 40x more
    on_loop = []

    def watched(body: bytes) -> dict:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return decode(body)

    monkeypatch.setattr(app_module, "decode", watched)
    assert post(client, {"prompt": "hi", "max_tokens": 1}).status_code == 200 and on_loop == [False]
    err = error(post(client, b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 1}'))
    assert err["message"].startswith("malformed JSON body: 'utf-8' codec can't decode byte 0xed"), err


def test_prompt_sizes_and_detokenize_run_off_the_event_loop(client, monkeypatch):
    """The prompt-size check walks every message of a body (460,000 in 8 MiB: 0.5 s) and ran on the event loop,
    stalling every stream: it runs in a worker thread, as decode, on both endpoints and /tokenize; so does
    /detokenize's check and decode of up to 2 million ids (0.46 s), and /tokenize's token strings."""
    import asyncio

    from lserve_lite.serve import app as app_module
    from lserve_lite.serve.protocol import prompt_size

    on_loop = []

    def record() -> None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)

    def watched(body: dict, chat: bool) -> tuple[int, int, int]:
        record()
        return prompt_size(body, chat)

    tok = client.app.state.engine.engine.tokenizer
    decode = tok.decode

    def watched_decode(ids: list[int], *args: object) -> str:
        record()
        return decode(ids, *args)

    monkeypatch.setattr(app_module, "prompt_size", watched)
    assert post(client, {"prompt": "hi", "max_tokens": 1}).status_code == 200
    assert post(client, {"messages": MSGS, "max_tokens": 1}, chat=True).status_code == 200
    assert client.post("/tokenize", json={"messages": MSGS}).status_code == 200
    monkeypatch.setattr(tok, "decode", watched_decode)
    assert client.post("/detokenize", json={"tokens": [5, 6]}).json() == {"prompt": decode([5, 6], False)}
    pieces = tok.pieces

    def watched_pieces(ids: list[int]) -> list[str | None]:
        record()
        return pieces(ids)

    monkeypatch.setattr(tok, "pieces", watched_pieces)  # /tokenize's token_strs: 0.3 s for a million ids
    assert client.post("/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()["token_strs"]
    assert on_loop == [False, False, False, False, False, False]


def test_a_body_of_more_json_values_than_a_valid_request_holds_is_413_before_parsing(client):
    """Parsing a body holds the GIL: 2.7M empty lists (8 MiB) stalled every stream 2 s before their 400. A body of
    more JSON values, containers or object members than a valid request to this engine holds (from its context and
    prompt limit) is refused by a count of its bytes, never parsed; the largest valid bodies, for SmolLM2's
    8,192-token context, pass."""
    from lserve_lite.serve.protocol import body_limits, check_body_size, prompt_size

    limits = body_limits(128, 200)  # the client's engine: context 128, prompts of 200 characters
    for what, item in (
        ("JSON arrays and objects", b"[]"),
        ("JSON values", b"0"),
        ("JSON object members", b'":"'),  # counted in strings too (a string of colons, over the prompt limit)
    ):
        raw = b'{"prompt": "hi", "x": [' + b",".join([item] * limits[what]) + b"]}"
        err = error(post(client, raw), 413)
        assert err["message"].endswith(
            f"{what}; a valid request to this model holds at most {limits[what]}"
        ), err
    assert (
        post(client, {"prompt": [1] * 127, "max_tokens": 1}).status_code == 200
    )  # the whole context, as ids

    max_len, chars = 8192, 64 * 8192
    limits = body_limits(max_len, chars)
    extras = {"max_tokens": 1, "stop": ["s" * 256] * 16, "stop_token_ids": list(range(256)),
              "logit_bias": {str(i): 1 for i in range(1024)}}  # fmt: skip
    props = {f"p{i}": {"type": "object", "properties": {}} for i in range(chars // 100)}
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": props}}}
    ]
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "text", "text": "y"}]},
    ]
    for body in (
        {"prompt": [list(range(max_len - 1))] * MAX_CHOICES},  # the most prompts, each of the whole context
        {"prompt": "[{,:" * (chars // 4)},  # text of separators only, which count inside strings too
        {"messages": history * (chars // 2 // 60), "tools": tools},  # a long history with tools
    ):
        chat = "messages" in body
        assert prompt_size(body, chat)[0] <= chars and prompt_size(body, chat)[1] < max_len  # valid sizes
        check_body_size(json.dumps(body | extras).encode(), limits)
    # an empty text part is a container and two members and counted 0 characters: 200,000 of them (5 MB) were a
    # valid prompt size that the count refused with 413; each part is now counted in the prompt's size
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 200_000}]}
    assert prompt_size(parts, True)[0] > chars


def test_client_gone_mid_body_is_499_not_a_logged_500(client, caplog):
    """A client that went away while sending its body (a cancelled upload, a client-side timeout) made the server
    log two tracebacks and count a 500 in /metrics, as if it had failed: Starlette's ClientDisconnect reached the
    catch-all handler. It is nginx's 499 (client closed request), counted as such, with no traceback."""
    import anyio

    sent: list[dict] = []
    incoming = iter([{"type": "http.request", "body": b'{"prompt": "hel', "more_body": True},
                     {"type": "http.disconnect"}])  # fmt: skip

    async def receive() -> dict:
        return next(incoming)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    with caplog.at_level("ERROR"):
        anyio.run(client.app, scope, receive, send)
    assert sent[0]["status"] == 499 and not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert 'lserve_request_errors_total{status="499"} 1' in client.get("/metrics").text


@pytest.mark.parametrize(
    "host, want",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
     ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_binds_need_no_api_key_warning(host, want):
    """The serve command warns about a bind without --api-key unless it is loopback: every 127/8 address, ::1 and
    an IPv4-mapped loopback address are (127.0.0.2 warned before), the unspecified address and names are not."""
    from lserve_lite.serve import loopback

    assert loopback(host) is want
