"""Tokenizer, chat template and incremental detokenization (tokenizers + jinja2, as transformers renders)."""

from __future__ import annotations

import functools
import json
import re
import secrets
from pathlib import Path

import jinja2
from tokenizers import Encoding
from tokenizers import Tokenizer as HFTokenizer

from . import chat_template
from .config import read_json_object, read_text_file
from .errors import InvalidRequestError, LServeError, ModelLoadError, PromptTooLongError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# a caller's chat template (vLLM's chat_template=) is compiled: bounded (real ones are a few KB)
MAX_CALLER_TEMPLATE_CHARS = 1 << 20
CALLER_TEMPLATES = 16  # compiled caller templates kept, by their text
# Texts longer than this are encoded through encode_batch, which lets the GIL go (encode holds it, ~0.7 us a
# character: 11 ms at this length). Shorter ones keep encode: encode_batch marks the library's thread pool used, and a
# process forked after that prints a warning.
GIL_FREE_CHARS = 1 << 14
# variables every rendering sets itself (range: the budgeted one), which chat_template_kwargs may not replace
RENDER_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt", "range")
# apply_chat_template's options that vLLM's chat takes from chat_template_kwargs too (continue_final_message) or
# refuses there (chat_template, tokenize): as template variables no template reads them, so they are refused
RENDER_OPTIONS = ("continue_final_message", "chat_template", "tokenize")
# transformers' apply_chat_template options that are not template variables, not implemented here
HF_ONLY = ("documents", "return_tensors", "return_dict", "padding", "truncation", "max_length", "tokenizer_kwargs",
           "return_assistant_tokens_mask")  # fmt: skip


