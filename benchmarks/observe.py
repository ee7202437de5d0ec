"""Tracing and metrics switched on for the natskit side of a scenario (``--observe``).

Tracing uses the OpenTelemetry SDK with a batch span processor and an exporter that
only counts, so the cost measured is natskit's instrumentation plus the SDK's own
span handling, not a collector's network I/O. Traces are started for 1% of messages
(``NATSKIT_TRACE_SAMPLE_RATIO=0.01``, a common production setting); ``--trace-all``
traces every message, to show what a span costs. Metrics are enabled as
``natskit run --metrics-port`` would (histograms recorded per message).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from natskit import App
from natskit.observability import enable_metrics

__all__ = ["observe_if_asked"]


def observe_if_asked(app: App, extra: Sequence[str]) -> None:
    """With ``--observe`` among ``extra``: tracing on (process-wide) and metrics on."""
    if "--observe" not in extra:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class CountingExporter(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    os.environ["NATSKIT_TRACE_SAMPLE_RATIO"] = (
        "1.0" if "--trace-all" in extra else "0.01"
    )
    provider: Any = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(CountingExporter()))
    trace.set_tracer_provider(provider)
    app.metrics_enabled = True
    enable_metrics(app)
