"""Publish-subscribe and queue groups against a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import msgspec
import nats
import pytest

import natskit
from natskit import App, Message
from natskit.testing import wait_until


class UserEvent(msgspec.Struct):
    user_id: int
    kind: str


@dataclasses.dataclass
class Task:
    task_id: int


async def test_subscribe_wildcards_deliver_matching_subjects_only(
    nats_url: str,
) -> None:
    app = App("wild")
    star: list[str] = []
    tail: list[str] = []

    @app.subscribe("events.user.*")
    async def on_star(event: UserEvent, msg: Message[UserEvent]) -> None:
        assert msg.payload is event
        star.append(msg.subject)

    @app.subscribe("events.>")
    async def on_tail(event: UserEvent, msg: Message[UserEvent]) -> None:
        tail.append(msg.subject)

    async with app:
        for subject in (
            "events.user.a",
            "events.user.a.b",
            "events.order.x",
            "other.user.a",
        ):
            await app.publish(subject, UserEvent(user_id=1, kind="k"))
        await app.publish("events.user.z", UserEvent(user_id=2, kind="last"))
        await app.flush()
        await wait_until(lambda: len(star) == 2 and len(tail) == 4)
    assert star == ["events.user.a", "events.user.z"]
    assert tail == [
        "events.user.a",
        "events.user.a.b",
        "events.order.x",
        "events.user.z",
    ]


async def test_several_handlers_on_one_subject_each_get_every_message(
    nats_url: str,
) -> None:
    app = App("fanout")
    first: list[int] = []
    second: list[int] = []

    @app.subscribe("fan.out")
    async def one(event: UserEvent) -> None:
        first.append(event.user_id)

    @app.subscribe("fan.out")
    async def two(event: UserEvent) -> None:
        second.append(event.user_id)

    async with app:
        for i in range(100):
            await app.publish("fan.out", UserEvent(user_id=i, kind="x"))
        await wait_until(lambda: len(first) == 100 and len(second) == 100)
    assert first == second == list(range(100))


async def test_queue_group_splits_load_and_the_sum_is_exact(nats_url: str) -> None:
    received: dict[str, list[int]] = {"a": [], "b": []}
    apps = []
    for name in ("a", "b"):
        app = App("worker")

        @app.subscribe("task.queue", queue="workers")
        async def work(task: Task, _name: str = name) -> None:
            received[_name].append(task.task_id)

        apps.append(app)
    publisher = App("publisher")
    for app in [*apps, publisher]:
        await app.start()
    try:
        total = 2000
        for i in range(total):
            await publisher.publish("task.queue", Task(task_id=i))
        await wait_until(lambda: len(received["a"]) + len(received["b"]) >= total)
        await asyncio.sleep(0.1)  # a duplicate, if any, would arrive now
    finally:
        for app in [publisher, *apps]:
            await app.stop()
    assert received["a"] and received["b"], "each member must get a share"
    assert sorted(received["a"] + received["b"]) == list(range(total))


async def test_publish_headers_reach_the_handler(nats_url: str) -> None:
    app = App("headers")
    seen: list[dict[str, str]] = []

    @app.subscribe("with.headers")
    async def handle(text: str, msg: Message[str]) -> None:
        seen.append(dict(msg.headers))

    async with app:
        await app.publish("with.headers", "hi", headers={"X-Trace": "abc"})
        await wait_until(lambda: bool(seen))
    assert seen[0]["X-Trace"] == "abc"
    assert seen[0]["Content-Type"].startswith("text/plain")


async def test_handler_that_raises_is_logged_counted_and_the_subscription_goes_on(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("crashy")
    ok: list[int] = []

    @app.subscribe("crash.test")
    async def handle(event: UserEvent) -> None:
        if event.kind == "boom":
            raise RuntimeError("handler exploded")
        ok.append(event.user_id)

    async with app:
        await app.publish("crash.test", UserEvent(user_id=1, kind="boom"))
        await app.publish("crash.test", UserEvent(user_id=2, kind="fine"))
        await wait_until(lambda: ok == [2])
        stats = app.sources[0].pipeline.stats  # type: ignore[attr-defined]
        assert stats.received == 2
        assert stats.errors == 1
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert records and records[0].exc_info is not None
    assert "crash.test" in records[0].getMessage()


async def test_undecodable_payload_is_reported_without_the_payload(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("decoder")
    ok: list[int] = []

    @app.subscribe("decode.test")
    async def handle(event: UserEvent) -> None:
        ok.append(event.user_id)

    nc = await nats.connect(nats_url)
    async with app:
        await nc.publish("decode.test", b'{"user_id": "SECRET-PAYLOAD", "kind": 1}')
        await nc.publish("decode.test", b"not json at all SECRET-PAYLOAD")
        await app.publish("decode.test", UserEvent(user_id=7, kind="good"))
        await wait_until(lambda: ok == [7])
        stats = app.sources[0].pipeline.stats  # type: ignore[attr-defined]
        assert stats.decode_errors == 2
    await nc.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    decode_lines = [w for w in warnings if "did not decode" in w]
    assert len(decode_lines) == 1, "repeats within the interval are counted, not logged"
    assert all("decode.test" in w and "UserEvent" in w for w in decode_lines)
    assert not any("SECRET-PAYLOAD" in r.getMessage() for r in caplog.records)


async def test_a_request_to_a_subscriber_gets_the_return_value_or_error_headers(
    nats_url: str,
) -> None:
    app = App("replier")

    @app.subscribe("echo.upper")
    async def upper(text: str) -> str:
        if text == "fail":
            raise RuntimeError("no")
        return text.upper()

    async with app:
        nc = await nats.connect(nats_url)
        reply = await nc.request("echo.upper", b"hello", timeout=2)
        assert reply.data == b"HELLO"
        failed = await nc.request("echo.upper", b"fail", timeout=2)
        assert failed.headers is not None
        assert failed.headers["Nats-Service-Error-Code"] == "500"
        bad = await nc.request("echo.upper", b"\xff\xfe", timeout=2)
        assert bad.headers is not None
        assert bad.headers["Nats-Service-Error-Code"] == "400"
        await nc.close()


async def test_max_concurrency_runs_handlers_in_parallel_within_the_bound(
    nats_url: str,
) -> None:
    app = App("parallel")
    running = 0
    peak = 0
    done = 0
    release = asyncio.Event()

    @app.subscribe("slow.work", max_concurrency=4)
    async def slow(task: Task) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    async with app:
        for i in range(10):
            await app.publish("slow.work", Task(task_id=i))
        await wait_until(lambda: running == 4)
        release.set()
        await wait_until(lambda: done == 10)
    assert peak == 4


async def test_msgpack_and_dict_payloads_round_trip(nats_url: str) -> None:
    app = App("codecs")
    seen: list[Any] = []

    @app.subscribe("codec.dict")
    async def as_dict(value: dict[str, int]) -> None:
        seen.append(value)

    async with app:
        await app.publish("codec.dict", {"a": 1}, content_type="application/msgpack")
        await app.publish("codec.dict", {"b": 2})
        await wait_until(lambda: len(seen) == 2)
    assert seen == [{"a": 1}, {"b": 2}]


async def test_middleware_wraps_every_message_in_order(nats_url: str) -> None:
    app = App("mw")
    trail: list[str] = []

    async def outer(msg: Message[Any], call_next: natskit.Next) -> Any:
        trail.append("outer-in")
        result = await call_next(msg)
        trail.append("outer-out")
        return result

    async def inner(msg: Message[Any], call_next: natskit.Next) -> Any:
        trail.append(f"inner:{msg.subject}")
        return await call_next(msg)

    app.use(outer)
    app.use(inner)

    @app.subscribe("mw.test")
    async def handle(text: str) -> None:
        trail.append(f"handler:{text}")

    async with app:
        await app.publish("mw.test", "x")
        await wait_until(lambda: "outer-out" in trail)
    assert trail == ["outer-in", "inner:mw.test", "handler:x", "outer-out"]


async def test_slow_consumer_drops_are_counted_and_reported(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("sluggish")
    release = asyncio.Event()
    handled = 0

    @app.subscribe("slow.events", pending_msgs_limit=10)
    async def crawl(event: UserEvent) -> None:
        nonlocal handled
        await release.wait()
        handled += 1

    publisher = await nats.connect(nats_url)
    async with app:
        for i in range(100):
            await publisher.publish(
                "slow.events", msgspec.json.encode(UserEvent(i, "k"))
            )
        await publisher.flush()
        await wait_until(lambda: sum(app.events.slow_consumer_drops.values()) >= 80)
        release.set()
        await wait_until(lambda: handled >= 10)
    await publisher.close()
    dropped = app.events.slow_consumer_drops["slow.events"]
    assert handled + dropped == 100, "every message is either handled or counted"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("slow consumer on slow.events" in w and "dropped" in w for w in warnings)
