"""``Message[T]``: what a handler may ask for besides its decoded payload."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["Delivery", "Message"]

T = TypeVar("T")

_NO_HEADERS: Mapping[str, str] = {}
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a JetStream message came from and how often it was delivered."""

    stream: str
    consumer: str
    stream_sequence: int
    consumer_sequence: int
    num_delivered: int
    num_pending: int
    timestamp_ns: int


class Message(Generic[T]):
    """A received message: subject, headers, reply subject and the decoded payload.

    Handlers receive one when they declare a parameter annotated ``Message[T]``. The
    payload is decoded once, before the handler runs; ``data`` holds the raw bytes.
    ``delivery`` is set for messages from JetStream consumers, ``None`` otherwise.
    ``pattern`` is what the handler was declared on (a subject pattern, or
    ``stream/durable``), for labels that must not hold concrete subjects.
    """

    __slots__ = ("_payload", "delivery", "pattern", "raw", "source")

    def __init__(
        self,
        raw: Msg,
        source: str,
        delivery: Delivery | None = None,
        pattern: str = "",
    ) -> None:
        self.raw = raw
        self.source = source
        self.delivery = delivery
        self.pattern = pattern
        self._payload: Any = _UNSET

    @property
    def subject(self) -> str:
        return str(self.raw.subject)

    @property
    def reply(self) -> str | None:
        return self.raw.reply or None

    @property
    def headers(self) -> Mapping[str, str]:
        return self.raw.headers or _NO_HEADERS

    @property
    def data(self) -> bytes:
        return bytes(self.raw.data)

    @property
    def payload(self) -> T:
        """The decoded payload (set by the pipeline before the handler runs)."""
        if self._payload is _UNSET:
            raise RuntimeError("the payload of this message has not been decoded yet")
        payload: T = self._payload
        return payload

    def __repr__(self) -> str:
        # Never the payload: it may carry personal data or secrets.
        size = len(self.raw.data)
        return f"Message(subject={self.subject!r}, source={self.source!r}, size={size})"
