"""App declarations, lifecycle, drain and reconnect, against a real nats-server."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest

from natskit import App, ConnectError, ConnectOptions, Message, PayloadTooLarge
from natskit.server import EmbeddedServer
from natskit.testing import wait_until


class Event(msgspec.Struct):
    n: int


# -- bad input at declaration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("events user", "whitespace"),
        ("events..user", "empty token"),
        ("events.>.user", ">"),
        ("", "empty"),
        ("events.us*er", "*"),
    ],
)
def test_subscribe_rejects_bad_subjects_naming_them(pattern: str, reason: str) -> None:
    app = App("bad")
    with pytest.raises(ValueError) as info:
        app.subscribe(pattern)
    assert repr(pattern) in str(info.value) or pattern in str(info.value)
    assert reason in str(info.value)


def test_handler_without_annotation_is_refused_naming_it() -> None:
    app = App("bad")
    with pytest.raises(TypeError, match="needs a type annotation"):

        @app.subscribe("a.b")
        async def untyped(event) -> None:  # type: ignore[no-untyped-def]
            pass


def test_sync_handler_is_refused() -> None:
    app = App("bad")
    with pytest.raises(TypeError, match="async def"):

        @app.subscribe("a.b")
        def sync(event: Event) -> None:  # type: ignore[type-var]
            pass


def test_unsupported_payload_type_is_refused_at_declaration() -> None:
    app = App("bad")
    with pytest.raises(TypeError, match="handler"):

        @app.subscribe("a.b")
        async def weird(event: socket.socket) -> None:
            pass


@pytest.mark.parametrize("name", ["has space", "dots.in.name", ""])
def test_app_name_must_suit_the_services_protocol(name: str) -> None:
    with pytest.raises(ValueError, match="App name"):
        App(name)


def test_app_version_must_be_semver() -> None:
    with pytest.raises(ValueError, match="semantic versioning"):
        App("svc", version="1.0")


def test_bad_queue_group_is_refused() -> None:
    app = App("bad")
    with pytest.raises(ValueError, match="queue group"):

        @app.subscribe("a.b", queue="bad queue")
        async def h(event: Event) -> None:
            pass


async def test_publish_rejects_bad_subject_and_oversized_payload(nats_url: str) -> None:
    app = App("pub")
    async with app:
        with pytest.raises(ValueError, match="wildcard"):
            await app.publish("a.*", Event(n=1))
        too_big = b"x" * (app.nc.max_payload + 1)
        with pytest.raises(PayloadTooLarge) as info:
            await app.publish("a.b", too_big)
        assert info.value.limit == app.nc.max_payload
        await app.publish("a.b", b"still usable")
        await app.flush()


async def test_refused_address_retries_then_fails_with_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = ConnectOptions(
        servers=(f"nats://user:hunter2@127.0.0.1:{port}",), first_connect_timeout=0.6
    )
    app = App("nowhere", connection=options)
    with pytest.raises(ConnectError) as info:
        await app.start()
    message = str(info.value)
    assert "connection refused" in message
    assert f"127.0.0.1:{port}" in message
    assert "hunter2" not in message
    assert info.value.attempts >= 2


# -- drain ----------------------------------------------------------------------------


async def test_stop_finishes_in_flight_handlers_before_closing(nats_url: str) -> None:
    app = App("drainer", drain_timeout=10)
    started = 0
    finished = 0

    @app.subscribe("drain.work", max_concurrency=5)
    async def slow(event: Event) -> None:
        nonlocal started, finished
        started += 1
        await asyncio.sleep(0.5)
        finished += 1

    await app.start()
    for i in range(5):
        await app.publish("drain.work", Event(n=i))
    await wait_until(lambda: started == 5)
    await app.stop()
    assert finished == 5
    assert not app.started


async def test_stop_gives_up_on_handlers_past_the_drain_bound(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("stuck", drain_timeout=0.3)
    started = asyncio.Event()

    @app.subscribe("stuck.work", max_concurrency=2)
    async def forever(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    await app.start()
    await app.publish("stuck.work", Event(n=1))
    await asyncio.wait_for(started.wait(), 5)
    await app.stop()
    assert any("did not finish" in r.getMessage() for r in caplog.records)


# -- reconnect ------------------------------------------------------------------------


async def test_subscriptions_survive_a_server_kill_and_restart(
    nats_server: EmbeddedServer,
) -> None:
    app = App("survivor", connection=ConnectOptions(servers=(nats_server.url,)))
    got: list[int] = []

    @app.subscribe("survive.>")
    async def handle(event: Event, msg: Message[Event]) -> None:
        got.append(event.n)

    await app.start()
    try:
        await app.publish("survive.a", Event(n=1))
        await wait_until(lambda: got == [1])
        nats_server.kill()
        await wait_until(lambda: app.events.disconnects >= 1)
        await asyncio.to_thread(nats_server.restart)
        await wait_until(lambda: app.events.reconnects >= 1, timeout=20)
        await app.publish("survive.b", Event(n=2))
        await wait_until(lambda: got == [1, 2])
    finally:
        await app.stop()
