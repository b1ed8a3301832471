"""The OpenAI options real clients use: logprobs / top_logprobs, echo with prompt logprobs, n candidates
sharing the prompt's KV pages, presence / frequency penalties, logit_bias and response_format (constrained
decoding with llguidance), through SamplingParams, LLM and the server with the official `openai` client."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from lserve_lite import EngineConfig, SamplingParams
from lserve_lite.backends.reference.sampling import allowed_tokens, bias_terms, penalty_terms, sample
from lserve_lite.errors import InvalidRequestError
from lserve_lite.sequence import Sequence

CFG = dict(num_kv_pages=128, max_model_len=256, max_num_seqs=64, page_size=16)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
LONG = "the quick brown fox jumps over the lazy dog " * 6  # 60+ tokens: several full pages


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def valid(obj) -> bool:
    return (
        isinstance(obj, dict) and set(obj) == {"name", "age", "tags"} and isinstance(obj["name"], str)
        and len(obj["name"]) <= 12 and isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
        and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b", "c"}
    )  # fmt: skip


# -- SamplingParams and the CPU sampler ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n=0), "n must be"), (dict(n=17), "n must be"), (dict(logprobs=21), "logprobs must be"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be"), (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"), (dict(logit_bias=[1]), "logit_bias"),
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {}}), "response_format"),
    ],
)  # fmt: skip
def test_sampling_params_refuse_in_one_line(kw, msg):
    with pytest.raises(InvalidRequestError, match=msg) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


def test_penalties_bias_and_mask_in_the_cpu_sampler():
    seq = Sequence([1, 2], SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.0,
                                          logit_bias={7: 3.0, 9: -100.0}))  # fmt: skip
    seq.output_ids = [4, 4, 4, 7]
    ids, deltas = bias_terms(seq, 100)
    assert dict(zip(ids.tolist(), deltas.tolist())) == {7: 3.0, 9: -100.0}
    ids, deltas = penalty_terms(seq, 100)
    assert dict(zip(ids.tolist(), deltas.tolist())) == {4: -3.5, 7: -1.5}
    x = np.zeros((1, 100), np.float32)
    x[0, 4], x[0, 9] = 3.0, 50.0  # 4 falls to -0.5 and 9 to -50: 7 (bias +3, penalty -1.5) wins
    assert sample(x, [seq]) == [7]
    allowed = np.zeros(128, bool)
    allowed[[3, 60]] = True
    seq.token_mask = np.packbits(allowed, bitorder="little").view(np.int32)
    assert allowed_tokens(seq.token_mask, 100).nonzero()[0].tolist() == [3, 60]
    assert sample(x, [seq]) == [3]  # x[3] = 0 > x[60] = 0 at a lower index
    seq.params = SamplingParams(temperature=1.5, seed=1)
    assert {sample(x, [seq])[0] for _ in range(50)} <= {3, 60}


# -- LLM ----------------------------------------------------------------------------------------------------
def test_logprobs_equal_teacher_forced_log_softmax(llm):
    out = llm.generate("hello world, how are you", SamplingParams(temperature=0, max_new_tokens=6, logprobs=3,
                                                                  prompt_logprobs=2))[0]  # fmt: skip
    ids = out.prompt_token_ids + out.token_ids
    lp = log_softmax(llm.logits(ids))
    p = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == p
    for j in range(1, p):
        e = out.prompt_logprobs[j]
        assert e.token_id == ids[j] and abs(e.logprob - lp[j - 1, ids[j]]) < 1e-4
        assert [t for t, _ in e.top] == np.argsort(-lp[j - 1], kind="stable")[:2].tolist()
    for i, e in enumerate(out.logprobs):
        assert abs(e.logprob - lp[p - 1 + i, out.token_ids[i]]) < 1e-4
        assert e.top[0] == (out.token_ids[i], pytest.approx(e.logprob))  # greedy: the chosen is the top
        assert len(e.top) == 3


def test_n_candidates_share_the_prompt_pages(llm):
    eng = llm.engine
    before = eng.prompt_tokens_computed
    outs = llm.generate(LONG, SamplingParams(n=4, temperature=1.0, seed=5, max_new_tokens=8, ignore_eos=True))
    p = len(outs[0].prompt_token_ids)
    shared = (p - 1) // 16 * 16
    assert len(outs) == 4 and len({tuple(o.token_ids) for o in outs}) > 1  # seeds 5..8: different samples
    assert eng.prompt_tokens_computed - before == p + 3 * (p - shared)  # the prompt prefilled once
    assert eng.blocks.num_used == 0


def test_stop_string_in_the_grammars_last_token(llm):
    """A stop string completed by the token that ends the grammar still cuts the text (it was checked only while
    no other finish reason had been found)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    p = dict(temperature=0, max_new_tokens=120, response_format=fmt)
    free = llm.generate("Describe a person.", SamplingParams(**p))[0]
    assert free.finish_reason == "stop" and free.text.endswith("}")
    cut = llm.generate("Describe a person.", SamplingParams(**p, stop=["}"]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find("}")]


def test_response_format_json_schema_and_object(llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    outs = llm.generate(["Describe a person."] * 20, SamplingParams(temperature=0.9, seed=None, max_new_tokens=120,
                                                                    response_format=fmt, n=1))  # fmt: skip
    assert all(o.finish_reason == "stop" and valid(json.loads(o.text)) for o in outs), [o.text for o in outs]
    out = llm.generate(
        "{", SamplingParams(temperature=0.8, max_new_tokens=200, response_format={"type": "json_object"})
    )
    assert out[0].finish_reason != "stop" or isinstance(json.loads(out[0].text), dict)
    with pytest.raises(InvalidRequestError, match="response_format: invalid JSON schema"):
        llm.generate(
            "x",
            SamplingParams(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}),
        )
    deep: dict = {"type": "object"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    for schema in ({"$ref": "#"}, deep):  # fails at the first mask, not at build; too deep for json.dumps
        with pytest.raises(InvalidRequestError, match="response_format: invalid JSON schema"):
            llm.generate(
                "x",
                SamplingParams(response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
            )
    assert not llm.engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match="logit_bias token id 999"):
        llm.generate("x", SamplingParams(logit_bias={999: 1.0}))


def test_boolean_json_schemas(llm):
    """JSON Schema's `true` (any value) and `false` (none), which SamplingParams accepts: `true` was refused as an
    invalid schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "any", "schema": True}}
    outs = llm.generate(
        ["x"] * 4, SamplingParams(temperature=0.8, seed=3, max_new_tokens=60, response_format=fmt)
    )
    for o in (o for o in outs if o.finish_reason == "stop"):
        json.loads(o.text)  # a whole JSON value
    with pytest.raises(InvalidRequestError, match="schema false allows no value"):
        llm.generate("x", SamplingParams(response_format=fmt | {"json_schema": {"schema": False}}))


def test_schema_bounds_past_2_53(llm):
    """llguidance holds a schema's bounds as float64 and its integer ranges in int64: an integer range at int64's
    minimum crashed the whole process (a segfault: every request lost), bounds past its maximum gave replies out of
    the range ("9223372036854775807" for a minimum of 1e30). A bound past 2^53 that narrows the range, anywhere in
    the schema, is refused in one line; one that only widens it (an int64 or uint64 type's) is pulled in to 2^53."""
    big = 10**30
    for schema in (
        {
            "type": "integer",
            "minimum": big,
            "maximum": big + 5,
        },  # answered 9223372036854775807, finish "stop"
        {"type": "integer", "minimum": -big, "maximum": -big + 2},  # crashed the process
        {"type": "number", "anyOf": [{"type": "integer"}], "minimum": 2 - 2**63, "maximum": 3 - 2**63},  # too
        {"type": "object", "properties": {"const": {"type": "integer", "exclusiveMaximum": -(2.0**64)}}},
    ):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        with pytest.raises(InvalidRequestError, match=r"^response_format: a \w+ is out of range"):
            llm.generate("x", SamplingParams(max_new_tokens=30, response_format=fmt))
    low = -(2**53)
    for schema, lo, hi in (
        (
            {"type": "integer", "minimum": low, "maximum": low + 2},
            low,
            low + 2,
        ),  # bounds within: kept exactly
        ({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}, low, -low),  # int64 (a 400 before)
        ({"type": "integer", "minimum": -big, "maximum": -5}, low, -5),
        ({"type": "integer", "minimum": 0, "maximum": 2**64 - 1}, 0, -low),  # uint64
    ):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        sp = SamplingParams(temperature=0.9, seed=1, max_new_tokens=30, response_format=fmt)
        outs = llm.generate(["x"] * 3, sp)
        assert all(o.finish_reason == "stop" and lo <= int(o.text) <= hi for o in outs), [
            o.text for o in outs
        ]
    assert not llm.engine.has_unfinished()


def test_schemas_nested_deeper_than_256_levels_through_refs_are_refused(llm):
    """llguidance's compiler recurses on a schema's levels, $refs followed: a chain of 2,000 definitions, each an
    array of the next (100 KB: the server's JSON nesting limit does not bound it), overflowed its stack, a segfault
    of the whole server. Deeper than 256 levels is refused in one line; recursive schemas (a $ref back up the path)
    and tools' parameters (refs against their own $id) still build."""
    from lserve_lite.engine.structured import MAX_SCHEMA_DEPTH

    def chain(n: int) -> dict:
        defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(n)}
        return {"$ref": "#/$defs/d0", "$defs": defs | {f"d{n}": {"type": "integer"}}}

    def fmt(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"schema": schema}}

    for n in (
        MAX_SCHEMA_DEPTH // 2,
        2000,
    ):  # 2 levels a link (the array, its items): 258 levels, then the crash
        with pytest.raises(InvalidRequestError, match=f"nests deeper than {MAX_SCHEMA_DEPTH} levels"):
            llm.generate("x", SamplingParams(max_new_tokens=5, response_format=fmt(chain(n))))
    kids = {"type": "array", "items": {"$ref": "#"}}
    tree = {
        "type": "object",
        "properties": {"v": {"type": "integer"}, "kids": kids},
        "required": ["v", "kids"],
    }
    for schema in (chain(MAX_SCHEMA_DEPTH // 2 - 2), tree):
        (out,) = llm.generate("x", SamplingParams(max_new_tokens=40, response_format=fmt(schema)))
        assert out.finish_reason in ("stop", "length"), out
    assert not llm.engine.has_unfinished()


def test_a_multiple_of_more_than_5_significant_digits_or_past_10_5_is_refused(llm):
    """llguidance's matcher for a multipleOf grows with its value: 1000003 took 8 s and 330 MB to build, 10000019
    (or 10^7 under an exclusiveMaximum of 10^7) over a minute and 2 GB, while every other constrained request waited
    (one build at a time). More than 5 significant digits, or past 10^5, is refused in one line; real multiples
    (0.01, 1000: a digit) are kept."""

    def fmt(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"schema": schema}}

    for multiple in (1000003, 10000019, 2**31, 123.4567, 10**7):
        with pytest.raises(
            InvalidRequestError, match="a multipleOf must be at most 100000 with at most 5 sig"
        ):
            a = {"type": "number", "multipleOf": multiple, "exclusiveMaximum": multiple}
            schema = {"type": "object", "properties": {"a": a}}
            llm.generate("x", SamplingParams(max_new_tokens=5, response_format=fmt(schema)))
    for multiple, kind in ((1000, "integer"), (99991, "integer"), (0.01, "number")):
        schema = {"type": kind, "multipleOf": multiple, "minimum": 0, "maximum": 10**6}
        (out,) = llm.generate(
            "x", SamplingParams(temperature=0, max_new_tokens=12, response_format=fmt(schema))
        )
        if out.finish_reason == "stop":
            value = json.loads(out.text)
            assert round(value / multiple, 6) == round(value / multiple) and 0 <= value <= 10**6, out.text
    assert not llm.engine.has_unfinished()


def _count_matchers(llguidance, monkeypatch) -> list:
    """llguidance's matcher with its constructions counted: the list grows by one a build."""
    built, real = [], llguidance.LLMatcher

    class Counted:
        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)

        def __new__(cls, *args, **kw):
            built.append(1)
            return real(*args, **kw)

    monkeypatch.setattr(llguidance, "LLMatcher", Counted)
    return built


def test_a_schemas_multiples_are_bounded_in_all(llm, monkeypatch):
    """Each multipleOf up to 10^5 was allowed, but the matcher holds an automaton for each, built in time about
    linear in its value: five near 10^5 in one schema took 3.5 s, every other constrained request waiting. A
    schema's distinct multipleOf values must sum to at most MAX_MULTIPLE: such a schema is refused in one line
    before any build; the same value many times is built once, as one."""
    llguidance = pytest.importorskip("llguidance")
    from lserve_lite.engine.structured import MAX_MULTIPLE

    built = _count_matchers(llguidance, monkeypatch)

    def fmt(*multiples: int) -> dict:
        props = {f"p{i}": {"type": "integer", "multipleOf": m} for i, m in enumerate(multiples)}
        return {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": props}}}

    near = [99991, 99989, 99971, 99961, 99929]  # each allowed alone
    with pytest.raises(
        InvalidRequestError, match=r"multipleOf values \(each distinct one\) must sum to at most "
    ):
        llm.generate("x", SamplingParams(max_new_tokens=5, response_format=fmt(*near)))
    with pytest.raises(InvalidRequestError, match="must sum to at most 100000"):
        llm.generate("x", SamplingParams(max_new_tokens=5, response_format=fmt(60000, 40001)))
    assert built == []  # refused before llguidance built anything
    for multiples in ((3, 3, 3, 5, 5000), (MAX_MULTIPLE // 2, MAX_MULTIPLE // 2, 7)):
        (out,) = llm.generate("x", SamplingParams(max_new_tokens=3, response_format=fmt(*multiples)))
        assert out.finish_reason in ("stop", "length"), out
    assert len(built) == 2 and not llm.engine.has_unfinished()


# llguidance gives up on this pattern after some characters (its lexer's limit) and then allows only EOS
GIVES_UP = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"a": {"type": "string", "pattern": "^(.{1,1000}){1,1000}x$"}}, "required": ["a"]}}}  # fmt: skip


def test_a_grammar_that_gives_up_is_no_stop(llm):
    """A reply cut where the grammar failed ended "stop", as if its JSON were whole."""
    (out,) = llm.generate("x", SamplingParams(temperature=0, max_new_tokens=100, response_format=GIVES_UP))
    assert out.finish_reason == "error" and out.text.startswith('{"a":"') and len(out.token_ids) < 100


def test_a_schema_is_built_once(llm, monkeypatch):
    """n candidates and repeated requests of one schema build its matcher once (building is what costs: seconds
    for a large schema, on the engine thread; n=16 built it 16 times); each request advances its own copy."""
    llguidance = pytest.importorskip("llguidance")
    built = _count_matchers(llguidance, monkeypatch)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA | {"title": "built once"}},
    }
    p = SamplingParams(n=4, temperature=0.9, seed=1, max_new_tokens=120, response_format=fmt)
    outs = llm.generate("Describe a person.", p) + llm.generate("Another one.", p)
    assert len(built) == 1 and len({o.text for o in outs}) > 1
    assert all(o.finish_reason == "stop" and valid(json.loads(o.text)) for o in outs), [o.text for o in outs]
    # bounded: the 16 met last, fewer past 2^21 characters of schemas (a large one's matcher holds ~50 MB)
    g = llm.engine.grammars

    def build(schema: dict) -> int:
        before = len(built)
        g.matcher({"type": "json_schema", "json_schema": {"schema": schema}})
        return len(built) - before

    assert [build({"type": "integer", "title": str(i)}) for i in range(17)] == [1] * 17
    assert build({"type": "integer", "title": "16"}) == 0 and build({"type": "integer", "title": "0"}) == 1
    assert build({"type": "integer", "description": "x" * (1 << 21)}) == 1
    assert build({"type": "integer", "title": "16"}) == 1


