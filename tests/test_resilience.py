"""Retry schedules, the circuit breaker state machine and deadlines, on a fake clock."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natskit.resilience import (
    FAILURE_KINDS,
    SYSTEM_CLOCK,
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Deadline,
    FakeClock,
    RetryPolicy,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make_breaker(
    clock: FakeClock, **options: Any
) -> tuple[CircuitBreaker, list[tuple[str, BreakerState, BreakerState]]]:
    """A breaker on ``clock`` whose transitions are collected in the returned list."""
    changes: list[tuple[str, BreakerState, BreakerState]] = []
    policy = BreakerPolicy(**options)
    breaker = CircuitBreaker(
        "svc.echo",
        policy,
        clock=clock,
        on_change=lambda *change: changes.append(change),
    )
    return breaker, changes


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def succeed(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_success()


def open_breaker(
    clock: FakeClock, **options: Any
) -> tuple[CircuitBreaker, list[tuple[str, BreakerState, BreakerState]]]:
    """A breaker opened by consecutive failures (the ratio trigger off)."""
    breaker, changes = make_breaker(
        clock, consecutive_failures=2, failure_ratio=None, **options
    )
    fail(breaker, 2)
    assert breaker.state is OPEN
    return breaker, changes


# -- clocks and deadlines --------------------------------------------------------


def test_fake_clock_moves_only_when_advanced() -> None:
    clock = FakeClock(start=5.0)
    assert clock.monotonic() == 5.0
    clock.advance(1.5)
    assert clock.monotonic() == 6.5
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(-1)


def test_system_clock_is_monotonic() -> None:
    first = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= first


def test_deadline_counts_down_and_expires() -> None:
    clock = FakeClock(start=100.0)
    deadline = Deadline.after(2.0, clock)
    assert deadline.at == 102.0
    assert deadline.remaining(clock) == 2.0
    assert not deadline.expired(clock)
    clock.advance(1.5)
    assert deadline.remaining(clock) == 0.5
    clock.advance(0.5)
    assert deadline.expired(clock)
    clock.advance(10)
    assert deadline.remaining(clock) == 0.0


def test_deadline_rejects_a_negative_budget_and_allows_infinity() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="seconds"):
        Deadline.after(-0.1, clock)
    with pytest.raises(ValueError, match="seconds"):
        Deadline.after(math.nan, clock)
    forever = Deadline.after(math.inf, clock)
    clock.advance(1e9)
    assert not forever.expired(clock)
    assert forever.remaining(clock) == math.inf


# -- retry policy ----------------------------------------------------------------


def test_retry_delay_grows_exponentially_until_capped() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0)
    delays = [policy.delay(retry, rand=lambda: 1.0) for retry in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_retry_delay_jitters_over_the_whole_range() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0)
    assert policy.delay(2, rand=lambda: 0.5) == pytest.approx(0.2)
    assert policy.delay(2, rand=lambda: 0.0) == 0.0
    # Out-of-range randomness is clamped, never stretches the delay.
    assert policy.delay(2, rand=lambda: 7.0) == pytest.approx(0.4)
    assert policy.delay(2, rand=lambda: -1.0) == 0.0


def test_retry_delay_at_huge_retry_numbers_is_the_cap() -> None:
    policy = RetryPolicy(base=0.05, cap=2.0)
    assert policy.delay(10_000, rand=lambda: 1.0) == 2.0
    assert policy.delay(10**30, rand=lambda: 1.0) == 2.0


def test_retry_delay_rejects_a_negative_retry_number() -> None:
    with pytest.raises(ValueError, match="retry"):
        RetryPolicy().delay(-1)


def test_retry_delay_uses_random_by_default() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0)
    assert all(0.0 <= policy.delay(3) <= 0.8 for _ in range(100))


@given(
    retry=st.integers(min_value=0, max_value=64),
    base=st.floats(min_value=1e-6, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    pick=st.floats(min_value=0.0, max_value=1.0),
)
def test_retry_delay_is_within_the_jitter_range(
    retry: int, base: float, extra: float, pick: float
) -> None:
    policy = RetryPolicy(base=base, cap=base + extra)
    delay = policy.delay(retry, rand=lambda: pick)
    assert 0.0 <= delay <= min(policy.cap, base * 2**retry)


def test_should_retry_only_idempotent_calls() -> None:
    policy = RetryPolicy()
    assert policy.should_retry("timeout", 0, idempotent=True)
    assert not policy.should_retry("timeout", 0, idempotent=False)


def test_should_retry_only_kinds_in_retry_on() -> None:
    policy = RetryPolicy(retry_on=frozenset({"no_responders"}))
    assert policy.should_retry("no_responders", 0, idempotent=True)
    assert not policy.should_retry("timeout", 0, idempotent=True)
    assert not policy.should_retry("service_error_5xx", 0, idempotent=True)
    assert not policy.should_retry("something_else", 0, idempotent=True)


def test_should_retry_stops_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=2)
    allowed = [policy.should_retry("timeout", r, idempotent=True) for r in range(4)]
    assert allowed == [True, True, False, False]
    assert not RetryPolicy(max_retries=0).should_retry("timeout", 0, idempotent=True)


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base, policy.cap) == (3, 0.05, 1.0)
    assert policy.retry_on == frozenset({"no_responders", "timeout"})
    assert policy.retry_on <= FAILURE_KINDS


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"base": 0.0}, "base"),
        ({"base": -1.0}, "base"),
        ({"base": math.nan}, "base"),
        ({"base": 2.0, "cap": 1.0}, "cap"),
        ({"cap": math.inf}, "cap"),
        ({"retry_on": frozenset({"timeout", "4xx"})}, "retry_on"),
        ({"retry_on": {"timeout"}}, "retry_on"),
    ],
)
def test_retry_policy_validation_names_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**options)


# -- breaker policy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"failure_ratio": 0.0}, "failure_ratio"),
        ({"failure_ratio": 1.5}, "failure_ratio"),
        ({"failure_ratio": math.nan}, "failure_ratio"),
        ({"window": 0.0}, "window"),
        ({"window": math.inf}, "window"),
        ({"min_calls": 0}, "min_calls"),
        ({"open_for": -1.0}, "open_for"),
        ({"half_open_probes": 0}, "half_open_probes"),
        ({"successes_to_close": 0}, "successes_to_close"),
        ({"min_calls": 2.5}, "min_calls"),
    ],
)
def test_breaker_policy_validation_names_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerPolicy(**options)


def test_breaker_policy_accepts_no_ratio_and_full_ratio() -> None:
    assert BreakerPolicy(failure_ratio=None).failure_ratio is None
    assert BreakerPolicy(failure_ratio=1.0).failure_ratio == 1.0


# -- breaker: opening ------------------------------------------------------------


def test_breaker_starts_closed_and_allows() -> None:
    breaker, changes = make_breaker(FakeClock())
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert breaker.retry_after() == 0.0
    assert breaker.opened_count == 0
    assert changes == []


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker, changes = make_breaker(FakeClock(), consecutive_failures=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.opened_count == 1
    assert changes == [("svc.echo", CLOSED, OPEN)]


def test_breaker_success_resets_the_consecutive_count() -> None:
    breaker, _ = make_breaker(FakeClock(), consecutive_failures=3, failure_ratio=None)
    for _ in range(5):
        fail(breaker, 2)
        succeed(breaker, 1)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_breaker_opens_on_ratio_only_with_min_calls_in_window() -> None:
    breaker, changes = make_breaker(
        FakeClock(), consecutive_failures=100, failure_ratio=0.5, min_calls=10
    )
    # Eight calls, all failing alternately: 50% but fewer than min_calls.
    for _ in range(4):
        succeed(breaker, 1)
        fail(breaker, 1)
    assert breaker.state is CLOSED
    succeed(breaker, 1)  # 9 calls, 4 failures
    assert breaker.state is CLOSED
    fail(breaker, 1)  # 10 calls, 5 failures: 50%
    assert breaker.state is OPEN
    assert changes == [("svc.echo", CLOSED, OPEN)]


def test_breaker_ratio_below_threshold_stays_closed() -> None:
    breaker, _ = make_breaker(
        FakeClock(), consecutive_failures=100, failure_ratio=0.5, min_calls=10
    )
    for _ in range(10):
        succeed(breaker, 2)
        fail(breaker, 1)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["window_calls"] == 30


def test_breaker_ratio_compares_exactly_at_the_threshold() -> None:
    # 0.1 * 30 is 3.0000000000000004 in floating point; 3 of 30 must still open.
    breaker, _ = make_breaker(
        FakeClock(), consecutive_failures=100, failure_ratio=0.1, min_calls=30
    )
    succeed(breaker, 27)
    fail(breaker, 3)
    assert breaker.state is OPEN


def test_breaker_failures_outside_the_window_do_not_count() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(
        clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10, window=10.0
    )
    fail(breaker, 9)
    clock.advance(11.0)
    snapshot = breaker.snapshot()
    assert (snapshot["window_calls"], snapshot["window_failures"]) == (0, 0)
    # Nine fresh successes and one failure: 10% in the window, not 100%.
    succeed(breaker, 9)
    fail(breaker, 1)
    assert breaker.state is CLOSED


def test_breaker_window_keeps_recent_results() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(
        clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10, window=10.0
    )
    fail(breaker, 5)
    clock.advance(5.0)
    fail(breaker, 4)
    assert breaker.snapshot()["window_calls"] == 9
    fail(breaker, 1)
    assert breaker.state is OPEN


def test_breaker_window_memory_is_bounded_by_time_not_calls() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock, consecutive_failures=10**9, failure_ratio=None)
    for _ in range(200):
        for _ in range(50):
            succeed(breaker, 1)
            fail(breaker, 1)
        clock.advance(0.25)
    window = breaker._window  # the bound is the point
    assert len(window._calls) == len(window._failures) == 10
    assert breaker.snapshot()["window_calls"] == 9 * 4 * 100  # whole seconds 41-49


def test_breaker_window_works_for_short_windows() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(
        clock, consecutive_failures=100, failure_ratio=0.5, min_calls=4, window=0.5
    )
    fail(breaker, 3)
    clock.advance(0.6)
    fail(breaker, 1)
    assert breaker.snapshot()["window_calls"] == 1
    assert breaker.state is CLOSED


# -- breaker: open, half-open and back -------------------------------------------


def test_breaker_open_refuses_until_open_for_passes() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=2.0)
    assert not breaker.allow()
    clock.advance(1.999)
    assert not breaker.allow()
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


def test_breaker_retry_after_counts_down() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=2.0)
    assert breaker.retry_after() == 2.0
    clock.advance(0.5)
    assert breaker.retry_after() == 1.5
    clock.advance(1.5)
    assert breaker.retry_after() == 0.0
    assert breaker.state is HALF_OPEN


def test_breaker_half_open_lets_exactly_the_probes_through() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=1.0, half_open_probes=2)
    clock.advance(1.0)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()


def test_breaker_single_probe_blocks_others_while_in_flight() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=1.0)
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()
    assert breaker.state is HALF_OPEN


def test_breaker_probe_success_closes() -> None:
    clock = FakeClock()
    breaker, changes = open_breaker(clock, open_for=1.0)
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert breaker.snapshot()["window_calls"] == 0
    assert [new for _, _, new in changes] == [OPEN, HALF_OPEN, CLOSED]


def test_breaker_closing_needs_successes_to_close() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=1.0, successes_to_close=3)
    clock.advance(1.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_success()
        assert breaker.state is HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED


def test_breaker_after_closing_old_failures_do_not_reopen() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=1.0)
    clock.advance(1.0)
    succeed(breaker, 1)
    fail(breaker, 1)
    assert breaker.state is CLOSED


def test_breaker_probe_failure_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker, changes = open_breaker(clock, open_for=2.0)
    clock.advance(3.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_count == 2
    assert breaker.retry_after() == 2.0
    clock.advance(1.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert [new for _, _, new in changes] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_breaker_release_frees_the_probe_slot_without_changing_state() -> None:
    clock = FakeClock()
    breaker, changes = open_breaker(clock, open_for=1.0)
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert len(changes) == 3


def test_breaker_release_outside_half_open_changes_nothing() -> None:
    clock = FakeClock()
    breaker, changes = make_breaker(clock, consecutive_failures=2)
    breaker.release()
    breaker.release()
    assert breaker.state is CLOSED
    fail(breaker, 1)
    breaker.release()
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert changes == [("svc.echo", CLOSED, OPEN)]


def test_breaker_ignores_results_of_calls_made_before_it_opened() -> None:
    clock = FakeClock()
    breaker, _ = open_breaker(clock, open_for=1.0)
    # Late results from calls allowed while CLOSED arrive while OPEN.
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_count == 1
    # ... and in HALF_OPEN before any probe was allowed.
    clock.advance(1.0)
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()


def test_breaker_on_change_sees_every_transition_in_order() -> None:
    clock = FakeClock()
    breaker, changes = open_breaker(clock, open_for=1.0)
    clock.advance(1.0)
    fail(breaker, 1)
    clock.advance(1.0)
    succeed(breaker, 1)
    fail(breaker, 2)
    assert changes == [
        ("svc.echo", CLOSED, OPEN),
        ("svc.echo", OPEN, HALF_OPEN),
        ("svc.echo", HALF_OPEN, OPEN),
        ("svc.echo", OPEN, HALF_OPEN),
        ("svc.echo", HALF_OPEN, CLOSED),
        ("svc.echo", CLOSED, OPEN),
    ]
    assert breaker.opened_count == 3


def test_breaker_on_change_sees_the_new_state_already_in_place() -> None:
    clock = FakeClock()
    seen: list[BreakerState] = []
    breakers: list[CircuitBreaker] = []

    def on_change(_name: str, _old: BreakerState, _new: BreakerState) -> None:
        seen.append(breakers[0].state)

    breakers.append(
        CircuitBreaker(
            "svc.echo",
            BreakerPolicy(consecutive_failures=1),
            clock=clock,
            on_change=on_change,
        )
    )
    fail(breakers[0], 1)
    assert seen == [OPEN]


def test_breaker_logs_each_transition_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    caplog.set_level(logging.WARNING, logger="natskit.resilience")
    breaker, _ = make_breaker(clock, consecutive_failures=5, open_for=1.0)
    fail(breaker, 5)
    clock.advance(1.0)
    succeed(breaker, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert all(r.name == "natskit.resilience" for r in caplog.records)
    assert messages == [
        "circuit svc.echo: closed -> open after 5 consecutive failures",
        "circuit svc.echo: open -> half_open after 1.0s open",
        "circuit svc.echo: half_open -> closed after 1 successful probes",
    ]


def test_breaker_logs_the_ratio_that_opened_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="natskit.resilience")
    breaker, _ = make_breaker(
        FakeClock(), consecutive_failures=100, failure_ratio=0.5, min_calls=4
    )
    succeed(breaker, 2)
    fail(breaker, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "circuit svc.echo: closed -> open after 2 of 4 calls failed in 10.0s"
    ]


def test_breaker_snapshot_reports_figures() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock, consecutive_failures=3, open_for=2.0)
    succeed(breaker, 2)
    fail(breaker, 2)
    assert breaker.snapshot() == {
        "name": "svc.echo",
        "state": "closed",
        "consecutive_failures": 2,
        "window_calls": 4,
        "window_failures": 2,
        "opened_count": 0,
        "retry_after": 0.0,
    }
    fail(breaker, 1)
    clock.advance(0.5)
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "open"
    assert snapshot["opened_count"] == 1
    assert snapshot["retry_after"] == 1.5


def test_breaker_defaults_use_the_default_policy_and_system_clock() -> None:
    breaker = CircuitBreaker("svc.echo")
    assert breaker.policy == BreakerPolicy()
    assert breaker.name == "svc.echo"
    assert breaker.state is CLOSED
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN
