"""Just enough HTTP/1.1 for the demo's gateway and its load driver (keep-alive, JSON).

A dependency-free server and client on asyncio streams: requests with a
``Content-Length`` body, persistent connections, and a cap on body size. Not a general
web server; the gateway is the worked example of turning HTTP into NATS calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["MAX_BODY", "HttpClient", "Response", "serve"]

log = logging.getLogger("natskit.demo")

MAX_BODY = 64 * 1024
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

Response = tuple[int, dict[str, Any]]
Handler = Callable[[str, str, bytes], Awaitable[Response]]


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """Serve ``handler(method, path, body) -> (status, json_body)`` on ``host:port``."""

    async def connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await _one_request(handler, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(connection, host, port)


async def _one_request(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _version = lines[0].split(" ", 2)
    except ValueError:
        await _write(writer, 400, {"error": "malformed request line"}, keep_alive=False)
        return False
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    keep_alive = headers.get("connection", "").lower() != "close"
    if length > MAX_BODY:
        await _write(
            writer,
            413,
            {"error": f"body of {length} bytes is over {MAX_BODY}"},
            keep_alive=False,
        )
        return False
    body = await reader.readexactly(length) if length else b""
    try:
        status, payload = await handler(method, path, body)
    except Exception:
        log.exception("gateway handler failed on %s %s", method, path)
        status, payload = 500, {"error": "internal error"}
    await _write(writer, status, payload, keep_alive=keep_alive)
    return keep_alive


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    payload: dict[str, Any],
    *,
    keep_alive: bool,
) -> None:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


class HttpClient:
    """One persistent connection; ``request`` sends and reads one response at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, Any]:
        for attempt in (0, 1):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port
                )
            assert self._reader is not None
            try:
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                self._writer.write(head.encode() + body)
                await self._writer.drain()
                return await self._read()
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _read(self) -> tuple[int, Any]:
        assert self._reader is not None
        head = (
            (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        )
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, json.loads(body) if body else None

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
