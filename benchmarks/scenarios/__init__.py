"""The scenario registry: every module in this package is one scenario.

A scenario module defines ``NAME``, ``DESCRIPTION``, ``COUNT`` (messages per run),
``QUICK_COUNT`` (for ``--quick``), ``VARIANTS`` (a tuple of :class:`Variant`) and a
``main()`` that runs one of its processes (see :mod:`benchmarks.harness`), so that
``python -m benchmarks.scenarios.<module> --role receiver|driver --impl natskit|nats-py
--url URL --count N [variant flags]`` works on its own.

Optionally, ``RATE_FROM = "driver"`` takes the rate from the driver's report instead
of the receivers' tallies (a publisher under test, say), and an ``async def
setup(args)`` (passed to ``run_process``) runs in a process of its own before each
run's receivers start (``--role setup``): to recreate a stream, or fill it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

__all__ = ["Variant", "discover"]


@dataclass(frozen=True)
class Variant:
    """One configuration of a scenario: how many receiver processes, which flags.

    ``sync_always`` chooses the server: one that fsyncs each stored message before
    acknowledging it (natskit's embedded default), or, if false, one left at the
    server's default sync interval. Only JetStream scenarios notice the difference.
    ``scale`` is the share of the scenario's message count this variant sends per run,
    to keep a much slower configuration within a sensible time.
    """

    label: str
    receivers: int = 1
    args: tuple[str, ...] = ()
    sync_always: bool = True
    scale: float = 1.0

    def count(self, base: int) -> int:
        """Messages per run of this variant, for a scenario count of ``base``."""
        return max(1, round(base * self.scale))


def discover() -> dict[str, ModuleType]:
    """Every scenario module of this package, by its ``NAME``, in file-name order."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for attr in ("NAME", "DESCRIPTION", "COUNT", "QUICK_COUNT", "VARIANTS", "main"):
            if not hasattr(module, attr):
                raise TypeError(f"scenario module {module.__name__} lacks {attr}")
        found[module.NAME] = module
    return found
