"""A call's arguments streamed as the model writes them (ToolStream, for calls a grammar holds): where a call's
JSON names its tool and its arguments' object begins (`call_head`, `CallScan`), and where that object ends (`ArgScan`)."""

from __future__ import annotations

import re

# a call's JSON up to its arguments' opening brace: name first, as the grammar writes it (`_call_schema`), its
# whitespace bounded (the grammar's JSON is compact) so that a head is shorter than HEAD_MAX
_S = r"\s{0,8}"
_HEAD = re.compile(
    rf'\{{{_S}"name"{_S}:{_S}"(?P<name>[A-Za-z0-9_-]{{1,64}})"{_S},{_S}"(?:arguments|parameters)"{_S}:{_S}\{{'
)
_OPENING = re.compile(r"\s*" + _HEAD.pattern)  # a call's text that opens with its head
# how far a call's text is read for its head: past it the call is read whole (at most 64 name characters)
HEAD_MAX = 160
_SIGNIFICANT = re.compile(r'["\\{}\[\]]')


def call_head(text: str) -> tuple[str, int] | None:
    """(tool name, where its arguments' object starts) of a call's text opening with its head within HEAD_MAX
    characters; None if it does not (yet): read on a bounded prefix, the answer is the same however it was split."""
    m = _OPENING.match(text[:HEAD_MAX])
    return (m["name"], m.end() - 1) if m else None


class CallScan:
    """Calls a grammar writes (a forced reply's, a guided one's after its marker) fed in pieces: each head, searched
    for outside arguments (separators and tags hold none), then its arguments' text up to their closing brace."""

    def __init__(self) -> None:
        # the text not yet searched (shorter than HEAD_MAX); the open arguments' scan
        self.tail, self.args = "", None

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The new text's ("name", a call's name) and ("args", a piece of its arguments), in order."""
        buf, at, out = self.tail + text, 0, []
        while True:
            if self.args is None:
                m = _HEAD.search(buf, at)
                if m is None:  # a head may begin in the last characters
                    self.tail = buf[max(at, len(buf) - HEAD_MAX) :]
                    return out
                out.append(("name", m["name"]))
                self.args, at = ArgScan(), m.end() - 1
            piece, at, ended = self.args.piece(buf, at)
            if piece:
                out.append(("args", piece))
            if not ended:
                self.tail = ""
                return out
            self.args = None


def written(text: str) -> list[tuple[str, str]]:
    """The (name, arguments' text as written) of each call CallScan finds in a whole reply: what a stream of it
    sent, to which the whole reply's calls are held."""
    calls: list[tuple[str, str]] = []
    for kind, value in CallScan().feed(text):
        if kind == "name":
            calls.append((value, ""))
        else:
            calls[-1] = (calls[-1][0], calls[-1][1] + value)
    return calls


class ArgScan:
    """Finds where a JSON object ends in text fed in pieces (strings and their escapes skipped, brackets counted):
    the end of the arguments' text, which is sent up to there as it comes."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

    def piece(self, text: str, start: int) -> tuple[str, int, bool]:
        """The arguments' text in text[start:] (up to their closing brace, if there), where it stops, and whether
        the object ended there: the one reading of a piece that both streams of arguments send."""
        end = self.end(text, start)
        stop = len(text) if end < 0 else end
        return text[start:stop], stop, end >= 0

    def end(self, text: str, start: int) -> int:
        """Where the object ends in text[start:] (the index past its closing brace), or -1 if not there yet."""
        # a character escaped by the last piece's backslash
        at = start + 1 if self.escaped and start < len(text) else start
        self.escaped = self.escaped and start == len(text)
        while m := _SIGNIFICANT.search(text, at):
            c, at = m[0], m.end()
            if self.in_string:
                if c == "\\":  # the next character is escaped, maybe in the next piece
                    self.escaped, at = at == len(text), at + 1
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return at
        return -1
