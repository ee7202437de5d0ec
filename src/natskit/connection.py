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
* Each attempt runs as a task that is abandoned at the deadline or as soon as nats-py
  reports a refusal that retrying cannot heal (credentials refused, a TLS certificate
  that does not verify): nats-py can otherwise hang after a failed TLS handshake. The
  refusal is named in the error: "authorization violation", "TLS certificate verify
  failed", "TLS hostname mismatch", "TLS required by the server", "TLS client
  certificate required".
* Lifecycle events (connected, disconnected, reconnected, closed, errors) are logged on
  ``natskit.connection``. Server URLs are always redacted before they reach a log line
  or an error message: userinfo is replaced by ``***``. Tokens, passwords, NKey seeds
  and JWTs are handed to nats-py only; they never appear in a log line, an error or a
  repr.
* Permission violations arrive asynchronously (the server answers ``-ERR`` and keeps
  the connection). They are counted per operation and subject in
  :class:`ConnectionEvents` and logged at WARNING; after a round trip to the server,
  :meth:`ConnectionEvents.take_denial` tells a caller whether it refused an operation.
  nats-py lower-cases the server's error text, so subjects are compared without case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
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
    "options_with_security",
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

    def __repr__(self) -> str:
        # Server URLs can carry user:password@ or a token: show them redacted.
        shown = [
            f"{f.name}={self.redacted_servers if f.name == 'servers' else getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr
        ]
        return f"ConnectOptions({', '.join(shown)})"

    def with_servers(self, servers: list[str] | tuple[str, ...]) -> ConnectOptions:
        """A copy pointing at other servers."""
        return replace(self, servers=tuple(servers))

    @property
    def redacted_servers(self) -> list[str]:
        return [redact_url(s) for s in self.servers]


#: Environment variables read by :func:`options_with_security`.
SECURITY_ENV = {
    "token": "NATS_TOKEN",
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "nkey_seed_file": "NATS_NKEY",
    "creds_file": "NATS_CREDS",
    "ca_file": "NATS_CA",
    "cert_file": "NATS_CERT",
    "key_file": "NATS_KEY",
}
_AUTH_FIELDS = ("token", "user", "password", "nkey_seed_file", "creds_file")
_TLS_FIELDS = ("ca_file", "cert_file", "key_file")


def options_with_security(
    options: ConnectOptions,
    *,
    given: Mapping[str, str | None] | None = None,
    env: Mapping[str, str] | None = None,
) -> ConnectOptions:
    """``options`` with credentials and TLS files from ``given`` values (command-line
    flags), else from the environment (:data:`SECURITY_ENV`), else as they were.

    Keys of ``given`` are ``token``, ``user``, ``password``, ``nkey_seed_file``,
    ``creds_file``, ``ca_file``, ``cert_file`` and ``key_file``. Credentials come as a
    whole from the first source naming any (flags, then environment, then code), except
    that a password may come from ``NATS_PASSWORD`` for a ``user`` given as a flag, so
    it stays off the command line. TLS files are taken one by one in the same order;
    naming any of them turns TLS on with server verification.
    """
    given = {k: v for k, v in (given or {}).items() if v}
    env = os.environ if env is None else env
    from_env = {k: env[name] for k, name in SECURITY_ENV.items() if env.get(name)}
    changes: dict[str, Any] = {}
    for source in (given, from_env):
        auth = {k: source[k] for k in _AUTH_FIELDS if k in source}
        if auth:
            if "user" in auth and "password" not in auth and "password" in from_env:
                auth["password"] = from_env["password"]
            changes = dict.fromkeys(_AUTH_FIELDS) | auth
            break
    tls = options.tls or TLSOptions()
    files: dict[str, Any] = {
        k: given.get(k) or from_env.get(k) or getattr(tls, k) for k in _TLS_FIELDS
    }
    if any(files[k] != getattr(tls, k) for k in _TLS_FIELDS):
        changes["tls"] = replace(tls, **files)
    return replace(options, **changes) if changes else options


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
    client: Any = field(default=None, repr=False)  # the client these events are about
    last_error: str | None = None
    on_reconnected: list[EventCallback] = field(default_factory=list)
    report_interval: float = 5.0
    permission_denials: dict[tuple[str, str], int] = field(default_factory=dict)
    unreported_denials: set[tuple[str, str]] = field(default_factory=set)
    refused: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _reported: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def record_denial(self, operation: str, subject: str) -> None:
        """Count a permission violation reported by the server (``subject`` as it
        arrived, lower-cased by nats-py)."""
        key = (operation, subject.lower())
        if key not in self.permission_denials and len(self.permission_denials) >= 1024:
            key = (operation, "<other subjects>")  # bounded: subjects can be unique
        self.permission_denials[key] = self.permission_denials.get(key, 0) + 1
        if len(self.unreported_denials) < 1024:
            self.unreported_denials.add(key)
        # At most one line per operation and subject per report interval.
        now = time.monotonic()
        label = f"denied {key[0]} {key[1]}"
        if now - self._reported.get(label, (-1e9, 0))[0] >= self.report_interval:
            self._reported[label] = (now, 0)
            log.warning(
                "permission denied: %s on %r refused by the server (%d so far)",
                key[0],
                key[1],
                self.permission_denials[key],
            )

    def denials(self, operation: str, subject: str) -> int:
        """How often the server refused ``operation`` (``publish`` or ``subscribe``) on
        ``subject`` on this connection so far."""
        return self.permission_denials.get((operation, subject.lower()), 0)

    def take_denial(self, operation: str, subject: str) -> bool:
        """Whether a refusal of ``operation`` on ``subject`` awaits being raised to a
        caller; it is then taken, so each refusal is raised once."""
        key = (operation, subject.lower())
        if key in self.unreported_denials:
            self.unreported_denials.discard(key)
            return True
        return False

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
        events.last_error = None
        # A fresh event per attempt: an App can be started again in another loop.
        events.refused = asyncio.Event()
        client = events.client = Client()
        reason = await _attempt(client, kwargs, events, deadline)
        if reason is not None:
            # nats-py keeps the server's INFO only privately; it tells what TLS wants.
            info = getattr(client, "_server_info", None) or {}
            reason = _explain(reason, options, info)
            await _discard(client)
            if _is_refusal(reason) or time.monotonic() >= deadline:
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


