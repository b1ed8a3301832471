"""OpenAI request/response shapes: pydantic models for requests, plain dicts for responses, API errors.

Request bodies are checked strictly, as OpenAI does: a JSON boolean is not an integer (`max_tokens: true`
is refused), a string is not a number; a whole float is an integer parameter (`max_tokens: 2.0`, as pydantic's lax
mode and so vLLM take it; 2.5 is refused), token ids must be integers. Before any model sees a body, `decode`
refuses bodies that are not plain JSON objects, nest deeper than MAX_JSON_DEPTH, or hold a string with a
lone UTF-16 surrogate (it cannot be tokenized nor echoed back as UTF-8).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from ..engine.intake import check_cache_salt
from ..engine.tool_calls import ToolPlan, plan_tools
from ..errors import InvalidRequestError
from ..sampling_params import (
    MAX_LOGPROBS,
    OPENAI_FORMATS,
    VLLM_UNSUPPORTED,
    SamplingParams,
    check_best_of,
    check_format,
    check_min_tokens,
    check_n,
    check_repetition_penalty,
    check_top_k,
    logit_bias_ids,
    refuse_set,
)
from ..tokenizer import check_contents
from .json_body import LoneSurrogate, TooDeep, collector_paused, read_object


class ApiError(Exception):
    """An error that becomes `{"error": {message, type, param, code}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    # characters: a message quotes the client's values (a model name, a key), which may be MiBs
    MAX_MESSAGE = 1000

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        if len(message) > self.MAX_MESSAGE:  # its start says what, its end often what to do: both kept
            half = self.MAX_MESSAGE // 2 - 20
            message = f"{message[:half]} ... ({len(message)} characters) ... {message[-half:]}"
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        err = {"message": self.message, "type": kind}
        return {"error": err | {"param": self.param, "code": self.code}}


MAX_CHOICES = 64  # prompts x n of one request: each is a running sequence
MESSAGE_CHARS = 16  # a chat message's template text, counted in the prompt's size (at least a token's worth)
# a content part's JSON, counted in the prompt's size as a message's is: `body_limits` allows a valid request 2
# characters a container and 4 a member, and an empty text part is one of each and two members
PART_CHARS = 8
MAX_JSON_DEPTH = 32  # the deepest valid body is 5 levels (messages[i].content[j].text)

_STRICT = ConfigDict(extra="ignore", strict=True)


def _whole(v: object) -> object:
    """A whole float (2.0, which some clients' JSON writes for an integer) as its integer, as pydantic's lax mode
    (vLLM's) takes it; a float with a fraction is refused in lax mode's words; anything else (true, "2", 1e400's
    infinity) is left to the strict check."""
    if type(v) is not float or not math.isfinite(v):
        return v
    if not v.is_integer():
        raise PydanticCustomError(
            "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        )
    return int(v)


# an integer parameter (max_tokens, n, seed, ...); token ids stay strict integers
Int = Annotated[int, BeforeValidator(_whole)]
_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts",
}


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    continuous_usage_stats: Any = None  # vLLM's usage in every chunk: not implemented, refused unless off


class _Request(BaseModel):
    """Fields common to both endpoints; unknown fields are ignored, unsupported ones refused."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: Int | None = None  # 0: completions with echo only (scoring the prompt)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # extensions (vLLM names)
    top_k: Int | None = None  # -1: off, as vLLM spells it
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None  # vLLM's: the text keeps the stop string that ended it
    skip_special_tokens: bool | None = None  # vLLM's: false keeps special tokens' text
    spaces_between_special_tokens: bool | None = None  # vLLM's: the same text either way (SamplingParams)
    # vLLM's: no EOS, stop id or stop string ends the reply before it
    min_tokens: Int | None = None  # its range, [0, the most new tokens], is checked once that is known
    best_of: Int | None = None  # vLLM's; only equal to n (candidates are not ranked)
    suffix: str | None = None  # the legacy completions' fill-in-the-middle, refused on both endpoints
    cache_salt: Any = None  # vLLM's: prefix-cache pages shared only with requests of the same salt (or none)
    # vLLM extensions not implemented: a client that sets one expects its effect, so it is refused, not ignored,
    # unless it holds the value that means "off" (_unsupported: that value, and what to do instead)
    use_beam_search: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    prompt_logprobs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    truncate_prompt_tokens: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    logits_processors: Any = None
    add_special_tokens: Any = None
    length_penalty: Any = None
    structural_tag: Any = None
    guided_whitespace_pattern: Any = None
    priority: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    prompt_embeds: Any = None
    # OpenAI's that ask for more than text
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None
    _unsupported: ClassVar[dict[str, tuple[object, str]]] = {
        **{k: VLLM_UNSUPPORTED[k] for k in ("use_beam_search", "structured_outputs", "allowed_token_ids",
                                            "bad_words", "truncate_prompt_tokens", "logits_processors",
                                            "length_penalty")},
        **{f"guided_{k}": VLLM_UNSUPPORTED["guided_decoding"] for k in ("json", "regex", "choice", "grammar")},
        "structural_tag": VLLM_UNSUPPORTED["guided_decoding"],
        "guided_whitespace_pattern": (None, "replies in JSON are compact, without whitespace between tokens"),
        "priority": (0, "requests are served first come, first served"),
        "kv_transfer_params": (None, "no disaggregated prefill"),
        "vllm_xargs": (None, "no custom sampling arguments"),
        "prompt_embeds": (None, "send the prompt as text or token ids"),
        "audio": (None, "replies are text"),
        "modalities": (["text"], "replies are text"),
        "web_search_options": (None, "no web search"),
        "prompt_logprobs": (None, "completions with echo and logprobs return the prompt's"),
        "suffix": (None, "no fill-in-the-middle"),
        "return_tokens_as_token_ids": (False, "tokens come back as text; /tokenize gives their ids"),
        "return_token_ids": (False, "replies hold text; /tokenize gives the ids"),
        "add_special_tokens": (True, "the prompt text is encoded with the tokenizer's special tokens; send "
                                     "token ids to encode it otherwise"),
    }  # fmt: skip

    def check(self) -> None:
        if self.n is None:
            self.n = 1
        try:  # before CompletionRequest's `prompts x n`, which would blame the prompt for an n out of range
            check_n(self.n)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "n") from None
        try:
            check_best_of(self.best_of, self.n)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "best_of") from None
        for name, (off, instead) in self._unsupported.items():
            try:
                refuse_set(name, getattr(self, name), off, instead)
            except InvalidRequestError as e:
                raise ApiError(400, str(e), name) from None
        try:
            check_cache_salt(self.cache_salt)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "cache_salt") from None
        try:  # OpenAI's types only: "lark" is the engine's own (tools' grammar); checked where tools replace it
            if self.response_format is not None:
                check_format(self.response_format, OPENAI_FORMATS)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "response_format") from None
        # SamplingParams' rules for these ranges, checked now (not left half to pydantic: one message per field)
        for name, rule in (("top_k", check_top_k), ("repetition_penalty", check_repetition_penalty)):
            try:
                if getattr(self, name) is not None:
                    rule(getattr(self, name))
            except InvalidRequestError as e:
                raise ApiError(400, str(e), name) from None
        # OpenAI's and vLLM's rule: stream_options without stream is a 400, not ignored
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.stream_options and self.stream_options.continuous_usage_stats not in (None, False):
            raise ApiError(400, "stream_options.continuous_usage_stats is not supported (include_usage sends the "
                           "usage after the last chunk)", "stream_options")  # fmt: skip

    def logprob_params(self) -> dict:
        """SamplingParams' logprobs / prompt_logprobs from this endpoint's fields."""
        raise NotImplementedError

    def reply_format(self) -> dict | None:
        """The response format the sampler enforces."""
        return self.response_format

    def kept_special_tokens(self) -> list[str]:
        """The special tokens whose text the reply keeps (the others are dropped)."""
        return []

    def sampling_params(self, max_new_tokens: int, defaults: dict[str, object]) -> SamplingParams:
        """`defaults`: the model's (LLMEngine.sampling_defaults), for each sampling field this request omits."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        most = self.max_tokens_field if self.max_tokens is not None else "the context the prompt leaves"
        if self.max_tokens is None and max_new_tokens == defaults.get("max_new_tokens"):
            most = "the model's generation_config.json max_new_tokens"
        own = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        models = {k: v for k, v in defaults.items() if k != "max_new_tokens"}  # that one is in max_new_tokens
        sampling = models | {k: v for k, v in own.items() if v is not None}  # the request's own values win
        try:
            check_min_tokens(self.min_tokens or 0, max_new_tokens, most)  # named as the client set the most
            return SamplingParams(
                n=self.n,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=logit_bias_ids(self.logit_bias),
                response_format=self.reply_format(),
                **self.logprob_params(),
                max_new_tokens=max_new_tokens,
                **sampling,
                seed=self.seed,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens or 0,
                keep_special_tokens=self.kept_special_tokens(),
                include_stop_str_in_output=bool(self.include_stop_str_in_output),
                skip_special_tokens=self.skip_special_tokens is not False,
                spaces_between_special_tokens=self.spaces_between_special_tokens is not False,
            )
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param_of(str(e))) from None

    @property
    def max_tokens_field(self) -> str:
        """The field that set max_tokens, as errors name it."""
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def check_top_logprobs(top: int | None) -> None:
    """OpenAI's bound on `top_logprobs` (0-20), for chat and the Responses API alike: one line naming the field."""
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")


def param_of(message: str) -> str:
    """The request field a SamplingParams error names ('top_k must be ...', 'a stop string has ...')."""
    words = message.split(" ", 2)
    name = words[1] if words[0] == "a" and len(words) > 1 else words[0]
    name = name.rstrip(":")
    return {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs"}.get(name, name)


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call an assistant turn made (sent back in the conversation that follows it)."""

    model_config = _STRICT

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None  # a participant's or a tool result's name (Hermes' tool template reads it)

    def as_dict(self) -> dict:
        """The message as OpenAI's dict (tool_calls.prompt_messages makes it what chat templates read)."""
        c = [p.model_dump() for p in self.content] if isinstance(self.content, list) else self.content or ""
        m = {"role": self.role, "content": c}
        if self.tool_calls:
            m["tool_calls"] = [
                {"id": t.id, "type": "function",
                 "function": {"name": t.function.name, "arguments": t.function.arguments}}
                for t in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # vLLM's chat-template extras: the generation prompt, or the last (assistant) message continued; extra template
    # variables; the client's own template (only on a server started with --trust-request-chat-template). The
    # tokenizer checks both as LLM.chat's.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Any = None
    chat_template_kwargs: Any = None
    echo: Any = None
    prompt: Any = None
    documents: Any = None  # vLLM's documents for a RAG chat template
    _unsupported: ClassVar[dict[str, tuple[object, str]]] = _Request._unsupported | {
        "prompt": (None, "a completions field: chat takes messages"),
        "documents": ([], "no documents reach the chat template: put them in the messages"),
        "add_special_tokens": (False, "the prompt is the model's chat template, which makes its special tokens"),
        "echo": (False, "a chat reply does not repeat the last message"),
    }  # fmt: skip
    _tool_plan: ToolPlan | None = PrivateAttr(None)

    def check(self) -> None:
        super().check()
        if self.continue_final_message and self.add_generation_prompt:  # vLLM's rule
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true: send "
                           "add_generation_prompt: false with it", "continue_final_message")  # fmt: skip
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ApiError(400, "continue_final_message continues the last message, which must be the assistant's "
                           f"(got {self.messages[-1].role!r})", "continue_final_message")  # fmt: skip
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            check_contents([{"role": m.role, "content": m.content} for m in self.messages])
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "messages") from None
        if self.functions or self.function_call not in (None, "none"):  # "none": off, as tool_choice's
            raise ApiError(400, "functions / function_call are deprecated by OpenAI: send tools / tool_choice",
                           "functions" if self.functions else "function_call")  # fmt: skip
        try:
            plan = plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except InvalidRequestError as e:
            raise ApiError(
                400, str(e), "tool_choice" if str(e).startswith("tool_choice") else "tools"
            ) from None
        self._tool_plan = plan and plan.fit(self.response_format)  # fit_tools: to the template too
        check_top_logprobs(self.top_logprobs)
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens is not None and self.max_tokens < 1:
            field = self.max_tokens_field
            raise ApiError(
                400, f"{field} must be at least 1 for chat completions, got {self.max_tokens}", field
            )

    def logprob_params(self) -> dict:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def fit_tools(self, form: dict) -> None:
        """Fits the tool plan to the model's chat template (ToolPlan fields from call_form: its call ids, the
        format its calls are rendered in and that format's marker), before the reply's format and parser read it."""
        if self._tool_plan:
            self._tool_plan = replace(self._tool_plan, **form)

    @property
    def tool_plan(self) -> ToolPlan | None:
        """The request's tools and tool choice, checked (None: no tools offered, or tool_choice "none")."""
        return self._tool_plan

    def reply_format(self) -> dict | None:
        """A forced tool choice constrains the reply to calls (in the model's format); strict tools or the
        request's own format under "auto" to text (or that format's JSON) or calls that match
        (ToolPlan.reply_format)."""
        plan = self._tool_plan
        return plan.reply_format() if plan else self.response_format

    def kept_special_tokens(self) -> list[str]:
        """With tool_choice "auto", the marker tokens of calls, which the tool-call parser reads."""
        return list(self._tool_plan.markers) if self._tool_plan else []


# messages validated per call into pydantic-core (about 1 ms each); a valid message stands in for a long chat's
# while its other fields are checked for an error that comes first
MESSAGES_PER_CALL, _MESSAGES = 1024, TypeAdapter(list[ChatMessage])
_ANY_MESSAGE = ChatMessage(role="user")

# chat's fields that /v1/completions refuses (as OpenAI's completions do), each with its value that means "off"
_CHAT_FIELDS: dict[str, object] = {
    "messages": None, "max_completion_tokens": None, "top_logprobs": None, "tools": [], "tool_choice": None,
    "parallel_tool_calls": None, "functions": [], "function_call": None, "continue_final_message": False,
    "add_generation_prompt": False, "chat_template": None, "chat_template_kwargs": None,
}  # fmt: skip


# the fields chat refuses unless they hold their "off" value (vLLM's and OpenAI's it does not implement): the
# Responses API hands them to chat so they are refused there too, not ignored
CHAT_REFUSED = frozenset(ChatCompletionRequest._unsupported)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: Int | None = None
    # chat's fields: OpenAI's completions refuse them, vLLM's ignore them (max_completion_tokens is its known trap:
    # the reply ran to max_tokens' default); a client that sends one here expects its effect, so it is refused
    messages: Any = None
    max_completion_tokens: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    continue_final_message: Any = None
    add_generation_prompt: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None  # chat refuses it too (no documents reach its template)
    _unsupported: ClassVar[dict[str, tuple[object, str]]] = _Request._unsupported | {
        k: (off, "a chat completions field: send it to /v1/chat/completions") for k, off in _CHAT_FIELDS.items()
    } | {"max_completion_tokens": (None, "on /v1/completions send max_tokens; max_completion_tokens is chat's"),
         "documents": ([], "no chat template renders a completions prompt: put them in the prompt")}  # fmt: skip

    def check(self) -> None:
        super().check()
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ApiError(400, f"max_tokens must be at least 0 (0 with echo scores the prompt), got {self.max_tokens}",
                           "max_tokens")  # fmt: skip
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400, "max_tokens 0 returns only the echoed prompt: it needs echo: true", "max_tokens"
            )
        if self.max_tokens == 0:  # scoring: the one token the engine takes is left out
            try:
                check_min_tokens(self.min_tokens or 0, 0)
            except InvalidRequestError as e:
                raise ApiError(400, str(e), "min_tokens") from None
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ApiError(400, f"prompts x n must be at most {MAX_CHOICES}", "prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a batch request (a string, token ids, or a list of either)."""
        return _batch(self.prompt)

    def logprob_params(self) -> dict:
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    @property
    def scores_only(self) -> bool:
        """max_tokens 0 with echo (legacy OpenAI scoring, as older lm-eval sends it): the prompt and its logprobs
        alone; the engine decodes one token that the response leaves out."""
        return self.max_tokens == 0


# In text decoded strictly, only a \uD800-\uDFFF escape makes a lone surrogate: a body without one skips that check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# JSON values a valid body holds besides its prompt: stop strings and ids, logit_bias, a response format's schema
BODY_EXTRA_VALUES = 1 << 16
# what `check_body_size` counts: the bytes that open or follow each such value (those in strings too)
_BODY_BYTES = {"JSON arrays and objects": b"[{", "JSON object members": b":", "JSON values": b",:[{"}


def body_limits(max_len: int, prompt_chars: int) -> dict[str, int]:
    """The most JSON values, containers (arrays, objects) and object members a valid request holds for a model of
    context `max_len` whose prompts are limited to `prompt_chars` characters: MAX_CHOICES prompts of token ids or
    that many characters (each at most one separator inside a string; tools' JSON, counted in them, spends 2 a
    container and 4 a member), and BODY_EXTRA_VALUES more of each."""
    return {  # the costliest to parse first (checked in this order): containers, members, then any value
        "JSON arrays and objects": MAX_CHOICES + prompt_chars // 2 + BODY_EXTRA_VALUES,
        "JSON object members": prompt_chars // 4 + BODY_EXTRA_VALUES,
        "JSON values": MAX_CHOICES * max_len + prompt_chars + BODY_EXTRA_VALUES,
    }


def check_body_size(raw: bytes, limits: dict[str, int]) -> None:
    """413 for a body of more JSON values, containers or members than `body_limits` lets a valid request hold,
    before it is parsed: parsing holds the GIL, and 2.7M empty lists (8 MiB) stalled every stream 2 s. Counted over
    the bytes in C: a container opens with `[` or `{`, a member's value follows a `:`, any other value a `,` or its
    container's opening (those in strings count too: an upper bound); a body of fewer bytes holds fewer values."""
    if len(raw) <= min(limits.values()):
        return
    seen = {c: raw.count(c) for c in b",:[{"}  # each byte counted once, summed per kind below
    for what, limit in limits.items():
        count = sum(seen[c] for c in _BODY_BYTES[what])
        if count > limit:
            raise ApiError(
                413,
                f"the request body holds up to {count} {what}; a valid request to this model holds at most {limit}",
            )


def decode(raw: bytes) -> dict:
    """Bytes to a JSON object: malformed (raw surrogate bytes included), non-standard (NaN), too deep or
    surrogate-holding bodies are 400. Parsed in short calls into C (json_body: one json.loads of a body under the
    count limits held every stream up to 0.3 s), strings checked only where an escape could have made a lone
    surrogate."""
    try:
        text = raw.decode(json.detect_encoding(raw))
        body = read_object(text, MAX_JSON_DEPTH, _SURROGATE_ESCAPE.search(text) is not None)
    except TooDeep as e:
        raise ApiError(
            400, f"malformed JSON body: nested deeper than {MAX_JSON_DEPTH} levels", e.field
        ) from None
    except LoneSurrogate as e:
        if e.field is None:
            raise ApiError(400, "a top-level key holds a lone UTF-16 surrogate (invalid Unicode)") from None
        raise ApiError(
            400, f"{e.field}: a string or key holds a lone UTF-16 surrogate (invalid Unicode)", e.field
        ) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN, ints over the digit limit, bad UTF
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if body is None:
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _batch(p: Any) -> list:
    """A completion request's prompt as a list of prompts (a string, token ids, or a list of either)."""
    return list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]


def prompt_size(body: dict, chat: bool) -> tuple[int, int, int]:
    """A decoded body's prompt measured before validation, in time linear in its size: (characters of text,
    MESSAGE_CHARS counted for each message, tools and chat_template_kwargs (which a template may render) as JSON;
    token ids of the longest id prompt; prompts)."""
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return 0, 0, 1
        chars = MESSAGE_CHARS * len(msgs) + sum(
            len(json.dumps(body[k])) for k in ("tools", "chat_template_kwargs") if body.get(k)
        )
        return chars + sum(map(_message_chars, msgs)), 0, 1
    p = body.get("prompt")
    prompts = _batch(p)
    chars = sum(len(x) for x in prompts if isinstance(x, str))
    return chars, max((len(x) for x in prompts if isinstance(x, list)), default=0), len(prompts)


def _message_chars(m: object) -> int:
    """Characters of a raw message's fields that can reach the chat template (ChatMessage's fields; it ignores
    any other): strings as they are (role, tool_call_id), text parts by their text, other values (tool_calls) as
    JSON; a null or non-text part counts 1, and each part of a list PART_CHARS more."""
    if not isinstance(m, dict):
        return 1
    chars = 0
    for key in ChatMessage.model_fields:
        v = m.get(key)
        if isinstance(v, str):
            chars += len(v)
        elif key == "content":
            parts, each = (v, PART_CHARS) if isinstance(v, list) else ([v], 0)
            chars += sum(
                each + (len(x["text"]) if isinstance(x, dict) and isinstance(x.get("text"), str) else 1)
                for x in parts
            )
        elif v:
            chars += len(json.dumps(v))
    return chars


def _located(loc: tuple) -> tuple[str, str | None]:
    """A validation error's location as the request spells it (`messages[1].tool_calls[0].function.arguments`: a
    client sees which value to fix) and the hint of a field of several types where the error lies inside one (pydantic
    then names the type it tried next, `('stop', 'list[str]', 0)`: the location ends at the field)."""
    where = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            where += f"[{part}]"
            continue
        where += part if i == 0 else f".{part:.40}" if part.isidentifier() else f"[{part!r:.40}]"
        if part in _UNION_HINTS and i + 1 < len(loc) and isinstance(loc[i + 1], str):
            return where, _UNION_HINTS[part]
    return where or "body", None


def parse(model: type[_Request], body: dict) -> _Request:
    """Validate a decoded JSON object; the first problem becomes a 400 naming the parameter."""
    with collector_paused():  # validation makes no cycles; a collection amid 30,000 new messages held the GIL
        req = _validated(model, body)
    req.check()
    return req


def _validated(model: type[_Request], body: dict) -> _Request:
    """`model.model_validate(body)`, a long chat's messages in calls of MESSAGES_PER_CALL first: pydantic-core holds
    the GIL for a whole call (32,768 messages: 0.05-0.1 s, every stream waiting, from a worker thread too; 0.02-0.04 s
    in calls). The first error is the one model_validate reports first: a field declared before `messages`, else
    the message's."""
    msgs = body.get("messages")
    if model is ChatCompletionRequest and isinstance(msgs, list) and len(msgs) > MESSAGES_PER_CALL:
        checked: list[ChatMessage] = []
        for start in range(0, len(msgs), MESSAGES_PER_CALL):
            try:
                checked += _MESSAGES.validate_python(msgs[start : start + MESSAGES_PER_CALL])
            except ValidationError as e:
                err = e.errors(include_url=False)[0]
                err["loc"] = ("messages", start + err["loc"][0], *err["loc"][1:])
                try:
                    model.model_validate(body | {"messages": [_ANY_MESSAGE]})
                except ValidationError as other:
                    first = other.errors(include_url=False)[0]
                    fields = list(model.model_fields)
                    if first["loc"] and first["loc"][0] in fields[: fields.index("messages")]:
                        err = first
                raise _invalid(err) from None
        body = body | {"messages": checked}
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _invalid(e.errors(include_url=False)[0]) from None


def _invalid(err: dict) -> ApiError:
    """A pydantic error as a 400 naming the parameter where it lies."""
    where, hint = _located(err["loc"])
    return ApiError(400, f"{where}: {hint or err['msg']}", str(err["loc"][0]) if err["loc"] else None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip


def now() -> int:
    return int(time.time())
