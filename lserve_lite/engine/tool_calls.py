"""Tool calling (OpenAI `tools` / `tool_choice`): the tools shown to the model, its replies parsed back into
`tool_calls`. With `tool_choice` "auto" the model writes calls in the format it was trained on, parsed here:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes / Qwen); a reply of bare JSON
`{"name": ..., "parameters": {...}}` (Llama 3.x); or such JSON after a marker token, Mistral's `[TOOL_CALLS]`
(v0.3 / Nemo: an array of calls) or Llama 3.1's `<|python_tag|>` (ended by `<|eom_id|>` / `<|eot_id|>` if
they show). The markers are special tokens, which the detokenizer drops: a request with "auto" keeps their text
(`ToolPlan.markers`, as SamplingParams.keep_special_tokens). `tool_choice` "required" or a named function is
enforced by constrained decoding instead, so it holds for any model: calls alone, in the format the model's template
renders (`FORMS`: <tool_call> blocks, Mistral's marker array, Llama's bare JSON; `ToolPlan.grammar`), or generic
JSON of the calls where that format is none of these; so is "auto" with a `strict` tool, by a grammar of text or
calls in that format, the only calls then parsed, and "auto" with a response_format of the request's own: its JSON
or such calls."""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, replace

from ..errors import InvalidRequestError
from ..tokenizer import Tokenizer, message_text
from .call_args import HEAD_MAX, ArgScan, CallScan, call_head, written

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# marker tokens a model writes before its calls (JSON, as a bare reply's), each with what may end the calls
LEADS = {"[TOOL_CALLS]": (), "<|python_tag|>": ("<|eom_id|>", "<|eot_id|>")}
TAGS = (OPEN, *LEADS)  # what opens calls in a reply's text
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
ALNUM = string.ascii_letters + string.digits
_LONGEST_LEAD = max(map(len, LEADS))
_SPACE = re.compile(r"\s*")  # what str.strip() strips


@dataclass(frozen=True)
class CallForm:
    """A format of calls that a grammar holds (`ToolPlan.grammar`): how a template renders a call in it (`shown`,
    what call_form finds), what opens calls in a reply (`tag`), their arguments' key, and the grammar's pieces:
    one call (`@call`, the calls' schema), between two, and around the calls after the tag."""

    shown: re.Pattern
    tag: str
    key: str
    call: str
    sep: str
    open: str = ""
    close: str = ""
    bare: bool = False  # calls may open a reply without the tag (Llama 3.x's bare JSON)


