"""Retry schedules, circuit breakers and deadlines for request-reply calls.

Everything here is pure: no I/O, no event loop, no sleeping. Time comes from a
:class:`Clock` and randomness from a ``rand`` callable, so tests drive both with
:class:`FakeClock` and fixed numbers. The request-reply client owns the awaiting; this
module only answers "may I call?", "should I retry?" and "how long do I wait?".

Theory of operation of :class:`CircuitBreaker`
----------------------------------------------

A breaker guards one destination (a subject). It is in one of three states::

    CLOSED ──(N consecutive failures, or failure ratio over the window)──> OPEN
    OPEN ──(open_for seconds pass; noticed on the next read)──> HALF_OPEN
    HALF_OPEN ──(successes_to_close probe successes)──> CLOSED
    HALF_OPEN ──(any probe failure)──> OPEN   (open_for starts again)

The caller asks :meth:`~CircuitBreaker.allow` before each call and, for every call it
was allowed to make, reports exactly one of :meth:`~CircuitBreaker.record_success`,
:meth:`~CircuitBreaker.record_failure` or :meth:`~CircuitBreaker.release`.

Invariants:

1. CLOSED lets every call through. Each reported result lands in the time window and
   the consecutive-failure count; a success resets that count to zero.
2. CLOSED opens on a failure when the consecutive count reaches
   ``consecutive_failures``, or when the window holds at least ``min_calls`` results
   and the share of failures among them reaches ``failure_ratio``.
3. OPEN lets no call through. Results reported while OPEN belong to calls allowed
   before it opened: they are ignored.
4. OPEN becomes HALF_OPEN lazily, when ``state``, ``allow``, ``retry_after`` or
   ``snapshot`` is read ``open_for`` seconds or more after it opened. No timer runs.
5. HALF_OPEN lets a call through only while fewer than ``half_open_probes`` probes
   are in flight; ``allow`` reserves the slot, and a result or ``release`` frees it.
6. HALF_OPEN closes after ``successes_to_close`` probe successes; one probe failure
   re-opens it, counts as a new opening and restarts ``open_for``. Results reported
   while no probe is in flight come from calls made before it opened: ignored.
7. Entering CLOSED clears the window and the consecutive count, so failures from
   before the outage cannot re-open it on the first new failure.
8. Every transition is logged at WARNING on ``natskit.resilience`` and then passed
   to ``on_change(name, old, new)``, after the breaker's own state is complete.

Memory is bounded by the window, never by the call rate: results are counted in at
most ``max(10, ceil(window))`` time buckets.

The breaker is not thread-safe: it is meant to be used from one event loop.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "FAILURE_KINDS",
    "SYSTEM_CLOCK",
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
    "Clock",
    "Deadline",
    "FakeClock",
    "RetryPolicy",
]

_log = logging.getLogger("natskit.resilience")

#: Failure kinds a :class:`RetryPolicy` may retry on.
FAILURE_KINDS = frozenset({"no_responders", "timeout", "service_error_5xx"})

# Short windows are still split into this many buckets, so their edge stays sharp.
_MIN_BUCKETS = 10


# -- clocks ------------------------------------------------------------------------


class Clock(Protocol):
    """A source of monotonic time in seconds; only differences between readings mean
    anything."""

    def monotonic(self) -> float: ...


class _SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


#: The real clock, :func:`time.monotonic`.
SYSTEM_CLOCK: Clock = _SystemClock()


class FakeClock:
    """A clock that moves only when told to, for tests of anything that takes a
    :class:`Clock`."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward; a monotonic clock cannot go back, so negative is a
        ``ValueError``."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self._now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"


# -- deadlines ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """An absolute deadline on a clock; created from a timeout budget.

    Absolute rather than a remaining budget, so that retries and nested calls share one
    limit instead of each starting a fresh timeout. Only meaningful on the clock it was
    made with.
    """

    at: float

    @classmethod
    def after(cls, seconds: float, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        """The deadline ``seconds`` from now. ``math.inf`` means no deadline; a
        negative or NaN budget is a ``ValueError``."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        return cls(at=clock.monotonic() + seconds)

    def remaining(self, clock: Clock = SYSTEM_CLOCK) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.at - clock.monotonic())

    def expired(self, clock: Clock = SYSTEM_CLOCK) -> bool:
        """True once the deadline has been reached."""
        return clock.monotonic() >= self.at


