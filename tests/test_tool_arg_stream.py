"""A call's arguments streamed as the model writes them: a call that a grammar holds (strict tools or a
response_format beside them under "auto", in <tool_call> blocks or Mistral's or Llama's format; a forced choice in the
model's format) goes out as a first delta of its id and name, then pieces of its arguments whose join is the whole
reply's arguments, however the reply is split or cut; calls no grammar holds go out whole (a block can still turn
out no call). Through the server: chat's deltas and the Responses API's argument events."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tiny_models import TOOLS_CFG
from weather_tool import WEATHER

from lserve_lite.engine.call_args import HEAD_MAX, ArgScan, call_head
from lserve_lite.engine.tool_calls import ToolStream, plan_tools

CFG = TOOLS_CFG  # conftest's `server` on its `tiny_dir`
STRICT = {"type": "function", "function": WEATHER["function"] | {"strict": True}}
ANY = {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}  # any object
ROME = '{"city":"Rome","unit":"c"}'
ONE = f'<tool_call>\n{{"name":"get_weather","arguments":{ROME}}}\n</tool_call>'
# strings holding braces, brackets, quotes, backslashes and </tool_call>; nested values; non-ASCII; a second call
NOTE = '{"t":"a}\\"]\\\\","u":[{"v":{}}],"w":"</tool_call>","x":"é\\u00e9"}'
TRICKY = (
    f'Let me see. <tool_call>\n{{"name":"note","arguments":{NOTE}}}\n</tool_call>\n<tool_call>\n'
    '{"name":"get_weather","arguments":{"city":"Oslo","unit":"f"}}\n</tool_call>\n'
)


def _streamed(plan, pieces: list[str]) -> tuple[str, list[dict], bool, list[dict]]:
    """A reply fed to ToolStream.deltas in `pieces`: (content, the calls its deltas join to, cut, the deltas)."""
    s, content, deltas = ToolStream(plan), [], []
    for k, piece in enumerate(pieces):
        text, got = s.deltas(piece, finished=k == len(pieces) - 1)
        content.append(text)
        deltas += got
    calls: list[dict] = []
    for d in deltas:
        if "id" in d:
            assert d["index"] == len(calls) and d["type"] == "function"
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            assert d["index"] == len(calls) - 1 and d["function"]["arguments"]  # the open call's, not empty
            calls[-1]["function"]["arguments"] += d["function"]["arguments"]
    return "".join(content), [c["function"] for c in calls], s.cut, deltas


def _whole(plan, reply: str) -> tuple[str, list[dict], bool]:
    content, calls, cut = plan.read(reply)
    return content or "", [c["function"] for c in calls], cut


def _split_every_way(reply: str) -> list[list[str]]:
    return [[reply[:k], reply[k:]] for k in range(1, len(reply))] + [
        [reply[i : i + step] for i in range(0, len(reply), step)] for step in (1, 2, 3, 7)
    ]


@pytest.mark.parametrize("reply, first", [(ONE, ROME), (TRICKY, NOTE)])
@pytest.mark.parametrize("parallel", [None, False])
def test_a_guided_call_streams_its_name_then_its_arguments(reply, first, parallel):
    """Split at every point, its deltas join to the whole reply's calls, arguments exactly as the model wrote them;
    the name comes alone first, then the arguments in pieces as they come."""
    plan = plan_tools([STRICT, ANY], "auto", parallel)
    assert plan.guided
    whole = _whole(plan, reply)
    assert whole[1][0]["arguments"] == first and json.loads(first)
    for pieces in _split_every_way(reply):
        content, calls, cut, deltas = _streamed(plan, pieces)
        assert (content, calls, cut) == whole, pieces
    _, _, _, deltas = _streamed(plan, list(reply))
    assert deltas[0]["function"] == {"name": whole[1][0]["name"], "arguments": ""}
    assert len([d for d in deltas if d["index"] == 0]) > 10  # a piece per character fed


# a forced reply in each format its grammar writes (Mistral's marker kept, or dropped by the detokenizer)
W_CALL = '{"name":"get_weather","arguments":{"city":"Rome","unit":"c"}}'
N_CALL = f'{{"name":"note","arguments":{NOTE}}}'
FORCED = {
    "tagged": f"<tool_call>\n{W_CALL}\n</tool_call>\n<tool_call>\n{N_CALL}\n</tool_call>\n",
    "mistral": f"[TOOL_CALLS][{W_CALL}, {N_CALL}]",
    "mistral_dropped": f" [{N_CALL}, {W_CALL}]",
    "llama": "; ".join(c.replace('"arguments"', '"parameters"') for c in (W_CALL, N_CALL)),
    "generic": f"[{W_CALL},{N_CALL}]",  # a template of another format: the calls' JSON
}


def _forced(form: str):
    as_in = None if form == "generic" else form.removesuffix("_dropped")
    return replace(plan_tools([STRICT, ANY], "required", None), form=as_in)


def _check_every_split_and_cut(plan, reply: str, whole) -> None:
    """Split at every point the reply streams to `whole`; cut after every character, to what the cut reply reads
    as whole."""
    for pieces in _split_every_way(reply):
        assert _streamed(plan, pieces)[:3] == whole, pieces
    for k in range(1, len(reply)):
        part = reply[:k]
        for pieces in ([part], list(part)):
            assert _streamed(plan, pieces)[:3] == _whole(plan, part), pieces


@pytest.mark.parametrize("form", list(FORCED))
def test_a_forced_reply_streams_each_calls_name_then_its_arguments(form):
    """tool_choice "required" in each format (and the generic JSON): split at every point or cut after every character, the deltas join to
    the whole reply's calls (names, arguments as written, the cut one's as far as written, `cut`); a call whose head
    was not yet written when the reply was cut goes out whole at the end."""
    plan, reply = _forced(form), FORCED[form]
    whole = _whole(plan, reply)
    assert [c["arguments"] for c in whole[1]] == ([ROME, NOTE] if form != "mistral_dropped" else [NOTE, ROME])
    _check_every_split_and_cut(plan, reply, whole)
    deltas = _streamed(plan, list(reply))[3]
    assert deltas[0]["function"]["arguments"] == "" and len(deltas) > 20


def _guided(form: str, lead: int | None):
    """A strict "auto" plan in Mistral's or Llama's format (`lead`: the marker's token id, as call_form finds it)."""
    return replace(plan_tools([STRICT, ANY], "auto", None), form=form, lead=lead)


L_CALLS = FORCED["llama"]
GUIDED = [
    ("mistral", 5, f"Let me check. [TOOL_CALLS][{W_CALL}, {N_CALL}]"),
    ("mistral", 5, f"[TOOL_CALLS] [{N_CALL}]\n"),
    ("llama", None, L_CALLS),
    ("llama", 7, f"Checking.\n<|python_tag|>{L_CALLS}"),
]


@pytest.mark.parametrize("form, lead, reply", GUIDED)
def test_a_guided_reply_in_mistrals_or_llamas_format_streams_its_calls(form, lead, reply):
    """Strict tools under "auto" in Mistral's marker array or Llama's bare / <|python_tag|> calls: the grammar holds
    what follows the marker (or a reply's opening JSON) to calls, streamed as a forced reply's, split at every point
    or cut after every character; cut in its calls, the reply reads as a forced one (its complete calls and the
    one it was cut in)."""
    plan = _guided(form, lead)
    assert plan.guided
    whole = _whole(plan, reply)
    assert len(whole[1]) == reply.count('"name"') and not whole[2]
    _check_every_split_and_cut(plan, reply, whole)
    deltas = _streamed(plan, list(reply))[3]
    assert len(deltas) > 20 and all(set(d) == {"index", "function"} for d in deltas if "id" not in d)
    if '"unit"' in reply:  # cut in get_weather's arguments (a stop string): that call, cut
        content, calls, cut = _whole(plan, reply[: reply.index('"unit"')])
        assert calls == [{"name": "get_weather", "arguments": '{"city":"Rome",'}] and cut, calls


@pytest.mark.parametrize("reply", [ONE, TRICKY])
def test_a_guided_reply_cut_anywhere_streams_what_it_reads_whole(reply):
    """Cut after any character (max_tokens, a stop string): the stream ends with what the whole reply reads, a call
    cut after its name being a call with its arguments as far as written (as a forced reply's), `cut` set (its finish
    reason is not "tool_calls"); before its name, the block stays text, no delta sent."""
    plan = plan_tools([STRICT, ANY], "auto", None)
    for k in range(1, len(reply) + 1):
        part = reply[:k]
        whole = _whole(plan, part)
        for pieces in ([part], list(part), [part[: k // 2], part[k // 2 :]]):
            content, calls, cut, _ = _streamed(plan, [p for p in pieces if p] or [""])
            assert (content, calls, cut) == whole, pieces
    content, calls, cut = _whole(plan, ONE[:-14])  # the arguments whole, the call not
    assert content == "" and calls[0]["arguments"] == '{"city":"Rome","unit":"c"}' and cut
    assert _whole(plan, ONE[:20]) == (ONE[:20], [], False)
    assert plan.reply(ONE[:50], "length")[2] == "length" and plan.reply(ONE, "stop")[2] == "tool_calls"


def test_a_guided_block_without_a_head_is_read_whole():
    """A block whose JSON does not open with the name and the arguments' object (keys in another order, arguments
    as a string) is read whole at its closing tag, one delta, as before."""
    plan = plan_tools([STRICT, ANY], "auto", None)
    for body in ('{"arguments":{"k":1},"name":"note"}', '{"name":"note","arguments":"{\\"k\\": 1}"}'):
        reply = f"<tool_call>\n{body}\n</tool_call>"
        for pieces in _split_every_way(reply):
            content, calls, cut, deltas = _streamed(plan, pieces)
            assert (content, calls, cut) == _whole(plan, reply)
            assert len(deltas) == 1 and json.loads(deltas[0]["function"]["arguments"]) == {"k": 1}
    padded = "<tool_call>" + " " * HEAD_MAX + '{"name":"note","arguments":{}}</tool_call>'
    assert len(_streamed(plan, list(padded))[3]) == 1


def test_a_call_no_grammar_holds_is_sent_whole_when_its_block_closes():
    """Unguided, a block may turn out no call (malformed, an unknown tool): nothing of it goes out as a call
    before its closing tag, and then either the whole call in one delta or the block as content."""
    plan = plan_tools([WEATHER], "auto", None)
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}} oops</tool_call>'
    for reply in (good, bad):
        for pieces in _split_every_way(reply):
            content, calls, cut, deltas = _streamed(plan, pieces)
            assert (content, calls, cut) == _whole(plan, reply)
            assert len(deltas) == (reply == good)
    assert _streamed(plan, [bad])[0] == bad


def test_the_arguments_scan_skips_strings_and_escapes_across_pieces():
    text = '{"a":"}\\"\\\\","b":[{"c":"]"}],"d":"\\\\"}'
    assert json.loads(text)
    for k in range(len(text) + 1):
        scan = ArgScan()
        first = scan.end(text[:k], 0)
        assert (first if first >= 0 else k + scan.end(text[k:] + "}", 0)) == len(text), k
    assert call_head(' {"name" : "f", "parameters":{') == ("f", 29)
    assert call_head('{"name":"f","arguments":"') is None  # arguments as a string: read whole


ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"],
          "additionalProperties": False}  # fmt: skip
AS_ANSWER = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True}}


