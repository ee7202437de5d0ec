"""The services of the reference order flow, each an App run in its own process.

    natskit run natskit.demo.services:inventory
    natskit run natskit.demo.services:payment
    natskit run natskit.demo.services:orders
    natskit run natskit.demo.services:logistics
    natskit run natskit.demo.services:shipper --workers 2
    natskit run natskit.demo.services:notification
    natskit run natskit.demo.gateway:gateway

Every one is discoverable through ``$SRV.*`` and publishes heartbeats. State lives in
NATS (see :mod:`natskit.demo.stores`), so any of them can be killed and restarted.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import msgspec
from nats.js.kv import KeyValue
from nats.nuid import NUID

from natskit import (
    App,
    BreakerPolicy,
    CallPolicy,
    Message,
    RequestError,
    RetryPolicy,
    ServiceError,
)
from natskit.demo.models import (
    Charge,
    Charged,
    Notice,
    Order,
    OrderRequest,
    Reserve,
    Reserved,
    Shipment,
    ShipmentTask,
)
from natskit.demo.stores import CATALOG, ORDERS, SHIPPING, bucket, create_once

__all__ = ["inventory", "logistics", "notification", "orders", "payment", "shipper"]

_buckets: dict[tuple[int, str], KeyValue] = {}


async def _kv(app: App, name: str) -> KeyValue:
    """The bucket ``name`` on ``app``'s current connection (looked up once)."""
    key = (id(app.nc), name)
    kv = _buckets.get(key)
    if kv is None:
        kv = _buckets[key] = await bucket(app.nc, name)
    return kv


# -- inventory: stock in a key-value bucket --------------------------------------------

inventory = App("inventory", version="1.0.0", description="stock reservations")


@inventory.endpoint("inventory.reserve", max_concurrency=64)
async def reserve(request: Reserve) -> Reserved:
    """Reserve every line of an order, once per order id (retries are safe)."""
    total = 0
    for line in request.lines:
        if line.sku not in CATALOG:
            raise ServiceError(422, f"unknown product {line.sku!r}")
        if line.qty <= 0:
            raise ServiceError(422, f"quantity of {line.sku!r} must be positive")
        total += CATALOG[line.sku][0] * line.qty
    kv = await _kv(inventory, "inventory")
    claim = Reserved(order_id=request.order_id, total_cents=total)
    if not await create_once(kv, f"reservation.{request.order_id}", claim):
        return claim  # a retry of a call that already reserved
    taken: list[tuple[str, int]] = []
    try:
        for line in request.lines:
            await _adjust(kv, line.sku, -line.qty)
            taken.append((line.sku, line.qty))
    except ServiceError:
        for sku, qty in taken:
            await _adjust(kv, sku, qty)
        await kv.delete(f"reservation.{request.order_id}")
        raise
    return claim


_sku_locks: dict[str, asyncio.Lock] = {}


async def _adjust(kv: KeyValue, sku: str, delta: int) -> None:
    """Change the stock of ``sku`` by ``delta`` with compare-and-set, never below 0.

    Compare-and-set keeps instances consistent with each other; the per-sku lock keeps
    this instance's own concurrent requests from racing each other into retries.
    """
    lock = _sku_locks.setdefault(sku, asyncio.Lock())
    async with lock:
        await _compare_and_set(kv, sku, delta)


async def _compare_and_set(kv: KeyValue, sku: str, delta: int) -> None:
    while True:
        entry = await kv.get(f"stock.{sku}")
        stock = int(entry.value or b"0")
        if stock + delta < 0:
            raise ServiceError(409, f"{sku!r} is out of stock")
        try:
            await kv.update(
                f"stock.{sku}", str(stock + delta).encode(), last=entry.revision
            )
            return
        except Exception as exc:  # another instance won the race: read again
            if "wrong last sequence" not in str(exc).lower():
                raise


# -- payment: a flaky provider ----------------------------------------------------------

payment = App("payment", version="1.0.0", description="card payments")


@payment.endpoint("payment.charge", max_concurrency=64)
async def charge(request: Charge) -> Charged:
    """Charge once per order id. Latency and failure rate come from the environment."""
    latency = float(os.environ.get("NATSKIT_DEMO_PAYMENT_LATENCY", "0.005"))
    failure_rate = float(os.environ.get("NATSKIT_DEMO_PAYMENT_FAILURES", "0.02"))
    await asyncio.sleep(random.uniform(0, 2 * latency))
    if random.random() < failure_rate:
        raise ServiceError(503, "payment provider unavailable")
    kv = await _kv(payment, "payments")
    charged = Charged(order_id=request.order_id, status="charged")
    await create_once(kv, request.order_id, charged)
    return charged


