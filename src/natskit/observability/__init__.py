"""Observability: traces across every hop, metrics for every pattern, logs that help.

Logger names are fixed and listed in :data:`natskit.observability.logs.LOGGERS`.
Tracing (:mod:`.tracing`) is on when the OpenTelemetry SDK is installed and a tracer
provider is configured, and costs nothing otherwise. Metrics (:mod:`.metrics`) are read
from counters the patterns keep anyway, at scrape time; only handler and request
duration histograms add work per message, and only once metrics are enabled.
"""

from natskit.observability.logs import LOGGERS, RateLimitedLog
from natskit.observability.metrics import Histogram, enable_metrics, serve_metrics
from natskit.observability.tracing import Tracing

__all__ = [
    "LOGGERS",
    "Histogram",
    "RateLimitedLog",
    "Tracing",
    "enable_metrics",
    "serve_metrics",
]