# -- retries -----------------------------------------------------------------------


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long to wait before calling again after a failure.

    Only idempotent calls are retried: a timeout does not say whether the responder
    acted, so retrying a non-idempotent call could apply it twice.

    ``max_retries`` counts retries after the first attempt (0 turns retries off).
    ``base`` and ``cap`` (seconds) bound the exponential backoff; ``retry_on`` names
    the failure kinds worth retrying, from :data:`FAILURE_KINDS`. ``service_error_5xx``
    is off by default because a service that failed once often fails the same way.
    """

    max_retries: int = 3
    base: float = 0.05
    cap: float = 1.0
    retry_on: frozenset[str] = frozenset({"no_responders", "timeout"})

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(
                f"max_retries must be an int >= 0, got {self.max_retries!r}"
            )
        if not _finite(self.base) or self.base <= 0:
            raise ValueError(f"base must be a finite number > 0, got {self.base!r}")
        if not _finite(self.cap) or self.cap < self.base:
            raise ValueError(
                f"cap must be a finite number >= base ({self.base!r}), got {self.cap!r}"
            )
        if not isinstance(self.retry_on, frozenset):
            raise ValueError(f"retry_on must be a frozenset, got {self.retry_on!r}")
        unknown = self.retry_on - FAILURE_KINDS
        if unknown:
            raise ValueError(
                f"retry_on has unknown failure kinds {sorted(unknown)}; "
                f"known: {sorted(FAILURE_KINDS)}"
            )

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry).

        Full jitter: a uniform pick in ``[0, min(cap, base * 2**retry)]``. Spreading
        retries over the whole range, rather than around the backoff value, keeps
        many clients that failed together from retrying together. ``rand()`` should
        return a number in ``[0, 1]``; anything outside is clamped.
        """
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry!r}")
        try:
            ceiling = min(self.cap, math.ldexp(self.base, retry))
        except OverflowError:
            ceiling = self.cap
        return min(1.0, max(0.0, rand())) * ceiling

    def should_retry(self, kind: str, retry: int, *, idempotent: bool) -> bool:
        """Whether to make retry number ``retry`` (0-based, so also the number of
        retries already made) after a failure of ``kind``.

        An unknown ``kind`` is simply not retried: it comes from the network at run
        time, not from the programmer.
        """
        return idempotent and kind in self.retry_on and retry < self.max_retries


# -- circuit breaker ---------------------------------------------------------------