class Tokenizer:
    """tokenizer.json plus tokenizer_config.json's special tokens and chat template (or chat_template.jinja's)."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        text = read_text_file(path, "a tokenizer file")
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises bare Exception on bad JSON
            raise ModelLoadError(f"{path}: cannot load tokenizer ({_one_line(e)})") from None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json_object(cfg_path) if cfg_path.exists() else {}
        # transformers (since 4.47) saves the template to its own file, which it reads before the config's
        jinja, tool_jinja = (
            model_dir / "chat_template.jinja",
            model_dir / "additional_chat_templates/tool_use.jinja",
        )
        if jinja.exists():
            cfg = {**cfg, "chat_template": read_text_file(jinja, "a chat template")}
            if tool_jinja.exists():
                cfg["chat_template"] = [{"name": "default", "template": cfg["chat_template"]},
                                        {"name": "tool_use", "template": read_text_file(tool_jinja, "a chat template")}]  # fmt: skip
        self._setup(tok, cfg, cfg_path, jinja if jinja.exists() else None)

    @classmethod
    def from_parts(cls, tok: HFTokenizer, cfg: dict, source: Path) -> Tokenizer:
        """A tokenizer built in memory (a GGUF's vocabulary) with its tokenizer_config.json dict."""
        self = cls.__new__(cls)
        self._setup(tok, cfg, source)
        return self

    def _setup(self, tok: HFTokenizer, cfg: dict, cfg_path: Path, template_path: Path | None = None) -> None:
        """The chat template and special tokens of `cfg`, checked; `cfg_path` names it in errors (and
        `template_path` the template's own file, where it came from one)."""
        self.tok, self.cfg = tok, cfg
        special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content]
        self._special_ids = {tok.token_to_id(t) for t in special}
        self._added_ids = set(tok.get_added_tokens_decoder())
        self._byte_spelling: dict[str, int] | str | None = None  # token_bytes' rule, read on first use
        longest_first = sorted(set(special), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if special else None
        self._plain_tok: dict[bool, HFTokenizer] = {}
        self.chat_template, tool_template = _chat_template(self.cfg, cfg_path)
        where = (
            f"{template_path}: the chat template" if template_path else f"{cfg_path}: field 'chat_template'"
        )
        self._compiled = _compile(self.chat_template, where) if self.chat_template else None
        self._compiled_tools = _compile(tool_template, where) if tool_template else None
        # whether the template renders a `tools` argument itself (transformers' tool-use convention)
        self.template_reads_tools = self._compiled_tools is not None or _reads_tools(self.chat_template)
        for key in SPECIAL_KEYS:
            v = self.cfg.get(key)
            if not (
                v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))
            ):
                raise ModelLoadError(f"{cfg_path}: field {key!r} must be a string or {{'content': string}}")

    def _special(self, key: str) -> str | None:
        v = self.cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; InvalidRequestError for what is not Unicode text (a lone surrogate)."""
        return _encode(self.tok, _checked_text(text), add_special_tokens).ids

    def added_by_encode(self, text: str, ids: list[int]) -> list[bool]:
        """Which of `ids` `encode(text)` added beside the text's own tokens (a BOS), where `ids` are what it makes of
        `text`; else none. A prompt that starts with the BOS's own text ("<s>x") holds two alike: only this tells
        them apart."""
        enc = _encode(self.tok, text, True)
        return [bool(m) for m in enc.special_tokens_mask] if enc.ids == list(ids) else [False] * len(ids)

    def decode(
        self, ids: list[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()
    ) -> str:
        """The text of `ids`; `keep`: special tokens whose text stays though the others are skipped."""
        if keep and skip_special_tokens:  # the others dropped here, as the tokenizers library drops them
            ids = [i for i in ids if i in keep or i not in self._special_ids]
            skip_special_tokens = False
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: a byte-level or byte-fallback token that holds part of a UTF-8 character
        gives those bytes (decoded alone it would read U+FFFD); a SentencePiece token its "▁" as the space it is
        (decoded alone, its decoder drops a text's first space: "▁the" read "the"); an added or special token
        gives its text."""
        if self._byte_spelling is None:
            self._byte_spelling = _byte_spelling(self.tok)
        s = self.tok.id_to_token(token_id)
        table = self._byte_spelling
        if s is not None and token_id not in self._added_ids:
            if isinstance(table, dict) and all(c in table for c in s):
                return bytes(table[c] for c in s)
            if table == "sentencepiece":
                m = _BYTE_TOKEN.fullmatch(s)
                return bytes([int(m[1], 16)]) if m else s.replace("▁", " ").encode()
        return self.tok.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """A token's text as OpenAI's logprobs show it: its bytes (`token_bytes`), U+FFFD for part of a character."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def pieces(self, ids: list[int]) -> list[str | None]:
        """The vocabulary's strings of `ids` (transformers' convert_ids_to_tokens: `"Ġworld"`, `"<0x0A>"`); None for
        an id the vocabulary has no string for."""
        return [self.tok.id_to_token(i) for i in ids]

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a special one, which `decode` skips by default."""
        return token_id in self._special_ids

    def special_ids(self, texts: list[str]) -> frozenset[int]:
        """The ids of those of `texts` that are special tokens of this vocabulary (any other decodes as text, or
        is not in the vocabulary)."""
        ids = (self.tok.token_to_id(t) for t in texts)
        return frozenset(i for i in ids if i is not None and i in self._special_ids)

    def holds_special(self, text: str) -> bool:
        """Whether `text` contains a special token's string (which a template would render as a control token)."""
        return self._special_re is not None and self._special_re.search(text) is not None

    def reads_tools(self, chat_template: str | None = None) -> bool:
        """Whether the template that renders (the caller's `chat_template`, else the model's) reads `tools`."""
        if chat_template is None:
            return self.template_reads_tools
        return _reads_tools(_caller_template_text(chat_template))

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text for `messages`, rendered as transformers' apply_chat_template does;
        `continue_final_message`: cut after the last message's text, so the reply continues it. `chat_template`
        (vLLM's): the caller's Jinja template instead of the model's, in the same sandbox and budgets;
        `chat_template_kwargs`: extra template variables (Qwen3's enable_thinking)."""
        how = (add_generation_prompt, tools, continue_final_message, chat_template, chat_template_kwargs)
        return self._render(_chat_messages(messages), *how)

    def _render(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        tools: list | None = None,
        continue_final: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> str:
        """As transformers renders: the caller's template if given, else a model's named "tool_use" template when
        tools are given, else its default. The two switches are booleans: a string such as "no" read as true."""
        for name, flag in (
            ("add_generation_prompt", add_generation_prompt),
            ("continue_final_message", continue_final),
        ):
            if not isinstance(flag, bool):
                raise InvalidRequestError(f"{name} must be True or False, got {flag!r:.40}")
        extra = _template_kwargs(chat_template_kwargs)
        if chat_template is not None:
            compiled = _caller_template(_caller_template_text(chat_template))
        else:
            compiled = self._compiled_tools if tools is not None and self._compiled_tools else self._compiled
        if compiled is None:
            raise InvalidRequestError("this model has no chat template; use a plain prompt")
        if continue_final:
            if add_generation_prompt:
                raise InvalidRequestError(
                    "continue_final_message continues the last message; add_generation_prompt starts a new turn: "
                    "pass add_generation_prompt=False with it"
                )
            # transformers' rule: a tag after the last message's text marks where the rendering is cut
            tag = f"CONTINUE_FINAL_MESSAGE_{secrets.randbelow(10**12)} "
            final = messages[-1]["content"]
            text = self._render_template(
                compiled, [*messages[:-1], {**messages[-1], "content": final + tag}], False, tools, extra
            )
            at = text.rfind(tag.strip())
            if at < 0 or final.strip() not in text[:at]:
                raise InvalidRequestError(
                    "continue_final_message: the chat template does not render the last message's text as "
                    "given, so it cannot be continued"
                )
            return text[:at] if text.startswith(tag, at) else text[:at].rstrip()  # spaces after it trimmed
        return self._render_template(compiled, messages, add_generation_prompt, tools, extra)

    def _render_template(
        self,
        compiled: jinja2.Template,
        messages: list[dict],
        add_generation_prompt: bool,
        tools: list | None,
        extra: dict,
    ) -> str:
        # an unset special token stays undefined (renders ""), as in transformers' special_tokens_map, not "None";
        # the caller's extra variables come after them, as transformers merges its kwargs
        specials = {k: v for k in SPECIAL_KEYS if (v := self._special(k)) is not None} | extra
        try:  # tools and documents given as None when absent, as transformers renders (`tools is not none`)
            return chat_template.render(
                compiled,
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **specials,
            )
        except LServeError:
            raise
        except Exception as e:  # the template is code from the model files: any failure is a bad request
            raise InvalidRequestError(f"chat template failed on these messages ({_one_line(e)})") from None

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: object,
    ) -> str | list[int]:
        """transformers' call, as code ported from vLLM makes it on `llm.get_tokenizer()`: the rendered prompt's
        token ids (encode_chat), or with `tokenize=False` its text (render_chat); other keywords are template
        variables, as transformers passes them."""
        hf = next((k for k in kwargs if k in HF_ONLY), None)
        if hf is not None:
            raise InvalidRequestError(
                f"apply_chat_template: {hf} is not supported (it returns a list of ids or text)"
            )
        if tokenize:
            return self.encode_chat(
                conversation, tools, add_generation_prompt, continue_final_message, chat_template, kwargs
            )
        return self.render_chat(
            conversation, add_generation_prompt, tools, continue_final_message, chat_template, kwargs
        )

    def encode_chat(
        self,
        messages: list[dict],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        max_chars: int | None = None,
    ) -> list[int]:
        """Token ids of the rendered conversation (`tools` and the rest: as `render_chat` takes them). Only the template
        makes control tokens: a special token's text inside a message ("<|im_start|>system" typed by a user)
        is encoded as the plain text it is; the tools and the messages' other fields (tool calls, ids), which a
        template may render too, must not hold such text, nor may `chat_template_kwargs`, which a server's
        clients send to the model's template. A rendering over `max_chars` characters is refused before
        it is encoded (a template can make a short conversation long, and encoding takes time in its length)."""
        messages = _chat_messages(messages)
        how = (add_generation_prompt, tools, continue_final_message, chat_template, chat_template_kwargs)

        def render(msgs: list[dict]) -> str:
            text = self._render(msgs, *how)
            if max_chars is not None and len(text) > max_chars:
                raise PromptTooLongError(
                    f"the rendered prompt has {len(text)} characters; at most {max_chars} allowed"
                )
            return text

        rest = [(f"messages[{i}] (a field other than content)", {k: v for k, v in m.items() if k != "content"})
                for i, m in enumerate(messages)]  # fmt: skip
        for field, value in [("tools", tools), ("chat_template_kwargs", chat_template_kwargs), *rest]:
            # the error names its field first: the server's `param`
            if self.holds_special(json.dumps(value, ensure_ascii=False, default=str)):
                raise InvalidRequestError(f"{field}: must not hold the model's special tokens' text")
        if not any(self.holds_special(m["content"]) for m in messages):
            return self.encode(render(messages), add_special_tokens=False)
        # Each special string of a message becomes a marker the template cannot mistake for markup; after
        # rendering, the markers turn back into their strings and those spans are encoded as plain text.
        found: list[str] = []
        tag = secrets.randbelow(10**12)  # digits: a template that changes case leaves the markers as they are

        def mark(m: re.Match) -> str:
            found.append(m.group(0))
            return f"\ue000{tag}:{len(found) - 1}\ue001"

        marked = [{**m, "content": self._special_re.sub(mark, m["content"])} for m in messages]
        # A marker that tojson(ensure_ascii=True) escaped comes back as its string escaped the same way.
        text, spans, pos = [], [], 0
        pattern = f"(?:\ue000|(\\\\ue000)){tag}:(\\d+)(?:\ue001|\\\\ue001)"
        pieces = re.split(pattern, render(marked))
        for k in range(0, len(pieces), 3):
            piece = pieces[k]
            if k:  # after a marker: the marker's string first
                s = found[int(pieces[k - 1])]
                s = json.dumps(s)[1:-1] if pieces[k - 2] else s
                spans.append((pos, pos + len(s)))
                text.append(s)
                pos += len(s)
            text.append(piece)
            pos += len(piece)
        full = _checked_text("".join(text))
        enc = _encode(self.tok, full, False)
        # The template's control tokens split the text into runs, as in any encode; a run holding a message's
        # special string is encoded again whole as plain text (the string alone would get its own word start,
        # e.g. SentencePiece's "▁" before it: a space the user never typed).
        ids: list[int] = []
        run: list[int] = []
        start, marked = 0, False
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i not in self._special_ids:
                run.append(i)
            elif any(s <= a and b <= e for s, e in spans):
                marked = True
            else:
                ids += _encode(self._plain(start == 0), full[start:a], False).ids if marked else run
                ids.append(i)
                run, start, marked = [], b, False
        ids += _encode(self._plain(start == 0), full[start:], False).ids if marked else run
        return ids

    def _plain(self, first: bool) -> HFTokenizer:
        """A copy of the tokenizer that encodes special tokens' text as ordinary text (made on first use); for a
        run after a control token (`first` False), SentencePiece's word start is not prepended, as the tokenizer
        itself does not prepend it after one (Metaspace's prepend_scheme "first")."""
        if first not in self._plain_tok:
            spec = json.loads(self.tok.to_str())
            if not first:
                _no_first_prepend(spec.get("pre_tokenizer"))
            self._plain_tok[first] = HFTokenizer.from_str(json.dumps(spec))
            self._plain_tok[first].encode_special_tokens = True
        return self._plain_tok[first]


def _no_first_prepend(spec: object) -> None:
    """A pre-tokenizer spec whose Metaspace prepends its word start at the text's start only (scheme "first"),
    changed in place to never prepend it: how the tokenizer treats a run that follows an added token."""
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
            spec["prepend_scheme"] = "never"
        for sub in spec.get("pretokenizers") or ():
            _no_first_prepend(sub)


def _encode(tok: HFTokenizer, text: str, add_special_tokens: bool) -> Encoding:
    """`tok.encode(text)`; a text over GIL_FREE_CHARS without holding the GIL: the library's encode keeps it for the
    whole text, and the server tokenizes in worker threads (a 524,288-character prompt held every stream 0.35 s)."""
    if len(text) > GIL_FREE_CHARS:
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return tok.encode(text, add_special_tokens=add_special_tokens)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_spelling(tok: HFTokenizer) -> dict[str, int] | str:
    """How the vocabulary spells bytes and spaces, from its decoder: byte-level BPE (the inverse of
    bytes_to_unicode), SentencePiece's (`<0xNN>` byte-fallback tokens, "▁" for a space: "sentencepiece") or
    neither ("")."""
    spec = json.loads(tok.to_str()).get("decoder") or {}
    decoders = [d for d in spec.get("decoders", [spec]) if isinstance(d, dict)]
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return {c: b for b, c in bytes_to_unicode().items()}
    spaces = "Metaspace" in kinds or any(
        d.get("type") == "Replace" and d.get("pattern") == {"String": "▁"} and d.get("content") == " "
        for d in decoders
    )
    return "sentencepiece" if spaces else ""


def _chat_messages(messages: object) -> list[dict]:
    """`messages` checked (a non-empty list of dicts with a string role and a content), contents as text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("a conversation must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidRequestError("each chat message must be a dict with a string 'role' and a 'content'")
    return [{**m, "content": message_text(m["content"])} for m in messages]


def check_contents(messages: object) -> None:
    """OpenAI's rule, the server's and LLM.chat's: only an assistant turn may leave its content out (None or
    absent: it made tool calls), a user's or tool's without would render as empty text. Anything else malformed is
    left to the template's own checks."""
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(m, dict) and m.get("content") is None and m.get("role") != "assistant":
            raise InvalidRequestError(f"messages[{i}].content: a {m.get('role')} message needs content")


def message_text(content: object) -> str:
    """A chat message's content as the template's text: a string, OpenAI's list of text parts joined by newlines
    (as vLLM joins them: parts written as separate paragraphs do not run together), or None (an assistant turn
    without text) as empty."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise InvalidRequestError(
        "a chat message's content must be a string or a list of text parts {'type': 'text', 'text': str}"
    )


def _chat_template(cfg: dict, path: Path) -> tuple[str | None, str | None]:
    """tokenizer_config.json's chat_template: a string, or a list of named ones; (its 'default', its 'tool_use')."""
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):
        named = [t for t in tmpl if isinstance(t, dict) and isinstance(t.get("template"), str)]
        if len(named) != len(tmpl):
            raise ModelLoadError(f"{path}: field 'chat_template' must list {{'name', 'template'}} objects")
        by_name = {t.get("name"): t["template"] for t in named}
        return by_name.get("default"), by_name.get("tool_use")
    if tmpl is not None and not isinstance(tmpl, str):
        raise ModelLoadError(f"{path}: field 'chat_template' must be a string, got {type(tmpl).__name__}")
    return tmpl, None


