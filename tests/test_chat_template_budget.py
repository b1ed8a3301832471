"""Chat templates are code from the model files: renderings that would loop or allocate without bound stop at
chat_template's budgets with one InvalidRequestError line, quickly; real templates render as plain Jinja does."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from fuzz_corpus import write_min_model_dir
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lserve_lite.errors import InvalidRequestError
from lserve_lite.tokenizer import Tokenizer

BOMBS = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x",
    "{% for a in 'x' * 4096 %}{% for b in 'x' * 4096 %}{% endfor %}{% endfor %}",  # loops without range
    "{% macro f(n) %}{% for c in 'abcdefgh' %}{{ f(n) if n < 100 else '' }}{% endfor %}{% endmacro %}{{ f(0) }}",
    "{{ 'x' * 300000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ ('x' * 60000)|replace('x', 'x' * 1000) }}",
    "{{ (['x' * 60000] * 1000)|join }}",
    "{{ '%999999999s'|format(1) }}",
    "{{ '%999999999s' % 1 }}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{{ 9 ** 99999999 }}",
]
SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tok(tmp_path: Path, template: str) -> Tokenizer:
    d = write_min_model_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return Tokenizer(d)


@pytest.mark.parametrize("template", BOMBS)
def test_template_bombs_stop_at_a_budget(tmp_path: Path, template: str):
    tok, trace = _tok(tmp_path, template), sys.gettrace()
    t0 = time.monotonic()
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10 and sys.gettrace() is trace  # another tracer (coverage) is restored


@pytest.mark.parametrize("template", BOMBS[:4])
def test_callers_template_stops_at_the_same_budgets(tmp_path: Path, template: str):
    """A caller's chat_template (vLLM's, LLM.chat's) runs in the model templates' sandbox with their budgets."""
    tok = _tok(tmp_path, SMOL)
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        tok.render_chat([{"role": "user", "content": "hi"}], chat_template=template)
    assert tok.render_chat([{"role": "user", "content": "hi"}], chat_template="{{ 'x' * 3 }}") == "xxx"


def test_real_templates_render_as_plain_jinja(tmp_path: Path):
    msgs = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 30} for i in range(50)
    ]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(SMOL)
    assert _tok(tmp_path, SMOL).render_chat(msgs) == plain.render(messages=msgs, add_generation_prompt=True)
    loops = "{% for i in range(3) %}{{ i }}{% endfor %}{{ messages|length }}{{ 'a' ~ 'b' }}{{ 2 ** 10 }}"
    assert _tok(tmp_path, loops).render_chat(msgs) == "012" + "50" + "ab" + "1024"


def test_template_in_its_own_file_as_transformers_saves_it(tmp_path: Path):
    """transformers (4.47+, so every model it saves now) writes the template to chat_template.jinja, not into
    tokenizer_config.json: such a model had no chat template here. The file is read, before the config's, and a
    syntax error in it names it."""
    from lserve_lite.errors import ModelLoadError

    d = write_min_model_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "config: {{ messages[0]['content'] }}"})
    )
    (d / "chat_template.jinja").write_text("file: {{ messages[0]['content'] }}")
    assert Tokenizer(d).render_chat([{"role": "user", "content": "hi"}]) == "file: hi"
    (d / "tokenizer_config.json").write_text("{}")
    assert Tokenizer(d).render_chat([{"role": "user", "content": "hi"}]) == "file: hi"
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m")
    with pytest.raises(
        ModelLoadError, match=r"chat_template.jinja: the chat template has a Jinja syntax error"
    ):
        Tokenizer(d)


def _transformers_render(tmp_path: Path, messages: list[dict], **kw) -> str:
    """transformers' apply_chat_template on the same tokenizer files (the reference rendering)."""
    tf = pytest.importorskip("transformers")
    return tf.AutoTokenizer.from_pretrained(str(tmp_path / "m")).apply_chat_template(
        messages, tokenize=False, **kw
    )


def test_the_generation_tag_renders_as_transformers_does(tmp_path: Path):
    """transformers' `{% generation %}` tag (assistant masks; SmolLM3-style templates use it) failed to load as a
    Jinja syntax error; its body renders in place, a `set` inside it staying local as in transformers' block."""
    from tiny_models import write_tokenizer

    template = (
        "{% set ns = namespace(n=0) %}{% set x = 'outer' %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}{% generation %}{% set x = 'inner' %}{% set ns.n = ns.n + 1 %}"
        "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
        "{% endfor %}{{ x }}:{{ ns.n }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "m").mkdir()
    write_tokenizer(tmp_path / "m", 320)
    cfg = json.loads((tmp_path / "m/tokenizer_config.json").read_text())
    (tmp_path / "m/tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tok = Tokenizer(tmp_path / "m")
    for gen in (False, True):
        assert tok.render_chat(msgs, gen) == _transformers_render(tmp_path, msgs, add_generation_prompt=gen)
    assert tok.render_chat(msgs).endswith("outer:1<|im_start|>assistant\n")


def test_unset_special_tokens_render_as_transformers_does(tmp_path: Path):
    """A special token the config leaves unset (Qwen2.5's `"bos_token": null`) rendered as the text "None" in the
    prompt; transformers leaves it undefined, so `{{ bos_token }}` renders nothing and `is defined` is false."""
    from tiny_models import write_tokenizer

    (tmp_path / "m").mkdir()
    write_tokenizer(tmp_path / "m", 320)
    cfg = json.loads((tmp_path / "m/tokenizer_config.json").read_text())
    template = "{{ bos_token }}[{{ pad_token is defined }}]{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    (tmp_path / "m/tokenizer_config.json").write_text(
        json.dumps({**cfg, "bos_token": None, "chat_template": template})
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert (
        Tokenizer(tmp_path / "m").render_chat(msgs)
        == _transformers_render(tmp_path, msgs)
        == "[False]hi<|im_end|>"
    )
