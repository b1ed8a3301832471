"""Structured outputs (`response_format`) by constrained decoding with llguidance: one grammar matcher per
request; each step it writes the allowed-token bitmask that the backend's sampler applies (CPU or GPU), and
takes the sampled token back. llguidance is optional (the `structured` extra): Rust wheels, no torch."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from decimal import Decimal

import numpy as np

from ..errors import InvalidRequestError
from ..sampling_params import schema_of
from ..sequence import Sequence
from ..tokenizer import Tokenizer

INSTALL = "structured outputs need the llguidance package: pip install 'lserve-lite[structured]'"
# Compact JSON: a model may not pad with endless whitespace (a random or weak model otherwise does).
JSON_OPTIONS = {"whitespace_flexible": False}
# Matchers built (in their first state) kept per schema: building one takes up to seconds for a large schema, and
# n candidates or a client's repeated requests share their schema. At most 16, and the
# newest only past 2^21 characters of schemas in all (a 1 MB schema's matcher holds ~50 MB; copies share it).
CACHED_SCHEMAS, CACHED_CHARS = 16, 1 << 21
# llguidance reads a schema's numeric bounds as float64 and builds integer ranges in int64: a bound past 2^53 is not
# held exactly, and past int64 it saturates (an integer range at int64's minimum crashed the whole process, one
# past its maximum allowed values out of the range). A bound past this that only widens the range (an int64 or
# uint64 type's) is pulled in to it, a narrower range of valid values; one that narrows it is refused.
MAX_BOUND = 1 << 53
# llguidance's matcher for a `multipleOf` grows with its value past its factors of 10 (a divisibility automaton) and,
# beside a bound, with its magnitude: 99991 builds in 0.8 s with SmolLM2's vocabulary, 1000003 took 8 s and 330 MB,
# 10000019 over a minute and 2 GB, 10^7 under an exclusiveMaximum of 10^7 (a number) too, holding every constrained
# request (one build at a time). Real ones (0.01, 5, 1000) have a digit or two. The bound is on a schema's distinct
# values summed: each builds its own automaton, in time about linear in its value (19997: 0.06 s, 99991: 0.5 s), and
# five values near 10^5, each allowed alone, took 3.5 s.
MAX_MULTIPLE, MAX_MULTIPLE_DIGITS = 10**5, 5
_LOWER, _UPPER = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")
# keywords that hold values, not schemas (their bounds are data), and those that map names to schemas
_DATA = ("const", "enum", "default", "examples")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Schema levels on a path from the root, $refs followed, at most: llguidance's compiler recurses on them, and a chain
# of ~2,000 definitions each referring to the next (a 100 KB body: JSON nesting does not bound it) overflowed its
# stack, a segfault of the whole process. Real schemas nest a few dozen levels.
MAX_SCHEMA_DEPTH = 256


class Grammars:
    """Builds matchers for one tokenizer; llguidance's tokenizer is made by `prepare` (the server's start) or on first
    use. Thread-safe (one build at a time): the server builds in worker threads, off the engine thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._ll_tok = None
        self._lock = threading.Lock()  # guards the llguidance tokenizer and the kept matchers
        self._built: OrderedDict[str, tuple[object, np.ndarray]] = OrderedDict()  # schema text -> first state

    def prepare(self) -> None:
        """Build llguidance's tokenizer now: its build holds the GIL 0.2-1.7 s, which at a first structured request
        stalled every stream. Without llguidance or an end-of-sequence id it builds nothing (a request says why)."""
        with self._lock:
            try:
                self._llg()
            except InvalidRequestError:
                pass

    def _llg(self):
        try:
            import llguidance
        except ImportError:
            raise InvalidRequestError(INSTALL) from None
        if self._ll_tok is None:
            if not self.eos_ids:  # llguidance raised ValueError (a grammar's reply ends with one)
                raise InvalidRequestError(
                    "structured outputs need the model's end-of-sequence id: it names none (eos_token_id in"
                    " config.json or generation_config.json)"
                )
            raw = self.tokenizer.tok.to_str()
            try:
                self._ll_tok = llguidance.LLTokenizer(
                    raw, n_vocab=self.vocab_size, eos_token=list(self.eos_ids)
                )
            except TypeError:  # older llguidance releases take one end-of-sequence id
                self._ll_tok = llguidance.LLTokenizer(raw, n_vocab=self.vocab_size, eos_token=self.eos_ids[0])
        return llguidance

    def matcher(self, response_format: dict) -> tuple[object, np.ndarray]:
        """A fresh matcher for an OpenAI response format and its first bitmask (int32 words); an invalid schema is
        a one-line InvalidRequestError. A schema met lately is not built again: its first state is copied."""
        with self._lock:
            return self._matcher(response_format)

    def _matcher(self, response_format: dict) -> tuple[object, np.ndarray]:
        llg = self._llg()
        kind = response_format["type"]
        named = []  # a Lark grammar's schemas: its `json_schema` (@<its name>), a `reply_format`'s (@reply)
        if kind == "lark":
            named.append((response_format["json_schema"].get("name", "schema"), response_format))
            if response_format.get("reply_format") is not None:
                named.append(("reply", response_format["reply_format"]))
        schemas = [_schema_text(f) for _, f in named] if named else [_schema_text(response_format)]
        # a Lark grammar's key: the grammar, then its schemas, each after a NUL (json.dumps writes no NUL)
        key = "\0".join([response_format["lark"], *(t for _, t in schemas)]) if named else schemas[0][1]
        built = self._built.get(key)
        if built is None:
            held = [_checked(schema, text) for schema, text in schemas]
            if named:  # each schema is the grammar's @name
                subs = [{"name": name, "json_schema": {**json.loads(h), "x-guidance": JSON_OPTIONS}}
                        for (name, _), h in zip(named, held)]  # fmt: skip
                grammar = json.dumps({"grammars": [{"lark_grammar": response_format["lark"]}, *subs]})
            else:
                grammar = self._grammar_of(llg, held[0])
            built = self._build(llg, grammar)
            self._built[key] = built
            while len(self._built) > 1 and (
                len(self._built) > CACHED_SCHEMAS or sum(map(len, self._built)) > CACHED_CHARS
            ):
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return built[0].deep_copy(), built[1]

    @staticmethod
    def _grammar_of(llg, schema: str) -> str:
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except (ValueError, TypeError, RecursionError) as e:
            raise InvalidRequestError(f"response_format: invalid JSON schema ({_one_line(e)})") from None

    def _build(self, llg, grammar: str) -> tuple[object, np.ndarray]:
        m = llg.LLMatcher(self._ll_tok, grammar, log_level=0)
        # some schemas (e.g. {"$ref": "#"}) fail only at the first mask: compute it now and refuse them here
        first = None if m.is_error() else m.compute_bitmask()
        if m.is_error():
            raise InvalidRequestError(f"response_format: invalid JSON schema ({_one_line(m.get_error())})")
        return m, self._words(first)

    def fill_masks(self, seqs: list[Sequence]) -> None:
        """This step's bitmask on each constrained sequence whose matcher moved since its last one
        (`seq.token_mask`, int32 words; `advance` clears it)."""
        for seq in seqs:
            if seq.guide is not None and seq.token_mask is None:
                seq.token_mask = self._words(seq.guide.compute_bitmask())

    def _words(self, raw: bytes) -> np.ndarray:
        words = (self.vocab_size + 31) // 32
        mask = np.frombuffer(raw, np.int32)
        return mask[:words] if mask.size >= words else np.pad(mask, (0, words - mask.size))


