"""One run of one scenario variant for one implementation, each side in its own processes.

A run first runs the scenario's setup process, if it has one, to completion. It then
starts the variant's receiver processes and waits until each prints ``ready``, then
runs the driver process to completion, then counts down: it reads the receivers'
progress lines until together they have received (or dropped) every message, or until
nothing has changed for :data:`STALL_TIMEOUT` seconds. It then closes the receivers'
stdin, collects their final reports and combines them: the rate is the messages
received across all receivers, from the first message any of them got to the last.
For a scenario with ``RATE_FROM = "driver"`` the count down is skipped and the rate,
count and failures are the driver's own.

A run that dropped or lost messages, stalled or had a process fail carries a list of
``problems``; the caller flags it and leaves it out of the medians.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import IO, Any

from benchmarks.scenarios import Variant

__all__ = ["RunResult", "run_once"]

READY_TIMEOUT = 30.0
DRIVER_TIMEOUT = 120.0
STALL_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0

_Line = tuple[int, str | None]  # (receiver index, line); None marks end of output


@dataclass
class RunResult:
    """The combined outcome of one run, with every process's own report."""

    scenario: str
    variant: str
    impl: str
    round_no: int
    expected: int
    received: int = 0
    dropped: int = 0
    lost: int = 0
    rate: float | None = None
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    receivers: list[dict[str, Any]] = field(default_factory=list)
    driver: dict[str, Any] | None = None
    setup: dict[str, Any] | None = None

    @property
    def clean(self) -> bool:
        return not self.problems and self.rate is not None


