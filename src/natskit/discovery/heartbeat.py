"""Heartbeats: every App says, on a schedule, that it is alive and what state it is in.

Theory of operation
-------------------
An App's :class:`Heartbeats` source publishes a :class:`Heartbeat` on
``health.<service>.<instance id>``:

* once when it starts (status ``starting``), and at once on every status change the
  App announces (``ready``, ``draining``, ``stopping``);
* every ``interval`` seconds after that, on a fixed monotonic schedule, so the time a
  beat takes does not make the next one late; beats missed while the process was
  frozen are not made up, the overdue one goes out at once;
* whenever someone publishes on ``health.poll`` (a registry starting up asks so), so a
  watcher learns every instance's status without waiting for an interval.

Each beat announces ``ttl`` = 2.5 x ``interval``: a watcher that has not heard from the
instance for that long may declare it down. 2.5 leaves room for one lost or late beat
plus scheduling jitter, and keeps detection under three intervals.

A readiness check (``App(readiness=...)``) is run before each periodic beat while the
App is ``ready``; False, an exception or no answer within half an interval makes the
status ``not_ready``. The instance stays alive (liveness is the beat itself).

Graceful stop: ``draining`` is announced when the App starts draining, beats continue
while in-flight work finishes, and the ``stopping`` beat (going away) is published and
flushed when the App announces ``stopping``, before the connection closes. Watchers
drop the instance on that beat instead of waiting for its ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors

from natskit.rpc import Endpoint, rfc3339

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription as NatsSubscription

    from natskit.app import App

__all__ = [
    "DIRECT_PREFIX",
    "HEALTH_PREFIX",
    "POLL_SUBJECT",
    "TTL_FACTOR",
    "EndpointSummary",
    "Heartbeat",
    "Heartbeats",
    "Load",
    "ReadinessCheck",
    "Status",
    "direct_subject",
    "health_subject",
]

log = logging.getLogger("natskit.discovery")

HEALTH_PREFIX = "health"
POLL_SUBJECT = "health.poll"
DIRECT_PREFIX = "direct"
HEARTBEAT_TYPE = "io.natskit.v1.heartbeat"
TTL_FACTOR = 2.5

ReadinessCheck = Callable[[], Awaitable[bool] | bool]


class Status(enum.StrEnum):
    """The lifecycle status of an App instance, as its heartbeats announce it."""

    STOPPED = "stopped"  # not started, or stopped: never announced
    STARTING = "starting"
    READY = "ready"
    NOT_READY = "not_ready"  # alive, but its readiness check says no
    DRAINING = "draining"  # finishing in-flight work; takes no new work
    STOPPING = "stopping"  # going away: the last beat of an instance


def health_subject(service: str, instance_id: str) -> str:
    """The subject an instance's heartbeats go to: ``health.<service>.<id>``."""
    return f"{HEALTH_PREFIX}.{service}.{instance_id}"


def direct_subject(service: str, instance_id: str, endpoint: str) -> str:
    """The subject that reaches endpoint ``endpoint`` of one instance only.

    ``direct.<service>.<instance id>.<endpoint name>``, served without a queue group
    next to the endpoint's shared subject, through the same handler and counters.
    """
    return f"{DIRECT_PREFIX}.{service}.{instance_id}.{endpoint}"


