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
from tiny_models import TOOLS_CFG
from weather_tool import WEATHER as CHAT_WEATHER

from lserve_lite.serve.protocol import ApiError
from lserve_lite.serve.response_store import ResponseStore, Stored
from lserve_lite.serve.responses import sse
from lserve_lite.serve.responses_api import chat_body, renamed, response_events, shell, text_logprobs

WEATHER = {"type": "function", **CHAT_WEATHER["function"], "strict": True}  # the Responses API's flat form
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
        ({"conversation": "conv_1"}, "conversation", "conversations are not stored"),
        ({"background": True}, "background", "background is not supported"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning is not supported"),
        (
            {"include": ["file_search_call.results"]},
            "include",
            "include: only 'message.output_text.logprobs'",
        ),
        ({"include": "message.output_text.logprobs"}, "include", "include: only"),
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


def test_a_chained_request_continues_the_earlier_conversation_under_its_own_instructions():
    """previous_response_id: the stored turns come first, the earlier instructions are not carried over (OpenAI)."""
    said = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}  # fmt: skip
    earlier = [{"type": "message", "role": "user", "content": "hello"}, said]
    chat = chat_body({"input": "more", "instructions": "be brief"}, earlier)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": "more"},
    ]


def _entry(rid: str, size: int) -> Stored:
    return Stored(
        {"id": rid, "output": [{"type": "message", "id": f"o_{rid}"}]}, [{"id": f"i_{rid}"}], [], size
    )


def test_the_store_evicts_the_oldest_past_its_count_or_its_byte_budget():
    store = ResponseStore(max_count=3, max_bytes=100)
    for i in range(4):
        assert store.put(_entry(f"r{i}", 10))
    assert list(store.entries) == ["r1", "r2", "r3"] and store.bytes == 30  # the count: r0 went
    assert store.put(_entry("big", 80))  # the bytes: r1 goes (20 + 80 fit), r2 stays
    assert list(store.entries) == ["r2", "r3", "big"] and store.bytes == 100
    # larger than the whole budget: not kept, and nothing is evicted for it
    assert not store.put(_entry("huge", 101)) and list(store.entries) == ["r2", "r3", "big"]
    assert store.pop("r2").response["id"] == "r2" and store.get("r2") is None and store.bytes == 90
    assert store.pop("r2") is None and store.get("r3").conversation() == [{"id": "i_r3"}, {"type": "message",
                                                                          "id": "o_r3"}]  # fmt: skip
    off = ResponseStore(max_count=0, max_bytes=100)
    assert not off.enabled and not off.put(_entry("r", 1)) and not off.entries


def test_the_conversation_of_a_chain_is_the_earlier_turns_the_input_and_the_output():
    first = _entry("a", 1)
    second = Stored({"id": "b", "output": [{"id": "o_b"}]}, [{"id": "i_b"}], first.conversation(), 1)
    assert [i["id"] for i in second.conversation()] == ["i_a", "o_a", "i_b", "o_b"]


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
def test_the_text_logprobs_item_is_chats_logprobs():
    lp = {"include": ["message.output_text.logprobs"]}
    assert chat_body({"input": "x"} | lp | {"top_logprobs": 3}) | {"messages": []} == {
        "logprobs": True, "top_logprobs": 3, "messages": []}  # fmt: skip
    assert chat_body({"input": "x"} | lp)["top_logprobs"] == 0  # each token's own logprob, no alternatives
    assert "logprobs" not in chat_body({"input": "x", "include": None, "top_logprobs": None})


def _lp(token: str) -> dict:
    return {"token": token, "logprob": -1.0, "bytes": list(token.encode()), "top_logprobs": []}


def test_beside_calls_the_text_has_the_logprobs_of_its_tokens_before_the_first_call():
    lps = [_lp("Sure"), _lp("."), _lp("<tool_call>"), _lp("{}")]
    assert text_logprobs(lps, "Sure.", [{"id": "c"}]) == lps[:2]
    assert text_logprobs(lps, "Sure.<tool_call>{}", []) == lps  # no calls: every token's
    split = [
        {**_lp(""), "bytes": [0xE2]},
        {**_lp(""), "bytes": [0x98, 0x83]},
        _lp("<"),
    ]  # one character, 2 tokens
    assert text_logprobs(split, "\u2603", [{"id": "c"}]) == split[:2]


CFG = TOOLS_CFG  # conftest's `server` on its `tiny_dir`
NEEDS = ["llguidance"]  # forced calls and formats are llguidance grammars


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
    """A forced call cut short (56 tokens: the `<tool_call>` opening and part of the arguments): its arguments as
    far as written, the item and the response incomplete; the stream's call item is held open until the end says so
    (a whole call before it would be completed)."""
    kw = dict(model="tiny", input="weather in Rome?", tools=[WEATHER], tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=56, temperature=0)  # fmt: skip
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


