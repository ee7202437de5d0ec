"""Test support: pytest fixtures (``natskit.testing.plugin``) and small helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from natskit.server import free_port

__all__ = ["free_port", "wait_until"]


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, *, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` holds; raise ``AssertionError`` after ``timeout``.

    For tests: a condition that never comes true fails loudly instead of passing after
    a sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
