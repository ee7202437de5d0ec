"""Value objects of the streaming pattern, and their JetStream configurations.

Everything here is pure: specs are checked when they are made, turned into the JSON
configurations the JetStream API takes, and compared with what a server reports, so
reconciling can say which field differs, from what to what.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from natskit.codec import CONTENT_TYPE, decoder_for
from natskit.subjects import NAME, validate_pattern, validate_subject

__all__ = [
    "ByStartSequence",
    "ByStartTime",
    "ConsumerSpec",
    "DeliverFrom",
    "PubAck",
    "Redelivery",
    "StoredMessage",
    "StreamSpec",
    "patterns_overlap",
]

Retention = Literal["limits", "interest", "workqueue"]
Discard = Literal["old", "new"]
Storage = Literal["file", "memory"]

_NANOS = 1_000_000_000


def to_nanos(seconds: float) -> int:
    return round(seconds * _NANOS)


def check_name(kind: str, name: str) -> str:
    """A stream or consumer name: letters, digits, ``-`` and ``_`` (no dots, wildcards)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} may hold only letters, digits, '-' and '_'"
        )
    return name


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both patterns (``*`` and ``>`` wildcards)."""
    left, right = a.split("."), b.split(".")
    for index in range(min(len(left), len(right))):
        x, y = left[index], right[index]
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)


# -- streams --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """A JetStream stream as the app wants it; created or updated on start.

    ``max_msgs``, ``max_bytes``, ``max_age`` (seconds) and ``max_msg_size`` of ``None``
    mean unlimited. ``duplicate_window`` (seconds) is how long a message id is
    remembered, so a retried publish with the same id is stored once.
    """

    name: str
    subjects: tuple[str, ...]
    retention: Retention = "limits"
    max_msgs: int | None = None
    max_bytes: int | None = None
    max_age: float | None = None
    max_msg_size: int | None = None
    discard: Discard = "old"
    storage: Storage = "file"
    replicas: int = 1
    duplicate_window: float = 120.0

    def __post_init__(self) -> None:
        check_name("stream", self.name)
        if isinstance(self.subjects, str):
            object.__setattr__(self, "subjects", (self.subjects,))
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not self.subjects:
            raise ValueError(f"stream {self.name}: subjects must not be empty")
        for pattern in self.subjects:
            validate_pattern(pattern)
        for one in range(len(self.subjects)):
            for two in range(one + 1, len(self.subjects)):
                if patterns_overlap(self.subjects[one], self.subjects[two]):
                    raise ValueError(
                        f"stream {self.name}: subjects {self.subjects[one]!r} and "
                        f"{self.subjects[two]!r} overlap"
                    )
        _choice(
            self.name, "retention", self.retention, ("limits", "interest", "workqueue")
        )
        _choice(self.name, "discard", self.discard, ("old", "new"))
        _choice(self.name, "storage", self.storage, ("file", "memory"))
        for name in ("max_msgs", "max_bytes", "max_msg_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"stream {self.name}: {name} must be > 0 or None")
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError(f"stream {self.name}: max_age must be > 0 or None")
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"stream {self.name}: replicas must be in 1..5")
        if self.duplicate_window <= 0:
            raise ValueError(f"stream {self.name}: duplicate_window must be > 0")
        if self.max_age is not None and self.duplicate_window > self.max_age:
            raise ValueError(
                f"stream {self.name}: duplicate_window ({self.duplicate_window}s) must "
                f"not exceed max_age ({self.max_age}s)"
            )

    def config(self) -> dict[str, Any]:
        """The stream configuration for ``$JS.API.STREAM.CREATE``."""
        return {
            "name": self.name,
            "subjects": list(self.subjects),
            "retention": self.retention,
            "max_msgs": -1 if self.max_msgs is None else self.max_msgs,
            "max_bytes": -1 if self.max_bytes is None else self.max_bytes,
            "max_age": 0 if self.max_age is None else to_nanos(self.max_age),
            "max_msg_size": -1 if self.max_msg_size is None else self.max_msg_size,
            "discard": self.discard,
            "storage": self.storage,
            "num_replicas": self.replicas,
            "duplicate_window": to_nanos(self.duplicate_window),
        }


def _choice(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}: {name} must be one of {', '.join(allowed)}, got {value!r}"
        )


# Fields a server refuses to change in place (the others are tried, and the server's
# refusal is reported naming every field that differs).
STREAM_FIXED = ("storage",)


def stream_differences(
    wanted: Mapping[str, Any], actual: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(field, actual, wanted)`` for every field of ``wanted`` the server has otherwise."""
    changes = []
    for key, value in wanted.items():
        current = actual.get(key)
        if key == "subjects":
            if sorted(current or []) != sorted(value):
                changes.append((key, current, value))
        elif current != value:
            changes.append((key, current, value))
    return changes


