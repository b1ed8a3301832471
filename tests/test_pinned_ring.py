"""The pinned-buffer ring of GpuSampler.sample_async (backends/pinned_ring.py), on fake buffers and events: a slot
goes back out only once its reader is gone and the device's writes into it are done, the overlapped engine's
pattern neither waits nor allocates after its first steps, and a failed launch loses no slot."""

from __future__ import annotations

import gc

import pytest

from lserve_lite.backends.pinned_ring import RING_SLOTS, PinnedRing


class FakeEvent:
    """A CUDA event (cupy.cuda.Event's `done` and `synchronize`) that completes when the test says so (or when
    waited for)."""

    def __init__(self, done: bool = False):
        self.done, self.waits = done, 0

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


class Reader:
    """Stands for a DeviceTokens: what holds a slot while it lives."""


def ring() -> tuple[PinnedRing, list[int]]:
    sizes: list[int] = []

    def alloc(n: int) -> list[int]:
        sizes.append(n)
        return [-1] * n

    return PinnedRing(alloc), sizes


def held(r: PinnedRing, size: int, event: FakeEvent) -> tuple[Reader, object]:
    reader, slot = Reader(), r.take(size)
    slot.hold(reader, event)
    return reader, slot


def test_a_live_reader_keeps_its_slot_even_once_written():
    r, _ = ring()
    reader, slot = held(r, 3, FakeEvent(done=True))
    others = [held(r, 3, FakeEvent(done=True)) for _ in range(2 * RING_SLOTS)]  # all held: the ring grows
    assert all(s is not slot for _, s in others) and len(r) == 1 + 2 * RING_SLOTS
    del reader, others
    gc.collect()
    assert r.take(3) is slot  # the oldest free one


def test_a_dropped_reader_whose_write_is_pending_is_not_reused_while_the_ring_has_room():
    r, sizes = ring()
    event = FakeEvent()
    first = held(r, 2, event)[1]  # the reader dropped at once, its write still queued
    gc.collect()
    second = r.take(2)
    assert second is not first and event.waits == 0 and sizes == [2, 2]
    event.done = True
    second.hold(Reader(), FakeEvent())  # its reader gone too, its write pending
    gc.collect()
    assert r.take(2) is first and sizes == [2, 2]


def test_a_full_ring_waits_for_the_oldest_write_of_a_dropped_reader():
    r, sizes = ring()
    events = [FakeEvent() for _ in range(RING_SLOTS)]
    slots = [held(r, 4, e)[1] for e in events]  # every reader dropped, no write done
    gc.collect()
    assert r.take(4) is slots[0] and events[0].waits == 1
    assert [e.waits for e in events[1:]] == [0] * (RING_SLOTS - 1) and len(sizes) == RING_SLOTS


def test_the_overlapped_engine_pattern_never_waits_nor_allocates_after_two_steps():
    """Step N's tokens are held while step N + 1 samples; step N is read (its event done) before step N + 2."""
    r, sizes = ring()
    prev, prev_event, events = None, None, []
    for _ in range(50):
        event = FakeEvent()
        events.append(event)
        tokens, _slot = held(r, 5, event)
        if prev is not None:
            prev_event.done = True  # the host's read of step N (DeviceTokens.tolist)
        prev, prev_event = tokens, event
    assert len(sizes) == 2 and len(r) == 2 and not any(e.waits for e in events)


def test_a_slot_too_small_grows_and_a_large_enough_one_is_preferred():
    r, sizes = ring()
    readers, (small, large) = zip(*(held(r, n, FakeEvent(done=True)) for n in (2, 8)), strict=True)
    del readers
    gc.collect()
    assert r.take(6) is large and sizes == [2, 8]  # the older one, small, would have to grow
    got = r.take(16)  # both free (large taken but never held), neither large enough: one grows
    assert got is small and sizes == [2, 8, 16] and len(r) == 2 and got.size == 16 and len(got.bufs) == 16


def test_a_slot_taken_but_never_held_is_free_again():
    """sample_async's launch raised between take and hold (a bad logits shape): the slot is not lost."""
    r, sizes = ring()
    slot = r.take(3)
    assert r.take(3) is slot and sizes == [3] and len(r) == 1


def test_cupy_events_have_what_the_ring_asks_of_them():
    """The ring reads `done` and calls `synchronize` (CuPy's Event has no `query`); checked on the class, no GPU."""
    cupy = pytest.importorskip("cupy")
    assert hasattr(cupy.cuda.Event, "done") and callable(cupy.cuda.Event.synchronize)