class BreakerState(enum.Enum):
    """The three states of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """When a :class:`CircuitBreaker` opens and how it recovers.

    Two triggers, whichever comes first: ``consecutive_failures`` in a row catches a
    destination that went down; ``failure_ratio`` over the last ``window`` seconds
    catches one that fails often but not always. The ratio needs ``min_calls`` results
    in the window, so two failures out of three calls at low traffic do not open it;
    ``failure_ratio=None`` turns the ratio off.

    Once open, calls fail fast for ``open_for`` seconds. Then up to
    ``half_open_probes`` calls at a time test the destination, and
    ``successes_to_close`` successful probes close the breaker again.
    """

    consecutive_failures: int = 5
    failure_ratio: float | None = 0.5
    window: float = 10.0
    min_calls: int = 20
    open_for: float = 1.0
    half_open_probes: int = 1
    successes_to_close: int = 1

    def __post_init__(self) -> None:
        for name in (
            "consecutive_failures",
            "min_calls",
            "half_open_probes",
            "successes_to_close",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        ratio = self.failure_ratio
        if ratio is not None and not (_finite(ratio) and 0 < ratio <= 1):
            raise ValueError(f"failure_ratio must be in (0, 1] or None, got {ratio!r}")
        for name in ("window", "open_for"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class _Window:
    """Results over the last ``window`` seconds, counted in a ring of time buckets.

    Memory is ``max(10, ceil(window))`` buckets whatever the call rate, and adding a
    result is a few integer operations. The price is precision at the old edge: a
    result leaves the window up to one bucket width (at most a second) early.
    """

    def __init__(self, window: float) -> None:
        self._count = max(_MIN_BUCKETS, math.ceil(window))
        self._width = window / self._count
        self._calls = [0] * self._count
        self._failures = [0] * self._count
        self._newest: int | None = None  # index of the newest bucket in use
        self.calls = 0
        self.failures = 0

    def add(self, now: float, *, ok: bool) -> None:
        index = self._advance(now)
        slot = index % self._count
        self._calls[slot] += 1
        self.calls += 1
        if not ok:
            self._failures[slot] += 1
            self.failures += 1

    def totals(self, now: float) -> tuple[int, int]:
        self._advance(now)
        return self.calls, self.failures

    def clear(self) -> None:
        self._calls = [0] * self._count
        self._failures = [0] * self._count
        self._newest = None
        self.calls = self.failures = 0

    def _advance(self, now: float) -> int:
        """Move the ring forward to ``now``, emptying the buckets that fell out."""
        index = math.floor(now / self._width)
        newest = self._newest
        if newest == index:
            return index
        if newest is None or index - newest >= self._count:
            if self.calls:
                self.clear()
        elif index > newest:
            for stale in range(newest + 1, index + 1):
                slot = stale % self._count
                self.calls -= self._calls[slot]
                self.failures -= self._failures[slot]
                self._calls[slot] = self._failures[slot] = 0
        else:
            return newest  # the clock went backwards: count it in the newest bucket
        self._newest = index
        return index


class CircuitBreaker:
    """Fails calls to a destination fast while it is failing, and probes for recovery.

    See the module docstring for the states and invariants. ``on_change(name, old,
    new)`` is called on every transition, for metrics; it runs inside whichever method
    noticed the transition (including a read of :attr:`state`), and an exception from
    it propagates to that caller, with the breaker already in its new state.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy = BreakerPolicy(),  # frozen, so one default is shareable
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.opened_count = 0
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._window = _Window(policy.window)
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    @property
    def state(self) -> BreakerState:
        """The current state; reading it moves OPEN to HALF_OPEN once ``open_for``
        has passed."""
        if (
            self._state is BreakerState.OPEN
            and self._clock.monotonic() - self._opened_at >= self.policy.open_for
        ):
            self._probes_in_flight = 0
            self._probe_successes = 0
            self._transition(
                BreakerState.HALF_OPEN, "after %ss open", self.policy.open_for
            )
        return self._state

    def allow(self) -> bool:
        """Whether a call may be made now. In HALF_OPEN a True reserves a probe slot,
        so every allowed call must end in ``record_success``, ``record_failure`` or
        ``release``."""
        if self._state is BreakerState.CLOSED:
            return True  # the hot path: nothing can change while closed
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._probes_in_flight < self.policy.half_open_probes:
            self._probes_in_flight += 1
            return True
        return False

    def record_success(self) -> None:
        """Report that an allowed call succeeded."""
        if self._state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.add(self._clock.monotonic(), ok=True)
            return
        state = self.state
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.add(self._clock.monotonic(), ok=True)
        elif state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.policy.successes_to_close:
                self._close()

    def record_failure(self) -> None:
        """Report that an allowed call failed in a way that says the destination is
        unwell (no responders, timeout, 5xx); in HALF_OPEN this re-opens."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._record_closed_failure()
        elif state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._open("probe failed")

    def release(self) -> None:
        """Report that an allowed call ended with no verdict on the destination
        (cancelled, or an error such as a 4xx that is the caller's fault): frees a
        half-open probe slot and changes nothing else."""
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def retry_after(self) -> float:
        """Seconds until an OPEN breaker lets a probe through; 0 when not OPEN."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        elapsed = self._clock.monotonic() - self._opened_at
        return max(0.0, self.policy.open_for - elapsed)

    def snapshot(self) -> dict[str, object]:
        """The breaker's figures as plain values, for metrics and the CLI."""
        state = self.state
        calls, failures = self._window.totals(self._clock.monotonic())
        return {
            "name": self.name,
            "state": state.value,
            "consecutive_failures": self._consecutive,
            "window_calls": calls,
            "window_failures": failures,
            "opened_count": self.opened_count,
            "retry_after": self.retry_after(),
        }

    # -- transitions ---------------------------------------------------------------

    def _record_closed_failure(self) -> None:
        policy = self.policy
        now = self._clock.monotonic()
        self._consecutive += 1
        self._window.add(now, ok=False)
        if self._consecutive >= policy.consecutive_failures:
            self._open("after %d consecutive failures", self._consecutive)
            return
        calls, failures = self._window.totals(now)
        ratio = policy.failure_ratio
        # Divide, not multiply: failures / calls is exact when it equals the ratio.
        if (
            ratio is not None
            and calls >= policy.min_calls
            and failures / calls >= ratio
        ):
            self._open(
                "after %d of %d calls failed in %ss", failures, calls, policy.window
            )

    def _open(self, reason: str, *args: object) -> None:
        self._opened_at = self._clock.monotonic()
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened_count += 1
        self._transition(BreakerState.OPEN, reason, *args)

    def _close(self) -> None:
        successes = self._probe_successes
        self._consecutive = 0
        self._window.clear()
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._transition(BreakerState.CLOSED, "after %d successful probes", successes)

    def _transition(self, new: BreakerState, reason: str, *args: object) -> None:
        old, self._state = self._state, new
        _log.warning(
            "circuit %s: %s -> %s " + reason, self.name, old.value, new.value, *args
        )
        if self._on_change is not None:
            self._on_change(self.name, old, new)
