"""
Unit tests of L{pgws._reactor}, the Twisted idioms the other modules share: a deadline that
abandons rather than cancels (L{within}), a waiter that never fails (L{fired}), a background
coroutine whose failure is logged (L{fire_and_log}), L{sleep}, L{backoff_delays} and
L{default_reactor}.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from pgws._reactor import backoff_delays, default_reactor, fire_and_log, fired, sleep, within

STEP = 1 / 64


def results(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


# -- within ------------------------------------------------------------------------------------------


def test_within_passes_a_timely_result_and_cancels_its_timer():
    clock = MemoryReactorClock()
    d: defer.Deferred[int] = defer.Deferred()
    out = results(within(d, 2, clock))
    clock.advance(1)
    d.callback(7)
    assert out == [7]
    assert clock.getDelayedCalls() == []


def test_within_passes_a_timely_failure():
    clock = MemoryReactorClock()
    d: defer.Deferred[int] = defer.Deferred()
    out = results(within(d, 2, clock))
    d.errback(ValueError("no"))
    assert len(out) == 1 and isinstance(out[0], Failure)
    assert isinstance(out[0].value, ValueError)
    out[0].trap(ValueError)


def test_within_times_out_exactly_at_the_deadline():
    clock = MemoryReactorClock()
    d: defer.Deferred[int] = defer.Deferred()
    out = results(within(d, 2, clock))
    clock.advance(2 - STEP)
    assert out == []
    clock.advance(STEP)
    assert len(out) == 1 and isinstance(out[0], Failure)
    assert isinstance(out[0].value, defer.TimeoutError)
    assert str(out[0].value) == "no answer within 2 s"


def test_within_does_not_cancel_what_it_gave_up_on():
    clock = MemoryReactorClock()
    cancelled: list[object] = []
    d: defer.Deferred[int] = defer.Deferred(canceller=cancelled.append)
    out = results(within(d, 0.5, clock))
    clock.advance(1)
    assert cancelled == []
    assert not d.called
    assert str(out[0].value) == "no answer within 0.5 s"
    out[0].trap(defer.TimeoutError)


def test_a_late_result_after_the_timeout_is_ignored():
    clock = MemoryReactorClock()
    d: defer.Deferred[int] = defer.Deferred()
    out = results(within(d, 1, clock))
    clock.advance(1)
    d.callback(5)  # no AlreadyCalledError
    assert len(out) == 1
    out[0].trap(defer.TimeoutError)


def test_a_late_failure_after_the_timeout_is_consumed_not_left_unhandled():
    clock = MemoryReactorClock()
    d: defer.Deferred[int] = defer.Deferred()
    out = results(within(d, 1, clock))
    clock.advance(1)
    d.errback(RuntimeError("late"))
    assert results(d) == [None]  # within's own callback took it
    assert len(out) == 1
    out[0].trap(defer.TimeoutError)


def test_within_of_an_already_fired_deferred_leaves_no_timer():
    clock = MemoryReactorClock()
    assert results(within(defer.succeed(3), 2, clock)) == [3]
    assert clock.getDelayedCalls() == []


# -- fired -------------------------------------------------------------------------------------------


def test_fired_fires_with_none_when_the_deferred_succeeds_and_leaves_its_result():
    d: defer.Deferred[str] = defer.Deferred()
    waiter = fired(d)
    assert not waiter.called
    d.callback("result")
    assert results(waiter) == [None]
    assert results(d) == ["result"]


def test_fired_never_fails_and_leaves_the_failure_to_the_deferred_s_own_chain():
    d: defer.Deferred[str] = defer.Deferred()
    waiter = fired(d)
    d.errback(RuntimeError("boom"))
    assert results(waiter) == [None]
    own = results(d)
    assert isinstance(own[0], Failure) and isinstance(own[0].value, RuntimeError)
    own[0].trap(RuntimeError)


def test_several_waiters_can_share_one_deferred():
    d: defer.Deferred[int] = defer.Deferred()
    waiters = [fired(d) for _ in range(3)]
    d.callback(1)
    assert [w.called for w in waiters] == [True, True, True]


# -- fire_and_log --------------------------------------------------------------------------------------


def test_fire_and_log_runs_the_coroutine_now_and_fires_with_its_result():
    ran: list[int] = []

    async def work() -> int:
        ran.append(1)
        return 42

    d = fire_and_log(work(), "work")
    assert ran == [1]
    assert results(d) == [42]


def test_fire_and_log_logs_a_failure_naming_what_failed_and_does_not_fail():
    async def broken() -> None:
        raise KeyError("gone")

    with capturedLogs() as logged:
        d = fire_and_log(broken(), "outbox")
    assert results(d) == [None]
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["what"] == "outbox"
    assert failures[0]["log_format"] == "{what} failed"
    assert isinstance(failures[0]["log_failure"].value, KeyError)


# -- sleep, backoff_delays, default_reactor ------------------------------------------------------------


def test_sleep_fires_exactly_after_its_seconds_of_the_clock():
    clock = MemoryReactorClock()
    d = sleep(clock, 3)
    clock.advance(3 - STEP)
    assert not d.called
    clock.advance(STEP)
    assert results(d) == [None]


def test_backoff_delays_by_default_double_from_1_up_to_32():
    assert list(itertools.islice(backoff_delays(), 9)) == [1, 2, 4, 8, 16, 32, 32, 32, 32]


def test_backoff_delays_with_a_first_delay_and_a_cap():
    assert list(itertools.islice(backoff_delays(first=0.25, cap=5.0), 8)) == [
        0.25, 0.5, 1, 2, 4, 5, 5, 5]


def test_default_reactor_is_the_one_given_else_the_global_one():
    clock = MemoryReactorClock()
    assert default_reactor(clock) is clock
    from twisted.internet import reactor

    assert default_reactor() is reactor
