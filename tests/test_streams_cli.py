"""``natskit streams``, ``natskit dlq`` and ``natskit replay``, run in their own process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec

from natskit import App, Reject, StreamSpec
from natskit.testing import wait_until
from tests.test_streams import dead_letters_when

ROOT = Path(__file__).resolve().parent.parent


class Order(msgspec.Struct):
    n: int


def natskit(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "natskit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


async def cli(*args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(natskit, *args)


async def test_streams_dlq_and_replay_commands(nats_url: str) -> None:
    app = App("cli-streams")
    app.stream(StreamSpec(name="ORDERS", subjects=("order.>",)))
    handled: list[int] = []
    rejected: list[int] = []

    @app.consume(stream="ORDERS", durable="ship")
    async def ship(order: Order) -> None:
        if order.n == 2 and not rejected:
            rejected.append(order.n)
            raise Reject("no such customer")
        handled.append(order.n)

    async with app:
        for n in range(1, 6):
            await app.js_publish(f"order.{'eu' if n % 2 else 'us'}", Order(n=n))
        await wait_until(lambda: len(handled) == 4)
        (letter,) = await dead_letters_when(app.nc, 1)

        code, out, err = await cli("streams", "--server", nats_url)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == [
            "NAME",
            "SUBJECTS",
            "MESSAGES",
            "BYTES",
            "CONSUMERS",
        ]
        assert any(line.split()[:3] == ["ORDERS", "order.>", "5"] for line in lines)
        assert any(line.split()[:3] == ["DLQ", "dlq.>", "1"] for line in lines)

        code, out, err = await cli("streams", "info", "ORDERS", "--server", nats_url)
        assert code == 0, err
        assert "PENDING" in out and "ACK PENDING" in out and "REDELIVERED" in out
        assert any(line.split()[:3] == ["ship", "0", "0"] for line in out.splitlines())

        code, out, err = await cli("dlq", "list", "--server", nats_url)
        assert code == 0, err
        assert "ORDERS/ship" in out and "Reject" in out and "no such customer" in out
        assert '{"n":2}' not in out, "listings never print payloads"

        code, out, err = await cli(
            "dlq", "show", str(letter.sequence), "--server", nats_url
        )
        assert code == 0, err
        assert "subject:     order.us" in out and '{"n":2}' in out

        code, out, err = await cli(
            "replay",
            "ORDERS",
            "--from-seq",
            "2",
            "--subject",
            "order.eu",
            "-s",
            nats_url,
        )
        assert code == 0, err
        shown = [line for line in out.splitlines() if line.startswith("[")]
        assert [line.split()[0] for line in shown] == ["[3]", "[5]"]
        assert "2 message(s)" in out

        code, out, err = await cli(
            "dlq", "redrive", str(letter.sequence), "--server", nats_url
        )
        assert code == 0, err
        assert "redrove 1 dead letter(s)" in out
        await wait_until(lambda: sorted(handled) == [1, 2, 3, 4, 5])

        code, out, _ = await cli("dlq", "list", "--server", nats_url)
        assert "no dead letters" in out
        code, out, _ = await cli("dlq", "purge", "--server", nats_url)
        assert code == 0 and "purged 0 dead letter(s)" in out


async def test_cli_reports_unknown_stream_and_bad_arguments(nats_url: str) -> None:
    code, _, err = await cli("streams", "info", "NOPE", "--server", nats_url)
    assert code == 1
    assert "stream 'NOPE' does not exist" in err and "Traceback" not in err
    code, _, err = await cli("dlq", "redrive", "--server", nats_url)
    assert code == 2 and "a sequence or --all" in err
    code, _, err = await cli("replay", "X", "--since", "yesterday", "-s", nats_url)
    assert code == 1 and "not an ISO 8601 time" in err
