"""``pubsub``: throughput of one typed subscriber.

A plain nats-py publisher (the same for both sides) sends pre-encoded 128-byte JSON
events as fast as it can; only the subscriber differs. natskit: ``@app.subscribe`` with
a handler annotated ``Event``. nats-py: a callback that decodes with a
``msgspec.json.Decoder(Event)`` built once.
"""

from __future__ import annotations

from typing import Any

import msgspec

import natskit
from benchmarks.harness import (
    Args,
    Tally,
    connect_plain,
    pending_limits,
    publish_events,
    run_process,
    serve_app,
    serve_client,
)
from benchmarks.observe import observe_if_asked
from benchmarks.payload import Event
from benchmarks.scenarios import Variant

NAME = "pubsub"
DESCRIPTION = "one subscriber decoding 128-byte JSON events into a msgspec Struct"
COUNT = 200_000
QUICK_COUNT = 20_000
VARIANTS = (
    Variant("1 subscriber"),
    Variant("traced+metrics", 1, ("--observe",)),
)

SUBJECT = "bench.pubsub"


async def receive_natskit(args: Args, tally: Tally) -> None:
    app = natskit.App("bench")
    observe_if_asked(app, args.extra)

    @app.subscribe(SUBJECT, **pending_limits(args.count))
    async def handle(event: Event) -> None:
        tally.hit()

    await serve_app(app, args, tally)


async def receive_nats_py(args: Args, tally: Tally) -> None:
    nc, dropped = await connect_plain(args.url)
    decode = msgspec.json.Decoder(Event).decode

    async def handle(msg: Any) -> None:
        decode(msg.data)
        tally.hit()

    await nc.subscribe(SUBJECT, cb=handle, **pending_limits(args.count))
    await serve_client(nc, dropped, tally)


async def publish(args: Args) -> dict[str, Any]:
    return await publish_events(args, SUBJECT)


def main() -> None:
    run_process(
        receivers={"natskit": receive_natskit, "nats-py": receive_nats_py},
        driver=publish,
    )


if __name__ == "__main__":
    main()
