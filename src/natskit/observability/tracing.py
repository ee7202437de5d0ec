"""OpenTelemetry tracing across every hop, with W3C trace context in message headers.

Theory of operation
-------------------
:meth:`Tracing.detect` returns a :class:`Tracing` only when the OpenTelemetry API is
importable and a real tracer provider has been set (the SDK's, or any other); otherwise
``None``, and every call site checks for ``None`` once, so tracing costs nothing when
off.

When on:

* ``publish`` and ``js_publish`` open a PRODUCER span and inject its context
  (``traceparent``, ``tracestate``) into the message headers;
* ``request`` opens a CLIENT span around the whole call, retries included, and
  injects it into each attempt's headers;
* every handled message, whatever its source, runs inside a CONSUMER span (SERVER for
  services endpoints) whose parent is extracted from the message's headers. JetStream
  deliveries carry their delivery count, so redeliveries show in the trace;
* writing to the dead-letter stream is a PRODUCER span of its own, child of the span
  that handled the failing delivery.

Span names use the declared subject pattern, never a concrete subject that may hold
ids; the concrete subject is an attribute.

Sampling. A span costs the OpenTelemetry SDK tens of microseconds, more than natskit
spends on a whole message, so natskit decides before calling it: a message or call
that continues a trace follows its parent's sampled flag; one that would start a trace
is traced with probability ``sample_ratio`` (``NATSKIT_TRACE_SAMPLE_RATIO``, default
1.0). What is not sampled costs a header lookup and a random draw, and sends no trace
context on: the next hop, finding none, decides for itself.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from natskit.message import Message
from natskit.pipeline import Middleware, Next

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["Tracing"]

log = logging.getLogger("natskit.observability")

SYSTEM = "nats"


class Tracing:
    """Spans and context propagation for one App (see the module docstring)."""

    def __init__(
        self, tracer: Tracer, app_name: str, sample_ratio: float = 1.0
    ) -> None:
        from opentelemetry import propagate, trace

        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(
                f"trace sample ratio must be in [0, 1], got {sample_ratio}"
            )
        self.app_name = app_name
        self.sample_ratio = sample_ratio
        self._tracer = tracer
        self._trace = trace
        self._propagate = propagate
        self.middleware: Middleware = _GatedMiddleware(self._handle, self.wants)

    @classmethod
    def detect(cls, app_name: str, sample_ratio: float | None = None) -> Tracing | None:
        """A Tracing if OpenTelemetry is installed and a tracer provider is set.

        ``sample_ratio`` defaults to ``NATSKIT_TRACE_SAMPLE_RATIO``, else 1.0.
        """
        try:
            from opentelemetry import trace
        except ImportError:
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        if sample_ratio is None:
            sample_ratio = float(os.environ.get("NATSKIT_TRACE_SAMPLE_RATIO", "1.0"))
        log.info(
            "tracing on: OpenTelemetry tracer provider %s, root sample ratio %s",
            type(provider).__name__,
            sample_ratio,
        )
        return cls(trace.get_tracer("natskit"), app_name, sample_ratio)

    def _starts_trace(self) -> bool:
        return self.sample_ratio >= 1.0 or random.random() < self.sample_ratio

    def sampled_send(self) -> bool:
        """Whether a publish or call made now is traced (see Sampling above)."""
        context = self._trace.get_current_span().get_span_context()
        if context.is_valid:
            return bool(context.trace_flags.sampled)
        return self._starts_trace()

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write the current trace context into ``headers``."""
        self._propagate.inject(headers)

    @contextmanager
    def producer(
        self,
        operation: str,
        subject: str,
        headers: MutableMapping[str, str],
        *,
        parent: Mapping[str, str] | None = None,
    ) -> Iterator[Span]:
        """A PRODUCER span around sending ``subject``; injects it into ``headers``.

        ``parent`` names headers to take the parent context from (instead of the
        current one), as for a dead letter, whose parent is the failed message's trace.
        """
        kind = self._trace.SpanKind.PRODUCER
        context = self._propagate.extract(dict(parent)) if parent else None
        with self._tracer.start_as_current_span(
            f"{operation} {subject}",
            context=context,
            kind=kind,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "natskit.operation": operation,
                "messaging.destination.name": subject,
            },
        ) as span:
            self._propagate.inject(headers)
            yield span

    @contextmanager
    def client(self, subject: str, headers: MutableMapping[str, str]) -> Iterator[Span]:
        """A CLIENT span around a request-reply call to ``subject``."""
        with self._tracer.start_as_current_span(
            f"request {subject}",
            kind=self._trace.SpanKind.CLIENT,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "rpc.system": "nats",
            },
        ) as span:
            self._propagate.inject(headers)
            yield span

    def fail(self, span: Span, exc: BaseException) -> None:
        span.record_exception(exc)
        span.set_status(
            self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__)
        )

    def wants(self, headers: Mapping[str, str] | None) -> bool:
        """Whether a received message with ``headers`` is traced (see Sampling).

        The pipeline asks this first and runs the tracing middleware only if so.
        """
        traceparent = headers.get("traceparent") if headers else None
        if traceparent is None:
            return self._starts_trace()
        return _sampled_flag(traceparent)

    async def _handle(self, msg: Message[Any], call_next: Next) -> Any:
        headers = msg.raw.headers
        parent = self._propagate.extract(dict(headers)) if headers else None
        kind = (
            self._trace.SpanKind.SERVER
            if msg.source == "service"
            else self._trace.SpanKind.CONSUMER
        )
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.subject,
            "natskit.source": msg.source,
            "natskit.app": self.app_name,
        }
        delivery = msg.delivery
        if delivery is not None:
            attributes["messaging.nats.stream"] = delivery.stream
            attributes["messaging.consumer.group.name"] = delivery.consumer
            attributes["messaging.nats.delivery_count"] = delivery.num_delivered
            attributes["messaging.nats.stream_sequence"] = delivery.stream_sequence
        with self._tracer.start_as_current_span(
            f"process {msg.pattern or msg.subject}",
            context=parent,
            kind=kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next(msg)
            except Exception as exc:
                self.fail(span, exc)
                raise


class _GatedMiddleware:
    """The tracing middleware, carrying the gate the pipeline consults before it."""

    def __init__(
        self,
        handle: Middleware,
        gate: Callable[[Mapping[str, str] | None], bool],
    ) -> None:
        self._handle = handle
        self.sampling_gate = gate

    def __call__(self, msg: Message[Any], call_next: Next) -> Awaitable[Any]:
        return self._handle(msg, call_next)


def _sampled_flag(traceparent: str) -> bool:
    """The sampled bit of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``)."""
    try:
        return bool(int(traceparent[-2:], 16) & 1)
    except ValueError:
        return True  # let the propagator judge a malformed value
