"""The event every scenario sends: a msgspec Struct whose JSON encoding is 128 bytes."""

from __future__ import annotations

import msgspec

__all__ = ["EVENT_SIZE", "Event", "sample_event"]

EVENT_SIZE = 128


class Event(msgspec.Struct):
    """A typical small domain event."""

    id: int
    user: str
    kind: str
    amount: float
    note: str


def sample_event() -> Event:
    """An event whose JSON encoding is exactly :data:`EVENT_SIZE` bytes."""
    event = Event(
        id=1_000_001, user="user-4711", kind="payment", amount=1234.5, note=""
    )
    padding = EVENT_SIZE - len(msgspec.json.encode(event))
    event.note = "x" * padding
    size = len(msgspec.json.encode(event))
    assert size == EVENT_SIZE, f"event encodes to {size} bytes, not {EVENT_SIZE}"
    return event
