"""``python -m benchmarks``: run the scenarios, print the table, save the raw runs.

Every figure is a ratio of natskit to plain nats-py measured in the same run: the two
sides alternate (the side that goes first swaps every round), and each side's figure is
the median of its clean runs. Runs that dropped or lost messages are flagged and left
out of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.harness import IMPLEMENTATIONS
from benchmarks.runner import RunResult, run_once
from benchmarks.scenarios import discover
from natskit.server import EmbeddedServer, ServerOptions, find_server_binary

RESULTS_DIR = Path(__file__).parent / "results"
NATSKIT, NATS_PY = IMPLEMENTATIONS


def main(argv: list[str] | None = None) -> int:
    scenarios = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="natskit vs plain nats-py, side by side, on an embedded nats-server",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(scenarios),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per side (default 5)")
    parser.add_argument("--quick", action="store_true", help="fewer messages per run")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    chosen = [scenarios[name] for name in args.scenario or scenarios]

    environment = _environment()
    _print_header(environment, args)
    started = time.time()
    with _Servers() as servers:
        results = [
            result
            for module in chosen
            for result in _run_scenario(module, servers, args.runs, args.quick)
        ]
    rows = _summarize(chosen, results)
    print()
    _print_table(rows)
    _print_driver_figures(results)
    path = _save(environment, args, rows, results, time.time() - started)
    print(f"\nraw runs: {path}")
    return 0


class _Servers:
    """The embedded servers of a session, one per JetStream sync setting.

    Each is started when a variant first asks for it and stopped when the session
    ends; a session of core NATS scenarios starts only the default one.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._urls: dict[bool, str] = {}

    def url(self, *, sync_always: bool) -> str:
        if sync_always not in self._urls:
            server = EmbeddedServer(ServerOptions(sync_always=sync_always))
            self._urls[sync_always] = self._stack.enter_context(server).url
        return self._urls[sync_always]

    def __enter__(self) -> _Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()


def _sync_label(sync_always: bool) -> str:
    return "always" if sync_always else "server default"


def _run_scenario(
    module: ModuleType, servers: _Servers, runs: int, quick: bool
) -> list[RunResult]:
    base = module.QUICK_COUNT if quick else module.COUNT
    results = []
    for variant in module.VARIANTS:
        count = variant.count(base)
        url = servers.url(sync_always=variant.sync_always)
        print(
            f"{module.NAME} / {variant.label}: {count:,} messages per run, "
            f"JetStream sync_interval {_sync_label(variant.sync_always)}",
            flush=True,
        )
        for round_no in range(runs):
            # Swap who goes first each round, so drift in machine load hits both sides.
            order = IMPLEMENTATIONS if round_no % 2 == 0 else IMPLEMENTATIONS[::-1]
            for impl in order:
                result = run_once(
                    module, variant, impl=impl, url=url, count=count, round_no=round_no
                )
                results.append(result)
                print(f"  {_describe_run(result)}", flush=True)
    return results


def _describe_run(result: RunResult) -> str:
    rate = f"{result.rate:>10,.0f} msgs/s" if result.rate else "         - msgs/s"
    text = f"round {result.round_no + 1} {result.impl:<8} {rate}"
    if result.problems:
        text += "  FLAGGED: " + "; ".join(result.problems)
    return text


