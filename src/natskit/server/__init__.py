"""The real ``nats-server``: find the binary, run one server or a local cluster."""

from natskit.server.binary import find_server_binary
from natskit.server.cluster import LocalCluster
from natskit.server.process import EmbeddedServer, ServerOptions

__all__ = ["EmbeddedServer", "LocalCluster", "ServerOptions", "find_server_binary"]
