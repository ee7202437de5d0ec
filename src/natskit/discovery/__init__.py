"""Discovery and health: heartbeats, a live registry with failure detection, probes.

* :mod:`~natskit.discovery.heartbeat`: what every App publishes on
  ``health.<service>.<instance id>``, and when;
* :mod:`~natskit.discovery.direct`: the per-instance subjects of endpoints;
* :mod:`~natskit.discovery.registry`: the watching side, :class:`Registry`;
* :mod:`~natskit.discovery.probes`: HTTP liveness and readiness for orchestrators.
"""

from natskit.discovery.heartbeat import (
    EndpointSummary,
    Heartbeat,
    Load,
    ReadinessCheck,
    Status,
    direct_subject,
    health_subject,
)
from natskit.discovery.registry import EventKind, Instance, Registry, RegistryEvent

__all__ = [
    "EndpointSummary",
    "EventKind",
    "Heartbeat",
    "Instance",
    "Load",
    "ReadinessCheck",
    "Registry",
    "RegistryEvent",
    "Status",
    "direct_subject",
    "health_subject",
]
