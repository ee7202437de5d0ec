"""The reference order system, end to end, as `natskit demo` runs it."""

from __future__ import annotations

import json

import pytest

from natskit.demo.http import MAX_BODY, HttpClient
from natskit.demo.run import DemoOptions, run_demo, running_system
from natskit.demo.stores import CATALOG, bucket, read_all
from natskit.server import EmbeddedServer


async def test_a_few_hundred_orders_reconcile_exactly(
    nats_server: EmbeddedServer,
) -> None:
    options = DemoOptions(
        orders=300, rate=150, progress=False, payment_failure_rate=0.05
    )
    summary = await run_demo([nats_server.url], options)
    assert summary.sent == 300
    assert summary.statuses[201] == summary.accepted == len(summary.accepted_ids) == 300
    assert summary.reconciles, summary.render()
    assert len(summary.shipments) == len(summary.notifications) == 300
    assert summary.handled["notification"] == 300
    assert summary.live["payment"] == 2 and summary.live["shipper"] == 2
    awaiting = sum(1 for o in summary.stored_orders.values() if o.payment != "charged")
    assert awaiting == summary.calls["fallbacks"]


async def test_chaos_run_loses_and_duplicates_nothing(
    nats_server: EmbeddedServer,
) -> None:
    options = DemoOptions(orders=600, rate=120, progress=False, chaos=True)
    summary = await run_demo([nats_server.url], options)
    print(summary.render())
    assert [c.split(" pid")[0] for c in summary.chaos][:2] == [
        "SIGKILLed shipper",
        "SIGKILLed payment",
    ]
    assert summary.accepted == summary.statuses[201]
    missing, unexpected = summary.missing(), summary.unexpected()
    assert not any(missing.values()), missing  # 0 lost
    assert not any(unexpected.values()), unexpected  # 0 duplicated or invented
    assert len(summary.shipments) == summary.accepted  # one shipment per order


async def test_bad_input_gets_a_4xx_and_changes_nothing(
    nats_server: EmbeddedServer,
) -> None:
    options = DemoOptions(orders=1, progress=False, shippers=1, payments=1)
    async with running_system([nats_server.url], options) as run:
        nc = run.monitor.nc
        stock_kv, orders_kv = await bucket(nc, "inventory"), await bucket(nc, "orders")

        async def state() -> tuple[dict[str, int], int]:
            stock = {
                sku: int((await stock_kv.get(f"stock.{sku}")).value or b"0")
                for sku in CATALOG
            }
            return stock, len(await read_all(orders_kv, dict))

        before = await state()
        http = HttpClient("127.0.0.1", run.system.http_port)
        cases = [
            (b'{"customer": "x", "lines": [', 400, "not an order"),
            (
                b'{"customer": "x", "lines": [{"sku": "unicorn", "qty": 1}]}',
                422,
                "unicorn",
            ),
            (
                b'{"customer": "x", "lines": [{"sku": "book", "qty": -2}]}',
                422,
                "positive",
            ),
            (b'{"customer": "x", "lines": []}', 422, "at least one line"),
            (
                b'{"customer": "x", "lines": [{"sku": "book", "qty": 1}], "x": 1}',
                400,
                "x",
            ),
        ]
        for body, status, text in cases:
            got, reply = await http.request("POST", "/orders", body)
            assert (got, text in reply["error"]) == (status, True), (body, got, reply)
        oversized = json.dumps({"customer": "x" * MAX_BODY, "lines": []}).encode()
        got, reply = await http.request("POST", "/orders", oversized)
        assert got == 413 and "over" in reply["error"]
        assert (await http.request("GET", "/orders/doesnotexist"))[0] == 404
        assert (await http.request("GET", "/healthz"))[0] == 200
        await http.close()
        assert await state() == before
        # And a good order still goes through afterwards.
        http = HttpClient("127.0.0.1", run.system.http_port)
        good = b'{"customer": "ada", "lines": [{"sku": "book", "qty": 1}]}'
        got, order = await http.request("POST", "/orders", good)
        assert got == 201
        got, fetched = await http.request("GET", f"/orders/{order['order_id']}")
        assert got == 200 and fetched == order
        await http.close()
        stock, count = await state()
        assert stock["book"] == before[0]["book"] - 1 and count == before[1] + 1


@pytest.mark.parametrize("orders", [0])
def test_demo_options_are_checked(orders: int) -> None:
    from natskit.cli import main

    assert main(["demo", "--orders", str(orders)]) == 2
