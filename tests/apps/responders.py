"""A responder app the request-reply fault tests run in several processes."""

from __future__ import annotations

import os

import msgspec

from natskit import App


class Reserve(msgspec.Struct):
    sku: str
    qty: int


class Reserved(msgspec.Struct):
    sku: str
    qty: int
    pid: int


app = App("inventory", version="2.1.0", description="stock reservations")


@app.endpoint("inventory.reserve")
async def reserve(request: Reserve) -> Reserved:
    return Reserved(sku=request.sku, qty=request.qty, pid=os.getpid())
