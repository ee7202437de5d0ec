"""Streaming pipelines and durable work queues on JetStream.

Declared on an :class:`~natskit.App`: ``app.stream(StreamSpec(...))`` for streams,
``@app.consume(stream=..., durable=...)`` for durable pull consumers, ``app.js_publish``
and ``app.js_publish_many`` for idempotent, pipelined publishing, ``app.replay`` for
reading a stream in order. The parts:

- :mod:`~natskit.streams.specs`: the value objects and their JetStream configurations;
- :mod:`~natskit.streams.api`: the JetStream API seam and reconciling;
- :mod:`~natskit.streams.publish`: publishing with message ids, retries, backpressure;
- :mod:`~natskit.streams.consumer`: the pull consumer and its settlement;
- :mod:`~natskit.streams.replay`: ordered replay;
- :mod:`~natskit.streams.dlq`: the dead-letter stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from natskit.streams.api import JetStreamApi, ensure_consumer, ensure_stream
from natskit.streams.consumer import DLQ_STREAM, Consumer, PullConsumer
from natskit.streams.dlq import DEAD_LETTERS, DeadLetter, dead_letters, purge, redrive
from natskit.streams.publish import Outgoing, Publisher, PublishRetry, publisher_for
from natskit.streams.replay import replay
from natskit.streams.specs import (
    ByStartSequence,
    ByStartTime,
    ConsumerSpec,
    DeliverFrom,
    PubAck,
    Redelivery,
    StoredMessage,
    StreamSpec,
    patterns_overlap,
)

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "DEAD_LETTERS",
    "ByStartSequence",
    "ByStartTime",
    "Consumer",
    "ConsumerSpec",
    "DeadLetter",
    "DeliverFrom",
    "JetStreamApi",
    "JetStreamPlan",
    "Outgoing",
    "PubAck",
    "PublishRetry",
    "Publisher",
    "PullConsumer",
    "Redelivery",
    "StoredMessage",
    "StreamSpec",
    "dead_letters",
    "publisher_for",
    "purge",
    "redrive",
    "replay",
]


class JetStreamPlan:
    """The streams and consumers one App declares; reconciled with the server on start."""

    def __init__(self) -> None:
        self.streams: dict[str, StreamSpec] = {}
        self.consumers: list[Consumer] = []

    def add_stream(self, spec: StreamSpec) -> None:
        known = self.streams.get(spec.name)
        if known is not None:
            if known != spec:
                raise ValueError(f"stream {spec.name} is declared twice, differently")
            return
        for other in self.streams.values():
            for ours in spec.subjects:
                for theirs in other.subjects:
                    if patterns_overlap(ours, theirs):
                        raise ValueError(
                            f"stream {spec.name}: subject {ours!r} overlaps {theirs!r} "
                            f"of stream {other.name}"
                        )
        self.streams[spec.name] = spec

    def add_consumer(self, consumer: Consumer) -> None:
        spec = consumer.spec
        for other in self.consumers:
            if (other.spec.stream, other.spec.durable) == (spec.stream, spec.durable):
                raise ValueError(
                    f"consumer {spec.durable} on stream {spec.stream} is declared twice"
                )
        self.consumers.append(consumer)

    async def reconcile(self, nc: Client) -> None:
        """Create or update every declared stream, the dead-letter stream, consumers."""
        api = JetStreamApi(nc)
        for spec in self.streams.values():
            await ensure_stream(api, spec)
        wants_dlq = any(c.dead_letter for c in self.consumers)
        if wants_dlq and DLQ_STREAM not in self.streams:
            await ensure_stream(api, DEAD_LETTERS, update=False)
        for consumer in self.consumers:
            await ensure_consumer(api, consumer.spec)
        await publisher_for(nc)
