"""Discovery and health: heartbeats, the registry, direct calls, probes, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from natskit import App
from natskit.discovery import EventKind, Heartbeat, Registry, Status
from natskit.discovery.probes import ProbeServer
from natskit.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


def service(name: str, version: str = "1.0.0", **options: Any) -> App:
    app = App(name, version=version, **options)

    @app.endpoint(f"{name}.whoami")
    async def whoami(_: bytes) -> str:
        return app.instance_id

    @app.endpoint(f"{name}.fail", name="fail")
    async def fail(_: bytes) -> str:
        raise RuntimeError("always")

    return app


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_heartbeats_carry_identity_status_load_and_say_goodbye(
    nats_url: str,
) -> None:
    nc = await nats.connect(nats_url)
    beats: list[Heartbeat] = []

    async def note(msg: Any) -> None:
        beats.append(msgspec.json.decode(msg.data, type=Heartbeat))

    await nc.subscribe("health.>", cb=note)
    await nc.flush()
    app = service("inventory", "2.0.1", heartbeat_interval=0.2, metadata={"az": "b"})
    await app.start()
    subject_id = app.instance_id
    await app.request("inventory.whoami", b"", response_type=str)
    await wait_until(lambda: any(b.load.handled >= 1 for b in beats))
    await app.stop()
    await nc.flush()
    await wait_until(lambda: beats[-1].status == "stopping")
    await nc.close()

    statuses = [b.status for b in beats]
    assert statuses[:2] == ["starting", "ready"]
    assert statuses[-2:] == ["draining", "stopping"]
    assert set(statuses[2:-2]) == {"ready"}
    assert [b.seq for b in beats] == list(range(1, len(beats) + 1))
    last = beats[-1]
    assert (last.name, last.id, last.version) == ("inventory", subject_id, "2.0.1")
    assert last.interval == 0.2 and last.ttl == pytest.approx(0.5)
    assert last.metadata == {"az": "b"}
    assert last.started.endswith("Z")
    assert {(e.name, e.subject, e.queue_group) for e in last.endpoints} == {
        ("whoami", "inventory.whoami", "q"),
        ("fail", "inventory.fail", "q"),
    }
    assert last.endpoints[0].direct == f"direct.inventory.{subject_id}.whoami"
    assert last.load.handled == 1 and last.load.errors == 0
    assert last.load.in_flight == 0


async def test_registry_started_later_knows_every_instance_and_agrees_with_srv(
    nats_url: str,
) -> None:
    # Long intervals: nothing but the registry's own start-up questions can inform it.
    apps = [
        service("inventory", "1.2.3", heartbeat_interval=60),
        service("inventory", "1.2.3", heartbeat_interval=60),
        service("billing", "0.9.0", heartbeat_interval=60),
    ]
    for app in apps:
        await app.start()
    # A services-protocol responder that is not natskit (no heartbeats at all).
    legacy = await nats.connect(nats_url)
    legacy_info = {
        "type": "io.nats.micro.v1.info_response",
        "name": "legacy",
        "id": "LEGACY1",
        "version": "4.0.0",
        "metadata": {},
        "endpoints": [{"name": "get", "subject": "legacy.get", "queue_group": "q"}],
    }

    async def answer(msg: Any) -> None:
        await legacy.publish(msg.reply, json.dumps(legacy_info).encode())

    await legacy.subscribe("$SRV.INFO", cb=answer)
    await legacy.subscribe("$SRV.PING", cb=answer)
    await legacy.flush()
    try:
        async with Registry(servers=[nats_url]) as registry:
            view = registry.services()
            assert sorted(view) == ["billing", "inventory", "legacy"]
            assert {i.id for i in registry.instances("inventory")} == {
                apps[0].instance_id,
                apps[1].instance_id,
            }
            assert all(i.status == "ready" for i in registry.instances("inventory"))

            # The live view and the $SRV.* answers agree.
            infos = await apps[0].gather("$SRV.INFO", b"", response_type=dict)
            assert len(infos.values) == 4
            for info in infos.values:
                instance = registry.get(info["id"])
                assert instance is not None
                assert instance.service == info["name"]
                assert instance.version == info["version"]
                assert {
                    (e.name, e.subject, e.queue_group) for e in instance.endpoints
                } == {
                    (e["name"], e["subject"], e["queue_group"])
                    for e in info["endpoints"]
                }
    finally:
        await legacy.close()
        for app in apps:
            await app.stop()


async def test_graceful_stop_is_seen_as_going_away_at_once(nats_url: str) -> None:
    app = service("inventory", heartbeat_interval=1.0)  # ttl 2.5 s
    await app.start()
    async with Registry(servers=[nats_url]) as registry:
        assert [i.id for i in registry.instances("inventory")] == [app.instance_id]
        with registry.events() as events:
            stopped_at = time.monotonic()
            await app.stop()
            draining = await events.next(timeout=5)
            gone = await events.next(timeout=5)
        assert draining.kind is EventKind.STATUS_CHANGED
        assert (draining.previous, draining.instance.status) == ("ready", "draining")
        assert gone.kind is EventKind.GONE and gone.instance.id == app.instance_id
        assert gone.at - stopped_at < 1.0, "going away must not wait for the ttl"
        assert registry.instances("inventory", live_only=False) == []


async def test_direct_calls_reach_the_chosen_instance_and_count_in_stats(
    nats_url: str,
) -> None:
    apps = [service("echo", heartbeat_interval=5) for _ in range(3)]
    for app in apps:
        await app.start()
    try:
        async with Registry(apps[0]) as registry:
            instances = registry.instances("echo", ready_only=True)
            assert len(instances) == 3
            for instance in instances:
                for _ in range(3):
                    got = await registry.call(
                        instance, "whoami", b"", response_type=str
                    )
                    assert got == instance.id
            # Through the queue group too.
            shared = await apps[0].request("echo.whoami", b"", response_type=str)
            assert shared in {a.instance_id for a in apps}
            stats = await apps[0].gather("$SRV.STATS", b"", response_type=dict)
            by_id = {
                s["id"]: {e["name"]: e["num_requests"] for e in s["endpoints"]}
                for s in stats.values
            }
            for app in apps:
                expected = 3 + (app.instance_id == shared)
                assert by_id[app.instance_id]["whoami"] == expected
    finally:
        for app in apps:
            await app.stop()


async def test_readiness_check_drives_status_and_probes(nats_url: str) -> None:
    ready: bool | Exception = True

    async def check() -> bool:
        if isinstance(ready, Exception):
            raise ready
        return ready

    app = service("inventory", heartbeat_interval=0.2, readiness=check)
    async with ProbeServer(app, port=0) as probes:
        await app.start()
        async with Registry(servers=[nats_url]) as registry:
            assert (await http_get(probes.port, "/livez"))[0] == 200
            code, body = await http_get(probes.port, "/readyz")
            assert code == 200
            assert body == {
                "name": "inventory",
                "id": app.instance_id,
                "status": "ready",
            }

            with registry.events() as events:
                ready = False
                change = await events.next(timeout=5)
            assert change.kind is EventKind.STATUS_CHANGED
            assert change.instance.status == Status.NOT_READY
            assert (await http_get(probes.port, "/readyz"))[0] == 503
            assert (await http_get(probes.port, "/healthz"))[0] == 503
            assert (await http_get(probes.port, "/livez"))[0] == 200
            assert registry.instances("inventory", ready_only=True) == []
            assert len(registry.instances("inventory")) == 1

            ready = True
            await wait_until(
                lambda: registry.instances("inventory", ready_only=True) != []
            )
            assert (await http_get(probes.port, "/healthz"))[0] == 200

            ready = RuntimeError("database unreachable")
            await wait_until(
                lambda: registry.instances("inventory", ready_only=True) == []
            )
            assert (await http_get(probes.port, "/readyz"))[0] == 503
            assert (await http_get(probes.port, "/nope"))[0] == 404
        await app.stop()
        assert (await http_get(probes.port, "/livez"))[0] == 503
        assert (await http_get(probes.port, "/readyz"))[0] == 503


async def test_cli_services_lists_services_instances_and_counts(nats_url: str) -> None:
    apps = [service("inventory", "1.2.3"), service("billing", "0.9.0")]
    for app in apps:
        await app.start()
    try:
        await apps[0].request("inventory.whoami", b"", response_type=str)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "natskit", "services", "--server", nats_url),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        for app in apps:
            await app.stop()
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    lines = text.splitlines()
    assert lines[0].split() == [
        "SERVICE", "INSTANCE", "VERSION", "STATUS", "UPTIME", "REQUESTS", "ERRORS"
    ]  # fmt: skip
    rows = {line.split()[1]: line.split() for line in lines[1:] if line.strip()}
    inventory = rows[apps[0].instance_id]
    assert inventory[0] == "inventory" and inventory[2] == "1.2.3"
    assert inventory[3] == "ready" and inventory[5:] == ["1", "0"]
    assert rows[apps[1].instance_id][:3] == ["billing", apps[1].instance_id, "0.9.0"]
    assert "2 service(s), 2 instance(s)" in text
