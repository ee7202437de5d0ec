"""The seam between natskit and nats-py: options, connecting, lifecycle logging.

Theory of operation
-------------------
:func:`connect` turns a :class:`ConnectOptions` into a live ``nats.aio.client.Client``.

* First connect: nats-py tries each server once. natskit retries the whole attempt with
  exponential backoff and full jitter until ``first_connect_timeout`` has passed, then
  raises :class:`~natskit.errors.ConnectError` naming the (redacted) servers, the number
  of attempts and the last reason. Bad credentials are not retried: they will not heal.
* Reconnect: forever by default (``max_reconnect_attempts=None``). nats-py asks natskit
  which server to try next and how long to wait (``reconnect_to_server_handler``); the
  wait grows with that server's failed attempts, ``base * 2**n`` capped at ``cap``, and
  half of it is jittered so a fleet of clients does not reconnect in lock step.
* Lifecycle events (connected, disconnected, reconnected, closed, errors) are logged on
  ``natskit.connection``. Server URLs are always redacted before they reach a log line
  or an error message: userinfo is replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client

from natskit.errors import ConnectError

__all__ = [
    "Backoff",
    "ConnectOptions",
    "TLSOptions",
    "connect",
    "redact_url",
    "servers_from_env",
]

log = logging.getLogger("natskit.connection")


def redact_url(url: str) -> str:
    """``url`` with any user, password or token replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, ""))


def servers_from_env() -> list[str]:
    """Servers named by ``NATS_URL`` (comma-separated), or an empty list."""
    raw = os.environ.get("NATS_URL", "")
    return split_servers(raw)


