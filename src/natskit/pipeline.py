"""One pipeline, many sources: decode -> middleware -> handler -> outcome -> settle.

Theory of operation
-------------------
A *source* (a core subscription, a services endpoint, a JetStream consumer) receives raw
nats-py messages and hands each to :meth:`Pipeline.process` together with a
:class:`Settlement`, the source's rule for what to do once the handler has finished:

================  ==================  =====================  ==========================
source            success             retryable failure      permanent failure
================  ==================  =====================  ==========================
core subscription reply if asked      logged, counted        logged, counted, error
                                                             reply if asked
services endpoint reply               error reply (500)      error reply (4xx)
JetStream         ack                 nak with growing delay dead-letter, then term
================  ==================  =====================  ==========================

The pipeline classifies the outcome once, for every source:

* success: the handler returned; its value is the reply or the next stage's input;
* permanent: the payload did not decode (:class:`~natskit.errors.DecodeError`), or the
  handler raised :class:`~natskit.errors.Reject` or a 4xx
  :class:`~natskit.errors.ServiceError`;
* retryable: the handler raised :class:`~natskit.errors.Retry` or any other exception.

Exceptions other than the handler's own decisions are logged once, here, with their
traceback; ``asyncio.CancelledError`` is never swallowed. Middleware wraps decoding and
the handler, so tracing or metrics written as middleware see every message and every
outcome, whatever the source.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from natskit.codec import CONTENT_TYPE, decoder_for, type_name
from natskit.errors import DecodeError, HandlerError, Reject, ServiceError
from natskit.message import Message
from natskit.observability.logs import RateLimitedLog
from natskit.observability.metrics import Histogram

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = [
    "TIMEOUT_HEADER",
    "Declaration",
    "Handler",
    "HandlerStats",
    "Middleware",
    "Next",
    "Pipeline",
    "Settlement",
    "Source",
    "current_deadline",
    "inspect_handler",
]

log = logging.getLogger("natskit.pipeline")
_decode_warnings = RateLimitedLog(log)

TIMEOUT_HEADER = "Natskit-Timeout-Ms"
"""A caller's remaining time budget in milliseconds, sent with each request."""

current_deadline: ContextVar[float | None] = ContextVar(
    "natskit_deadline", default=None
)
"""The deadline (``time.monotonic()`` based) of the request being handled, if known."""

Next = Callable[[Message[Any]], Awaitable[Any]]
Middleware = Callable[[Message[Any], Next], Awaitable[Any]]


class Settlement(Protocol):
    """A source's rule for finishing a message once the handler has run.

    ``settles_every_success`` is True where every handled message must be settled (a
    JetStream ack); False where only messages that asked for a reply need it.
    """

    settles_every_success: bool

    async def succeeded(self, msg: Message[Any], result: Any) -> None: ...

    async def failed(
        self, msg: Message[Any], exc: Exception, *, permanent: bool
    ) -> None: ...


class Source(Protocol):
    """A running source of messages: a core subscription, an endpoint, a consumer."""

    @property
    def label(self) -> str: ...

    async def start(self, nc: Client) -> None:
        """Begin receiving; the app awaits this for every source before it reports ready."""
        ...

    async def drain(self, deadline: float) -> int:
        """Stop taking messages, finish received ones before ``deadline`` (monotonic).

        Returns how many did not finish in time.
        """
        ...


class Declaration(Protocol):
    """What a pattern decorator records on the App; builds the Source at start."""

    def build(self, middleware: tuple[Middleware, ...]) -> Source: ...


@dataclass
class HandlerStats:
    """Counters of one handler, as the services protocol reports them."""

    received: int = 0
    errors: int = 0
    decode_errors: int = 0
    processing_ns: int = 0
    last_error: str = ""
    in_flight: int = 0
    error_classes: dict[str, int] = field(default_factory=dict)
    histogram: Histogram | None = None

    @property
    def average_ns(self) -> int:
        return self.processing_ns // self.received if self.received else 0

    def reset(self) -> None:
        self.received = self.errors = self.decode_errors = self.processing_ns = 0
        self.last_error = ""


@dataclass(frozen=True)
class Handler:
    """A user's handler function and what its signature asks for."""

    func: Callable[..., Awaitable[Any]]
    name: str
    payload_type: Any
    payload_param: str | None
    message_param: str | None
    decode: Callable[[bytes, str | None], Any] = field(repr=False)

    def describe(self) -> str:
        return f"{self.name}({type_name(self.payload_type)})"


