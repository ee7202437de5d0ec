"""In-order replay of a stream through an ordered (ephemeral) consumer.

Theory of operation
-------------------
:func:`replay` creates an ephemeral consumer (no acks, one delivery, in memory, deleted
by the server when idle) starting where the caller asked: the first message, a stream
sequence or a time, optionally filtered by subject. It pulls batches into a private
inbox and yields each message as a :class:`~natskit.streams.StoredMessage`.

Order is checked, not assumed: each message must carry the consumer sequence after the
previous one. On a gap (a message lost between server and client), or when a pull
brings nothing while the server said more were pending, the consumer is replaced by one
starting right after the last stream sequence yielded, so the caller sees every message
once, in stream order. Without ``follow`` the replay ends when the consumer reports no
more pending messages; with it, it waits for new ones until the caller stops iterating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from natskit.errors import StreamError
from natskit.streams.api import JetStreamApi
from natskit.streams.consumer import parse_delivery
from natskit.streams.specs import (
    ByStartSequence,
    ByStartTime,
    StoredMessage,
    deliver_config,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["replay"]

_STATUS = "Status"


async def replay(
    nc: Client,
    stream: str,
    *,
    from_seq: int | None = None,
    since: datetime | None = None,
    subject: str | None = None,
    batch: int = 256,
    follow: bool = False,
    idle_timeout: float = 5.0,
) -> AsyncIterator[StoredMessage]:
    """Yield the messages of ``stream`` in order, from ``from_seq`` or ``since``.

    With neither, from the first message. Ends at the last message unless ``follow``.
    """
    if from_seq is not None and since is not None:
        raise ValueError("replay: give from_seq or since, not both")
    start: Any = "all"
    if from_seq is not None:
        start = ByStartSequence(from_seq)
    elif since is not None:
        start = ByStartTime(since)
    reader = _OrderedReader(nc, stream, subject, batch, idle_timeout)
    await reader.open(start)
    try:
        while reader.pending or follow:
            async with contextlib.aclosing(reader.pull()) as messages:
                async for message in messages:
                    yield message
                    if not reader.pending and not follow:
                        return
    finally:
        await reader.close()


class _OrderedReader:
    """One ephemeral consumer at a time, replaced on a gap; see the module doc."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        subject: str | None,
        batch: int,
        idle_timeout: float,
    ) -> None:
        self.nc = nc
        self.api = JetStreamApi(nc)
        self.stream = stream
        self.subject = subject
        self.batch = batch
        self.idle_timeout = idle_timeout
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.inbox = nc.new_inbox()
        self.sub: Any = None
        self.name: str | None = None
        self.pending = 0
        self.last_cseq = 0
        self.next_start: Any = "all"

    async def _on_message(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    async def open(self, start: Any) -> None:
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_message)
        await self._create(start)

    async def _create(self, start: Any) -> None:
        config: dict[str, Any] = {
            **deliver_config(start),
            "ack_policy": "none",
            "max_deliver": 1,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(30e9),
            "replay_policy": "instant",
        }
        if self.subject:
            config["filter_subject"] = self.subject
        info = await self.api.create_consumer(self.stream, config)
        self.name = str(info["name"])
        self.pending = int(info.get("num_pending", 0))
        self.next_start = start
        self.last_cseq = 0

    async def pull(self) -> AsyncGenerator[StoredMessage, None]:
        """One pull request's messages, in order; replaces the consumer on a gap."""
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.name}",
            json.dumps(
                {"batch": self.batch, "expires": int(self.idle_timeout * 1e9)}
            ).encode(),
            reply=self.inbox,
        )
        received, gap = 0, False
        while received < self.batch:
            try:
                msg = await asyncio.wait_for(self.queue.get(), self.idle_timeout + 2.0)
            except TimeoutError:
                gap = True  # the request was lost: start over where we are
                break
            if not msg.reply:
                if (msg.headers or {}).get(_STATUS) == "100":
                    continue
                break  # 404/408/409: this request is over
            delivery = parse_delivery(msg.reply)
            if delivery.consumer_sequence != self.last_cseq + 1:
                gap = True
                break
            self.last_cseq = delivery.consumer_sequence
            self.next_start = ByStartSequence(delivery.stream_sequence + 1)
            self.pending = delivery.num_pending
            received += 1
            yield StoredMessage(
                stream=self.stream,
                sequence=delivery.stream_sequence,
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
                time=datetime.fromtimestamp(delivery.timestamp_ns / 1e9, UTC),
            )
        if gap or (received == 0 and self.pending):
            await self._replace()

    async def _replace(self) -> None:
        await self._delete()
        while not self.queue.empty():
            self.queue.get_nowait()
        await self._create(self.next_start)

    async def _delete(self) -> None:
        name, self.name = self.name, None
        if name is not None:
            with contextlib.suppress(StreamError):
                # The server removes idle ephemeral consumers on its own too.
                await self.api.delete_consumer(self.stream, name)

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        await self._delete()