def test_one_bitmask_per_sampled_token(llm):
    """The first mask, computed when the request is added (to refuse bad schemas early), serves the first token."""

    class Counting:
        def __init__(self, m):
            self.m, self.masks = m, 0

        def compute_bitmask(self):
            self.masks += 1
            return self.m.compute_bitmask()

        def __getattr__(self, name):
            return getattr(self.m, name)

    eng = llm.engine
    rid = eng.add_request("x", SamplingParams(max_new_tokens=4, response_format={"type": "json_object"}))
    guide = eng.seqs[rid].guide = Counting(eng.seqs[rid].guide)
    tokens = 0
    while eng.has_unfinished():
        tokens += sum(len(o.token_ids) for o in eng.step() if o.request_id == rid)
    assert tokens >= 2 and guide.masks == tokens - 1  # the first token used add_request's mask


# -- the server -----------------------------------------------------------------------------------------------
def test_completion_echo_logprobs_as_lm_eval_reads_them(client, llm):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens=1, temperature 0."""
    ids = llm.tokenizer.encode("the quick brown fox jumps")
    r = client.completions.create(
        model="tiny", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0
    )
    lp = r.choices[0].logprobs
    want = log_softmax(llm.logits(ids))
    assert (
        len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    )
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - want[j - 1, ids[j]]) < 1e-4
    greedy = int(np.argmax(want[-1]))
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values()) and r.usage.completion_tokens == 1
    assert r.choices[0].text.startswith(llm.tokenizer.decode(ids, False))
    assert abs(lp.token_logprobs[-1] - want[-1, greedy]) < 1e-4
    assert lp.text_offset[0] == 0 and lp.tokens[1] == llm.tokenizer.decode([ids[1]], False)


MULTIBYTE = "Café ☕ is 🐦 ok"


def test_logprob_bytes_and_offsets_of_partial_characters(llm):
    """Tokens that hold part of a UTF-8 character: their `bytes` are those bytes (joined, the text), and text
    offsets are where their character starts: the tokenizers library's own encode offsets (the reference)."""
    from lserve_lite.sequence import TokenLogprob
    from lserve_lite.serve.logprobs import LogprobFormatter, TextOffsets

    enc = llm.tokenizer.tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any(llm.tokenizer.decode([i]).endswith("\ufffd") for i in enc.ids)  # the case this is about
    fmt = LogprobFormatter(llm.tokenizer)
    entries = [TokenLogprob(i, -1.0, [(i, -1.0)]) for i in enc.ids]
    content = fmt.chat(entries)["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == MULTIBYTE
    assert bytes(content[0]["top_logprobs"][0]["bytes"]) == bytes(content[0]["bytes"])
    assert fmt.completion(entries, enc.ids, TextOffsets())["text_offset"] == [a for a, _ in enc.offsets]
    cut = len(enc.ids) // 2  # a stream's chunks continue one another's offsets
    offsets = TextOffsets()
    parts = [
        fmt.completion(entries[:cut], enc.ids[:cut], offsets),
        fmt.completion(entries[cut:], enc.ids[cut:], offsets),
    ]
    assert [a for p in parts for a in p["text_offset"]] == [a for a, _ in enc.offsets]


def test_top_logprobs_keep_alternatives_that_read_alike(llm):
    """Completions' top_logprobs is a dict by token string: parts of different UTF-8 characters all read U+FFFD
    and overwrote one another (fewer than `logprobs` entries came back). They are named by their bytes, as
    OpenAI's "bytes:\\xe2"; tokens of one text (a byte-fallback token and the piece) by id, "token_id:N"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from lserve_lite.sequence import TokenLogprob
    from lserve_lite.serve.logprobs import LogprobFormatter, TextOffsets
    from lserve_lite.tokenizer import Tokenizer, bytes_to_unicode

    byte = {b: llm.tokenizer.token_id(c) for b, c in bytes_to_unicode().items()}
    e = TokenLogprob(byte[0xF0], -2.0, [(byte[0xE2], -1.0), (byte[0xF0], -2.0), (byte[0x5C], -3.0)])
    done = LogprobFormatter(llm.tokenizer).completion([e], [byte[0xF0]], TextOffsets())
    assert done["tokens"] == ["bytes:\\xf0"]
    assert done["top_logprobs"] == [{"bytes:\\xe2": -1.0, "bytes:\\xf0": -2.0, "\\": -3.0}]
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "A": 257}
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fmt = LogprobFormatter(Tokenizer.from_parts(hf, {}, Path("spm")))
    e = TokenLogprob(1 + 0x41, -2.0, [(257, -1.0), (1 + 0x41, -2.0), (1 + 0x98, -3.0)])
    done = fmt.completion([e], [1 + 0x41], TextOffsets())
    assert done["tokens"] == ["A"]  # the chosen token keeps the name; the likelier one of its text goes by id
    assert done["top_logprobs"] == [{"token_id:257": -1.0, "A": -2.0, "bytes:\\x98": -3.0}]


def test_echo_offsets_index_the_echoed_text(tmp_path):
    """echo with logprobs: text_offset indexes the returned text. With a tokenizer that adds a BOS (a llama GGUF's)
    the offsets counted it, and SentencePiece's space before the first word, though the echoed prompt shows
    neither: each was 4 characters past its token. The reference for a prompt as sent is the tokenizers library's
    own offsets; prompt ids echo as decoded; the generated tokens' offsets go on from the prompt's end. A prompt
    that starts with the BOS's text gave that text to the added BOS, and the prompt's own BOS the next token's
    offset."""
    from test_gguf_import import write_tiny_gguf

    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="llama")
    engine = LLMEngine(str(tmp_path / "spm.gguf"), "cpu", EngineConfig(num_kv_pages=16, page_size=16))
    tok, prompt = engine.tokenizer, "the theater at the inn"
    enc = tok.tok.encode(prompt)
    starts = [a for a, _ in enc.offsets]
    assert tok.decode(enc.ids[:1], False) == "<s>" and starts[:3] == [
        0,
        0,
        3,
    ]  # a BOS the prompt does not show
    cases = [  # prompt, its echo, the offsets of its tokens
        (prompt, prompt, starts),
        ([enc.ids], "<s> the theater at the inn", [0] + [3 + a + (a > 0) for a in starts[1:]]),
        ([enc.ids[1:]], prompt, starts[1:]),  # the decoder drops the first word's space
        # a prompt that starts with the BOS's text: it is the second BOS's (the first was at 3, on the next token)
        ("<s>" + prompt, "<s>" + prompt, [a for a, _ in tok.tok.encode("<s>" + prompt).offsets]),
    ]
    with ServerThread(create_app(engine, served_model_name="spm")) as url:
        for p, echo, want in cases:
            body = {"prompt": p, "max_tokens": 4, "echo": True, "logprobs": 1, "ignore_eos": True}
            for stream in (False, True):
                with httpx.stream(
                    "POST", url + "/v1/completions", json=body | {"stream": stream}, timeout=60
                ) as r:
                    got = [
                        json.loads(x.removeprefix("data: "))
                        for x in r.iter_lines()
                        if x.startswith(("{", "data: {"))
                    ]
                choices = [c for g in got for c in g["choices"]]
                text = "".join(c["text"] for c in choices)
                off = [a for c in choices if c["logprobs"] for a in c["logprobs"]["text_offset"]]
                assert text.startswith(echo) and off[: len(want)] == want, (p, stream, off)
                assert off[len(want)] == len(echo) and off[len(want) :] == sorted(off[len(want) :])
    assert engine.blocks.num_used == 0


def test_echo_offsets_past_a_special_token_of_a_metaspace_always_vocabulary():
    """Metaspace "always" (Llama 2's legacy tokenizer) puts a space before each word after a special token, which the
    prompt as sent does not have: from the second such word on, the echoed offsets ran one character late per
    word. The reference is the tokenizers library's own offsets."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from lserve_lite.serve.logprobs import LogprobFormatter, TextOffsets
    from lserve_lite.tokenizer import Tokenizer

    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "▁hi": 2, "▁there": 3}, unk_token="<unk>"))
    hf.add_special_tokens(["<s>"])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    prompt = "hi<s>there<s>hi"
    enc = hf.encode(prompt)
    assert enc.tokens == ["▁hi", "<s>", "▁there", "<s>", "▁hi"]
    done = LogprobFormatter(Tokenizer.from_parts(hf, {}, Path("x"))).echo(
        prompt, [None] * 5, enc.ids, TextOffsets()
    )
    assert done["text_offset"] == [a for a, _ in enc.offsets] == [0, 2, 5, 10, 13]