FORMS = {
    "tagged": CallForm(
        re.compile(re.escape(OPEN)), OPEN, "arguments", call=f'"\\n" @call "\\n{CLOSE}"', sep=f'"\\n{OPEN}"'
    ),
    # Mistral v0.3 / Nemo: [TOOL_CALLS] [{"name": ..., "arguments": ...}, ...], as its template renders them
    "mistral": CallForm(
        re.compile(r'\[TOOL_CALLS\]\s*\[\s*\{\s*"name"'),
        "[TOOL_CALLS]",
        "arguments",
        call="@call",
        sep='", "',
        open='" "? "["',
        close='"]"',
    ),
    # Llama 3.x: {"name": ..., "parameters": ...} opening the reply, or after <|python_tag|> (3.1); "; " between
    "llama": CallForm(
        re.compile(r'\{\s*"name"\s*:\s*"[^"]*"\s*,\s*"parameters"\s*:'),
        "<|python_tag|>",
        "parameters",
        call="@call",
        sep='"; "',
        bare=True,
    ),
}
# what the parser reads as whitespace before a reply's JSON (str.isspace(): Unicode's White_Space, and \x1c-\x1f)
_GRAMMAR_SPACE = r"[\s\x1c-\x1f]"
# what may follow a reply's last call (the grammar's): up to two whitespace characters (a line break, "\r\n"), then
# the end. SmolLM2 ends its line after </tool_call>: where only another call could follow, it was forced to call
# again and again. Bounded, as the calls' JSON is compact: allowed 8, SmolLM2 wrote 8 newlines before its end
_TRAIL = "/[ \\t\\r\\n]{1,2}/?"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    strict: bool = False  # OpenAI's: calls must match `parameters` (held by a grammar with any tool_choice)

    def spec(self) -> dict:
        """The tool as OpenAI's request spells it (what the prompt and native templates show)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools and how calls are made: `auto` (the model may call, parsed from its text), `required`
    (at least one call) or `named` (a call of `name`), the last two by constrained decoding."""

    tools: tuple[Tool, ...]
    mode: str
    name: str | None = None
    parallel: bool = True
    # calls get 9 alphanumeric characters as ids (what Mistral's templates take back), not "call_..."
    short_ids: bool = False
    # the format the model writes calls in (FORMS; its template renders them so, or the system message shows
    # <tool_call> blocks): strict tools' grammar asks for it; None, one no grammar here writes (call_form)
    form: str | None = "tagged"
    # the id of the special token that opens calls in `form` (Mistral's, Llama's marker), the grammar's; None if
    # the vocabulary holds none
    lead: int | None = None
    # the request's own response_format (json_object / json_schema; None for none or text, `fit`): under "auto" the
    # reply is either a final message in it or calls (OpenAI's rule, which the Agents SDK's output_type relies on)
    format: dict | None = None

    def fit(self, response_format: dict | None) -> ToolPlan:
        """The plan for a request's response_format (held in `format` where it constrains the reply)."""
        return replace(self, format=response_format if _own_format(response_format) else None)

    def call_id(self) -> str:
        """A new call's id, in the form the chat template takes back in the conversation that follows."""
        if self.short_ids:
            return "".join(secrets.choice(ALNUM) for _ in range(9))
        return f"call_{uuid.uuid4().hex[:24]}"

    def by_name(self, name: object) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    @property
    def forced(self) -> bool:
        return self.mode != "auto"

    @property
    def in_form(self) -> bool:
        """Whether the grammar holds calls to the model's format (FORMS, `grammar`): a guided "auto" reply's, or a
        forced choice's where that format is known (else its calls are generic JSON, `schema`)."""
        return self.guided or (self.forced and self.form in FORMS)

    @property
    def guided(self) -> bool:
        """With "auto", a strict tool or a response_format of the request's own, and a model that writes calls in a
        format of FORMS: a grammar (`grammar`) allows text (or the format's JSON) or such calls, which match. A
        marker token's format needs the token (beside a response_format, Llama's calls too: bare, they would
        read as the format's JSON)."""
        asked = self.format is not None or any(t.strict for t in self.tools)
        form = FORMS.get(self.form or "")
        writable = form is not None and (
            form.tag == OPEN or self.lead is not None or (form.bare and self.format is None)
        )
        return not self.forced and asked and writable

    @property
    def bare(self) -> bool:
        """Whether an "auto" reply that opens with JSON is read as calls (Llama 3.x's): unguided, or guided in
        Llama's format without a response_format."""
        return not self.forced and (not self.guided or (FORMS[self.form].bare and self.format is None))

    @property
    def markers(self) -> tuple[str, ...]:
        """The special tokens whose text the parser reads (and the detokenizer must keep): the marker tokens of
        calls, with "auto" only (a forced reply is calls alone, read with its marker or without); guided, the
        format's marker alone."""
        return () if self.forced else tuple(t for t in self.tags if t in LEADS)

    @property
    def tags(self) -> tuple[str, ...]:
        """What opens calls in an "auto" reply's text: the format's tag alone where the grammar allows no other."""
        return (FORMS[self.form].tag,) if self.guided else TAGS

    def system_text(self) -> str:
        """What the prompt tells the model about the tools (a system message's text)."""
        specs = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in self.tools)
        head = "You can call the functions below. Their signatures, as JSON, within <tools></tools> tags:"
        call = '{"name": <function name>, "arguments": <arguments as a JSON object>}'
        tags = (
            "To call a function, write a JSON object with its name and arguments within <tool_call></tool_call>"
            f" tags, one call per pair of tags:\n{OPEN}\n{call}\n{CLOSE}"
        )
        if self.mode == "auto":
            how = tags + ("" if self.parallel else "\nCall at most one function.")
        elif self.in_form:  # a forced choice's calls in those tags (`grammar`)
            if self.mode == "named":
                how = f"{tags}\nCall {self.name}: reply with only the call."
            elif self.parallel:
                how = f"{tags}\nCall at least one of them: reply with only the calls."
            else:
                how = f"{tags}\nCall one of them: reply with only the call."
        elif self.mode == "named":
            how = f"Call {self.name}: reply with only the call, as the JSON object {call}."
        else:
            form = f"a JSON array of objects {call}" if self.parallel else f"the JSON object {call}"
            how = f"Call at least one of them: reply with only the calls, as {form}."
        return f"{head}\n<tools>\n{specs}\n</tools>\n\n{how}"

    def schema(self) -> dict:
        """The JSON schema of a forced reply in no known format: one call of `name` ({"name", "arguments"}), or with
        `required` one call of any tool, or a non-empty array of them when parallel calls are allowed. In the
        model's format (`in_form`), the grammar's `@call`: one such call, under the format's key; guided ("auto"),
        of any tool, a strict one's arguments held to its parameters, another's any JSON object."""
        key = FORMS[self.form].key if self.in_form else "arguments"
        calls = [
            _call_schema(t, t.parameters if t.strict or self.forced else {}, key)
            for t in self.tools
            if self.mode != "named" or t.name == self.name
        ]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return (
            {"type": "array", "minItems": 1, "items": one}
            if self.mode == "required" and self.parallel and not self.in_form
            else one
        )

    def grammar(self) -> str:
        """A guided reply's Lark grammar (llguidance's), in the model's format (`form`): text without its tag, or
        text up to the tag and then calls (one without parallel calls), each `@call` (`schema`), as the template
        renders them; after the last, two whitespace characters at most (`_TRAIL`). <tool_call> is text (a lazy
        prefix ends at it); a marker is its special token (`lead`); Llama's calls may open the reply bare, so its
        text may not open with JSON. With a response_format of the request's own (`format`), its JSON (`@reply`)
        takes the text's place, and the calls come first: a reply is a final message or calls. Forced: the calls
        alone (one for a named choice), after <tool_call> or the marker where the format opens with it (Llama's
        opens bare)."""
        form = FORMS[self.form]
        more = f" ({form.sep} {form.call})*" if self.parallel and self.mode != "named" else ""
        calls = " ".join(filter(None, (form.open, form.call + more, form.close, _TRAIL)))
        lead = f'"{OPEN}"' if form.tag == OPEN else f"<[{self.lead}]>"
        if self.forced:
            opens = form.tag == OPEN or (self.lead is not None and not form.bare)
            return f"start: {lead + ' ' if opens else ''}{calls}\n"
        if self.format is not None:
            return f"start: @reply | {lead} {calls}\n"
        text = f"TEXT: /(?s:.*)/ & ~/(?s:.*){re.escape(form.tag)}(?s:.*)/"
        if form.tag == OPEN:
            return f"start: TEXT | prefix {calls}\n{text}\nprefix[lazy]: /(?s:.*){OPEN}/\n"
        opens = [f"TEXT? {lead} {calls}"] if self.lead is not None else []
        if form.bare:  # as the parser reads a reply that opens with JSON: calls, or content only if not calls
            opens.append(calls)
            text += rf" & ~/{_GRAMMAR_SPACE}*[\[{{](?s:.*)/"
        return f"start: {' | '.join(['TEXT', *opens])}\n{text}\n"

    @property
    def holds(self) -> bool:
        """Whether the reply's grammar is the plan's (built from the tools, with the request's own format beside
        them when guided), not the request's `response_format` alone."""
        return self.forced or self.guided

    @property
    def field(self) -> str:
        """The request field that a failure of the plan's grammar names: `tools`, or `response_format` when its own
        format shares the grammar (the server names `tools` where that format builds alone)."""
        return "tools" if self.forced or self.format is None else "response_format"

    def reply_format(self) -> dict | None:
        """The format the sampler enforces: a forced choice's grammar of calls in the model's format, or its calls
        schema where that format is unknown (the call is forced: a response_format of the request's own applies to
        no final message, as OpenAI's); a guided reply's grammar, with that format as its `reply_format`
        (`@reply`); else the request's own format."""
        if not self.holds:
            return self.format
        if not self.in_form:
            return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": self.schema()}}
        fmt = {
            "type": "lark",
            "lark": self.grammar(),
            "json_schema": {"name": "call", "schema": self.schema()},
        }
        return fmt if self.forced or self.format is None else {**fmt, "reply_format": self.format}

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """A finished reply as (content, tool calls). Forced: the reply is calls (in the model's format, `in_form`,
        else their JSON), never content (None, or "" when it was cut before any call began, as a streamed empty
        reply); one cut short (max_tokens, a stop) keeps its complete calls and the call it was cut in, its
        arguments as far as written (as OpenAI and vLLM return it). Auto: every well-formed <tool_call> block
        naming a tool is a call, and so is the JSON after a marker token (up to its end token, or the end of the
        reply) when it is wholly calls of the tools; the rest of the text (malformed blocks and markers included, as
        written) is the content, None when only whitespace is left beside calls; or a reply that is wholly bare JSON
        calls (Llama 3.x) is those calls. Guided: the calls of the model's format alone (`tags`, `bare`: the
        grammar allows no other)."""
        return self.read(text)[:2]

    def read(self, text: str) -> tuple[str | None, list[dict], bool]:
        """`parse`'s (content, tool calls), and whether the reply was cut in a call (by max_tokens or a stop string:
        its finish reason is not "tool_calls"), forced or a guided one (ToolStream); the reply's JSON is parsed once
        (it may be as long as the context)."""
        if self.forced:
            if self.in_form:
                calls, cut = _calls_in_form(self, text)
            else:
                obj = _json(text)
                calls, cut = _calls_of(self, obj) or _cut_calls(self, text), obj is None
            return (None if calls else ""), _as_written(calls, written(text)), cut
        stream = ToolStream(self)
        content, calls = stream.feed(text, finished=True)
        return (None if calls and not content.strip() else content), calls, stream.cut

    def reply(self, text: str, finish: str | None) -> tuple[str | None, list[dict], str | None]:
        """A finished reply as (content, tool calls, finish reason): the one reading of a reply that the server's
        choices and LLM.chat's outputs share (LLM.chat kept a forced reply cut before any call began, "[", as its
        text while the server's content was "")."""
        content, calls, cut = self.read(text)
        return content, calls, finish_reason(finish, bool(calls) and not cut)


