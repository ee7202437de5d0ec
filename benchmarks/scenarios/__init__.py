"""The scenario registry: every module in this package is one scenario.

A scenario module defines ``NAME``, ``DESCRIPTION``, ``COUNT`` (messages per run),
``QUICK_COUNT`` (for ``--quick``), ``VARIANTS`` (a tuple of :class:`Variant`) and a
``main()`` that runs one of its processes (see :mod:`benchmarks.harness`), so that
``python -m benchmarks.scenarios.<module> --role receiver|driver --impl natskit|nats-py
--url URL --count N [variant flags]`` works on its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

__all__ = ["Variant", "discover"]


@dataclass(frozen=True)
class Variant:
    """One configuration of a scenario: how many receiver processes, which flags."""

    label: str
    receivers: int = 1
    args: tuple[str, ...] = ()


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
