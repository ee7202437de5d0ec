"""What runs inside a scenario's processes: arguments, counting, reporting, publishing.

A scenario process has one of two roles, chosen by the runner with ``--role``:

* a *receiver* (subscriber, queue worker, service) connects, subscribes, then speaks
  this line protocol on stdout: ``ready`` once its subscriptions are flushed to the
  server; then a JSON progress line (``count``, ``dropped``, ``first``, ``last``) every
  :data:`PROGRESS_INTERVAL` seconds while its figures change; then, once the runner
  closes its stdin, a last JSON line with ``"final": true``, and it exits.
* a *driver* (publisher, requester) starts once every receiver is ready, does its work
  and prints one JSON line about it. A scenario whose rate the driver measures
  (``RATE_FROM = "driver"``) reports ``count`` (messages done), ``failed``,
  ``seconds`` and ``rate`` in that line.

A scenario may also have a *setup* process (``--role setup``), run to completion
before each run's receivers start; it prints one JSON line too.

Timestamps are ``time.time()``, so the runner can combine the first and last messages
of several processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors

from benchmarks.payload import sample_event
from natskit import StreamSpec
from natskit.errors import StreamNotFound
from natskit.streams import JetStreamApi

__all__ = [
    "IMPLEMENTATIONS",
    "Args",
    "Tally",
    "connect_plain",
    "pending_limits",
    "publish_events",
    "recreate_stream",
    "run_process",
    "serve_app",
    "serve_client",
]

IMPLEMENTATIONS = ("natskit", "nats-py")
PROGRESS_INTERVAL = 0.2

Receiver = Callable[["Args", "Tally"], Awaitable[None]]
Driver = Callable[["Args"], Awaitable[dict[str, Any]]]
ROLES = ("receiver", "driver", "setup")


@dataclass(frozen=True)
class Args:
    """The command line of one scenario process (``extra``: the variant's own flags)."""

    role: str
    impl: str
    url: str
    count: int
    extra: tuple[str, ...]


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description="one process of a benchmark scenario")
    parser.add_argument("--role", choices=ROLES, default="receiver")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    known, extra = parser.parse_known_args(argv)
    return Args(known.role, known.impl, known.url, known.count, tuple(extra))


def run_process(
    *,
    receivers: Mapping[str, Receiver],
    driver: Driver,
    setup: Driver | None = None,
    argv: list[str] | None = None,
) -> None:
    """The ``main()`` of a scenario module: run the role and implementation asked for."""
    args = parse_args(argv)
    if args.role == "receiver":
        asyncio.run(receivers[args.impl](args, Tally()))
        return
    step = driver if args.role == "driver" else setup
    if step is None:
        raise SystemExit(f"this scenario has no {args.role} role")
    report = asyncio.run(step(args))
    print(json.dumps(report), flush=True)


def pending_limits(count: int) -> dict[str, int]:
    """Client-side pending limits that hold a whole run, so a slow receiver drops nothing.

    Both implementations get the same limits; the server still disconnects a client that
    falls 64 MiB behind, which the runner sees as lost messages.
    """
    return {"pending_msgs_limit": count + 1, "pending_bytes_limit": count * 1024}


class Tally:
    """Counts received messages and remembers when the first and the last arrived."""

    __slots__ = ("count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def hit(self) -> None:
        now = time.time()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def snapshot(self, dropped: int) -> dict[str, Any]:
        return {
            "count": self.count,
            "dropped": dropped,
            "first": self.first,
            "last": self.last,
        }

    async def report_until_stopped(self, dropped: Callable[[], int]) -> None:
        """Print ``ready``, then progress lines until stdin closes, then the final line.

        ``dropped`` returns how many messages the client discarded as a slow consumer.
        """
        print("ready", flush=True)
        stop = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
        shown: dict[str, Any] = {}
        while not stop.done():
            await asyncio.wait({stop}, timeout=PROGRESS_INTERVAL)
            current = self.snapshot(dropped())
            if current != shown:
                print(json.dumps(current), flush=True)
                shown = current
        print(json.dumps({**self.snapshot(dropped()), "final": True}), flush=True)


async def connect_plain(url: str) -> tuple[Any, Callable[[], int]]:
    """Connect with plain nats-py; return the client and a count of slow-consumer drops."""
    drops = 0

    async def on_error(exc: Exception) -> None:
        nonlocal drops
        if isinstance(exc, nats.errors.SlowConsumerError):
            drops += 1
        else:
            print(f"nats-py error: {exc!r}", file=sys.stderr)

    nc = await nats.connect(url, error_cb=on_error, name="bench-nats-py")
    return nc, lambda: drops


async def publish_events(args: Args, subject: str) -> dict[str, Any]:
    """Publish ``args.count`` pre-encoded events as fast as plain nats-py can."""
    data = msgspec.json.encode(sample_event())
    nc, _ = await connect_plain(args.url)
    publish = nc.publish
    started = time.perf_counter()
    for _ in range(args.count):
        await publish(subject, data)
    await nc.flush(timeout=60)
    elapsed = time.perf_counter() - started
    await nc.close()
    return {"published": args.count, "seconds": elapsed, "rate": args.count / elapsed}


async def recreate_stream(nc: Any, spec: StreamSpec) -> None:
    """Delete the stream ``spec`` names, with its consumers, and create it empty.

    The configuration is natskit's own for ``spec``, so an app declaring the same spec
    finds nothing to change, and a plain nats-py client finds the stream it expects.
    """
    api = JetStreamApi(nc)
    try:
        await api.stream_info(spec.name)
    except StreamNotFound:
        pass
    else:
        await api.delete_stream(spec.name)
    await api.create_stream(spec.config())


async def serve_app(app: Any, args: Args, tally: Tally) -> None:
    """Run a natskit receiver: start ``app``, report until told to stop, stop it."""
    await app.start(args.url)
    try:
        await tally.report_until_stopped(
            lambda: sum(app.events.slow_consumer_drops.values())
        )
    finally:
        await app.stop()


async def serve_client(nc: Any, dropped: Callable[[], int], tally: Tally) -> None:
    """Run a plain nats-py receiver whose subscriptions are made: report, then close."""
    await nc.flush()
    try:
        await tally.report_until_stopped(dropped)
    finally:
        await nc.close()
