"""Operating streams: ``natskit streams``, ``natskit dlq`` and ``natskit replay``.

The server comes from ``--server``, else ``NATS_URL``, else the embedded server of a
running ``natskit run`` (``.natskit/server.url``). Payloads are printed only where the
user asks for messages (``dlq show``, ``replay``), never in listings.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from natskit.cli.commands import debug_servers, fail
from natskit.connection import ConnectOptions, connect
from natskit.errors import NatskitError

if TYPE_CHECKING:
    from nats.aio.client import Client

    from natskit.streams import StoredMessage

__all__ = ["add_parsers"]

Work = Callable[["Client", argparse.Namespace], Awaitable[int]]


def add_parsers(sub: Any) -> None:
    """Register the ``streams``, ``dlq`` and ``replay`` sub-commands on ``sub``."""
    streams = sub.add_parser("streams", help="list JetStream streams, or show one")
    streams.add_argument("action", nargs="?", choices=("list", "info"), default="list")
    streams.add_argument("name", nargs="?", help="stream name (for info)")
    _server_option(streams)
    streams.set_defaults(func=_runner(_streams))

    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    dlq.add_argument("action", choices=("list", "show", "redrive", "purge"))
    dlq.add_argument("sequence", nargs="?", type=int, help="dead letter sequence")
    dlq.add_argument("--all", action="store_true", help="redrive every dead letter")
    dlq.add_argument("--stream", default="DLQ", help="dead-letter stream (default DLQ)")
    _server_option(dlq)
    dlq.set_defaults(func=_runner(_dlq))

    replay = sub.add_parser("replay", help="print a stream's messages in order")
    replay.add_argument("stream")
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-seq", type=int, default=None, help="first sequence")
    start.add_argument(
        "--since", default=None, help="ISO 8601 time, e.g. 2024-05-01T12:00Z"
    )
    replay.add_argument("--subject", default=None, help="subject filter (wildcards)")
    replay.add_argument("--limit", type=int, default=0, help="stop after N messages")
    _server_option(replay)
    replay.set_defaults(func=_runner(_replay))


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "-s",
        default=None,
        help="NATS URL(s) (default: NATS_URL, else the server of `natskit run`)",
    )


def _runner(work: Work) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        options = ConnectOptions(
            servers=tuple(debug_servers(args.server)),
            name="natskit-cli",
            first_connect_timeout=5.0,
        )

        async def main() -> int:
            nc = await connect(options)
            try:
                return await work(nc, args)
            finally:
                await nc.close()

        try:
            return asyncio.run(main())
        except (NatskitError, ValueError) as exc:
            return fail(str(exc))
        except KeyboardInterrupt:
            return 130

    return run


# -- streams --------------------------------------------------------------------------


async def _streams(nc: Client, args: argparse.Namespace) -> int:
    from natskit.streams import JetStreamApi

    api = JetStreamApi(nc)
    if args.action == "info" or args.name:
        if not args.name:
            return fail("streams info needs a stream name", 2)
        return await _stream_info(api, args.name)
    infos = await api.streams()
    if not infos:
        print("no streams")
        return 0
    rows: list[tuple[str, ...]] = [
        ("NAME", "SUBJECTS", "MESSAGES", "BYTES", "CONSUMERS")
    ]
    for info in sorted(infos, key=lambda i: i["config"]["name"]):
        config, state = info["config"], info["state"]
        rows.append(
            (
                config["name"],
                ",".join(config.get("subjects") or []),
                str(state.get("messages", 0)),
                str(state.get("bytes", 0)),
                str(state.get("consumer_count", 0)),
            )
        )
    _table(rows)
    return 0


async def _stream_info(api: Any, name: str) -> int:
    info = await api.stream_info(name)
    config, state = info["config"], info["state"]
    print(f"stream {name}")
    print(f"  subjects:   {', '.join(config.get('subjects') or [])}")
    print(f"  retention:  {config.get('retention')}  storage: {config.get('storage')}")
    print(f"  replicas:   {config.get('num_replicas')}")
    print(f"  messages:   {state.get('messages', 0)}  bytes: {state.get('bytes', 0)}")
    print(f"  sequences:  {state.get('first_seq', 0)}..{state.get('last_seq', 0)}")
    consumers = await api.consumers(name)
    if not consumers:
        print("  no consumers")
        return 0
    rows: list[tuple[str, ...]] = [
        ("CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "WAITING")
    ]
    for consumer in sorted(consumers, key=lambda c: c["name"]):
        rows.append(
            (
                consumer["name"],
                str(consumer.get("num_pending", 0)),
                str(consumer.get("num_ack_pending", 0)),
                str(consumer.get("num_redelivered", 0)),
                str(consumer.get("num_waiting", 0)),
            )
        )
    _table(rows, indent="  ")
    return 0


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            indent
            + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        )


# -- dlq ------------------------------------------------------------------------------


async def _dlq(nc: Client, args: argparse.Namespace) -> int:
    from natskit.streams import DeadLetter, JetStreamApi, dead_letters, purge, redrive

    if args.action == "list":
        rows: list[tuple[str, ...]] = [
            ("SEQ", "FROM", "SEQUENCE", "DELIVERIES", "ERROR", "REASON")
        ]
        async for letter in dead_letters(nc, stream=args.stream):
            rows.append(
                (
                    str(letter.sequence),
                    f"{letter.stream}/{letter.consumer}",
                    str(letter.stream_sequence),
                    str(letter.deliveries),
                    letter.error,
                    letter.reason[:80],
                )
            )
        if len(rows) == 1:
            print("no dead letters")
        else:
            _table(rows)
        return 0
    if args.action == "show":
        if args.sequence is None:
            return fail("dlq show needs a sequence", 2)
        message = await JetStreamApi(nc).get_message(args.stream, args.sequence)
        letter = DeadLetter.from_stored(message)
        print(f"dead letter {letter.sequence} (from {letter.stream}/{letter.consumer})")
        print(f"  subject:     {letter.subject}")
        print(f"  sequence:    {letter.stream_sequence}")
        print(f"  deliveries:  {letter.deliveries}")
        print(f"  error:       {letter.error}: {letter.reason}")
        _print_message(message, indent="  ")
        return 0
    if args.action == "redrive":
        if args.all == (args.sequence is not None):
            return fail("dlq redrive takes a sequence or --all", 2)
        sequences = (
            [letter.sequence async for letter in dead_letters(nc, stream=args.stream)]
            if args.all
            else [args.sequence]
        )
        for sequence in sequences:
            ack = await redrive(nc, sequence, stream=args.stream)
            print(f"redrove {sequence} -> stream {ack.stream} sequence {ack.seq}")
        print(f"redrove {len(sequences)} dead letter(s)")
        return 0
    removed = await purge(nc, stream=args.stream)
    print(f"purged {removed} dead letter(s)")
    return 0


# -- replay ---------------------------------------------------------------------------


async def _replay(nc: Client, args: argparse.Namespace) -> int:
    from natskit.streams import replay

    since = _parse_since(args.since) if args.since else None
    shown = 0
    messages = replay(
        nc, args.stream, from_seq=args.from_seq, since=since, subject=args.subject
    )
    async for message in messages:
        _print_message(message)
        shown += 1
        if args.limit and shown >= args.limit:
            break
    await messages.aclose()  # type: ignore[attr-defined]
    print(f"{shown} message(s)")
    return 0


def _parse_since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a local time, as the user typed it
    return moment


def _print_message(message: StoredMessage, indent: str = "") -> None:
    stamp = message.time.isoformat() if message.time else "?"
    print(
        f"{indent}[{message.sequence}] {stamp} {message.subject} ({len(message.data)} bytes)"
    )
    for name, value in message.headers.items():
        print(f"{indent}  {name}: {value}")
    print(f"{indent}  {message.data.decode('utf-8', 'replace')}", flush=True)
