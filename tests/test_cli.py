"""The ``natskit`` command, run as a user runs it: in its own process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from natskit.server import EmbeddedServer
from natskit.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


def natskit(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NATS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "natskit", *args],
        cwd=kwargs.pop("cwd", ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.apps.nonexistent:app", "cannot import module 'tests.apps.nonexistent'"),
        ("tests.apps.workers:missing", "has no attribute 'missing'"),
        ("tests.apps.workers:not_an_app", "is a int, not a natskit.App"),
        ("no_colon", "must look like 'module:attribute'"),
    ],
)
def test_run_bad_target_says_what_is_wrong(target: str, message: str) -> None:
    code, _, err = finish(natskit("run", target, "--server", "nats://127.0.0.1:1"))
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_run_refused_server_fails_with_a_message_not_a_traceback() -> None:
    proc = natskit("run", "tests.apps.workers:app", "--server", "nats://127.0.0.1:1")
    code, _, err = finish(proc)
    assert code == 1
    assert "could not connect to nats://127.0.0.1:1" in err
    assert "Traceback" not in err


async def _collect_done(
    nc: nats.aio.client.Client, seen: list[tuple[int, int]]
) -> None:
    async def on_done(msg: nats.aio.msg.Msg) -> None:
        done = msgspec.json.decode(msg.data)
        seen.append((done["n"], done["pid"]))

    await nc.subscribe("jobs.done", cb=on_done)
    await nc.flush()


async def _wait_for_members(server: EmbeddedServer, count: int) -> None:
    """Wait until ``count`` connections are subscribed to jobs.run (server's own view)."""

    def members() -> int:
        assert server.monitor_url is not None
        with urllib.request.urlopen(f"{server.monitor_url}/connz?subs=1") as reply:
            connz = json.load(reply)
        return sum(
            "jobs.run" in (c.get("subscriptions_list") or [])
            for c in connz["connections"]
        )

    await wait_until(lambda: members() >= count, timeout=20)


async def test_sigterm_drains_in_flight_work_before_exit(
    nats_server: EmbeddedServer, nats_url: str, running: list[subprocess.Popen[str]]
) -> None:
    proc = natskit("run", "tests.apps.workers:app", "--server", nats_url)
    running.append(proc)
    nc = await nats.connect(nats_url)
    seen: list[tuple[int, int]] = []
    await _collect_done(nc, seen)
    await _wait_for_members(nats_server, 1)
    for n in range(6):
        await nc.publish("jobs.run", msgspec.json.encode({"n": n, "sleep": 1.0}))
    await nc.flush()
    await asyncio.sleep(0.3)  # let the worker pick the jobs up before the signal
    proc.send_signal(signal.SIGTERM)
    code, _, err = await asyncio.to_thread(finish, proc)
    await nc.flush()
    await wait_until(lambda: len(seen) == 6, timeout=5)
    await nc.close()
    assert code == 0, err
    assert sorted(n for n, _ in seen) == list(range(6))
    assert "draining" in err


async def test_run_workers_starts_n_processes_sharing_the_queue_group(
    nats_server: EmbeddedServer, nats_url: str, running: list[subprocess.Popen[str]]
) -> None:
    proc = natskit(
        "run", "tests.apps.workers:make_app", "--server", nats_url, "--workers", "2"
    )
    running.append(proc)
    nc = await nats.connect(nats_url)
    seen: list[tuple[int, int]] = []
    await _collect_done(nc, seen)
    await _wait_for_members(nats_server, 2)
    for n in range(200):
        await nc.publish("jobs.run", msgspec.json.encode({"n": n}))
    await wait_until(lambda: len(seen) == 200, timeout=10)
    assert sorted(n for n, _ in seen) == list(range(200))
    pids = {pid for _, pid in seen}
    assert len(pids) == 2, f"expected work in two processes, saw {pids}"
    proc.send_signal(signal.SIGTERM)
    code, _, _ = await asyncio.to_thread(finish, proc)
    await nc.close()
    assert code == 0


def test_pub_sub_req_commands_against_a_running_app(
    nats_url: str, running: list[subprocess.Popen[str]]
) -> None:
    app = natskit("run", "tests.apps.workers:app", "--server", nats_url)
    running.append(app)
    listener = natskit("sub", "notes.>", "--count", "1", "--server", nats_url)
    running.append(listener)
    assert listener.stderr is not None
    for line in listener.stderr:
        if "listening on notes.>" in line:
            break
    for _ in range(100):
        code, out, err = finish(
            natskit("req", "jobs.echo", "hello", "--server", nats_url)
        )
        if code == 0:
            break
    assert code == 0, err
    assert out.strip().splitlines() == [
        "Content-Type: text/plain; charset=utf-8",
        "echo:hello",
    ]
    code, out, _ = finish(
        natskit("pub", "notes.a", '{"x": 1}', "-H", "K=V", "--server", nats_url)
    )
    assert code == 0
    assert "published 1 message" in out
    code, out, _ = finish(listener)
    assert code == 0
    assert "notes.a" in out and '{"x":1}' in out and "K: V" in out


def test_req_without_responders_says_so(nats_url: str) -> None:
    code, _, err = finish(natskit("req", "nobody.home", "x", "--server", nats_url))
    assert code == 1
    assert "no responders on nobody.home" in err


def test_run_without_server_starts_an_embedded_one(tmp_path: Path) -> None:
    proc = natskit("run", "tests.apps.workers:app", cwd=tmp_path)
    try:
        url_file = tmp_path / ".natskit" / "server.url"
        for _ in range(500):
            if url_file.exists():
                break
            proc.poll()
            assert proc.returncode is None, proc.stderr.read() if proc.stderr else ""
            import time

            time.sleep(0.02)
        url = url_file.read_text()
        code, out, err = finish(natskit("req", "jobs.echo", "hi", cwd=tmp_path))
        for _ in range(100):
            if code == 0:
                break
            code, out, err = finish(natskit("req", "jobs.echo", "hi", cwd=tmp_path))
        assert code == 0, err
        assert "echo:hi" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == 0
    assert f"embedded nats-server at {url}" in err
    assert not url_file.exists()


def test_server_command_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        code, _, err = finish(natskit("server", "--port", str(port), cwd=tmp_path))
    assert code == 1
    assert "in use" in err
    assert "Traceback" not in err


def test_run_logs_json_lines_when_asked(nats_url: str) -> None:
    proc = natskit(
        "run", "tests.apps.workers:app", "--server", nats_url, "--log-format", "json"
    )
    assert proc.stderr is not None
    seen = []
    for (
        line
    ) in proc.stderr:  # until the app says it started (signals handled from then)
        seen.append(line)
        if "started" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code, _, rest = finish(proc)
    entries = [json.loads(line) for line in [*seen, *rest.splitlines()] if line.strip()]
    assert code == 0
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(
        e["logger"] == "natskit.app" and "started" in e["message"] for e in entries
    )