def _schema_text(fmt: dict) -> tuple[object, str]:
    """A response format's JSON schema (json_object: any object; a json_schema's or a Lark grammar's `json_schema`)
    and its JSON text; a one-line InvalidRequestError for `false` or one that is not JSON."""
    schema = {"type": "object"} if fmt["type"] == "json_object" else schema_of(fmt)
    if schema is False:
        raise InvalidRequestError("response_format: the JSON schema false allows no value")
    if schema is True:  # JSON Schema's `true`: any value (llguidance takes objects only)
        schema = {}
    try:
        return schema, json.dumps(schema)
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidRequestError(f"response_format: invalid JSON schema ({_one_line(e)})") from None


def _checked(schema: object, text: str) -> str:
    """A schema's text as llguidance gets it (`_held_numbers`), after the checks of what it cannot compile."""
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"response_format: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels (its $refs "
            "followed), which llguidance cannot compile"
        )
    return _held_numbers(text)


def _held_numbers(text: str) -> str:
    """A schema's JSON text with every bound past MAX_BOUND that only widens its range pulled in to MAX_BOUND (a
    minimum below -2^53, a maximum above 2^53); a one-line InvalidRequestError for one that narrows it (a minimum
    above 2^53, a maximum below -2^53, NaN), which llguidance cannot hold, and for a `multipleOf` past MAX_MULTIPLE
    or MAX_MULTIPLE_DIGITS, or distinct ones that sum past MAX_MULTIPLE. Whatever the type beside a bound (an
    integer range comes of a `number` schema's bounds under an `anyOf` of integers too); walked without recursion."""
    if "inimum" not in text and "aximum" not in text and "multipleOf" not in text:
        return text
    schema = json.loads(text)
    stack, changed = [(schema, False)], False  # (a value, whether it is a dict of names to schemas)
    multiples: set[int | float] = set()
    while stack:
        node, named = stack.pop()
        if isinstance(node, list):
            stack.extend((x, False) for x in node)
        if not isinstance(node, dict):
            continue
        for key, v in node.items():
            if named or key not in _DATA:
                stack.append((v, not named and key in _NAMED))
            if named or type(v) not in (int, float):
                continue
            if key == "multipleOf" and not (
                abs(v) <= MAX_MULTIPLE and _significant_digits(v) <= MAX_MULTIPLE_DIGITS
            ):
                raise InvalidRequestError(
                    f"response_format: a multipleOf must be at most {MAX_MULTIPLE} with at most {MAX_MULTIPLE_DIGITS} "
                    "significant digits: llguidance's matcher for it takes time and memory in its value (10000019: "
                    "over a minute, 2 GB)"
                )
            if key == "multipleOf":
                multiples.add(abs(v))
            if (key in _LOWER or key in _UPPER) and not -MAX_BOUND <= v <= MAX_BOUND:
                if not (v < 0 if key in _LOWER else v > 0):  # it narrows the range (or is NaN)
                    raise InvalidRequestError(
                        f"response_format: a {key} is out of range: llguidance holds bounds within +-2^53 "
                        f"({MAX_BOUND}) exactly"
                    )
                node[key], changed = MAX_BOUND if v > 0 else -MAX_BOUND, True
    if sum(multiples) > MAX_MULTIPLE:
        raise InvalidRequestError(
            f"response_format: a schema's multipleOf values (each distinct one) must sum to at most {MAX_MULTIPLE}: "
            "llguidance's matcher holds an automaton for each, built in time about linear in its value (five near "
            "10^5: 3.5 s)"
        )
    return json.dumps(schema) if changed else text


