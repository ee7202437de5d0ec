"""Discovery under failure: instance processes killed, frozen, thawed and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from natskit.discovery import EventKind, Registry, RegistryEvent
from natskit.server import EmbeddedServer
from natskit.testing import free_port, wait_until

from .apps.beacons import Who

ROOT = Path(__file__).resolve().parent.parent
DETECTION_BOUND = 3.0  # seconds from kill to "down", with 1 s heartbeats
OBSERVE_FOR = 30.0


def start_beacon(
    url: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "natskit", "--log-level", "WARNING", "run"),
            *("tests.apps.beacons:app", "--server", url, *extra),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def start_watch(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "natskit", "services", "watch"),
            *("--server", url, "--refresh", "0.3"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for proc in running:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_killed_and_frozen_instances_are_down_within_3s_and_no_live_one_ever(
    nats_server: EmbeddedServer, procs: list[subprocess.Popen[bytes]]
) -> None:
    url = nats_server.url
    registry = Registry(servers=[url], ping_interval=None)
    await registry.start()
    events = registry.events()
    try:
        procs.extend(start_beacon(url) for _ in range(5))
        await wait_until(
            lambda: len(registry.instances("beacons", ready_only=True)) == 5, timeout=60
        )
        pid_of: dict[str, int] = {}
        for instance in registry.instances("beacons"):
            who = await registry.call(instance, "whoami", b"", response_type=Who)
            pid_of[who.id] = who.pid
        id_of = {pid: iid for iid, pid in pid_of.items()}
        killed1, killed2, frozen, healthy1, healthy2 = procs
        observed_since = time.monotonic()
        log: list[RegistryEvent] = []

        async def until(kind: EventKind, iid: str, timeout: float) -> RegistryEvent:
            end = time.monotonic() + timeout
            while True:
                event = await events.next(timeout=max(0.0, end - time.monotonic()))
                log.append(event)
                if event.kind is kind and event.instance.id == iid:
                    return event

        # Kill two and freeze one, one after the other; each is down within 3 s.
        signalled: dict[str, float] = {}
        for proc, sig in ((killed1, signal.SIGKILL), (killed2, signal.SIGKILL)):
            signalled[id_of[proc.pid]] = time.monotonic()
            os.kill(proc.pid, sig)
        signalled[id_of[frozen.pid]] = time.monotonic()
        os.kill(frozen.pid, signal.SIGSTOP)
        down_at: dict[str, float] = {}
        while not set(signalled) <= set(down_at):
            event = await events.next(timeout=10)
            log.append(event)
            if event.kind is EventKind.DOWN:
                down_at[event.instance.id] = event.at
        for iid, at in signalled.items():
            assert down_at[iid] - at <= DETECTION_BOUND, (
                f"{iid} marked down {down_at[iid] - at:.2f}s after its kill"
            )

        # Keep watching: the two live instances are never marked down.
        left = OBSERVE_FOR - (time.monotonic() - observed_since)
        with pytest.raises(TimeoutError):
            await until(EventKind.DOWN, "nobody", timeout=left)
        assert {i.id for i in registry.instances("beacons")} == {
            id_of[healthy1.pid],
            id_of[healthy2.pid],
        }
        assert len(registry.instances("beacons", live_only=False)) == 5

        # The frozen one thaws: back on its first (overdue) heartbeat.
        thawed_at = time.monotonic()
        os.kill(frozen.pid, signal.SIGCONT)
        up = await until(EventKind.UP, id_of[frozen.pid], timeout=5)
        assert up.at - thawed_at <= 1.0 + 0.5, f"back after {up.at - thawed_at:.2f}s"

        # A killed one restarts: it is up on the first heartbeat the registry gets.
        procs.append(start_beacon(url))
        known = set(pid_of)
        while True:
            event = await events.next(timeout=60)
            log.append(event)
            if event.kind is EventKind.UP and event.instance.id not in known:
                break
        assert event.instance.seq == 1 and event.instance.status == "starting"

        downs = [e.instance.id for e in log if e.kind is EventKind.DOWN]
        assert sorted(downs) == sorted(signalled), "only the killed/frozen went down"
        print(
            f"\nobserved {time.monotonic() - observed_since:.1f}s; detection: "
            + ", ".join(
                f"{e.at - signalled[e.instance.id]:.2f}s"
                for e in log
                if e.kind is EventKind.DOWN
            )
        )
    finally:
        events.close()
        await registry.stop()


def probe(port: int, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


async def test_natskit_run_serves_probes_and_services_watch_shows_it(
    nats_server: EmbeddedServer,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    port = free_port()
    ready_file = tmp_path / "ready"
    beacon = start_beacon(
        nats_server.url,
        "--health-port",
        str(port),
        env={"BEACON_READY_FILE": str(ready_file)},
    )
    procs.append(beacon)

    async def answer(path: str) -> int:
        return (await asyncio.to_thread(probe, port, path))[0]

    async def poll_until(path: str, code: int) -> None:
        end = time.monotonic() + 30
        while (got := await answer(path)) != code:
            assert time.monotonic() < end, f"{path} answered {got}, not {code}"
            await asyncio.sleep(0.05)

    await poll_until("/livez", 200)
    await poll_until("/readyz", 503)  # its readiness file is missing
    ready_file.touch()
    await poll_until("/readyz", 200)
    status, body = await asyncio.to_thread(probe, port, "/healthz")
    assert status == 200 and body["name"] == "beacons" and body["status"] == "ready"

    watch = start_watch(nats_server.url)
    procs.append(watch)  # type: ignore[arg-type]  # killed by pid like the others
    assert watch.stdout is not None
    seen = ""
    while body["id"] not in seen:
        line = await asyncio.to_thread(watch.stdout.readline)
        assert line, "services watch ended early"
        seen += line
    os.kill(watch.pid, signal.SIGINT)
    assert await asyncio.to_thread(watch.wait, 10) == 0
    assert "beacons" in seen and "3.1.4" in seen and "ready" in seen

    os.kill(beacon.pid, signal.SIGTERM)
    assert await asyncio.to_thread(beacon.wait, 30) == 0
    assert await answer("/livez") == 0  # the port is closed with the process