def inspect_handler(func: Callable[..., Any]) -> Handler:
    """Read a handler's signature once, at declaration; build its decoder.

    The handler must be ``async def``. Its payload parameter is the first one not
    annotated ``Message[...]``; one parameter may be annotated ``Message[T]`` (or bare
    ``Message``). A handler with only a ``Message[T]`` parameter gets the payload as
    ``msg.payload``. Raises ``TypeError`` naming the handler when this cannot be read.
    """
    name = getattr(func, "__qualname__", repr(func))
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"handler {name} must be an 'async def' function")
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise TypeError(
            f"handler {name}: cannot resolve its annotations ({exc})"
        ) from exc
    payload_param, payload_type, message_param = _read_parameters(func, name, hints)
    if payload_type is None:
        if message_param is None:
            raise TypeError(
                f"handler {name} takes no parameter; it needs one annotated with the payload "
                "type, or one annotated Message[T]"
            )
        payload_type = bytes
    try:
        decode = decoder_for(payload_type)
    except TypeError as exc:
        raise TypeError(f"handler {name}: {exc}") from None
    return Handler(func, name, payload_type, payload_param, message_param, decode)


def _read_parameters(
    func: Callable[..., Any], name: str, hints: dict[str, Any]
) -> tuple[str | None, Any, str | None]:
    payload_param: str | None = None
    payload_type: Any = None
    message_param: str | None = None
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, inspect.Parameter.empty)
        if _is_message_type(annotation):
            if message_param is not None:
                raise TypeError(f"handler {name} has two Message parameters")
            message_param = param.name
            args = typing.get_args(annotation)
            if payload_type is None and args:
                payload_type = args[0]
        elif payload_param is None:
            if annotation is inspect.Parameter.empty:
                raise TypeError(
                    f"handler {name}: parameter {param.name!r} needs a type annotation "
                    "saying what the payload decodes to (a msgspec Struct, dataclass, "
                    "pydantic model, dict, str or bytes)"
                )
            payload_param, payload_type = param.name, annotation
        elif param.default is inspect.Parameter.empty:
            raise TypeError(
                f"handler {name}: unexpected required parameter {param.name!r}; a handler "
                "takes a payload and optionally a Message[T]"
            )
    return payload_param, payload_type, message_param


def _is_message_type(annotation: Any) -> bool:
    return annotation is Message or typing.get_origin(annotation) is Message


