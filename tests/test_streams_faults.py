"""Fault tests for durable work queues: killed workers, a killed server, SIGTERM.

Workers run in their own processes (``natskit run``) and are killed by their PID.
Every test counts lost and duplicated messages and asserts both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from natskit import App, Message, Outgoing, PublishRetry, StreamSpec
from natskit.server import EmbeddedServer
from natskit.streams import JetStreamApi
from natskit.testing import wait_until
from tests.apps.stream_workers import BATCH, CONCURRENCY, JOBS, Job, Report
from tests.test_streams import eventually

ROOT = Path(__file__).resolve().parent.parent
STREAM_WORKERS = "tests.apps.stream_workers:app"


def worker(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NATS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "natskit", "run", STREAM_WORKERS, "--server", url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


class Reports:
    """What the workers said they started and finished, per job and process."""

    def __init__(self) -> None:
        self.started: list[tuple[int, int]] = []
        self.done: list[tuple[int, int]] = []

    async def listen(self, nc: nats.aio.client.Client) -> None:
        async def started(msg: nats.aio.msg.Msg) -> None:
            report = msgspec.json.decode(msg.data, type=Report)
            self.started.append((report.n, report.pid))

        async def done(msg: nats.aio.msg.Msg) -> None:
            report = msgspec.json.decode(msg.data, type=Report)
            self.done.append((report.n, report.pid))

        await nc.subscribe("reports.started", cb=started)
        await nc.subscribe("reports.done", cb=done)
        await nc.flush()

    def by(self, pid: int) -> list[int]:
        return [n for n, p in self.done if p == pid]


async def stream_messages(nc: nats.aio.client.Client, name: str) -> int:
    info = await JetStreamApi(nc).stream_info(name)
    return int(info["state"]["messages"])


async def eventually_empty(nc: nats.aio.client.Client, name: str) -> None:
    async def empty() -> bool:
        return await stream_messages(nc, name) == 0

    await eventually(empty)


async def test_killed_worker_loses_nothing_and_duplicates_only_its_in_flight(
    nats_url: str, workers: list[subprocess.Popen[str]]
) -> None:
    app = App("producer")
    app.stream(JOBS)
    await app.start()
    reports = Reports()
    await reports.listen(app.nc)
    workers.extend(worker(nats_url) for _ in range(3))
    victim = workers[0]
    await app.js_publish_many((f"jobs.{n}", Job(n=n, sleep=0.003)) for n in range(5000))
    await wait_until(lambda: len(reports.by(victim.pid)) >= 150, timeout=30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = len(reports.done)
    await wait_until(lambda: len({n for n, _ in reports.done}) == 5000, timeout=60)
    await eventually_empty(app.nc, "JOBS")
    await app.flush()
    await app.stop()

    counts = Counter(n for n, _ in reports.done)
    lost = 5000 - len(counts)
    duplicated = [n for n, c in counts.items() if c > 1]
    assert lost == 0
    assert killed_at < 5000, "the worker was killed after the work was done"
    # Only what the killed worker held (fetched, running) can be processed twice.
    assert len(duplicated) <= BATCH + CONCURRENCY
    for n in duplicated:
        first_pid = next(p for m, p in reports.done if m == n)
        assert first_pid == victim.pid
    assert all(len(reports.by(w.pid)) > 0 for w in workers[1:])


async def test_sigterm_finishes_in_flight_jobs_and_loses_nothing(
    nats_url: str, workers: list[subprocess.Popen[str]]
) -> None:
    app = App("producer")
    app.stream(JOBS)
    await app.start()
    reports = Reports()
    await reports.listen(app.nc)
    first = worker(nats_url)
    workers.append(first)
    await app.js_publish_many((f"jobs.{n}", Job(n=n, sleep=0.4)) for n in range(60))
    await wait_until(lambda: len(reports.started) >= CONCURRENCY, timeout=20)
    first.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(first.communicate, timeout=30)
    assert first.returncode == 0, err
    started_by_first = {n for n, p in reports.started if p == first.pid}
    await app.flush()
    # In flight at the signal: finished before exit, not abandoned.
    assert started_by_first <= set(reports.by(first.pid))
    assert len(started_by_first) < 60
    second = worker(nats_url)
    workers.append(second)
    await wait_until(lambda: len({n for n, _ in reports.done}) == 60, timeout=30)
    await eventually_empty(app.nc, "JOBS")
    await app.stop()
    counts = Counter(n for n, _ in reports.done)
    assert (60 - len(counts), sum(c - 1 for c in counts.values())) == (0, 0)
    assert "draining" in err


async def test_server_killed_three_times_while_publishing_stores_each_once(
    nats_server: EmbeddedServer, nats_url: str
) -> None:
    total = 10_000
    app = App("through-crashes")
    app.stream(StreamSpec(name="EVENTS", subjects=("events.>",)))
    processed: Counter[int] = Counter()

    @app.consume(stream="EVENTS", durable="count", ack_wait=2.0, batch=100)
    async def count(job: Job, msg: Message[Job]) -> None:
        processed[job.n] += 1

    produced = 0

    def items() -> Iterator[Outgoing]:
        nonlocal produced
        for n in range(total):
            produced += 1
            yield Outgoing(subject=f"events.{n % 7}", value=Job(n=n), msg_id=f"e-{n}")

    async def crash_three_times() -> None:
        for threshold in (2_500, 5_000, 7_500):
            await wait_until(lambda t=threshold: produced >= t, timeout=60)  # type: ignore[misc]
            await asyncio.to_thread(nats_server.kill)
            await asyncio.to_thread(nats_server.restart)

    await app.start()
    crasher = asyncio.create_task(crash_three_times())
    acks = await app.js_publish_many(
        items(), retry=PublishRetry(attempts=40, timeout=1.0), max_in_flight=256
    )
    await crasher
    await wait_until(lambda: len(processed) == total, timeout=60)
    stored: Counter[int] = Counter()
    async for message in app.replay("EVENTS"):
        stored[message.decode(Job).n] += 1
    await app.stop()

    assert len(acks) == total
    assert (total - len(stored), sum(c - 1 for c in stored.values())) == (0, 0)
    assert len({a.seq for a in acks}) == total  # type: ignore[union-attr]
    lost = total - len(processed)
    duplicated = sum(c - 1 for c in processed.values())
    assert lost == 0
    # At least once: a SIGKILLed server restores its consumer state as last written,
    # which can lag the acks it had processed, so those messages come again. Each
    # crash can redeliver at most the consumer's max_ack_pending (1,000).
    assert duplicated <= 3 * 1000, duplicated
