"""Prometheus metrics for every pattern, read from the App's own counters at scrape time.

Theory of operation
-------------------
The patterns already count what they do (handler stats per source, call stats per
subject, breaker states, consumer settlements, connection events), because the
services protocol and the logs need those numbers anyway. :class:`AppCollector` turns
them into Prometheus metric families when scraped, so metrics cost nothing per message
but the two duration histograms, which :func:`enable_metrics` switches on.

Labels are bounded: handlers are labelled by their declared pattern (a subject pattern
or ``stream/durable``), calls by subject up to :data:`MAX_CALL_SUBJECTS` distinct
subjects, after which further ones count under ``subject="other"``. Concrete subjects
of received messages never become labels.

The collector runs in the scrape thread and only reads integers and small dicts that
the event loop writes; a scrape may see a count one message behind, never a torn value.
Consumer lag (pending, ack pending, redelivered) needs a JetStream request, so while
metrics are served a task of the App refreshes it every ``lag_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from natskit.app import App

__all__ = [
    "DEFAULT_BUCKETS",
    "MAX_CALL_SUBJECTS",
    "AppCollector",
    "Histogram",
    "enable_metrics",
    "serve_metrics",
]

log = logging.getLogger("natskit.observability")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MAX_CALL_SUBJECTS = 200
_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Histogram:
    """Durations in fixed buckets: one bisect and two additions per observation."""

    __slots__ = ("_bounds_ns", "bounds", "count", "counts", "sum_ns")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._bounds_ns = [int(b * 1e9) for b in self.bounds]
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum_ns = 0

    def observe_ns(self, elapsed_ns: int) -> None:
        self.counts[bisect.bisect_left(self._bounds_ns, elapsed_ns)] += 1
        self.count += 1
        self.sum_ns += elapsed_ns

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs, ending with ``+Inf``."""
        total = 0
        out = []
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            out.append((_le(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


def enable_metrics(app: App) -> None:
    """Switch on the duration histograms of ``app`` (idempotent; before or after start)."""
    app.metrics_enabled = True
    for source in app.sources:
        pipeline = getattr(source, "pipeline", None)
        if pipeline is not None and pipeline.stats.histogram is None:
            pipeline.stats.histogram = Histogram()
    app.caller.metrics_enabled = True


def serve_metrics(app: App, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``app``'s metrics at ``http://host:port/metrics``; returns the server.

    Uses prometheus_client's HTTP server (a daemon thread) with a registry of its own,
    so several Apps in one process never clash on metric names.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    enable_metrics(app)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(app))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server


class AppCollector:
    """A prometheus_client collector reading one App's counters (see module docstring)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from self._handler_families()
        yield from self._call_families()
        yield from self._consumer_families()
        yield from self._connection_families()

    def _handler_families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        name = self.app.name
        labels = ["app", "source", "pattern"]
        handled = CounterMetricFamily(
            "natskit_messages_handled",
            "Messages handled, by outcome",
            labels=[*labels, "outcome"],
        )
        errors = CounterMetricFamily(
            "natskit_handler_errors",
            "Handler failures by error class",
            labels=[*labels, "error"],
        )
        in_flight = GaugeMetricFamily(
            "natskit_handlers_in_flight", "Handlers running now", labels=labels
        )
        duration = HistogramMetricFamily(
            "natskit_handler_duration_seconds", "Handler duration", labels=labels
        )
        for source in self.app.sources:
            pipeline = getattr(source, "pipeline", None)
            if pipeline is None:
                continue
            stats = pipeline.stats
            key = [name, pipeline.source, pipeline.pattern]
            handled.add_metric([*key, "ok"], stats.received - stats.errors)
            handled.add_metric([*key, "error"], stats.errors)
            for error, count in list(stats.error_classes.items()):
                errors.add_metric([*key, error], count)
            in_flight.add_metric(key, stats.in_flight)
            histogram = stats.histogram
            if histogram is not None:
                duration.add_metric(
                    key,
                    buckets=histogram.cumulative(),
                    sum_value=histogram.sum_ns / 1e9,
                )
        yield from (handled, errors, in_flight, duration)

    def _call_families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        name = self.app.name
        caller = self.app.caller
        calls = CounterMetricFamily(
            "natskit_requests",
            "Request-reply calls by outcome",
            labels=["app", "subject", "outcome"],
        )
        latency = HistogramMetricFamily(
            "natskit_request_duration_seconds",
            "Call latency, retries included",
            labels=["app", "subject"],
        )
        for subject, per in list(caller.by_subject.items()):
            for outcome, count in list(per.outcomes.items()):
                calls.add_metric([name, subject, outcome], count)
            latency.add_metric(
                [name, subject],
                buckets=per.latency.cumulative(),
                sum_value=per.latency.sum_ns / 1e9,
            )
        stats = caller.stats
        retries = CounterMetricFamily(
            "natskit_request_retries", "Retried attempts", labels=["app"]
        )
        retries.add_metric([name], stats.retries)
        hedges = CounterMetricFamily(
            "natskit_request_hedges", "Hedged attempts", labels=["app"]
        )
        hedges.add_metric([name], stats.hedges)
        fallbacks = CounterMetricFamily(
            "natskit_request_fallbacks", "Fallbacks used", labels=["app"]
        )
        fallbacks.add_metric([name], stats.fallbacks)
        state = GaugeMetricFamily(
            "natskit_circuit_state",
            "Breaker state: 0 closed, 1 half-open, 2 open",
            labels=["app", "subject"],
        )
        opened = CounterMetricFamily(
            "natskit_circuit_opened",
            "Times the breaker opened",
            labels=["app", "subject"],
        )
        rejected = CounterMetricFamily(
            "natskit_circuit_rejected",
            "Calls failed fast by an open breaker",
            labels=["app"],
        )
        rejected.add_metric([name], stats.rejected_by_breaker)
        for subject, breaker in list(caller.breakers.items())[:MAX_CALL_SUBJECTS]:
            state.add_metric([name, subject], _BREAKER_VALUES[breaker.state.value])
            opened.add_metric([name, subject], breaker.opened_count)
        yield from (calls, latency, retries, hedges, fallbacks, state, opened, rejected)

    def _consumer_families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        name = self.app.name
        labels = ["app", "stream", "durable"]
        settled = CounterMetricFamily(
            "natskit_consumer_settled",
            "JetStream settlements by kind",
            labels=[*labels, "kind"],
        )
        lag = GaugeMetricFamily(
            "natskit_consumer_lag",
            "Consumer state from the server",
            labels=[*labels, "kind"],
        )
        for source in self.app.sources:
            counts = getattr(source, "counts", None)
            decl = getattr(source, "decl", None)
            if counts is None or decl is None:
                continue
            key = [name, decl.spec.stream, decl.spec.durable]
            for kind, count in list(counts.items()):
                settled.add_metric([*key, kind], count)
            for kind, value in list(getattr(source, "lag", {}).items()):
                lag.add_metric([*key, kind], value)
        yield from (settled, lag)

    def _connection_families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        name = self.app.name
        events = self.app.events
        reconnects = CounterMetricFamily(
            "natskit_reconnects", "Reconnects", labels=["app"]
        )
        reconnects.add_metric([name], events.reconnects)
        disconnects = CounterMetricFamily(
            "natskit_disconnects", "Disconnects", labels=["app"]
        )
        disconnects.add_metric([name], events.disconnects)
        dropped = CounterMetricFamily(
            "natskit_slow_consumer_dropped",
            "Messages the client dropped because a handler fell behind",
            labels=["app", "pattern"],
        )
        for pattern, count in list(events.slow_consumer_drops.items()):
            dropped.add_metric([name, pattern], count)
        yield from (reconnects, disconnects, dropped)


class LagRefresher:
    """A source of the App that refreshes consumer lag from the server while metrics
    are on (one JetStream request per consumer every ``interval`` seconds)."""

    label = "metrics: consumer lag refresher"

    def __init__(self, app: App, *, interval: float = 5.0) -> None:
        self.app = app
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self, nc: Any) -> None:
        if any(hasattr(s, "lag") for s in self.app.sources):
            self._task = asyncio.create_task(self._run(nc))

    async def _run(self, nc: Any) -> None:
        from natskit.streams.api import JetStreamApi

        api = JetStreamApi(nc)
        while True:
            for source in list(self.app.sources):
                decl = getattr(source, "decl", None)
                if decl is None or not hasattr(source, "lag"):
                    continue
                try:
                    info = await api.consumer_info(decl.spec.stream, decl.spec.durable)
                except Exception as exc:  # lag is best effort; the next round retries
                    log.debug("consumer lag of %s: %s", source.label, exc)
                    continue
                source.lag = {
                    "pending": int(info.get("num_pending", 0)),
                    "ack_pending": int(info.get("num_ack_pending", 0)),
                    "redelivered": int(info.get("num_redelivered", 0)),
                    "waiting": int(info.get("num_waiting", 0)),
                }
            await asyncio.sleep(self.interval)

    async def drain(self, deadline: float) -> int:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return 0
