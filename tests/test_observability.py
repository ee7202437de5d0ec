"""Observability: one trace across processes, exact metrics over HTTP, logs without secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from natskit import App, ConnectOptions, Reject, ServiceError
from natskit.observability import Histogram, RateLimitedLog, serve_metrics
from natskit.server import EmbeddedServer, ServerOptions
from natskit.streams import StreamSpec
from natskit.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


class Item(msgspec.Struct):
    n: int


# -- pure parts -------------------------------------------------------------------------


def test_rate_limited_log_counts_what_it_suppresses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("natskit.test"), interval=5, clock=lambda: now[0]
    )
    assert limited.warning("k", "trouble on %s", "a.b")
    for _ in range(3):
        assert not limited.warning("k", "trouble on %s", "a.b")
    assert limited.warning("other", "other trouble")
    now[0] = 5.0
    assert limited.warning("k", "trouble on %s", "a.b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "trouble on a.b",
        "other trouble",
        "trouble on a.b (and 3 more like it since the last report)",
    ]


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.001, 0.01))
    for ns in (500_000, 2_000_000, 3_000_000, 50_000_000):
        histogram.observe_ns(ns)
    assert histogram.cumulative() == [("0.001", 1), ("0.01", 3), ("+Inf", 4)]
    assert histogram.count == 4
    assert histogram.sum_ns == 55_500_000


# -- metrics over HTTP ------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_endpoint_shows_exact_counts_after_a_known_workload(
    nats_url: str,
) -> None:
    app = App("metered")
    app.stream(StreamSpec(name="WORK", subjects=("work.>",)))
    handled: list[int] = []
    consumed: list[int] = []

    @app.subscribe("events.*")
    async def on_event(item: Item) -> None:
        if item.n % 4 == 3:
            raise RuntimeError("unlucky")
        handled.append(item.n)

    @app.endpoint("svc.check")
    async def check(item: Item) -> Item:
        if item.n < 0:
            raise ServiceError(422, "negative")
        return item

    @app.consume(stream="WORK", durable="workers")
    async def work(item: Item) -> None:
        if item.n == 0:
            raise Reject("zero is not work")
        consumed.append(item.n)

    server = serve_metrics(app, 0)
    port = server.server_port
    try:
        async with app:
            for n in range(12):
                await app.publish(f"events.e{n}", Item(n=n))
            nc = await nats.connect(nats_url)
            await nc.publish("events.bad", b"not json")
            await nc.close()
            for n in (1, 2, 3):
                await app.request("svc.check", Item(n=n), response_type=Item)
            with pytest.raises(ServiceError):
                await app.request("svc.check", Item(n=-1))
            await app.js_publish_many([("work.a", Item(n=n)) for n in range(5)])
            events_stats = next(
                src.pipeline.stats  # type: ignore[attr-defined]
                for src in app.sources
                if getattr(src, "label", "").startswith("subscribe events.*")
            )
            # The bad payload came over another connection: wait for it too.
            consumer_counts = next(
                src.counts  # type: ignore[attr-defined]
                for src in app.sources
                if hasattr(src, "counts")
            )
            # The bad payload came over another connection, and the dead letter is
            # written after the handler returns: wait for both.
            await wait_until(
                lambda: (
                    events_stats.received == 13
                    and consumer_counts["ack"] == 4
                    and consumer_counts["dead_letter"] == 1
                )
            )
            samples = await asyncio.to_thread(scrape, port)
    finally:
        server.shutdown()

    def handled_count(source: str, pattern: str, outcome: str) -> float:
        return value(
            samples,
            "natskit_messages_handled_total",
            app="metered",
            source=source,
            pattern=pattern,
            outcome=outcome,
        )

    assert handled_count("core", "events.*", "ok") == 9
    assert handled_count("core", "events.*", "error") == 4
    errors = {"app": "metered", "source": "core", "pattern": "events.*"}
    assert (
        value(samples, "natskit_handler_errors_total", **errors, error="RuntimeError")
        == 3
    )
    assert (
        value(samples, "natskit_handler_errors_total", **errors, error="DecodeError")
        == 1
    )
    assert handled_count("service", "svc.check", "ok") == 3
    assert handled_count("service", "svc.check", "error") == 1
    assert handled_count("jetstream", "WORK/workers", "ok") == 4
    settled = {"app": "metered", "stream": "WORK", "durable": "workers"}
    assert value(samples, "natskit_consumer_settled_total", **settled, kind="ack") == 4
    assert (
        value(samples, "natskit_consumer_settled_total", **settled, kind="dead_letter")
        == 1
    )
    requests = {"app": "metered", "subject": "svc.check"}
    assert value(samples, "natskit_requests_total", **requests, outcome="ok") == 3
    assert (
        value(samples, "natskit_requests_total", **requests, outcome="ServiceError")
        == 1
    )
    assert value(samples, "natskit_request_duration_seconds_count", **requests) == 4
    duration = {"app": "metered", "source": "core", "pattern": "events.*"}
    assert value(samples, "natskit_handler_duration_seconds_count", **duration) == 13
    assert value(samples, "natskit_circuit_state", **requests) == 0
    assert value(samples, "natskit_handlers_in_flight", **duration) == 0
    # Labels are the declared patterns: no concrete subject such as events.e1 appears.
    assert not any("events.e" in str(labels) for _, labels in samples)


# -- logs -------------------------------------------------------------------------------


async def test_logs_of_a_run_with_credentials_in_the_url_hold_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "pa55-w0rd-SECRET"
    server = EmbeddedServer(ServerOptions(user="svc", password=secret))
    server.start()
    try:
        url = f"nats://svc:{secret}@127.0.0.1:{server.client_port}"
        app = App("secretive", connection=ConnectOptions(servers=(url,)))
        got: list[int] = []

        @app.subscribe("s.*")
        async def handle(item: Item) -> None:
            got.append(item.n)

        await app.start()
        await app.publish("s.a", Item(n=1))
        await wait_until(lambda: got == [1])
        server.kill()
        await wait_until(lambda: app.events.disconnects >= 1)
        await asyncio.to_thread(server.restart)
        await wait_until(lambda: app.events.reconnects >= 1, timeout=20)
        await app.publish("s.b", Item(n=2))
        await wait_until(lambda: got == [1, 2])
        await app.stop()
        wrong = App(
            "wrong",
            connection=ConnectOptions(
                servers=(f"nats://svc:{secret}x@127.0.0.1:{server.client_port}",),
                first_connect_timeout=1,
            ),
        )
        with pytest.raises(Exception) as failure:
            await wrong.start()
        assert secret not in str(failure.value)
    finally:
        server.stop()
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    assert "reconnected" in text
    assert secret not in text


# -- tracing across two processes ---------------------------------------------------


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_trace_follows_a_request_into_an_event_and_a_stream_consumer(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPANS_FILE": str(tmp_path / "spans")}
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "natskit",
            "--log-level",
            "WARNING",
            "run",
            "tests.apps.traced:service",
            "--server",
            nats_server.url,
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        assert nats_server.monitor_url is not None
        for _ in range(1000):
            with urllib.request.urlopen(f"{nats_server.monitor_url}/connz?subs=1") as r:
                connz = json.load(r)
            if any(
                "orders.create" in (c.get("subscriptions_list") or [])
                for c in connz["connections"]
            ):
                break
            assert service.poll() is None
            import time

            time.sleep(0.02)
        client = subprocess.run(
            [sys.executable, "-m", "tests.apps.traced", "client", nats_server.url],
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert client.returncode == 0
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    spans = _spans(tmp_path / "spans.client") + _spans(tmp_path / "spans.service")
    by_name = {s["name"]: s for s in spans}
    request = by_name["request orders.create"]
    served = by_name["process orders.create"]
    event_out = by_name["publish events.order.o1"]
    event_in = by_name["process events.order.*"]
    stored_out = by_name["publish order.stored.o1"]
    stored_in = by_name["process ORDERS/shipping"]
    trace_ids = {
        s["trace"]
        for s in (request, served, event_out, event_in, stored_out, stored_in)
    }
    assert len(trace_ids) == 1, "every hop belongs to one trace"
    assert request["parent"] is None and request["kind"] == "CLIENT"
    assert served["parent"] == request["span"] and served["kind"] == "SERVER"
    assert event_out["parent"] == served["span"] and event_out["kind"] == "PRODUCER"
    assert event_in["parent"] == event_out["span"] and event_in["kind"] == "CONSUMER"
    assert stored_out["parent"] == served["span"]
    assert stored_in["parent"] == stored_out["span"]
    assert stored_in["attributes"]["messaging.nats.delivery_count"] == 1


def test_natskit_run_serves_metrics_on_the_given_port(
    nats_server: EmbeddedServer,
) -> None:
    from natskit.testing import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "natskit", "run", "tests.apps.workers:app"),
            *("--server", nats_server.url, "--metrics-port", str(port)),
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "started" in line and "test-worker" in line:
                break
        samples = scrape(port)
        key = {"app": "test-worker", "source": "core", "pattern": "jobs.run"}
        assert (
            value(samples, "natskit_messages_handled_total", **key, outcome="ok") == 0
        )
        assert value(samples, "natskit_reconnects_total", app="test-worker") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


async def test_tracing_samples_new_traces_and_follows_the_parents_flag() -> None:
    from nats.aio.msg import Msg
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from natskit import Message
    from natskit.observability import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), "sampled", sample_ratio=0.0)

    async def handled(msg: Message[Any]) -> str:
        return "ok"

    def message(headers: dict[str, str] | None) -> Message[Any]:
        raw = Msg(None, subject="orders.1", reply="", data=b"{}", headers=headers)  # type: ignore[arg-type]
        return Message(raw, "core", None, "orders.*")

    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    assert not tracing.wants(None)  # ratio 0: no new traces
    assert not tracing.wants({"traceparent": f"00-{trace_id}-{span_id}-00"})
    sampled = {"traceparent": f"00-{trace_id}-{span_id}-03"}  # sampled + random bits
    assert tracing.wants(sampled)
    assert Tracing(provider.get_tracer("test"), "all", sample_ratio=1.0).wants(None)
    assert await tracing.middleware(message(sampled), handled) == "ok"
    (span,) = exporter.get_finished_spans()
    assert span.name == "process orders.*"
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == span_id
    with pytest.raises(ValueError, match="sample ratio"):
        Tracing(provider.get_tracer("test"), "x", sample_ratio=2.0)
