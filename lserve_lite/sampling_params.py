"""Per-request sampling parameters, validated up front with one-line errors."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field, fields, replace

from .errors import InvalidRequestError

# Stop conditions are checked after every generated token (each stop string is searched in the new text),
# so their number and size bound the per-token cost that one request imposes on the whole batch.
# OpenAI allows 4 stop strings; 16 of up to 256 characters covers chat templates' end markers with room.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_KEEP_SPECIAL = 16  # special tokens kept in the text (a tool-call parser's markers)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it logits overflow float32 (inf / NaN probabilities)
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing logits by them overflows float32)
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's chat limit; the GPU kernel keeps this many in registers)
MAX_N = 16  # candidates per request (each is a running sequence)
# past any vocabulary (all kept); the GPU sampler reads top_k as a float64, then an int32
MAX_TOP_K = 2**31 - 1
MAX_LOGIT_BIAS = 1024  # biased ids per request (applied on every step)
TOO_MANY_BIASES = f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers"
PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency penalties, as OpenAI
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values, as OpenAI
NO_LIMIT = 2**31 - 1  # max_new_tokens of vLLM's max_tokens=None: the engine stops at the context limit


class _Default(int):
    """max_new_tokens left at its default (256): an int, told apart from the same number given."""


DEFAULT_MAX_NEW_TOKENS = _Default(256)
_UNSET = object()  # max_tokens not given (None is vLLM's "up to the context limit")
_STRUCTURED = "use response_format (json_object or json_schema)"
# response_format types: OpenAI's, and "lark" (a grammar beside a JSON schema), which the server's clients may not send
OPENAI_FORMATS = ("text", "json_object", "json_schema")
FORMATS = (*OPENAI_FORMATS, "lark")

# vLLM's sampling options that are not implemented here: each with its value that means "off" (accepted, as is None)
# and what to do instead. SamplingParams refuses any other value in one line, and so does the server for these
# request fields (serve/protocol.py).
VLLM_UNSUPPORTED: dict[str, tuple[object, str]] = {
    "use_beam_search": (False, "no beam search"),
    "length_penalty": (1, "no beam search"),
    "early_stopping": (False, "no beam search"),
    "guided_decoding": (None, _STRUCTURED),
    "structured_outputs": (None, _STRUCTURED),
    "allowed_token_ids": (None, "use logit_bias"),
    "bad_words": ([], "use logit_bias"),
    "truncate_prompt_tokens": (None, "send a prompt that fits"),
    "logits_processors": ([], "no custom logits processors"),
    # vLLM's default, RequestOutputKind.CUMULATIVE (its LLM.generate returns finished outputs whatever the kind)
    "output_kind": (0, "generate returns finished outputs; stream yields text deltas"),
    "extra_args": ({}, "no custom sampling arguments"),
}

# vLLM's options that only spare work there, taken and ignored (lm-evaluation-harness's vLLM backend scores with
# detokenize=False): outputs here are always detokenized, with the same ids and logprobs
VLLM_IGNORED = ("detokenize",)


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's {"token id as a string": bias} as {id: bias}. Two spellings of one id ("42" and "042") are refused:
    a dict keeps only one of them, and which bias the caller meant is unknown."""
    if bias and len(bias) > MAX_LOGIT_BIAS:  # before any work per key: an 8 MiB body holds ~450,000
        raise InvalidRequestError(TOO_MANY_BIASES)
    out: dict[int, float] = {}
    spelled: dict[int, str] = {}
    for key, value in (bias or {}).items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or len(key) > 10:
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}")
        t = int(key)
        if t in spelled:
            raise InvalidRequestError(
                f"logit_bias keys {spelled[t]!r} and {key!r} name the same token id {t}"
            )
        spelled[t], out[t] = key, value
    return out


