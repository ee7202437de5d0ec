"""Request-reply: typed endpoints on the NATS services protocol, and resilient calls.

Theory of operation
-------------------
Serving. ``@app.endpoint(subject)`` declares an :class:`Endpoint`: a core subscription
in a queue group (default ``q``, as the services protocol says), so instances of a
service share the requests. It runs through the shared pipeline; the services
settlement replies with the return value, or with ``Nats-Service-Error`` and
``Nats-Service-Error-Code`` headers when the handler fails (4xx for a request that does
not decode or a :class:`~natskit.errors.ServiceError` the handler raised with such a
code, 500 otherwise). Every App answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS``
(plain, by name, and by name and id) through :class:`ServiceResponder`, so any NATS
client can discover it and read its per-endpoint counters.

Deadlines. A caller sends its remaining time budget in the ``Natskit-Timeout-Ms``
header (relative, so clocks of different machines need not agree): always when the
call is made while handling a request that carried one, and for a first hop when its
policy says ``send_deadline=True``. The receiving source turns it into a local
deadline, visible to the handler via :func:`remaining_time`; calls made from inside
the handler shrink their timeouts to fit, pass the rest on, and give up without
sending once it has passed.

Calling. :class:`Caller` makes one call as a loop of attempts under a
:class:`CallPolicy`:

1. the subject's circuit breaker must allow the call, else ``CircuitOpen``; the breaker
   judges the call by its final outcome, after retries and hedges;
2. each attempt's timeout is the policy's, cut to the caller's own deadline;
3. with ``hedge_after`` set (idempotent calls only), a second copy of the request goes
   out if no reply came within that time; the first reply wins;
4. no responders (immediate, from the server's 503 status) and timeouts are retried
   only for idempotent calls, after a delay with full jitter, while attempts and the
   deadline allow; for the breaker they are failures;
5. an error reply with a 5xx code is a failure of the responder, a 4xx one a healthy
   responder refusing a bad request; neither is retried unless the policy asks for 5xx
   retries;
6. when the call fails for good, the fallback (if any) is called with the error instead
   of raising it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import nats.errors

from natskit.codec import CONTENT_TYPE, decoder_for, encode
from natskit.errors import (
    CircuitOpen,
    DecodeError,
    NoResponders,
    RequestError,
    RequestTimeout,
    ServiceError,
)
from natskit.observability.metrics import MAX_CALL_SUBJECTS, Histogram
from natskit.pipeline import TIMEOUT_HEADER, Handler, Middleware, current_deadline
from natskit.pubsub import (
    SERVICE_ERROR,
    SERVICE_ERROR_CODE,
    CoreSource,
    Subscription,
    is_valid_queue,
)
from natskit.resilience import BreakerPolicy, CircuitBreaker, RetryPolicy
from natskit.subjects import NAME, check_subject

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from natskit.app import App
    from natskit.observability.tracing import Tracing

__all__ = [
    "CallPolicy",
    "CallStats",
    "Caller",
    "Endpoint",
    "Replies",
    "ServiceResponder",
    "remaining_time",
]

log = logging.getLogger("natskit.rpc")

T = TypeVar("T")

PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"
DEFAULT_QUEUE_GROUP = "q"
_BREAKER_LIMIT = 10_000


def remaining_time() -> float | None:
    """Seconds left before the current request's caller gives up, or None if unknown.

    Inside a handler serving a request from a natskit caller, this is the caller's
    remaining budget; calls made with ``app.request`` from there shrink to fit it.
    """
    deadline = current_deadline.get()
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


# -- serving --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """A declared services-protocol endpoint."""

    name: str
    subject: str
    handler: Handler
    queue_group: str = DEFAULT_QUEUE_GROUP
    metadata: Mapping[str, str] = field(default_factory=dict)
    max_concurrency: int = 1

    def __post_init__(self) -> None:
        if not is_valid_queue(self.queue_group):
            raise ValueError(
                f"endpoint({self.subject!r}): queue group {self.queue_group!r} must be a "
                "non-empty name without whitespace, '.', '*' or '>'"
            )
        if not NAME.match(self.name):
            raise ValueError(
                f"endpoint({self.subject!r}): name {self.name!r} may hold only letters, "
                "digits, '-' and '_'"
            )

    @property
    def label(self) -> str:
        return (
            f"endpoint {self.subject} (queue {self.queue_group}) -> {self.handler.name}"
        )

    def build(self, middleware: tuple[Middleware, ...]) -> EndpointSource:
        spec = Subscription(
            pattern=self.subject,
            handler=self.handler,
            queue=self.queue_group,
            max_concurrency=self.max_concurrency,
        )
        return EndpointSource(self, spec, middleware=middleware)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": dict(self.metadata) or None,
        }


class EndpointSource(CoreSource):
    """The running endpoint: a core source whose counters feed ``$SRV.STATS``."""

    def __init__(
        self,
        endpoint: Endpoint,
        spec: Subscription,
        *,
        middleware: tuple[Middleware, ...],
    ) -> None:
        super().__init__(spec, middleware=middleware, source="service")
        self.endpoint = endpoint
        self.label = endpoint.label

    def stats(self) -> dict[str, Any]:
        s = self.pipeline.stats
        return {
            **self.endpoint.info(),
            "num_requests": s.received,
            "num_errors": s.errors,
            "last_error": s.last_error,
            "processing_time": s.processing_ns,
            "average_processing_time": s.average_ns,
        }


def rfc3339(moment: dt.datetime) -> str:
    """``moment`` in RFC 3339, UTC, microseconds (the services protocol's ``started``)."""
    return (
        moment.astimezone(dt.UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


class ServiceResponder:
    """Answers ``$SRV.PING|INFO|STATS`` for one App (every instance answers)."""

    label = "services protocol ($SRV.PING/INFO/STATS)"

    def __init__(self, app: App) -> None:
        self._app = app
        self._subs: list[Any] = []
        self.started = dt.datetime.now(dt.UTC)

    def _identity(self) -> dict[str, Any]:
        app = self._app
        return {
            "name": app.name,
            "id": app.instance_id,
            "version": app.version,
            "metadata": dict(app.metadata),
        }

    def _endpoints(self) -> list[EndpointSource]:
        return [s for s in self._app.sources if isinstance(s, EndpointSource)]

    def ping(self) -> dict[str, Any]:
        return {"type": PING_TYPE, **self._identity()}

    def info(self) -> dict[str, Any]:
        return {
            "type": INFO_TYPE,
            **self._identity(),
            "description": self._app.description,
            "endpoints": [e.endpoint.info() for e in self._endpoints()],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "type": STATS_TYPE,
            **self._identity(),
            "started": rfc3339(self.started),
            "endpoints": [e.stats() for e in self._endpoints()],
        }

    async def start(self, nc: Client) -> None:
        self.started = dt.datetime.now(dt.UTC)
        name, iid = self._app.name, self._app.instance_id
        for verb, build in (
            ("PING", self.ping),
            ("INFO", self.info),
            ("STATS", self.stats),
        ):
            callback = _responder(nc, build)
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{name}",
                f"$SRV.{verb}.{name}.{iid}",
            ):
                self._subs.append(await nc.subscribe(subject, cb=callback))

    async def drain(self, deadline: float) -> int:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing a $SRV subscription failed: %s", exc)
        return 0


def _responder(
    nc: Client, build: Callable[[], dict[str, Any]]
) -> Callable[[Msg], Awaitable[None]]:
    async def respond(msg: Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, json.dumps(build()).encode())

    return respond


# -- calling --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CallPolicy:
    """How one request-reply call behaves under failure.

    ``timeout`` bounds each attempt (and is cut to the caller's own deadline). Retries
    happen only for ``idempotent`` calls, on the failure kinds of ``retry.retry_on``.
    ``breaker`` (one per subject, shared by all calls of the App with that subject)
    fails calls fast while a responder is down; ``None`` turns it off. ``hedge_after``
    sends another copy of an idempotent request each time that long passes without a
    reply (at most ``max_hedges`` copies), which rides over a responder that is frozen
    rather than gone: in a queue group each copy may reach another instance.

    Deadlines: a call made while handling a request that carried a deadline always
    passes the remaining budget on (``Natskit-Timeout-Ms``). ``send_deadline=True``
    makes a call start such a chain with its own timeout. It is off by default because
    a header costs nats-py about as much again per request as the whole natskit call
    path (measured by ``make bench``); turn it on where the first hop's handler needs
    to know how long its caller waits.
    """

    timeout: float = 2.0
    idempotent: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy | None = field(default_factory=BreakerPolicy)
    hedge_after: float | None = None
    max_hedges: int = 1
    send_deadline: bool = False

    def __post_init__(self) -> None:
        if self.max_hedges < 1:
            raise ValueError(
                f"CallPolicy.max_hedges must be >= 1, got {self.max_hedges}"
            )
        if not self.timeout > 0:
            raise ValueError(f"CallPolicy.timeout must be > 0, got {self.timeout}")
        if self.hedge_after is not None:
            if not 0 < self.hedge_after < self.timeout:
                raise ValueError(
                    f"CallPolicy.hedge_after must be between 0 and timeout ({self.timeout}), "
                    f"got {self.hedge_after}"
                )
            if not self.idempotent:
                raise ValueError("CallPolicy.hedge_after needs idempotent=True")


@dataclass
class CallStats:
    """Counters of the calls an App made (read by metrics, the demo and tests)."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    hedges: int = 0
    failures: int = 0
    rejected_by_breaker: int = 0
    fallbacks: int = 0
    breaker_opened: int = 0


@dataclass
class SubjectCalls:
    """Outcomes and latency of the calls to one subject (kept while metrics are on)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True)
class Replies(Generic[T]):
    """What a scatter-gather call collected: decoded values and error replies."""

    values: list[T]
    errors: list[RequestError | DecodeError]


class Caller:
    """Makes request-reply calls for one App; owns the per-subject circuit breakers."""

    def __init__(self, nc_of: Callable[[], Client], *, default: CallPolicy) -> None:
        self._nc_of = nc_of
        self.default = default
        self.stats = CallStats()
        self.breakers: dict[str, CircuitBreaker] = {}
        self._decoders: dict[Any, Callable[[bytes, str | None], Any]] = {}
        self.metrics_enabled = False
        self.by_subject: dict[str, SubjectCalls] = {}
        self.tracing: Tracing | None = None

    def _decoder(self, tp: Any) -> Callable[[bytes, str | None], Any]:
        decode = self._decoders.get(tp)
        if decode is None:
            decode = self._decoders[tp] = decoder_for(tp)
        return decode

    def breaker(self, subject: str, policy: BreakerPolicy) -> CircuitBreaker:
        breaker = self.breakers.get(subject)
        if breaker is None or (
            breaker.policy is not policy and breaker.policy != policy
        ):
            if len(self.breakers) >= _BREAKER_LIMIT:
                self.breakers.pop(next(iter(self.breakers)))
            breaker = CircuitBreaker(subject, policy, on_change=self._on_breaker_change)
            self.breakers[subject] = breaker
        return breaker

    def _record(self, subject: str, outcome: str, started: int) -> None:
        per = self.by_subject.get(subject)
        if per is None:
            if len(self.by_subject) >= MAX_CALL_SUBJECTS:
                subject = "other"
            per = self.by_subject.setdefault(subject, SubjectCalls())
        per.outcomes[outcome] = per.outcomes.get(outcome, 0) + 1
        per.latency.observe_ns(time.perf_counter_ns() - started)

    def _on_breaker_change(self, name: str, old: Any, new: Any) -> None:
        if new.value == "open":
            self.stats.breaker_opened += 1

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
        policy = policy or self.default
        check_subject(subject)
        decode = self._decoder(response_type)
        data, ctype = encode(value)
        base_headers = dict(headers) if headers else {}
        if ctype:
            base_headers[CONTENT_TYPE] = ctype
        breaker = self.breaker(subject, policy.breaker) if policy.breaker else None
        self.stats.calls += 1
        started = time.perf_counter_ns() if self.metrics_enabled else 0
        try:
            if self.tracing is None or not self.tracing.sampled_send():
                reply = await self._attempts(
                    subject, data, base_headers, policy, breaker
                )
            else:
                with self.tracing.client(subject, base_headers):
                    reply = await self._attempts(
                        subject, data, base_headers, policy, breaker
                    )
        except RequestError as exc:
            self.stats.failures += 1
            if started:
                self._record(subject, type(exc).__name__, started)
            if fallback is None:
                raise
            self.stats.fallbacks += 1
            return await fallback(exc)
        if started:
            self._record(subject, "ok", started)
        reply_headers = reply.headers
        reply_type = reply_headers.get(CONTENT_TYPE) if reply_headers else None
        try:
            return decode(reply.data, reply_type)
        except DecodeError as exc:
            raise exc.with_subject(subject) from None

    async def _attempts(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        policy: CallPolicy,
        breaker: CircuitBreaker | None,
    ) -> Msg:
        """One call under the breaker: allowed once, judged by its final outcome.

        Judging calls rather than attempts keeps the breaker closed while retries and
        hedges still get answers (one frozen instance of several), and opens it when
        calls fail outright (every instance gone).
        """
        if breaker is None:
            return await self._retrying(subject, data, headers, policy)
        if not breaker.allow():
            self.stats.rejected_by_breaker += 1
            raise CircuitOpen(subject, breaker.retry_after())
        try:
            reply = await self._retrying(subject, data, headers, policy)
        except (NoResponders, RequestTimeout):
            breaker.record_failure()
            raise
        except ServiceError as exc:
            if exc.code >= 500:
                breaker.record_failure()
            else:
                breaker.record_success()
            raise
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        return reply

    async def _retrying(
        self, subject: str, data: bytes, headers: dict[str, str], policy: CallPolicy
    ) -> Msg:
        upstream = current_deadline.get()
        retry = 0
        while True:
            timeout = policy.timeout
            if upstream is not None:
                timeout = min(timeout, upstream - time.monotonic())
                if timeout <= 0:
                    raise RequestTimeout(subject, 0.0)
            self.stats.attempts += 1
            send_headers: dict[str, str] | None = headers or None
            if upstream is not None or policy.send_deadline:
                send_headers = {**headers, TIMEOUT_HEADER: _millis(timeout)}
            try:
                if policy.hedge_after is not None:
                    reply = await self._hedged(
                        subject, data, send_headers, timeout, policy
                    )
                else:
                    reply = await self._send(subject, data, send_headers, timeout)
                error = service_error(reply, subject)
                if error is None:
                    return reply
                raise error
            except (NoResponders, RequestTimeout, ServiceError) as failure:
                kind = _failure_kind(failure)
                if not policy.retry.should_retry(
                    kind, retry, idempotent=policy.idempotent
                ):
                    raise
                delay = policy.retry.delay(retry)
                if upstream is not None and time.monotonic() + delay >= upstream:
                    raise
            retry += 1
            self.stats.retries += 1
            await asyncio.sleep(delay)

    async def _send(
        self, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        try:
            reply: Msg = await self._nc_of().request(
                subject,
                data,
                timeout=timeout,
                headers=headers,
            )
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise RequestTimeout(subject, timeout) from None
        return reply

    async def _hedged(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        timeout: float,
        policy: CallPolicy,
    ) -> Msg:
        """Send, then another copy every ``hedge_after`` without a reply (up to
        ``max_hedges``); the first reply wins and the other copies are dropped."""
        assert policy.hedge_after is not None
        deadline = time.monotonic() + timeout
        first = asyncio.ensure_future(self._send(subject, data, headers, timeout))
        pending = {first}
        hedges_left = policy.max_hedges
        try:
            while pending:
                wait = policy.hedge_after if hedges_left else None
                done, pending = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    error = task.exception()
                    if error is None:
                        return task.result()
                    if isinstance(error, NoResponders):
                        raise error  # nobody to hedge to
                left = deadline - time.monotonic()
                if not done and hedges_left and left > 0.001:
                    hedges_left -= 1
                    self.stats.hedges += 1
                    pending.add(
                        asyncio.ensure_future(self._send(subject, data, headers, left))
                    )
            raise RequestTimeout(subject, timeout)
        finally:
            for task in pending:
                task.cancel()

    async def gather(
        self,
        subject: str,
        value: Any,
        *,
        response_type: Any = bytes,
        window: float = 1.0,
        max_replies: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Replies[Any]:
        """Send one request and collect every reply within ``window`` or up to a count."""
        check_subject(subject)
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        decode = self._decoder(response_type)
        nc = self._nc_of()
        data, ctype = encode(value)
        send_headers = dict(headers) if headers else {}
        if ctype:
            send_headers[CONTENT_TYPE] = ctype
        send_headers[TIMEOUT_HEADER] = str(max(1, int(window * 1000)))
        result: Replies[Any] = Replies([], [])
        enough = asyncio.Event()

        async def collect(msg: Msg) -> None:
            error = service_error(msg, subject)
            if error is not None:
                result.errors.append(error)
            else:
                ctype = msg.headers.get(CONTENT_TYPE) if msg.headers else None
                try:
                    result.values.append(decode(msg.data, ctype))
                except DecodeError as exc:
                    result.errors.append(exc.with_subject(subject))
            if max_replies and len(result.values) + len(result.errors) >= max_replies:
                enough.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(subject, data, reply=inbox, headers=send_headers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), timeout=window)
        finally:
            await sub.unsubscribe()
        return result


@functools.lru_cache(maxsize=256)
def _millis(seconds: float) -> str:
    """A timeout budget as header text (cached: most calls share a few timeouts)."""
    return str(max(1, int(seconds * 1000)))


def _failure_kind(failure: RequestError) -> str:
    if isinstance(failure, NoResponders):
        return "no_responders"
    if isinstance(failure, ServiceError):
        return "service_error_5xx" if failure.code >= 500 else "service_error"
    return "timeout"


def service_error(reply: Msg, subject: str) -> ServiceError | None:
    """The services-protocol error carried by ``reply``'s headers, if any."""
    headers = reply.headers
    if not headers or SERVICE_ERROR_CODE not in headers:
        return None
    try:
        code = int(headers[SERVICE_ERROR_CODE])
    except ValueError:
        code = 500
    return ServiceError(code, headers.get(SERVICE_ERROR, ""), subject=subject)
