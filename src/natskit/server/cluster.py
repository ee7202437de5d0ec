"""A route-clustered group of ``nats-server`` nodes with JetStream, on one machine.

Each node has its own client, cluster (route) and monitoring ports, server name
(``n1`` .. ``nN``), work directory and store, and routes to all the others; the cluster
is named ``natskit-local``. Ports and directories are fixed for the lifetime of the
:class:`LocalCluster`, so a node that is killed or stopped and then restarted rejoins
the same cluster with its old store.

Readiness: a node alone is ready when its client port answers and its monitor reports
JetStream enabled (``/healthz?js-server-only=true``). The cluster is ready when every
running node's plain ``/healthz`` is ok, which the server grants only once the node
has contact with a JetStream meta leader and its streams and consumers are current.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Self

from natskit.errors import ServerStartError
from natskit.server.process import (
    EmbeddedServer,
    ServerOptions,
    _ClusterConfig,
    _host_port,
    free_port,
)

__all__ = ["LocalCluster"]

CLUSTER_NAME = "natskit-local"


class LocalCluster:
    """``size`` routed ``nats-server`` nodes with JetStream, for development and tests.

    ``options`` is the template for every node; ``port``, ``server_name`` and
    ``store_dir`` are set per node, and JetStream and monitoring are always on. All
    files live in one temporary directory that :meth:`stop` removes unless
    ``options.keep_store`` is true. Node indexes are 0-based: ``nodes[0]`` is ``n1``.
    """

    def __init__(self, size: int = 3, *, options: ServerOptions | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        base = options or ServerOptions()
        if base.port is not None or base.store_dir is not None:
            raise ValueError("port and store_dir are chosen per node; leave them unset")
        self._options = base
        self._root = Path(tempfile.mkdtemp(prefix="natskit-cluster-"))
        route_ports = [free_port(base.host) for _ in range(size)]
        self.nodes: list[EmbeddedServer] = []
        for index, route_port in enumerate(route_ports):
            others = [p for i, p in enumerate(route_ports) if i != index]
            node_options = dataclasses.replace(
                base, server_name=f"n{index + 1}", jetstream=True, monitor=True
            )
            config = _ClusterConfig(
                name=CLUSTER_NAME,
                port=route_port,
                routes=tuple(_host_port(base.host, p) for p in others),
                work_dir=self._root / f"n{index + 1}",
            )
            self.nodes.append(EmbeddedServer(node_options, cluster=config))

    @property
    def urls(self) -> list[str]:
        """The client URL of every node, in node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs joined by commas (the form ``nats.connect`` accepts)."""
        return ",".join(self.urls)

    @property
    def root_dir(self) -> Path:
        """The directory holding every node's config, log and store."""
        return self._root

    def __repr__(self) -> str:
        running = sum(node.running for node in self.nodes)
        return f"<LocalCluster {len(self.nodes)} nodes, {running} running>"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every node, then wait until each one reports JetStream healthy.

        On failure the nodes already started are stopped and the
        :class:`~natskit.errors.ServerStartError` names the log of the node at fault.
        """
        try:
            for node in self.nodes:
                if not node.running:
                    node.start()
            self.wait_healthy()
        except BaseException:
            for node in self.nodes:
                node.kill()
            raise

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every running node's ``/healthz`` is ok (meta leader known, its
        streams current); ``timeout`` defaults to the options' ``ready_timeout``."""
        budget = self._options.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        for node in self.nodes:
            if node.running:
                node.wait_healthy(max(deadline - time.monotonic(), 0.0))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every node, then remove the cluster's files unless ``keep_store``."""
        for node in self.nodes:
            node.stop(timeout)
        if not self._options.keep_store:
            shutil.rmtree(self._root, ignore_errors=True)

    def kill(self, index: int) -> None:
        """``SIGKILL`` node ``index`` (0-based); its store is kept for a restart."""
        self.nodes[index].kill()

    def stop_node(self, index: int, timeout: float = 5.0) -> None:
        """Stop node ``index`` with ``SIGTERM``; its store is kept for a restart."""
        self.nodes[index].stop(timeout)

    def pause(self, index: int) -> None:
        """Freeze node ``index`` with ``SIGSTOP``."""
        self.nodes[index].pause()

    def resume(self, index: int) -> None:
        """Let a paused node ``index`` continue."""
        self.nodes[index].resume()

    def restart(self, index: int) -> None:
        """Restart node ``index`` with its old ports and store.

        Returns once the node is healthy (caught up with the meta leader and its
        streams) when a majority of nodes runs; without a quorum nothing can become
        healthy, so it then returns as soon as the node serves clients.
        """
        node = self.nodes[index]
        node.restart()
        running = sum(n.running for n in self.nodes)
        if running * 2 > len(self.nodes):
            try:
                node.wait_healthy(self._options.ready_timeout)
            except ServerStartError:
                node.kill()
                raise
