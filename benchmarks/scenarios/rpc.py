"""``rpc``: request-reply throughput with 64 calls in flight, and sequential round trips.

The service decodes the 128-byte request into the ``Event`` Struct and answers with it
re-encoded. natskit: ``@app.endpoint`` called by ``app.request`` with the default call
policy (2 s timeout, circuit breaker on, deadline header sent). nats-py: a queue-group
subscription answering with ``msg.respond``, called with ``nc.request``; both sides
decode with msgspec. The rate is counted by the service; the sequential variant also
reports the median round trip measured by the caller.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import msgspec

import natskit
from benchmarks.harness import (
    Args,
    Tally,
    connect_plain,
    run_process,
    serve_app,
    serve_client,
)
from benchmarks.observe import observe_if_asked
from benchmarks.payload import Event, sample_event
from benchmarks.scenarios import Variant

NAME = "rpc"
DESCRIPTION = "typed request-reply: 64 in flight, and one at a time (round trip)"
COUNT = 20_000
QUICK_COUNT = 2_000
VARIANTS = (
    Variant("64 in flight", 1, ("--mode", "concurrent")),
    Variant("sequential", 1, ("--mode", "sequential")),
    Variant("64 in flight, traced+metrics", 1, ("--mode", "concurrent", "--observe")),
)
SUBJECT = "bench.rpc"
IN_FLIGHT = 64

_encode = msgspec.json.Encoder().encode


async def serve_natskit(args: Args, tally: Tally) -> None:
    app = natskit.App("bench-service")
    observe_if_asked(app, args.extra)

    @app.endpoint(SUBJECT)
    async def echo(event: Event) -> Event:
        tally.hit()
        return event

    await serve_app(app, args, tally)


async def serve_nats_py(args: Args, tally: Tally) -> None:
    nc, dropped = await connect_plain(args.url)
    decode = msgspec.json.Decoder(Event).decode

    async def echo(msg: Any) -> None:
        event = decode(msg.data)
        tally.hit()
        await msg.respond(_encode(event))

    await nc.subscribe(SUBJECT, queue="q", cb=echo)
    await serve_client(nc, dropped, tally)


async def call(args: Args) -> dict[str, Any]:
    """The driver: the caller of the side under test."""
    mode = args.extra[args.extra.index("--mode") + 1]
    event = sample_event()
    if args.impl == "natskit":
        app = natskit.App("bench-caller")
        observe_if_asked(app, args.extra)
        await app.start(args.url)

        async def once() -> None:
            await app.request(SUBJECT, event, response_type=Event)

        try:
            return await _drive(mode, args.count, once)
        finally:
            await app.stop()
    nc, _ = await connect_plain(args.url)
    decode = msgspec.json.Decoder(Event).decode
    data = _encode(event)

    async def plain_once() -> None:
        reply = await nc.request(SUBJECT, data, timeout=2)
        decode(reply.data)

    try:
        return await _drive(mode, args.count, plain_once)
    finally:
        await nc.close()


async def _drive(mode: str, count: int, once: Any) -> dict[str, Any]:
    if mode == "sequential":
        rtts = []
        for _ in range(count):
            started = time.perf_counter()
            await once()
            rtts.append(time.perf_counter() - started)
        return {"median_rtt_us": statistics.median(rtts) * 1e6}
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await once()

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return {}


def main() -> None:
    run_process(
        receivers={"natskit": serve_natskit, "nats-py": serve_nats_py}, driver=call
    )


if __name__ == "__main__":
    main()
