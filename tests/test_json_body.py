"""Request bodies parsed in short calls into C (serve/json_body.py): the same values and errors as json.loads, and no
call that parses more than a chunk, so a big body's parse does not hold the event loop."""

from __future__ import annotations

import gc
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
from lserve_lite.serve import json_body  # noqa: E402
from lserve_lite.serve.json_body import CHUNK, LoneSurrogate, TooDeep, read_object  # noqa: E402
from lserve_lite.serve.protocol import MAX_JSON_DEPTH, ApiError, body_limits, decode  # noqa: E402

LIMITS = body_limits(8192, 64 * 8192)  # SmolLM2's context and prompt limit: the server's default model


def _under_limits() -> dict[str, bytes]:
    """Bodies just under the count limits, each of the kind whose one json.loads held the loop longest."""
    containers, members, values = LIMITS.values()

    def field(items: list[bytes]) -> bytes:
        return b'{"prompt": "hi", "x": [' + b",".join(items) + b"]}"

    return {
        "empty lists": field([b"[]"] * (containers - 10)),
        "floats": field([b"1.5e3"] * (values - 100)),
        "one-member objects": field([b'{"a":0}'] * (members - 10)),
        "members of one object": b'{"x": {' + b",".join(b'"%d":0' % i for i in range(members - 10)) + b"}}",
        "token ids": json.dumps({"prompt": [list(range(8191))] * 64}).encode(),
    }


@pytest.mark.parametrize("kind", list(_under_limits()))
def test_a_body_under_the_count_limits_is_parsed_in_short_calls(kind, monkeypatch):
    """One json.loads of these bodies held the GIL, and so the event loop and every stream, 0.08-0.39 s from its
    worker thread (0.22 s for the floats). Each call into json's parser now reads at most a chunk of items
    (~6 ms), the parse reads each character about once, and the cyclic collector (whose passes over the parse's
    containers held the loop too) is paused meanwhile."""
    raw = _under_limits()[kind]
    want = json.loads(raw)
    spans: list[int] = []
    collector: list[bool] = []
    raw_decode = json.JSONDecoder.raw_decode

    def recorded(self, s: str, idx: int = 0):
        value, end = raw_decode(self, s, idx)
        spans.append(end - idx)
        collector.append(gc.isenabled())
        return value, end

    scan = json_body._scan

    def scanned(s: str, idx: int):
        value, end = scan(s, idx)
        spans.append(end - idx)
        return value, end

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", recorded)
    monkeypatch.setattr(json_body, "_scan", scanned)
    assert gc.isenabled()
    assert decode(raw) == want
    assert max(spans) <= CHUNK + 2, (kind, max(spans))
    assert sum(spans) <= 2 * len(raw), (kind, sum(spans), len(raw))
    assert collector and not any(collector) and gc.isenabled()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8) | st.sampled_from(["a,b", "]}", '":,', "\\"]),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.sampled_from(["a", "b", ",", "}", ""]), kids,
                                                                max_size=4),
    max_leaves=60,
)  # fmt: skip
EDITS = [",", "]", "}", "[", "{", '"', ":", " ", "01", "-", "NaN", "x", "\\", "\x01", "1e", "tru", ",]", ",}"]


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


