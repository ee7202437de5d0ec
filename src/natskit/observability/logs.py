"""Logger names, and a warning that says "N more" instead of repeating itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LOGGERS", "RateLimitedLog"]

LOGGERS = (
    "natskit.app",  # lifecycle: started, draining, stopped
    "natskit.connection",  # connected, disconnected, reconnected, slow consumers
    "natskit.pipeline",  # handler crashes (ERROR + traceback), undecodable payloads
    "natskit.pubsub",  # core subscriptions
    "natskit.rpc",  # endpoints and calls
    "natskit.resilience",  # circuit breaker transitions
    "natskit.streams",  # JetStream streams, consumers, dead letters
    "natskit.discovery",  # heartbeats, registry, probes
    "natskit.server",  # the embedded nats-server
    "natskit.observability",  # tracing and metrics set-up
)
"""Every logger natskit logs to. The library adds no handlers; ``natskit run`` does."""


class RateLimitedLog:
    """Logs a recurring warning at most once per ``interval`` seconds per key.

    The line that is logged says how many occurrences it stands for, so a flood of
    identical trouble (say, undecodable payloads on one subscription) costs one line
    every few seconds and loses no count. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval.

        Returns whether a line was written.
        """
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, suppressed)
        self.logger.warning(message, *args)
        return True
