"""The one exception tree of natskit.

Every error natskit raises on purpose derives from :class:`NatskitError`. Errors of nats-py
are translated where natskit calls it (``connection.py`` and the pattern modules), chained
with ``raise ... from`` so the original stays visible in tracebacks.

Misuse of the API at declaration time (a bad subject, a handler without a usable
annotation, an option out of range) raises the builtin ``ValueError`` or ``TypeError``,
with a message naming what was wrong: those are programming errors, not runtime trouble.

::

    NatskitError
    ├── ServerError                    the embedded nats-server
    │   ├── ServerNotFound             no binary in the wheel, on PATH or in NATSKIT_SERVER_BIN
    │   └── ServerStartError           the process exited or never became ready
    ├── ConnectError                   could not connect (after the configured retries)
    ├── ConnectionClosed               the connection was closed while an operation waited
    ├── PermissionDenied               the server refused a publish or subscribe on a subject
    ├── PayloadTooLarge                a message exceeds the server's max payload
    ├── CodecError                     a value that cannot be encoded, or bytes that cannot
    │   └── DecodeError                be decoded (carries the subject, never the payload)
    ├── RequestError                   request-reply calls
    │   ├── NoResponders               nobody listens on the subject (server status 503)
    │   ├── RequestTimeout             no reply within the timeout or deadline
    │   ├── CircuitOpen                the breaker for the subject is open; the call was not made
    │   └── ServiceError               the responder replied with an error (code, description)
    ├── StreamError                    JetStream streams and consumers
    │   ├── JetStreamApiError          the JetStream API refused a request (code, err_code)
    │   ├── StreamNotFound             no stream of that name (or consumer on it)
    │   ├── SpecConflict               a declared spec cannot be applied to what exists
    │   ├── SubjectsOverlap            two streams would claim the same subjects
    │   └── PublishFailed              a JetStream publish was not acknowledged
    └── HandlerError                   raised *by handlers* to steer settlement
        ├── Retry                      retry this message (after a delay where the source can)
        └── Reject                     permanent failure: never retry; dead-letter where possible
"""

from __future__ import annotations

__all__ = [
    "CircuitOpen",
    "CodecError",
    "ConnectError",
    "ConnectionClosed",
    "DecodeError",
    "HandlerError",
    "JetStreamApiError",
    "NatskitError",
    "NoResponders",
    "PayloadTooLarge",
    "PermissionDenied",
    "PublishFailed",
    "Reject",
    "RequestError",
    "RequestTimeout",
    "Retry",
    "ServerError",
    "ServerNotFound",
    "ServerStartError",
    "ServiceError",
    "SpecConflict",
    "StreamError",
    "StreamNotFound",
    "SubjectsOverlap",
]


class NatskitError(Exception):
    """Root of every error natskit raises on purpose."""


class ServerError(NatskitError):
    """The embedded nats-server could not be found, started or stopped."""


class ServerNotFound(ServerError):
    """No nats-server binary was found in any of the places natskit looks."""


class ServerStartError(ServerError):
    """The server process exited early or did not become ready in time."""

    def __init__(self, reason: str, *, log_path: str | None = None) -> None:
        self.reason = reason
        self.log_path = log_path
        message = f"nats-server did not start: {reason}"
        if log_path:
            message += f" (server log: {log_path})"
        super().__init__(message)


class ConnectError(NatskitError):
    """No connection could be made to any of the given servers."""

    def __init__(self, servers: list[str], reason: str, *, attempts: int) -> None:
        self.servers = servers
        self.reason = reason
        self.attempts = attempts
        super().__init__(
            f"could not connect to {', '.join(servers)} after {attempts} attempt(s): {reason}"
        )


class ConnectionClosed(NatskitError):
    """The connection is closed (or draining) and cannot carry this operation."""


class PermissionDenied(NatskitError):
    """The server refused an operation on a subject for lack of permission."""

    def __init__(self, operation: str, subject: str) -> None:
        self.operation = operation
        self.subject = subject
        super().__init__(f"permission denied to {operation} on {subject!r}")


class PayloadTooLarge(NatskitError):
    """A message is larger than the server's ``max_payload``."""

    def __init__(self, subject: str, size: int, limit: int) -> None:
        self.subject = subject
        self.size = size
        self.limit = limit
        super().__init__(
            f"message on {subject!r} is {size} bytes, over the server's max payload of "
            f"{limit} bytes"
        )


class CodecError(NatskitError):
    """A value could not be encoded, or bytes could not be decoded."""


class DecodeError(CodecError):
    """A payload did not decode to the handler's type.

    Carries the subject, the expected type and the decoder's reason; never the payload,
    which may hold personal data or credentials.
    """

    def __init__(self, reason: str, *, subject: str = "", expected: str = "") -> None:
        self.reason = reason
        self.subject = subject
        self.expected = expected
        where = f" on {subject!r}" if subject else ""
        into = f" into {expected}" if expected else ""
        super().__init__(f"payload{where} did not decode{into}: {reason}")

    def with_subject(self, subject: str) -> DecodeError:
        """The same error, placed on a subject (codecs do not know where bytes came from)."""
        return DecodeError(self.reason, subject=subject, expected=self.expected)