def refuse_set(name: str, value: object, off: object, instead: str) -> None:
    """Refuse an option that is not implemented set to anything but None or its "off" value `off`, in one line that
    says what to do `instead`: code that sets one expects its effect."""
    if value is not None and not (isinstance(value, (numbers.Number, list, dict)) and value == off):
        raise InvalidRequestError(f"{name} is not supported ({instead})")


def check_n(n: object) -> None:
    """The number of candidates a request may ask for (the server checks it before `prompts x n`)."""
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}")


def check_seed(seed: object) -> None:
    """A request's seed, or LLM's (vLLM's engine seed): None (fresh entropy) or an integer >= 0."""
    if seed is not None and (not is_int(seed) or seed < 0):
        raise InvalidRequestError(f"seed must be a non-negative integer, got {seed!r}")


def check_best_of(best_of: object, n: int) -> None:
    """vLLM's best_of: candidates are not ranked here, so only best_of == n (every candidate returned) is the same."""
    if best_of is not None and best_of != n:
        raise InvalidRequestError("best_of must equal n (candidates are not ranked)")


def check_top_k(top_k: object) -> None:
    """top_k's range, -1 (vLLM's "off") included: the server checks it with the body, in the same words."""
    if not is_int(top_k) or not -1 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(
            f"top_k must be an integer >= 0 (0 disables it, and so does -1) and at most {MAX_TOP_K}, got {top_k!r}"
        )


def check_repetition_penalty(penalty: object) -> None:
    """repetition_penalty's range: the server checks it with the body, in the same words."""
    lo, hi = REPETITION_PENALTY_RANGE
    if not _finite(penalty) or not lo <= penalty <= hi:
        raise InvalidRequestError(f"repetition_penalty must be in [{lo}, {hi}], got {penalty!r}")


def check_min_tokens(min_tokens: object, most: int, field: str = "max_tokens") -> None:
    """min_tokens within the new tokens a request may take (`most`); the error names `field`, what set that
    number in the caller's words (the server's max_completion_tokens, or the context a prompt leaves)."""
    if not is_int(min_tokens) or not 0 <= min_tokens <= most:
        limit = "None: up to the context limit" if most == NO_LIMIT else most
        raise InvalidRequestError(
            f"min_tokens must be an integer in [0, {field} ({limit})], got {min_tokens!r}"
        )


