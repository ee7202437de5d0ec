"""The messages of the order flow: one msgspec Struct per request, reply and event."""

from __future__ import annotations

import msgspec

__all__ = [
    "Charge",
    "Charged",
    "Line",
    "Notice",
    "Order",
    "OrderRequest",
    "Reserve",
    "Reserved",
    "Shipment",
    "ShipmentTask",
]


class Line(msgspec.Struct, frozen=True):
    sku: str
    qty: int


class OrderRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a client POSTs to the gateway."""

    customer: str
    lines: list[Line]


class Order(msgspec.Struct, frozen=True):
    order_id: str
    customer: str
    lines: list[Line]
    total_cents: int
    payment: str  # "charged" or "awaiting_payment"
    created: float


class Reserve(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[Line]


class Reserved(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


class Charge(msgspec.Struct, frozen=True):
    order_id: str
    customer: str
    amount_cents: int


class Charged(msgspec.Struct, frozen=True):
    order_id: str
    status: str  # "charged" or "awaiting_payment"


class ShipmentTask(msgspec.Struct, frozen=True):
    order_id: str
    customer: str
    lines: list[Line]


class Shipment(msgspec.Struct, frozen=True):
    order_id: str
    worker: int
    shipped: float


class Notice(msgspec.Struct, frozen=True):
    """What the notification service would send."""

    order_id: str
    to: str
    text: str