def _own_format(response_format: dict | None) -> bool:
    """Whether a request names a response format of its own (one that constrains the reply: not plain text)."""
    return response_format not in (None, {"type": "text"})


def finish_reason(finish: str | None, made_calls: bool) -> str | None:
    """A reply's finish reason: "tool_calls" when it made whole calls (`made_calls`) and was not cut short."""
    return "tool_calls" if made_calls and finish == "stop" else finish


def _call_schema(t: Tool, parameters: dict, key: str = "arguments") -> dict:
    """One call of `t` with `parameters` as its arguments' schema, under `key` (Llama's "parameters"). They get a
    base URI of their own (unless they name one), so that their local references ("#/$defs/X", as pydantic writes
    nested models; "#" for recursion) resolve within them, not against this schema's root; and they are an object
    (`{}` or a schema without a type allows any value, which is no call)."""
    args = {"$id": f"urn:lserve-lite:tool:{t.name}", **parameters, "type": "object"}
    return {"type": "object", "properties": {"name": {"const": t.name}, key: args},
            "required": ["name", key], "additionalProperties": False}  # fmt: skip


def _arguments_object(arguments: object) -> object:
    """A call's arguments as chat templates read them: the JSON object a string holds, else as they are."""
    v = _json(arguments) if isinstance(arguments, str) else None
    return v if isinstance(v, dict) else arguments


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