def test_special_tokens_take_no_room_in_text_offsets(client):
    """A special token the text leaves out (an EOS under ignore_eos) counted its own text in the offsets of the
    tokens after it, which then pointed past the text."""
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=3, logprobs=0, logit_bias={"2": 100},
                                  extra_body={"ignore_eos": True})  # fmt: skip
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "" and lp.tokens == ["<|im_end|>"] * 3 and lp.text_offset == [0, 0, 0]


def test_completion_top_logprobs_hold_the_chosen_token(client):
    """OpenAI's completions logprobs return the chosen token's logprob among the top ones ("up to logprobs + 1
    elements", as vLLM's): a sampled token outside the top k was missing, and logprobs 0 gave empty dicts, so a
    client looking the chosen token up in top_logprobs failed."""
    for logprobs in (0, 1):
        lp = client.completions.create(model="tiny", prompt="hello", max_tokens=8, logprobs=logprobs, temperature=5,
                                       seed=3, extra_body={"ignore_eos": True}).choices[0].logprobs  # fmt: skip
        assert all(top[t] == v for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        sizes = {len(top) for top in lp.top_logprobs}  # temperature 5: some sampled token is not the top one
        assert sizes == {1} if logprobs == 0 else sizes <= {1, 2} and 2 in sizes


def test_streamed_text_offsets_behind_a_stop_string(client):
    """A stop string holds text back from the chunks while their tokens go out: the streamed offsets still
    count the tokens, as the whole reply's do."""
    kw = dict(model="tiny", prompt="the quick", max_tokens=8, temperature=0, logprobs=0, stop=["x" * 40],
              extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw).choices[0].logprobs.text_offset
    chunks = client.completions.create(**kw, stream=True)
    streamed = [
        a for c in chunks if c.choices and c.choices[0].logprobs for a in c.choices[0].logprobs.text_offset
    ]
    assert len(whole) == 8 and streamed == whole and whole == sorted(whole) and whole[-1] > 0


def test_token_bytes_of_a_byte_fallback_vocabulary():
    """SentencePiece-style vocabularies spell a byte as `<0xNN>` (Llama 2, Mistral): token_bytes gives the byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from lserve_lite.tokenizer import Tokenizer

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁is": 257, "▁ok": 258}
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer.from_parts(hf, {}, Path("spm"))
    assert [tok.token_bytes(i) for i in (1 + 0xE2, 1 + 0x98, 257)] == [b"\xe2", b"\x98", b" is"]


def test_logprob_tokens_of_a_sentencepiece_vocabulary_keep_their_spaces(tmp_path):
    """With the decoder real SentencePiece vocabularies have (Llama 2, Mistral, a llama GGUF's: it strips a text's
    first space), "▁the" decoded alone read "the": logprob tokens and bytes lost their spaces and text offsets
    fell behind the text. Joined, they must be the text the tokens continue a prompt with."""
    from test_gguf_import import write_tiny_gguf

    from lserve_lite.sequence import TokenLogprob
    from lserve_lite.serve.logprobs import LogprobFormatter, TextOffsets
    from lserve_lite.weights.gguf_weights import gguf_tokenizer

    write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="llama")
    tok = gguf_tokenizer(tmp_path / "spm.gguf")
    prompt, ids = tok.encode("at"), tok.encode("the theater at the inn", add_special_tokens=False)
    text = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert text == " the theater at the inn"
    fmt = LogprobFormatter(tok)
    entries = [TokenLogprob(i, -1.0, [(i, -1.0)]) for i in ids]
    content = fmt.chat(entries)["content"]
    assert "".join(c["token"] for c in content) == text
    assert bytes(b for c in content for b in c["bytes"]).decode() == text
    done = fmt.completion(entries, ids, TextOffsets())
    assert [text[a:] for a in done["text_offset"][:2]] == [text, text[4:]]


def test_scoring_with_max_tokens_0_and_echo(server, client, llm):
    """Legacy OpenAI scoring (older lm-evaluation-harness): max_tokens 0 with echo returns the prompt and its
    logprobs only, streamed or not; without echo it is refused."""
    import httpx

    ids = llm.tokenizer.encode("the quick brown fox jumps")
    want = log_softmax(llm.logits(ids))
    r = client.completions.create(
        model="tiny", prompt=[ids], max_tokens=0, logprobs=1, echo=True, temperature=0
    )
    lp, text = r.choices[0].logprobs, llm.tokenizer.decode(ids, False)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert all(abs(lp.token_logprobs[j] - want[j - 1, ids[j]]) < 1e-4 for j in range(1, len(ids)))
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt=[ids], max_tokens=0, logprobs=1, echo=True,
                                            temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == text
    assert sum(len(c.choices[0].logprobs.token_logprobs) for c in chunks if c.choices[0].logprobs) == len(ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    r = httpx.post(
        server[0] + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 0}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_scoring_a_prompt_of_the_whole_context(server, client, llm):
    """lm-eval's loglikelihood of a prompt of exactly max_model_len tokens (max_tokens 0, echo) is scorable: the
    one token the engine takes after it is sampled from its last position and needs no KV slot. It was refused
    as over the context; a prompt one token longer, or the same one generating, still is."""
    import httpx

    ids = [3 + i % 200 for i in range(256)]
    want = log_softmax(llm.logits(ids))
    r = client.completions.create(
        model="tiny", prompt=[ids], max_tokens=0, logprobs=1, echo=True, temperature=0
    )
    lp = r.choices[0].logprobs.token_logprobs
    assert len(lp) == 256 and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert max(abs(lp[j] - want[j - 1, ids[j]]) for j in range(1, 256)) < 1e-4
    for prompt, max_tokens in ((ids + [5], 0), (ids, 1), (ids, None)):
        body = {"model": "tiny", "prompt": prompt, "echo": True, "max_tokens": max_tokens}
        r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert server[1].blocks.num_used == 0


def test_batch_prompts_n_and_cached_tokens(server, client):
    url, engine = server
    r = client.completions.create(model="tiny", prompt=[LONG, "hello world"], n=3, max_tokens=4, temperature=1.0,
                                  seed=11, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in r.choices] == list(range(6)) and all(
        c.finish_reason == "length" for c in r.choices
    )
    p = len(engine.tokenizer.encode(LONG))
    assert r.usage.prompt_tokens == p + len(engine.tokenizer.encode("hello world"))
    assert r.usage.prompt_tokens_details.cached_tokens >= (p - 1) // 16 * 16  # candidates attached the prompt
    assert r.usage.completion_tokens == 24
    assert engine.blocks.num_used == 0


def test_chat_logprobs_streaming_and_not(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob for c in content)  # greedy
    streamed = [c for ch in client.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]  # fmt: skip
    # The second request reuses the first one's cached prompt page and prefills only the rest (other GEMM shapes):
    # its K/V can differ in the last bits, so its logprobs agree to float32 rounding, not bit for bit.
    assert [c.token for c in streamed] == [c.token for c in content]
    assert np.allclose([c.logprob for c in streamed], [c.logprob for c in content], rtol=0, atol=1e-5)


def test_streamed_completion_n_echo(server):
    body = {"prompt": "hello", "max_tokens": 3, "n": 2, "echo": True, "logprobs": 1, "stream": True,
            "temperature": 0.7, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    finish = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finish) == [0, 1] and events[-1]["usage"]["completion_tokens"] == 6
    first: dict[int, dict] = {}
    for c in (c for e in events for c in e["choices"]):
        first.setdefault(c["index"], c)
    assert all(
        c["text"].startswith("hello") and c["logprobs"]["token_logprobs"][0] is None for c in first.values()
    )


def test_penalties_and_logit_bias(server, client):
    tok = server[1].tokenizer
    kw = dict(
        model="tiny", prompt="hello", max_tokens=6, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    forced = client.completions.create(**kw, logit_bias={"42": 100}).choices[0].logprobs.tokens
    assert forced == [tok.decode([42], False)] * 6
    # the tiny model's logits span less than 4: presence + frequency 2 + 2 forbid any repeat under greedy
    ids = [t for t, _ in _token_ids(client, kw | {"presence_penalty": 2.0, "frequency_penalty": 2.0})]
    assert len(set(ids)) == 6


def _token_ids(client, kw: dict) -> list[tuple[int, float]]:
    """Generated token strings come back; their logprobs identify them with top_logprobs=1 (greedy: top = chosen)."""
    r = client.completions.create(**(kw | {"logprobs": 1}))
    lp = r.choices[0].logprobs
    return [(t, v) for t, v in zip(lp.tokens, lp.token_logprobs)]


def test_the_server_builds_grammars_off_the_engine_thread(server, client, monkeypatch):
    """A new schema's matcher (seconds for a large one) is built before the request reaches the engine thread,
    which then never builds nor looks up one: built inside add_request, it stalled every client's decoding."""
    import threading

    grammars = server[1].grammars
    builds, lookups = [], []
    real_build, real_matcher = grammars._build, grammars.matcher

    def build(*args):
        builds.append(threading.current_thread().name)
        return real_build(*args)

    def matcher(fmt):
        lookups.append(threading.current_thread().name)
        return real_matcher(fmt)

    monkeypatch.setattr(grammars, "_build", build)
    monkeypatch.setattr(grammars, "matcher", matcher)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": SCHEMA | {"title": "off the thread"}},
    }
    kw = dict(
        model="tiny", messages=[{"role": "user", "content": "a person"}], max_tokens=150, response_format=fmt
    )
    r = client.chat.completions.create(n=3, temperature=0.7, **kw)
    assert all(valid(json.loads(c.message.content)) for c in r.choices)
    assert list(client.chat.completions.create(stream=True, **kw))[-1].choices[0].finish_reason in (
        "stop",
        "length",
    )
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    e = httpx.post(
        server[0] + "/v1/chat/completions",
        json={"messages": kw["messages"], "response_format": bad},
        timeout=60,
    )
    assert e.status_code == 400 and e.json()["error"]["param"] == "response_format"
    assert len(builds) == 2 and len(lookups) == 5  # the schema once (n and repeats share it), the bad one
    assert "lserve-engine" not in builds + lookups, builds + lookups
    assert server[1].blocks.num_used == 0