class RequestError(NatskitError):
    """A request-reply call did not produce a reply value."""

    def __init__(self, message: str, *, subject: str) -> None:
        self.subject = subject
        super().__init__(message)


class NoResponders(RequestError):
    """Nobody is subscribed to the subject (the server said so at once)."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders on {subject!r}", subject=subject)


class RequestTimeout(RequestError):
    """No reply arrived within the timeout (or the caller's deadline)."""

    def __init__(self, subject: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"no reply on {subject!r} within {timeout:.3f}s", subject=subject
        )


class CircuitOpen(RequestError):
    """The circuit breaker for the subject is open: the call was not made."""

    def __init__(self, subject: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"circuit open for {subject!r}; next probe in {retry_after:.2f}s",
            subject=subject,
        )


class ServiceError(RequestError):
    """An error reply of the services protocol: a code and a description.

    Raise it from an endpoint handler to answer with that code (4xx: the caller's fault,
    not retried and not counted against the responder's health; 5xx: the responder's).
    Callers receive it, decoded from the ``Nats-Service-Error`` headers.
    """

    def __init__(self, code: int, description: str, *, subject: str = "") -> None:
        self.code = code
        self.description = description
        where = f" from {subject!r}" if subject else ""
        super().__init__(f"service error {code}{where}: {description}", subject=subject)


class HandlerError(NatskitError):
    """Raised by a handler to tell the source how to settle the message.

    These are not trouble in natskit: they are the handler's decision, so they are counted
    but not logged with a traceback.
    """


class Retry(HandlerError):
    """Retry this message. Sources with redelivery honour ``delay`` (seconds) if given."""

    def __init__(
        self, reason: str = "retry requested", *, delay: float | None = None
    ) -> None:
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class Reject(HandlerError):
    """A permanent failure: never retry this message; dead-letter it where possible."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StreamError(NatskitError):
    """Trouble with JetStream streams, consumers or publishing."""


class JetStreamApiError(StreamError):
    """The JetStream API answered a request with an error."""

    def __init__(
        self, operation: str, description: str, *, code: int = 0, err_code: int = 0
    ) -> None:
        self.operation = operation
        self.description = description
        self.code = code
        self.err_code = err_code
        super().__init__(
            f"JetStream {operation} failed: {description} (code {code}, err_code "
            f"{err_code})"
        )


class StreamNotFound(StreamError):
    """The stream (or the consumer on it) does not exist."""

    def __init__(self, stream: str, consumer: str | None = None) -> None:
        self.stream = stream
        self.consumer = consumer
        what = f"consumer {consumer!r} on stream {stream!r}" if consumer else None
        super().__init__(f"{what or f'stream {stream!r}'} does not exist")


class SpecConflict(StreamError):
    """A declared stream or consumer differs from the server's in a field it cannot change.

    Carries the field, the value on the server (``old``) and the declared one (``new``).
    """

    def __init__(
        self,
        field: str,
        old: object,
        new: object,
        *,
        stream: str,
        consumer: str | None = None,
        reason: str = "",
    ) -> None:
        self.field = field
        self.old = old
        self.new = new
        self.stream = stream
        self.consumer = consumer
        self.reason = reason
        what = f"consumer {consumer!r} on stream {stream!r}" if consumer else None
        because = f": {reason}" if reason else ""
        super().__init__(
            f"{what or f'stream {stream!r}'}: field {field!r} is {old!r} on the server "
            f"and {new!r} in the declaration, and cannot be changed in place{because} "
            "(delete and recreate it, or declare the existing value)"
        )


class SubjectsOverlap(StreamError):
    """A stream's subjects overlap those of another stream."""

    def __init__(
        self, stream: str, subject: str, other: str, other_subject: str
    ) -> None:
        self.stream = stream
        self.subject = subject
        self.other = other
        self.other_subject = other_subject
        super().__init__(
            f"stream {stream!r}: subject {subject!r} overlaps {other_subject!r} of "
            f"stream {other!r}"
        )


class PublishFailed(StreamError):
    """A JetStream publish was not acknowledged (after its retries, where allowed)."""

    def __init__(
        self, subject: str, reason: str, *, msg_id: str | None = None, attempts: int = 1
    ) -> None:
        self.subject = subject
        self.reason = reason
        self.msg_id = msg_id
        self.attempts = attempts
        ident = f" (msg id {msg_id})" if msg_id else ""
        super().__init__(
            f"publish on {subject!r}{ident} failed after {attempts} attempt(s): {reason}"
        )
