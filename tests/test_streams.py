"""Streams and durable consumers on JetStream, against a real nats-server.

Each test that moves messages counts what was lost and what was duplicated.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable

import msgspec
import nats
import pytest

from natskit import (
    App,
    Message,
    Outgoing,
    PublishFailed,
    PublishRetry,
    Redelivery,
    Reject,
    Retry,
    SpecConflict,
    StreamSpec,
    SubjectsOverlap,
)
from natskit.streams import DeadLetter, JetStreamApi, dead_letters, redrive
from natskit.streams.specs import patterns_overlap
from natskit.testing import wait_until


class Order(msgspec.Struct):
    n: int
    sent: float = 0.0
    fail: int = 0


def orders_stream(**overrides: object) -> StreamSpec:
    fields: dict[str, object] = {"name": "ORDERS", "subjects": ("order.>",)}
    fields.update(overrides)
    return StreamSpec(**fields)  # type: ignore[arg-type]


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 15.0
) -> None:
    """Like ``wait_until``, for a check that asks the server."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.05)


async def stream_state(url: str, name: str) -> dict[str, int]:
    nc = await nats.connect(url)
    try:
        info = await JetStreamApi(nc).stream_info(name)
    finally:
        await nc.close()
    state: dict[str, int] = info["state"]
    return state


# -- pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("order.>", "order.eu", True),
        ("order.*", "order.eu.x", False),
        ("order.*.x", "order.eu.*", True),
        ("order", "order.>", False),
        (">", "a", True),
        ("a.b", "a.c", False),
        ("a.*", "*.b", True),
    ],
)
def test_patterns_overlap_when_a_subject_matches_both(
    a: str, b: str, overlap: bool
) -> None:
    assert patterns_overlap(a, b) is overlap
    assert patterns_overlap(b, a) is overlap


