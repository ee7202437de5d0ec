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
    │   ├── SpecConflict               a declared spec cannot be applied to what exists
    │   ├── PublishFailed              a JetStream publish was not acknowledged
    │   └── ...                        further errors land with the patterns that need them
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
    "NatskitError",
    "NoResponders",
    "PayloadTooLarge",
    "PermissionDenied",
    "Reject",
    "RequestError",
    "RequestTimeout",
    "Retry",
    "ServerError",
    "ServerNotFound",
    "ServerStartError",
    "ServiceError",
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
