"""A few pinned host buffers reused step after step (cuda_sampling.GpuSampler's ids and flags), so that a step
allocates none; pure bookkeeping: the buffers and the events that guard them come from the caller.

A slot is handed out again only when nothing can still read or write it: its reader (the object that took it)
is gone, and the event recorded after the device's last write into it has completed. The overlapped engine holds
step N's reader while step N + 1 takes a slot, and has read step N - 1 by then: two slots in use, no wait.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

B = TypeVar("B")
RING_SLOTS = 4  # slots kept before a take waits for one (the overlapped engine uses two)


class Event(Protocol):
    """What a slot needs of a CUDA event (cupy.cuda.Event): whether it completed, and a wait for it."""

    @property
    def done(self) -> bool: ...

    def synchronize(self) -> None: ...


class Slot(Generic[B]):
    """Buffers of `size` elements, their reader (weakly referenced: the slot is its while it lives) and the event
    recorded after the device's writes into them (None: none queued)."""

    __slots__ = ("bufs", "size", "reader", "written")

    def __init__(self, bufs: B, size: int):
        self.bufs, self.size = bufs, size
        self.reader: weakref.ref | None = None
        self.written: Event | None = None

    def hold(self, reader: object, written: Event) -> None:
        """The slot is `reader`'s until it is gone and `written` has completed."""
        self.reader, self.written = weakref.ref(reader), written

    def unread(self) -> bool:
        return self.reader is None or self.reader() is None

    def settled(self) -> bool:
        return self.written is None or self.written.done


class PinnedRing(Generic[B]):
    """Buffers from `alloc(size)` in slots, at most `slots` of them kept unless more readers each hold one."""

    def __init__(self, alloc: Callable[[int], B], slots: int = RING_SLOTS):
        self._alloc, self._slots = alloc, slots
        self._ring: list[Slot[B]] = []  # in the order they were taken, the oldest first

    def take(self, size: int) -> Slot[B]:
        """A slot of at least `size` elements, free until its `hold` (before the next take); a caller that fails
        before it leaves it free."""
        unread = [s for s in self._ring if s.unread()]
        free = [s for s in unread if s.settled()]
        if free:  # a large enough one if any: no allocation
            slot = next((s for s in free if s.size >= size), free[0])
        elif unread and len(self._ring) >= self._slots:  # the oldest write is due first
            slot = unread[0]
            slot.written.synchronize()
        else:
            slot = Slot(self._alloc(size), size)
            self._ring.append(slot)
        if slot.size < size:
            slot.bufs, slot.size = self._alloc(size), size
        self._ring.remove(slot)
        self._ring.append(slot)
        slot.reader = slot.written = None
        return slot

    def __len__(self) -> int:
        return len(self._ring)
