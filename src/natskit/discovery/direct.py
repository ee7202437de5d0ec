"""Direct calls: each endpoint of an instance also answers on its own subject.

An endpoint's shared subject is served in a queue group, so a request reaches one
instance, chosen by the server. To reach one particular instance (to inspect it, to
drain a cache on each node, to pin a session), every instance also subscribes, without
a queue group, to ``direct.<service>.<instance id>.<endpoint name>`` (see
:func:`~natskit.discovery.heartbeat.direct_subject`). Messages on it go into the
endpoint's own pipeline, so they run the same handler and middleware, are settled the
same way, and count in the same ``$SRV.STATS`` figures.

A direct subscription runs its requests one at a time, in nats-py's reader task for
that subscription, whatever the endpoint's ``max_concurrency``: direct calls are for
addressing one instance, not for throughput.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import nats.errors

from natskit.discovery.heartbeat import direct_subject
from natskit.rpc import EndpointSource

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription as NatsSubscription

    from natskit.app import App

__all__ = ["DirectEndpoints"]

log = logging.getLogger("natskit.discovery")


class DirectEndpoints:
    """The instance-specific subscriptions of an App's endpoints (a source)."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._subs: list[NatsSubscription] = []
        self.label = f"direct calls on direct.{app.name}.{app.instance_id}.<endpoint>"

    async def start(self, nc: Client) -> None:
        app = self._app
        for source in app.sources:
            if isinstance(source, EndpointSource):
                subject = direct_subject(
                    app.name, app.instance_id, source.endpoint.name
                )
                sub = await nc.subscribe(subject, cb=source.pipeline.callback)
                self._subs.append(sub)

    async def drain(self, deadline: float) -> int:
        subs, self._subs = self._subs, []
        left = 0
        for sub in subs:
            try:
                draining = sub.drain()  # type: ignore[no-untyped-call]
                await asyncio.wait_for(
                    draining, timeout=max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                left += sub.pending_msgs
            except nats.errors.Error as exc:
                log.warning("draining %s failed: %s", sub.subject, exc)
        return left