class EndpointSummary(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as a heartbeat names it."""

    name: str
    subject: str
    queue_group: str
    direct: str


class Load(msgspec.Struct, frozen=True, kw_only=True):
    """A small load summary summed over the App's handlers."""

    in_flight: int = 0
    handled: int = 0
    errors: int = 0


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """One heartbeat, JSON on ``health.<service>.<instance id>``."""

    name: str
    id: str
    version: str
    started: str  # RFC 3339
    status: str
    interval: float
    ttl: float
    seq: int
    load: Load = Load()
    endpoints: tuple[EndpointSummary, ...] = ()
    metadata: dict[str, str] = {}
    type: str = HEARTBEAT_TYPE


_encode = msgspec.json.Encoder().encode


class Heartbeats:
    """The heartbeat publisher of one App: a source started after the others."""

    def __init__(
        self,
        app: App,
        *,
        interval: float,
        readiness: ReadinessCheck | None = None,
    ) -> None:
        self._app = app
        self.interval = interval
        self.ttl = round(interval * TTL_FACTOR, 3)
        self._readiness = readiness
        self.label = (
            f"heartbeats on {health_subject(app.name, app.instance_id)} "
            f"every {interval:g}s"
        )
        self.status = Status.STARTING
        self.started = dt.datetime.now(dt.UTC)
        self.last_beat = 0.0  # monotonic time of the last beat sent
        self._seq = 0
        self._nc: Client | None = None
        self._poll: NatsSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._readiness_ok = True

    # -- the state the probes read --------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the beat loop runs and has beaten within the ttl."""
        task = self._task
        if task is None or task.done():
            return False
        return time.monotonic() - self.last_beat <= self.ttl

    @property
    def ready(self) -> bool:
        nc = self._nc
        return self.status is Status.READY and nc is not None and nc.is_connected

    # -- the source -----------------------------------------------------------------

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self.started = dt.datetime.now(dt.UTC)
        self.status = _effective(self._app.status, readiness_ok=True)
        self._poll = await nc.subscribe(POLL_SUBJECT, cb=self._on_poll)
        await self._beat()
        self._task = asyncio.create_task(
            self._run(), name=f"natskit heartbeats {self._app.name}"
        )

    async def drain(self, deadline: float) -> int:
        """Nothing in flight here: beats go on while the other sources drain."""
        return 0

    async def announce(self, status: Status) -> None:
        """The App's status changed: beat at once; on ``stopping``, beat for the last time."""
        if self._nc is None:
            return
        if status is Status.STOPPING:
            await self._stop_loop()
        self.status = _effective(status, readiness_ok=self._readiness_ok)
        try:
            await self._beat()
        except nats.errors.Error as exc:  # announcing must not break start or stop
            log.warning(
                "heartbeat of %s (%s) not sent: %s", self._app.name, status, exc
            )
        if status is Status.STOPPING:
            with contextlib.suppress(Exception):  # best effort: the goodbye is a hint
                await self._nc.flush(timeout=1)
            self._nc = None

    async def _stop_loop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        poll, self._poll = self._poll, None
        if poll is not None:
            with contextlib.suppress(nats.errors.Error):
                await poll.unsubscribe()

    async def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            next_at += self.interval
            if next_at <= now:  # frozen or starved: skip what was missed
                next_at = now + self.interval
            try:
                await self._check_readiness()
                await self._beat()
            except asyncio.CancelledError:
                raise
            except nats.errors.ConnectionClosedError:
                return
            except Exception:
                log.exception("heartbeat of %s failed", self._app.name)

    async def _check_readiness(self) -> None:
        status = self._app.status
        if self._readiness is not None and status in (Status.READY, Status.NOT_READY):
            self._readiness_ok = await self._ask_readiness()
        self.status = _effective(status, readiness_ok=self._readiness_ok)

    async def _ask_readiness(self) -> bool:
        assert self._readiness is not None
        try:
            answer = self._readiness()
            if inspect.isawaitable(answer):
                answer = await asyncio.wait_for(answer, timeout=self.interval / 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing check means "not ready", not a crash
            log.warning("readiness check of %s failed: %r", self._app.name, exc)
            return False
        return bool(answer)

    async def _on_poll(self, _msg: Any) -> None:
        if self._task is not None:
            await self._beat()

    async def _beat(self) -> None:
        nc = self._nc
        if nc is None:
            return
        self._seq += 1
        beat = self.heartbeat()
        self.last_beat = time.monotonic()
        await nc.publish(health_subject(beat.name, beat.id), _encode(beat))

    def heartbeat(self) -> Heartbeat:
        """The heartbeat this instance would send now."""
        app = self._app
        return Heartbeat(
            name=app.name,
            id=app.instance_id,
            version=app.version,
            started=rfc3339(self.started),
            status=self.status.value,
            interval=self.interval,
            ttl=self.ttl,
            seq=self._seq,
            load=_load(app),
            endpoints=_endpoints(app),
            metadata=dict(app.metadata),
        )


def _effective(status: Status, *, readiness_ok: bool) -> Status:
    if status is Status.READY and not readiness_ok:
        return Status.NOT_READY
    return status


def _load(app: App) -> Load:
    in_flight = handled = errors = 0
    for source in app.sources:
        pipeline = getattr(source, "pipeline", None)
        stats = getattr(pipeline, "stats", None)
        if stats is not None:
            in_flight += stats.in_flight
            handled += stats.received
            errors += stats.errors
    return Load(in_flight=in_flight, handled=handled, errors=errors)


def _endpoints(app: App) -> tuple[EndpointSummary, ...]:
    return tuple(
        EndpointSummary(
            name=d.name,
            subject=d.subject,
            queue_group=d.queue_group,
            direct=direct_subject(app.name, app.instance_id, d.name),
        )
        for d in app.declarations
        if isinstance(d, Endpoint)
    )
