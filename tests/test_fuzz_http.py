"""Fuzzing the HTTP protocol layer: random, malformed and hostile bodies for the generation endpoints.

Every answer must be a 200 with a valid completion (or a valid SSE stream) or a 4xx OpenAI-style error,
never a 500 and never a hang (each request has a client timeout). The server is a real uvicorn on
127.0.0.1 in this process, over a tiny random model with a 64-token context so that every accepted
request ends quickly. LSERVE_FUZZ_EXAMPLES sets the examples per endpoint (default 120, about 5 s each
here); with it set, the run is also randomized (new cases on every run).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from lserve_lite import EngineConfig  # noqa: E402
from lserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from lserve_lite.serve.app import ServerThread, create_app  # noqa: E402

EXAMPLES = int(os.environ.get("LSERVE_FUZZ_EXAMPLES", "120"))
LONG_RUN = "LSERVE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
REASONS = {"stop", "length"}

# -- strategies ------------------------------------------------------------------------------------------
any_char = st.characters(exclude_categories=())  # includes lone surrogates and control characters
texts = st.text(any_char, max_size=40) | st.sampled_from(
    ["", "hello", "the quick brown fox", "\ud800", "é😀"]
)
numbers = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, -1, 2**63, 10**40, 1e308, -0.0, 5e-324, 0.5])
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4), max_leaves=12
)
token_ids = st.lists(st.integers(-5, 400) | st.booleans() | st.sampled_from([10**20, 1.0]), max_size=8)
prompts = texts | st.lists(texts, max_size=2) | token_ids | st.lists(token_ids, max_size=2) | json_values
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", 1]), "text": texts | json_values}
)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "role": st.sampled_from(
                    ["system", "developer", "user", "assistant", "tool", "wizard", None, 1]
                ),
                "content": texts | st.none() | st.lists(parts, max_size=2) | json_values,
            },
        ),
        max_size=3,
    )
    | json_values
)


clean_texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
VALID = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(0, 400), "seed": st.integers(0, 2**64 - 1),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.lists(clean_texts, max_size=4) | clean_texts, "stop_token_ids": st.lists(st.integers(0, 400), max_size=4),
    "ignore_eos": st.booleans(), "repetition_penalty": st.floats(0.5, 2), "n": st.integers(1, 3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 319).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]), "min_tokens": st.integers(0, 8),
}  # fmt: skip
VALID_MAIN = {
    "prompt": clean_texts | st.lists(st.integers(0, 319), min_size=1, max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": clean_texts}
        ),
        min_size=1,
        max_size=2,
    ),
}


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(valid, valid, json_values)


COMMON = {
    "model": field(st.sampled_from(["tiny", "other"])),
    "max_tokens": field(st.integers(-2, 70)),
    "temperature": field(st.floats(0, 3) | st.just(0)),
    "top_p": field(st.floats(0, 1.5)),
    "top_k": field(st.integers(-1, 400)),
    "n": field(st.integers(0, 3)),
    "seed": field(st.integers(-1, 2**64)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "stop": field(st.lists(texts, max_size=20) | texts),
    "stop_token_ids": field(st.lists(st.integers(-1, 400), max_size=4)),
    "ignore_eos": field(st.booleans()),
    "repetition_penalty": field(st.floats(0, 3)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "logit_bias": field(
        st.dictionaries(st.integers(-1, 400).map(str) | texts, st.floats(-200, 200), max_size=3)
    ),
    "logprobs": field(st.integers(-1, 21) | st.booleans()),
    "top_logprobs": field(st.integers(-1, 21)),
    "echo": field(st.booleans()),
    "min_tokens": field(st.integers(-1, 10)),
    "response_format": field(
        st.sampled_from(
            [
                {"type": "json_object"},
                {"type": "text"},
                {"type": "json_schema"},
                {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
                {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
            ]
        )  # fmt: skip
    ),
}


def bodies(main: str, main_values: st.SearchStrategy) -> st.SearchStrategy:
    """A JSON object with the endpoint's main field (usually), some common fields and stray keys."""
    objs = st.fixed_dictionaries({}, optional={main: main_values, **COMMON}) | st.fixed_dictionaries(
        {main: main_values, "max_tokens": st.integers(1, 8)},
        optional={k: v for k, v in COMMON.items() if k != "max_tokens"},
    )
    stray = st.dictionaries(texts, json_values, max_size=2)
    valid = st.fixed_dictionaries({main: VALID_MAIN[main]}, optional=VALID)
    return st.one_of(st.tuples(objs, stray).map(lambda t: t[1] | t[0]), valid)