_SEPARATORS = re.compile(r"[ \t\r\n,;]*")


def _json_values(text: str, at: int = 0) -> tuple[list, int]:
    """The JSON values of `text` from `at`, separated by whitespace, ',' or ';', up to the first that does not
    parse; and where that one starts (len(text) when they reach the end of the text)."""
    dec, values = json.JSONDecoder(), []
    while True:
        at = _SEPARATORS.match(text, at).end()  # in place: a copy of the rest per value was quadratic
        if at == len(text):
            return values, at
        try:
            value, at = dec.raw_decode(text, at)
        except ValueError:
            return values, at
        values.append(value)


# the start of a forced call cut short: its name (maybe cut too) and its arguments' JSON as far as written (under
# either key: Llama's "parameters" too)
_CUT_CALL = re.compile(
    r'\s*\{\s*(?:"name"\s*:\s*"(?P<name>[^"]*)(?P<closed>")?'
    r'(?:\s*,\s*"(?:arguments|parameters)"\s*:\s*(?P<args>.*))?)?',
    re.S,
)


def _cut_calls(plan: ToolPlan, text: str) -> list[dict]:
    """The calls of a forced reply cut short (max_tokens, a stop string): an array's complete calls, then the call
    it was cut in, as OpenAI's and vLLM's truncated calls: its arguments as written so far (a partial JSON string)
    and its name (the one tool it can be, else as written so far)."""
    items, at = _json_values(text, 1) if text.startswith("[") else ([], 0)
    calls = _calls_of(plan, items)
    if len(calls) != len(items) or at == len(text):
        return calls
    return calls + _cut_call(plan, text, at)


def _cut_call(plan: ToolPlan, text: str, at: int) -> list[dict]:
    """The call a forced reply was cut in, its JSON from `at` ([] if none began there): its arguments as written so
    far and its name (the one tool it can be, else as written so far)."""
    cut = _CUT_CALL.match(text, at)
    if cut is None:
        return []
    written = cut["name"] or ""
    names = [
        t.name
        for t in plan.tools
        if (plan.mode != "named" or t.name == plan.name)
        and (t.name == written if cut["closed"] else t.name.startswith(written))
    ]
    fn = {"name": names[0] if len(names) == 1 else written, "arguments": cut["args"] or ""}
    return [{"id": plan.call_id(), "type": "function", "function": fn}]


def _as_written(calls: list[dict], scanned: list[tuple[str, str]]) -> list[dict]:
    """Calls a grammar wrote (a forced reply's, a guided one's after its marker) with their arguments as the model
    wrote them, as its stream sent them (`call_args.written`): those the scan found in order, by name (the
    grammar writes each so); the others as parsed (a call cut before its arguments began)."""
    out = list(calls)
    for k, (call, (name, args)) in enumerate(zip(calls, scanned)):
        if call["function"]["name"] != name:
            break
        out[k] = {**call, "function": {"name": name, "arguments": args}}
    return out


def _calls_in_form(plan: ToolPlan, text: str) -> tuple[list[dict], bool]:
    """A forced reply in the model's format (`ToolPlan.grammar`, its marker's text dropped by the detokenizer or
    kept) as (calls, whether it was cut before its end): cut, its complete calls and the one it was cut in."""
    form = FORMS[plan.form]
    head, tail = (_literals(p) for p in form.call.split("@call"))
    lead = re.escape(OPEN) if form.tag == OPEN else f"(?:{re.escape(form.tag)})?"
    first = re.compile(lead + _literals(form.open) + head)
    then = re.compile(tail + _literals(form.sep) + head)
    end = re.compile(tail + _literals(form.close) + r"\s*\Z")  # and whitespace (the grammar's _TRAIL)
    dec, values, at, step = json.JSONDecoder(), [], 0, first
    while (m := step.match(text, at)) is not None:
        try:
            value, at = dec.raw_decode(text, m.end())
        except ValueError:
            return _calls_of(plan, values) + _cut_call(plan, text, m.end()), True
        values.append(value)
        if end.match(text, at):
            return _calls_of(plan, values), False
        step = then
    return _calls_of(plan, values), True


_LITERAL = re.compile(r'("(?:[^"\\]|\\.)*")(\??)')


