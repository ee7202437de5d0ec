"""The HTTP gateway: each HTTP request becomes one request-reply call to the order service.

    POST /orders        {"customer": "ada", "lines": [{"sku": "book", "qty": 2}]} -> 201
    GET  /orders/{id}   -> 200 with the order, or 404
    GET  /healthz       -> 200 while connected to NATS

Errors keep their meaning across the hop: a body that is not an order is a 400 with
the decoder's reason, a refusal from a service keeps its 4xx code and description,
an unreachable or failing service is a 502/503/504. The HTTP port comes from
``NATSKIT_DEMO_HTTP_PORT`` (0 or unset: a free port, logged).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import msgspec

from natskit import (
    App,
    CallPolicy,
    CircuitOpen,
    NoResponders,
    RequestTimeout,
    ServiceError,
)
from natskit.demo.http import Response, serve
from natskit.demo.models import Order, OrderRequest

__all__ = ["gateway"]

log = logging.getLogger("natskit.demo")

gateway = App("gateway", version="1.0.0", description="HTTP API for orders")
# The first hop starts the deadline chain: orders, inventory and payment see how long
# the HTTP client will wait, and their own calls shrink to fit.
CREATE = CallPolicy(timeout=5.0, send_deadline=True, breaker=None)
_decode_request = msgspec.json.Decoder(OrderRequest).decode
_server: Any = None


async def handle(method: str, path: str, body: bytes) -> Response:
    if path == "/healthz":
        ok = gateway.started and gateway.nc.is_connected
        return (200, {"status": "ok"}) if ok else (503, {"status": "disconnected"})
    if path == "/orders":
        if method != "POST":
            return 405, {"error": "use POST /orders"}
        return await _create(body)
    if path.startswith("/orders/") and method == "GET":
        return await _get(path.removeprefix("/orders/"))
    return 404, {"error": f"no route for {method} {path}"}


async def _create(body: bytes) -> Response:
    try:
        request = _decode_request(body)
    except msgspec.DecodeError as exc:
        return 400, {"error": f"not an order: {exc}"}
    try:
        order = await gateway.request(
            "orders.create", request, response_type=Order, policy=CREATE
        )
    except ServiceError as exc:
        status = exc.code if 400 <= exc.code < 500 else 502
        return status, {"error": exc.description}
    except (NoResponders, CircuitOpen):
        return 503, {"error": "the order service is unavailable"}
    except RequestTimeout:
        return 504, {"error": "the order service did not answer in time"}
    return 201, msgspec.to_builtins(order)


async def _get(order_id: str) -> Response:
    if not order_id.isalnum():
        return 400, {"error": "bad order id"}
    try:
        order = await gateway.request(
            "orders.get", {"order_id": order_id}, response_type=Order
        )
    except ServiceError as exc:
        return (404 if exc.code == 404 else 502), {"error": exc.description}
    except (NoResponders, CircuitOpen, RequestTimeout):
        return 503, {"error": "the order service is unavailable"}
    return 200, msgspec.to_builtins(order)


@gateway.on_start
async def _open_http() -> None:
    global _server  # noqa: PLW0603 - one HTTP server per gateway process
    port = int(os.environ.get("NATSKIT_DEMO_HTTP_PORT", "0"))
    _server = await serve(handle, "127.0.0.1", port)
    bound = _server.sockets[0].getsockname()[1]
    log.info("gateway listening on http://127.0.0.1:%d", bound)


@gateway.on_stop
async def _close_http() -> None:
    if _server is not None:
        _server.close()
        await _server.wait_closed()