class Pipeline:
    """Runs one handler for messages from one source, under a list of middleware.

    The hot path (a message without middleware, settled only when it asks for a reply)
    costs one coroutine frame besides the handler's own: decoding and the handler call
    are prepared by plain functions, and success is settled only where the source needs
    it (see :attr:`Settlement.settles_every_success`).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        label: str,
        middleware: Sequence[Middleware] = (),
        source: str = "core",
        pattern: str = "",
    ) -> None:
        self.handler = handler
        self.label = label
        self.source = source
        self.pattern = pattern
        self.stats = HandlerStats()
        self.settle: Settlement | None = None
        # A first middleware with a ``sampling_gate`` (tracing) runs only for the
        # messages its gate picks; the others take the path without it.
        gate = getattr(middleware[0], "sampling_gate", None) if middleware else None
        self._gate: Callable[[Any], bool] | None = gate
        self._traced: Next | None = self._wrap(middleware) if gate else None
        rest = middleware[1:] if gate else middleware
        self._direct = not rest
        self._plain = self._direct and handler.message_param is None
        self._call: Next = self._wrap(rest)

    def _wrap(self, middleware: Sequence[Middleware]) -> Next:
        call: Next = self._invoke
        for mw in reversed(middleware):
            call = _bind(mw, call)
        return call

    def _decode(self, msg: Message[Any]) -> Any:
        raw = msg.raw
        headers = raw.headers
        try:
            payload = self.handler.decode(
                raw.data, headers.get(CONTENT_TYPE) if headers else None
            )
        except DecodeError as exc:
            raise exc.with_subject(raw.subject) from None
        msg._payload = payload
        return payload

    def _start_handler(self, msg: Message[Any], payload: Any) -> Awaitable[Any]:
        handler = self.handler
        if handler.message_param is None:
            return handler.func(payload)
        if handler.payload_param is None:
            return handler.func(**{handler.message_param: msg})
        return handler.func(payload, **{handler.message_param: msg})

    async def _invoke(self, msg: Message[Any]) -> Any:
        return await self._start_handler(msg, self._decode(msg))

    async def process_raw(self, raw: Msg) -> None:
        """Process a raw core message with :attr:`settle` (a nats-py callback)."""
        settle = self.settle
        assert settle is not None, (
            "the source sets Pipeline.settle before it subscribes"
        )
        headers = raw.headers
        if headers and TIMEOUT_HEADER in headers:
            token = current_deadline.set(_deadline_from(headers[TIMEOUT_HEADER]))
            try:
                await self.process(
                    Message(raw, self.source, None, self.pattern), settle
                )
            finally:
                current_deadline.reset(token)
            return
        await self.process(Message(raw, self.source, None, self.pattern), settle)

    @property
    def callback(self) -> Callable[[Msg], Awaitable[None]]:
        """The nats-py callback for a core source: the fastest path that fits."""
        return self._process_plain if self._plain else self.process_raw

    async def _process_plain(self, raw: Msg) -> None:
        # The publish-subscribe hot path: no middleware, no Message parameter, nothing
        # to settle on success. A Message is built only if the handler fails.
        if raw.reply or self.settle is None or self.settle.settles_every_success:
            await self.process_raw(raw)
            return
        if self._gate is not None and self._gate(raw.headers):
            msg: Message[Any] = Message(raw, self.source, None, self.pattern)
            await self.process(msg, self.settle, traced=True)
            return
        stats = self.stats
        stats.in_flight += 1
        started = time.perf_counter_ns()
        headers = raw.headers
        try:
            payload = self.handler.decode(
                raw.data, headers.get(CONTENT_TYPE) if headers else None
            )
            await self.handler.func(payload)
        except asyncio.CancelledError:
            stats.in_flight -= 1
            raise
        except Exception as exc:
            if isinstance(exc, DecodeError):
                exc = exc.with_subject(raw.subject)
            await self._failed(
                Message(raw, self.source, None, self.pattern), exc, started, self.settle
            )
            return
        elapsed = time.perf_counter_ns() - started
        stats.received += 1
        stats.processing_ns += elapsed
        stats.in_flight -= 1
        if stats.histogram is not None:
            stats.histogram.observe_ns(elapsed)

    async def process(
        self, msg: Message[Any], settle: Settlement, *, traced: bool | None = None
    ) -> None:
        """Run the handler on ``msg`` and settle it; never raises but cancellation.

        ``traced`` is the sampling gate's decision if already taken for this message.
        """
        stats = self.stats
        stats.in_flight += 1
        started = time.perf_counter_ns()
        if traced is None:
            traced = self._gate is not None and self._gate(msg.raw.headers)
        try:
            if traced:
                assert self._traced is not None
                result = await self._traced(msg)
            elif self._direct:
                result = await self._start_handler(msg, self._decode(msg))
            else:
                result = await self._call(msg)
        except asyncio.CancelledError:
            stats.in_flight -= 1
            raise
        except Exception as exc:
            await self._failed(msg, exc, started, settle)
            return
        elapsed = time.perf_counter_ns() - started
        stats.received += 1
        stats.processing_ns += elapsed
        stats.in_flight -= 1
        if stats.histogram is not None:
            stats.histogram.observe_ns(elapsed)
        if not (settle.settles_every_success or msg.raw.reply):
            return
        try:
            await settle.succeeded(msg, result)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s: settling a handled message on %s failed", self.label, msg.subject
            )

    async def _failed(
        self, msg: Message[Any], exc: Exception, started: int, settle: Settlement
    ) -> None:
        stats = self.stats
        elapsed = time.perf_counter_ns() - started
        stats.received += 1
        stats.errors += 1
        stats.processing_ns += elapsed
        stats.in_flight -= 1
        error = type(exc).__name__
        stats.error_classes[error] = stats.error_classes.get(error, 0) + 1
        if stats.histogram is not None:
            stats.histogram.observe_ns(elapsed)
        permanent = self._record_failure(msg, exc)
        try:
            await settle.failed(msg, exc, permanent=permanent)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s: settling a failed message on %s failed", self.label, msg.subject
            )

    def _record_failure(self, msg: Message[Any], exc: Exception) -> bool:
        stats = self.stats
        if isinstance(exc, DecodeError):
            stats.decode_errors += 1
            stats.last_error = str(exc)
            _decode_warnings.warning(self.label, "%s: %s", self.label, exc)
            return True
        if isinstance(exc, HandlerError):
            stats.last_error = f"{type(exc).__name__}: {exc}"
            return isinstance(exc, Reject)
        if isinstance(exc, ServiceError):
            # The handler chose this answer: counted, not logged as a crash.
            stats.last_error = f"{exc.code}: {exc.description}"
            return exc.code < 500
        stats.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: handler %s raised on %s",
            self.label,
            self.handler.name,
            msg.subject,
            exc_info=exc,
        )
        return False


def _deadline_from(value: str) -> float | None:
    try:
        budget_ms = int(value)
    except ValueError:
        return None
    return time.monotonic() + budget_ms / 1000


def _bind(mw: Middleware, call: Next) -> Next:
    async def step(msg: Message[Any]) -> Any:
        return await mw(msg, call)

    return step
