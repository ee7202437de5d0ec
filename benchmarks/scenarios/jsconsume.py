"""``jsconsume``: a durable pull consumer with a per-message ack, from a filled stream.

Before each run a setup process deletes the stream (and with it the consumers), creates
it again, and stores ``COUNT`` 128-byte JSON events in it (plain core publishes, then a
wait until the stream holds them all): that part is not timed. The receiver then
creates its durable consumer and reads the stream to the end; the rate is counted by
the receiver from the first message to the last. The driver has nothing to do.

- natskit: ``@app.consume(stream=..., durable=..., batch=500)`` with a handler
  annotated ``Event``, everything else at its defaults: 16 handlers at once, 5
  deliveries with spaced naks (``Redelivery()``) and the dead-letter stream on,
  in-progress acks for held messages.
- nats-py: ``js.pull_subscribe`` (a durable, server defaults: explicit ack, 1,000 ack
  pending), then the plain loop ``await psub.fetch(500, timeout=1)``, decoding each
  message with a ``msgspec.json.Decoder(Event)`` and ``await msg.ack()``; both timeout
  errors ``fetch`` can raise are caught.

The floor, at the server's default sync interval: natskit at least 1.3x the plain
``fetch()`` loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import nats.errors

import natskit
from benchmarks.harness import (
    Args,
    Tally,
    connect_plain,
    recreate_stream,
    run_process,
    serve_app,
)
from benchmarks.payload import Event, sample_event
from benchmarks.scenarios import Variant
from natskit.streams import JetStreamApi

NAME = "jsconsume"
DESCRIPTION = "durable pull consumer, per-message ack, from a filled stream"
COUNT = 30_000
QUICK_COUNT = 3_000
VARIANTS = (Variant("sync default", sync_always=False),)

SUBJECT = "bench.jsconsume"
STREAM = natskit.StreamSpec(name="BENCH_CONSUME", subjects=(SUBJECT,))
DURABLE = "bench"
BATCH = 500
FILL_TIMEOUT = 60.0


async def setup(args: Args) -> dict[str, Any]:
    """Recreate the stream and store ``args.count`` events in it."""
    nc, _ = await connect_plain(args.url)
    try:
        await recreate_stream(nc, STREAM)
        data = msgspec.json.encode(sample_event())
        started = time.perf_counter()
        for _ in range(args.count):
            await nc.publish(SUBJECT, data)
        await nc.flush(timeout=FILL_TIMEOUT)
        api = JetStreamApi(nc)
        while True:
            stored = (await api.stream_info(STREAM.name))["state"]["messages"]
            if stored >= args.count:
                break
            if time.perf_counter() - started > FILL_TIMEOUT:
                raise SystemExit(f"stream holds {stored} of {args.count} messages")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return {"stored": stored, "fill_seconds": time.perf_counter() - started}


async def consume_natskit(args: Args, tally: Tally) -> None:
    app = natskit.App("bench-consumer")
    app.stream(STREAM)

    @app.consume(stream=STREAM.name, durable=DURABLE, batch=BATCH)
    async def handle(event: Event) -> None:
        tally.hit()

    await serve_app(app, args, tally)


async def consume_nats_py(args: Args, tally: Tally) -> None:
    nc, dropped = await connect_plain(args.url)
    js = nc.jetstream()
    psub = await js.pull_subscribe(SUBJECT, durable=DURABLE, stream=STREAM.name)
    decode = msgspec.json.Decoder(Event).decode

    async def fetch_loop() -> None:
        while True:
            try:
                msgs = await psub.fetch(BATCH, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                decode(msg.data)
                tally.hit()
                await msg.ack()

    loop = asyncio.create_task(fetch_loop())
    try:
        await tally.report_until_stopped(dropped)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await nc.close()


async def nothing(args: Args) -> dict[str, Any]:
    """The driver: the stream was filled by the setup; the receiver just reads it."""
    return {}


def main() -> None:
    run_process(
        receivers={"natskit": consume_natskit, "nats-py": consume_nats_py},
        driver=nothing,
        setup=setup,
    )


if __name__ == "__main__":
    main()
