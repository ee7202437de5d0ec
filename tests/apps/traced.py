"""Two processes of one traced system, for the tracing test.

``service`` (run with ``natskit run tests.apps.traced:service``) answers
``orders.create``; its handler publishes a live event and stores the order in a stream.
``python -m tests.apps.traced client URL`` makes one request and waits until its own
subscriber and stream consumer have handled what the service sent. Each process
records its spans in memory and writes them as JSON lines to ``$SPANS_FILE.<role>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from natskit import App, Message
from natskit.streams import StreamSpec

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)


class Order(msgspec.Struct):
    order_id: str
    qty: int


def dump(role: str) -> None:
    path = f"{os.environ['SPANS_FILE']}.{role}"
    with open(path, "w") as out:
        for span in EXPORTER.get_finished_spans():
            parent = span.parent.span_id if span.parent else None
            out.write(
                json.dumps(
                    {
                        "name": span.name,
                        "trace": f"{span.context.trace_id:032x}",
                        "span": f"{span.context.span_id:016x}",
                        "parent": f"{parent:016x}" if parent else None,
                        "kind": span.kind.name,
                        "attributes": dict(span.attributes or {}),
                    }
                )
                + "\n"
            )


ORDERS = StreamSpec(name="ORDERS", subjects=("order.>",))

service = App("orders", version="1.0.0")
service.stream(ORDERS)


@service.endpoint("orders.create")
async def create(order: Order) -> Order:
    await service.publish(f"events.order.{order.order_id}", order)
    await service.js_publish(f"order.stored.{order.order_id}", order)
    return order


@service.on_stop
async def _dump_service() -> None:
    dump("service")


async def client(url: str) -> None:
    seen: list[str] = []
    consumers = App("shipping", version="1.0.0")
    consumers.stream(ORDERS)

    @consumers.subscribe("events.order.*")
    async def notify(order: Order) -> None:
        seen.append("event")

    @consumers.consume(stream="ORDERS", durable="shipping")
    async def ship(order: Order, msg: Message[Order]) -> None:
        seen.append("stored")

    caller = App("gateway", version="1.0.0")
    await consumers.start(url)
    await caller.start(url)
    await caller.request(
        "orders.create", Order(order_id="o1", qty=2), response_type=Order
    )
    for _ in range(500):
        if sorted(seen) == ["event", "stored"]:
            break
        await asyncio.sleep(0.01)
    await caller.stop()
    await consumers.stop()
    dump("client")


if __name__ == "__main__":
    asyncio.run(client(sys.argv[2]))