def stream_fixed_conflict(
    changes: list[tuple[str, Any, Any]],
) -> tuple[str, Any, Any] | None:
    for key, old, new in changes:
        if key in STREAM_FIXED:
            return key, old, new
        if key == "retention" and "workqueue" in (old, new):
            return key, old, new
    return None


# -- consumers ------------------------------------------------------------------------


@dataclass(frozen=True)
class ByStartSequence:
    """Deliver from this stream sequence on."""

    sequence: int

    def __post_init__(self) -> None:
        if self.sequence < 1:
            raise ValueError(
                f"ByStartSequence: sequence must be >= 1, got {self.sequence}"
            )


@dataclass(frozen=True)
class ByStartTime:
    """Deliver the messages stored at or after this (timezone-aware) time."""

    time: datetime

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("ByStartTime: time must be timezone-aware (e.g. UTC)")


DeliverFrom = (
    Literal["all", "new", "last", "last_per_subject"] | ByStartSequence | ByStartTime
)


def deliver_config(deliver: DeliverFrom) -> dict[str, Any]:
    """The deliver policy fields of a consumer configuration."""
    if isinstance(deliver, ByStartSequence):
        return {
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": deliver.sequence,
        }
    if isinstance(deliver, ByStartTime):
        return {
            "deliver_policy": "by_start_time",
            "opt_start_time": rfc3339(deliver.time),
        }
    if deliver not in ("all", "new", "last", "last_per_subject"):
        raise ValueError(
            "deliver must be 'all', 'new', 'last', 'last_per_subject', "
            f"ByStartSequence(n) or ByStartTime(t), got {deliver!r}"
        )
    return {"deliver_policy": deliver}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as the server writes it (nanoseconds cut to microseconds)."""
    text = text.strip().replace("Z", "+00:00")
    main, _, zone = text.partition("+")
    if "." in main:
        head, fraction = main.split(".", 1)
        main = f"{head}.{fraction[:6]}"
    return datetime.fromisoformat(f"{main}+{zone or '00:00'}")


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    """A durable pull consumer as the app wants it; created or updated on start.

    ``max_deliver`` counts every delivery, the first included. The server is told one
    more (a spare delivery): a message whose last delivery was never settled (its
    worker died) comes back once more and goes to the dead-letter stream instead of
    being silently given up.
    """

    stream: str
    durable: str
    filter_subjects: tuple[str, ...] = ()
    deliver: DeliverFrom = "all"
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000

    def __post_init__(self) -> None:
        check_name("stream", self.stream)
        check_name("consumer", self.durable)
        if isinstance(self.filter_subjects, str):
            object.__setattr__(self, "filter_subjects", (self.filter_subjects,))
        object.__setattr__(self, "filter_subjects", tuple(self.filter_subjects))
        for pattern in self.filter_subjects:
            validate_pattern(pattern)
        deliver_config(self.deliver)
        if self.ack_wait < 0.5:
            raise ValueError(f"consumer {self.durable}: ack_wait must be >= 0.5s")
        if self.max_deliver < 1:
            raise ValueError(f"consumer {self.durable}: max_deliver must be >= 1")
        if self.max_ack_pending < 1:
            raise ValueError(f"consumer {self.durable}: max_ack_pending must be >= 1")

    def config(self) -> dict[str, Any]:
        """The consumer configuration for ``$JS.API.CONSUMER.CREATE``."""
        config: dict[str, Any] = {
            "durable_name": self.durable,
            "ack_policy": "explicit",
            **deliver_config(self.deliver),
            "ack_wait": to_nanos(self.ack_wait),
            "max_deliver": self.max_deliver + 1,
            "max_ack_pending": self.max_ack_pending,
            "replay_policy": "instant",
        }
        if len(self.filter_subjects) == 1:
            config["filter_subject"] = self.filter_subjects[0]
        elif self.filter_subjects:
            config["filter_subjects"] = list(self.filter_subjects)
        return config


CONSUMER_FIXED = ("deliver_policy", "opt_start_seq", "opt_start_time", "ack_policy")


def consumer_differences(
    wanted: Mapping[str, Any], actual: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(field, actual, wanted)`` for each field of ``wanted`` the server has otherwise."""
    changes: list[tuple[str, Any, Any]] = []
    for key, value in wanted.items():
        current = actual.get(key)
        if key == "opt_start_time" and isinstance(current, str):
            if parse_time(current) != parse_time(value):
                changes.append((key, current, value))
        elif key == "filter_subjects":
            if sorted(current or []) != sorted(value):
                changes.append((key, current, value))
        elif current != value:
            changes.append((key, current, value))
    for key in ("filter_subject", "filter_subjects"):
        if key not in wanted and actual.get(key):
            changes.append((key, actual.get(key), None))
    return changes


