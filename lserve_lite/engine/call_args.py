"""A call's arguments streamed as the model writes them (ToolStream, for calls a grammar holds): where a call's
JSON names its tool and its arguments' object begins (`head`), and where that object ends (`ArgScan`)."""

from __future__ import annotations

import re

# a call's JSON up to its arguments' opening brace: name first, as the grammar writes it (`_call_schema`)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>[A-Za-z0-9_-]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')  # fmt: skip
# how far a call's text is read for its head: past it the call is read whole (at most 64 name characters)
HEAD_MAX = 160
_SIGNIFICANT = re.compile(r'["\\{}\[\]]')


def head(text: str) -> tuple[str, int] | None:
    """(tool name, where its arguments' object starts) of a call's text opening with its head within HEAD_MAX
    characters; None if it does not (yet): read on a bounded prefix, the answer is the same however it was split."""
    m = _HEAD.match(text[:HEAD_MAX])
    return (m["name"], m.end() - 1) if m else None


class ArgScan:
    """Finds where a JSON object ends in text fed in pieces (strings and their escapes skipped, brackets counted):
    the end of the arguments' text, which is sent up to there as it comes."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

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
