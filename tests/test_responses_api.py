"""OpenAI's Responses API (POST /v1/responses): a request mapped onto the chat completions path (input items,
instructions, tools, text.format), what is not supported refused in one line, and the real `openai` client's
responses.create / responses.stream against a tiny random model (constrained decoding makes forced calls and
JSON valid whatever the model)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from lserve_lite.serve.protocol import ApiError
from lserve_lite.serve.responses import sse
from lserve_lite.serve.responses_api import chat_body, renamed, response_events, shell

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
DIGIT = {"format": {"type": "json_schema", "name": "D", "strict": True, "schema": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
    "additionalProperties": False}}}  # fmt: skip


# -- the request mapped onto chat completions -------------------------------------------------------------
def test_a_string_input_and_instructions_are_a_system_and_a_user_message():
    chat = chat_body({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 7,
                      "temperature": 0.5, "top_p": 0.9, "user": "u", "metadata": {"k": "v"}, "store": True})  # fmt: skip
    assert chat == {"model": "m", "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 7,
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}  # fmt: skip


def test_input_items_become_messages_tool_calls_and_tool_results():
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me see", "annotations": []}],
        },  # fmt: skip
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "21"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "3"}]},
    ]
    msgs = chat_body({"input": items})["messages"]
    call = lambda i, city: {"id": i, "type": "function",  # noqa: E731
                            "function": {"name": "get_weather", "arguments": f'{{"city":"{city}"}}'}}  # fmt: skip
    assert msgs == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me see"}],
         "tool_calls": [call("c1", "Rome"), call("c2", "Oslo")]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "3"}]},
    ]  # fmt: skip
    calls_first = chat_body(
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}
    )
    assert calls_first["messages"][0]["role"] == "assistant" and calls_first["messages"][0]["content"] is None


def test_tools_tool_choice_and_text_format_in_chats_shape():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_body({"input": "x", "tools": [{k: v for k, v in WEATHER.items() if k != "strict"}],
                      "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
                      "text": {"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
                      "stream": True})  # fmt: skip
    fn = chat["tools"][0]["function"]
    assert chat["tools"][0]["type"] == "function" and fn["name"] == "get_weather"
    assert fn["strict"] is True  # the Responses API's default
    assert fn["parameters"] == WEATHER["parameters"] and fn["description"] == WEATHER["description"]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False and chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}  # response.completed carries the usage
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "A", "schema": schema, "strict": True}}  # fmt: skip
    assert chat_body({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"
    }
    assert chat_body({"input": "x", "tool_choice": "required"})["tool_choice"] == "required"


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "nothing is stored"),
        ({"conversation": "conv_1"}, "conversation", "nothing is stored"),
        ({"background": True}, "background", "background is not supported"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning is not supported"),
        ({"include": ["message.output_text.logprobs"]}, "include", "include is not supported"),
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs is not supported"),
        ({"truncation": "auto"}, "truncation", "truncation: only 'disabled'"),
        (
            {"tools": [{"type": "web_search"}]},
            "tools",
            "tools[0]: tools of type 'web_search' are not supported",
        ),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools", "type 'file_search'"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "tool_choice: must be"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "input[0]: items of type 'reasoning'"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input",
            "input[0].content[0]: parts of type 'input_image' are not supported",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input", "input[0].role: must be one of"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input", "input[0]: a function_call has"),
        ({"input": 3}, "input", "input: must be a string or a list"),
        ({"metadata": {"k": 1}}, "metadata", "metadata: keys of at most"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16 pairs"),
        ({"store": "yes"}, "store", "store: must be a boolean"),
        ({"instructions": ["x"]}, "instructions", "instructions: must be a string"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "text.verbosity is not supported"),
    ],
)
def test_what_is_not_supported_is_refused_in_one_line(extra, param, words):
    with pytest.raises(ApiError) as e:
        chat_body({"input": "x"} | extra)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    assert "\n" not in e.value.message


def test_what_is_off_is_accepted():
    off = {"background": False, "reasoning": None, "include": [], "top_logprobs": 0, "truncation": "disabled",
           "previous_response_id": None, "store": False, "text": {"format": {"type": "text"}, "verbosity": "medium"}}  # fmt: skip
    assert chat_body({"input": "x"} | off)["messages"] == [{"role": "user", "content": "x"}]


def test_chat_errors_are_named_as_the_responses_request_names_its_fields():
    e = renamed(ApiError(400, "max_completion_tokens must be at least 1 for chat completions, got 0",
                         "max_completion_tokens"))  # fmt: skip
    assert (e.param, e.message) == (
        "max_output_tokens",
        "max_output_tokens must be at least 1 for chat completions, got 0",
    )
    e = renamed(ApiError(400, "messages[2].content: must be a string or a list of text parts", "messages"))
    assert (e.param, e.message) == ("input", "input.content: must be a string or a list of text parts")
    e = renamed(ApiError(400, "tools[1].function.parameters: must be a JSON schema object", "tools"))
    assert e.message == "tools[1].parameters: must be a JSON schema object"
    assert renamed(ApiError(400, "response_format: bad", "response_format")).param == "text.format"


# -- a live server and the openai client ----------------------------------------------------------------
CFG = dict(
    page_size=16, max_model_len=2048, num_kv_pages=512
)  # the tiny tokenizer spends ~700 tokens on tools


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The model of conftest's `server` (url, engine): tiny and random."""
    pytest.importorskip("llguidance")
    from tiny_models import make_tiny_numpy

    return make_tiny_numpy(tmp_path_factory.mktemp("tiny_responses"))


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=120)


