"""An app the discovery tests run in several processes, with 1 s heartbeats.

``BEACON_READY_FILE``, when set, names a file whose existence is the readiness check.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from natskit import App


class Who(msgspec.Struct):
    id: str
    pid: int


def _ready() -> bool:
    path = os.environ.get("BEACON_READY_FILE")
    return path is None or Path(path).exists()


app = App("beacons", version="3.1.4", heartbeat_interval=1.0, readiness=_ready)


@app.endpoint("beacons.whoami")
async def whoami(_: bytes) -> Who:
    return Who(id=app.instance_id, pid=os.getpid())
