"""The registry: a live view of which service instances are alive, with failure detection.

Theory of operation
-------------------
A :class:`Registry` listens to ``health.>`` and keeps one :class:`Instance` per instance
id, grouped by service name.

Start-up. It subscribes first, then publishes on ``health.poll`` (natskit instances
answer with an out-of-schedule heartbeat) and scatter-gathers ``$SRV.INFO`` (every
services-protocol responder, natskit or not, answers with its identity and endpoints).
When :meth:`Registry.start` returns, every instance that was up before the registry is
known. An instance known only from the services protocol is kept alive by a
``$SRV.PING`` every ``ping_interval``; a natskit instance by its heartbeats.

States of an instance and what moves it:

* up: a heartbeat (or ping reply) arrived within the instance's ttl. A first heartbeat
  of an unknown instance, or any heartbeat of a down one, emits ``up``.
* a heartbeat with another status than the last one emits ``status_changed``.
* down: nothing arrived for ``ttl`` seconds (the ttl the instance announced, measured
  on this process's monotonic clock from the receipt of its last message). A frozen
  process (SIGSTOP) is detected like a dead one. Emits ``down``; the instance stays
  listed (``live_only=False``) for ``forget_after`` seconds, then is dropped (``gone``).
* gone: the instance said it is going away (status ``stopping``): removed at once,
  ``gone`` emitted; later stragglers (a late ping reply) of that id are ignored.

The detector wakes at the earliest deadline (and at least every 0.25 s), so detection
takes the ttl and not a polling period more. Before declaring anyone down it makes a
round trip to the server and lets queued heartbeats be processed, so a registry whose
own event loop was busy does not blame instances for its lateness. While the
registry's own connection is down it declares no one down, and on reconnection it
gives every instance a fresh ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client

from natskit.connection import (
    ConnectionEvents,
    ConnectOptions,
    connect,
    servers_from_env,
)
from natskit.discovery.heartbeat import (
    HEALTH_PREFIX,
    POLL_SUBJECT,
    TTL_FACTOR,
    EndpointSummary,
    Heartbeat,
    Load,
    Status,
    direct_subject,
)
from natskit.rpc import Caller, CallPolicy

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription

    from natskit.app import App

__all__ = ["EventKind", "Instance", "Registry", "RegistryEvent"]

log = logging.getLogger("natskit.discovery")

R = TypeVar("R")

_CHECK_AT_LEAST_EVERY = 0.25
_GONE_MEMORY = 4096
_decode_heartbeat = msgspec.json.Decoder(Heartbeat).decode


class EventKind(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    STATUS_CHANGED = "status_changed"
    GONE = "gone"


@dataclass
class Instance:
    """One instance of a service as the registry sees it."""

    service: str
    id: str
    version: str
    status: str
    endpoints: tuple[EndpointSummary, ...] = ()
    started: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    load: Load = field(default_factory=Load)
    interval: float | None = None  # None: known from the services protocol only
    ttl: float = 0.0
    seq: int = 0
    last_seen: float = 0.0  # monotonic, in this process
    up: bool = True

    @property
    def ready(self) -> bool:
        return self.up and self.status == Status.READY

    def endpoint(self, name: str) -> EndpointSummary:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise LookupError(
            f"instance {self.id} of {self.service} has no endpoint {name!r}"
        )


@dataclass(frozen=True)
class RegistryEvent:
    """Something changed: ``instance`` is a snapshot taken when it happened."""

    kind: EventKind
    instance: Instance
    previous: str | None = None  # the status before, for status_changed and up
    at: float = field(default_factory=time.monotonic)


class EventStream:
    """Events from the moment it was opened: ``async for event in stream``."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._queue: asyncio.Queue[RegistryEvent] = asyncio.Queue()
        registry._streams.add(self)

    def put(self, event: RegistryEvent) -> None:
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._registry._streams.discard(self)

    def __aiter__(self) -> AsyncIterator[RegistryEvent]:
        return self

    async def __anext__(self) -> RegistryEvent:
        return await self._queue.get()

    async def next(self, timeout: float) -> RegistryEvent:
        """The next event; ``TimeoutError`` if none comes within ``timeout``."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registry:
    """Which instances of which services are alive now.

    ``Registry(app)`` shares a started App's connection; ``Registry(nc)`` a nats-py
    client's; ``Registry()`` (or ``Registry(servers=[...])``) opens its own on start
    (``NATS_URL`` by default) and closes it on stop.
    """

    def __init__(
        self,
        connection: App | Client | None = None,
        *,
        servers: list[str] | None = None,
        ping_window: float = 0.5,
        ping_interval: float | None = 5.0,
        forget_after: float = 60.0,
    ) -> None:
        self._source = connection
        self._servers = servers
        self.ping_window = ping_window
        self.ping_interval = ping_interval
        self.forget_after = forget_after
        self._instances: dict[str, Instance] = {}
        self._gone: dict[str, None] = {}
        self._streams: set[EventStream] = set()
        self._nc: Client | None = None
        self._own_nc: ConnectionEvents | None = None
        self._sub: NatsSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._caller: Caller | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, learn the instances that are up already, start the detector."""
        if self._nc is not None:
            raise RuntimeError("registry is already started")
        nc = await self._connect()
        self._nc = nc
        self._caller = Caller(lambda: nc, default=CallPolicy())
        self._sub = await nc.subscribe(f"{HEALTH_PREFIX}.>", cb=self._on_heartbeat)
        await nc.publish(POLL_SUBJECT, b"")
        await self._ping("$SRV.INFO")
        self._tasks.append(asyncio.create_task(self._detect(), name="natskit registry"))
        if self.ping_interval:
            self._tasks.append(
                asyncio.create_task(self._keep_pinging(), name="natskit registry pings")
            )

    async def _connect(self) -> Client:
        source = self._source
        if isinstance(source, Client):
            return source
        if source is not None:
            return source.nc  # an App (not imported here: the App layer is above)
        servers = self._servers or servers_from_env()
        options = ConnectOptions(servers=tuple(servers), name="natskit-registry")
        self._own_nc = ConnectionEvents()
        return await connect(options, events=self._own_nc)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        nc, self._nc = self._nc, None
        if nc is not None and self._own_nc is not None:
            self._own_nc.closing = True
            await nc.close()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the live view ----------------------------------------------------------------

    def services(self) -> dict[str, list[Instance]]:
        """Every known instance (down ones included), by service name."""
        view: dict[str, list[Instance]] = {}
        for instance in self._instances.values():
            view.setdefault(instance.service, []).append(instance)
        return view

    def instances(
        self, service: str, *, live_only: bool = True, ready_only: bool = False
    ) -> list[Instance]:
        """Instances of ``service``: by default those not down; ``ready_only`` for those
        whose status is ``ready`` (the ones to send work to)."""
        found = [i for i in self._instances.values() if i.service == service]
        if ready_only:
            return [i for i in found if i.ready]
        if live_only:
            return [i for i in found if i.up]
        return found

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def events(self) -> EventStream:
        """A stream of the events from now on (close it, or use it as a context)."""
        return EventStream(self)

    async def call(
        self,
        instance: Instance | str,
        endpoint: str,
        value: Any,
        *,
        response_type: type[R] | Any = bytes,
        policy: CallPolicy | None = None,
    ) -> R:
        """Call ``endpoint`` of one instance (by its direct subject, no queue group)."""
        if self._caller is None:
            raise RuntimeError("registry is not started")
        if isinstance(instance, str):
            found = self._instances.get(instance)
            if found is None:
                raise LookupError(f"no instance {instance!r} in the registry")
            instance = found
        subject = direct_subject(instance.service, instance.id, endpoint)
        result: R = await self._caller.request(
            subject, value, response_type=response_type, policy=policy
        )
        return result

    # -- what arrives -----------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        if msg.subject.count(".") != 2:
            return  # health.poll, or something else under health.>
        try:
            beat = _decode_heartbeat(msg.data)
        except msgspec.DecodeError:
            log.debug("ignoring an undecodable message on %s", msg.subject)
            return
        self.heard(beat, time.monotonic())

    def heard(self, beat: Heartbeat, now: float) -> None:
        """Apply one heartbeat received at ``now`` (monotonic)."""
        if beat.id in self._gone:
            return
        instance = self._instances.get(beat.id)
        if beat.status == Status.STOPPING:
            if instance is not None:
                del self._instances[beat.id]
                instance.status = beat.status
                instance.last_seen = now
                self._emit(EventKind.GONE, instance, None)
            self._forget(beat.id)
            return
        if (
            instance is not None
            and instance.interval is not None
            and beat.seq <= instance.seq
        ):
            return  # out of order, or a duplicate
        previous = instance.status if instance is not None else None
        was_up = instance is not None and instance.up
        instance = self._apply(beat, instance, now)
        if not was_up:
            self._emit(EventKind.UP, instance, previous)
        elif previous != instance.status:
            self._emit(EventKind.STATUS_CHANGED, instance, previous)

    def _apply(
        self, beat: Heartbeat, instance: Instance | None, now: float
    ) -> Instance:
        if instance is None:
            instance = Instance(
                service=beat.name, id=beat.id, version=beat.version, status=""
            )
            self._instances[beat.id] = instance
        instance.version = beat.version
        instance.status = beat.status
        instance.endpoints = beat.endpoints
        instance.started = beat.started
        instance.metadata = dict(beat.metadata)
        instance.load = beat.load
        instance.interval = beat.interval
        instance.ttl = beat.ttl
        instance.seq = beat.seq
        instance.last_seen = now
        instance.up = True
        return instance

    def _pinged(self, reply: dict[str, Any], now: float) -> None:
        iid, name = reply.get("id"), reply.get("name")
        if not isinstance(iid, str) or not isinstance(name, str) or iid in self._gone:
            return
        instance = self._instances.get(iid)
        if instance is None:
            instance = Instance(
                service=name,
                id=iid,
                version=str(reply.get("version", "")),
                status=Status.READY,
                metadata=dict(reply.get("metadata") or {}),
                ttl=TTL_FACTOR * (self.ping_interval or 6.0),
                last_seen=now,
            )
            self._instances[iid] = instance
            instance.endpoints = _endpoints_of(reply, instance)
            self._emit(EventKind.UP, instance, None)
            return
        if not instance.endpoints and "endpoints" in reply:
            instance.endpoints = _endpoints_of(reply, instance)
        if instance.up:
            instance.last_seen = max(instance.last_seen, now)

    async def _ping(self, subject: str) -> None:
        assert self._caller is not None
        replies = await self._caller.gather(
            subject, b"", response_type=dict, window=self.ping_window
        )
        now = time.monotonic()
        for reply in replies.values:
            self._pinged(reply, now)

    async def _keep_pinging(self) -> None:
        assert self.ping_interval is not None
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await self._ping("$SRV.PING")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry: pinging services failed: %s", exc)

    # -- the failure detector ---------------------------------------------------------

    async def _detect(self) -> None:
        blind = False
        while True:
            await asyncio.sleep(self._next_check())
            nc = self._nc
            if nc is None:
                return
            now = time.monotonic()
            if not nc.is_connected:
                blind = True
                continue
            if blind:  # we could not hear anyone: give everyone a fresh ttl
                blind = False
                for instance in self._instances.values():
                    instance.last_seen = max(instance.last_seen, now)
                continue
            if any(self._overdue(i, now) for i in self._instances.values()):
                if not await self._caught_up(nc):
                    continue
                self._declare_down(time.monotonic())
            self._drop_forgotten(now)

    def _next_check(self) -> float:
        now = time.monotonic()
        wait = _CHECK_AT_LEAST_EVERY
        for instance in self._instances.values():
            if instance.up:
                wait = min(wait, instance.last_seen + instance.ttl - now)
        return max(wait, 0.005)

    @staticmethod
    def _overdue(instance: Instance, now: float) -> bool:
        return instance.up and now - instance.last_seen > instance.ttl

    async def _caught_up(self, nc: Client) -> bool:
        """Read everything the server sent before now, so late news is not blamed."""
        try:
            await nc.flush(timeout=1)
        except Exception:
            return False
        for _ in range(100):
            if self._sub is None or not self._sub.pending_msgs:
                break
            await asyncio.sleep(0)
        return True

    def _declare_down(self, now: float) -> None:
        for instance in self._instances.values():
            if self._overdue(instance, now):
                instance.up = False
                log.info(
                    "registry: %s instance %s is down (not heard from for %.2fs)",
                    instance.service,
                    instance.id,
                    now - instance.last_seen,
                )
                self._emit(EventKind.DOWN, instance, instance.status)

    def _drop_forgotten(self, now: float) -> None:
        for instance in list(self._instances.values()):
            if not instance.up and now - instance.last_seen > self.forget_after:
                del self._instances[instance.id]
                self._emit(EventKind.GONE, instance, instance.status)

    # -- helpers ----------------------------------------------------------------------

    def _emit(self, kind: EventKind, instance: Instance, previous: str | None) -> None:
        if kind is not EventKind.DOWN:
            log.debug("registry: %s %s %s", kind.value, instance.service, instance.id)
        event = RegistryEvent(kind, replace(instance), previous)
        for stream in self._streams:
            stream.put(event)

    def _forget(self, instance_id: str) -> None:
        self._gone[instance_id] = None
        if len(self._gone) > _GONE_MEMORY:
            self._gone.pop(next(iter(self._gone)))


def _endpoints_of(
    reply: dict[str, Any], instance: Instance
) -> tuple[EndpointSummary, ...]:
    endpoints: Iterable[Any] = reply.get("endpoints") or ()
    return tuple(
        EndpointSummary(
            name=str(e.get("name", "")),
            subject=str(e.get("subject", "")),
            queue_group=str(e.get("queue_group") or ""),
            direct=direct_subject(
                instance.service, instance.id, str(e.get("name", ""))
            ),
        )
        for e in endpoints
        if isinstance(e, dict)
    )
