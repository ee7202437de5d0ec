"""pytest fixtures that run the real ``nats-server`` on free loopback ports.

Registered as the ``natskit`` pytest11 entry point, so installing natskit makes these
fixtures available in every test suite:

- ``nats_server``: a started :class:`~natskit.server.EmbeddedServer` with JetStream on
  and ``sync_interval: always``, stopped (and its files removed) after the test;
- ``nats_url``: that server's client URL, also set as ``NATS_URL`` for the test;
- ``nats_cluster``: a started three-node :class:`~natskit.server.LocalCluster`.

A server that fails to start raises :class:`~natskit.errors.ServerStartError`, whose
message names the server's log file (kept for inspection).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natskit.server import EmbeddedServer, LocalCluster, ServerOptions


@pytest.fixture
def nats_server() -> Iterator[EmbeddedServer]:
    """A started single ``nats-server`` with JetStream, stopped after the test."""
    server = EmbeddedServer(ServerOptions(jetstream=True, sync_always=True))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client URL of the ``nats_server`` fixture, also exported as ``NATS_URL``.

    So ``App.start()`` without arguments connects to the test's server.
    """
    monkeypatch.setenv("NATS_URL", nats_server.url)
    return nats_server.url


@pytest.fixture
def nats_cluster() -> Iterator[LocalCluster]:
    """A started three-node cluster with JetStream, stopped after the test."""
    cluster = LocalCluster(3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
