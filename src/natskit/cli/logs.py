"""Logging set-up for the command line (the library itself adds no handlers)."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    """Send natskit's (and the user's) logs to stderr in ``fmt`` ("text" or "json")."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"natskit: unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # nats-py logs reconnect details that can carry URLs with credentials: keep it quiet
    # unless the user asks for DEBUG, and even then natskit redacts its own lines.
    logging.getLogger("nats").setLevel(max(numeric, logging.WARNING))
