"""Request-reply: endpoints on the services protocol, calls with retries and breakers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from typing import Any

import msgspec
import nats
import pytest

from natskit import (
    App,
    CircuitOpen,
    DecodeError,
    Message,
    NoResponders,
    RequestTimeout,
    ServiceError,
)
from natskit.resilience import BreakerPolicy, RetryPolicy
from natskit.rpc import CallPolicy, remaining_time
from natskit.testing import wait_until

SEMVER = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


class Reserve(msgspec.Struct):
    sku: str
    qty: int


class Reserved(msgspec.Struct):
    sku: str
    qty: int
    left: int


def inventory_app() -> App:
    app = App(
        "inventory",
        version="1.2.3",
        description="stock",
        metadata={"team": "warehouse"},
    )

    @app.endpoint("inventory.reserve", metadata={"idempotent": "yes"})
    async def reserve(request: Reserve) -> Reserved:
        if request.qty < 0:
            raise ServiceError(422, "quantity must be positive")
        if request.sku == "crash":
            raise RuntimeError("database on fire")
        return Reserved(sku=request.sku, qty=request.qty, left=10 - request.qty)

    @app.endpoint("inventory.deadline")
    async def deadline(text: str) -> str:
        left = remaining_time()
        return "none" if left is None else f"{left:.3f}"

    return app


# -- the services protocol, read by a plain nats-py client ----------------------------


def _check_identity(reply: dict[str, Any], app: App, kind: str) -> None:
    assert reply["type"] == f"io.nats.micro.v1.{kind}_response"
    assert reply["name"] == "inventory"
    assert reply["id"] == app.instance_id
    assert isinstance(reply["version"], str) and SEMVER.match(reply["version"])
    assert reply["version"] == "1.2.3"
    assert reply["metadata"] == {"team": "warehouse"}


async def test_services_protocol_answers_ping_info_stats_in_every_form(
    nats_url: str,
) -> None:
    app = inventory_app()
    async with app:
        nc = await nats.connect(nats_url)
        for verb in ("PING", "INFO", "STATS"):
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.inventory",
                f"$SRV.{verb}.inventory.{app.instance_id}",
            ):
                reply = json.loads((await nc.request(subject, b"", timeout=2)).data)
                _check_identity(reply, app, verb.lower())

        info = json.loads(
            (await nc.request("$SRV.INFO.inventory", b"", timeout=2)).data
        )
        assert info["description"] == "stock"
        endpoints = {e["name"]: e for e in info["endpoints"]}
        assert endpoints["reserve"] == {
            "name": "reserve",
            "subject": "inventory.reserve",
            "queue_group": "q",
            "metadata": {"idempotent": "yes"},
        }
        assert endpoints["deadline"]["subject"] == "inventory.deadline"

        # A plain client calls the endpoint, then reads the counters.
        reply = await nc.request(
            "inventory.reserve", b'{"sku": "a", "qty": 3}', timeout=2
        )
        assert json.loads(reply.data) == {"sku": "a", "qty": 3, "left": 7}
        stats = json.loads(
            (await nc.request("$SRV.STATS.inventory", b"", timeout=2)).data
        )
        started = dt.datetime.fromisoformat(stats["started"].replace("Z", "+00:00"))
        assert stats["started"].endswith("Z")
        assert abs((dt.datetime.now(dt.UTC) - started).total_seconds()) < 60
        reserve = next(e for e in stats["endpoints"] if e["name"] == "reserve")
        assert reserve["num_requests"] == 1
        assert reserve["num_errors"] == 0
        assert reserve["queue_group"] == "q"
        for key in ("processing_time", "average_processing_time"):
            assert type(reserve[key]) is int and reserve[key] > 0
        assert reserve["last_error"] == ""
        await nc.close()


async def test_error_headers_for_each_failure_kind_and_exact_counters(
    nats_url: str,
) -> None:
    app = inventory_app()
    async with app:
        nc = await nats.connect(nats_url)

        async def call(payload: bytes) -> tuple[str | None, str | None]:
            reply = await nc.request("inventory.reserve", payload, timeout=2)
            headers = reply.headers or {}
            return headers.get("Nats-Service-Error-Code"), headers.get(
                "Nats-Service-Error"
            )

        async def counters() -> tuple[int, int]:
            raw = await nc.request("$SRV.STATS.inventory", b"", timeout=2)
            reserve = next(
                e for e in json.loads(raw.data)["endpoints"] if e["name"] == "reserve"
            )
            return reserve["num_requests"], reserve["num_errors"]

        assert await counters() == (0, 0)
        assert await call(b'{"sku": "a", "qty": 1}') == (None, None)
        assert await counters() == (1, 0)
        code, text = await call(b'{"sku": "a", "qty": -1}')
        assert (code, text) == ("422", "quantity must be positive")
        assert await counters() == (2, 1)
        code, text = await call(b'{"sku": "a"}')
        assert code == "400"
        assert text is not None and "qty" in text
        assert await counters() == (3, 2)
        code, text = await call(b'{"sku": "crash", "qty": 1}')
        assert (code, text) == ("500", "internal error")
        assert await counters() == (4, 3)
        assert await call(b'{"sku": "b", "qty": 2}') == (None, None)
        assert await counters() == (5, 3)
        await nc.close()


# -- calling ----------------------------------------------------------------------------


async def test_request_returns_typed_reply_and_raises_typed_errors(
    nats_url: str,
) -> None:
    server, client = inventory_app(), App("orders")
    async with server, client:
        reply = await client.request(
            "inventory.reserve", Reserve(sku="x", qty=4), response_type=Reserved
        )
        assert reply == Reserved(sku="x", qty=4, left=6)

        with pytest.raises(ServiceError) as info:
            await client.request("inventory.reserve", Reserve(sku="x", qty=-1))
        assert (info.value.code, info.value.description) == (
            422,
            "quantity must be positive",
        )

        with pytest.raises(ServiceError) as info:
            await client.request("inventory.reserve", Reserve(sku="crash", qty=1))
        assert info.value.code == 500

        with pytest.raises(DecodeError) as decode_info:
            await client.request(
                "inventory.reserve", Reserve(sku="x", qty=1), response_type=int
            )
        assert decode_info.value.subject == "inventory.reserve"

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NoResponders):
            await client.request(
                "nobody.here", "x", policy=CallPolicy(timeout=5, breaker=None)
            )
        assert loop.time() - started < 2.5, (
            "no responders must not wait for the timeout"
        )


async def test_request_timeout_when_the_responder_is_too_slow(nats_url: str) -> None:
    server, client = App("slow"), App("caller")

    @server.endpoint("slow.op")
    async def slow(text: str) -> str:
        await asyncio.sleep(1.0)
        return text

    async with server, client:
        with pytest.raises(RequestTimeout) as info:
            await client.request(
                "slow.op", "x", policy=CallPolicy(timeout=0.2, breaker=None)
            )
        assert info.value.timeout == pytest.approx(0.2)


async def test_deadline_reaches_the_handler_and_shrinks_downstream_calls(
    nats_url: str,
) -> None:
    server, front, client = inventory_app(), App("front"), App("client")
    seen: list[float | None] = []

    @front.endpoint("front.op")
    async def op(text: str) -> str:
        seen.append(remaining_time())
        return await front.request("inventory.deadline", text, response_type=str)

    async with server, front, client:
        downstream = await client.request(
            "front.op",
            "go",
            response_type=str,
            policy=CallPolicy(timeout=0.8, send_deadline=True),
        )
        # A first hop sends no deadline unless its policy asks for it.
        first_hop = await client.request("inventory.deadline", "x", response_type=str)
        assert first_hop == "none"
    assert seen[0] is not None and 0.5 < seen[0] <= 0.8
    # The front's own default timeout (2 s) was cut to what its caller had left.
    assert float(downstream) <= 0.8


async def test_retries_only_for_idempotent_calls(nats_url: str) -> None:
    client = App("client")
    policy = CallPolicy(
        timeout=0.5, retry=RetryPolicy(max_retries=3, base=0.01), breaker=None
    )
    async with client:
        with pytest.raises(NoResponders):
            await client.request("ghost.op", "x", policy=policy)
        assert client.caller.stats.retries == 0
        with pytest.raises(NoResponders):
            await client.request("ghost.op", "x", policy=_idempotent(policy))
        assert client.caller.stats.retries == 3
        assert client.caller.stats.attempts == 1 + 4


def _idempotent(policy: CallPolicy) -> CallPolicy:
    from dataclasses import replace

    return replace(policy, idempotent=True)


async def test_retry_succeeds_when_a_responder_appears(nats_url: str) -> None:
    client, late = App("client"), App("late")

    @late.endpoint("late.op")
    async def op(text: str) -> str:
        return text.upper()

    policy = CallPolicy(
        timeout=0.5,
        idempotent=True,
        retry=RetryPolicy(max_retries=20, base=0.05, cap=0.1),
        breaker=None,
    )
    async with client:
        call = asyncio.create_task(
            client.request("late.op", "hi", response_type=str, policy=policy)
        )
        await wait_until(lambda: client.caller.stats.retries >= 1)
        await late.start()
        try:
            assert await call == "HI"
        finally:
            await late.stop()


async def test_fallback_is_called_instead_of_raising(nats_url: str) -> None:
    client = App("client")

    async def accept_later(exc: Exception) -> str:
        return f"fallback after {type(exc).__name__}"

    async with client:
        result = await client.request(
            "payment.charge", "x", response_type=str, fallback=accept_later
        )
    assert result == "fallback after NoResponders"
    assert client.caller.stats.fallbacks == 1


async def test_breaker_opens_fails_fast_probes_and_closes(nats_url: str) -> None:
    client, server = App("client"), App("payment")

    @server.endpoint("payment.charge")
    async def charge(text: str) -> str:
        return "ok"

    breaker = BreakerPolicy(consecutive_failures=3, open_for=0.3, failure_ratio=None)
    policy = CallPolicy(timeout=0.5, breaker=breaker)
    async with client:
        for _ in range(3):
            with pytest.raises(NoResponders):
                await client.request("payment.charge", "x", policy=policy)
        attempts = client.caller.stats.attempts
        with pytest.raises(CircuitOpen) as info:
            await client.request("payment.charge", "x", policy=policy)
        assert 0 < info.value.retry_after <= 0.3
        assert client.caller.stats.attempts == attempts, "an open breaker sends nothing"
        await server.start()
        try:
            # After open_for, one probe goes through; it succeeds and closes the breaker.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while True:
                try:
                    assert (
                        await client.request("payment.charge", "x", policy=policy)
                        == b"ok"
                    )
                    break
                except CircuitOpen:
                    assert loop.time() < deadline, "breaker did not close within 2 s"
                    await asyncio.sleep(0.02)
            assert client.caller.breakers["payment.charge"].state.value == "closed"
        finally:
            await server.stop()


async def test_gather_collects_a_reply_from_every_instance(nats_url: str) -> None:
    apps = [inventory_app() for _ in range(3)]
    client = App("client")
    for app in apps:
        await app.start()
    try:
        async with client:
            replies = await client.gather(
                "$SRV.PING.inventory", b"", response_type=dict, window=0.5
            )
            ids = sorted(r["id"] for r in replies.values)
            assert ids == sorted(a.instance_id for a in apps)
            quick = await client.gather(
                "$SRV.PING.inventory", b"", response_type=dict, window=5, max_replies=2
            )
            assert len(quick.values) >= 2
    finally:
        for app in apps:
            await app.stop()


async def test_endpoint_declaration_errors_name_the_problem() -> None:
    app = App("svc")
    with pytest.raises(ValueError, match="wildcard"):
        app.endpoint("a.*")
    with pytest.raises(ValueError, match="queue group"):

        @app.endpoint("a.b", queue_group="bad group")
        async def h(text: str) -> str:
            return text

    @app.endpoint("a.c", name="dup")
    async def one(text: str) -> str:
        return text

    with pytest.raises(ValueError, match="declared twice"):

        @app.endpoint("a.d", name="dup")
        async def two(text: str, msg: Message[str]) -> str:
            return text

    with pytest.raises(ValueError, match="hedge_after"):
        CallPolicy(timeout=1, hedge_after=0.5)
