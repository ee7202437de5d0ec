"""``jspublish``: pipelined publishing into a file-storage stream, every ack checked.

The publisher is under test, so the rate is its own: messages acknowledged, from the
first publish until the last ack has arrived and been checked. Before each run a setup
process deletes the stream and creates it again empty (limits retention, file storage,
a 2-minute duplicate window), so every run writes into the same fresh stream.

- natskit: ``app.js_publish_many`` with its defaults: at most 256 unacknowledged, a
  fresh ``Nats-Msg-Id`` on every message (so a resend after a timeout is stored once),
  resends on timeouts, and every ack read (``return_exceptions=True`` to count the
  failures instead of stopping at the first).
- nats-py: ``js.publish_async`` with its defaults (at most 4,000 unacknowledged, no
  message ids, no timeout and no resend), then ``js.publish_async_completed()`` and a
  look at every future's result. Without resends a message id buys nothing, so a
  plain nats-py user pipelining this way sends none.

Both sides encode each ``Event`` with msgspec (128 bytes of JSON) as they go. The
variants differ in the server only: its default sync interval (the floor: natskit at
least 0.9x plain nats-py), and ``sync_interval: always`` (natskit's embedded default),
whose cost shows as a ratio of the two variants.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

import natskit
from benchmarks.harness import Args, connect_plain, recreate_stream, run_process
from benchmarks.payload import sample_event
from benchmarks.scenarios import Variant
from natskit.errors import PublishFailed
from natskit.streams import JetStreamApi

NAME = "jspublish"
DESCRIPTION = "pipelined publish into a file stream, every ack checked"
COUNT = 30_000
QUICK_COUNT = 3_000
VARIANTS = (
    Variant("sync default", 0, sync_always=False),
    # About 6-10x slower on this machine's disk: a tenth of the messages per run.
    Variant("sync always", 0, sync_always=True, scale=0.1),
)
RATE_FROM = "driver"

SUBJECT = "bench.jspublish"
STREAM = natskit.StreamSpec(name="BENCH_PUBLISH", subjects=(SUBJECT,))


async def setup(args: Args) -> dict[str, Any]:
    nc, _ = await connect_plain(args.url)
    try:
        await recreate_stream(nc, STREAM)
    finally:
        await nc.close()
    return {"stream": STREAM.name}


async def publish(args: Args) -> dict[str, Any]:
    """The driver: publish ``args.count`` events, then check the stream holds them."""
    if args.impl == "natskit":
        report = await _publish_natskit(args)
    else:
        report = await _publish_nats_py(args)
    nc, _ = await connect_plain(args.url)
    try:
        info = await JetStreamApi(nc).stream_info(STREAM.name)
    finally:
        await nc.close()
    report["stored"] = int(info["state"]["messages"])
    # A message acked but not in the stream counts as lost, not as done.
    report["count"] = min(report["count"], report["stored"])
    return report


async def _publish_natskit(args: Args) -> dict[str, Any]:
    app = natskit.App("bench-publisher")
    app.stream(STREAM)
    event = sample_event()
    await app.start(args.url)
    try:
        started = time.perf_counter()
        results = await app.js_publish_many(
            ((SUBJECT, event) for _ in range(args.count)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
    finally:
        await app.stop()
    failed = sum(isinstance(r, PublishFailed) for r in results)
    return _report(len(results) - failed, failed, elapsed)


async def _publish_nats_py(args: Args) -> dict[str, Any]:
    nc, _ = await connect_plain(args.url)
    js = nc.jetstream()
    encode = msgspec.json.Encoder().encode
    event = sample_event()
    try:
        started = time.perf_counter()
        futures = [
            await js.publish_async(SUBJECT, encode(event)) for _ in range(args.count)
        ]
        await js.publish_async_completed()
        # Every ack checked: a failed one is the future's exception.
        failed = sum(f.exception() is not None for f in futures)
        elapsed = time.perf_counter() - started
    finally:
        await nc.close()
    return _report(len(futures) - failed, failed, elapsed)


def _report(count: int, failed: int, elapsed: float) -> dict[str, Any]:
    return {
        "count": count,
        "failed": failed,
        "seconds": elapsed,
        "rate": count / elapsed,
    }


def main() -> None:
    run_process(
        receivers={},
        driver=publish,
        setup=setup,
    )


if __name__ == "__main__":
    main()