def _summarize(
    modules: list[ModuleType], results: list[RunResult]
) -> list[dict[str, Any]]:
    """One row per scenario variant: the median rate of each side and their ratio."""
    rows = []
    for module in modules:
        for variant in module.VARIANTS:
            row: dict[str, Any] = {
                "scenario": module.NAME,
                "variant": variant.label,
                "jetstream_sync": _sync_label(variant.sync_always),
            }
            for impl in IMPLEMENTATIONS:
                mine = [
                    r
                    for r in results
                    if r.scenario == module.NAME
                    and r.variant == variant.label
                    and r.impl == impl
                ]
                rates = [r.rate for r in mine if r.clean and r.rate is not None]
                row[impl] = {
                    "median": statistics.median(rates) if rates else None,
                    "min": min(rates, default=None),
                    "max": max(rates, default=None),
                    "clean_runs": len(rates),
                    "runs": len(mine),
                }
            ours, theirs = row[NATSKIT]["median"], row[NATS_PY]["median"]
            row["ratio"] = ours / theirs if ours and theirs else None
            rows.append(row)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'scenario':<9} {'variant':<13} {'natskit msgs/s':>15} "
        f"{'nats-py msgs/s':>15} {'ratio':>6}  {'clean runs':>10}  spread"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ours, theirs = row[NATSKIT], row[NATS_PY]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        clean = f"{ours['clean_runs']}/{ours['runs']}, {theirs['clean_runs']}/{theirs['runs']}"
        print(
            f"{row['scenario']:<9} {row['variant']:<13} {_rate(ours['median']):>15} "
            f"{_rate(theirs['median']):>15} {ratio:>6}  {clean:>10}  "
            f"{_spread(ours)} / {_spread(theirs)}"
        )
    _print_scaling(rows)


def _print_driver_figures(results: list[RunResult]) -> None:
    """Figures a scenario's driver measured itself (keys ending in ``_us``): medians."""
    figures: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for result in results:
        if not result.clean or not result.driver:
            continue
        for key, value in result.driver.items():
            if key.endswith("_us") and isinstance(value, int | float):
                per_impl = figures.setdefault(
                    (result.scenario, result.variant, key), {}
                )
                per_impl.setdefault(result.impl, []).append(float(value))
    for (scenario, variant, key), per_impl in figures.items():
        ours = statistics.median(per_impl.get(NATSKIT) or [0.0])
        theirs = statistics.median(per_impl.get(NATS_PY) or [0.0])
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        print(
            f"{scenario} {variant}: {key[:-3].replace('_', ' ')} natskit {ours:,.0f} us, "
            f"nats-py {theirs:,.0f} us, ratio {ratio}"
        )


def _print_scaling(rows: list[dict[str, Any]]) -> None:
    """For scenarios with several variants: each variant against the first one."""
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        mine = [row for row in rows if row["scenario"] == scenario]
        base = mine[0]
        for row in mine[1:]:
            parts = []
            for impl in IMPLEMENTATIONS:
                now, then = row[impl]["median"], base[impl]["median"]
                parts.append(
                    f"{impl} {now / then:.2f}x" if now and then else f"{impl} -"
                )
            print(
                f"{scenario}: {row['variant']} vs {base['variant']}: {', '.join(parts)}"
            )


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value else "-"


def _spread(side: dict[str, Any]) -> str:
    """(max - min) / median of the clean runs, in percent."""
    if not side["median"]:
        return "-"
    return f"{100 * (side['max'] - side['min']) / side['median']:.0f}%"


def _environment() -> dict[str, Any]:
    binary = find_server_binary()
    server_version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nats_server": server_version,
        "jetstream_sync": "per variant",
        "python": platform.python_version(),
        "nats_py": version("nats-py"),
        "msgspec": version("msgspec"),
        "natskit": version("natskit"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def _print_header(environment: dict[str, Any], args: argparse.Namespace) -> None:
    command = [os.path.relpath(sys.executable), "-m", "benchmarks", *sys.argv[1:]]
    print(f"command: {shlex.join(command)}")
    print(
        f"{environment['nats_server']} on 127.0.0.1; JetStream sync_interval per "
        "variant: always (natskit's embedded default) unless it says server default "
        "(core NATS scenarios do not touch disk)"
    )
    print(
        f"python {environment['python']}, nats-py {environment['nats_py']}, "
        f"msgspec {environment['msgspec']}, natskit {environment['natskit']}, "
        f"{environment['cpus']} cpus"
    )
    print(
        f"{args.runs} runs per side, alternating; rate = messages from the first to the "
        "last received, across receivers (where the publisher is under test: the "
        "messages it got acks for, by its clock); medians of clean runs\n"
    )


def _save(
    environment: dict[str, Any],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    results: list[RunResult],
    elapsed: float,
) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{stamp}.json"
    document = {
        "timestamp": stamp,
        "argv": sys.argv[1:],
        "runs_per_side": args.runs,
        "quick": args.quick,
        "elapsed_seconds": elapsed,
        "environment": environment,
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
