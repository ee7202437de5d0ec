"""HTTP liveness and readiness probes for container orchestrators.

``natskit run --health-port PORT`` serves, from the same state the heartbeats announce:

* ``GET /livez``: 200 while the App is starting, ready, not ready or draining and its
  heartbeat loop has beaten within its ttl (a stalled event loop cannot answer anyway);
  503 before start, once stopping, or when the beat loop has died or stalled;
* ``GET /readyz`` (and ``/healthz``): 200 only when the status is ``ready`` (readiness
  check passing) and the NATS connection is up; 503 otherwise.

Bodies are small JSON objects (name, id, status). The server speaks just enough
HTTP/1.1 for probes: one request per connection, ``GET`` and ``HEAD``, no bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from natskit.discovery.heartbeat import Heartbeats, Status

if TYPE_CHECKING:
    from natskit.app import App

__all__ = ["ProbeServer", "run_with_probes"]

log = logging.getLogger("natskit.discovery")

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_LIVE = (Status.STARTING, Status.READY, Status.NOT_READY, Status.DRAINING)
_MAX_HEADER_LINES = 100


class ProbeServer:
    """Serves ``/livez``, ``/readyz`` and ``/healthz`` for one App."""

    def __init__(self, app: App, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "health probes on http://%s:%d/livez and /readyz", self.host, self.port
        )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> ProbeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _heartbeats(self) -> Heartbeats | None:
        for source in self._app.sources:
            if isinstance(source, Heartbeats):
                return source
        return None

    def answer(self, path: str) -> tuple[int, dict[str, object]]:
        """The status code and body for a probe path."""
        app = self._app
        beats = self._heartbeats()
        status = beats.status if beats is not None else app.status
        body: dict[str, object] = {
            "name": app.name,
            "id": app.instance_id,
            "status": status.value,
        }
        if path == "/livez":
            alive = status in _LIVE and (beats is None or beats.alive)
            if status is Status.STARTING and beats is None:
                alive = True  # connecting: not yet beating
            return (200 if alive else 503), body
        if path in ("/readyz", "/healthz"):
            ready = beats is not None and beats.ready
            return (200 if ready else 503), body
        return 404, {"error": f"no such probe {path!r}: /livez, /readyz, /healthz"}

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(_read_request(reader), timeout=5)
            if request is None:
                return
            method, path = request
            body: dict[str, object]
            if method not in ("GET", "HEAD"):
                code, body = 405, {"error": f"method {method} not allowed"}
            else:
                code, body = self.answer(path.split("?", 1)[0])
            data = json.dumps(body).encode()
            head = (
                f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + data)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a probe that went away or never spoke: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    for _ in range(_MAX_HEADER_LINES):  # headers carry nothing a probe needs
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            break
    return parts[0], parts[1]


async def run_with_probes(
    app: App, servers: list[str], *, host: str = "127.0.0.1", port: int
) -> None:
    """``app.run(servers)`` with the probes served on ``host:port`` meanwhile."""
    async with ProbeServer(app, host=host, port=port):
        await app.run(servers)
