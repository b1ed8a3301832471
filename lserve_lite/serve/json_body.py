"""A request body's JSON object parsed in short calls into C: one json.loads holds the GIL for its whole parse
(0.22 s for a million floats, 0.08 s for 327,000 empty lists: bodies under the count limits), and from its worker
thread it held the event loop, every stream, for that time. Here no call into C parses more than CHUNK characters of
a container's items, so the loop gets the GIL back every few milliseconds; values come out as json.loads makes them."""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from json.decoder import JSONDecodeError, scanstring

from ..config import is_utf8

CHUNK = 1 << 16  # characters of items parsed by one call: ~6 ms for the costliest kind, empty lists
# A container's first run is this long, each next one 16 times longer up to CHUNK: a small container costs no
# CHUNK-long copy, and a run cut inside an item (one longer than the run) is tried again longer.
FIRST_RUN = 1 << 8
_WS = re.compile(r"[ \t\n\r]*")
_CLOSE = {"[": "]", "{": "}"}


class _InField(ValueError):
    """A problem in the body's top-level field `field` (None: in a top-level key)."""

    def __init__(self, field: str | None):
        super().__init__(field)
        self.field = field


class TooDeep(_InField):
    """A value nested deeper than allowed."""


class LoneSurrogate(_InField):
    """A string or key holding a lone UTF-16 surrogate."""


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_scan = json.scanner.make_scanner(_DECODER)


def read_object(text: str, max_depth: int, surrogates: bool) -> dict | None:
    """`text`'s JSON object as json.loads parses it, with its errors as this Python's json words and places them
    (JSONDecodeError; ValueError for NaN and an integer past the digit limit); None when `text` does not start with
    one. TooDeep for a value nested deeper than `max_depth` (the object's members are at depth 1); with `surrogates`,
    LoneSurrogate for a string or key that holds one."""
    if text.startswith("\ufeff"):
        json.loads(text[:1])  # json's own error for it, at 0
    pos = _WS.match(text).end()
    if not text.startswith("{", pos):
        return None
    with collector_paused():
        return _Reader(text, max_depth, surrogates).read(pos)