def _significant_digits(v: int | float) -> int:
    """Digits of a number written without its leading and trailing zeros (1000000: 1, 999.91: 5); NaN and
    infinities count as many as an int64."""
    if isinstance(v, float) and not math.isfinite(v):
        return 19
    return len(Decimal(repr(v) if isinstance(v, float) else v).normalize().as_tuple().digits)


def _depth(root: object) -> int:
    """Schema levels (objects) on the longest path from `root`, local $refs ("#/$defs/x", against the nearest
    `$id`'s schema, as tools' parameters are) followed; a $ref back to a schema on the path (a recursive schema)
    ends it. Walked without recursion, each schema once."""

    def kids(node: object, base: object) -> Iterator[tuple[object, object]]:
        """(subschema or list, its base) of a schema, a list or a dict of names to schemas."""
        if isinstance(node, list):
            yield from ((x, base) for x in node if isinstance(x, (dict, list)))
            return
        base = node if isinstance(node.get("$id"), str) else base
        for key, v in node.items():
            if key == "$ref" and isinstance(v, str) and v.startswith("#/"):
                target = _pointer(base, v[2:])
                if target is not None:
                    yield target, base
            elif key not in _DATA and isinstance(v, dict) and key in _NAMED:
                yield from ((x, base) for x in v.values() if isinstance(x, (dict, list)))
            elif key not in _DATA and isinstance(v, (dict, list)):
                yield v, base

    done: dict[int, int] = {}
    # each frame: [node, its children, the deepest child so far]; `active`: ids of the nodes on the path
    frames, active = [[root, kids(root, root), 0]], {id(root)} if isinstance(root, (dict, list)) else set()
    if not active:
        return 0
    while frames:
        frame = frames[-1]
        child = next(frame[1], None)
        if child is None:
            frames.pop()
            active.discard(id(frame[0]))
            done[id(frame[0])] = frame[2] + isinstance(frame[0], dict)
            if frames:
                frames[-1][2] = max(frames[-1][2], done[id(frame[0])])
            continue
        node, base = child
        if id(node) in done:
            frame[2] = max(frame[2], done[id(node)])
        elif id(node) not in active:
            active.add(id(node))
            frames.append([node, kids(node, base), 0])
    return done[id(root)]


def _pointer(doc: object, path: str) -> object:
    """The dict or list at a JSON pointer's path (without its leading "/") in `doc`, else None."""
    for part in path.split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc if isinstance(doc, (dict, list)) else None


def advance(seq: Sequence, token: int) -> bool:
    """Feed the sampled token to the request's matcher; True when the grammar is complete (nothing may follow)."""
    g = seq.guide
    if g is None:
        return False
    g.consume_token(token)
    seq.token_mask = None
    return g.is_stopped() or g.is_error()


def failure(seq: Sequence) -> str | None:
    """Why the request's grammar failed, else None. Past a limit of its lexer (a pattern such as
    `(.{1,1000}){1,1000}` grows its state per character) llguidance gives up mid-reply and allows only EOS: the
    reply is not whole."""
    g = seq.guide
    return _one_line(g.get_error()) if g is not None and g.is_error() else None


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())[:500]