def _literals(piece: str) -> str:
    """A regex of a grammar piece's quoted strings (each maybe optional, `"x"?`): the text it writes there."""
    return "".join(f"(?:{re.escape(json.loads(lit))}){opt}" for lit, opt in _LITERAL.findall(piece))


def _calls_of(plan: ToolPlan, obj: object) -> list[dict]:
    """OpenAI tool calls of a parsed {"name", "arguments"} object (or "parameters", Llama 3.x's key) or a list of
    them; [] if any is not a call of one of the plan's tools with an object (or JSON-object string) as
    arguments."""
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for it in items:
        if not isinstance(it, dict) or plan.by_name(it.get("name")) is None:
            return []
        args = it.get("arguments", it.get("parameters", {}))
        if isinstance(args, str):
            args = _json(args)
        if not isinstance(args, dict):
            return []
        fn = {"name": it["name"], "arguments": json.dumps(args, ensure_ascii=False)}
        calls.append({"id": plan.call_id(), "type": "function", "function": fn})
    return calls


class ToolStream:
    """Splits one choice's reply, as it streams, into content to send and completed tool calls. Auto: text that
    may start an opening tag or a marker is held back until it cannot; a <tool_call> call is released when its
    closing tag arrives; JSON (`{` or `[`) that opens the reply (Llama 3.x's bare calls) or follows a marker
    token is held whole and parsed when it ends (at the marker's end token, or the end of the reply); a marker
    followed by anything else is content; whitespace that opens the content is held until other text follows it
    (beside calls alone it is no content, as whole); with parallel_tool_calls false, calls after the first are dropped (as
    vLLM drops them: OpenAI's reply then makes one call at most). Calls a grammar holds (they cannot turn out
    text) are streamed (`deltas`), each call's name once its JSON names it, then its arguments as the model wrote
    them: a guided reply's <tool_call> call, its calls after Mistral's or Llama's marker (or opening the reply,
    Llama's) and a forced reply's, the last two read at their end as a forced reply is.
    Forced: the reply is calls alone, held whole and parsed at the end."""

    def __init__(self, plan: ToolPlan):
        # buf: the text not yet scanned, or a scanned tail where a tag may begin; held: text scanned and held (a
        # call's body, held JSON, a forced reply), joined once when it ends (each chunk is scanned once, not the
        # whole held text again: a long reply streamed in small chunks was quadratic)
        self.plan, self.buf, self.held, self.pos = plan, "", [], 0
        self.made = 0  # calls made so far (a streamed call from its first delta)
        self.out: list[dict] = []  # the calls' stream deltas not yet taken (`deltas`)
        # the call being streamed ({"index", "call", "scan", "args": pieces, "ended"}); whether a guided block's
        # text is still read for its head (`call_head`)
        self.open: dict | None = None
        self.heading = False
        # a forced reply's calls, streamed as the grammar writes them: the scan, and the id and arguments sent of
        # each call begun
        self.scan = CallScan() if plan.forced else None
        self.begun: list[tuple[str, list[str]]] = []
        self.base = 0  # the index of the first call begun (guided: the calls made before them)
        # space: whitespace held while no other text was sent (`wrote`): beside calls alone it is no content
        # (`ToolPlan.read`); sent, it made the streamed content "\n" where the whole reply's is null
        self.space, self.wrote = "", False
        self.cut = False  # a reply that ended cut in a call: forced (ToolPlan.read) or streamed
        # text: scanning for tags; block: inside <tool_call>; lead: after `lead` (a marker, "" at the reply's
        # start), not yet known whether JSON follows; held: JSON after `lead`, held until it ends. A guided reply's
        # calls are in its format only: its text is scanned for its tag alone, and opens bare calls only in Llama's
        self.mode, self.lead, self.tags = "lead" if plan.bare else "text", "", plan.tags

    def feed(self, text: str, finished: bool = False) -> tuple[str, list[dict]]:
        """New text (the last of the reply when `finished`) -> (content to send now, calls completed by it)."""
        if self.plan.forced:
            self.held.append(text)
            if self.scan is not None:
                self._sent(self.scan.feed(text))
            if not finished:
                return "", []
            content, calls, self.cut = self.plan.read(self._take(0))
            self._rest(calls)
            return content or "", calls
        # pos: where the text not yet placed starts; buf is cut there once, at the end (cutting it at each tag
        # copied the rest of a whole reply per call, quadratic in the calls)
        buf, self.pos = self.buf + text, 0
        self.buf = buf
        out: list[str] = []
        calls: list[dict] = []
        while True:
            if self.mode == "text":
                at, tag = _first(buf, self.tags, self.pos)
                if at < 0:
                    keep = 0 if finished else _partial_tag(buf, self.pos, self.tags)
                    out.append(buf[self.pos : len(buf) - keep])
                    self.pos = len(buf) - keep
                    break
                out.append(buf[self.pos : at])
                self.pos = at + len(tag)
                self.mode, self.lead = ("block", "") if tag == OPEN else ("lead", tag)
                self.heading = self.plan.guided and (self.plan.parallel or not self.made)
            elif self.mode == "block" and (self.heading or self.open):
                if not self._stream(buf, finished, calls):
                    break
            elif self.mode == "block":
                at = buf.find(CLOSE, self.pos)
                if at < 0:
                    if finished:  # an unclosed call stays text
                        out.append(OPEN + self._take(len(buf)))
                        self.mode = "text"
                    else:
                        self._hold(len(CLOSE) - 1)
                    break
                body, self.mode = self._take(at, len(CLOSE)), "text"
                obj = _json(body.strip())
                got = _calls_of(self.plan, obj) if isinstance(obj, dict) else []
                if got:
                    calls += self._made(got)
                else:  # not a call of a known tool: the text stays as the model wrote it
                    out.append(OPEN + body + CLOSE)
            elif self.mode == "lead":
                at = _SPACE.match(buf, self.pos).end()
                if not finished and at == len(buf):  # whitespace so far: held, not scanned again
                    self._hold(0)
                    break
                head = buf[at : at + _LONGEST_LEAD + 1]  # as far as a marker could reach
                if not finished and any(m.startswith(head) for m in LEADS):
                    break  # not known yet (a reply may open with a marker: "[TOOL_CALLS]" starts with "[")
                if head[:1] in ("{", "[") and not head.startswith(TAGS):
                    self.mode = "held"
                    if self.plan.guided:  # calls its grammar holds: streamed as a forced reply's
                        self.scan, self.begun, self.base = CallScan(), [], self.made
                else:  # no JSON: the marker, and the whitespace held after it, are text
                    out.append(self.lead + self._take(self.pos))
                    self.mode = "text"
            else:  # held
                ends = LEADS.get(self.lead, ())
                at, end = _first(buf, ends, self.pos)
                if at < 0 and not finished:
                    moved = self._hold(max(map(len, ends), default=1) - 1)
                    if self.scan is not None:
                        self._sent(self.scan.feed(moved))
                    break
                at = len(buf) if at < 0 else at
                if self.scan is not None:
                    self._sent(self.scan.feed(buf[self.pos : at]))
                body, self.mode = self._take(at, len(end)), "text"
                if self.scan is None:
                    got = self._made(_bare_calls(self.plan, body))
                else:  # guided: the calls its grammar writes, the last maybe cut (as a forced reply's)
                    got, cut = _calls_in_form(self.plan, self.lead + body.lstrip())
                    got = _as_written(got, written(body))
                    self._rest(got)
                    self.cut, self.scan = self.cut or (cut and bool(got)), None
                calls += got
                if not got:  # not wholly calls of the tools: the text as the model wrote it
                    out.append(self.lead + body + end)
        self.buf = buf[self.pos :]
        text, self.space = self.space + "".join(out), ""
        if not self.wrote and not text.strip():  # whitespace alone so far: beside calls alone, no content
            if not finished:
                text, self.space = "", text
            elif self.made:
                text = ""
        self.wrote = self.wrote or bool(text.strip())
        return text, calls

    def deltas(self, text: str, finished: bool = False) -> tuple[str, list[dict]]:
        """`feed`'s content, and its calls as chat's stream deltas, OpenAI's: a call's first delta holds its index,
        id, type and name (and its arguments whole, where it was read whole), the next ones pieces of its
        arguments; joined, they are the calls `feed` returns."""
        content = self.feed(text, finished)[0]
        out, self.out = self.out, []
        return content, out

    def _sent(self, found: list[tuple[str, str]]) -> None:
        """Calls a grammar holds as CallScan finds them: a first delta per name, a delta per piece of arguments."""
        for kind, value in found:
            if kind == "name":
                self.begun.append((self.plan.call_id(), []))
                fn, at = {"name": value, "arguments": ""}, self.base + len(self.begun) - 1
                self.out.append({"index": at, "id": self.begun[-1][0], "type": "function", "function": fn})
            else:
                self.begun[-1][1].append(value)
                self.out.append({"index": self.base + len(self.begun) - 1, "function": {"arguments": value}})

    def _rest(self, calls: list[dict]) -> None:
        """Those calls, read whole at their end: of those begun, their ids and what the arguments sent lack (none:
        they are the text sent, `_as_written`), the others whole."""
        for k, call in enumerate(calls):
            if k < len(self.begun):
                call_id, sent = self.begun[k]
                call["id"], rest = call_id, call["function"]["arguments"][len("".join(sent)) :]
                if rest:
                    self.out.append({"index": self.base + k, "function": {"arguments": rest}})
            else:
                self.out.append({"index": self.base + k, **call})
        self.made = self.base + len(calls)

    def _made(self, got: list[dict]) -> list[dict]:
        """Calls read whole, made: with parallel_tool_calls false, none after the first."""
        got = got if self.plan.parallel else got[: max(0, 1 - self.made)]
        self.out += [{"index": self.made + k, **c} for k, c in enumerate(got)]
        self.made += len(got)
        return got

    def _stream(self, buf: str, finished: bool, calls: list[dict]) -> bool:
        """A guided <tool_call> block from pos: read for its head (its tool's name, its arguments' brace), then its
        arguments sent as they come up to their closing brace, the rest of its JSON dropped up to the closing tag.
        False: wait for more text. A block that does not open with a head is read whole (`heading` off); one cut
        after its head is a call, its arguments as far as written and `cut` set (as a forced reply's)."""
        if self.open is None:
            found = call_head(buf[self.pos :])
            if found and self.plan.by_name(found[0]):
                call = {"id": self.plan.call_id(), "type": "function", "function": {"name": found[0]}}
                self.out.append({"index": self.made, **call, "function": {"name": found[0], "arguments": ""}})
                self.open = {"index": self.made, "call": call, "scan": ArgScan(), "args": [], "ended": False}
                self.made += 1
                self.pos += found[1]
            elif finished or len(buf) - self.pos >= HEAD_MAX or CLOSE in buf[self.pos :]:
                self.heading = False  # read whole
                return True
            else:
                return False
        op = self.open
        if not op["ended"]:
            piece, self.pos, op["ended"] = op["scan"].piece(buf, self.pos)
            if piece:
                op["args"].append(piece)
                self.out.append({"index": op["index"], "function": {"arguments": piece}})
        at = buf.find(CLOSE, self.pos) if op["ended"] else -1
        if at < 0 and not finished:
            if op["ended"]:  # the call's JSON after its arguments (the grammar's "}\n"): dropped
                self.pos = max(self.pos, len(buf) - len(CLOSE) + 1)
            return False
        op["call"]["function"]["arguments"] = "".join(op["args"])
        calls.append(op["call"])
        self.cut = self.cut or at < 0
        self.pos = len(buf) if at < 0 else at + len(CLOSE)
        self.open, self.heading, self.mode = None, False, "text"
        return True

    def _hold(self, keep: int) -> str:
        """Moves the text from pos, but its last `keep` characters (where an end tag may begin), to the held text;
        returns the text moved."""
        cut = max(self.pos, len(self.buf) - keep)
        moved = self.buf[self.pos : cut]
        if moved:
            self.held.append(moved)
            self.pos = cut
        return moved

    def _take(self, at: int, skip: int = 0) -> str:
        """The held text and buf[pos:at], joined once; pos then moves `skip` characters (an end tag) past `at`."""
        body = "".join(self.held) + self.buf[self.pos : at]
        self.held, self.pos = [], at + skip
        return body