def test_cache_salt_keeps_responses_prefix_cache_apart(client):
    """vLLM's cache_salt, as on chat: was ignored here. Requests of one salt share prefix-cache pages, another salt's
    do not; a salt that is not a non-empty string is refused, named."""
    import openai

    kw = dict(
        model="tiny", input="a question long enough to fill pages " * 30, max_output_tokens=2, temperature=0
    )
    cached = [
        client.responses.create(
            **kw, extra_body={"cache_salt": salt}
        ).usage.input_tokens_details.cached_tokens
        for salt in ("resp-a", "resp-a", "resp-b")
    ]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0, cached
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**kw, extra_body={"cache_salt": 5})
    assert e.value.body["param"] == "cache_salt"


def test_vllms_unimplemented_fields_are_refused_as_on_chat(server):
    """guided_json, beam search and the other vLLM fields chat refuses were read by nobody here: a client that set
    one got a reply without its effect. Refused, named; at their off values accepted."""
    url = server[0]
    for field, value in (("guided_json", {"type": "object"}), ("use_beam_search", True), ("priority", 3)):
        r = httpx.post(
            f"{url}/v1/responses", json={"input": "x", "max_output_tokens": 1, field: value}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "max_output_tokens": 1, "use_beam_search": False},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text


def test_refusals_and_errors_are_openais_shape(server):
    url = server[0]
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": "resp_1"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "previous_response_id"
    assert err["message"] == "previous_response_id: no stored response with id 'resp_1'"
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": 3})
    assert r.status_code == 400 and r.json()["error"]["message"] == "previous_response_id: must be a string"
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "max_output_tokens": 5000})
    err = r.json()["error"]
    assert (
        r.status_code == 400
        and err["param"] == "max_output_tokens"
        and "max_output_tokens is 5000" in err["message"]
    )
    r = httpx.post(f"{url}/v1/responses", json={"input": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for path in ("resp_123", "resp_123/input_items"):
        for method in ("GET", "DELETE") if path == "resp_123" else ("GET",):
            r = httpx.request(method, f"{url}/v1/responses/{path}")
            err = r.json()["error"]
            assert r.status_code == 404 and err["code"] == "not_found"
            assert err["message"] == "no stored response with id 'resp_123'"
    r = httpx.delete(f"{url}/v1/responses/resp_123/input_items")
    assert r.status_code == 404 and "is not served" in r.json()["error"]["message"]


def test_a_stored_response_is_retrieved_chained_listed_and_deleted(client, server):
    first = client.responses.create(model="tiny", input="hello", instructions="be brief", max_output_tokens=8,
                                    temperature=0)  # fmt: skip
    assert first.store is True and client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(model="tiny", input="more", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)  # fmt: skip
    # the model saw the earlier turns and not the earlier instructions: the chat reply of that conversation
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "more"}]  # fmt: skip
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=turns)
    assert second.output_text == chat.choices[0].message.content and second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    (item,) = client.responses.input_items.list(second.id).data  # this request's input
    assert (item.type, item.role, item.id[:4]) == ("message", "user", "msg_")
    r = httpx.get(f"{server[0]}/v1/responses/{first.id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.delete(f"{server[0]}/v1/responses/{first.id}")
    assert r.json() == {"id": first.id, "object": "response", "deleted": True}
    assert httpx.get(f"{server[0]}/v1/responses/{first.id}").status_code == 404
    r = httpx.post(f"{server[0]}/v1/responses", json={"input": "x", "previous_response_id": first.id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    # a chain holds its turns: the second still continues with the first's, its instructions its own
    third = client.responses.create(model="tiny", input="again", previous_response_id=second.id,
                                    instructions="be kind", max_output_tokens=4, temperature=0)  # fmt: skip
    turns = [{"role": "system", "content": "be kind"}, *turns, {"role": "assistant", "content": second.output_text},
             {"role": "user", "content": "again"}]  # fmt: skip
    chat = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=turns)
    assert third.output_text == chat.choices[0].message.content
    assert third.usage.input_tokens == chat.usage.prompt_tokens > second.usage.input_tokens
    kept = client.responses.create(model="tiny", input="x", max_output_tokens=2, store=False)
    assert kept.store is False and httpx.get(f"{server[0]}/v1/responses/{kept.id}").status_code == 404


def test_a_tool_result_chains_to_the_stored_call(client):
    """The Agents SDK's next turn: the call's output alone, with previous_response_id; the prompt is that of the
    whole conversation sent in input."""
    kw = dict(model="tiny", tools=[WEATHER], max_output_tokens=6, temperature=0)
    first = client.responses.create(**kw | {"max_output_tokens": 120}, input="weather in Rome?",
                                    tool_choice={"type": "function", "name": "get_weather"})  # fmt: skip
    (call,) = first.output
    out = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    chained = client.responses.create(**kw, previous_response_id=first.id, input=[out])
    whole = client.responses.create(**kw, input=[{"role": "user", "content": "weather in Rome?"},
                                                 call.model_dump(exclude_none=True), out])  # fmt: skip
    assert chained.usage.input_tokens == whole.usage.input_tokens
    same = [(o.type, o.model_dump().get("arguments")) for o in whole.output]
    assert [(o.type, o.model_dump().get("arguments")) for o in chained.output] == same
    assert chained.output_text == whole.output_text


def test_input_items_are_listed_in_openais_pages(client):
    items = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    r = client.responses.create(model="tiny", input=items, max_output_tokens=2)
    every = client.responses.input_items.list(r.id, order="asc", limit=100)
    ids = [i.id for i in every.data]
    assert len(set(ids)) == 5 and [i.content for i in every.data] == [f"turn {i}" for i in range(5)]
    page = client.responses.input_items.list(r.id, limit=2)  # OpenAI's default order: the newest first
    assert [i.id for i in page.data] == ids[::-1][:2] and page.has_more
    later = client.responses.input_items.list(r.id, limit=2, after=ids[3])
    assert [i.id for i in later.data] == ids[::-1][2:4]
    assert [i.id for i in client.responses.input_items.list(r.id, order="asc", after=ids[3])] == [ids[4]]
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="limit: must be an integer from 1 to 100"):
        client.responses.input_items.list(r.id, limit=0)


def test_a_streamed_response_is_stored_at_its_end_with_its_status(client):
    with client.responses.stream(
        model="tiny", input="hello", max_output_tokens=40, temperature=0, text=DIGIT
    ) as s:
        final = s.get_final_response()
    got = client.responses.retrieve(final.id)
    assert (got.status, got.output_text, got.usage) == ("completed", final.output_text, final.usage)
    cut = list(
        client.responses.create(model="tiny", input="hello", max_output_tokens=2, temperature=0, stream=True)
    )
    got = client.responses.retrieve(cut[-1].response.id)
    assert got.status == "incomplete" and got.output[0].status == "incomplete" and got.store is True


def test_a_failed_or_abandoned_stream_is_kept_with_its_status():
    kept: list[dict] = []
    error = ApiError(400, "response_format: constrained decoding failed", "response_format").body()
    events = events_of([_delta({"role": "assistant"}), _delta({"content": "ab"}), error], kept.append)
    assert kept[0]["status"] == "failed" and kept[0] == events[-1]["response"]  # as response.failed has it

    async def leave() -> None:  # the client reads up to the delta "b" and goes: the stream is closed
        chunks = (sse(_delta({"content": c})) for c in "abcdef")

        async def stream():
            for c in chunks:
                yield c

        events = response_events(
            shell("resp_2", {"input": "x"}, "tiny", "in_progress"), stream(), kept.append
        )
        for _ in range(6):  # created, in_progress, item and part added, two deltas
            await anext(events)
        await events.aclose()

    asyncio.run(leave())
    (item,) = kept[1]["output"]
    assert kept[1]["status"] == "cancelled" and item["status"] == "incomplete"
    assert item["content"][0]["text"] == "ab"


@pytest.fixture
def own_server(tiny_dir):
    """A server of its own on the tiny model, with create_app's keywords."""
    from contextlib import contextmanager

    from lserve_lite import EngineConfig
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    @contextmanager
    def serve(**kw):
        engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
        with ServerThread(create_app(engine, served_model_name="tiny", **kw)) as url:
            yield url

    return serve


def test_the_servers_store_evicts_the_oldest_and_zero_stores_none(own_server):
    def post(url: str, **kw) -> httpx.Response:
        return httpx.post(url + "/v1/responses", json={"input": "x", "max_output_tokens": 2} | kw)

    with own_server(responses_store=2) as url:
        ids = [post(url).json()["id"] for _ in range(3)]
        assert [httpx.get(f"{url}/v1/responses/{i}").status_code for i in ids] == [404, 200, 200]
        r = post(url, previous_response_id=ids[0])
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            f"previous_response_id: no stored response with id '{ids[0]}'"
        )
    with own_server(responses_store=0) as url:
        r = post(url)
        assert (
            r.json()["store"] is False
            and httpx.get(f"{url}/v1/responses/{r.json()['id']}").status_code == 404
        )
        err = post(url, previous_response_id=r.json()["id"]).json()["error"]
        assert err["message"] == (
            "previous_response_id: this server stores no responses (--responses-store 0): send the whole "
            "conversation in input"
        )


