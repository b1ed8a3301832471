"""Responses kept for GET /v1/responses/{id} and `previous_response_id`: in memory, bounded by a count and a byte
budget (their JSON size), the oldest evicted first. Used from the server's event loop alone, so it needs no lock."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# kept by default at most (the server's --responses-store, --responses-store-mib): responses, MiB of their JSON
DEFAULT_COUNT, DEFAULT_MIB = 1024, 64


@dataclass
class Stored:
    """A response, the input items that made it, and the conversation before them (its previous responses')."""

    response: dict
    items: list[dict]
    earlier: list[dict]
    size: int  # the bytes it is counted for: the JSON of its request, earlier items and output

    def conversation(self) -> list[dict]:
        """The items a response chained to this one continues: the earlier ones, this input, this output."""
        return self.earlier + self.items + self.response["output"]


class ResponseStore:
    """At most `max_count` responses of `max_bytes` in all (0: none kept); a new one evicts the oldest."""

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def put(self, entry: Stored) -> bool:
        """Keeps `entry`, evicting the oldest as needed; one larger than the whole budget is not kept, and evicts
        nothing."""
        if not self.enabled or entry.size > self.max_bytes:
            return False
        while self.entries and (
            len(self.entries) >= self.max_count or self.bytes + entry.size > self.max_bytes
        ):
            self.pop(next(iter(self.entries)))
        self.entries[entry.response["id"]] = entry
        self.bytes += entry.size
        return True

    def get(self, rid: str) -> Stored | None:
        return self.entries.get(rid)

    def pop(self, rid: str) -> Stored | None:
        entry = self.entries.pop(rid, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry
