"""The durable pull consumer: fetch, process with bounded concurrency, settle.

Theory of operation
-------------------
A :class:`PullConsumer` owns one inbox subscription. The *puller* task asks the server
for messages by publishing pull requests (``$JS.API.CONSUMER.MSG.NEXT``, batch ``n``,
an expiry and an idle heartbeat) with that inbox as reply subject; it keeps the credit
(messages asked for and not yet received) plus the messages held locally below
``max_concurrency + batch``. Messages arrive on the inbox; the subscription callback
puts them on a local queue and notes them as *held*. Status messages adjust the credit:
``408``/``409`` give back what a request did not deliver, ``100`` is a heartbeat. A
reconnect or a silence longer than three heartbeats resets the credit, since the
server may have forgotten the requests. Nothing here waits on nats-py's ``fetch()``.

``max_concurrency`` worker tasks take messages from the queue and run them through the
shared :class:`~natskit.pipeline.Pipeline`, whose outcome is settled by
:class:`_Settlement`:

* success: ack (with ``exactly_once``, an ack the server confirms); with ``publish_to``
  the handler's value is first published there with a message id derived from the
  stream sequence, so a redelivery publishes it once;
* retryable failure: nak with a delay from the :class:`~natskit.streams.Redelivery`
  schedule by delivery count (a handler's ``Retry(delay=...)`` wins);
* permanent failure, or a failure of delivery ``max_deliver``: the original payload and
  headers are published to the dead-letter stream (``dlq.<stream>.<durable>``, with a
  message id, awaiting the ack), and only then is the original terminated. A crash in
  between leaves the message to be redelivered, and the dead letter's id keeps it
  stored once.

The server is configured with one delivery more than ``max_deliver``: a message whose
last delivery was never settled (its worker died) comes back once more, and is
dead-lettered without running the handler again.

Invariants: every held message is settled exactly once by this process (ack, nak or
term), or left to the server's ack-wait timer only if the process dies. While held,
a message gets an in-progress ack every ``ack_wait / 3``, so neither a long handler nor
a wait in the local queue lets its ack wait expire.

Drain: stop the puller; drain the inbox subscription (messages still arriving are
nakked at once); nak the queued messages nobody started, without delay, so another
worker takes them at once; let running handlers finish until the deadline; cancel and
nak the rest; stop the in-progress keeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from natskit.codec import encode
from natskit.errors import (
    CodecError,
    ConnectionClosed,
    DecodeError,
    PublishFailed,
    Reject,
    Retry,
)
from natskit.message import Delivery, Message
from natskit.pipeline import Handler, Middleware, Pipeline
from natskit.streams.publish import MSG_ID, PublishRetry, publisher_for
from natskit.streams.specs import ConsumerSpec, Redelivery, check_subject

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from natskit.observability.tracing import Tracing

__all__ = ["Consumer", "PullConsumer", "dead_letter_subject", "parse_delivery"]

log = logging.getLogger("natskit.streams")

DLQ_STREAM = "DLQ"
DLQ_PREFIX = "dlq"
H_STREAM = "Natskit-Dlq-Stream"
H_CONSUMER = "Natskit-Dlq-Consumer"
H_SEQUENCE = "Natskit-Dlq-Sequence"
H_DELIVERIES = "Natskit-Dlq-Deliveries"
H_SUBJECT = "Natskit-Dlq-Subject"
H_ERROR = "Natskit-Dlq-Error"
H_REASON = "Natskit-Dlq-Reason"
H_TIME = "Natskit-Dlq-Time"
H_MSG_ID = "Natskit-Dlq-Msg-Id"
DLQ_HEADERS = (
    H_STREAM,
    H_CONSUMER,
    H_SEQUENCE,
    H_DELIVERIES,
    H_SUBJECT,
    H_ERROR,
    H_REASON,
    H_TIME,
    H_MSG_ID,
)

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"
_EXPIRES = 30.0
_HEARTBEAT = 5.0
_TICK = 0.5
_SETTLE_TIMEOUT = 5.0


def dead_letter_subject(stream: str, durable: str) -> str:
    return f"{DLQ_PREFIX}.{stream}.{durable}"


def parse_delivery(reply: str) -> Delivery:
    """Delivery metadata from a JetStream ack subject (v1 and v2 token layouts)."""
    tokens = reply.split(".")
    offset = 2 if len(tokens) == 9 else 4
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    return Delivery(
        stream=tokens[offset],
        consumer=tokens[offset + 1],
        num_delivered=int(tokens[offset + 2]),
        stream_sequence=int(tokens[offset + 3]),
        consumer_sequence=int(tokens[offset + 4]),
        timestamp_ns=int(tokens[offset + 5]),
        num_pending=int(tokens[offset + 6]),
    )


@dataclass(frozen=True, kw_only=True)
class Consumer:
    """The declaration ``@app.consume`` records: a consumer spec and how to run it."""

    spec: ConsumerSpec
    handler: Handler
    batch: int = 100
    max_concurrency: int = 16
    retry: Redelivery = field(default_factory=Redelivery)
    dead_letter: bool = True
    exactly_once: bool = False
    publish_to: str | None = None
    max_rate: float | None = None
    publish_retry: PublishRetry = field(default_factory=PublishRetry)

    def __post_init__(self) -> None:
        where = f"consume({self.spec.stream}/{self.spec.durable})"
        if not 1 <= self.batch <= 10_000:
            raise ValueError(f"{where}: batch must be in 1..10000, got {self.batch}")
        if self.max_concurrency < 1:
            raise ValueError(f"{where}: max_concurrency must be >= 1")
        if self.max_rate is not None and self.max_rate <= 0:
            raise ValueError(f"{where}: max_rate must be > 0 messages/s or None")
        if self.publish_to is not None:
            check_subject(self.publish_to)

    @property
    def label(self) -> str:
        spec = self.spec
        to = f" -> {self.publish_to}" if self.publish_to else ""
        return f"consume {spec.stream}/{spec.durable} -> {self.handler.name}{to}"

    def build(self, middleware: tuple[Middleware, ...]) -> PullConsumer:
        return PullConsumer(self, middleware=middleware)


class _Settlement:
    """ack / nak with delay / dead-letter then term, for one consumer."""

    settles_every_success = True

    def __init__(self, source: PullConsumer, nc: Client) -> None:
        self.source = source
        self.decl = source.decl
        self.nc = nc

    async def succeeded(self, msg: Message[Any], result: Any) -> None:
        decl = self.decl
        if decl.publish_to is not None and result is not None:
            try:
                await self._forward(msg, result)
            except (PublishFailed, CodecError, ConnectionClosed) as exc:
                log.warning(
                    "%s: forwarding to %s failed (%s); will redeliver",
                    decl.label,
                    decl.publish_to,
                    exc,
                )
                await self.failed(msg, exc, permanent=isinstance(exc, CodecError))
                return
        reply = msg.raw.reply
        if decl.exactly_once:
            await self.nc.request(reply, _ACK, timeout=_SETTLE_TIMEOUT)
        else:
            await self.nc.publish(reply, _ACK)
        self.source.settled += 1
        self.source.counts["ack"] += 1

    async def _forward(self, msg: Message[Any], result: Any) -> None:
        assert self.decl.publish_to is not None and msg.delivery is not None
        data, content_type = encode(result)
        headers = {MSG_ID: f"{msg.delivery.stream}.{msg.delivery.stream_sequence}.out"}
        if content_type:
            headers["Content-Type"] = content_type
        publisher = await publisher_for(self.nc)
        await publisher.publish(
            self.decl.publish_to, data, headers, self.decl.publish_retry
        )

    async def failed(
        self, msg: Message[Any], exc: Exception, *, permanent: bool
    ) -> None:
        delivery = msg.delivery
        assert delivery is not None
        if permanent or delivery.num_delivered >= self.decl.spec.max_deliver:
            await self.dead_letter(msg.raw, delivery, exc)
            return
        delay = self.decl.retry.delay(delivery.num_delivered)
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = max(0.0, exc.delay)
        await self.nak(msg.raw, delay)

    async def nak(self, raw: Msg, delay: float = 0.0) -> None:
        payload = _NAK
        if delay > 0:
            payload += b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self.nc.publish(raw.reply, payload)
        self.source.settled += 1
        self.source.counts["nak"] += 1

    async def dead_letter(self, raw: Msg, delivery: Delivery, exc: Exception) -> None:
        decl = self.decl
        error, reason = type(exc).__name__, _reason(exc)
        if not decl.dead_letter:
            log.warning(
                "%s: terminating stream sequence %d after %d deliveries (%s: %s); "
                "no dead-letter stream",
                decl.label,
                delivery.stream_sequence,
                delivery.num_delivered,
                error,
                reason,
            )
            await self.nc.publish(raw.reply, b"+TERM " + reason.encode())
            self.source.settled += 1
            self.source.counts["term"] += 1
            return
        headers = dict(raw.headers or {})
        original_id = headers.pop(MSG_ID, None)
        headers.update(
            {
                H_STREAM: delivery.stream,
                H_CONSUMER: delivery.consumer,
                H_SEQUENCE: str(delivery.stream_sequence),
                H_DELIVERIES: str(delivery.num_delivered),
                H_SUBJECT: raw.subject,
                H_ERROR: error,
                H_REASON: reason,
                H_TIME: datetime.now(UTC).isoformat(),
                MSG_ID: f"dlq.{delivery.stream}.{delivery.consumer}."
                f"{delivery.stream_sequence}",
            }
        )
        if original_id is not None:
            headers[H_MSG_ID] = original_id
        subject = dead_letter_subject(delivery.stream, delivery.consumer)
        try:
            publisher = await publisher_for(self.nc)
            tracing = self.source.tracing
            if tracing is None:
                await publisher.publish(subject, raw.data, headers, decl.publish_retry)
            else:
                with tracing.producer(
                    "dead-letter", subject, headers, parent=raw.headers
                ):
                    await publisher.publish(
                        subject, raw.data, headers, decl.publish_retry
                    )
        except (PublishFailed, ConnectionClosed) as failure:
            # Keep the message: it comes back (at worst as the spare delivery) and is
            # dead-lettered then.
            log.error(
                "%s: could not dead-letter stream sequence %d (%s); will redeliver",
                decl.label,
                delivery.stream_sequence,
                failure,
            )
            await self.nak(raw, decl.retry.delay(delivery.num_delivered))
            return
        log.warning(
            "%s: stream sequence %d dead-lettered to %s after %d deliveries (%s: %s)",
            decl.label,
            delivery.stream_sequence,
            subject,
            delivery.num_delivered,
            error,
            reason,
        )
        await self.nc.publish(raw.reply, b"+TERM " + reason.encode())
        self.source.settled += 1
        self.source.counts["dead_letter"] += 1


def _reason(exc: Exception) -> str:
    if isinstance(exc, DecodeError):
        text = str(exc)
    elif isinstance(exc, Reject | Retry):
        text = exc.reason
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:512]


class _Unsettled(Exception):
    """The last delivery of a message was never settled (its worker died)."""


class PullConsumer:
    """A running durable pull consumer (a :class:`~natskit.pipeline.Source`)."""

    def __init__(
        self, decl: Consumer, *, middleware: tuple[Middleware, ...] = ()
    ) -> None:
        self.decl = decl
        self.label = decl.label
        self.pattern = f"{decl.spec.stream}/{decl.spec.durable}"
        self.pipeline = Pipeline(
            decl.handler,
            label=decl.label,
            middleware=middleware,
            source="jetstream",
            pattern=self.pattern,
        )
        self.settled = 0
        # Settlements by kind, and the server's view of the consumer (refreshed while
        # metrics are served), read by natskit.observability.metrics.
        self.counts: dict[str, int] = {"ack": 0, "nak": 0, "dead_letter": 0, "term": 0}
        self.lag: dict[str, int] = {}
        self.tracing: Tracing | None = None  # set by the App when tracing is on
        self._nc: Client | None = None
        self._settle: _Settlement | None = None
        self._sub: Any = None
        self._inbox = ""
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._held: dict[str, float] = {}
        self._running = 0
        self._credit = 0
        self._last_heard = 0.0
        self._reconnects = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._puller: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._next_start = 0.0

    # -- starting -----------------------------------------------------------------------

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self._settle = _Settlement(self, nc)
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=1 << 20
        )
        self._reconnects = nc.stats.get("reconnects", 0)
        self._last_heard = time.monotonic()
        for _ in range(self.decl.max_concurrency):
            self._workers.append(asyncio.create_task(self._work()))
        self._puller = asyncio.create_task(self._pull())
        self._keeper = asyncio.create_task(self._keep_in_progress())

    @property
    def held(self) -> int:
        """Messages received and not yet settled (queued or running)."""
        return len(self._held)

    # -- receiving ----------------------------------------------------------------------

    async def _on_message(self, raw: Msg) -> None:
        self._last_heard = time.monotonic()
        if not raw.reply:
            self._on_status(raw)
            return
        if self._stopping:
            await self._nc_publish(raw.reply, _NAK)
            return
        self._credit = max(0, self._credit - 1)
        self._held[raw.reply] = self._last_heard
        self._queue.put_nowait(raw)

    def _on_status(self, raw: Msg) -> None:
        headers = raw.headers or {}
        status = headers.get(_STATUS)
        if status == "100":
            return
        if status in ("408", "409") and _PENDING in headers:
            self._credit = max(0, self._credit - int(headers[_PENDING]))
        elif status in ("404", "408", "409"):
            if status == "409":
                log.warning(
                    "%s: pull request ended: %s",
                    self.label,
                    headers.get("Description", status),
                )
            self._credit = 0
        self._wake.set()

    async def _pull(self) -> None:
        nc = self._nc
        assert nc is not None
        decl = self.decl
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{decl.spec.stream}.{decl.spec.durable}"
        capacity = decl.max_concurrency + decl.batch
        threshold = max(1, min(decl.batch, capacity) // 2)
        try:
            while not self._stopping:
                self._check_liveness(nc)
                free = capacity - self._credit - len(self._held)
                if free >= threshold:
                    count = min(decl.batch, free)
                    request = {
                        "batch": count,
                        "expires": int(_EXPIRES * 1e9),
                        "idle_heartbeat": int(_HEARTBEAT * 1e9),
                    }
                    self._credit += count
                    await nc.publish(
                        subject, json.dumps(request).encode(), reply=self._inbox
                    )
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _TICK)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the puller stopped", self.label)

    def _check_liveness(self, nc: Client) -> None:
        reconnects = nc.stats.get("reconnects", 0)
        silent = time.monotonic() - self._last_heard > 3 * _HEARTBEAT
        if reconnects != self._reconnects or (self._credit and silent):
            if reconnects != self._reconnects:
                log.info("%s: reconnected; asking for messages again", self.label)
            self._reconnects = reconnects
            self._credit = 0
            self._last_heard = time.monotonic()

    # -- processing ---------------------------------------------------------------------

    async def _work(self) -> None:
        queue = self._queue
        while True:
            raw = await queue.get()
            if raw is None:
                return
            await self._process(raw)

    async def _process(self, raw: Msg) -> None:
        settle = self._settle
        assert settle is not None
        self._running += 1
        try:
            if self.decl.max_rate is not None:
                await self._pace(self.decl.max_rate)
            delivery = parse_delivery(raw.reply)
            if delivery.num_delivered > self.decl.spec.max_deliver:
                await settle.dead_letter(
                    raw,
                    delivery,
                    _Unsettled(
                        f"delivery {delivery.num_delivered - 1} was never settled"
                    ),
                )
            else:
                msg: Message[Any] = Message(raw, "jetstream", delivery, self.pattern)
                await self.pipeline.process(msg, settle)
        except asyncio.CancelledError:
            # Not finished within the drain bound: give it back at once.
            with contextlib.suppress(Exception):
                await self._nc_publish(raw.reply, _NAK)
            raise
        except Exception:
            log.exception("%s: settling a message failed", self.label)
        finally:
            self._running -= 1
            self._held.pop(raw.reply, None)
            self._wake.set()

    async def _pace(self, rate: float) -> None:
        # Spaces handler starts 1/rate apart: a rate limit, not synchronisation.
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _keep_in_progress(self) -> None:
        period = self.decl.spec.ack_wait / 3
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            try:
                for reply, touched in list(self._held.items()):
                    if now - touched >= period / 2 and reply in self._held:
                        self._held[reply] = now
                        await self._nc_publish(reply, _WPI)
            except Exception as exc:  # a broken connection: try again next period
                log.debug("%s: in-progress acks failed: %s", self.label, exc)

    async def _nc_publish(self, subject: str, data: bytes) -> None:
        assert self._nc is not None
        await self._nc.publish(subject, data)

    # -- draining -----------------------------------------------------------------------

    async def drain(self, deadline: float) -> int:
        """Stop pulling, nak what was not started, finish the rest before ``deadline``."""
        if self._stopping:
            return 0
        self._stopping = True
        if self._puller is not None:
            self._puller.cancel()
            await asyncio.gather(self._puller, return_exceptions=True)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await asyncio.wait_for(
                    sub.drain(), timeout=max(0.1, deadline - time.monotonic())
                )
            except Exception as exc:
                log.warning("%s: drain of the inbox interrupted: %s", self.label, exc)
        returned = 0
        while not self._queue.empty():
            raw = self._queue.get_nowait()
            if raw is not None:
                self._held.pop(raw.reply, None)
                with contextlib.suppress(Exception):
                    await self._nc_publish(raw.reply, _NAK)
                returned += 1
        if returned:
            log.info("%s: returned %d unstarted message(s)", self.label, returned)
        for _ in self._workers:
            self._queue.put_nowait(None)
        left = 0
        if self._workers:
            timeout = max(0.0, deadline - time.monotonic())
            _, not_done = await asyncio.wait(set(self._workers), timeout=timeout)
            for task in not_done:
                task.cancel()
            await asyncio.gather(*not_done, return_exceptions=True)
            left = len(not_done)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        self._workers.clear()
        return left
