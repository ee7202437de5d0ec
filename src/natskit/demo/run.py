"""``natskit demo``: start the order flow, drive orders through HTTP, count what happened.

Theory of operation
-------------------
:class:`System` starts every service as its own ``natskit run`` process against one
server and owns those processes (it kills only its own PIDs). :func:`run_demo` seeds
the stock, waits until the registry sees every instance ready, drives orders through
the gateway at a fixed rate with a bounded number of HTTP connections, optionally
kills and restarts a shipper and a payment instance midway (``chaos``), waits until
the pipeline has drained, and then reads every figure back from the system itself: the
key-value stores, stream states, the order service's call counters and the registry.
Nothing in the summary is assumed from what the driver sent, except the latencies and
HTTP statuses it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natskit.app import App
from natskit.demo.http import HttpClient
from natskit.demo.models import Notice, Order, Shipment
from natskit.demo.stores import CATALOG, bucket, read_all
from natskit.discovery import Registry
from natskit.discovery.heartbeat import POLL_SUBJECT
from natskit.server import free_port

__all__ = ["DemoOptions", "Running", "Summary", "System", "run_demo", "running_system"]

SERVICES = (
    "inventory",
    "payment",
    "orders",
    "logistics",
    "shipper",
    "notification",
    "gateway",
)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    orders: int = 2000
    rate: float = 250.0
    connections: int = 16
    chaos: bool = False
    keep_running: bool = False
    shippers: int = 2
    payments: int = 2
    payment_failure_rate: float = 0.02
    payment_latency: float = 0.005
    bad_requests: int = 0  # extra invalid orders mixed in (counted as refused)
    progress: bool = True


@dataclass
class Summary:
    """What the system reports after a run (see :meth:`render`)."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    accepted_ids: set[str] = field(default_factory=set)
    stored_orders: dict[str, Order] = field(default_factory=dict)
    shipments: dict[str, Shipment] = field(default_factory=dict)
    notifications: dict[str, Notice] = field(default_factory=dict)
    handled: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    redelivered: int = 0
    live: dict[str, int] = field(default_factory=dict)
    chaos: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return len(self.stored_orders)

    @property
    def refused(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 201)

    def missing(self) -> dict[str, set[str]]:
        """Accepted orders without an order record, shipment or notification."""
        return {
            "orders": self.accepted_ids - set(self.stored_orders),
            "shipments": self.accepted_ids - set(self.shipments),
            "notifications": self.accepted_ids - set(self.notifications),
        }

    def unexpected(self) -> dict[str, set[str]]:
        """Records for orders the gateway never accepted."""
        return {
            "orders": set(self.stored_orders) - self.accepted_ids,
            "shipments": set(self.shipments) - self.accepted_ids,
            "notifications": set(self.notifications) - self.accepted_ids,
        }

    @property
    def reconciles(self) -> bool:
        # Every 201 carried its own order id, and the stores hold exactly those orders.
        distinct = self.statuses[201] == len(self.accepted_ids)
        return (
            distinct
            and not any(self.missing().values())
            and not any(self.unexpected().values())
        )

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def render(self) -> str:
        awaiting = sum(1 for o in self.stored_orders.values() if o.payment != "charged")
        refused = ", ".join(
            f"{n}x{s}" for s, n in sorted(self.statuses.items()) if s != 201
        )
        missing = {k: len(v) for k, v in self.missing().items()}
        unexpected = {k: len(v) for k, v in self.unexpected().items()}
        lines = [
            "",
            f"natskit demo: {self.sent} orders through the HTTP gateway in {self.seconds:.1f}s",
            f"  accepted            {self.accepted:>7}   ({awaiting} awaiting payment)",
            f"  refused             {self.refused:>7}   {('(' + refused + ')') if refused else ''}",
            f"  latency p50 / p99   {self.percentile(0.5):>7.1f} / {self.percentile(0.99):.1f} ms",
            "  events fanned out   "
            + ", ".join(f"{svc} {n}" for svc, n in sorted(self.handled.items())),
            f"  shipments           {len(self.shipments):>7}",
            f"  notifications       {len(self.notifications):>7}",
            f"  retries             {self.calls.get('retries', 0):>7}",
            f"  breaker trips       {self.calls.get('breaker_opened', 0):>7}   "
            f"({self.calls.get('rejected_by_breaker', 0)} calls failed fast, "
            f"{self.calls.get('fallbacks', 0)} fell back)",
            f"  dead letters        {self.dead_letters:>7}",
            f"  redeliveries        {self.redelivered:>7}   (absorbed: one shipment per order)",
            "  instances live      "
            + ", ".join(f"{svc} {n}" for svc, n in sorted(self.live.items())),
        ]
        if self.chaos:
            lines.append("  chaos               " + "; ".join(self.chaos))
        lines.append(
            "  every accepted order has one order record, one shipment and one notification"
            if self.reconciles
            else f"  DOES NOT RECONCILE: {self.statuses[201]} accepted with "
            f"{len(self.accepted_ids)} distinct ids, missing {missing}, "
            f"unexpected {unexpected}"
        )
        return "\n".join(lines)


