"""Fault tests on a three-node cluster with a replicated (R3) stream.

The App is the same as on one embedded server; only the addresses change. Nodes are
killed (SIGKILL), frozen (SIGSTOP) and restarted by their own PIDs. Every test counts
what was lost and what was stored more than once, and asserts both; "identical content"
is checked by making each node in turn the stream leader and reading every message
through it, so each replica's own store is read, not just the current leader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import nats
import pytest

from natskit import App, Message, PubAck, PublishRetry, StreamSpec
from natskit.connection import ConnectOptions
from natskit.errors import NatskitError, PublishFailed
from natskit.server import LocalCluster
from natskit.streams import JetStreamApi
from natskit.testing import wait_until

STREAM = StreamSpec(name="EVENTS", subjects=("events.>",), replicas=3)
# Enough attempts to span several leader elections (each takes a few seconds).
RIDE_THROUGH = PublishRetry(attempts=60, timeout=1.0)


class Event(msgspec.Struct):
    n: int


def cluster_options() -> ConnectOptions:
    # A frozen node must be noticed within seconds, not after the default 60 s.
    return ConnectOptions(ping_interval=1.0, max_outstanding_pings=2)


@dataclass
class Tally:
    """What the publishers sent and what the server acknowledged, with ack times."""

    acks: dict[int, PubAck] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)
    failures: dict[int, PublishFailed] = field(default_factory=dict)

    def longest_gap(self, since: float = 0.0) -> float:
        times = sorted(t for t in self.ack_times if t >= since)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def publish_range(
    app: App,
    numbers: range,
    tally: Tally,
    *,
    retry: PublishRetry = RIDE_THROUGH,
    workers: int = 16,
) -> None:
    """Publish every number in ``numbers`` with msg id ``e-<n>``, ``workers`` at a time."""
    todo = iter(numbers)

    async def work() -> None:
        for n in todo:
            try:
                ack = await app.js_publish(
                    f"events.{n % 7}", Event(n=n), msg_id=f"e-{n}", retry=retry
                )
            except PublishFailed as exc:
                tally.failures[n] = exc
                continue
            tally.acks[n] = ack
            tally.ack_times.append(time.monotonic())

    await asyncio.gather(*(work() for _ in range(workers)))


async def stream_info(app: App, *, timeout: float = 30.0) -> dict[str, object]:
    """Stream info, asked again through elections until a leader answers."""
    api = JetStreamApi(app.nc, timeout=2.0)
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await api.stream_info(STREAM.name)
            if info.get("cluster", {}).get("leader"):
                return info
        except NatskitError:
            pass
        assert time.monotonic() < deadline, "no stream leader"
        await asyncio.sleep(0.1)  # polling an election, not synchronising


async def leader_index(app: App, cluster: LocalCluster) -> int:
    info = await stream_info(app)
    leader = info["cluster"]["leader"]  # type: ignore[index]
    return [n.options.server_name for n in cluster.nodes].index(leader)


async def wait_all_current(app: App, last_seq: int, timeout: float = 60.0) -> None:
    """Until both followers are current and the stream holds ``last_seq``."""
    deadline = time.monotonic() + timeout
    while True:
        info = await stream_info(app)
        replicas = info["cluster"].get("replicas") or []  # type: ignore[attr-defined]
        state = info["state"]  # type: ignore[index]
        if (
            len(replicas) == 2
            and all(r.get("current") and not r.get("offline") for r in replicas)
            and state["last_seq"] >= last_seq
        ):
            return
        assert time.monotonic() < deadline, f"replicas not current: {replicas}"
        await asyncio.sleep(0.1)


async def read_through_each_node(
    app: App, cluster: LocalCluster
) -> list[list[tuple[int, str, bytes]]]:
    """Every stored message, read with each node in turn as the stream leader."""
    api = JetStreamApi(app.nc, timeout=5.0)
    contents = []
    for node in cluster.nodes:
        name = node.options.server_name
        deadline = time.monotonic() + 60
        while (await stream_info(app))["cluster"]["leader"] != name:  # type: ignore[index]
            assert time.monotonic() < deadline, f"{name} never became leader"
            with contextlib.suppress(NatskitError):  # an election in progress
                await api.request(
                    f"STREAM.LEADER.STEPDOWN.{STREAM.name}",
                    {"placement": {"preferred": name}},
                )
        info = await stream_info(app)
        last = int(info["state"]["last_seq"])  # type: ignore[index]
        got = []
        for start in range(1, last + 1, 250):
            chunk = await asyncio.gather(
                *(
                    api.get_message(STREAM.name, seq)
                    for seq in range(start, min(start + 250, last + 1))
                )
            )
            got.extend(
                (m.sequence, m.headers.get("Nats-Msg-Id", ""), m.data) for m in chunk
            )
        contents.append(got)
    return contents


def count_stored(
    content: list[tuple[int, str, bytes]],
    total: int,
    *,
    unacked: frozenset[str] = frozenset(),
) -> tuple[int, int]:
    """(lost, unexpected): ids e-0..e-<total-1> missing, and anything else or twice.

    ``unacked`` ids were published without an ack: each may be stored once, or not."""
    ids = Counter(msg_id for _, msg_id, _ in content)
    for msg_id in unacked:
        if ids.get(msg_id) == 1:
            del ids[msg_id]
    expected = {f"e-{n}" for n in range(total)}
    lost = len(expected - ids.keys())
    unexpected = sum(c for i, c in ids.items() if i not in expected) + sum(
        c - 1 for i, c in ids.items() if i in expected
    )
    return lost, unexpected


def assert_acks_match_store(
    tally: Tally, content: list[tuple[int, str, bytes]]
) -> None:
    """No divergence: every acknowledged sequence holds the message acknowledged."""
    by_seq = {seq: msg_id for seq, msg_id, _ in content}
    wrong = [n for n, ack in tally.acks.items() if by_seq.get(ack.seq) != f"e-{n}"]
    assert wrong == [], f"{len(wrong)} acks point at other messages"
    assert len({ack.seq for ack in tally.acks.values()}) == len(tally.acks)


async def test_leader_killed_five_times_while_publishing_loses_nothing(
    nats_cluster: LocalCluster,
) -> None:
    minimum = 5_000
    app = App("cluster-writer", connection=cluster_options())
    app.stream(STREAM)
    consumed: Counter[int] = Counter()

    @app.consume(stream=STREAM.name, durable="count", ack_wait=5.0, batch=100)
    async def count(event: Event, msg: Message[Event]) -> None:
        consumed[event.n] += 1

    await app.start(nats_cluster.urls)
    tally = Tally()
    kills: list[str] = []
    stop = asyncio.Event()

    async def keep_publishing() -> int:
        # In chunks, until the five kills are over and at least 5,000 were published.
        start = 0
        while not (stop.is_set() and start >= minimum):
            await publish_range(app, range(start, start + 200), tally)
            start += 200
        return start

    async def kill_leader_five_times() -> None:
        for _ in range(5):
            base = len(tally.acks)
            await wait_until(lambda b=base: len(tally.acks) >= b + 300, timeout=120)  # type: ignore[misc]
            index = await leader_index(app, nats_cluster)
            kills.append(nats_cluster.nodes[index].options.server_name or "")
            await asyncio.to_thread(nats_cluster.kill, index)
            acked = len(tally.acks)
            # A new leader takes the writes before the old one comes back.
            await wait_until(lambda a=acked: len(tally.acks) > a + 50, timeout=60)  # type: ignore[misc]
            await asyncio.to_thread(nats_cluster.restart, index)

    try:
        started = time.monotonic()
        publisher = asyncio.create_task(keep_publishing())
        await kill_leader_five_times()
        stop.set()
        total = await publisher
        elapsed = time.monotonic() - started
        await wait_all_current(app, total)
        contents = await read_through_each_node(app, nats_cluster)
        await wait_until(lambda: len(consumed) == total, timeout=90)
    finally:
        stop.set()
        await app.stop()

    lost = total - len(consumed)
    redelivered = sum(c - 1 for c in consumed.values())
    print(
        f"\n{total} messages in {elapsed:.1f}s, stream leader killed on "
        f"{', '.join(kills)}; longest write gap {tally.longest_gap():.2f}s; "
        f"consumer: {lost} lost, {redelivered} redelivered"
    )
    assert len(kills) == 5
    assert total >= minimum
    assert (len(tally.failures), len(tally.acks)) == (0, total)
    for content in contents:
        assert count_stored(content, total) == (0, 0)
        assert content == contents[0]
    assert_acks_match_store(tally, contents[0])
    assert lost == 0
    # At least once: messages in flight at the consumer leader when it died come again;
    # never more than the consumer's max_ack_pending (1,000) per kill.
    assert redelivered <= 5 * 1000, redelivered


async def test_frozen_follower_then_frozen_leader_no_divergence(
    nats_cluster: LocalCluster,
) -> None:
    freeze = 20.0
    app = App("cluster-writer", connection=cluster_options())
    app.stream(STREAM)
    await app.start(nats_cluster.urls)
    tally = Tally()
    frozen_windows: list[tuple[float, float]] = []
    pinned = frozenset(f"pinned-{i}" for i in range(3))
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        start = 0
        while not stop.is_set():
            await publish_range(app, range(start, start + 20), tally, workers=4)
            start += 20
            await asyncio.sleep(0.1)  # a steady ~200 messages/s, not synchronisation

    async def freeze_node(index: int) -> None:
        node = nats_cluster.nodes[index]
        # A client pinned to the frozen node (no reconnect elsewhere) gets no ack.
        pinned = await nats.connect(node.url, allow_reconnect=False)
        await asyncio.to_thread(nats_cluster.pause, index)
        began = time.monotonic()
        try:
            js = pinned.jetstream(timeout=1.0)
            with pytest.raises(Exception):  # noqa: B017 - any failure, no ack
                await js.publish(
                    "events.pinned", b"x", headers={"Nats-Msg-Id": f"pinned-{index}"}
                )
            acked_before = len(tally.acks)
            await asyncio.sleep(freeze)  # the fault's duration, not synchronisation
            # Writes went on without the frozen node.
            assert len(tally.acks) > acked_before + 100
        finally:
            await asyncio.to_thread(nats_cluster.resume, index)
            frozen_windows.append((began, time.monotonic()))
            await pinned.close()

    try:
        publisher = asyncio.create_task(keep_publishing())
        await wait_until(lambda: len(tally.acks) >= 500, timeout=60)
        leader = await leader_index(app, nats_cluster)
        follower = (leader + 1) % 3
        await freeze_node(follower)
        leader = await leader_index(app, nats_cluster)
        await freeze_node(leader)
        acked = len(tally.acks)
        await wait_until(lambda: len(tally.acks) >= acked + 500, timeout=60)
        stop.set()
        await publisher
        total = max(tally.acks) + 1
        await wait_all_current(app, len(tally.acks))
        contents = await read_through_each_node(app, nats_cluster)
    finally:
        stop.set()
        await app.stop()

    for began, ended in frozen_windows:
        during = [t for t in tally.ack_times if began <= t <= ended]
        assert during, "no writes while a node was frozen"
    gap = tally.longest_gap()
    print(f"\n{len(tally.acks)} acked, longest write gap {gap:.2f}s")
    assert tally.failures == {}
    for content in contents:
        # A publish sent to a frozen node was never acked; when the node thaws it may
        # still be stored, once.
        assert count_stored(content, total, unacked=pinned) == (0, 0)
        assert content == contents[0]
    assert_acks_match_store(tally, contents[0])


async def test_below_quorum_publishes_fail_clearly_then_resume_with_nothing_lost(
    nats_cluster: LocalCluster,
) -> None:
    app = App("cluster-writer", connection=cluster_options())
    app.stream(STREAM)
    await app.start(nats_cluster.urls)
    tally = Tally()
    try:
        await publish_range(app, range(500), tally)
        survivor = await leader_index(app, nats_cluster)
        victims = [i for i in range(3) if i != survivor]
        for index in victims:
            await asyncio.to_thread(nats_cluster.kill, index)
        short = PublishRetry(attempts=3, timeout=1.0)
        await publish_range(app, range(500, 520), tally, retry=short, workers=4)
        below_quorum = dict(tally.failures)
        for index in victims:
            await asyncio.to_thread(nats_cluster.restart, index)
        await asyncio.to_thread(nats_cluster.wait_healthy, 60)
        # The failed ones again, with the same ids, then more.
        tally.failures.clear()
        await publish_range(app, range(500, 520), tally)
        await publish_range(app, range(520, 1000), tally)
        await wait_all_current(app, 1000)
        contents = await read_through_each_node(app, nats_cluster)
    finally:
        await app.stop()

    assert len(below_quorum) == 20, "publishes succeeded without a quorum"
    reasons = {exc.reason for exc in below_quorum.values()}
    print("\nbelow quorum:", next(iter(below_quorum.values())))
    assert all("majority of its replicas" in reason for reason in reasons), reasons
    assert tally.failures == {}
    assert len(tally.acks) == 1000
    for content in contents:
        assert count_stored(content, 1000) == (0, 0)
        assert content == contents[0]
    assert_acks_match_store(tally, contents[0])