def split_servers(raw: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, without blanks; ``nats://`` added where missing."""
    servers = []
    for part in raw.split(","):
        server = part.strip()
        if server:
            servers.append(server if "://" in server else f"nats://{server}")
    return servers


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter: ``min(cap, base * 2**attempt)``.

    ``full_jitter`` draws uniformly from ``[0, delay]`` (retries of calls); otherwise half
    the delay is fixed and half drawn (reconnects, which should never spin at zero).
    """

    base: float = 0.25
    cap: float = 5.0
    full_jitter: bool = False

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ValueError(f"Backoff.base must be > 0, got {self.base}")
        if self.cap < self.base:
            raise ValueError(f"Backoff.cap ({self.cap}) must be >= base ({self.base})")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.cap, self.base * float(2 ** min(attempt, 32)))
        if self.full_jitter:
            return ceiling * rand()
        return ceiling / 2 + (ceiling / 2) * rand()


@dataclass(frozen=True, kw_only=True)
class TLSOptions:
    """TLS for the client connection. Server verification is on unless ``verify=False``."""

    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    verify: bool = True
    hostname: str | None = None
    handshake_first: bool = False

    def context(self) -> ssl.SSLContext:
        """An ``SSLContext`` for these options (hostname checked when verifying)."""
        ctx = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file else None
        )
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(
                str(self.cert_file), str(self.key_file) if self.key_file else None
            )
        return ctx


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """How to reach NATS. Credentials never appear in ``repr`` or logs.

    ``servers`` empty means: ``NATS_URL`` if set, else the caller decides (``natskit run``
    starts an embedded server).
    """

    servers: tuple[str, ...] = ()
    name: str | None = None
    token: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | str | None = field(default=None, repr=False)
    creds_file: Path | str | None = field(default=None, repr=False)
    tls: TLSOptions | None = None
    connect_timeout: float = 2.0
    first_connect_timeout: float = 10.0
    max_reconnect_attempts: int | None = None
    reconnect_backoff: Backoff = field(default_factory=Backoff)
    ping_interval: float = 20.0
    max_outstanding_pings: int = 3
    reconnect_buffer_bytes: int = 8 * 1024 * 1024
    drain_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.servers, str):
            object.__setattr__(self, "servers", tuple(split_servers(self.servers)))
        for name in ("connect_timeout", "first_connect_timeout", "ping_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ConnectOptions.{name} must be > 0")
        if self.max_reconnect_attempts is not None and self.max_reconnect_attempts < 0:
            raise ValueError(
                "ConnectOptions.max_reconnect_attempts must be >= 0 or None"
            )
        if self.user is not None and self.password is None:
            raise ValueError("ConnectOptions.user needs a password")
        secrets = [self.token, self.user, self.nkey_seed_file, self.creds_file]
        if sum(s is not None for s in secrets) > 1:
            raise ValueError(
                "ConnectOptions takes one of token, user/password, nkey_seed_file, creds_file"
            )

    def with_servers(self, servers: list[str] | tuple[str, ...]) -> ConnectOptions:
        """A copy pointing at other servers."""
        return replace(self, servers=tuple(servers))

    @property
    def redacted_servers(self) -> list[str]:
        return [redact_url(s) for s in self.servers]


EventCallback = Callable[[], Awaitable[None]]


@dataclass
class ConnectionEvents:
    """Counters of connection lifecycle events (read by metrics and tests)."""

    disconnects: int = 0
    reconnects: int = 0
    errors: int = 0
    slow_consumer_drops: dict[str, int] = field(default_factory=dict)
    connected: bool = False
    closing: bool = False
    last_error: str | None = None
    on_reconnected: list[EventCallback] = field(default_factory=list)
    report_interval: float = 5.0
    _reported: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def record_slow_consumer(self, subscription: str) -> None:
        """Count a message the client dropped; warn at most once per interval per subject.

        ``subscription`` is the subscribed pattern (bounded), not a concrete subject.
        """
        total = self.slow_consumer_drops.get(subscription, 0) + 1
        self.slow_consumer_drops[subscription] = total
        now = time.monotonic()
        last_time, last_total = self._reported.get(subscription, (-1e9, 0))
        if now - last_time < self.report_interval:
            return
        self._reported[subscription] = (now, total)
        log.warning(
            "slow consumer on %s: %d message(s) dropped since the last report, %d in all; "
            "the handler is slower than the publishers (raise max_concurrency or add "
            "queue group members)",
            subscription,
            total - last_total,
            total,
        )


async def connect(
    options: ConnectOptions, *, events: ConnectionEvents | None = None
) -> Client:
    """Connect with ``options``, retrying the first connect with backoff and jitter.

    Raises :class:`~natskit.errors.ConnectError` when no server accepted a connection
    within ``options.first_connect_timeout``, or at once for refused credentials.
    """
    if not options.servers:
        raise ValueError("no NATS servers given: pass servers=, --server or NATS_URL")
    events = events if events is not None else ConnectionEvents()
    kwargs = _client_kwargs(options, events)
    # nats-py retries the first connect forever when reconnects are unlimited, without
    # backoff and without a way to stop on bad credentials. So each attempt here is one
    # bounded pass over the servers; unlimited reconnects are switched on once connected.
    kwargs["max_reconnect_attempts"] = 1
    kwargs["reconnect_time_wait"] = 0
    deadline = time.monotonic() + options.first_connect_timeout
    attempt = 0
    while True:
        attempt += 1
        client = Client()
        try:
            await client.connect(**kwargs)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            reason = events.last_error or _describe(exc)
            await _discard(client)
            if _is_auth_failure(reason) or time.monotonic() >= deadline:
                raise ConnectError(
                    options.redacted_servers, reason, attempts=attempt
                ) from None
            delay = min(
                options.reconnect_backoff.delay(attempt - 1),
                max(0.0, deadline - time.monotonic()),
            )
            log.warning(
                "connect to %s failed (attempt %d: %s); retrying in %.2fs",
                ", ".join(options.redacted_servers),
                attempt,
                reason,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        client.options["max_reconnect_attempts"] = (
            -1
            if options.max_reconnect_attempts is None
            else options.max_reconnect_attempts
        )
        events.connected = True
        events.closing = False
        events.last_error = None
        log.info(
            "connected to %s (client name %s)",
            redact_url(client.connected_url.geturl()) if client.connected_url else "?",
            options.name,
        )
        return client


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in text:
        return "connection refused"
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return "timed out"
    return _scrub(text)


def _scrub(text: str) -> str:
    # nats-py error texts can quote a URL; never let userinfo through.
    words = [redact_url(w) if "://" in w else w for w in text.split()]
    return " ".join(words)


def _is_auth_failure(reason: str) -> bool:
    lowered = reason.lower()
    return "authorization" in lowered or "authentication" in lowered


async def _discard(client: Client) -> None:
    try:
        await client.close()
    except Exception:  # a half-open client may fail to close; nothing to keep
        log.debug("closing a failed client raised", exc_info=True)


def _client_kwargs(options: ConnectOptions, events: ConnectionEvents) -> dict[str, Any]:
    backoff = options.reconnect_backoff

    def choose_server(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        # The least-tried server first; ties broken at random so clients spread out.
        fewest = min(s.reconnects for s in servers)
        candidates = [s for s in servers if s.reconnects == fewest]
        chosen = random.choice(candidates)
        delay = 0.0 if chosen.reconnects == 0 and fewest == 0 else backoff.delay(fewest)
        return chosen, delay

    async def on_error(exc: Exception) -> None:
        events.errors += 1
        if isinstance(exc, nats.errors.SlowConsumerError):
            events.record_slow_consumer(str(getattr(exc.sub, "subject", exc.subject)))
            return
        events.last_error = _describe(exc)
        if events.connected:
            log.warning("connection error: %s", events.last_error)

    async def on_disconnected() -> None:
        if events.closing:
            return
        events.disconnects += 1
        log.warning("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        events.reconnects += 1
        url = client_url(options)
        log.info("reconnected to NATS%s", f" at {url}" if url else "")
        for callback in list(events.on_reconnected):
            await callback()

    async def on_closed() -> None:
        log.info("connection to NATS closed")

    kwargs: dict[str, Any] = {
        "servers": list(options.servers),
        "name": options.name,
        "connect_timeout": options.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": (
            -1
            if options.max_reconnect_attempts is None
            else options.max_reconnect_attempts
        ),
        "reconnect_to_server_handler": choose_server,
        "ping_interval": options.ping_interval,
        "max_outstanding_pings": options.max_outstanding_pings,
        "pending_size": options.reconnect_buffer_bytes,
        "drain_timeout": options.drain_timeout,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "closed_cb": on_closed,
    }
    if options.token is not None:
        kwargs["token"] = options.token
    if options.user is not None:
        kwargs["user"] = options.user
        kwargs["password"] = options.password
    if options.nkey_seed_file is not None:
        kwargs["nkeys_seed"] = str(options.nkey_seed_file)
    if options.creds_file is not None:
        kwargs["user_credentials"] = str(options.creds_file)
    if options.tls is not None:
        kwargs["tls"] = options.tls.context()
        kwargs["tls_hostname"] = options.tls.hostname
        kwargs["tls_handshake_first"] = options.tls.handshake_first
    return kwargs


def client_url(options: ConnectOptions) -> str:
    """A redacted label for the servers of ``options`` (for log lines)."""
    return ", ".join(options.redacted_servers)