def _compile(template: str, where: str, error: type[Exception] = ModelLoadError) -> jinja2.Template:
    """A chat template compiled in the sandbox, a syntax error one `error` line naming `where`: the model's at load
    (the file and field, not a request), a caller's as its argument."""
    try:
        return chat_template.environment(_raise_exception).from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise error(f"{where} has a Jinja syntax error at line {e.lineno} ({_one_line(e)})") from None
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:
        raise error(f"{where} cannot be compiled ({_one_line(e)})") from None


def _reads_tools(template: str | None) -> bool:
    """Whether a template's text names `tools` (transformers' tool-use convention: it renders them itself)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _caller_template_text(template: object) -> str:
    """A caller's chat template checked before it is compiled: a non-empty string of bounded size."""
    if not isinstance(template, str) or not template:
        raise InvalidRequestError(f"chat_template must be a non-empty string of Jinja, got {template!r:.60}")
    if len(template) > MAX_CALLER_TEMPLATE_CHARS:
        raise InvalidRequestError(
            f"chat_template has {len(template)} characters; at most {MAX_CALLER_TEMPLATE_CHARS} allowed"
        )
    return template


@functools.lru_cache(maxsize=CALLER_TEMPLATES)
def _caller_template(template: str) -> jinja2.Template:
    """A caller's chat template compiled in the model templates' sandbox, kept by its text: a template passed with
    every call compiles once."""
    return _compile(template, "chat_template", InvalidRequestError)