class System:
    """The service processes of one demo run, started and stopped by their own PIDs."""

    def __init__(self, url: str, options: DemoOptions, *, log_dir: Path) -> None:
        self.url = url
        self.options = options
        self.log_dir = log_dir
        self.http_port = free_port()
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NATS_URL", None)
        env["NATSKIT_DEMO_HTTP_PORT"] = str(self.http_port)
        env["NATSKIT_DEMO_PAYMENT_FAILURES"] = str(self.options.payment_failure_rate)
        env["NATSKIT_DEMO_PAYMENT_LATENCY"] = str(self.options.payment_latency)
        return env

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        module = "gateway" if service == "gateway" else "services"
        index = len(self.procs.get(service, []))
        log = open(self.log_dir / f"{service}-{index}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "natskit", "--log-level", "WARNING", "run"),
                *(f"natskit.demo.{module}:{service}", "--server", self.url),
            ],
            env=self._env(),
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
        )
        log.close()
        self.procs.setdefault(service, []).append(proc)
        return proc

    def start(self) -> None:
        counts = {"payment": self.options.payments, "shipper": self.options.shippers}
        for service in SERVICES:
            for _ in range(counts.get(service, 1)):
                self.spawn(service)

    def expected(self) -> dict[str, int]:
        return {service: len(procs) for service, procs in self.procs.items()}

    def kill(self, service: str, index: int = 0) -> int:
        proc = self.procs[service][index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.pid

    def restart(self, service: str, index: int = 0) -> None:
        old = self.procs[service][index]
        self.procs[service].remove(old)
        self.spawn(service)

    def stop(self, timeout: float = 20.0) -> None:
        live = [p for procs in self.procs.values() for p in procs if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def seed_stock(nc: Any) -> None:
    kv = await bucket(nc, "inventory")
    for sku, (_price, stock) in CATALOG.items():
        with contextlib.suppress(Exception):  # already seeded by an earlier run
            await kv.create(f"stock.{sku}", str(stock).encode())


def random_order(rng: random.Random) -> bytes:
    skus = rng.sample(sorted(CATALOG), rng.randint(1, 3))
    lines = [{"sku": sku, "qty": rng.randint(1, 3)} for sku in skus]
    return json.dumps(
        {"customer": f"customer-{rng.randint(1, 500)}", "lines": lines}
    ).encode()


BAD_ORDERS = (
    b'{"customer": "x", "lines": [',  # malformed JSON
    b'{"customer": "x", "lines": [{"sku": "unicorn", "qty": 1}]}',  # unknown product
    b'{"customer": "x", "lines": [{"sku": "book", "qty": -2}]}',  # negative quantity
)


async def wait_ready(
    registry: Registry, expected: dict[str, int], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = {
            service: sum(1 for i in instances if i.ready)
            for service, instances in registry.services().items()
        }
        if all(ready.get(s, 0) >= n for s, n in expected.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"services not ready in {timeout:.0f}s: {ready} of {expected}"
            )
        await asyncio.sleep(0.1)


async def drive(
    system: System, options: DemoOptions, summary: Summary, *, progress: bool
) -> None:
    """Send the orders at ``options.rate`` over ``options.connections`` connections."""
    rng = random.Random(7)
    bodies = [random_order(rng) for _ in range(options.orders)]
    for i in range(options.bad_requests):
        bodies.insert(rng.randrange(len(bodies) + 1), BAD_ORDERS[i % len(BAD_ORDERS)])
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    started = time.monotonic()
    chaos_at = {len(bodies) // 3: "shipper", len(bodies) // 2: "payment"}

    async def producer() -> None:
        for index, body in enumerate(bodies):
            await asyncio.sleep(
                max(0.0, started + index / options.rate - time.monotonic())
            )
            await queue.put((index, body))
            if options.chaos and index in chaos_at:
                await _chaos(system, chaos_at[index], summary)
        for _ in range(options.connections):
            await queue.put((-1, b""))

    async def client() -> None:
        http = HttpClient("127.0.0.1", system.http_port)
        try:
            while True:
                index, body = await queue.get()
                if index < 0:
                    return
                sent = time.perf_counter()
                status, reply = await http.request("POST", "/orders", body)
                summary.latencies_ms.append((time.perf_counter() - sent) * 1000)
                summary.statuses[status] += 1
                if status == 201:
                    summary.accepted_ids.add(reply["order_id"])
                summary.sent += 1
                if progress:
                    _progress(summary.sent, len(bodies), started)
        finally:
            await http.close()

    await asyncio.gather(producer(), *(client() for _ in range(options.connections)))
    if progress:
        print(file=sys.stderr)


async def _chaos(system: System, service: str, summary: Summary) -> None:
    pid = system.kill(service, 0)
    summary.chaos.append(f"SIGKILLed {service} pid {pid}")

    async def bring_back() -> None:
        await asyncio.sleep(2.0)
        system.restart(service, 0)
        summary.chaos.append(f"restarted {service}")

    asyncio.get_running_loop().create_task(bring_back())


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = width * done // total
    rate = done / max(1e-6, time.monotonic() - started)
    print(
        f"\r  orders [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:6.0f}/s",
        end="",
        file=sys.stderr,
        flush=True,
    )


async def collect(
    app: App, registry: Registry, summary: Summary, *, since: float, timeout: float
) -> None:
    """Wait until every accepted order went through, then read the figures back.

    Only orders created since ``since`` (and their shipments and notifications) count,
    so a server that holds earlier runs' data still reconciles exactly.
    """
    nc = app.nc
    names = ("orders", "shipments", "notifications")
    stores = {name: await bucket(nc, name) for name in names}
    deadline = time.monotonic() + timeout
    while True:
        orders = await read_all(stores["orders"], Order)
        summary.stored_orders = {k: o for k, o in orders.items() if o.created >= since}
        ours = set(summary.stored_orders) | summary.accepted_ids
        shipments = await read_all(stores["shipments"], Shipment)
        summary.shipments = {k: v for k, v in shipments.items() if k in ours}
        notices = await read_all(stores["notifications"], Notice)
        summary.notifications = {k: v for k, v in notices.items() if k in ours}
        if summary.reconciles or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    summary.calls = await app.request("orders.calls", {}, response_type=dict[str, int])
    js = nc.jetstream()
    with contextlib.suppress(Exception):  # no DLQ stream: nothing was dead-lettered
        summary.dead_letters = (await js.stream_info("DLQ")).state.messages
    for stream, durable in (("ORDERS", "logistics"), ("SHIPPING", "shippers")):
        with contextlib.suppress(Exception):
            info = await js.consumer_info(stream, durable)
            summary.redelivered += info.num_redelivered or 0
    await fresh_heartbeats(app, registry)
    for service, instances in registry.services().items():
        if service in ("notification", "logistics", "shipper"):
            summary.handled[service] = sum(i.load.handled for i in instances if i.up)


async def fresh_heartbeats(app: App, registry: Registry, timeout: float = 3.0) -> None:
    """Ask every instance to beat now (``health.poll``) and wait for the answers."""
    before = {
        i.id: i.seq for insts in registry.services().values() for i in insts if i.up
    }
    await app.publish(POLL_SUBJECT, b"")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = {i.id: i.seq for insts in registry.services().values() for i in insts}
        if all(now.get(iid, 0) > seq for iid, seq in before.items()):
            return
        await asyncio.sleep(0.05)


@dataclass
class Running:
    """A started system: its processes, the monitor App and its registry."""

    system: System
    monitor: App
    registry: Registry


@contextlib.asynccontextmanager
async def running_system(
    servers: list[str], options: DemoOptions
) -> AsyncIterator[Running]:
    """Start every service, wait until the registry sees all ready; stop them after."""
    log_dir = Path(tempfile.mkdtemp(prefix="natskit-demo-"))
    monitor = App(
        "monitor", version="1.0.0", description="drives orders, watches instances"
    )
    await monitor.start(servers)
    registry = Registry(monitor)
    system = System(servers[0], options, log_dir=log_dir)
    try:
        await seed_stock(monitor.nc)
        await registry.start()
        print(f"natskit demo: starting services (logs in {log_dir})", file=sys.stderr)
        system.start()
        await wait_ready(registry, system.expected(), timeout=60)
        yield Running(system, monitor, registry)
    finally:
        system.stop()
        await registry.stop()
        await monitor.stop()


async def run_demo(servers: list[str], options: DemoOptions | None = None) -> Summary:
    """Run the whole order flow once against ``servers`` and return its summary."""
    options = options or DemoOptions()
    summary = Summary()
    async with running_system(servers, options) as run:
        started, since = time.monotonic(), time.time()
        await drive(run.system, options, summary, progress=options.progress)
        await collect(run.monitor, run.registry, summary, since=since, timeout=60)
        summary.seconds = time.monotonic() - started
        await wait_ready(run.registry, run.system.expected(), timeout=30)
        summary.live = {
            s: sum(1 for i in inst if i.up)
            for s, inst in run.registry.services().items()
        }
        print(summary.render(), flush=True)
        if options.keep_running:
            await _keep_running(run.system, servers[0])
    return summary


async def _keep_running(system: System, url: str) -> None:
    print(
        "\nThe system is up. Try, in another terminal:\n"
        f"  curl -s -XPOST localhost:{system.http_port}/orders "
        '-d \'{"customer": "ada", "lines": [{"sku": "book", "qty": 1}]}\'\n'
        f"  natskit services --server {url}\n"
        f"  natskit streams --server {url}\n"
        f"  natskit sub 'events.>' --server {url}\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