def _bare_calls(plan: ToolPlan, text: str) -> list[dict]:
    """Calls written as bare JSON, as Llama 3.x writes them: one object, an array of them, or objects separated by
    ';' or ','; [] unless the whole text is such calls of the plan's tools."""
    values, at = _json_values(text)
    items = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return _calls_of(plan, items) if at == len(text) and items else []


def _first(s: str, tags: tuple[str, ...], start: int) -> tuple[int, str]:
    """The earliest of `tags` in s from `start` as (index, tag); (-1, "") when none occurs. One search for all (a
    search for each tag scanned the rest of a whole reply for the tags it does not hold, at each tag found)."""
    found = re.compile("|".join(map(re.escape, tags))).search(s, start) if tags else None
    return (found.start(), found[0]) if found else (-1, "")


def _partial_tag(s: str, start: int, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of s[start:] that is a proper prefix of one of `tags` (opening tags, markers)."""
    for k in range(min(len(s) - start, max(map(len, tags)) - 1), 0, -1):
        if any(len(t) > k and t.startswith(s[-k:]) for t in tags):
            return k
    return 0


def call_form(tok: Tokenizer) -> dict:
    """How the model's chat template takes calls, as ToolPlan's fields: `short_ids`, whether it takes back only
    Mistral's call ids (9 alphanumeric characters; v0.3 and Nemo raise on any other, so a follow-up request with
    "call_..." ids failed); `form`, the format of FORMS its calls are rendered in (<tool_call> blocks, Mistral's
    [TOOL_CALLS] array, Llama's bare JSON; None for another); `lead`, the id of that format's marker where the
    vocabulary holds it as a special token. Probed by rendering a call and its result with each kind of id; a
    template that does not read tools renders no ids, and the system message shows the model <tool_call> blocks."""
    if not tok.template_reads_tools:
        return {"short_ids": False, "form": "tagged", "lead": None}
    long, short = (_rendered_call(tok, ToolPlan((), "auto", short_ids=s).call_id()) for s in (False, True))
    short_ids = long is None and short is not None
    text = (short if short_ids else long) or ""
    form = next((k for k, f in FORMS.items() if f.shown.search(text)), None)
    lead = next(iter(tok.special_ids([FORMS[form].tag])), None) if form else None
    return {"short_ids": short_ids, "form": form, "lead": lead}


def _rendered_call(tok: Tokenizer, call_id: str) -> str | None:
    """The chat template's text for a call of a tool `f` with id `call_id` and its result; None if it raises."""
    call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": {}}}
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "y"}]  # fmt: skip
    try:
        return tok.render_chat(msgs, tools=[Tool("f", "", {"type": "object"}).spec()])
    except InvalidRequestError:
        return None