def test_redelivery_schedule_grows_with_jitter_floor_and_cap() -> None:
    schedule = Redelivery(base=1.0, cap=10.0, jitter=0.2)
    assert [schedule.ceiling(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    assert schedule.floor(3) == pytest.approx(3.2)
    assert schedule.delay(3, rand=lambda: 0.0) == pytest.approx(3.2)
    assert schedule.delay(3, rand=lambda: 1.0) == pytest.approx(4.0)


def test_specs_reject_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match="may hold only"):
        StreamSpec(name="A.B", subjects=("a",))
    with pytest.raises(ValueError, match=r"'a\.>' and 'a\.b' overlap"):
        StreamSpec(name="A", subjects=("a.>", "a.b"))
    with pytest.raises(ValueError, match="retention"):
        StreamSpec(name="A", subjects=("a",), retention="queue")  # type: ignore[arg-type]
    app = App("bad")
    with pytest.raises(ValueError, match="max_deliver"):
        app.consume(stream="A", durable="d", max_deliver=0)
    app.stream(StreamSpec(name="A", subjects=("a.>",)))
    app.stream(StreamSpec(name="B", subjects=("c", "b.>")))
    with pytest.raises(
        ValueError, match=r"stream C: subject 'a\.x' overlaps 'a\.>' of stream A"
    ):
        app.stream(StreamSpec(name="C", subjects=("a.x",)))


# -- declaring ------------------------------------------------------------------------


async def test_stream_is_created_then_updated_in_place(nats_url: str) -> None:
    first = App("decl")
    first.stream(orders_stream(max_msgs=100))
    async with first:
        pass
    second = App("decl")
    second.stream(orders_stream(max_msgs=200, subjects=("order.>", "refund.>")))
    async with second:
        info = await JetStreamApi(second.nc).stream_info("ORDERS")
    assert info["config"]["max_msgs"] == 200
    assert sorted(info["config"]["subjects"]) == ["order.>", "refund.>"]


async def test_spec_conflict_names_field_old_and_new(nats_url: str) -> None:
    app = App("decl")
    app.stream(orders_stream())

    @app.consume(stream="ORDERS", durable="ship")
    async def ship(order: Order) -> None:
        pass

    async with app:
        pass
    storage = App("decl")
    storage.stream(orders_stream(storage="memory"))
    with pytest.raises(SpecConflict) as caught:
        await storage.start()
    assert (caught.value.field, caught.value.old, caught.value.new) == (
        "storage",
        "file",
        "memory",
    )
    assert "'storage' is 'file' on the server and 'memory'" in str(caught.value)

    deliver = App("decl")

    @deliver.consume(stream="ORDERS", durable="ship", deliver="new")
    async def ship_new(order: Order) -> None:
        pass

    with pytest.raises(SpecConflict) as caught:
        await deliver.start()
    assert caught.value.field == "deliver_policy"
    assert (caught.value.old, caught.value.new) == ("all", "new")
    assert caught.value.consumer == "ship"
    assert not deliver.started


async def test_overlapping_stream_on_the_server_names_both_streams(
    nats_url: str,
) -> None:
    app = App("one")
    app.stream(orders_stream())
    async with app:
        pass
    other = App("two")
    other.stream(StreamSpec(name="EU_ORDERS", subjects=("order.eu.*",)))
    with pytest.raises(SubjectsOverlap) as caught:
        await other.start()
    assert caught.value.stream == "EU_ORDERS"
    assert caught.value.other == "ORDERS"
    assert "'order.eu.*' overlaps 'order.>' of stream 'ORDERS'" in str(caught.value)


# -- publishing -----------------------------------------------------------------------


async def test_js_publish_with_a_message_id_is_stored_once(nats_url: str) -> None:
    app = App("pub")
    app.stream(orders_stream())
    async with app:
        first = await app.js_publish("order.1", Order(n=1), msg_id="order-1")
        again = await app.js_publish("order.1", Order(n=1), msg_id="order-1")
        other = await app.js_publish("order.2", Order(n=2))
    assert (first.stream, first.seq, first.duplicate) == ("ORDERS", 1, False)
    assert (again.seq, again.duplicate) == (1, True)
    assert (other.seq, other.duplicate) == (2, False)
    assert (await stream_state(nats_url, "ORDERS"))["messages"] == 2


async def test_js_publish_many_checks_every_ack_in_order(nats_url: str) -> None:
    app = App("pub")
    app.stream(orders_stream())
    async with app:
        acks = await app.js_publish_many(
            (
                Outgoing(subject=f"order.{n}", value=Order(n=n), msg_id=f"o-{n}")
                for n in range(2000)
            ),
            max_in_flight=64,
        )
        assert [a.seq for a in acks if not isinstance(a, PublishFailed)] == list(
            range(1, 2001)
        )
        mixed = await app.js_publish_many(
            [("order.x", Order(n=1)), ("nowhere.x", Order(n=2))],
            retry=PublishRetry(attempts=2, timeout=1.0),
            return_exceptions=True,
        )
        assert not isinstance(mixed[0], PublishFailed)
        assert isinstance(mixed[1], PublishFailed)
        assert mixed[1].attempts == 2
        assert "no responders" in mixed[1].reason
        with pytest.raises(PublishFailed, match=r"nowhere\.y"):
            await app.js_publish_many(
                [("nowhere.y", b"x")], retry=PublishRetry(attempts=1)
            )
    assert (await stream_state(nats_url, "ORDERS"))["messages"] == 2001


# -- consuming ------------------------------------------------------------------------


async def test_consumer_processes_each_message_once_and_acks(nats_url: str) -> None:
    app = App("work")
    app.stream(orders_stream(retention="workqueue"))
    seen: Counter[int] = Counter()

    @app.consume(stream="ORDERS", durable="ship", batch=50, max_concurrency=8)
    async def ship(order: Order, msg: Message[Order]) -> None:
        assert msg.delivery is not None and msg.delivery.stream == "ORDERS"
        seen[order.n] += 1

    async with app:
        await app.js_publish_many((f"order.{n}", Order(n=n)) for n in range(1000))
        await wait_until(lambda: len(seen) == 1000)
        await wait_until(lambda: app.sources[0].held == 0)  # type: ignore[attr-defined]
    lost = 1000 - len(seen)
    duplicated = sum(count - 1 for count in seen.values())
    assert (lost, duplicated) == (0, 0)
    await wait_until_empty(nats_url, "ORDERS")


async def wait_until_empty(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    api = JetStreamApi(nc)

    async def empty() -> bool:
        return int((await api.stream_info(stream))["state"]["messages"]) == 0

    try:
        await eventually(empty)
    finally:
        await nc.close()


async def dead_letters_when(nc: nats.aio.client.Client, count: int) -> list[DeadLetter]:
    """The dead letters, once there are ``count`` of them (fails after a timeout)."""
    letters: list[DeadLetter] = []

    async def enough() -> bool:
        letters[:] = [letter async for letter in dead_letters(nc)]
        return len(letters) >= count

    await eventually(enough)
    return letters


async def test_undecodable_messages_go_to_the_dlq_without_holding_up_others(
    nats_url: str,
) -> None:
    app = App("decode")
    app.stream(orders_stream())
    latency: dict[int, float] = {}
    handled: Counter[int] = Counter()

    @app.consume(stream="ORDERS", durable="ship", batch=100, max_concurrency=8)
    async def ship(order: Order) -> None:
        latency[order.n] = time.time() - order.sent
        handled[order.n] += 1

    async with app:
        items: list[Outgoing] = []
        for n in range(1000):
            if n % 20 == 7:  # 50 of them
                items.append(
                    Outgoing(
                        subject=f"order.{n}",
                        value=b'{"n": "not a number"',
                        content_type="application/json",
                    )
                )
            else:
                items.append(Outgoing(subject=f"order.{n}", value=Order(n=n)))

        def stamped() -> object:
            for item in items:
                if isinstance(item.value, Order):
                    item.value.sent = time.time()
                yield item

        await app.js_publish_many(stamped())  # type: ignore[arg-type]
        await wait_until(lambda: len(handled) == 950, timeout=20)
        letters = await dead_letters_when(app.nc, 50)
    lost = 950 - len(handled)
    duplicated = sum(c - 1 for c in handled.values())
    assert (lost, duplicated) == (0, 0)
    origins = Counter(letter.stream_sequence for letter in letters)
    assert len(letters) == 50 and all(c == 1 for c in origins.values())
    assert {letter.subject for letter in letters} == {
        f"order.{n}" for n in range(1000) if n % 20 == 7
    }
    assert all(letter.error == "DecodeError" for letter in letters)
    assert all("did not decode into Order" in letter.reason for letter in letters)
    assert all(letter.deliveries == 1 for letter in letters)
    assert max(latency.values()) < 1.0, "a good message waited behind a bad one"


async def test_failures_are_redelivered_after_growing_delays_then_dead_lettered(
    nats_url: str,
) -> None:
    schedule = Redelivery(base=0.2, cap=1.0, jitter=0.5)
    app = App("retry")
    app.stream(orders_stream())
    starts: dict[int, list[float]] = defaultdict(list)
    failures: dict[int, list[float]] = defaultdict(list)
    succeeded: Counter[int] = Counter()

    @app.consume(
        stream="ORDERS", durable="ship", max_deliver=4, retry=schedule, batch=100
    )
    async def ship(order: Order, msg: Message[Order]) -> None:
        assert msg.delivery is not None
        starts[order.n].append(time.monotonic())
        assert msg.delivery.num_delivered == len(starts[order.n])
        if len(starts[order.n]) <= order.fail:
            failures[order.n].append(time.monotonic())
            if order.fail > 2:
                raise ValueError("always failing")  # logged with a traceback
            raise retry_later(order)
        succeeded[order.n] += 1

    async with app:
        await app.js_publish_many(
            (
                f"order.{n}",
                Order(n=n, fail=2 if n < 100 else 99 if n < 120 else 0),
            )
            for n in range(500)
        )
        await wait_until(lambda: len(succeeded) == 480, timeout=30)
        letters = await dead_letters_when(app.nc, 20)
    assert (480 - len(succeeded), sum(c - 1 for c in succeeded.values())) == (0, 0)
    assert all(len(starts[n]) == 3 for n in range(100)), "third delivery succeeds"
    assert all(len(starts[n]) == 4 for n in range(100, 120))
    assert all(len(starts[n]) == 1 for n in range(120, 500))
    assert sorted(int(letter.subject.split(".")[1]) for letter in letters) == list(
        range(100, 120)
    )
    assert {letter.deliveries for letter in letters} == {4}
    for n, failed_at in failures.items():
        for delivery, when in enumerate(failed_at, start=1):
            if delivery < len(starts[n]):
                gap = starts[n][delivery] - when
                assert gap >= schedule.floor(delivery), (n, delivery, gap)


def retry_later(order: Order) -> Exception:
    return Retry(f"order {order.n}: try again later")


async def test_rejected_message_is_dead_lettered_and_can_be_redriven(
    nats_url: str,
) -> None:
    app = App("redrive")
    app.stream(orders_stream())
    handled: list[int] = []
    rejected: list[int] = []

    @app.consume(stream="ORDERS", durable="ship")
    async def ship(order: Order, msg: Message[Order]) -> None:
        if order.n == 1 and not rejected:
            rejected.append(order.n)
            raise Reject("customer unknown")
        assert "Natskit-Dlq-Reason" not in msg.headers
        handled.append(order.n)

    async with app:
        await app.js_publish("order.1", Order(n=1), headers={"Trace": "t-1"})
        await app.js_publish("order.2", Order(n=2))
        await wait_until(lambda: handled == [2] and bool(rejected))
        (letter,) = await dead_letters_when(app.nc, 1)
        assert (letter.error, letter.reason, letter.deliveries) == (
            "Reject",
            "customer unknown",
            1,
        )
        assert (letter.stream, letter.consumer, letter.subject) == (
            "ORDERS",
            "ship",
            "order.1",
        )
        assert letter.message.headers["Trace"] == "t-1"
        await redrive(app.nc, letter.sequence)
        await wait_until(lambda: handled == [2, 1])
        assert [x async for x in dead_letters(app.nc)] == []


async def test_slow_handler_keeps_its_message_with_in_progress_acks(
    nats_url: str,
) -> None:
    app = App("slow")
    app.stream(orders_stream())
    deliveries: Counter[int] = Counter()
    finished: list[int] = []

    @app.consume(stream="ORDERS", durable="ship", ack_wait=1.0, max_concurrency=4)
    async def ship(order: Order) -> None:
        deliveries[order.n] += 1
        await asyncio.sleep(2.5)  # the work itself: longer than ack wait
        finished.append(order.n)

    async with app:
        await app.js_publish_many((f"order.{n}", Order(n=n)) for n in range(6))
        await wait_until(lambda: len(finished) == 6, timeout=20)
        info = await JetStreamApi(app.nc).consumer_info("ORDERS", "ship")
    assert sorted(finished) == list(range(6))
    assert all(count == 1 for count in deliveries.values()), deliveries
    assert info["num_redelivered"] == 0


async def test_replay_from_sequence_time_and_subject_in_order(nats_url: str) -> None:
    app = App("replay")
    app.stream(orders_stream())
    async with app:
        for n in range(1, 21):
            await app.js_publish(f"order.{'eu' if n % 2 else 'us'}", Order(n=n))
        eleventh = await JetStreamApi(app.nc).get_message("ORDERS", 11)
        assert eleventh.time is not None
        from_seq = [m async for m in app.replay("ORDERS", from_seq=5)]
        since = [m async for m in app.replay("ORDERS", since=eleventh.time)]
        eu = [m async for m in app.replay("ORDERS", subject="order.eu")]
        everything = [m async for m in app.replay("ORDERS")]
        beyond = [m async for m in app.replay("ORDERS", from_seq=99)]
    assert [m.sequence for m in from_seq] == list(range(5, 21))
    assert [m.decode(Order).n for m in from_seq] == list(range(5, 21))
    assert [m.sequence for m in since] == list(range(11, 21))
    assert [m.sequence for m in eu] == list(range(1, 21, 2))
    assert {m.subject for m in eu} == {"order.eu"}
    assert [m.sequence for m in everything] == list(range(1, 21))
    assert beyond == []


class Shipment(msgspec.Struct):
    order: int


async def test_pipeline_stage_publishes_results_once_with_exactly_once_acks(
    nats_url: str,
) -> None:
    app = App("pipe")
    app.stream(orders_stream())
    app.stream(StreamSpec(name="SHIPMENTS", subjects=("shipment.>",)))
    shipped: Counter[int] = Counter()

    @app.consume(
        stream="ORDERS",
        durable="ship",
        publish_to="shipment.created",
        exactly_once=True,
    )
    async def ship(order: Order) -> Shipment:
        return Shipment(order=order.n)

    @app.consume(stream="SHIPMENTS", durable="notify", exactly_once=True)
    async def notify(shipment: Shipment) -> None:
        shipped[shipment.order] += 1

    async with app:
        await app.js_publish_many((f"order.{n}", Order(n=n)) for n in range(200))
        await wait_until(lambda: len(shipped) == 200, timeout=20)
        # A redelivered stage-one message would publish with the same derived id:
        again = await app.js_publish(
            "shipment.created", Shipment(order=0), msg_id="ORDERS.1.out"
        )
        stored = [m async for m in app.replay("SHIPMENTS")]
        ship_info = await JetStreamApi(app.nc).consumer_info("ORDERS", "ship")
    assert again.duplicate
    assert (200 - len(shipped), sum(c - 1 for c in shipped.values())) == (0, 0)
    assert len(stored) == 200
    assert {m.headers["Nats-Msg-Id"] for m in stored} == {
        f"ORDERS.{seq}.out" for seq in range(1, 201)
    }
    assert ship_info["num_ack_pending"] == 0


async def test_stop_finishes_in_flight_and_returns_unstarted_at_once(
    nats_url: str,
) -> None:
    first = App("drain", drain_timeout=10)
    first.stream(orders_stream(retention="workqueue"))
    started: list[int] = []
    done_first: Counter[int] = Counter()
    release = asyncio.Event()

    @first.consume(stream="ORDERS", durable="work", max_concurrency=2, batch=20)
    async def slow(order: Order) -> None:
        started.append(order.n)
        await release.wait()
        done_first[order.n] += 1

    second = App("drain")
    done_second: Counter[int] = Counter()

    @second.consume(stream="ORDERS", durable="work")
    async def fast(order: Order) -> None:
        done_second[order.n] += 1

    await first.start()
    await first.js_publish_many((f"order.{n}", Order(n=n)) for n in range(30))
    await wait_until(lambda: len(started) == 2)
    await wait_until(lambda: first.sources[0].held == 20)  # type: ignore[attr-defined]
    stopping = asyncio.create_task(first.stop())
    await asyncio.sleep(0)
    release.set()
    await stopping
    assert sorted(done_first) == sorted(started)
    await second.start()
    try:
        # Returned with a nak: delivered again at once, not after ack wait (30 s).
        await wait_until(lambda: len(done_first) + len(done_second) == 30, timeout=5)
    finally:
        await second.stop()
    together = done_first + done_second
    assert (30 - len(together), sum(c - 1 for c in together.values())) == (0, 0)
    await wait_until_empty(nats_url, "ORDERS")
