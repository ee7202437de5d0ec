"""``natskit services`` and ``natskit services watch``: who is alive, as a table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
from typing import Any

from natskit.cli.commands import debug_servers, fail
from natskit.connection import ConnectionEvents, ConnectOptions, connect
from natskit.discovery.registry import Instance, Registry
from natskit.errors import ConnectError, NatskitError
from natskit.rpc import Caller, CallPolicy

__all__ = ["add_parsers"]

_CLEAR = "\x1b[H\x1b[2J"
_COLUMNS = ("SERVICE", "INSTANCE", "VERSION", "STATUS", "UPTIME", "REQUESTS", "ERRORS")


def add_parsers(sub: Any) -> None:
    """Add ``services`` (and its ``watch`` sub-command) to the ``natskit`` parser."""
    services = sub.add_parser(
        "services", help="list services and their instances (status, load, errors)"
    )
    _options(services)
    services.set_defaults(func=list_services)
    inner = services.add_subparsers(dest="services_command", metavar="SUBCOMMAND")
    watch = inner.add_parser("watch", help="a live view, redrawn as instances change")
    _options(watch)
    watch.add_argument(
        "--refresh", type=float, default=1.0, help="seconds between redraws (default 1)"
    )
    watch.set_defaults(func=watch_services)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "-s",
        default=None,
        help="NATS URL(s) (default: NATS_URL, else the server of `natskit run`)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=0.5,
        help="seconds to wait for answers from instances (default 0.5)",
    )


def list_services(args: argparse.Namespace) -> int:
    async def work(options: ConnectOptions) -> int:
        events = ConnectionEvents()
        nc = await connect(options, events=events)
        registry = Registry(nc, ping_window=args.window, ping_interval=None)
        try:
            await registry.start()
            stats = await _stats(nc, args.window)
            print(render(registry, stats))
        finally:
            await registry.stop()
            events.closing = True
            await nc.close()
        return 0

    return _run(args, work)


def watch_services(args: argparse.Namespace) -> int:
    if args.refresh <= 0:
        return fail(f"--refresh must be > 0, got {args.refresh}", 2)

    async def work(options: ConnectOptions) -> int:
        events = ConnectionEvents()
        nc = await connect(options, events=events)
        registry = Registry(nc, ping_window=args.window)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await registry.start()
            while not stop.is_set():
                stats = await _stats(nc, min(args.window, args.refresh / 2))
                stamp = dt.datetime.now().strftime("%H:%M:%S")
                print(
                    f"{_CLEAR}natskit services — {stamp} (Ctrl-C to stop)\n\n"
                    + render(registry, stats),
                    flush=True,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.refresh)
        finally:
            await registry.stop()
            events.closing = True
            await nc.close()
        return 0

    return _run(args, work)


def _run(args: argparse.Namespace, work: Any) -> int:
    options = ConnectOptions(
        servers=tuple(debug_servers(args.server)),
        name="natskit-services",
        first_connect_timeout=5.0,
    )
    try:
        code: int = asyncio.run(work(options))
    except (ConnectError, NatskitError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return code


async def _stats(nc: Any, window: float) -> dict[str, dict[str, Any]]:
    """``$SRV.STATS`` answers by instance id."""
    caller = Caller(lambda: nc, default=CallPolicy())
    replies = await caller.gather("$SRV.STATS", b"", response_type=dict, window=window)
    return {r["id"]: r for r in replies.values if isinstance(r.get("id"), str)}


def render(registry: Registry, stats: dict[str, dict[str, Any]]) -> str:
    """The table of services and instances (plain text, fixed columns)."""
    rows: list[tuple[str, ...]] = []
    services = registry.services()
    for name in sorted(services):
        for instance in sorted(services[name], key=lambda i: i.started or i.id):
            rows.append(_row(instance, stats.get(instance.id)))
    if not rows:
        return "no services found"
    widths = [max(len(r[c]) for r in (_COLUMNS, *rows)) for c in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    ]
    header = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
    count = len(services)
    summary = f"\n{count} service(s), {len(rows)} instance(s)"
    return "\n".join([header.rstrip(), *(line.rstrip() for line in lines)]) + summary


def _row(instance: Instance, stats: dict[str, Any] | None) -> tuple[str, ...]:
    started = instance.started or (stats or {}).get("started", "")
    requests = errors = "-"
    if stats is not None:
        endpoints = stats.get("endpoints") or []
        requests = str(sum(int(e.get("num_requests", 0)) for e in endpoints))
        errors = str(sum(int(e.get("num_errors", 0)) for e in endpoints))
    status = instance.status if instance.up else f"DOWN ({instance.status})"
    return (
        instance.service,
        instance.id,
        instance.version,
        status,
        _uptime(started),
        requests,
        errors,
    )


def _uptime(started: str) -> str:
    if not started:
        return "-"
    try:
        since = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int((dt.datetime.now(dt.UTC) - since).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
