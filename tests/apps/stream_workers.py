"""A durable work-queue worker that the stream fault tests run with ``natskit run``.

Each job reports on core NATS when it starts and when it is done, with the worker's
PID, so the test can count lost and duplicated work per process.
"""

from __future__ import annotations

import asyncio
import os

import msgspec

from natskit import App, StreamSpec


class Job(msgspec.Struct):
    n: int
    sleep: float = 0.0


class Report(msgspec.Struct):
    n: int
    pid: int


JOBS = StreamSpec(name="JOBS", subjects=("jobs.>",), retention="workqueue")
BATCH = 20
CONCURRENCY = 8

app = App("stream-worker", version="1.0.0", drain_timeout=20)
app.stream(JOBS)


@app.consume(
    stream="JOBS",
    durable="workers",
    batch=BATCH,
    max_concurrency=CONCURRENCY,
    ack_wait=3.0,
)
async def work(job: Job) -> None:
    await app.publish("reports.started", Report(n=job.n, pid=os.getpid()))
    if job.sleep:
        await asyncio.sleep(job.sleep)  # the job's work
    await app.publish("reports.done", Report(n=job.n, pid=os.getpid()))