class _Pause:
    """Parses running with the cyclic collector paused, and whether it ran before the first."""

    lock = threading.Lock()
    count = 0
    was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off during a parse: a parse makes no cycles, and a collection in its middle walks every
    container made so far in one call (0.03-0.07 s of 327,000 empty lists held the loop). Parses in several threads
    share the pause; a collector that was off before stays off."""
    with _Pause.lock:
        if _Pause.count == 0:
            _Pause.was_enabled = gc.isenabled()
            gc.disable()
        _Pause.count += 1
    try:
        yield
    finally:
        with _Pause.lock:
            _Pause.count -= 1
            if _Pause.count == 0 and _Pause.was_enabled:
                gc.enable()


class _Reader:
    """One parse. Containers are walked here, single values parsed by json's scanner, and a run of a container's items
    (cut at a comma, up to CHUNK characters) by one raw_decode when that parses: then the run holds whole items (the
    cut was at this container's level), or its items up to the container's end. A run cut inside an item is cut
    again after the last one that closes as the first item does ("}," for objects), then tried longer; one that
    still does not parse leaves the next CHUNK characters of this container to be read item by item."""

    def __init__(self, text: str, max_depth: int, surrogates: bool):
        self.text, self.max_depth, self.surrogates = text, max_depth, surrogates
        # each frame: [a container, the key its next value goes under (None: a list), where its items may be read in
        # runs again (one that did not parse: its items one by one up to there), its next run's length];
        # frames[0][1]: the field
        self.frames: list[list] = []

    @property
    def field(self) -> str | None:
        return self.frames[0][1] if self.frames else None

    def read(self, pos: int) -> dict:
        text, frames = self.text, self.frames
        while True:
            c = text[pos : pos + 1]
            if c in _CLOSE:
                pos = _WS.match(text, pos + 1).end()
                if text.startswith(_CLOSE[c], pos):
                    value, pos = ({} if c == "{" else []), pos + 1
                else:
                    frames.append([{} if c == "{" else [], None, 0, FIRST_RUN])
                    if len(frames) > self.max_depth:  # its items' depth
                        raise TooDeep(self.field)
                    pos, closed = self._items(pos)
                    if not closed:
                        continue
                    value = frames.pop()[0]
            else:
                try:
                    value, pos = _scan(text, pos)
                except StopIteration:
                    raise self._error(pos) from None
                if self.surrogates and type(value) is str and not is_utf8(value):
                    raise LoneSurrogate(self.field)
            # `value` ends at `pos`: into its container, then past the comma to the next item, or the container ends
            while True:
                if not frames:
                    end = _WS.match(text, pos).end()
                    if end != len(text):
                        raise self._error(end)
                    return value
                container, key = frames[-1][:2]
                if type(container) is list:
                    container.append(value)
                else:
                    container[key] = value
                pos = _WS.match(text, pos).end()
                c = text[pos : pos + 1]
                if c == ",":
                    pos, closed = self._items(_WS.match(text, pos + 1).end())
                    if not closed:
                        break
                elif c == ("]" if type(container) is list else "}"):
                    pos += 1
                else:
                    raise self._error(pos)
                value = frames.pop()[0]

    def _items(self, pos: int) -> tuple[int, bool]:
        """Past the runs of the innermost container's items that parse at `pos`: (where its next value starts, past
        its next member's key for an object; or past its end, True when it ended)."""
        frame = self.frames[-1]
        container = frame[0]
        retry = False
        # the body's own members one by one: `field` names the one an error is in
        while len(self.frames) > 1 and pos >= frame[2]:
            end = self.text.rfind(",", pos, pos + frame[3])
            # that comma was inside an item: cut after one that closes as the first one
            if retry and end > pos:
                end = self.text.rfind(_CLOSE[self.text[pos]] + ",", pos, end + 1) + 1
            run = self.text[pos:end]
            # an item must come first (a close there is a trailing comma's: json's error is the slow path's), and
            # escapes that could make a surrogate are checked one by one
            if run[:1] in ("]", "}") or (self.surrogates and "\\" in run):
                frame[2] = pos + CHUNK
                break
            try:
                if end <= pos:
                    raise ValueError
                items, stop = _DECODER.raw_decode(f"[{run}]" if type(container) is list else f"{{{run}}}")
            except ValueError:  # no whole item: cut inside one, or none ends in the window
                retry = not retry and self.text[pos : pos + 1] in _CLOSE
                if retry:
                    continue
                if frame[3] < CHUNK:  # a longer run may hold whole items
                    frame[3] = min(frame[3] * 16, CHUNK)
                    continue
                frame[2], frame[3] = pos + CHUNK, FIRST_RUN
                break
            except RecursionError:  # nested past json's recursion limit: past max_depth
                raise TooDeep(self.field) from None
            if "[" in run or "{" in run:
                self._check_depth(items.values() if type(items) is dict else items)
            container.update(items) if type(container) is dict else container.extend(items)
            frame[3], retry = min(frame[3] * 16, CHUNK), False
            if stop < len(run) + 2:  # the container's own end came first
                return pos + stop - 1, True
            pos = _WS.match(self.text, end + 1).end()
        return (self._key(pos) if type(container) is dict else pos), False

    def _key(self, pos: int) -> int:
        """Read an object member's key and colon at `pos` into the innermost frame; where its value starts."""
        text = self.text
        if not text.startswith('"', pos):
            raise self._error(pos)
        key, pos = scanstring(text, pos + 1)
        if self.surrogates and not is_utf8(key):
            raise LoneSurrogate(self.field if len(self.frames) > 1 else None)
        self.frames[-1][1] = key
        pos = _WS.match(text, pos).end()
        if not text.startswith(":", pos):
            raise self._error(pos, after_key=True)
        return _WS.match(text, pos + 1).end()

    def _error(self, pos: int, after_key: bool = False) -> JSONDecodeError:
        """json's own error for the bad character at `pos` (its messages change by version: 3.13 names a trailing
        comma, at the comma), from json parsing a short piece: from the last delimiter or value before `pos`, after
        a prefix that puts json in the state this reader was in there; the body is never parsed whole."""
        text = self.text
        at = len(text[:pos].rstrip(" \t\n\r")) - 1  # the last character before the whitespace at `pos`
        mark = text[at]
        if not self.frames:  # past the body's object
            prefix = "{}"
        elif after_key:
            prefix = '{""'
        elif mark in "[{":  # the innermost container's opening
            prefix = mark
        elif mark == ":":
            prefix = '{"":'
        else:  # after a value or its comma
            prefix = ("[0" if type(self.frames[-1][0]) is list else '{"":0') + ("," if mark == "," else "")
        piece = prefix + text[at + 1 : pos + 1]
        try:
            json.loads(piece, parse_constant=_no_constant)
        except JSONDecodeError as e:
            return JSONDecodeError(e.msg, text, e.pos - len(prefix) + at + 1)
        raise AssertionError(f"json parsed {piece!r}, a piece this reader found bad")

    def _check_depth(self, values) -> None:
        """TooDeep where a run's items (in the innermost container) nest past max_depth; containers walked."""
        stack = [(v, len(self.frames) + 1) for v in values if v and type(v) in (list, dict)]
        while stack:
            v, depth = stack.pop()  # a container with items, at `depth`
            if depth > self.max_depth:
                raise TooDeep(self.field)
            items = v.values() if type(v) is dict else v
            stack.extend((x, depth + 1) for x in items if x and type(x) in (list, dict))