def test_a_response_equals_the_chat_reply_of_the_same_conversation(client):
    r = client.responses.create(model="tiny", input="hello", instructions="be brief", max_output_tokens=8,
                                temperature=0, metadata={"k": "v"})  # fmt: skip
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])  # fmt: skip
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content and r.output_text  # greedy: the same text
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    cut = chat.choices[0].finish_reason == "length"
    assert r.status == ("incomplete" if cut else "completed") and r.metadata == {"k": "v"}
    assert (r.incomplete_details.reason if cut else r.incomplete_details) == (
        "max_output_tokens" if cut else None
    )
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert (
        u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 0
    )
    # the output items sent back as input (how the openai docs carry a conversation on) are the assistant's turn
    turn = [{"role": "user", "content": "hello"}, *r.output, {"role": "user", "content": "more"}]
    again = client.responses.create(model="tiny", input=turn, max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": r.output_text},
        {"role": "user", "content": "more"}])  # fmt: skip
    assert again.output_text == chat.choices[0].message.content


def test_a_forced_call_is_a_function_call_item_and_its_output_goes_back(client, server):
    r = client.responses.create(model="tiny", input="weather in Rome?", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=120,
                                temperature=0)  # fmt: skip
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    args = json.loads(call.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in "cf" and call.call_id
    follow = client.responses.create(model="tiny", tools=[WEATHER], max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "weather in Rome?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}])  # fmt: skip
    assert follow.status in ("completed", "incomplete") and follow.output
    assert server[1].blocks.num_used == 0


def test_a_json_schema_text_format_holds(client):
    r = client.responses.create(
        model="tiny", input="a digit", max_output_tokens=40, temperature=0.8, text=DIGIT
    )
    assert list(json.loads(r.output_text)) == ["n"] and r.text.format.type == "json_schema"
    assert r.status == "completed"


def test_the_stream_helper_assembles_the_same_response(client):
    """A reply that ends (the random model's JSON, held to a schema, closes), streamed and whole."""
    kw = dict(model="tiny", input="hello", max_output_tokens=40, temperature=0, text=DIGIT)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text and final.status == whole.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_streamed_call_and_a_stream_cut_by_max_output_tokens(client):
    with client.responses.stream(model="tiny", input="weather?", tools=[WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=120, temperature=0) as s:  # fmt: skip
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    (call,) = final.output
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert call.type == "function_call" and done.arguments == call.arguments and done.name == call.name
    assert set(json.loads(call.arguments)) == {"city", "unit"}
    # cut: OpenAI's response.incomplete (the helper's final response needs response.completed)
    cut = list(
        client.responses.create(model="tiny", input="hello", max_output_tokens=2, temperature=0, stream=True)
    )
    assert cut[-1].type == "response.incomplete" and cut[-1].response.status == "incomplete"
    assert cut[-1].response.incomplete_details.reason == "max_output_tokens"
    assert cut[-1].response.output[0].status == "incomplete" and cut[-1].response.usage.output_tokens == 2


def test_a_call_cut_by_max_output_tokens_is_an_incomplete_item_whole_as_streamed(client):
    """A forced call cut short: its arguments as far as written, the item and the response incomplete; the stream's
    call item is held open until the end says so (a whole call before it would be completed)."""
    kw = dict(model="tiny", input="weather in Rome?", tools=[WEATHER], tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=45, temperature=0)  # fmt: skip
    whole = client.responses.create(**kw)
    (call,) = whole.output
    assert call.type == "function_call" and call.status == "incomplete" and whole.status == "incomplete"
    assert call.arguments.startswith('{"city":') and not call.arguments.endswith("}")  # as far as written
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["response.output_item.done", "response.incomplete"]
    assert events[-2].item.status == "incomplete" and kinds.count("response.output_item.done") == 1
    streamed = events[-1].response.output[0]
    assert (streamed.name, streamed.arguments, streamed.status) == (call.name, call.arguments, "incomplete")


def test_refusals_and_errors_are_openais_shape(server):
    url = server[0]
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": "resp_1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "max_output_tokens": 5000})
    err = r.json()["error"]
    assert (
        r.status_code == 400
        and err["param"] == "max_output_tokens"
        and "max_output_tokens is 5000" in err["message"]
    )
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{url}/v1/responses/resp_123")
        assert r.status_code == 404 and "stores none" in r.json()["error"]["message"]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_gone_mid_stream_aborts_its_request(server):
    url, engine = server
    aborted = 'lserve_requests_total{finish_reason="abort"}'
    before = _metric(url, aborted)
    body = {"model": "tiny", "input": "hello", "max_output_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=60) as r:
        deltas = 0
        for line in r.iter_lines():
            deltas += line.startswith("event: response.output_text.delta")
            if deltas == 3:
                break
    deadline = time.monotonic() + 30
    while (_metric(url, aborted), engine.blocks.num_used) != (before + 1, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    # aborted (its pages back), not run on to max_output_tokens
    assert (_metric(url, aborted), engine.blocks.num_used) == (before + 1, 0)


def events_of(chunks: list[dict | str]) -> list[dict]:
    """The Responses events (their JSON) of a chat stream of these chunks (dicts, or raw SSE lines)."""

    async def stream():
        for c in chunks:
            yield c if isinstance(c, str) else sse(c)

    async def read() -> list[dict]:
        events = response_events(shell("resp_1", {"input": "x"}, "tiny", "in_progress"), stream())
        return [json.loads(e.partition("data: ")[2]) async for e in events]

    return asyncio.run(read())


def _delta(delta: dict, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_an_error_after_the_response_began_is_an_error_event_then_response_failed():
    error = ApiError(400, "response_format: constrained decoding failed", "response_format").body()
    events = events_of([_delta({"role": "assistant"}), _delta({"content": "ab"}), error, "data: [DONE]\n\n"])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "error", "response.failed",
    ]  # fmt: skip
    assert events[-2]["message"] == "response_format: constrained decoding failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_reply_aborted_by_the_servers_shutdown_is_cancelled():
    use = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    chunks = [
        _delta({"role": "assistant"}),
        _delta({"content": "a"}),
        _delta({}, "abort"),
        {"choices": [], "usage": use},
    ]
    events = events_of([*chunks, "data: [DONE]\n\n"])
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["status"] == "cancelled"
    assert (
        events[-2]["item"]["status"] == "incomplete" and events[-1]["response"]["usage"]["total_tokens"] == 4
    )


def test_a_client_gone_before_a_whole_response_aborts_its_request(server):
    """The client leaves once its request is admitted (the engine held, so it cannot finish first)."""
    from test_serve import paused

    url, engine = server
    aborted = 'lserve_requests_total{finish_reason="abort"}'
    before = _metric(url, aborted)

    async def leave() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"input": "hello", "max_output_tokens": 200}
            post = asyncio.create_task(c.post(url + "/v1/responses", json=body))
            while _metric(url, "lserve_requests_in_flight") != 1:
                await asyncio.sleep(0.02)
            post.cancel()  # the connection closed

    with paused(engine):
        asyncio.run(asyncio.wait_for(leave(), 30))
    deadline = time.monotonic() + 30
    while (_metric(url, aborted), engine.blocks.num_used) != (before + 1, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (_metric(url, aborted), engine.blocks.num_used) == (before + 1, 0)


def test_langchain_chat_openai_on_the_responses_api(server):
    """LangChain's ChatOpenAI with use_responses_api: the same text as on chat completions, streamed as whole, and
    a forced tool call parsed into tool_calls."""
    lc = pytest.importorskip("langchain_openai")
    kw = dict(model="tiny", base_url=server[0] + "/v1", api_key="x", temperature=0, max_retries=0)
    llm = lc.ChatOpenAI(**kw, max_tokens=8, use_responses_api=True)
    one = llm.invoke("hello")
    assert one.text and one.text == lc.ChatOpenAI(**kw, max_tokens=8).invoke("hello").content
    assert "".join(c.text for c in llm.stream("hello")) == one.text
    assert one.usage_metadata["output_tokens"] == 8
    spec = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    tools = lc.ChatOpenAI(**kw, max_tokens=120, use_responses_api=True).bind_tools(
        [spec], tool_choice="get_weather"
    )
    (call,) = tools.invoke("weather in Rome?").tool_calls
    assert (
        call["name"] == "get_weather"
        and set(call["args"]) == {"city", "unit"}
        and call["args"]["unit"] in "cf"
    )
