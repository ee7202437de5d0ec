"""The real ``nats-server``: find the binary, run one server or a local cluster."""

from natskit.server.binary import find_server_binary
from natskit.server.cluster import LocalCluster
from natskit.server.process import (
    Account,
    EmbeddedServer,
    Permissions,
    ServerOptions,
    ServerTLS,
    User,
    free_port,
)

__all__ = [
    "Account",
    "EmbeddedServer",
    "LocalCluster",
    "Permissions",
    "ServerOptions",
    "ServerTLS",
    "User",
    "find_server_binary",
    "free_port",
]
