"""
Unit tests of L{pgws._outbox.Outbox}: one socket's messages on their way to PostgreSQL, sent one
statement at a time.  The NOTIFY pool is a L{Sender} whose every C{notify()} returns a Deferred
the test fires itself; time moves only when the test advances the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgws._outbox import MAX_BATCH, Outbox

Pair = tuple[str, str]


class Sender:
    """The NOTIFY pool's side of the seam: each statement waits for the test to answer it."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.statements: list[list[Pair]] = []
        self.at: list[float] = []  # the clock's time of each statement
        self._waiting: list[defer.Deferred[None]] = []

    def notify(self, pairs: Sequence[Pair]) -> defer.Deferred[None]:
        self.statements.append(list(pairs))
        self.at.append(self.clock.seconds())
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def succeed(self) -> None:
        self._waiting.pop(0).callback(None)

    def fail(self, error: Exception) -> None:
        self._waiting.pop(0).errback(error)

    def succeed_all(self) -> None:
        """Answer every statement, including those sent while answering."""
        while self._waiting:
            self.succeed()

    async def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self) -> defer.Deferred[Any]:
        return defer.succeed([(1,)])


class Calls:
    """What the outbox told its socket."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.overflows: list[int] = []
        self.events: list[str] = []  # "pause" / "resume", in order

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume")


def message(n: int, channel: str = "room") -> list[Pair]:
    return [(channel, f"m{n}")]


def make(max_queued: int = 1000) -> tuple[Outbox, Sender, Calls, MemoryReactorClock]:
    clock = MemoryReactorClock()
    sender = Sender(clock)
    calls = Calls()
    outbox = Outbox(sender, calls.errors.append, clock, max_queued=max_queued,
                    on_overflow=calls.overflows.append, pause=calls.pause, resume=calls.resume)
    return outbox, sender, calls, clock


def away() -> psycopg2.OperationalError:
    return psycopg2.OperationalError("server closed the connection unexpectedly")


# -- ordering and batching ----------------------------------------------------------------------


def test_first_message_is_sent_at_once_in_its_own_statement():
    outbox, sender, _, _ = make()
    outbox.put(message(1))
    assert sender.statements == [[("room", "m1")]]


def test_messages_put_while_a_statement_is_in_flight_go_in_the_next_one_in_order():
    outbox, sender, _, _ = make()
    outbox.put(message(1))
    outbox.put(message(2))
    outbox.put(message(3))
    assert sender.statements == [[("room", "m1")]]  # one statement at a time
    sender.succeed()
    assert sender.statements == [[("room", "m1")], [("room", "m2"), ("room", "m3")]]
    sender.succeed()
    assert sender.in_flight == 0
    assert outbox.sent == 3
    assert len(outbox) == 0


def test_a_message_keeps_its_pairs_together_and_in_order():
    outbox, sender, _, _ = make()
    outbox.put(message(0))
    outbox.put([("a", "x"), ("b", "x"), ("audit", "x")])
    outbox.put([("a", "y")])
    sender.succeed()
    assert sender.statements[1] == [("a", "x"), ("b", "x"), ("audit", "x"), ("a", "y")]


def test_a_statement_carries_at_most_max_batch_messages():
    outbox, sender, _, _ = make()
    outbox.put(message(0))
    for n in range(1, MAX_BATCH + 101):
        outbox.put(message(n))
    sender.succeed()
    sender.succeed()
    assert [len(s) for s in sender.statements] == [1, MAX_BATCH, 100]
    assert sender.statements[1][0] == ("room", "m1")
    assert sender.statements[1][-1] == ("room", f"m{MAX_BATCH}")
    assert sender.statements[2][0] == ("room", f"m{MAX_BATCH + 1}")


def test_a_message_is_never_split_across_statements_at_the_batch_cap():
    # The cap counts pairs; a message that crosses it still goes whole (its pairs are one
    # transaction), so that statement holds a few more than MAX_BATCH pairs.
    outbox, sender, _, _ = make()
    outbox.put(message(0))
    for n in range(1, MAX_BATCH):
        outbox.put(message(n))
    outbox.put([("a", "last"), ("b", "last"), ("c", "last")])
    outbox.put(message(MAX_BATCH + 1))
    sender.succeed()
    assert len(sender.statements[1]) == MAX_BATCH + 2
    assert sender.statements[1][-3:] == [("a", "last"), ("b", "last"), ("c", "last")]
    sender.succeed()
    assert sender.statements[2] == [("room", f"m{MAX_BATCH + 1}")]


def test_a_repeated_pair_starts_a_new_statement():
    # PostgreSQL folds identical notifications of one transaction into one.
    outbox, sender, _, _ = make()
    outbox.put(message(0))
    outbox.put([("room", "x")])
    outbox.put([("room", "y")])
    outbox.put([("room", "x")])
    outbox.put([("room", "z")])
    sender.succeed_all()
    assert sender.statements == [
        [("room", "m0")],
        [("room", "x"), ("room", "y")],
        [("room", "x"), ("room", "z")],
    ]


def test_same_payload_on_another_channel_stays_in_the_same_statement():
    outbox, sender, _, _ = make()
    outbox.put(message(0))
    outbox.put([("a", "x")])
    outbox.put([("b", "x")])
    sender.succeed()
    assert sender.statements[1] == [("a", "x"), ("b", "x")]


def test_a_pair_repeated_within_one_message_is_sent_once():
    outbox, sender, _, _ = make()
    outbox.put([("room", "x"), ("audit", "x"), ("room", "x")])
    assert sender.statements == [[("room", "x"), ("audit", "x")]]


# -- the database away --------------------------------------------------------------------------


def test_away_keeps_the_batch_and_later_messages_in_order():
    outbox, sender, _, clock = make()
    outbox.put(message(1))
    outbox.put(message(2))
    sender.succeed()  # m1 sent; m2 in flight
    sender.fail(away())
    assert outbox.away is True
    outbox.put(message(3))
    assert len(outbox) == 2
    clock.advance(0.25)
    assert sender.statements[-1] == [("room", "m2"), ("room", "m3")]
    sender.succeed()
    assert outbox.away is False
    assert outbox.sent == 3


def test_a_failed_batch_of_several_messages_is_retried_in_order():
    outbox, sender, _, clock = make()
    outbox.put(message(1))
    outbox.put(message(2))
    outbox.put(message(3))
    sender.succeed()  # m2 and m3 in flight together
    sender.fail(away())
    outbox.put(message(4))
    clock.advance(0.25)
    assert sender.statements[-1] == [("room", "m2"), ("room", "m3"), ("room", "m4")]


def test_away_retries_after_a_quarter_second_doubling_up_to_five_seconds():
    outbox, sender, _, clock = make()
    outbox.put(message(1))
    step = 1 / 64
    for delay in (0.25, 0.5, 1, 2, 4, 5, 5):
        sender.fail(away())
        before = len(sender.statements)
        clock.advance(delay - step)
        assert len(sender.statements) == before, f"retried before {delay} s"
        clock.advance(step)
        assert len(sender.statements) == before + 1, f"not retried at {delay} s"
    assert sender.at == [0, 0.25, 0.75, 1.75, 3.75, 7.75, 12.75, 17.75]
    assert all(s == [("room", "m1")] for s in sender.statements)


def test_back_off_starts_again_at_a_quarter_second_after_the_database_returns():
    outbox, sender, _, clock = make()
    outbox.put([("room", "x")])
    outbox.put([("room", "x")])  # the same pair: it waits for a statement of its own
    sender.fail(away())
    clock.advance(0.25)
    sender.fail(away())
    clock.advance(0.5)
    sender.succeed()  # back: the first "x" is sent, the second goes at once, in the same run
    assert sender.at == [0, 0.25, 0.75, 0.75]
    sender.fail(away())
    clock.advance(0.25)
    assert sender.at == [0, 0.25, 0.75, 0.75, 1.0]


def test_interface_error_and_cancellation_count_as_away_too():
    for error in (psycopg2.InterfaceError("connection already closed"), defer.CancelledError()):
        outbox, sender, calls, clock = make()
        outbox.put(message(1))
        sender.fail(error)
        assert outbox.away is True
        assert calls.errors == []
        clock.advance(0.25)
        assert len(sender.statements) == 2


def test_overflow_while_away_reports_the_count_and_drops_the_queue():
    outbox, sender, calls, clock = make(max_queued=3)
    outbox.put(message(1))
    sender.fail(away())  # m1 waits again
    outbox.put(message(2))
    outbox.put(message(3))
    assert calls.overflows == []
    outbox.put(message(4))
    assert calls.overflows == [4]
    assert len(outbox) == 0
    clock.advance(60)
    assert len(sender.statements) == 1  # nothing was retried
    outbox.put(message(5))  # refused from now on
    assert len(outbox) == 0
    assert len(sender.statements) == 1


def test_overflow_when_the_failed_batch_comes_back_to_a_full_queue():
    outbox, sender, calls, clock = make(max_queued=2)
    for n in range(1, 5):
        outbox.put(message(n))  # three wait, over two, but the database is up: no limit
    assert calls.overflows == []
    sender.fail(away())  # m1 back in front of m2..m4: four waiting
    assert calls.overflows == [4]
    clock.advance(60)
    assert len(sender.statements) == 1


def test_exactly_max_queued_waiting_is_not_an_overflow():
    outbox, sender, calls, clock = make(max_queued=3)
    outbox.put(message(1))
    sender.fail(away())
    outbox.put(message(2))
    outbox.put(message(3))
    assert calls.overflows == []
    clock.advance(0.25)
    assert sender.statements[-1] == [("room", "m1"), ("room", "m2"), ("room", "m3")]


# -- a refused statement ------------------------------------------------------------------------


def test_refused_statement_reports_what_was_lost_with_the_first_line_of_the_error():
    outbox, sender, calls, clock = make()
    outbox.put(message(1))
    outbox.put(message(2))
    outbox.put([("room", "x"), ("audit", "x")])
    sender.succeed()  # m1 sent; m2 and the pair in flight
    outbox.put(message(4))
    sender.fail(psycopg2.DataError("invalid byte sequence for encoding \"UTF8\"\nCONTEXT: x"))
    assert calls.errors == ['database error, 3 messages not sent: invalid byte sequence for encoding "UTF8"']
    assert len(outbox) == 0
    assert outbox.away is False
    clock.advance(60)
    assert len(sender.statements) == 2  # never retried


def test_refused_single_message_says_one_message():
    outbox, sender, calls, _ = make()
    outbox.put(message(1))
    sender.fail(psycopg2.ProgrammingError("permission denied for function pg_notify"))
    assert calls.errors == ["database error, 1 message not sent: permission denied for function pg_notify"]


# -- pausing a flooding socket ------------------------------------------------------------------


def test_pause_once_above_high_water_while_the_database_is_up():
    outbox, sender, calls, _ = make()
    outbox.put(message(0))  # in flight: nothing waits
    for n in range(1, Outbox.HIGH_WATER + 1):
        outbox.put(message(n))
    assert len(outbox) == Outbox.HIGH_WATER
    assert calls.events == []
    outbox.put(message(Outbox.HIGH_WATER + 1))
    assert calls.events == ["pause"]
    outbox.put(message(Outbox.HIGH_WATER + 2))
    assert calls.events == ["pause"]  # once


def test_resume_only_once_fewer_than_low_water_wait():
    outbox, sender, calls, _ = make()
    outbox.put(message(0))
    for n in range(1, MAX_BATCH + Outbox.LOW_WATER + 1):  # 564 waiting
        outbox.put(message(n))
    sender.succeed()  # m0 done: 564 wait, 500 go -> 64 wait
    assert calls.events == ["pause"]
    sender.succeed()  # 64 wait when this one lands: still not below LOW_WATER
    assert calls.events == ["pause"]
    assert len(outbox) == 0 and sender.in_flight == 1
    sender.succeed()
    assert calls.events == ["pause", "resume"]


def test_resume_as_soon_as_the_wait_drops_below_low_water():
    outbox, sender, calls, _ = make()
    outbox.put(message(0))
    for n in range(1, MAX_BATCH + Outbox.LOW_WATER):  # 563 waiting
        outbox.put(message(n))
    sender.succeed()  # 500 go, 63 wait
    sender.succeed()
    assert calls.events == ["pause", "resume"]
    assert sender.in_flight == 1  # the last 63 still on their way


def test_no_pause_while_away_and_going_away_resumes_a_paused_socket():
    outbox, sender, calls, clock = make(max_queued=10_000)
    outbox.put(message(0))
    for n in range(1, Outbox.HIGH_WATER + 2):
        outbox.put(message(n))
    assert calls.events == ["pause"]
    sender.fail(away())
    assert calls.events == ["pause", "resume"]  # while away the queue limit applies instead
    for n in range(1000, 1300):
        outbox.put(message(n))
    assert calls.events == ["pause", "resume"]


# -- flushed and close --------------------------------------------------------------------------


def test_flushed_fires_at_once_when_nothing_waits():
    outbox, _, _, _ = make()
    d = outbox.flushed()
    assert d.called


def test_flushed_fires_once_everything_is_sent():
    outbox, sender, _, _ = make()
    outbox.put(message(1))
    outbox.put(message(2))
    d = outbox.flushed()
    sender.succeed()
    assert not d.called  # m2 still on its way
    sender.succeed()
    assert d.called
    assert outbox.sent == 2


def test_flushed_fires_after_a_refusal_too():
    outbox, sender, _, _ = make()
    outbox.put(message(1))
    d = outbox.flushed()
    sender.fail(psycopg2.DataError("nope"))
    assert d.called


def test_close_refuses_new_messages_but_sends_the_queued_ones():
    outbox, sender, _, _ = make()
    outbox.put(message(1))
    outbox.put(message(2))
    outbox.close()
    outbox.put(message(3))
    assert len(outbox) == 1
    d = outbox.flushed()
    sender.succeed_all()
    assert sender.statements == [[("room", "m1")], [("room", "m2")]]
    assert d.called