def plan_tools(tools: list | None, tool_choice: object, parallel: bool | None) -> ToolPlan | None:
    """Checks a request's `tools` and `tool_choice` (InvalidRequestError naming the field); None when no tool
    is offered or tool_choice is "none" (tools then neither shown nor parsed). `parallel` (None: true) is a
    boolean: a string such as "no" read as true."""
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequestError(f"parallel_tool_calls: must be true or false, got {parallel!r:.40}")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError("tools: must be a list of {'type': 'function', 'function': {...}}")
    if tools is not None and len(tools) > MAX_TOOLS:  # before each tool's checks
        raise InvalidRequestError(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}")
    checked = tuple(_tool(i, t) for i, t in enumerate(tools or []))
    if len({t.name for t in checked}) != len(checked):
        raise InvalidRequestError("tools: function names must be unique")
    mode, name = _choice(tool_choice, checked)
    if mode == "none" or not checked:
        return None
    return ToolPlan(checked, mode, name, parallel is not False)


def _tool(i: int, t: object) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise InvalidRequestError(f"{where}: must be {{'type': 'function', 'function': {{...}}}}")
    fn = t["function"]
    name, desc, params = fn.get("name"), fn.get("description", ""), fn.get("parameters", {"type": "object"})
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequestError(f"{where}.function.name: 1-64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(desc, str):
        raise InvalidRequestError(f"{where}.function.description: must be a string")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.function.strict: must be true or false, got {strict!r:.40}")
    if not isinstance(params, dict):
        raise InvalidRequestError(f"{where}.function.parameters: must be a JSON schema object")
    try:  # the prompt and the grammar serialize it
        json.dumps(params, allow_nan=False)
    except (RecursionError, TypeError, ValueError) as e:
        raise InvalidRequestError(f"{where}.function.parameters: must be JSON ({type(e).__name__})") from None
    kind = params.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidRequestError(
            f"{where}.function.parameters: must be a schema of type 'object' (the arguments), got type {kind!r}"
        )
    return Tool(name, desc, params, strict is True)


def _choice(choice: object, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    """(mode, name) of a tool_choice; any but "none" needs tools, as OpenAI and vLLM refuse it without (a client
    that sends it expects calls)."""
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        mode, name = str(choice), None
    else:
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        mode, name = "named", fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                "tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
            )
    if mode != "none" and not tools:
        raise InvalidRequestError(f"tool_choice: {name or mode!r} needs tools")
    if name is not None and not any(t.name == name for t in tools):
        raise InvalidRequestError(f"tool_choice: no tool named {name!r} in tools")
    return mode, name


def prompt_messages(
    messages: list[dict], plan: ToolPlan | None, native: bool
) -> tuple[list[dict], list | None]:
    """The conversation as the chat template takes it, and its `tools` argument. A template that reads `tools`
    (`native`) gets them and the messages' tool_calls as they are; otherwise the tools go into the system
    message as text, earlier calls into their assistant turns as <tool_call> blocks and tool results into
    <tool_response> blocks. A malformed conversation passes through to the template's own checks."""
    if not isinstance(messages, list):
        return messages, None
    messages = [_as_templates_read(m) for m in messages]
    if native:
        return messages, ([t.spec() for t in plan.tools] if plan else None)
    out = [_as_text(m) for m in messages]
    if plan:
        first = out[0] if out else None
        if isinstance(first, dict) and first.get("role") == "system":
            text = message_text(first.get("content"))
            out[0] = {**first, "content": f"{text}\n\n{plan.system_text()}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": plan.system_text()})
    return out, None