# -- orders: validate, reserve, charge, store, publish ----------------------------------

orders = App("orders", version="1.0.0", description="order intake")
orders.stream(ORDERS)

RESERVE = CallPolicy(timeout=1.0, idempotent=True, retry=RetryPolicy(max_retries=3))
CHARGE = CallPolicy(
    timeout=1.0,
    idempotent=True,
    retry=RetryPolicy(max_retries=2),
    breaker=BreakerPolicy(consecutive_failures=5, failure_ratio=0.5, open_for=1.0),
)
_nuid = NUID()


async def _awaiting_payment(error: RequestError) -> Charged:
    # The breaker is open or the provider failed: accept the order, charge it later.
    return Charged(order_id="", status="awaiting_payment")


@orders.endpoint("orders.create", max_concurrency=64)
async def create_order(request: OrderRequest) -> Order:
    if not request.customer.strip():
        raise ServiceError(422, "customer is required")
    if not request.lines:
        raise ServiceError(422, "an order needs at least one line")
    order_id = _nuid.next().decode()  # unique across instances and restarts
    reserved = await orders.request(
        "inventory.reserve",
        Reserve(order_id=order_id, lines=request.lines),
        response_type=Reserved,
        policy=RESERVE,
    )
    charged = await orders.request(
        "payment.charge",
        Charge(
            order_id=order_id,
            customer=request.customer,
            amount_cents=reserved.total_cents,
        ),
        response_type=Charged,
        policy=CHARGE,
        fallback=_awaiting_payment,
    )
    order = Order(
        order_id=order_id,
        customer=request.customer,
        lines=request.lines,
        total_cents=reserved.total_cents,
        payment=charged.status,
        created=time.time(),
    )
    kv = await _kv(orders, "orders")
    await kv.put(order_id, msgspec.json.encode(order))
    await orders.js_publish(f"order.created.{order_id}", order, msg_id=order_id)
    await orders.publish("events.order.created", order)
    return order


class OrderQuery(msgspec.Struct, frozen=True):
    order_id: str


@orders.endpoint("orders.get", max_concurrency=16)
async def get_order(query: OrderQuery) -> Order:
    kv = await _kv(orders, "orders")
    try:
        entry = await kv.get(query.order_id)
    except Exception:
        raise ServiceError(404, f"no order {query.order_id!r}") from None
    return msgspec.json.decode(entry.value or b"", type=Order)


class CallerStats(msgspec.Struct, frozen=True):
    calls: int
    retries: int
    fallbacks: int
    breaker_opened: int
    rejected_by_breaker: int


@orders.endpoint("orders.calls")
async def call_stats(_: Any) -> CallerStats:
    """The order service's own call counters (for the demo's summary)."""
    s = orders.caller.stats
    return CallerStats(
        calls=s.calls,
        retries=s.retries,
        fallbacks=s.fallbacks,
        breaker_opened=s.breaker_opened,
        rejected_by_breaker=s.rejected_by_breaker,
    )


# -- logistics: orders stream -> durable shipping work queue ------------------------------

logistics = App("logistics", version="1.0.0", description="plans shipments")
logistics.stream(ORDERS)
logistics.stream(SHIPPING)


@logistics.consume(stream="ORDERS", durable="logistics", publish_to="shipping.todo.new")
async def plan_shipment(order: Order) -> ShipmentTask:
    return ShipmentTask(
        order_id=order.order_id, customer=order.customer, lines=order.lines
    )


shipper = App("shipper", version="1.0.0", description="ships, one worker per process")
shipper.stream(SHIPPING)


@shipper.consume(stream="SHIPPING", durable="shippers", max_concurrency=8)
async def ship(task: ShipmentTask, msg: Message[ShipmentTask]) -> None:
    kv = await _kv(shipper, "shipments")
    shipment = Shipment(order_id=task.order_id, worker=os.getpid(), shipped=time.time())
    await create_once(kv, task.order_id, shipment)  # a redelivery finds it done


# -- notification: fan-out subscriber ------------------------------------------------------

notification = App("notification", version="1.0.0", description="tells customers")


@notification.subscribe("events.order.*", max_concurrency=16)
async def notify(order: Order, msg: Message[Order]) -> None:
    kv = await _kv(notification, "notifications")
    text = f"order {order.order_id} confirmed ({order.payment})"
    await create_once(
        kv,
        order.order_id,
        Notice(order_id=order.order_id, to=order.customer, text=text),
    )
