"""Apps that the CLI tests run in their own processes with ``natskit run``."""

from __future__ import annotations

import asyncio
import os

import msgspec

from natskit import App


class Job(msgspec.Struct):
    n: int
    sleep: float = 0.0


class Done(msgspec.Struct):
    n: int
    pid: int


app = App("test-worker", version="1.0.0", drain_timeout=20)


@app.subscribe("jobs.run", queue="workers", max_concurrency=8)
async def run_job(job: Job) -> None:
    if job.sleep:
        await asyncio.sleep(job.sleep)
    await app.publish("jobs.done", Done(n=job.n, pid=os.getpid()))


@app.subscribe("jobs.echo")
async def echo(text: str) -> str:
    return f"echo:{text}"


def make_app() -> App:
    """A factory, for ``natskit run tests.apps.workers:make_app``."""
    return app


not_an_app = 42