def _template_kwargs(kwargs: object) -> dict:
    """vLLM's chat_template_kwargs checked: a dict of template variables named by strings, none of them one that
    the rendering sets itself."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidRequestError(
            "chat_template_kwargs must be a dict of template variables named by strings"
        )
    taken = next((k for k in kwargs if k in RENDER_VARIABLES or k in RENDER_OPTIONS), None)
    if taken is not None:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {taken!r}, which the rendering sets itself"
        )
    return kwargs


def _checked_text(text: object) -> str:
    """Prompt text the tokenizer can take: a str that encodes to UTF-8 (no lone surrogates)."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"prompt text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"prompt is not valid Unicode text (lone surrogate U+{ord(text[e.start]):04X} at index {e.start})"
        ) from None
    return text


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _raise_exception(msg: str):
    raise InvalidRequestError(f"chat template: {msg}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE vocabularies)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas that never split a UTF-8 character.

    The text continues the prompt, as vLLM's does: the prompt's last tokens are decoded before the output's, so
    a decoder that drops a text's leading space (SentencePiece's "▁the" alone decodes to "the") keeps the one
    the first output token has, and prompt + text reads as the model wrote it."""

    PROMPT_CONTEXT = 5  # prompt tokens decoded before the output (vLLM's number)

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        keep: frozenset[int] = frozenset(),
        skip_special: bool = True,
    ):
        # keep: special tokens whose text is kept (Tokenizer.decode); skip_special False keeps every one's
        self.tok, self.keep, self.skip = tokenizer, keep, skip_special
        self.ids: list[int] = list(prompt_ids[-self.PROMPT_CONTEXT :]) if prompt_ids else []
        self.prefix = 0  # start of the window decoded for context
        self.read = len(self.ids)  # ids whose text has been emitted (or is the prompt's)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip, self.keep)
        full = self.tok.decode(self.ids[self.prefix :], self.skip, self.keep)
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of a sequence)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip, self.keep)
        full = self.tok.decode(self.ids[self.prefix :], self.skip, self.keep)
        self.prefix = self.read = len(self.ids)
        return full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
