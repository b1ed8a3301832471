"""Tokenizer, chat template and incremental detokenization (tokenizers + jinja2, as transformers renders)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    """tokenizer.json plus tokenizer_config.json's chat template and special tokens."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{path}: file not found")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception on bad JSON
            raise ModelLoadError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        cfg_path = model_dir / "tokenizer_config.json"
        try:
            self.cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None
        tmpl = self.cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take the default
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        self.chat_template = tmpl
        self._compiled = None

    def _special(self, key: str) -> str | None:
        v = self.cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError("each chat message needs 'role' and 'content'")
        if self._compiled is None:
            self._compiled = _jinja_env().from_string(self.chat_template)
        specials = {k: self._special(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials
        )

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _jinja_env() -> jinja2.Environment:
    def raise_exception(msg: str):
        raise InvalidRequestError(f"chat template: {msg}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of a sequence)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
