"""``queue``: a queue group of 1 and of 2 worker processes doing fixed CPU work.

Each worker decodes the event, re-encodes it with msgspec and runs a pure-Python loop
of about 20 us, so one worker is the bottleneck and a second one should add throughput.
The rate is the total across workers from the first message any worker received to the
last; the runner counts down until all workers together have received every message.
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
from benchmarks.payload import Event
from benchmarks.scenarios import Variant

NAME = "queue"
DESCRIPTION = "queue-group workers: decode, re-encode, ~20 us of CPU per message"
COUNT = 40_000
QUICK_COUNT = 10_000
VARIANTS = (Variant("1 worker", receivers=1), Variant("2 workers", receivers=2))

SUBJECT = "bench.queue"
QUEUE = "workers"
WORK_LOOP = 600  # iterations of the loop below: about 20 us on the reference machine

_encode = msgspec.json.Encoder().encode


def work(event: Event) -> int:
    """The fixed CPU work per message: re-encode, then spin a little."""
    acc = len(_encode(event))
    for i in range(WORK_LOOP):
        acc += i
    return acc


async def receive_natskit(args: Args, tally: Tally) -> None:
    app = natskit.App("bench")

    @app.subscribe(SUBJECT, queue=QUEUE, **pending_limits(args.count))
    async def handle(event: Event) -> None:
        work(event)
        tally.hit()

    await serve_app(app, args, tally)


async def receive_nats_py(args: Args, tally: Tally) -> None:
    nc, dropped = await connect_plain(args.url)
    decode = msgspec.json.Decoder(Event).decode

    async def handle(msg: Any) -> None:
        work(decode(msg.data))
        tally.hit()

    await nc.subscribe(SUBJECT, queue=QUEUE, cb=handle, **pending_limits(args.count))
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
