"""Publish-subscribe and queue groups on core NATS: the core subscription source.

Theory of operation
-------------------
Each ``@app.subscribe`` declaration becomes one server subscription (so several handlers
on one subject each get every message: fan-out), or one member of a queue group (so the
server gives each message to one member: load sharing, at most once).

nats-py delivers a subscription's messages to one reader task in order. With
``max_concurrency=1`` (the default) the handler runs inside that task, which keeps
per-subject order and costs nothing extra. With ``max_concurrency=N`` each message runs
in its own task, at most N at a time; the reader waits for a free slot, so messages
queue in the client's pending buffer rather than piling up as tasks.

Settlement: a reply is sent when the message asked for one (so ``natskit req`` works
against a subscriber); failures are logged and counted by the pipeline, and answered
with services-protocol error headers when a reply was asked for.

Stop: :meth:`CoreSource.drain` unsubscribes, lets the messages already received run to
completion within a bound, then reports what did not finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from natskit.codec import CONTENT_TYPE, encode
from natskit.errors import DecodeError, Reject, ServiceError
from natskit.message import Message
from natskit.pipeline import Handler, Pipeline

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription

    from natskit.pipeline import Middleware

__all__ = ["CoreSource", "Subscription", "error_headers"]

log = logging.getLogger("natskit.pubsub")

SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """A declared subscription: subject pattern, optional queue group, concurrency."""

    pattern: str
    handler: Handler
    queue: str | None = None
    max_concurrency: int = 1
    pending_msgs_limit: int = 65_536
    pending_bytes_limit: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(
                f"subscribe({self.pattern!r}): max_concurrency must be >= 1, "
                f"got {self.max_concurrency}"
            )
        if self.queue is not None and not is_valid_queue(self.queue):
            raise ValueError(
                f"subscribe({self.pattern!r}): queue group {self.queue!r} must be a "
                "non-empty name without whitespace, '.', '*' or '>'"
            )

    @property
    def label(self) -> str:
        where = f" queue={self.queue}" if self.queue else ""
        return f"subscribe {self.pattern}{where} -> {self.handler.name}"

    def build(self, middleware: tuple[Middleware, ...]) -> CoreSource:
        return CoreSource(self, middleware=middleware)


def is_valid_queue(name: str) -> bool:
    """True for a queue group name NATS accepts: no whitespace, dots or wildcards."""
    return bool(name) and not any(c.isspace() or c in ".*>" for c in name)


def error_headers(exc: Exception, *, permanent: bool) -> dict[str, str]:
    """Services-protocol error headers for a failed message (ADR-32)."""
    if isinstance(exc, ServiceError):
        code, text = exc.code, exc.description
    elif isinstance(exc, DecodeError):
        code, text = 400, f"bad request: {exc}"
    elif isinstance(exc, Reject):
        code, text = 422, exc.reason
    else:
        code = 400 if permanent else 500
        text = "internal error" if not permanent else str(exc)
    return {SERVICE_ERROR: _header_safe(text), SERVICE_ERROR_CODE: str(code)}


def _header_safe(text: str) -> str:
    return " ".join(text.split())[:512]


class _CoreSettlement:
    settles_every_success = False

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    async def succeeded(self, msg: Message[Any], result: Any) -> None:
        reply = msg.raw.reply
        if not reply:
            return
        data, content_type = encode(result) if result is not None else (b"", None)
        headers = {CONTENT_TYPE: content_type} if content_type else None
        await self._nc.publish(reply, data, headers=headers)

    async def failed(
        self, msg: Message[Any], exc: Exception, *, permanent: bool
    ) -> None:
        reply = msg.raw.reply
        if reply:
            await self._nc.publish(
                reply, b"", headers=error_headers(exc, permanent=permanent)
            )


class CoreSource:
    """A live core subscription feeding one pipeline."""

    def __init__(
        self,
        spec: Subscription,
        *,
        middleware: tuple[Middleware, ...] = (),
        source: str = "core",
    ) -> None:
        self.spec = spec
        self.source = source
        self.label = spec.label
        self.pipeline = Pipeline(
            spec.handler,
            label=spec.label,
            middleware=middleware,
            source=source,
            pattern=spec.pattern,
        )
        self._sub: NatsSubscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

    async def start(self, nc: Client) -> None:
        spec = self.spec
        self.pipeline.settle = _CoreSettlement(nc)
        callback = self.pipeline.callback
        if spec.max_concurrency > 1:
            self._slots = asyncio.Semaphore(spec.max_concurrency)
            callback = self._run_in_task
        self._sub = await nc.subscribe(
            spec.pattern,
            queue=spec.queue or "",
            cb=callback,
            pending_msgs_limit=spec.pending_msgs_limit,
            pending_bytes_limit=spec.pending_bytes_limit,
        )

    async def _run_in_task(self, raw: Msg) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        task = asyncio.create_task(self._run_and_release(raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_and_release(self, raw: Msg) -> None:
        assert self._slots is not None
        try:
            await self.pipeline.callback(raw)
        finally:
            self._slots.release()

    @property
    def pending(self) -> int:
        """Messages received from the server but not yet handed to the handler."""
        return self._sub.pending_msgs if self._sub is not None else 0

    async def drain(self, deadline: float) -> int:
        """Stop taking messages, finish those received before ``deadline`` (monotonic).

        Returns how many messages did not finish in time (0 on a clean drain).
        """
        sub, self._sub = self._sub, None
        if sub is None:
            return 0
        left = 0
        try:
            draining = sub.drain()  # type: ignore[no-untyped-call]
            await asyncio.wait_for(
                draining, timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            left += sub.pending_msgs
            sub._stop_processing()
        except Exception as exc:
            # A closed or reconnecting connection cannot drain: nothing more will arrive.
            log.warning("%s: drain interrupted: %s", self.spec.label, exc)
        if self._tasks:
            timeout = max(0.0, deadline - time.monotonic())
            _, not_done = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in not_done:
                task.cancel()
            left += len(not_done)
        return left