def test_grammar_builds_leave_the_shared_worker_threads_free(server, monkeypatch):
    """Matchers were built in the event loop's default worker threads, which also decode every request's body:
    clients with new large schemas, built one at a time, held those threads while they waited their turn, and
    every other client's request waited behind them (a plain completion took 8.9 s beside 10 new schemas of 0.3 s
    each, 0.04 s alone). Builds run on a thread of their own; a plain request passes a build held up."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    url, engine = server
    gate, names = threading.Event(), []
    real = engine.guide

    def guide(params):
        names.append(threading.current_thread().name)
        gate.wait(30)
        return real(params)

    monkeypatch.setattr(engine, "guide", guide)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        fmt = {"response_format": {"type": "json_object"}}
        held = pool.submit(httpx.post, url + "/v1/completions", json=body | fmt, timeout=60)
        try:
            for _ in range(3000):  # until the build is held (at most 30 s)
                if names or held.done():
                    break
                threading.Event().wait(0.01)
            plain = httpx.post(url + "/v1/completions", json=body, timeout=30)
        finally:
            gate.set()
        assert plain.status_code == 200 and held.result().status_code == 200, held.result().text
    assert names == ["lserve-grammar_0"], names


def test_structured_outputs_through_the_server(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a person"}], n=8,
                                       temperature=0.7, max_tokens=150, response_format=fmt)  # fmt: skip
    assert all(valid(json.loads(c.message.content)) for c in r.choices), [
        c.message.content for c in r.choices
    ]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=150,
                                       response_format={"type": "json_object"}, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "length" or isinstance(
        json.loads(r.choices[0].message.content), dict
    )
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    e = httpx.post(server[0] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                             "response_format": bad}, timeout=60).json()["error"]  # fmt: skip
    assert e["param"] == "response_format" and re.search("invalid JSON schema", e["message"])
    ask = {"messages": [{"role": "user", "content": "x"}], "response_format": GIVES_UP, "temperature": 0}
    e = httpx.post(server[0] + "/v1/chat/completions", json=ask, timeout=60)
    assert e.status_code == 400 and "constrained decoding failed after" in e.json()["error"]["message"]
    with httpx.stream(
        "POST", server[0] + "/v1/chat/completions", json=ask | {"stream": True}, timeout=60
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "constrained decoding failed" in events[-2] and events[-1] == "data: [DONE]"
    assert not any('"finish_reason": "stop"' in x for x in events)
    assert server[1].blocks.num_used == 0


def test_shutdown_while_a_grammar_builds_refuses_the_request(tiny_dir):
    """The server shutting down while a request's grammar is built (in a worker thread) answers that request 503:
    its submission went into an inbox no engine thread would take again, and the client waited forever."""
    import asyncio

    pytest.importorskip("llguidance")
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.async_engine import AsyncEngine
    from lserve_lite.serve.protocol import ApiError

    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
    params = SamplingParams(max_new_tokens=4, response_format={"type": "json_object"})

    async def go():
        aengine = AsyncEngine(engine)
        real = engine.grammars.matcher

        def matcher(fmt):  # the shutdown lands during the build
            aengine.shutdown()
            return real(fmt)

        engine.grammars.matcher = matcher
        aengine.start(asyncio.get_running_loop())
        return await asyncio.wait_for(aengine.submit([([5, 6, 7], params, "late")]), timeout=60)

    with pytest.raises(ApiError) as e:
        asyncio.run(go())
    assert e.value.status == 503


def test_the_server_builds_llguidances_tokenizer_at_start(tiny_dir, monkeypatch):
    """Building llguidance's tokenizer holds the GIL 0.2-0.4 s (1.7 s under load): built at the first structured
    request, it stalled every stream. The server builds it once at start, in its grammar thread, without waiting for
    it (the build is held here until the server is up); a structured request meanwhile waits for it."""
    llguidance = pytest.importorskip("llguidance")
    pytest.importorskip("fastapi")
    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    real, builders, release = llguidance.LLTokenizer, [], threading.Event()

    def held(*args, **kw):  # llguidance's tokenizer, its builds counted, each held until `release`
        builders.append(threading.current_thread().name)
        release.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(llguidance, "LLTokenizer", held)
    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
    body = {"prompt": "x", "max_tokens": 4, "response_format": {"type": "json_object"}}
    with ServerThread(create_app(engine)) as url:  # up while the build is held
        deadline = time.monotonic() + 30
        while not builders and time.monotonic() < deadline:
            time.sleep(0.01)
        assert builders and builders[0].startswith("lserve-grammar")  # before any request
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            time.sleep(0.5)
            assert not first.done()  # waits for the build
            release.set()
            assert first.result().status_code == 200
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert len(builders) == 1


def test_preparing_grammars_without_llguidance_or_an_eos_id_builds_nothing(llm, monkeypatch):
    """The server prepares llguidance's tokenizer at start: without llguidance, or for a model that names no end id,
    that builds nothing and raises nothing (the server starts), and a structured request still gets its one line."""
    from lserve_lite.engine.structured import INSTALL, Grammars

    tok, vocab = llm.engine.tokenizer, llm.engine.cfg.vocab_size
    no_eos = Grammars(tok, vocab, [])
    no_eos.prepare()
    assert no_eos._ll_tok is None
    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` raises ImportError
    absent = Grammars(tok, vocab, [2])
    absent.prepare()
    assert absent._ll_tok is None
    with pytest.raises(InvalidRequestError, match=re.escape(INSTALL)):
        absent.matcher({"type": "json_object"})