# -- retries --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Redelivery:
    """How long a failed message waits before its next delivery (a nak with a delay).

    After delivery ``n`` fails, the delay is ``min(cap, base * 2**(n-1))`` seconds, less
    a random share of up to ``jitter`` of it, so a burst of failures does not come back
    in lock step. A handler's ``Retry(delay=...)`` takes precedence.
    """

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ValueError(f"Redelivery.base must be > 0, got {self.base}")
        if self.cap < self.base:
            raise ValueError(
                f"Redelivery.cap ({self.cap}) must be >= base ({self.base})"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Redelivery.jitter must be in [0, 1), got {self.jitter}")

    def ceiling(self, delivery: int) -> float:
        """The longest delay after delivery number ``delivery`` (1-based) failed."""
        return min(self.cap, self.base * float(2 ** min(max(delivery, 1) - 1, 32)))

    def floor(self, delivery: int) -> float:
        """The shortest delay after delivery number ``delivery`` failed."""
        return self.ceiling(delivery) * (1 - self.jitter)

    def delay(self, delivery: int, rand: Callable[[], float] = random.random) -> float:
        """The delay after delivery number ``delivery`` failed, jitter drawn."""
        low, high = self.floor(delivery), self.ceiling(delivery)
        return low + (high - low) * rand()


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PubAck:
    """The server's acknowledgement of a JetStream publish."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, kw_only=True)
class StoredMessage:
    """A message as stored in a stream: for replay, dead letters and the CLI."""

    stream: str
    sequence: int
    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    time: datetime | None = None

    def decode(self, tp: Any) -> Any:
        """The payload decoded as ``tp`` (raises :class:`~natskit.errors.DecodeError`)."""
        return decoder_for(tp)(self.data, self.headers.get(CONTENT_TYPE))

    def __repr__(self) -> str:
        # Never the payload: it may carry personal data or secrets.
        return (
            f"StoredMessage(stream={self.stream!r}, sequence={self.sequence}, "
            f"subject={self.subject!r}, size={len(self.data)})"
        )


def stored_from_api(stream: str, message: Mapping[str, Any]) -> StoredMessage:
    """A :class:`StoredMessage` from a ``STREAM.MSG.GET`` reply's ``message`` object."""
    raw_headers = message.get("hdrs")
    headers = parse_header_block(base64.b64decode(raw_headers)) if raw_headers else {}
    data = base64.b64decode(message.get("data") or "")
    stamp = message.get("time")
    return StoredMessage(
        stream=stream,
        sequence=int(message["seq"]),
        subject=str(message["subject"]),
        data=data,
        headers=headers,
        time=parse_time(stamp) if stamp else None,
    )


def parse_header_block(block: bytes) -> dict[str, str]:
    """``NATS/1.0\\r\\nName: value\\r\\n...`` to a dict (the last of repeated names wins)."""
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers


def check_subject(subject: str) -> str:
    return validate_subject(subject)