@given(
    body=st.dictionaries(st.text(max_size=4), json_values, max_size=4),
    indent=st.sampled_from([None, 1]),
    edit=st.none()
    | st.tuples(st.integers(0, 10**6), st.sampled_from(EDITS), st.integers(0, 1) | st.just(10**7)),
    chunk=st.sampled_from([4, 16, 64]),
)
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
def test_values_and_errors_are_json_loads_ones(body, indent, edit, chunk):
    """With chunks small enough to cut through every shape, a body (or one edited into bad JSON, or cut short) reads
    as json.loads reads it: the same object, or the same error at the same place."""
    text = json.dumps(body, indent=indent, ensure_ascii=False)
    if edit:
        at, piece, drop = edit
        at %= len(text) + 1
        if drop > 1:  # cut short after a comma (inside a container, where its next run is tried)
            text = text[: text.rfind(",", 0, at) + 1 or at]
        else:
            text = text[:at] + piece + text[at + drop :]
    try:
        want: object = json.loads(text, parse_constant=_refuse)
    except ValueError as e:
        want = (type(e), str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json_body, "CHUNK", chunk)
        mp.setattr(json_body, "FIRST_RUN", chunk // 4)
        try:
            got: object = read_object(text, 10**6, False)
        except ValueError as e:
            got = (type(e), str(e))
    if got is None:  # no object at the start: the server's "must be a JSON object"
        assert not isinstance(want, dict) and not text.lstrip(" \t\n\r").startswith("{")
    else:
        assert got == want


@pytest.mark.parametrize(
    "text", ['{"x": [', '{"x": [1,', '{"x": [[1, 2], ', '{"x": {"a": 1, ', '{"x": [1, 2]', "{"]
)
def test_a_body_cut_short_is_json_loads_error(text):
    """A body that ends inside a container (a client's cut upload) is json's error, at its place."""
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        read_object(text, MAX_JSON_DEPTH, False)
    assert (got.value.msg, got.value.pos) == (want.value.msg, want.value.pos)


@pytest.mark.parametrize("chunk", [8, CHUNK])
def test_depth_and_surrogates_are_checked_inside_runs_too(chunk, monkeypatch):
    """A run of items parsed in one call is checked as items read one by one: a value past MAX_JSON_DEPTH, or a lone
    surrogate, is refused naming its top-level field."""
    monkeypatch.setattr(json_body, "CHUNK", chunk)
    monkeypatch.setattr(json_body, "FIRST_RUN", min(chunk, json_body.FIRST_RUN))
    deep = "[1, " * MAX_JSON_DEPTH + "1" + "]" * MAX_JSON_DEPTH
    ok = "[1, " * (MAX_JSON_DEPTH - 2) + "[]" + "]" * (MAX_JSON_DEPTH - 2)  # its [] at depth 32: allowed
    for text, field in ((f'{{"a": 1, "x": [0, 0, {deep}, 0]}}', "x"), (f'{{"stop": [{deep}]}}', "stop")):
        with pytest.raises(TooDeep) as e:
            read_object(text, MAX_JSON_DEPTH, False)
        assert e.value.field == field
        with pytest.raises(ApiError, match="nested deeper than 32 levels") as e:
            decode(text.encode())
        assert e.value.param == field
    assert read_object(f'{{"x": [0, {ok}, 0]}}', MAX_JSON_DEPTH, False) == json.loads(
        f'{{"x": [0, {ok}, 0]}}'
    )
    for text, field in (
        ('{"x": [0, 1, "\\ud800", 2]}', "x"),
        ('{"x": [{"\\udc00": 1}, 0]}', "x"),
        ('{"\\ud800": 1}', None),
    ):
        with pytest.raises(LoneSurrogate) as e:
            read_object(text, MAX_JSON_DEPTH, True)
        assert e.value.field == field
    assert read_object('{"x": ["\\ud83d\\ude00", 0]}', MAX_JSON_DEPTH, True) == {"x": ["\U0001f600", 0]}


BAD = ['{"a": [1,]}', '{"a": 1,}', '{"a": [1, 2 ,\n ]}', '{"a": {"b": 1 ,\n }}', '{"x": [[1,], 2]}', '{"a": [,]}',
       '{,}', '{"a" 1}', '{"a":}', '{"a": [1 2]}', '{"a": 1 "b": 2}', '{"a": [1,', '{"a": 1} x', '\ufeff{}',
       '{"a": [' + "1, " * 40 + "]}"]  # fmt: skip


@pytest.mark.parametrize("chunk", [4, CHUNK])
@pytest.mark.parametrize("text", BAD)
def test_errors_are_this_pythons_json_ones(text, chunk, monkeypatch):
    """json words some errors differently by version (3.13: "Illegal trailing comma before end of array", at the
    comma, where 3.12 says "Expecting value" after it): every error here is json's own, from a short piece."""
    monkeypatch.setattr(json_body, "CHUNK", chunk)
    monkeypatch.setattr(json_body, "FIRST_RUN", min(chunk, json_body.FIRST_RUN))
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        read_object(text, MAX_JSON_DEPTH, False)
    assert (got.value.msg, got.value.pos, str(got.value)) == (want.value.msg, want.value.pos, str(want.value))
    pieces: list[int] = []
    loads = json.loads

    def reworded(s: str, **kw):  # a json whose messages differ from every version's, as 3.13's did
        pieces.append(len(s))
        try:
            return loads(s, **kw)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError("reworded " + e.msg, e.doc, e.pos) from None

    monkeypatch.setattr(json, "loads", reworded)
    with pytest.raises(json.JSONDecodeError) as got:
        read_object(text, MAX_JSON_DEPTH, False)
    assert (got.value.msg, got.value.pos) == ("reworded " + want.value.msg, want.value.pos)
    assert pieces and max(pieces) <= 10  # json parsed a piece around the error, not the body