async def _attempt(
    client: Client, kwargs: dict[str, Any], events: ConnectionEvents, deadline: float
) -> str | None:
    """One pass of nats-py over the servers: ``None`` once connected, else the reason."""
    task = asyncio.ensure_future(client.connect(**kwargs))
    refused = asyncio.ensure_future(events.refused.wait())
    # At least one connect timeout per attempt, so a short first_connect_timeout does
    # not cut a handshake that is still in progress.
    budget = max(deadline - time.monotonic(), float(kwargs["connect_timeout"]) + 0.5)
    try:
        await asyncio.wait(
            {task, refused}, timeout=budget, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refused.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled() and task.exception() is None:
        return None
    exc = task.exception() if task.done() and not task.cancelled() else None
    return events.last_error or (_describe(exc) if exc is not None else "timed out")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        return _describe_tls(exc, text)
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in text:
        return "connection refused"
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return "timed out"
    if isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in text.lower()
    ):
        return "authorization violation: the server refused the credentials"
    return _scrub(text)


def _describe_tls(exc: ssl.SSLError, text: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or text
        if exc.verify_code == _X509_HOSTNAME_MISMATCH or "mismatch" in detail:
            return f"TLS hostname mismatch: {detail}"
        return f"TLS certificate verify failed: {detail}"
    if _CERT_REQUIRED.search(text):
        return (
            "TLS client certificate required: the server verifies clients and refused "
            "the connection without a valid client certificate"
        )
    return f"TLS error: {_scrub(text)}"


# X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH in OpenSSL.
_X509_HOSTNAME_MISMATCH = 62
_CERT_REQUIRED = re.compile(r"certificate.required|bad.certificate", re.IGNORECASE)
_PERMISSION = re.compile(
    r"permissions violation for (publish|subscription) to \"?([^\"\s]+)\"?"
)


def _explain(reason: str, options: ConnectOptions, info: Mapping[str, Any]) -> str:
    """``reason``, saying so when the server demanded TLS that was not configured."""
    plain = options.tls is None and not any(
        s.lower().startswith("tls://") for s in options.servers
    )
    no_cert = options.tls is None or not options.tls.cert_file
    if info.get("tls_verify") and no_cert and not _is_refusal(reason):
        # With TLS 1.3 the refusal of a missing client certificate often shows up as
        # a broken pipe or a reset, before the server's alert is read.
        return (
            "TLS client certificate required: the server verifies clients and no "
            f"client certificate was given ({reason})"
        )
    if plain and reason.startswith("TLS certificate verify failed"):
        return (
            "TLS required by the server, and no TLS options were given: its "
            f"certificate did not verify against the system CAs ({reason}); give the "
            "CA with TLSOptions(ca_file=...), --tls-ca or NATS_CA"
        )
    return reason


def _is_refusal(reason: str) -> bool:
    """A failure that retrying cannot heal: credentials or TLS trust."""
    lowered = reason.lower()
    return (
        "authorization" in lowered
        or "authentication" in lowered
        or lowered.startswith("tls ")
    )


def _scrub(text: str) -> str:
    # nats-py error texts can quote a URL; never let userinfo through.
    words = [redact_url(w) if "://" in w else w for w in text.split()]
    return " ".join(words)


async def _discard(client: Client) -> None:
    try:
        # A client whose TLS handshake failed can wait forever for its transport.
        await asyncio.wait_for(client.close(), timeout=1.0)
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
        violation = _PERMISSION.search(str(exc))
        if violation is not None:
            operation = "publish" if violation[1] == "publish" else "subscribe"
            events.record_denial(operation, violation[2])
            return
        if events.refused.is_set():
            return  # keep the refusal as the reason, not the reset that follows it
        events.last_error = _describe(exc)
        if _is_refusal(events.last_error):
            events.refused.set()
        if events.connected:
            log.warning("connection error: %s", events.last_error)

    async def on_disconnected() -> None:
        client = events.client
        if events.closing or (client is not None and client.is_closed):
            return  # a close someone asked for, not trouble
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
