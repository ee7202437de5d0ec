"""The dead-letter stream: what a dead letter says, listing, re-driving, purging.

Consumers with ``dead_letter=True`` publish a message they give up on to the stream
``DLQ`` (subjects ``dlq.>``), on ``dlq.<stream>.<durable>``, with the original payload
and headers plus ``Natskit-Dlq-*`` headers naming where it came from and why. Re-driving
publishes it again on its original subject, with its original headers and a message id
derived from the dead letter's sequence (so re-driving twice stores it once), and only
after that ack deletes the dead letter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from natskit.streams.api import JetStreamApi
from natskit.streams.consumer import (
    DLQ_HEADERS,
    DLQ_PREFIX,
    DLQ_STREAM,
    H_CONSUMER,
    H_DELIVERIES,
    H_ERROR,
    H_REASON,
    H_SEQUENCE,
    H_STREAM,
    H_SUBJECT,
)
from natskit.streams.publish import MSG_ID, PublishRetry, publisher_for
from natskit.streams.replay import replay
from natskit.streams.specs import PubAck, StoredMessage, StreamSpec

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["DEAD_LETTERS", "DeadLetter", "dead_letters", "purge", "redrive"]

DEAD_LETTERS = StreamSpec(
    name=DLQ_STREAM,
    subjects=(f"{DLQ_PREFIX}.>",),
    retention="limits",
    max_age=14 * 24 * 3600.0,
    duplicate_window=600.0,
)
"""The dead-letter stream created when a consumer dead-letters (unless declared)."""


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A message in the dead-letter stream, with where it came from and why."""

    message: StoredMessage
    stream: str
    consumer: str
    stream_sequence: int
    deliveries: int
    subject: str
    error: str
    reason: str

    @property
    def sequence(self) -> int:
        """The dead letter's own sequence in the dead-letter stream."""
        return self.message.sequence

    @property
    def time(self) -> datetime | None:
        return self.message.time

    @classmethod
    def from_stored(cls, message: StoredMessage) -> DeadLetter:
        h = message.headers
        return cls(
            message=message,
            stream=h.get(H_STREAM, ""),
            consumer=h.get(H_CONSUMER, ""),
            stream_sequence=int(h.get(H_SEQUENCE, "0") or 0),
            deliveries=int(h.get(H_DELIVERIES, "0") or 0),
            subject=h.get(H_SUBJECT, ""),
            error=h.get(H_ERROR, ""),
            reason=h.get(H_REASON, ""),
        )


async def dead_letters(
    nc: Client, *, stream: str = DLQ_STREAM, subject: str | None = None
) -> AsyncIterator[DeadLetter]:
    """Every dead letter, oldest first (``subject`` filters, e.g. ``dlq.ORDERS.>``)."""
    async for message in replay(nc, stream, subject=subject):
        yield DeadLetter.from_stored(message)


async def redrive(
    nc: Client,
    sequence: int,
    *,
    stream: str = DLQ_STREAM,
    retry: PublishRetry | None = None,
) -> PubAck:
    """Publish dead letter ``sequence`` again on its original subject, then delete it."""
    api = JetStreamApi(nc)
    letter = DeadLetter.from_stored(await api.get_message(stream, sequence))
    if not letter.subject:
        raise ValueError(
            f"message {sequence} of stream {stream!r} is not a natskit dead letter"
        )
    headers = {
        name: value
        for name, value in letter.message.headers.items()
        if name not in DLQ_HEADERS and name != MSG_ID
    }
    headers[MSG_ID] = f"redrive.{stream}.{sequence}"
    publisher = await publisher_for(nc)
    ack = await publisher.publish(
        letter.subject, letter.message.data, headers, retry or PublishRetry()
    )
    await api.delete_message(stream, sequence)
    return ack


async def purge(nc: Client, *, stream: str = DLQ_STREAM) -> int:
    """Remove every dead letter; returns how many were removed."""
    return await JetStreamApi(nc).purge_stream(stream)