@dataclass
class _Params:
    """temperature 0 (or below 1e-5) means greedy; top_k 0 (or vLLM's -1), top_p 1 and min_p 0 disable those
    filters."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # per generated token: its logprob and the top-`logprobs` alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (echo); the prompt is recomputed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # {"type": "json_object"} or {"type": "json_schema", "json_schema": ...}; or {"type": "lark", "lark": <an
    # llguidance Lark grammar>, "json_schema": ...}, whose `@<json_schema's name>` is that schema, and whose `@reply`
    # is the JSON of a json_object / json_schema format in "reply_format" if given (tool_choice "auto" with strict
    # tools or the request's own format: ToolPlan.reply_format)
    response_format: dict | None = None
    # special tokens whose text stays in the output (the markers a tool-call parser reads); others are dropped
    keep_special_tokens: list[str] = field(default_factory=list)
    # vLLM's: until this many tokens are generated EOS and stop_token_ids are masked out; stop strings end past them
    min_tokens: int = 0
    # vLLM's: tokens less probable than min_p x the most probable one (after temperature) are dropped (last: the
    # fields before it keep their positions)
    min_p: float = 0.0
    # vLLM's: the text keeps the stop string (or stop token's text) that ended it, cut just past it
    include_stop_str_in_output: bool = False
    # vLLM's: False keeps every special token's text in the output (keep_special_tokens keeps some)
    skip_special_tokens: bool = True
    # vLLM's: False drops a space the decoder puts between two added tokens' texts (vLLM's fast detokenizer); the
    # tokenizers library's byte-level and SentencePiece decoders put none, so either value gives the same text
    spaces_between_special_tokens: bool = True

    def __post_init__(self):
        self.validate()

    def _normalize(self) -> None:
        """vLLM's other spellings as ours, also when a field is set after construction (`sp.top_k = -1` was refused
        by the engine's second validation while SamplingParams(top_k=-1) was taken)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name, empty in (("stop", list), ("stop_token_ids", list), ("logit_bias", dict)):
            if getattr(self, name) is None:  # vLLM's default for each: none
                setattr(self, name, empty())
        if is_int(self.top_k) and self.top_k == -1:  # vLLM's (and the server's) other spelling of "off"
            self.top_k = 0
        if self.min_p is None:  # off, as it was taken while min_p was not implemented
            self.min_p = 0.0

    def validate(self) -> None:
        def bad(msg: str):
            raise InvalidRequestError(msg)

        self._normalize()

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        check_top_k(self.top_k)
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        check_repetition_penalty(self.repetition_penalty)
        check_seed(self.seed)
        for name in (
            "ignore_eos",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        ):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        keep = self.keep_special_tokens
        if (
            not isinstance(keep, (list, tuple))
            or len(keep) > MAX_KEEP_SPECIAL
            or not all(isinstance(t, str) and t for t in keep)
        ):
            bad(f"keep_special_tokens must be a list of at most {MAX_KEEP_SPECIAL} non-empty strings")
        self._validate_stops()
        self._validate_api()

    def _validate_api(self) -> None:
        """The OpenAI options: candidates, logprobs, penalties, logit bias, response format (shape only)."""
        check_n(self.n)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not lo <= v <= hi:
                raise InvalidRequestError(f"{name} must be in [{lo}, {hi}], got {v!r}")
        bias = self.logit_bias
        if not isinstance(bias, dict):  # it read "must map at most 1024 token ids" for a list
            raise InvalidRequestError(
                f"logit_bias must be a dict of token ids to numbers, got {type(bias).__name__}"
            )
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(TOO_MANY_BIASES)
        lo, hi = BIAS_RANGE
        for t, v in bias.items():
            if not is_int(t) or t < 0 or not _finite(v) or not lo <= v <= hi:
                raise InvalidRequestError(
                    f"logit_bias must map token ids >= 0 to numbers in [{lo}, {hi}], got {t!r}: {v!r}"
                )
        if self.response_format is not None:  # its shape before `constrained` reads it (a string raised)
            check_format(self.response_format, FORMATS)
        check_min_tokens(self.min_tokens, self.max_new_tokens)
        if self.min_tokens and self.constrained:
            raise InvalidRequestError(
                "min_tokens cannot be combined with response_format, a forced tool_choice or strict tools (a grammar "
                "may end the reply first)"
            )

    def candidates(self) -> list[SamplingParams]:
        """The n single-candidate requests of `n > 1` (seed + i each, so seeded candidates differ). n is checked
        first: set after construction (`sp.n = 1000`), each candidate's own validation sees only n=1."""
        check_n(self.n)
        if self.n == 1:
            return [self]
        seed = self.seed
        return [replace(self, n=1, seed=None if seed is None else int(seed) + i) for i in range(self.n)]

    @property
    def constrained(self) -> bool:
        """Whether a grammar restricts the output (JSON object or schema)."""
        return self.response_format is not None and self.response_format.get("type") != "text"

    def _validate_stops(self) -> None:
        """Bounded stop conditions: they are checked on every token, for every request in the batch."""
        # the counts first: a per-item check of an 8 MiB body's 2.7 million ids took 0.9 s (on the server's event loop)
        if not isinstance(self.stop, (list, tuple)):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} allowed"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise InvalidRequestError(
                f"a stop string has {longest} characters; at most {MAX_STOP_CHARS} allowed"
            )
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative integers")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} allowed"
            )
        if not all(is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class SamplingParams(_Params):
    """_Params (its fields and rules), constructed also from code ported from vLLM: vLLM's options not implemented
    here (VLLM_UNSUPPORTED, `best_of`) are taken at their "off" value and refused in one line otherwise, instead of
    a bare TypeError. `max_tokens` (vLLM's and OpenAI's name) is `max_new_tokens`, given (None, as vLLM's: up to
    the context limit), read or set."""

    def __init__(self, *args: object, **kw: object):
        best_of = kw.pop("best_of", None)
        for name in VLLM_IGNORED:
            kw.pop(name, None)
        for name in [k for k in kw if k in VLLM_UNSUPPORTED]:
            refuse_set(name, kw.pop(name), *VLLM_UNSUPPORTED[name])
        max_tokens = kw.pop("max_tokens", _UNSET)
        known = {f.name for f in fields(_Params)}
        unknown = next((k for k in kw if k not in known), None)
        if unknown is not None:  # named as this class, not its base
            raise TypeError(f"SamplingParams got an unexpected keyword argument {unknown!r}")
        if max_tokens is not _UNSET:  # code ported from vLLM says max_tokens
            tokens = NO_LIMIT if max_tokens is None else max_tokens
            given = args[0] if args else kw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
            if type(given) is not _Default and given != tokens:
                raise InvalidRequestError(
                    f"max_tokens is another name of max_new_tokens: give one, got max_new_tokens={given!r} and "
                    f"max_tokens={max_tokens!r}"
                )
            if args:
                args = (tokens, *args[1:])
            else:
                kw["max_new_tokens"] = tokens
        super().__init__(*args, **kw)
        check_best_of(best_of, self.n)

    def __setattr__(self, name: str, value: object) -> None:
        """vLLM's options not implemented here, set on the object as vLLM's code sets fields
        (`sp.include_stop_str_in_output = True`), are refused as the constructor refuses them: stored, they were
        ignored, and the request ran without their effect. At their "off" value they pass, as there."""
        if name in VLLM_UNSUPPORTED:
            refuse_set(name, value, *VLLM_UNSUPPORTED[name])
        elif name == "best_of":
            check_best_of(value, self.n)
        else:
            super().__setattr__(name, value)

    def clone(self) -> SamplingParams:
        """vLLM's: a deep copy, whose lists and dicts (stop, logit_bias, ...) can change without changing this one."""
        return copy.deepcopy(self)

    @property
    def max_tokens(self) -> int | None:
        """vLLM's name of max_new_tokens, read and set as vLLM's code does (it read a sentinel, and setting it did
        nothing); None, as in vLLM, is up to the context limit, and reads back as None."""
        return None if self.max_new_tokens == NO_LIMIT else self.max_new_tokens

    @max_tokens.setter
    def max_tokens(self, tokens: int | None) -> None:
        self.max_new_tokens = NO_LIMIT if tokens is None else tokens


def is_int(x: object) -> bool:
    """An integer, NumPy's too (a count or seed computed with NumPy); a boolean is not one."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite(x) -> bool:
    """A finite real number, NumPy's too; a boolean is not one."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_format(fmt: object, kinds: tuple[str, ...]) -> None:
    """A response format's shape, its type one of `kinds`; a Lark grammar's `reply_format` (its @reply, where given)
    is a JSON one, checked alike."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in kinds:
        raise InvalidRequestError(
            "response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}"
        )
    if kind in ("json_schema", "lark") and not isinstance(schema_of(fmt), (dict, bool)):
        raise InvalidRequestError(f"response_format {kind} needs a 'schema' object")
    if kind == "lark" and not isinstance(fmt.get("lark"), str):
        raise InvalidRequestError("response_format lark needs a 'lark' grammar (a string)")
    if kind == "lark" and fmt.get("reply_format") is not None:
        check_format(fmt["reply_format"], ("json_object", "json_schema"))


def schema_of(fmt: dict):
    """The JSON schema of an OpenAI `json_schema` response format ({"json_schema": {"schema": ...}})."""
    inner = fmt.get("json_schema")
    return inner.get("schema") if isinstance(inner, dict) else None
