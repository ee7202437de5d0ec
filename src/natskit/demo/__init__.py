"""A small demo of publish-subscribe fan-out and a queue group, on a real server.

Three apps share one server: ``notifier`` with two handlers on ``events.user.*`` (both
see every event), and two ``resizer`` instances in the queue group ``workers`` (each task
goes to one of them). The summary is counted from the handlers, not assumed.
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec

from natskit.app import App
from natskit.message import Message

__all__ = ["run_demo"]


class UserEvent(msgspec.Struct):
    user_id: int
    kind: str
    email: str


class ResizeTask(msgspec.Struct):
    image_id: int
    width: int


def build_apps(counts: dict[str, int]) -> list[App]:
    notifier = App("notifier", version="1.0.0", description="fan-out demo")

    @notifier.subscribe("events.user.*")
    async def audit(event: UserEvent, msg: Message[UserEvent]) -> None:
        counts[f"audit:{msg.subject}"] = counts.get(f"audit:{msg.subject}", 0) + 1

    @notifier.subscribe("events.user.*")
    async def welcome(event: UserEvent) -> None:
        counts["welcome"] = counts.get("welcome", 0) + 1

    apps = [notifier]
    for index in (1, 2):
        worker = App("resizer", version="1.0.0", description="queue group demo")

        @worker.subscribe("tasks.resize", queue="workers")
        async def resize(task: ResizeTask, _index: int = index) -> None:
            counts[f"worker-{_index}"] = counts.get(f"worker-{_index}", 0) + 1

        apps.append(worker)
    return apps


async def run_demo(servers: list[str], *, events: int = 2000) -> int:
    """Publish ``events`` user events and as many tasks; print who got what."""
    counts: dict[str, int] = {}
    apps = build_apps(counts)
    publisher = App("demo-publisher", version="1.0.0")
    for app in [*apps, publisher]:
        await app.start(servers)
    started = time.perf_counter()
    try:
        for i in range(events):
            kind = "signup" if i % 2 == 0 else "login"
            event = UserEvent(user_id=i, kind=kind, email=f"user{i}@example.com")
            await publisher.publish(f"events.user.{kind}", event)
            await publisher.publish("tasks.resize", ResizeTask(image_id=i, width=640))
        await publisher.flush()
        expected = {"welcome": events, "tasks": events}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tasks = counts.get("worker-1", 0) + counts.get("worker-2", 0)
            if counts.get("welcome", 0) >= events and tasks >= events:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        for app in [publisher, *apps]:
            await app.stop()
    return _summary(counts, events, expected, elapsed)


def _summary(
    counts: dict[str, int], events: int, expected: dict[str, int], secs: float
) -> int:
    tasks = counts.get("worker-1", 0) + counts.get("worker-2", 0)
    audit = sum(v for k, v in counts.items() if k.startswith("audit:"))
    lines = [
        "",
        f"natskit demo: {events} user events and {events} tasks in {secs:.2f}s",
        "  fan-out (events.user.*, two handlers, each sees every event):",
        f"    audit   {audit:>7}   "
        f"(signup {counts.get('audit:events.user.signup', 0)}, "
        f"login {counts.get('audit:events.user.login', 0)})",
        f"    welcome {counts.get('welcome', 0):>7}",
        "  queue group 'workers' (each task to one of two instances):",
        f"    worker-1 {counts.get('worker-1', 0):>6}",
        f"    worker-2 {counts.get('worker-2', 0):>6}",
        f"    total    {tasks:>6}   (published {expected['tasks']})",
    ]
    ok = audit == events and counts.get("welcome", 0) == events and tasks == events
    lines.append("  all counts reconcile" if ok else "  COUNTS DO NOT RECONCILE")
    print("\n".join(lines), file=sys.stdout, flush=True)
    return 0 if ok else 1