def _as_templates_read(m: object) -> object:
    """An OpenAI message as chat templates read it: the role "developer" (OpenAI's newer name) as "system"; an
    assistant turn's tool calls (arguments a JSON string, content null or left out) with arguments as the JSON
    objects they hold, content None when absent."""
    if isinstance(m, dict) and m.get("role") == "developer":
        m = {**m, "role": "system"}
    if not isinstance(m, dict) or not isinstance(m.get("tool_calls"), list):
        return m
    calls = [
        {**c, "function": {**c["function"], "arguments": _arguments_object(c["function"].get("arguments"))}}
        if isinstance(c, dict) and isinstance(c.get("function"), dict) and "arguments" in c["function"]
        else c
        for c in m["tool_calls"]
    ]
    return {"content": None, **m, "tool_calls": calls}


def _as_text(m: object) -> object:
    """A message with tool calls, or a tool result, as plain text; any other message as it is."""
    if not isinstance(m, dict) or not (m.get("tool_calls") or m.get("role") == "tool"):
        return m
    text = message_text(m.get("content"))
    if m.get("role") == "tool":
        return {"role": "tool", "content": f"{RESPONSE_OPEN}\n{text}\n{RESPONSE_CLOSE}"}
    blocks = [f"{OPEN}\n{json.dumps(_name_and_arguments(c))}\n{CLOSE}" for c in m["tool_calls"]]
    return {"role": m.get("role"), "content": "\n".join(([text] if text else []) + blocks)}


def _name_and_arguments(call: object) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(
            "a message's tool_calls must be [{'function': {'name': str, 'arguments': ...}}]"
        )
    return {"name": fn["name"], "arguments": fn.get("arguments", {})}
