"""Request-reply under failure: responder processes killed and frozen mid-run."""

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

import pytest

from natskit import App, CircuitOpen, NoResponders
from natskit.resilience import BreakerPolicy, RetryPolicy
from natskit.rpc import CallPolicy
from natskit.server import EmbeddedServer
from natskit.testing import wait_until

from .apps.responders import Reserve, Reserved

ROOT = Path(__file__).resolve().parent.parent


def start_responder(url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "natskit", "--log-level", "WARNING", "run"),
            *("tests.apps.responders:app", "--server", url),
        ],
        cwd=ROOT,
        env=env,
    )


def members(server: EmbeddedServer, subject: str) -> int:
    assert server.monitor_url is not None
    with urllib.request.urlopen(f"{server.monitor_url}/connz?subs=1") as reply:
        connz = json.load(reply)
    return sum(
        subject in (c.get("subscriptions_list") or []) for c in connz["connections"]
    )


@pytest.fixture
def responders(nats_server: EmbeddedServer) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_responder(nats_server.url) for _ in range(3)]
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


async def test_calls_survive_a_killed_and_a_frozen_responder(
    nats_server: EmbeddedServer,
    nats_url: str,
    responders: list[subprocess.Popen[bytes]],
) -> None:
    await wait_until(lambda: members(nats_server, "inventory.reserve") == 3, timeout=30)
    policy = CallPolicy(
        timeout=0.5,
        idempotent=True,
        retry=RetryPolicy(max_retries=3),
        hedge_after=0.1,
        max_hedges=3,
    )
    client = App("orders", call_policy=policy)
    total, workers = 2000, 8
    succeeded = failed = 0
    served_by: dict[int, int] = {}
    issued = 0
    killed, frozen = responders[0], responders[1]
    events: list[str] = []
    loop = asyncio.get_running_loop()

    def thaw() -> None:
        os.kill(frozen.pid, signal.SIGCONT)
        events.append(f"thawed at call {succeeded + failed}")

    async def worker() -> None:
        nonlocal issued, succeeded, failed
        while issued < total:
            n = issued
            issued += 1
            if n == 400:
                os.kill(killed.pid, signal.SIGKILL)
                events.append("killed")
            if n == 800:
                os.kill(frozen.pid, signal.SIGSTOP)
                events.append("frozen")
                loop.call_later(3.0, thaw)
            try:
                reply = await client.request(
                    "inventory.reserve",
                    Reserve(sku=f"s{n}", qty=1),
                    response_type=Reserved,
                )
            except Exception:
                failed += 1
                continue
            assert reply.sku == f"s{n}"
            served_by[reply.pid] = served_by.get(reply.pid, 0) + 1
            succeeded += 1

    async with client:
        await asyncio.gather(*(worker() for _ in range(workers)))
        stats = client.caller.stats
    print(
        f"\n{succeeded}/{total} calls succeeded, {failed} failed; "
        f"{stats.retries} retries, {stats.hedges} hedged attempts, "
        f"{stats.rejected_by_breaker} rejected by the breaker; served by {served_by}; "
        f"{events}"
    )
    assert events[:2] == ["killed", "frozen"]
    assert len(events) == 3, (
        "the frozen responder must thaw while calls are still running"
    )
    assert succeeded + failed == total
    assert succeeded >= 0.999 * total
    assert frozen.pid in served_by and responders[2].pid in served_by


async def test_breaker_fails_fast_probes_once_per_interval_and_closes_after_recovery(
    nats_server: EmbeddedServer,
    nats_url: str,
    responders: list[subprocess.Popen[bytes]],
) -> None:
    await wait_until(lambda: members(nats_server, "inventory.reserve") == 3, timeout=30)
    breaker = BreakerPolicy(consecutive_failures=5, open_for=0.5)
    client = App("orders", call_policy=CallPolicy(timeout=0.5, breaker=breaker))
    call = Reserve(sku="a", qty=1)
    async with client:
        await client.request("inventory.reserve", call, response_type=Reserved)
        for proc in responders:
            proc.kill()
            proc.wait()
        await wait_until(lambda: members(nats_server, "inventory.reserve") == 0)

        # Until the threshold, each call reaches the server and fails at once.
        for _ in range(5):
            with pytest.raises(NoResponders):
                await client.request("inventory.reserve", call)
        # Then calls fail fast, without being sent; one probe per open interval.
        stats = client.caller.stats
        sent_before = stats.attempts
        open_since = loop_time = asyncio.get_running_loop().time()
        rejected = 0
        while loop_time - open_since < 2.0:
            try:
                await client.request("inventory.reserve", call)
            except CircuitOpen:
                rejected += 1
            except NoResponders:
                pass  # a half-open probe, sent and failed
            await asyncio.sleep(0.005)
            loop_time = asyncio.get_running_loop().time()
        probes = stats.attempts - sent_before
        assert rejected > 50
        assert 1 <= probes <= 4, f"{probes} probes in 2 s with a 0.5 s open interval"

        # Responders return: the breaker closes within 2 s.
        restarted = [start_responder(nats_server.url) for _ in range(2)]
        responders.extend(restarted)
        await wait_until(
            lambda: members(nats_server, "inventory.reserve") == 2, timeout=30
        )
        back_at = asyncio.get_running_loop().time()
        while True:
            try:
                await client.request("inventory.reserve", call, response_type=Reserved)
                break
            except (CircuitOpen, NoResponders):
                await asyncio.sleep(0.01)
        closed_after = asyncio.get_running_loop().time() - back_at
        print(
            f"\nbreaker: {rejected} calls failed fast, {probes} probes, "
            f"closed {closed_after:.2f}s after recovery"
        )
        assert closed_after <= 2.0
        assert client.caller.breakers["inventory.reserve"].state.value == "closed"
