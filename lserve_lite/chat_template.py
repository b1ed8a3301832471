"""Chat templates: Jinja code from the model files, run in an immutable sandbox with budgets.

A template is untrusted code, so rendering one may neither loop nor allocate without bound: it runs at most
MAX_STEPS lines of the compiled template (loops of any kind: counted by a trace function on the template's own
frames only), no string or list it builds by an operator, a call or a length-changing filter may exceed MAX_CHARS,
integer arguments of calls stay under MAX_CALL_INT (`'x'.ljust(10**9)`), and the output stops at MAX_CHARS.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_STEPS = 1 << 20  # template lines run per rendering (a real chat template runs a few hundred a message)
MAX_CHARS = 1 << 24  # characters of any string a template builds, and of its output
MAX_CALL_INT = 1 << 16  # integer arguments of calls and of width-taking filters
MAX_EXPONENT = 64  # of `**` (a huge power is a huge integer: minutes to compute and print)
_WIDE_FORMAT = re.compile(
    r"%[-#0 +]*(\*|\d{6,})|%[-#0 +]*\d*\.(\*|\d{6,})"
)  # printf widths of a million or more


class TemplateBudgetError(SecurityError):
    """A chat template ran past one of this module's budgets."""


def _size(x: object) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateBudgetError(
            f"{what} would build {n} items; a chat template may build at most {MAX_CHARS}"
        )


def _check_int(x: object, what: str) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_CALL_INT:
        raise TemplateBudgetError(f"{what} got the integer {x}; at most {MAX_CALL_INT} in a chat template")


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox with its operators and calls bounded (intercepted operators are never constant-folded)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            count = right if _size(left) else left
            seq = left if _size(left) else right
            if isinstance(count, int) and _size(seq):
                _check_size(_size(seq) * count, "'*'")
        elif operator == "+":
            _check_size(_size(left) + _size(right), "'+'")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise TemplateBudgetError(
                f"'**' got the exponent {right}; at most {MAX_EXPONENT} in a chat template"
            )
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise TemplateBudgetError("'%' got a format width of a million or more")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        if isinstance(__obj, _Range):
            return __obj(*args)
        for a in (*args, *kwargs.values()):
            _check_int(a, "a call")
        out = super().call(__context, __obj, *args, **kwargs)
        _check_size(_size(out), "a call")
        return out


class _Range:
    """range() for one rendering, its items counted against the steps budget (nested loops multiply)."""

    def __init__(self, steps: _Steps):
        self.steps = steps

    def __call__(self, *args: int) -> range:
        r = range(*args)
        self.steps.add(len(r))
        return r


class _Steps:
    """Counts the template's lines through a trace function; raises once past MAX_STEPS."""

    def __init__(self, code_names: set[str]):
        self.n, self.code_names = 0, code_names

    def add(self, k: int) -> None:
        self.n += k
        if self.n > MAX_STEPS:
            raise TemplateBudgetError(f"the chat template ran more than {MAX_STEPS} steps")

    def trace(self, frame, event, arg):
        if frame.f_code.co_filename not in self.code_names:
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.add(1)
        return self._line


def _replace_size(s: object, old: object = "", new: object = "", *_: object, **__: object) -> int:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(value: object, d: object = "", *_: object, **__: object) -> int:
    items = value if isinstance(value, (list, tuple)) else []
    return sum(len(str(x)) for x in items) + len(str(d)) * len(items)


def _format_size(value: object, *_: object, **__: object) -> int:
    if isinstance(value, str) and _WIDE_FORMAT.search(value):
        raise TemplateBudgetError("filter format got a width of a million or more")
    return 0


_PRE_SIZE = {"replace": _replace_size, "join": _join_size, "format": _format_size}


def _bounded(name: str, f: Callable, width_args: tuple[str, ...]) -> Callable:
    """A string filter with its integer arguments (widths) capped and its result's size checked, before it is
    built where the size follows from the arguments (replace, join, format)."""
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context jinja passes first (pass_eval_context...)

    @functools.wraps(f)
    def g(*args, **kwargs):
        for a in (*args[skip + 1 :], *(kwargs.get(k) for k in width_args)):
            _check_int(a, f"filter {name}")
        if name in _PRE_SIZE:
            _check_size(_PRE_SIZE[name](*args[skip:], **kwargs), f"filter {name}")
        out = f(*args, **kwargs)
        _check_size(_size(out), f"filter {name}")
        return out

    return g


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (it marks the assistant's tokens for training
    masks), rendered as its body: a template that uses it must load and render as transformers renders it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def environment(raise_exception: Callable[[str], Any]) -> jinja2.Environment:
    """The chat templates' sandbox, with transformers' extras (tojson, raise_exception,
    strftime_now, the generation tag)."""

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        _check_int(indent, "tojson's indent")
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _Generation])
    for name, widths in (("center", ("width",)), ("indent", ("width",)), ("format", ()), ("replace", ("count",)),
                         ("join", ()), ("wordwrap", ("width",)), ("truncate", ("length",))):  # fmt: skip
        env.filters[name] = _bounded(name, env.filters[name], widths)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: jinja2.Template, **variables: Any) -> str:
    """`template` rendered within the budgets (TemplateBudgetError past one); other tracing is restored after."""
    steps = _Steps({template.root_render_func.__code__.co_filename})
    chunks, size = [], 0
    previous = sys.gettrace()
    sys.settrace(steps.trace)
    try:
        for chunk in template.generate(**variables, range=_Range(steps)):
            size += len(chunk)
            _check_size(size, "the output")
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(chunks)
