"""Idempotent, pipelined JetStream publishing.

Theory of operation
-------------------
One :class:`Publisher` per connection owns one wildcard inbox subscription. Each
publish is sent with a reply subject ``<inbox>.<token>``; the server's acknowledgement
comes back there and resolves the future stored under ``token``. Deadlines go on a heap
that one sweeper task drains, failing the futures whose attempt timed out (an ack that
arrived first has already removed its token, so the sweeper skips it). No task and no
timer handle is created per message, so many publishes can be in flight at once for the
cost of a dict entry and a heap entry.

Every publish carries a ``Nats-Msg-Id`` (given, or a fresh one: a random per-process
prefix and a counter), so resending it after
a timeout, a 503 "no responders" (JetStream not ready, e.g. right after a restart) or a
full reconnect buffer is stored once within the stream's duplicate window; the ack then
says ``duplicate``. Resends are bounded by :class:`PublishRetry` and spaced by its
backoff. An error in the ack itself (wrong stream, message too large...) is not retried.

``publish_many`` keeps at most ``max_in_flight`` publishes unacknowledged: the caller
waits for a slot (backpressure). Every ack is checked; a failure is raised (after all
have settled) or returned in place, never dropped.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from nats.nuid import NUID

from natskit.connection import Backoff
from natskit.errors import ConnectionClosed, PayloadTooLarge, PublishFailed
from natskit.streams.specs import PubAck

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = [
    "MSG_ID",
    "Outgoing",
    "PublishRetry",
    "Publisher",
    "new_msg_id",
    "publisher_for",
]

log = logging.getLogger("natskit.streams")

MSG_ID = "Nats-Msg-Id"
DENIED = "permission denied by the server"
_STATUS = "Status"
_NO_ACK = (
    "no ack within the timeout (the server or the stream leader did not answer; a "
    "replicated stream needs a majority of its replicas up to store)"
)
_IN_PROCESS = "duplicate message id is in process"
_SWEEP_EVERY = 0.05
_ID_PREFIX = NUID().next().decode() + "-"
_id_counter = itertools.count(1)


def new_msg_id() -> str:
    """A fresh message id, unique across processes: a random prefix and a counter."""
    return f"{_ID_PREFIX}{next(_id_counter)}"


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


@dataclass(frozen=True, kw_only=True)
class PublishRetry:
    """How a JetStream publish is retried: ``attempts`` in all, each waiting ``timeout``
    seconds for its ack, spaced by ``backoff``."""

    attempts: int = 8
    timeout: float = 5.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.1, cap=2.0))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"PublishRetry.attempts must be >= 1, got {self.attempts}")
        if self.timeout <= 0:
            raise ValueError(f"PublishRetry.timeout must be > 0, got {self.timeout}")


NO_RETRY = PublishRetry(attempts=1)


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message for :meth:`App.js_publish_many <natskit.App.js_publish_many>`."""

    subject: str
    value: Any
    msg_id: str | None = None
    headers: Mapping[str, str] | None = None
    content_type: str | None = None


class _Retryable(Exception):
    """An attempt failed in a way that a resend with the same id may fix."""


class Publisher:
    """Sends JetStream publishes on one connection and matches their acks."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._nuid = NUID()
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap
        self._sweeper: asyncio.Task[None] | None = None
        self._sub: Any = None
        # Set by the owner of the connection: whether the server refused a publish on a
        # subject (permissions violations arrive apart from the publish, as -ERR).
        self.denied: Callable[[str], bool] | None = None

    async def start(self) -> None:
        self._prefix = f"_INBOX.{self._nuid.next().decode()}."
        self._sub = await self.nc.subscribe(
            self._prefix + "*", cb=self._on_ack, pending_msgs_limit=1 << 20
        )

    def new_id(self) -> str:
        return self._nuid.next().decode()

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)
        # else: the attempt already timed out; a resend is (or was) in flight

    async def _sweep(self) -> None:
        """Fail the attempts whose deadline passed without an ack; ends when no
        deadline is left (the next send starts it again)."""
        loop = asyncio.get_running_loop()
        heap = self._deadlines
        while heap:
            now = loop.time()
            while heap and heap[0][0] <= now:
                _, token = heapq.heappop(heap)
                future = self._waiting.pop(token, None)
                if future is not None and not future.done():
                    future.set_exception(_Retryable(_NO_ACK))
            await asyncio.sleep(_SWEEP_EVERY)

    async def send(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        timeout: float,
    ) -> asyncio.Future[Msg]:
        """Publish once; the future resolves with the server's reply (or fails)."""
        loop = asyncio.get_running_loop()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        heapq.heappush(self._deadlines, (loop.time() + timeout, token))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())
        try:
            await self.nc.publish(
                subject, data, reply=self._prefix + token, headers=headers
            )
        except nats.errors.MaxPayloadError:
            self._forget(token)
            raise PayloadTooLarge(subject, len(data), self.nc.max_payload) from None
        except nats.errors.OutboundBufferLimitError:
            self._forget(token)
            future.set_exception(_Retryable("reconnect buffer full"))
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            self._forget(token)
            raise ConnectionClosed(f"cannot publish on {subject!r}: closed") from None
        return future

    def _forget(self, token: str) -> None:
        self._waiting.pop(token, None)  # its heap entry is skipped when it comes due

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        retry: PublishRetry,
    ) -> PubAck:
        """Publish with retries; ``headers`` must hold the message id."""
        future = await self.send(subject, data, headers, retry.timeout)
        return await self._settle(subject, data, headers, retry, future)

    async def _settle(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        retry: PublishRetry,
        future: asyncio.Future[Msg],
    ) -> PubAck:
        attempt = 1
        while True:
            try:
                return read_ack(subject, headers, await future, attempt)
            except _Retryable as exc:
                if self.denied is not None and self.denied(subject):
                    # The server refused the publish itself: resending cannot help.
                    raise PublishFailed(
                        subject,
                        DENIED,
                        msg_id=headers.get(MSG_ID),
                        attempts=attempt,
                    ) from None
                if attempt >= retry.attempts:
                    raise PublishFailed(
                        subject, str(exc), msg_id=headers.get(MSG_ID), attempts=attempt
                    ) from None
                delay = retry.backoff.delay(attempt - 1)
                log.debug("publish on %s: %s; resending in %.2fs", subject, exc, delay)
                await asyncio.sleep(delay)
                attempt += 1
                future = await self.send(subject, data, headers, retry.timeout)

    async def publish_many(
        self,
        messages: Iterable[tuple[str, bytes, dict[str, str]]],
        *,
        max_in_flight: int,
        retry: PublishRetry,
    ) -> list[PubAck | PublishFailed]:
        """Publish all, at most ``max_in_flight`` unacknowledged; a result per message."""
        batch = _Batch(self, max_in_flight, retry)
        try:
            for subject, data, headers in messages:
                if batch.pending >= max_in_flight:
                    await batch.wait_for_room()
                index = batch.open()
                future = await self.send(subject, data, headers, retry.timeout)
                future.add_done_callback(
                    functools.partial(batch.on_reply, index, subject, data, headers)
                )
        finally:
            batch.close()
        await batch.all_done.wait()
        return [r for r in batch.results if r is not None]