class _Receiver:
    """A receiver process whose stdout lines a thread forwards to a shared queue."""

    def __init__(self, index: int, argv: list[str], lines: queue.Queue[_Line]) -> None:
        self.index = index
        # Closed by run_once(); a file rather than a pipe, so a chatty child never blocks.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.report: dict[str, Any] = {}
        self.ended = False
        self._thread = threading.Thread(
            target=self._forward, args=(lines,), daemon=True
        )
        self._thread.start()

    def _forward(self, lines: queue.Queue[_Line]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.put((self.index, line.strip()))
        lines.put((self.index, None))

    def stop(self) -> None:
        """Ask for the final report by closing stdin."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    def reap(self) -> int | None:
        try:
            return self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # this run's own child, by its handle
            self.proc.wait()
            return None
        finally:
            self._thread.join(timeout=EXIT_TIMEOUT)

    def stderr_tail(self, limit: int = 800) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:].strip()


def run_once(
    module: ModuleType,
    variant: Variant,
    *,
    impl: str,
    url: str,
    count: int,
    round_no: int,
) -> RunResult:
    """Run ``variant`` of the scenario ``module`` once for ``impl``."""
    result = RunResult(module.NAME, variant.label, impl, round_no, expected=count)
    base = [sys.executable, "-m", module.__name__, "--impl", impl, "--url", url]
    base += ["--count", str(count), *variant.args]
    by_driver = getattr(module, "RATE_FROM", "receivers") == "driver"
    if hasattr(module, "setup"):
        try:
            result.setup = _run_step([*base, "--role", "setup"], "setup")
        except _RunFailed as exc:
            result.problems.append(str(exc))
            return result
    lines: queue.Queue[_Line] = queue.Queue()
    receivers = [
        _Receiver(i, [*base, "--role", "receiver"], lines)
        for i in range(variant.receivers)
    ]
    try:
        _wait_ready(receivers, lines)
        result.driver = _run_step([*base, "--role", "driver"], "driver")
        if not by_driver:
            _count_down(receivers, lines, count, result)
        _finish(receivers, lines, result)
    except _RunFailed as exc:
        result.problems.append(str(exc))
    finally:
        for receiver in receivers:
            receiver.stop()
            if receiver.reap() is None:
                result.problems.append(f"receiver {receiver.index} killed")
    if by_driver:
        _take_driver_figures(result)
    else:
        _combine(receivers, result)
    for receiver in receivers:
        receiver.stderr.close()
    return result


class _RunFailed(Exception):
    pass


def _wait_ready(receivers: list[_Receiver], lines: queue.Queue[_Line]) -> None:
    waiting = {r.index for r in receivers}
    while waiting:
        index, line = _next_line(lines, READY_TIMEOUT, "receivers to be ready")
        if line is None:
            tail = receivers[index].stderr_tail()
            raise _RunFailed(f"receiver {index} exited before ready: {tail}")
        if line == "ready":
            waiting.discard(index)


def _run_step(argv: list[str], role: str) -> dict[str, Any]:
    """Run a driver or setup process to completion; its last line is its report."""
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=DRIVER_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise _RunFailed(
            f"{role} did not finish within {DRIVER_TIMEOUT:.0f}s"
        ) from None
    if done.returncode != 0:
        raise _RunFailed(f"{role} exited {done.returncode}: {done.stderr[-800:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _count_down(
    receivers: list[_Receiver],
    lines: queue.Queue[_Line],
    count: int,
    result: RunResult,
) -> None:
    """Read progress until every message is accounted for, or progress stops."""
    while True:
        try:
            index, line = lines.get(timeout=STALL_TIMEOUT)
        except queue.Empty:
            result.problems.append(f"stalled: no progress for {STALL_TIMEOUT:.0f}s")
            return
        receiver = receivers[index]
        if line is None:
            receiver.ended = True
            raise _RunFailed(
                f"receiver {index} exited during the run: {receiver.stderr_tail()}"
            )
        receiver.report = json.loads(line)
        seen = sum(
            r.report.get("count", 0) + r.report.get("dropped", 0) for r in receivers
        )
        if seen >= count:
            return


def _finish(
    receivers: list[_Receiver], lines: queue.Queue[_Line], result: RunResult
) -> None:
    """Close every receiver's stdin and read up to the end of its output."""
    for receiver in receivers:
        receiver.stop()
    while not all(r.ended for r in receivers):
        index, line = _next_line(lines, EXIT_TIMEOUT, "receivers to exit")
        receiver = receivers[index]
        if line is None:
            receiver.ended = True
        else:
            receiver.report = json.loads(line)
    for receiver in receivers:
        if not receiver.report.get("final"):
            result.problems.append(f"receiver {receiver.index} sent no final report")


def _next_line(lines: queue.Queue[_Line], timeout: float, what: str) -> _Line:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise _RunFailed(f"timed out after {timeout:.0f}s waiting for {what}") from None


def _combine(receivers: list[_Receiver], result: RunResult) -> None:
    reports = [r.report for r in receivers]
    result.receivers = reports
    result.received = sum(r.get("count", 0) for r in reports)
    result.dropped = sum(r.get("dropped", 0) for r in reports)
    result.lost = result.expected - result.received - result.dropped
    for receiver in receivers:
        if receiver.proc.returncode not in (0, None):
            code = receiver.proc.returncode
            result.problems.append(f"receiver {receiver.index} exited {code}")
    if result.dropped:
        result.problems.append(f"{result.dropped} dropped as slow consumer")
    if result.lost:
        result.problems.append(f"{result.lost} lost")
    active = [r for r in reports if r.get("count")]
    if result.received > 1:
        first = min(r["first"] for r in active)
        last = max(r["last"] for r in active)
        if last > first:
            result.seconds = last - first
            result.rate = (result.received - 1) / result.seconds


def _take_driver_figures(result: RunResult) -> None:
    """For ``RATE_FROM = "driver"``: the count, failures and rate the driver measured."""
    report = result.driver
    if report is None:
        return
    result.received = int(report.get("count", 0))
    failed = int(report.get("failed", 0))
    result.lost = result.expected - result.received - failed
    if failed:
        result.problems.append(f"{failed} failed")
    if result.lost:
        result.problems.append(f"{result.lost} lost")
    if result.received and report.get("seconds"):
        result.seconds = float(report["seconds"])
        result.rate = float(report["rate"])
