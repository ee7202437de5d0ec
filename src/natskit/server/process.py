"""One ``nats-server`` process, started and stopped from Python.

Theory of operation
-------------------

An :class:`EmbeddedServer` owns at most one child process at a time and moves between
three states: *stopped* (no process), *running* and *paused* (``SIGSTOP``-ed).

- Ports are chosen once, when the object is built (a free port is found by binding to
  port 0 and closing the socket), and never change: a restart comes back on the same
  addresses, so clients reconnect to the URL they already have.
- The *work directory* holds the config file (mode 0600: it may carry credentials), the
  log file (the server's stdout and stderr) and, unless ``store_dir`` is given, the
  JetStream store. It is created on the first start and kept across restarts.
- ``start()`` writes the config, spawns the process in its own session (so a Ctrl-C in
  the terminal reaches the application, which then stops the server in order), and polls
  every 20 ms until the client port answers with ``INFO`` and, with monitoring on, the
  monitor's ``/healthz`` says ok. An early exit or the ready timeout raises
  :class:`~natskit.errors.ServerStartError` with the telling log line and the log path.
- ``stop()`` sends ``SIGTERM`` (after ``SIGCONT`` if paused), escalates to ``SIGKILL``
  after the timeout, then removes the work directory if this object created it and
  ``keep_store`` is false. ``kill()`` sends ``SIGKILL`` and removes nothing. Signals go
  to the child's own PID, never to a process name.
- ``restart()`` stops a running process (keeping the files) and starts again with the
  same ports, work directory and store.

Credentials (token, user, password, the users of ``users`` and ``accounts``) are written
into the config file only: they never appear in a log line, a repr or an error message.
TLS (:class:`ServerTLS`) and authentication are for testing secured setups locally; the
server still listens on loopback unless ``host`` says otherwise.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from natskit.errors import ServerStartError
from natskit.server.binary import find_server_binary

__all__ = [
    "Account",
    "EmbeddedServer",
    "Permissions",
    "ServerOptions",
    "ServerTLS",
    "User",
]

logger = logging.getLogger("natskit.server")

_POLL_INTERVAL = 0.02
_CONFIG_NAME = "nats-server.conf"
_LOG_NAME = "nats-server.log"
# An opener that ignores *_proxy environment variables: probes go to loopback only.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ ")


@dataclass(frozen=True, kw_only=True)
class ServerTLS:
    """TLS on the client port: the server's certificate and key, and, with
    ``verify_clients``, the CA that client certificates must chain to (mutual TLS)."""

    cert_file: Path | str
    key_file: Path | str
    ca_file: Path | str | None = None
    verify_clients: bool = False
    handshake_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.verify_clients and self.ca_file is None:
            raise ValueError("ServerTLS.verify_clients needs ca_file")


@dataclass(frozen=True, kw_only=True)
class Permissions:
    """Subjects a user may publish and subscribe to (``None``: no rule of that kind).

    Wildcards are allowed; ``deny`` wins over ``allow``. ``allow_responses`` lets the
    user reply to requests it received even where ``publish`` would forbid it.
    """

    publish_allow: tuple[str, ...] | None = None
    publish_deny: tuple[str, ...] | None = None
    subscribe_allow: tuple[str, ...] | None = None
    subscribe_deny: tuple[str, ...] | None = None
    allow_responses: bool = False


@dataclass(frozen=True, kw_only=True)
class User:
    """One user of the server: a name and password, or an NKey public key.

    ``nkey`` is the user's *public* key (``U...``); the seed stays with the client.
    """

    name: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    nkey: str | None = None
    permissions: Permissions | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.nkey is None):
            raise ValueError("User takes a name (with a password) or an nkey")
        if self.name is not None and self.password is None:
            raise ValueError("User with a name needs a password")
        if self.nkey is not None and not self.nkey.startswith("U"):
            raise ValueError("User.nkey must be a user public key (starting with U)")


@dataclass(frozen=True, kw_only=True)
class Account:
    """An isolated subject space with its own users; nothing crosses accounts unless
    exported and imported, which natskit does not configure."""

    name: str
    users: tuple[User, ...] = ()
    jetstream: bool = False


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """How to run one ``nats-server``.

    ``port=None`` and the monitoring port are chosen free at construction of the server
    object and kept for its lifetime. ``store_dir=None`` puts the JetStream store into a
    fresh temporary directory that :meth:`EmbeddedServer.stop` removes, unless
    ``keep_store`` is true. ``sync_always`` makes the server fsync each stored message
    before acknowledging it; turning it off leaves the server's default (periodic
    fsync), which acknowledges data that a power loss can still lose.
    ``extra_config`` is appended verbatim to the generated config file.

    Authentication is one of: ``token``; ``user`` and ``password``; ``users`` (several
    users, each with optional permissions); ``accounts`` (several isolated accounts).
    ``tls`` turns on TLS for client connections.
    """

    host: str = "127.0.0.1"
    port: int | None = None
    store_dir: Path | None = None
    keep_store: bool = False
    jetstream: bool = True
    sync_always: bool = True
    max_payload: int | None = None
    monitor: bool = True
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    users: tuple[User, ...] = ()
    accounts: tuple[Account, ...] = ()
    tls: ServerTLS | None = None
    extra_config: str = ""
    ready_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.ready_timeout <= 0:
            raise ValueError(f"ready_timeout must be > 0, got {self.ready_timeout}")
        if self.max_payload is not None and self.max_payload <= 0:
            raise ValueError(f"max_payload must be > 0, got {self.max_payload}")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password must be given together")
        schemes = [self.token, self.user, self.users or None, self.accounts or None]
        if sum(s is not None for s in schemes) > 1:
            raise ValueError(
                "authentication takes one of token, user/password, users, accounts"
            )
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError(f"account names must be unique, got {names}")


@dataclass(frozen=True, kw_only=True)
class _ClusterConfig:
    """Route clustering for one node of a :class:`~natskit.server.LocalCluster`."""

    name: str
    port: int
    routes: tuple[str, ...]
    work_dir: Path


class EmbeddedServer:
    """A ``nats-server`` child process with a synchronous lifecycle.

    Usable as a context manager (``with EmbeddedServer() as server: ...``); from async
    code call the lifecycle methods through ``asyncio.to_thread``. All methods are safe
    to call from several threads.
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        cluster: _ClusterConfig | None = None,
    ) -> None:
        self._options = options or ServerOptions()
        self._cluster = cluster
        host = self._options.host
        self._client_port = self._options.port or free_port(host)
        self._monitor_port = free_port(host) if self._options.monitor else None
        self._work_dir: Path | None = cluster.work_dir if cluster else None
        self._owns_work_dir = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0  # where this run's output starts in the appended log
        self._paused = False
        self._lock = threading.RLock()

    # -- properties -------------------------------------------------------------------

    @property
    def options(self) -> ServerOptions:
        """The options this server was built with."""
        return self._options

    @property
    def url(self) -> str:
        """The client URL, ``nats://HOST:PORT`` (never with credentials)."""
        return f"nats://{_host_port(self._options.host, self._client_port)}"

    @property
    def client_port(self) -> int:
        """The client port, fixed for the lifetime of this object."""
        return self._client_port

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring base URL, or ``None`` when monitoring is off."""
        if self._monitor_port is None:
            return None
        return f"http://{_host_port(self._options.host, self._monitor_port)}"

    @property
    def store_dir(self) -> Path:
        """The directory given to the server as its JetStream ``store_dir``.

        The server keeps its files in a ``jetstream`` folder below it.
        """
        if self._options.store_dir is not None:
            return Path(self._options.store_dir)
        return self._ensure_work_dir() / "store"

    @property
    def log_path(self) -> Path:
        """The file receiving the server's stdout and stderr."""
        return self._ensure_work_dir() / _LOG_NAME

    @property
    def config_path(self) -> Path:
        """The generated config file (mode 0600)."""
        return self._ensure_work_dir() / _CONFIG_NAME

    @property
    def pid(self) -> int | None:
        """The PID of the running (or paused) process, else ``None``."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        """Whether the process exists and has not exited (a paused one counts)."""
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"<EmbeddedServer {self.url} {state}>"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it is ready to serve clients.

        Raises :class:`~natskit.errors.ServerNotFound` without a binary, and
        :class:`~natskit.errors.ServerStartError` (with the log path) when the process
        exits early or is not ready within ``ready_timeout``. Starting a running
        server is an error (``RuntimeError``).
        """
        with self._lock:
            if self.running:
                raise RuntimeError(f"{self!r} is already running")
            binary = find_server_binary()
            self.store_dir.mkdir(parents=True, exist_ok=True)
            _write_private(self.config_path, self._render_config())
            self._spawn(binary)
            self._wait_ready()
            logger.info(
                "nats-server started: %s, store dir %s, log file %s",
                self.url,
                self.store_dir,
                self.log_path,
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: ``SIGTERM``, then ``SIGKILL`` after ``timeout`` seconds.

        Removes the work directory (config, log and a temporary store) if this object
        created it and ``keep_store`` is false; a later :meth:`start` then begins
        with an empty store. Calling it again, or on a server never started, does
        nothing.
        """
        with self._lock:
            self._terminate(timeout)
            if self._owns_work_dir and not self._options.keep_store and self._work_dir:
                shutil.rmtree(self._work_dir, ignore_errors=True)
                self._work_dir = None
                self._owns_work_dir = False

    def kill(self) -> None:
        """Kill the process with ``SIGKILL`` (by its PID) and wait; keep all files."""
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
                logger.info("nats-server killed: %s (pid %d)", self.url, process.pid)
            self._reap()

    def pause(self) -> None:
        """Freeze the process (``SIGSTOP``): it keeps its sockets, answers nothing."""
        with self._lock:
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Let a paused process continue (``SIGCONT``)."""
        with self._lock:
            self._signal(signal.SIGCONT)
            self._paused = False

    def restart(self, timeout: float = 5.0) -> None:
        """Start again on the same ports, work directory and store.

        A running server is stopped first (as by :meth:`stop`, but keeping its files).
        """
        with self._lock:
            self._terminate(timeout)
            self.start()

    def wait_healthy(self, timeout: float, *, query: str = "") -> None:
        """Poll the monitor's ``/healthz`` (with ``query``) until it reports ok.

        Raises :class:`~natskit.errors.ServerStartError` after ``timeout`` seconds or if
        the process exits. Without monitoring only the client port is checked.
        """
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise self._start_error(f"process exited with code {code}")
            if _answers_info(self._options.host, self._client_port) and (
                self.monitor_url is None or healthz(self.monitor_url, query)
            ):
                return
            if time.monotonic() >= deadline:
                raise self._start_error(f"not ready within {timeout:g}s")
            time.sleep(_POLL_INTERVAL)

    # -- internals --------------------------------------------------------------------

    def _ensure_work_dir(self) -> Path:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="natskit-server-"))
            self._owns_work_dir = True
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def _render_config(self) -> str:
        return render_config(
            self._options,
            client_port=self._client_port,
            monitor_port=self._monitor_port,
            store_dir=self.store_dir,
            cluster=self._cluster,
        )

    def _spawn(self, binary: str) -> None:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._log_offset = self._log_file.tell()
        try:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self._ensure_work_dir(),
                start_new_session=True,
            )
        except OSError as exc:
            self._reap()
            raise ServerStartError(
                f"could not run {binary}: {exc.strerror}", log_path=str(self.log_path)
            ) from exc
        self._paused = False
        _live_servers.add(self)

    def _wait_ready(self) -> None:
        # A cluster node's full health needs a meta leader, which needs a quorum of
        # nodes; LocalCluster waits for that once all of them run.
        query = "?js-server-only=true" if self._cluster else ""
        try:
            self.wait_healthy(self._options.ready_timeout, query=query)
        except ServerStartError:
            self.kill()
            raise

    def _start_error(self, fallback: str) -> ServerStartError:
        reason = reason_from_log(self.log_path, offset=self._log_offset) or fallback
        if reason != fallback:
            reason = f"{fallback}: {reason}"
        return ServerStartError(reason, log_path=str(self.log_path))

    def _terminate(self, timeout: float) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            if self._paused:
                os.kill(process.pid, signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("nats-server %s ignored SIGTERM; killing it", self.url)
                process.kill()
                process.wait()
            logger.info("nats-server stopped: %s", self.url)
        self._reap()

    def _reap(self) -> None:
        self._process = None
        self._paused = False
        _live_servers.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _signal(self, signum: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        os.kill(process.pid, signum)


def render_config(
    options: ServerOptions,
    *,
    client_port: int,
    monitor_port: int | None,
    store_dir: Path,
    cluster: _ClusterConfig | None = None,
) -> str:
    """The text of the config file for ``options`` (may contain credentials)."""
    q = json.dumps  # NATS config strings accept JSON's double-quoted form.
    lines = [f"host: {q(options.host)}", f"port: {client_port}"]
    if monitor_port is not None:
        lines.append(f"http: {q(_host_port(options.host, monitor_port))}")
    if options.server_name:
        lines.append(f"server_name: {q(options.server_name)}")
    if options.max_payload is not None:
        lines.append(f"max_payload: {options.max_payload}")
    if options.jetstream:
        sync = "  sync_interval: always\n" if options.sync_always else ""
        lines.append(f"jetstream {{\n  store_dir: {q(str(store_dir))}\n{sync}}}")
    if options.tls is not None:
        lines.append(_render_tls(options.tls))
    if options.token is not None:
        lines.append(f"authorization {{\n  token: {q(options.token)}\n}}")
    elif options.user is not None:
        lines.append(
            f"authorization {{\n  user: {q(options.user)}\n"
            f"  password: {q(options.password)}\n}}"
        )
    elif options.users:
        lines.append(f"authorization {{\n  users: {_render_users(options.users)}\n}}")
    if options.accounts:
        lines.append(_render_accounts(options.accounts))
    if cluster is not None:
        routes = ", ".join(q(f"nats-route://{r}") for r in cluster.routes)
        lines.append(
            f"cluster {{\n  name: {q(cluster.name)}\n"
            f"  listen: {q(_host_port(options.host, cluster.port))}\n"
            f"  routes: [{routes}]\n}}"
        )
    if options.extra_config:
        lines.append(options.extra_config)
    return "\n".join(lines) + "\n"


def _render_tls(tls: ServerTLS) -> str:
    q = json.dumps
    lines = [
        f"  cert_file: {q(str(tls.cert_file))}",
        f"  key_file: {q(str(tls.key_file))}",
        f"  timeout: {tls.handshake_timeout:g}",
    ]
    if tls.ca_file is not None:
        lines.append(f"  ca_file: {q(str(tls.ca_file))}")
    if tls.verify_clients:
        lines.append("  verify: true")
    return "tls {\n" + "\n".join(lines) + "\n}"


def _render_users(users: tuple[User, ...]) -> str:
    q = json.dumps
    rendered = []
    for user in users:
        fields = (
            [f"user: {q(user.name)}", f"password: {q(user.password)}"]
            if user.name is not None
            else [f"nkey: {q(user.nkey)}"]
        )
        if user.permissions is not None:
            fields.append(f"permissions: {_render_permissions(user.permissions)}")
        rendered.append("{" + ", ".join(fields) + "}")
    return "[\n    " + ",\n    ".join(rendered) + "\n  ]"


def _render_permissions(perms: Permissions) -> str:
    q = json.dumps
    parts = []
    for kind, allow, deny in (
        ("publish", perms.publish_allow, perms.publish_deny),
        ("subscribe", perms.subscribe_allow, perms.subscribe_deny),
    ):
        rules = []
        if allow is not None:
            rules.append(f"allow: [{', '.join(q(s) for s in allow)}]")
        if deny is not None:
            rules.append(f"deny: [{', '.join(q(s) for s in deny)}]")
        if rules:
            parts.append(f"{kind}: {{{', '.join(rules)}}}")
    if perms.allow_responses:
        parts.append("allow_responses: true")
    return "{" + ", ".join(parts) + "}"


def _render_accounts(accounts: tuple[Account, ...]) -> str:
    q = json.dumps
    blocks = []
    for account in accounts:
        js = "    jetstream: enabled\n" if account.jetstream else ""
        blocks.append(
            f"  {q(account.name)}: {{\n{js}"
            f"    users: {_render_users(account.users)}\n  }}"
        )
    return "accounts {\n" + "\n".join(blocks) + "\n}"


def reason_from_log(log_path: Path, *, offset: int = 0, max_lines: int = 3) -> str:
    """The telling part of a server log from byte ``offset`` on: the "address already
    in use" line if there is one, else the last fatal or error lines, each without its
    pid and timestamp prefix."""
    try:
        with log_path.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [_strip_prefix(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        if "address already in use" in line:
            return line
    errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    return "; ".join(errors[-max_lines:])


def healthz(monitor_url: str, query: str = "", *, timeout: float = 0.5) -> bool:
    """Whether ``GET {monitor_url}/healthz{query}`` answers 200 with status ok."""
    try:
        with _HTTP.open(f"{monitor_url}/healthz{query}", timeout=timeout) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):  # refused, HTTP 503, timeout, bad JSON
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


def _answers_info(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something on ``host:port`` speaks first with a NATS ``INFO`` line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago (bind to port 0, then close)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        port: int = sock.getsockname()[1]
        return port


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _strip_prefix(line: str) -> str:
    # "[1234] 2024/01/02 03:04:05.678901 [FTL] text" -> "[FTL] text"
    return _LOG_PREFIX.sub("", line, count=1)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it may hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


# Servers still running when the interpreter exits are killed, so no test run or crashed
# application leaves a nats-server behind (the process runs in its own session, so the
# terminal's signals do not reach it).
_live_servers: set[EmbeddedServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live_servers):
        server.kill()
