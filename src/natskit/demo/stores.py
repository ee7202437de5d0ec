"""Where the order flow keeps its state: JetStream streams and key-value buckets.

Everything lives in NATS itself, so a service restart loses nothing: stock and
reservations (``inventory``), payments (``payments``), orders (``orders``), shipments
(``shipments``) and sent notifications (``notifications``) are key-value buckets;
``ORDERS`` is the stream of created orders and ``SHIPPING`` the durable work queue of
shipments to make.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.js.api import StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from natskit.streams import StreamSpec

__all__ = [
    "BUCKETS",
    "CATALOG",
    "ORDERS",
    "SHIPPING",
    "bucket",
    "create_once",
    "read_all",
]

ORDERS = StreamSpec(name="ORDERS", subjects=("order.created.*",))
SHIPPING = StreamSpec(
    name="SHIPPING", subjects=("shipping.todo.*",), retention="workqueue"
)
BUCKETS = ("inventory", "payments", "orders", "shipments", "notifications")

CATALOG = {  # sku -> (price in cents, initial stock)
    "book": (1_500, 1_000_000),
    "lamp": (4_200, 1_000_000),
    "mug": (900, 1_000_000),
    "poster": (1_200, 1_000_000),
}


async def bucket(nc: Any, name: str) -> KeyValue:
    """The key-value bucket ``name``, created (file storage, history 1) if missing."""
    js = nc.jetstream()
    try:
        kv: KeyValue = await js.key_value(name)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=name, history=1, storage=StorageType.FILE)
    return kv


async def create_once(kv: KeyValue, key: str, value: msgspec.Struct) -> bool:
    """Store ``value`` under ``key`` unless the key exists; True if this call stored it."""
    try:
        await kv.create(key, msgspec.json.encode(value))
    except KeyWrongLastSequenceError:
        return False
    return True


async def read_all(kv: KeyValue, type_: type[Any]) -> dict[str, Any]:
    """Every key of ``kv`` decoded as ``type_`` (for the demo's summary and tests)."""
    decoder = msgspec.json.Decoder(type_)
    out: dict[str, Any] = {}
    try:
        keys = await kv.keys()
    except Exception:  # nats-py raises NoKeysError for an empty bucket
        return out
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            out[key] = decoder.decode(entry.value)
    return out
