"""``App``: the declarations of one service, and its lifecycle.

Theory of operation
-------------------
Declaring (``@app.subscribe`` and the other pattern decorators) only records what the
app wants and checks it: subjects, handler signatures and options are validated then,
so mistakes fail at import time with a message naming what is wrong.

``start()`` connects, then starts every source (subscriptions, endpoints, consumers)
and logs at INFO what it serves. ``stop()`` shuts down in order: stop taking new work
(every source drains: unsubscribe, then let what was already received finish within
``drain_timeout``), report what did not finish, then flush and close the connection.
``run()`` does both around a wait for SIGINT or SIGTERM; a second signal during the
drain stops waiting for in-flight handlers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

import nats.errors
from nats.nuid import NUID

from natskit.codec import CONTENT_TYPE, encode
from natskit.connection import (
    ConnectionEvents,
    ConnectOptions,
    connect,
    options_with_security,
    servers_from_env,
)
from natskit.discovery.direct import DirectEndpoints
from natskit.discovery.heartbeat import Heartbeats, ReadinessCheck, Status
from natskit.errors import (
    ConnectionClosed,
    NatskitError,
    PayloadTooLarge,
    PermissionDenied,
    PublishFailed,
    RequestError,
)
from natskit.observability.metrics import LagRefresher, enable_metrics
from natskit.observability.tracing import Tracing
from natskit.pipeline import Declaration, Middleware, Source, inspect_handler
from natskit.pubsub import Subscription
from natskit.rpc import (
    DEFAULT_QUEUE_GROUP,
    Caller,
    CallPolicy,
    Endpoint,
    Replies,
    ServiceResponder,
)
from natskit.streams import (
    Consumer,
    ConsumerSpec,
    DeliverFrom,
    JetStreamPlan,
    Outgoing,
    PubAck,
    PublishRetry,
    Redelivery,
    StoredMessage,
    StreamSpec,
    publisher_for,
)
from natskit.streams import replay as replay_stream
from natskit.streams.consumer import PullConsumer
from natskit.streams.publish import DENIED, MSG_ID, Publisher, new_msg_id
from natskit.subjects import NAME, check_subject, validate_pattern, validate_subject

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["App"]

log = logging.getLogger("natskit.app")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
R = TypeVar("R")
Hook = Callable[[], Awaitable[None]]

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)


class App:
    """One service: its handlers, its connection and its lifecycle.

    ``name`` and ``version`` identify it on the NATS services protocol, so ``name`` may
    hold letters, digits, ``-`` and ``_``, and ``version`` must be semantic versioning.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.1.0",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        connection: ConnectOptions | None = None,
        drain_timeout: float = 30.0,
        call_policy: CallPolicy | None = None,
        heartbeat_interval: float = 2.0,
        readiness: ReadinessCheck | None = None,
    ) -> None:
        if not NAME.match(name):
            raise ValueError(
                f"App name {name!r} may hold only letters, digits, '-' and '_' "
                "(the NATS services protocol requires it)"
            )
        if not _SEMVER.match(version):
            raise ValueError(
                f"App version {version!r} is not semantic versioning (x.y.z)"
            )
        if drain_timeout <= 0:
            raise ValueError(f"drain_timeout must be > 0, got {drain_timeout}")
        if not heartbeat_interval > 0:
            raise ValueError(
                f"heartbeat_interval must be > 0, got {heartbeat_interval}"
            )
        self.name = name
        self.version = version
        self.description = description
        self.metadata = dict(metadata or {})
        self.instance_id = NUID().next().decode()
        self.connect_options = connection or ConnectOptions()
        # Credentials and TLS files from NATS_CREDS, NATS_TOKEN, NATS_CA... at start
        # (natskit run resolves them itself, together with its flags).
        self.security_from_env = True
        self.drain_timeout = drain_timeout
        self.events = ConnectionEvents()
        self._declarations: list[Declaration] = []
        self._prepare: list[Callable[[Client], Awaitable[None]]] = []
        self._middleware: list[Middleware] = []
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._sources: list[Source] = []
        self._nc: Client | None = None
        self._stopping = False
        self._jetstream: JetStreamPlan | None = None
        self.tracing: Tracing | None = None
        self.metrics_enabled = False
        self.caller = Caller(lambda: self.nc, default=call_policy or CallPolicy())
        self.heartbeat_interval = heartbeat_interval
        self.readiness = readiness
        self._status = Status.STOPPED
        self._heartbeats: Heartbeats | None = None

    def __repr__(self) -> str:
        return f"App(name={self.name!r}, version={self.version!r}, id={self.instance_id!r})"

    # -- declaring ----------------------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        *,
        queue: str | None = None,
        max_concurrency: int = 1,
        pending_msgs_limit: int = 65_536,
        pending_bytes_limit: int = 64 * 1024 * 1024,
    ) -> Callable[[F], F]:
        """Declare a handler for messages on ``pattern`` (``*`` and ``>`` wildcards).

        With ``queue``, instances subscribed with the same queue name share the messages
        (each goes to one of them). ``max_concurrency`` > 1 runs up to that many messages
        at once, giving up per-subject order.
        """
        validate_pattern(pattern)

        def declare(func: F) -> F:
            self._declarations.append(
                Subscription(
                    pattern=pattern,
                    handler=inspect_handler(func),
                    queue=queue,
                    max_concurrency=max_concurrency,
                    pending_msgs_limit=pending_msgs_limit,
                    pending_bytes_limit=pending_bytes_limit,
                )
            )
            return func

        return declare

    def endpoint(
        self,
        subject: str,
        *,
        name: str | None = None,
        queue_group: str = DEFAULT_QUEUE_GROUP,
        metadata: Mapping[str, str] | None = None,
        max_concurrency: int = 1,
    ) -> Callable[[F], F]:
        """Declare a request-reply endpoint on the NATS services protocol.

        The handler's payload annotation is the request type; its return value is the
        reply, encoded like any published value. Instances share requests through the
        queue group. Raise :class:`~natskit.errors.ServiceError` to answer with a code.
        """
        validate_subject(subject)

        def declare(func: F) -> F:
            handler = inspect_handler(func)
            endpoint_name: str = name or str(getattr(func, "__name__", subject))
            if any(
                isinstance(d, Endpoint) and d.name == endpoint_name
                for d in self._declarations
            ):
                raise ValueError(f"endpoint name {endpoint_name!r} is declared twice")
            self._declarations.append(
                Endpoint(
                    name=endpoint_name,
                    subject=subject,
                    handler=handler,
                    queue_group=queue_group,
                    metadata=dict(metadata or {}),
                    max_concurrency=max_concurrency,
                )
            )
            return func

        return declare

    def use(self, middleware: Middleware) -> None:
        """Add a middleware around every handler (outermost first, in order of ``use``)."""
        if self._nc is not None:
            raise RuntimeError("middleware must be added before the app starts")
        self._middleware.append(middleware)

    def on_start(self, hook: Hook) -> Hook:
        """Run ``hook`` after the app has connected and before its sources start."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Run ``hook`` after the sources have drained and before the connection closes."""
        self._on_stop.append(hook)
        return hook

    def declare(self, declaration: Declaration) -> None:
        """Record a declaration whose source starts with the app (used by the patterns)."""
        if self._nc is not None:
            raise RuntimeError("declarations must be made before the app starts")
        self._declarations.append(declaration)

    def prepare(self, step: Callable[[Client], Awaitable[None]]) -> None:
        """Run ``step`` after connecting and before any source starts (e.g. ensure streams)."""
        self._prepare.append(step)

    @property
    def declarations(self) -> tuple[Declaration, ...]:
        return tuple(self._declarations)

    @property
    def sources(self) -> tuple[Source, ...]:
        """The running sources (empty unless started)."""
        return tuple(self._sources)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def nc(self) -> Client:
        """The live nats-py client (raises if the app is not started)."""
        if self._nc is None:
            raise ConnectionClosed(
                f"app {self.name} is not connected; call start() first"
            )
        return self._nc

    @property
    def started(self) -> bool:
        return self._nc is not None

    async def start(self, servers: list[str] | str | None = None) -> None:
        """Connect (to ``servers``, else the options' servers, else ``NATS_URL``) and serve."""
        if self._nc is not None:
            raise RuntimeError(f"app {self.name} is already started")
        options = self._resolve_options(servers)
        self._stopping = False
        self._status = Status.STARTING
        self._nc = await connect(options, events=self.events)
        try:
            for step in self._prepare:
                await step(self._nc)
            for hook in self._on_start:
                await hook()
            self.tracing = self.caller.tracing = Tracing.detect(self.name)
            middleware = tuple(self._middleware)
            if self.tracing is not None:
                middleware = (self.tracing.middleware, *middleware)
            for declaration in self._declarations:
                source = declaration.build(middleware)
                if isinstance(source, PullConsumer):
                    source.tracing = self.tracing
                await source.start(self._nc)
                self._sources.append(source)
            if self.metrics_enabled:
                enable_metrics(self)
                refresher = LagRefresher(self)
                await refresher.start(self._nc)
                self._sources.append(refresher)
            responder = ServiceResponder(self)
            await responder.start(self._nc)
            self._sources.append(responder)
            for extra in (DirectEndpoints(self), self._new_heartbeats()):
                await extra.start(self._nc)
                self._sources.append(extra)
            await self._nc.flush()
            await self._raise_subscribe_denial(self._nc)
            await self._set_status(Status.READY)
        except BaseException:
            await self._close()
            raise
        log.info(
            "app %s %s started (instance %s): %d source(s)",
            self.name,
            self.version,
            self.instance_id,
            len(self._sources),
        )
        for source in self._sources:
            log.info("  %s", source.label)

    async def _raise_subscribe_denial(self, nc: Client) -> None:
        await _round_trip(nc)
        for operation, subject in sorted(self.events.unreported_denials):
            if operation == "subscribe":
                self.events.take_denial(operation, subject)
                declared = {
                    str(p).lower(): str(p)
                    for p in (getattr(d, "pattern", None) for d in self._declarations)
                    if p
                }
                raise PermissionDenied("subscribe", declared.get(subject, subject))

    def _resolve_options(self, servers: list[str] | str | None) -> ConnectOptions:
        options = self.connect_options
        if isinstance(servers, str):
            servers = [servers]
        if servers:
            options = options.with_servers(servers)
        elif not options.servers:
            options = options.with_servers(servers_from_env())
        if self.security_from_env:
            options = options_with_security(options)
        if options.name is None:
            options = replace(options, name=f"{self.name}-{self.instance_id}")
        return options

    async def stop(self, timeout: float | None = None) -> None:
        """Drain and close: stop taking work, finish in-flight work, then disconnect."""
        if self._nc is None or self._stopping:
            return
        self._stopping = True
        await self._set_status(Status.DRAINING)
        bound = self.drain_timeout if timeout is None else timeout
        log.info("app %s draining (up to %.1fs for in-flight work)", self.name, bound)
        deadline = time.monotonic() + bound
        results = await asyncio.gather(*(s.drain(deadline) for s in self._sources))
        unfinished = sum(results)
        if unfinished:
            log.warning(
                "app %s: %d message(s) did not finish within the drain bound of %.1fs",
                self.name,
                unfinished,
                bound,
            )
        for hook in reversed(self._on_stop):
            try:
                await hook()
            except Exception:
                log.exception("app %s: on_stop hook %r failed", self.name, hook)
        await self._set_status(Status.STOPPING)  # the going-away heartbeat
        await self._close()
        log.info("app %s stopped", self.name)

    @property
    def status(self) -> Status:
        """starting, ready, draining, stopping (stopped before start and after stop)."""
        return self._status

    def _new_heartbeats(self) -> Heartbeats:
        self._heartbeats = Heartbeats(
            self, interval=self.heartbeat_interval, readiness=self.readiness
        )
        return self._heartbeats

    async def _set_status(self, status: Status) -> None:
        self._status = status
        if self._heartbeats is not None:
            await self._heartbeats.announce(status)

    async def _close(self) -> None:
        self._status = Status.STOPPED
        self._heartbeats = None
        nc, self._nc = self._nc, None
        self._sources.clear()
        if nc is None or nc.is_closed:
            return
        self.events.closing = True
        try:
            await asyncio.wait_for(nc.flush(), timeout=2.0)
        except Exception:  # flushing a broken connection: nothing more can be sent
            log.debug("final flush failed", exc_info=True)
        await nc.close()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, servers: list[str] | str | None = None) -> None:
        """Start, serve until SIGINT or SIGTERM, then drain and stop."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await self.start(servers)
            await stop_requested.wait()
            log.info("app %s: stop requested by signal", self.name)
            stop_requested.clear()
            drain = asyncio.create_task(self.stop())
            forced = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                log.warning(
                    "app %s: second signal; not waiting for in-flight work", self.name
                )
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
                await self._close()
            forced.cancel()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self._nc is not None:
                await self._close()

    # -- sending ------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        value: Any,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        reply: str = "",
        confirm: bool = False,
    ) -> None:
        """Encode ``value`` and publish it on ``subject`` (fire and forget, core NATS).

        ``value`` may be a msgspec Struct, dataclass, pydantic model, dict, list, str or
        bytes; the ``Content-Type`` header says how it was encoded (absent means JSON).

        The server reports a publish its permissions forbid asynchronously. With
        ``confirm`` this call waits for the server (a flush) and raises
        :class:`~natskit.errors.PermissionDenied` if it refused the message; without,
        the refusal is logged and raised by the next publish on the same subject.
        """
        nc = self.nc
        if self.events.unreported_denials and self.events.take_denial(
            "publish", subject
        ):
            raise PermissionDenied("publish", subject)
        check_subject(subject)
        data, ctype = encode(value, content_type)
        hdrs: dict[str, str] | None = dict(headers) if headers else None
        if ctype is not None:
            hdrs = hdrs or {}
            hdrs[CONTENT_TYPE] = ctype
        if len(data) > nc.max_payload:
            raise PayloadTooLarge(subject, len(data), nc.max_payload)
        if self.tracing is not None and self.tracing.sampled_send():
            hdrs = hdrs if hdrs is not None else {}
            with self.tracing.producer("publish", subject, hdrs):
                await self._send(nc, subject, data, reply, hdrs)
        else:
            await self._send(nc, subject, data, reply, hdrs)
        if confirm:
            await _round_trip(nc)
            if self.events.take_denial("publish", subject):
                raise PermissionDenied("publish", subject)

    async def _send(
        self,
        nc: Client,
        subject: str,
        data: bytes,
        reply: str,
        hdrs: dict[str, str] | None,
    ) -> None:
        try:
            await nc.publish(subject, data, reply=reply, headers=hdrs)
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(subject, len(data), nc.max_payload) from None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
        ) as exc:
            raise ConnectionClosed(f"cannot publish on {subject!r}: {exc}") from None

    @overload
    async def request(
        self,
        subject: str,
        value: Any,
        *,
        response_type: type[R],
        policy: CallPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        fallback: Callable[[RequestError], Awaitable[R]] | None = None,
    ) -> R: ...

    @overload
    async def request(
        self,
        subject: str,
        value: Any,
        *,
        policy: CallPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        fallback: Callable[[RequestError], Awaitable[bytes]] | None = None,
    ) -> bytes: ...

    async def request(
        self,
        subject: str,
        value: Any,
        *,
        response_type: Any = bytes,
        policy: CallPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        fallback: Callable[[RequestError], Awaitable[Any]] | None = None,
    ) -> Any:
        """Call an endpoint and return its decoded reply.

        Raises :class:`~natskit.errors.NoResponders`, :class:`~natskit.errors.RequestTimeout`,
        :class:`~natskit.errors.CircuitOpen`, :class:`~natskit.errors.ServiceError` or
        :class:`~natskit.errors.DecodeError`; with ``fallback``, request errors call it
        instead. ``policy`` (default: the App's) sets timeout, retries, breaker, hedging.
        """
        return await self.caller.request(
            subject,
            value,
            response_type=response_type,
            policy=policy,
            headers=headers,
            fallback=fallback,
        )

    async def gather(
        self,
        subject: str,
        value: Any,
        *,
        response_type: type[R] | Any = bytes,
        window: float = 1.0,
        max_replies: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Replies[R]:
        """Scatter-gather: one request, every reply within ``window`` (or ``max_replies``)."""
        result: Replies[R] = await self.caller.gather(
            subject,
            value,
            response_type=response_type,
            window=window,
            max_replies=max_replies,
            headers=headers,
        )
        return result

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the server has received everything published so far."""
        # nats-py annotates the timeout as int; it is used as a float by asyncio.
        await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]

    # -- streams (JetStream) --

    def stream(self, spec: StreamSpec) -> StreamSpec:
        """Declare a JetStream stream: created on start, or updated where allowed.

        A field the server cannot change in place (storage; retention to or from
        ``workqueue``) makes ``start()`` raise :class:`~natskit.errors.SpecConflict`
        naming it; subjects overlapping another stream raise
        :class:`~natskit.errors.SubjectsOverlap` naming both streams.
        """
        if self.started:
            raise RuntimeError("streams must be declared before the app starts")
        self._jetstream_plan().add_stream(spec)
        return spec

    def consume(
        self,
        *,
        stream: str,
        durable: str,
        filter_subjects: tuple[str, ...] | str = (),
        deliver: DeliverFrom = "all",
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        max_ack_pending: int = 1000,
        batch: int = 100,
        max_concurrency: int = 16,
        retry: Redelivery | None = None,
        dead_letter: bool = True,
        exactly_once: bool = False,
        publish_to: str | None = None,
        max_rate: float | None = None,
    ) -> Callable[[F], F]:
        """Declare a handler fed by a durable pull consumer on ``stream`` (at least once).

        Success acks. A retryable failure naks with a delay from ``retry`` that grows
        with the delivery count; a permanent failure (undecodable payload, ``Reject``)
        or a failure of delivery ``max_deliver`` goes to the dead-letter stream ``DLQ``,
        then the message is terminated. Long handlers keep their message with
        in-progress acks. ``exactly_once`` makes the ack wait for the server's
        confirmation; ``publish_to`` publishes the handler's return value there (a
        pipeline stage) with a message id derived from the stream sequence.
        ``max_rate`` caps handler starts per second in this process.
        """
        if self.started:
            raise RuntimeError("consumers must be declared before the app starts")
        spec = ConsumerSpec(
            stream=stream,
            durable=durable,
            filter_subjects=(
                (filter_subjects,)
                if isinstance(filter_subjects, str)
                else tuple(filter_subjects)
            ),
            deliver=deliver,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
        )

        def declare(func: F) -> F:
            consumer = Consumer(
                spec=spec,
                handler=inspect_handler(func),
                batch=batch,
                max_concurrency=max_concurrency,
                retry=retry or Redelivery(),
                dead_letter=dead_letter,
                exactly_once=exactly_once,
                publish_to=publish_to,
                max_rate=max_rate,
            )
            self._jetstream_plan().add_consumer(consumer)
            self.declare(consumer)
            return func

        return declare

    async def js_publish(
        self,
        subject: str,
        value: Any,
        *,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        retry: PublishRetry | None = None,
    ) -> PubAck:
        """Publish to a stream and wait for the server's ack.

        Every publish carries a message id (``msg_id``, else a fresh one), so the
        retries on timeouts, "no responders" and reconnects (``retry``; default 8
        attempts) store it once; ``ack.duplicate`` says the server had it already.
        Raises :class:`~natskit.errors.PublishFailed` when no ack came.
        """
        subject, data, hdrs = self._js_message(
            subject, value, msg_id, headers, content_type
        )
        publisher = await self._publisher()
        try:
            if self.tracing is not None and self.tracing.sampled_send():
                with self.tracing.producer("publish", subject, hdrs):
                    return await publisher.publish(
                        subject, data, hdrs, retry or PublishRetry()
                    )
            return await publisher.publish(subject, data, hdrs, retry or PublishRetry())
        except PublishFailed as exc:
            raise self._denial_or(exc) from None

    async def _publisher(self) -> Publisher:
        publisher = await publisher_for(self.nc)
        events = self.events
        publisher.denied = lambda subject: events.denials("publish", subject) > 0
        return publisher

    def _denial_or(self, failure: PublishFailed) -> NatskitError:
        """:class:`PermissionDenied` if the server refused the publish, else ``failure``."""
        if failure.reason == DENIED:
            self.events.take_denial("publish", failure.subject)
            return PermissionDenied("publish", failure.subject)
        return failure

    async def js_publish_many(
        self,
        items: Iterable[Outgoing | tuple[str, Any]],
        *,
        max_in_flight: int = 256,
        retry: PublishRetry | None = None,
        return_exceptions: bool = False,
    ) -> list[PubAck | PublishFailed]:
        """Publish many messages pipelined, at most ``max_in_flight`` unacknowledged.

        Items are ``Outgoing`` values or ``(subject, value)`` pairs. Returns one result
        per item, in order. Every ack is checked: a failed message raises
        :class:`~natskit.errors.PublishFailed` once all have settled, or, with
        ``return_exceptions``, stands in its place in the list.
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        publisher = await self._publisher()

        def messages() -> Iterator[tuple[str, bytes, dict[str, str]]]:
            for item in items:
                if isinstance(item, Outgoing):
                    yield self._js_message(
                        item.subject,
                        item.value,
                        item.msg_id,
                        item.headers,
                        item.content_type,
                    )
                else:
                    yield self._js_message(item[0], item[1], None, None, None)

        results = await publisher.publish_many(
            messages(), max_in_flight=max_in_flight, retry=retry or PublishRetry()
        )
        if not return_exceptions:
            failures = [r for r in results if isinstance(r, PublishFailed)]
            if failures:
                raise self._denial_or(failures[0])
        return results

    def _js_message(
        self,
        subject: str,
        value: Any,
        msg_id: str | None,
        headers: Mapping[str, str] | None,
        content_type: str | None,
    ) -> tuple[str, bytes, dict[str, str]]:
        check_subject(subject)
        data, ctype = encode(value, content_type)
        hdrs = dict(headers) if headers else {}
        if ctype is not None:
            hdrs[CONTENT_TYPE] = ctype
        hdrs[MSG_ID] = msg_id or new_msg_id()
        return subject, data, hdrs

    def replay(
        self,
        stream: str,
        *,
        from_seq: int | None = None,
        since: datetime | None = None,
        subject: str | None = None,
        follow: bool = False,
    ) -> AsyncIterator[StoredMessage]:
        """The messages of ``stream`` in order, through an ordered consumer.

        From the first message, or ``from_seq``, or ``since`` (a timezone-aware
        time); ``subject`` filters (wildcards allowed). Ends at the last message
        unless ``follow``. Use as ``async for message in app.replay("ORDERS"): ...``.
        """
        return replay_stream(
            self.nc,
            stream,
            from_seq=from_seq,
            since=since,
            subject=subject,
            follow=follow,
        )

    def _jetstream_plan(self) -> JetStreamPlan:
        if self._jetstream is None:
            self._jetstream = JetStreamPlan()
            self.prepare(self._jetstream.reconcile)
        return self._jetstream


async def _round_trip(nc: Client) -> None:
    """Wait until the server has answered everything sent so far, permission
    violations included: the server can answer a PING before it reports the violation
    of a message sent ahead of it, so one flush is not enough; a second PING, sent
    after the first PONG, comes back after that report (measured, nats-server 2.15)."""
    await nc.flush()
    await nc.flush()