def raw(objs: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes on the wire: the JSON (most often), cut or spliced, or arbitrary bytes, or deep nesting."""
    enc = objs.map(lambda o: json.dumps(o).encode())
    cut = st.tuples(enc, st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    splice = st.tuples(enc, st.integers(0, 200), st.binary(max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    )
    deep = st.tuples(st.integers(30, 120_000), st.sampled_from(["[", '{"a":'])).map(
        lambda t: (t[1] * t[0]).encode()
    )
    return st.one_of(enc, enc, enc, cut, splice, st.binary(max_size=64), deep)


# -- the server and the checks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_llama):
    engine = LLMEngine(
        str(tiny_llama), "cpu", EngineConfig(num_kv_pages=16, max_model_len=64, max_num_seqs=8)
    )
    with ServerThread(create_app(engine, served_model_name="tiny", max_body_bytes=1 << 20)) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def check_ok(r: httpx.Response, chat: bool) -> None:
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("error" not in c for c in chunks), r.text
        finals: dict[int, str | None] = {}
        for choice in (ch for c in chunks for ch in c["choices"]):
            assert finals.get(choice["index"]) is None, r.text  # nothing after a choice's finish reason
            finals[choice["index"]] = choice["finish_reason"]
        assert finals and all(f in REASONS for f in finals.values()), r.text
        return
    body = r.json()
    for choice in body["choices"]:
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str) and choice["finish_reason"] in REASONS
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 0


def check(r: httpx.Response, chat: bool) -> None:
    event(f"HTTP {r.status_code}")
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text)
    if r.status_code == 200:
        check_ok(r, chat)
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert err["type"] == ("not_found_error" if r.status_code == 404 else "invalid_request_error")
    assert "Traceback" not in err["message"]


def post(client: httpx.Client, chat: bool, content: bytes) -> httpx.Response:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return client.post(path, content=content, headers={"content-type": "application/json"})


@FUZZ
@given(content=raw(bodies("prompt", prompts)))
def test_fuzz_completions(server, content):
    check(post(server, False, content), chat=False)


@FUZZ
@given(content=raw(bodies("messages", messages)))
def test_fuzz_chat(server, content):
    check(post(server, True, content), chat=True)


# the Responses API: input items, its fields and the ones it refuses
response_items = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", None, 1]),
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", None]),
            "content": texts | st.lists(st.fixed_dictionaries(
                {"type": st.sampled_from(["input_text", "output_text", "input_image", 1]), "text": texts | json_values}
            ), max_size=2) | json_values,
            "call_id": texts | json_values, "name": texts, "arguments": texts | json_values,
            "output": texts | json_values,
        },
    ),
    max_size=3,
) | texts | json_values  # fmt: skip
RESPONSES = {
    "model": field(st.sampled_from(["tiny", "other"])), "max_output_tokens": field(st.integers(-2, 70)),
    "temperature": field(st.floats(0, 3)), "top_p": field(st.floats(0, 1.5)), "stream": field(st.booleans()),
    "instructions": field(texts), "user": field(texts), "store": field(st.booleans()),
    "metadata": field(st.dictionaries(texts, texts, max_size=3)),
    "tools": field(st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search", 1]),
                                                   "name": texts, "parameters": json_values}), max_size=2)),
    "tool_choice": field(st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}])),
    "parallel_tool_calls": field(st.booleans()),
    "text": field(st.fixed_dictionaries({}, optional={"format": field(st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "name": "a", "schema": {"type": "object"}},
         {"type": "json_schema"}, {"type": "nope"}])), "verbosity": field(st.sampled_from(["low", "medium"]))})),
    "background": field(st.booleans()), "previous_response_id": field(texts), "reasoning": json_values,
    "include": field(st.lists(texts, max_size=2)), "truncation": field(st.sampled_from(["auto", "disabled"])),
}  # fmt: skip
VALID_RESPONSES = {"max_output_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "stream": st.booleans(),
                   "instructions": clean_texts, "text": st.just({"format": {"type": "json_object"}})}  # fmt: skip


def response_bodies() -> st.SearchStrategy:
    """Responses API bodies: any of its fields (mostly plausible values) with stray keys, or valid ones."""
    objs = st.fixed_dictionaries({}, optional={"input": response_items, **RESPONSES})
    stray = st.dictionaries(texts, json_values, max_size=2)
    valid = st.fixed_dictionaries({"input": clean_texts | VALID_MAIN["messages"]}, optional=VALID_RESPONSES)
    return st.one_of(st.tuples(objs, stray).map(lambda t: t[1] | t[0]), valid)


def check_response(r: httpx.Response) -> None:
    """A response object, or its event stream (numbered from 0, ending completed or incomplete), or a 4xx error."""
    if r.status_code != 200:
        check(r, chat=True)
        return
    event("HTTP 200")
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(e.partition("data: ")[2]) for e in r.text.split("\n\n") if e]
        assert [e["sequence_number"] for e in events] == list(range(len(events))), r.text
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), r.text
        body = events[-1]["response"]
    else:
        body = r.json()
    assert body["object"] == "response" and body["status"] in ("completed", "incomplete") and body["output"]
    u = body["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"] and u["input_tokens"] > 0


@FUZZ
@given(content=raw(response_bodies()))
def test_fuzz_responses(server, content):
    check_response(
        server.post("/v1/responses", content=content, headers={"content-type": "application/json"})
    )


def test_after_fuzzing_nothing_is_held(server):
    """Runs after the fuzzers (file order): no page in use, no request in flight, still serving."""
    text = server.get("/metrics").text
    m = {k: float(v) for k, v in re.findall(r"^(lserve_\w+) (\S+)$", text, re.M)}
    assert m["lserve_kv_pages_used"] == 0 and m["lserve_requests_in_flight"] == 0
    r = post(server, False, b'{"prompt": "hello", "max_tokens": 2, "temperature": 0}')
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