class _Batch:
    """The bookkeeping of one ``publish_many``: slots, results, resends."""

    def __init__(self, publisher: Publisher, max_in_flight: int, retry: PublishRetry):
        self.publisher = publisher
        self.retry = retry
        self.max_in_flight = max_in_flight
        self.room = asyncio.Event()
        self.results: list[PubAck | PublishFailed | None] = []
        self.resends: set[asyncio.Task[None]] = set()
        self.pending = 0
        self.sending = True
        self.all_done = asyncio.Event()

    def open(self) -> int:
        self.results.append(None)
        self.pending += 1
        return len(self.results) - 1

    def close(self) -> None:
        self.sending = False
        if self.pending == 0:
            self.all_done.set()

    async def wait_for_room(self) -> None:
        """Backpressure: wait until fewer than ``max_in_flight`` are unacknowledged."""
        while self.pending >= self.max_in_flight:
            self.room.clear()
            await self.room.wait()

    def finish(self, index: int, outcome: PubAck | PublishFailed) -> None:
        self.results[index] = outcome
        self.pending -= 1
        self.room.set()
        if self.pending == 0 and not self.sending:
            self.all_done.set()

    def on_reply(
        self,
        index: int,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        future: asyncio.Future[Msg],
    ) -> None:
        outcome: PubAck | PublishFailed
        try:
            outcome = read_ack(subject, headers, future.result(), 1)
        except _Retryable as exc:
            # Rare: hand the message to a task that resends it with backoff.
            task = asyncio.create_task(
                self.resend(index, subject, data, headers, _failed_future(exc))
            )
            self.resends.add(task)
            task.add_done_callback(self.resends.discard)
            return
        except PublishFailed as exc:
            outcome = exc
        except Exception as exc:  # never leave a slot or the caller hanging
            outcome = PublishFailed(
                subject, f"{type(exc).__name__}: {exc}", msg_id=headers.get(MSG_ID)
            )
        self.finish(index, outcome)

    async def resend(
        self,
        index: int,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        future: asyncio.Future[Msg],
    ) -> None:
        outcome: PubAck | PublishFailed
        try:
            outcome = await self.publisher._settle(
                subject, data, headers, self.retry, future
            )
        except PublishFailed as exc:
            outcome = exc
        except Exception as exc:  # never leave a slot or the caller hanging
            outcome = PublishFailed(subject, str(exc), msg_id=headers.get(MSG_ID))
        self.finish(index, outcome)


def _failed_future(exc: Exception) -> asyncio.Future[Msg]:
    """A future failed with ``exc``, for the resend loop to start from."""
    again: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    again.set_exception(exc)
    return again


def read_ack(
    subject: str, headers: Mapping[str, str], reply: Msg, attempt: int
) -> PubAck:
    """The PubAck in ``reply``; ``_Retryable`` or :class:`PublishFailed` otherwise."""
    status = reply.headers.get(_STATUS) if reply.headers else None
    if status == "503":
        raise _Retryable(
            "no responders: no stream for this subject, or JetStream not ready"
        )
    if status:
        raise _Retryable(f"server status {status}")
    try:
        answer = _decode_ack(reply.data)
    except msgspec.DecodeError:
        raise PublishFailed(
            subject, "unreadable ack", msg_id=headers.get(MSG_ID), attempts=attempt
        ) from None
    error = answer.error
    if error:
        description = str(error.get("description", error))
        if int(error.get("code", 0)) == 503:
            raise _Retryable(description)
        if _IN_PROCESS in description:
            # A resend reached a leader that has the first attempt in its log but not
            # yet stored (no quorum yet): the same id may still be stored, so resend.
            raise _Retryable(
                "the stream leader holds this message id but has not stored it yet; "
                "a replicated stream stores only with a majority of its replicas up"
            )
        raise PublishFailed(
            subject, description, msg_id=headers.get(MSG_ID), attempts=attempt
        )
    if not answer.stream:
        raise PublishFailed(
            subject,
            "ack without a stream",
            msg_id=headers.get(MSG_ID),
            attempts=attempt,
        )
    return PubAck(stream=answer.stream, seq=answer.seq, duplicate=answer.duplicate)


_publishers: weakref.WeakKeyDictionary[Client, Publisher] = weakref.WeakKeyDictionary()
_starting: weakref.WeakKeyDictionary[Client, asyncio.Lock] = weakref.WeakKeyDictionary()


async def publisher_for(nc: Client) -> Publisher:
    """The (started) publisher of connection ``nc``, shared by everything using it."""
    publisher = _publishers.get(nc)
    if publisher is not None:
        return publisher
    lock = _starting.setdefault(nc, asyncio.Lock())
    async with lock:
        publisher = _publishers.get(nc)
        if publisher is None:
            publisher = Publisher(nc)
            await publisher.start()
            _publishers[nc] = publisher
    return publisher