def test_the_server_streams_a_guided_calls_arguments_in_pieces(client):
    """Chat completions with a strict tool (and a response_format, the Agents SDK's output_type), sampled with
    seeds: a reply that calls streams the call's id and name first, then its arguments in several deltas whose join
    is the whole reply's arguments; the openai stream helper assembles the same call."""
    kw = dict(model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=[STRICT], max_tokens=300,
              parallel_tool_calls=False, response_format=AS_ANSWER, temperature=1.0)  # fmt: skip
    replies = ((s, client.chat.completions.create(**kw, seed=s).choices[0]) for s in range(8))
    seed, whole = next((s, c) for s, c in replies if c.message.tool_calls)
    chunks = list(client.chat.completions.create(**kw, seed=seed, stream=True))
    first, *rest = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    (call,) = whole.message.tool_calls
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.function.arguments == "" and first.id.startswith("call_")
    assert len(rest) > 2 and all((d.index, d.id, d.function.name) == (0, None, None) for d in rest)
    assert "".join(d.function.arguments for d in rest) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"
    with client.chat.completions.stream(**kw, seed=seed) as s:
        (got,) = s.get_final_completion().choices[0].message.tool_calls
    assert (got.function.name, got.function.arguments) == (call.function.name, call.function.arguments)


def test_the_responses_api_streams_a_calls_arguments_in_pieces(client):
    """responses.stream with a forced call: the call's item is added (arguments ""), then an arguments delta per
    piece, then the done events; the pieces join to the done event's, the final item's and the whole response's."""
    kw = dict(model="tiny", input="weather?", tools=[{"type": "function", **STRICT["function"]}],
              tool_choice="required", parallel_tool_calls=False, max_output_tokens=120, temperature=0)  # fmt: skip
    with client.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    delta = "response.function_call_arguments.delta"
    pieces = [e.delta for e in events if e.type == delta]
    first, last = kinds.index(delta), len(kinds) - 1 - kinds[::-1].index(delta)
    assert kinds[first - 1] == "response.output_item.added" and events[first - 1].item.arguments == ""
    done = ["response.function_call_arguments.done", "response.output_item.done"]
    assert kinds[first : last + 1] == [delta] * len(pieces) and kinds[last + 1 : last + 3] == done
    (call,) = final.output
    assert len(pieces) > 2 and "".join(pieces) == events[last + 1].arguments == call.arguments
    assert client.responses.create(**kw).output[0].arguments == call.arguments  # greedy