def test_the_serve_flags_bound_the_store(monkeypatch):
    from lserve_lite import cli
    from lserve_lite.serve import run_from_args

    seen = {}
    monkeypatch.setattr("lserve_lite.serve.run_server", lambda *a, **k: seen.update(k) or 0)
    assert run_from_args(cli.build_parser().parse_args(["serve"])) == 0
    assert (seen["responses_store"], seen["responses_store_mib"]) == (1024, 64)
    args = cli.build_parser().parse_args(["serve", "--responses-store", "0", "--responses-store-mib", "2"])
    assert run_from_args(args) == 0 and (seen["responses_store"], seen["responses_store_mib"]) == (0, 2)
    for bad in (["--responses-store", "-1"], ["--responses-store-mib", "0"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", *bad])


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
        deltas, rid = 0, None
        for line in r.iter_lines():
            rid = rid or (line.startswith("data: ") and json.loads(line[6:])["response"]["id"])
            deltas += line.startswith("event: response.output_text.delta")
            if deltas == 3:
                break

    def status() -> str | None:
        return httpx.get(f"{url}/v1/responses/{rid}").json().get("status")

    deadline = time.monotonic() + 30
    while (_metric(url, aborted), engine.blocks.num_used, status()) != (before + 1, 0, "cancelled") and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    # aborted (its pages back), not run on to max_output_tokens; kept as cancelled
    assert (_metric(url, aborted), engine.blocks.num_used, status()) == (before + 1, 0, "cancelled")


def events_of(chunks: list[dict | str], keep=None) -> list[dict]:
    """The Responses events (their JSON) of a chat stream of these chunks (dicts, or raw SSE lines); `keep` gets the
    response at the stream's end."""

    async def stream():
        for c in chunks:
            yield c if isinstance(c, str) else sse(c)

    async def read() -> list[dict]:
        events = response_events(shell("resp_1", {"input": "x"}, "tiny", "in_progress"), stream(), keep)
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
            # long: it must not end before the client leaves (200 tokens once did, under a loaded CI host)
            body = {"input": "hello", "max_output_tokens": 960}
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


# -- token logprobs: include ["message.output_text.logprobs"] with top_logprobs --------------------------------
LOGPROBS = {"include": ["message.output_text.logprobs"]}


def _entries(logprobs) -> list[tuple]:
    """Logprob entries (the openai package's models or chat's) as comparable tuples."""
    return [(e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs])
            for e in logprobs]  # fmt: skip


def test_text_logprobs_are_chats_for_the_same_greedy_prompt(client):
    from openai.types.responses.response_output_text import Logprob

    kw = dict(model="tiny", input="hello", instructions="be brief", max_output_tokens=8, temperature=0)
    r = client.responses.create(**kw, **LOGPROBS, top_logprobs=3)
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])  # fmt: skip
    (part,) = r.output[0].content
    assert all(isinstance(e, Logprob) for e in part.logprobs)  # the openai client parsed them
    got = _entries(part.logprobs)
    assert got == _entries(chat.choices[0].logprobs.content) and len(got) == r.usage.output_tokens == 8
    for _, logprob, _, top in got:
        assert len(top) == 3 and [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
        assert top[0][1] == logprob  # greedy: the chosen token is the likeliest
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()  # stored with them
    bare = client.responses.create(**kw, **LOGPROBS).output[0].content[0].logprobs  # no top_logprobs: none
    assert [(e.token, e.logprob, e.top_logprobs) for e in bare] == [(t, lp, []) for t, lp, _, _ in got]
    assert client.responses.create(**kw).output[0].content[0].logprobs == []  # not included: none
    assert client.responses.create(**kw, top_logprobs=3).output[0].content[0].logprobs == []  # OpenAI's rule


def test_streamed_deltas_carry_the_logprobs_of_the_whole_response(client):
    kw = dict(model="tiny", input="hello", max_output_tokens=8, temperature=0, **LOGPROBS, top_logprobs=2)
    whole = _entries(client.responses.create(**kw).output[0].content[0].logprobs)
    events = list(client.responses.create(**kw, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [len(e.logprobs) for e in deltas] != [0] * len(deltas)
    streamed = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                for d in deltas for e in d.logprobs]  # fmt: skip
    assert streamed == [(t, lp, [x[:2] for x in top]) for t, lp, _, top in whole]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [(e.token, e.logprob) for e in done.logprobs] == [x[:2] for x in whole]
    final = events[-1].response
    assert _entries(final.output[0].content[0].logprobs) == whole
    assert _entries(client.responses.retrieve(final.id).output[0].content[0].logprobs) == whole


def test_a_function_call_carries_no_logprobs(client):
    kw = dict(model="tiny", input="weather?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_output_tokens=120, temperature=0, **LOGPROBS, top_logprobs=2)  # fmt: skip
    (call,) = client.responses.create(**kw).output
    assert call.type == "function_call" and "logprobs" not in call.model_dump()
    events = list(client.responses.create(**kw, stream=True))
    assert "response.output_text.delta" not in [e.type for e in events]
    assert [o.type for o in events[-1].response.output] == ["function_call"]


def _scored(delta: dict, lps: list[dict], finish: str | None = None) -> dict:
    """A chat chunk of one choice with the logprob entries of its tokens."""
    return {"choices": [{"index": 0, "delta": delta, "logprobs": {"content": lps}, "finish_reason": finish}]}


def test_a_streams_logprobs_go_with_its_text_and_not_with_its_calls():
    """Entries of held text (a possible stop string, EOS) go with the next delta, or at the end in a delta of no
    text; those of a call's tokens with none."""
    use = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    a, b, c = _lp("a"), _lp("b"), _lp("</s>")
    chunks = [_delta({"role": "assistant"}), _scored({}, [a]), _scored({"content": "ab"}, [b]),
              _scored({}, [c], "stop"), use]  # fmt: skip
    events = events_of(chunks)
    deltas = [(e["delta"], e["logprobs"]) for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == [("ab", [a, b]), ("", [c])]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == [a, b, c]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    chunks = [_scored({"content": "hi"}, [a]), _scored({}, [b]), _delta({"tool_calls": [call]}),
              _scored({}, [c], "tool_calls"), use]  # fmt: skip
    out = events_of(chunks)[-1]["response"]["output"]
    assert [o["type"] for o in out] == ["message", "function_call"] and "logprobs" not in out[1]
    assert out[0]["content"][0]["logprobs"] == [a]


def test_bad_logprob_fields_are_refused_in_one_line(server):
    for body, param, words in (
        (LOGPROBS | {"top_logprobs": 21}, "top_logprobs", "top_logprobs must be in [0, 20], got 21"),
        (LOGPROBS | {"top_logprobs": -1}, "top_logprobs", "top_logprobs must be in [0, 20]"),
        (
            {"include": ["reasoning.encrypted_content"]},
            "include",
            "include: only 'message.output_text.logprobs'",
        ),
        ({"top_logprobs": 21}, "top_logprobs", "top_logprobs must be in [0, 20], got 21"),
        ({"top_logprobs": True}, "top_logprobs", "top_logprobs must be an integer"),
    ):
        r = httpx.post(
            f"{server[0]}/v1/responses", json={"input": "x", "max_output_tokens": 1} | body, timeout=60
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and words in err["message"], r.text
        assert "\n" not in err["message"]


def test_a_call_streamed_in_pieces_is_one_item_of_argument_deltas():
    """Chat's deltas of a call (its id and name, then pieces of its arguments) are one function_call item: added,
    an arguments delta per piece, and the done events with the joined arguments when the next item begins or the
    reply ends; a call sent whole is one delta."""
    head = {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    pieces = ['{"city":', '"Rome",', '"unit":"c"}']
    whole = {"index": 1, "id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    chunks = [_delta({"role": "assistant"}), _delta({"content": "Hi. "}), _delta({"tool_calls": [head]})]
    chunks += [_delta({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    chunks += [_delta({"tool_calls": [whole]}), _delta({}, "tool_calls")]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}})
    events = events_of(chunks)
    kinds = ("response.function_call", "response.output_item")
    calls = [e for e in events if e["type"].startswith(kinds)][2:]
    assert [e["type"] for e in calls] == [  # after the message's item, added and done
        "response.output_item.added", *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]  # fmt: skip
    assert calls[0]["item"]["arguments"] == "" and [e["delta"] for e in calls[1:4]] == pieces
    assert calls[4]["arguments"] == calls[5]["item"]["arguments"] == "".join(pieces)
    assert calls[4]["name"] == "get_weather"
    assert calls[8]["arguments"] == "{}" and calls[9]["item"]["status"] == "completed"
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [(o["type"], o.get("arguments")) for o in final["output"]] == [
        ("message", None), ("function_call", "".join(pieces)), ("function_call", "{}")
    ]  # fmt: skip
