"""
Unit tests of L{pgws._listener.Listener}: the LISTEN session's life (connect, re-LISTEN, watch,
lose, reconnect) on a memory clock.  The connection is the other side of the seam: made by the
C{connection_factory} the listener is given, it answers as the test tells it to, and, like the
txpostgres connection it stands for, reports its loss through the C{lost} callback (also when it
is closed, and when a connect fails).
"""

from __future__ import annotations

from typing import Any

import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgws._listener import CONNECT_TIMEOUT, RELISTEN_CHUNK, Listener, State

DSN = "postgres://pgws@db.example:5432/app"
STEP = 1 / 64  # a binary fraction: the clock adds it without rounding


class Database:
    """How the connections answer, for every connection the factory makes from now on."""

    def __init__(self) -> None:
        self.connect = "ok"  # "ok", "fail" or "hold" (the test fires it)
        self.hold_operations = False
        self.close_fails_pending = True  # False: what was stuck stays unanswered, abandoned
        self.made: list[FakeListenConnection] = []

    def factory(self, reactor: Any, received: Any, lost: Any) -> FakeListenConnection:
        conn = FakeListenConnection(self, reactor, received, lost)
        self.made.append(conn)
        return conn

    @property
    def conn(self) -> FakeListenConnection:
        return self.made[-1]

    def attempts(self) -> list[float]:
        """The clock's time of every connect, on any connection, in order."""
        return sorted(t for c in self.made for t in c.connected_at)


class FakeListenConnection:
    """The methods and attributes of L{pgws._listener.ListenConnection} that the listener uses."""

    def __init__(self, db: Database, reactor: Any, received: Any, lost: Any) -> None:
        self.db = db
        self.reactor = reactor
        self.received = received
        self.lost = lost
        self.paused = False
        self.last_read = 0.0
        self.settings: list[dict[str, Any]] = []
        self.connected_at: list[float] = []
        self.operations: list[str] = []
        self.queries: list[str] = []
        self.resumed = 0
        self.closed = False
        self.pending_connect: defer.Deferred[None] | None = None
        self.pending_operations: list[defer.Deferred[None]] = []
        self.pending_queries: list[defer.Deferred[Any]] = []

    def connect(self, dsn: str, **settings: Any) -> defer.Deferred[None]:
        assert dsn == DSN
        self.settings.append(settings)
        self.connected_at.append(self.reactor.seconds())
        if self.db.connect == "fail":
            # txpostgres: the reactor sees the socket die, then the connect fails.
            self.lost("Connection to the other side was lost in a non-clean fashion.", self)
            return defer.fail(psycopg2.OperationalError(
                "connection to server failed: Connection refused\n\tIs the server running?"))
        if self.db.connect == "hold":
            self.pending_connect = defer.Deferred()
            return self.pending_connect
        return defer.succeed(None)

    def runOperation(self, sql: str) -> defer.Deferred[None]:
        self.operations.append(sql)
        if self.closed:
            return defer.fail(psycopg2.InterfaceError("connection already closed"))
        if self.db.hold_operations:
            d: defer.Deferred[None] = defer.Deferred()
            self.pending_operations.append(d)
            return d
        return defer.succeed(None)

    def runQuery(self, sql: str) -> defer.Deferred[Any]:
        self.queries.append(sql)
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending_queries.append(d)
        return d

    def resumeReading(self) -> None:
        self.paused = False
        self.resumed += 1

    def close(self) -> None:
        # txpostgres' close() fails what is outstanding, then calls connectionLost.
        if self.closed:
            return
        self.closed = True
        if not self.db.close_fails_pending:
            self.pending_operations, self.pending_queries = [], []
        for d in self.pending_operations + self.pending_queries:
            if not d.called:
                d.errback(psycopg2.InterfaceError("connection already closed"))
        self.lost("Connection was closed cleanly.", self)

    def answer_operations(self) -> None:
        pending, self.pending_operations = self.pending_operations, []
        for d in pending:
            d.callback(None)


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []
        self.is_busy = False
        self.attached: Any = None

    def received(self, notifications: list[tuple[str, str]]) -> None:
        self.batches.append(notifications)

    def busy(self) -> bool:
        return self.is_busy

    def attach(self, reading: Any) -> None:
        self.attached = reading


_made: list[tuple[Listener, Database]] = []


@pytest.fixture(autouse=True)
def _finish_what_is_left():
    """
    Stop each listener and fail what its connections still hold, so that no coroutine is left
    waiting to be closed by the garbage collector (which runs its finally blocks at random).
    """
    yield
    while _made:
        listener, db = _made.pop()
        listener.stop()
        for conn in db.made:
            if conn.pending_connect is not None and not conn.pending_connect.called:
                conn.pending_connect.errback(psycopg2.OperationalError("test over"))
            conn.close()


def make(check_interval: float = 0, application_name: str = "pgws",
         **kwargs: Any) -> tuple[Listener, Database, Sink, MemoryReactorClock]:
    clock = MemoryReactorClock()
    db = Database()
    listener = Listener(clock, DSN, check_interval=check_interval,
                        application_name=application_name, connection_factory=db.factory,
                        **kwargs)
    sink = Sink()
    listener.deliver_to(sink)
    _made.append((listener, db))
    return listener, db, sink, clock


def start(listener: Listener) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(listener.start())


def kill(conn: FakeListenConnection) -> None:
    """The server ends the session (pg_terminate_backend): the connection reports its loss."""
    conn.lost("terminating connection due to administrator command", conn)


# -- start-up -----------------------------------------------------------------------------------


def test_idle_until_started_with_its_first_connection_made_but_not_connected():
    listener, db, _, _ = make()
    assert listener.state is State.IDLE
    assert listener.connected is False
    assert len(db.made) == 1
    assert db.conn.settings == []


def test_start_goes_connecting_then_listening():
    listener, db, _, _ = make()
    db.connect = "hold"
    d = start(listener)
    assert listener.state is State.CONNECTING
    assert not d.called
    assert db.conn.pending_connect is not None
    db.conn.pending_connect.callback(None)
    assert listener.state is State.LISTENING
    assert listener.connected is True
    assert d.called
    assert listener.sessions == 1


def test_connect_settings_name_the_listener_and_turn_keepalives_on():
    listener, db, _, _ = make(application_name="edge-1")
    start(listener)
    assert db.conn.settings == [{
        "application_name": "edge-1 listener", "client_encoding": "UTF8", "keepalives": 1,
        "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
        "connect_timeout": 10,
    }]


def test_start_returns_after_a_failed_first_attempt_and_keeps_trying():
    listener, db, _, clock = make()
    db.connect = "fail"
    d = start(listener)
    assert d.called
    assert listener.state is State.CONNECTING
    db.connect = "ok"
    clock.advance(1)
    assert listener.state is State.LISTENING


def test_start_reads_the_connection_once_connected():
    listener, db, _, _ = make()
    start(listener)
    assert db.conn.resumed == 1


def test_wanted_channels_are_listened_in_one_sorted_statement_on_connect():
    listener, db, _, _ = make()
    for channel in ("b", "a", 'say "hi"'):
        listener.listen(channel)
    assert db.conn.operations == []  # not connected yet: nothing sent
    start(listener)
    assert db.conn.operations == ['LISTEN "a"; LISTEN "b"; LISTEN "say ""hi"""']


def test_many_channels_are_listened_in_chunks():
    listener, db, _, _ = make()
    channels = [f"c{n:05d}" for n in range(RELISTEN_CHUNK + 1)]
    for channel in channels:
        listener.listen(channel)
    start(listener)
    assert [s.count("LISTEN") for s in db.conn.operations] == [RELISTEN_CHUNK, 1]
    assert db.conn.operations[1] == f'LISTEN "{channels[-1]}"'


# -- back-off and giving up ---------------------------------------------------------------------


def test_failed_attempts_back_off_1_2_4_up_to_32_seconds():
    listener, db, _, clock = make()
    db.connect = "fail"
    start(listener)
    for delay in (1, 2, 4, 8, 16, 32, 32, 32):
        before = len(db.attempts())
        clock.advance(delay - STEP)
        assert len(db.attempts()) == before, f"attempted before {delay} s"
        clock.advance(STEP)
        assert len(db.attempts()) == before + 1, f"no attempt at {delay} s"
    assert db.attempts() == [0, 1, 3, 7, 15, 31, 63, 95, 127]
    assert listener.state is State.CONNECTING


def test_each_attempt_after_a_failed_connect_uses_a_fresh_connection():
    listener, db, _, clock = make()
    db.connect = "fail"
    start(listener)
    clock.advance(1)
    clock.advance(2)
    connected = [c for c in db.made if c.connected_at]
    assert len(connected) == 3
    assert [len(c.connected_at) for c in connected] == [1, 1, 1]
    assert all(c.closed for c in connected)


def test_max_attempts_gives_up_once_with_the_reason():
    reasons: list[str] = []
    listener, db, _, clock = make(max_attempts=3, gave_up=reasons.append)
    db.connect = "fail"
    d = start(listener)
    assert d.called
    clock.advance(1)
    assert reasons == []
    clock.advance(2)
    assert listener.state is State.GAVE_UP
    assert reasons == ["connection to server failed: Connection refused"]
    clock.advance(1000)
    assert db.attempts() == [0, 1, 3]
    assert reasons == ["connection to server failed: Connection refused"]


def test_max_attempts_does_not_apply_once_a_session_was_made():
    reasons: list[str] = []
    listener, db, _, clock = make(max_attempts=2, gave_up=reasons.append)
    start(listener)
    db.connect = "fail"
    kill(db.conn)
    for delay in (1, 2, 4, 8):
        clock.advance(delay)
    assert len(db.attempts()) == 6  # the first session, then 5 failed attempts
    assert listener.state is State.CONNECTING
    assert reasons == []


# -- losing the session and making it again -----------------------------------------------------


def test_a_loss_goes_connecting_and_makes_a_fresh_connection():
    listener, db, _, _ = make()
    listener.listen("room")
    start(listener)
    first = db.conn
    db.connect = "hold"
    kill(first)
    assert listener.state is State.CONNECTING
    assert listener.connected is False
    assert listener.losses == 1
    assert db.conn is not first
    assert first.closed
    assert db.conn.settings != []  # the new attempt started at once


def test_after_a_loss_every_wanted_channel_is_listened_again_in_one_statement():
    listener, db, _, _ = make()
    listener.listen("b")
    listener.listen("a")
    start(listener)
    listener.listen("c")
    listener.unlisten("b")
    kill(db.conn)
    assert db.conn.operations == ['LISTEN "a"; LISTEN "c"']
    assert listener.state is State.LISTENING
    assert listener.sessions == 2


def test_recovered_is_called_once_the_channels_are_listened_again():
    recovered: list[int] = []
    listener, db, _, _ = make(recovered=lambda: recovered.append(1))
    listener.listen("room")
    start(listener)
    assert recovered == []  # not on the first connection
    db.hold_operations = True
    kill(db.conn)
    assert db.conn.operations == ['LISTEN "room"']
    assert recovered == []  # not before the LISTEN has run
    db.conn.answer_operations()
    assert recovered == [1]


def test_recovered_is_not_called_when_the_first_session_comes_after_failed_attempts():
    recovered: list[int] = []
    listener, db, _, clock = make(recovered=lambda: recovered.append(1))
    db.connect = "fail"
    start(listener)
    db.connect = "ok"
    clock.advance(1)
    assert listener.state is State.LISTENING
    assert recovered == []


def test_a_failed_reconnect_backs_off_until_the_database_returns():
    recovered: list[int] = []
    listener, db, _, clock = make(recovered=lambda: recovered.append(1))
    start(listener)
    db.connect = "fail"
    kill(db.conn)  # the immediate attempt fails
    clock.advance(1)
    db.connect = "ok"
    clock.advance(2)
    assert db.attempts() == [0, 0, 1, 3]
    assert listener.state is State.LISTENING
    assert recovered == [1]


def test_the_loss_of_an_already_replaced_connection_is_ignored():
    listener, db, _, _ = make()
    start(listener)
    old = db.conn
    kill(old)
    made = len(db.made)
    kill(old)  # a late report from the dead one
    assert len(db.made) == made
    assert listener.losses == 1
    assert listener.state is State.LISTENING


def test_a_failed_listen_loses_the_session_and_the_channel_is_listened_on_the_next():
    listener, db, _, _ = make()
    start(listener)
    first = db.conn
    db.hold_operations = True
    listener.listen("room")
    first.pending_operations.pop(0).errback(psycopg2.OperationalError("SSL SYSCALL error: EOF detected"))
    assert listener.losses == 1
    assert db.conn is not first
    assert db.conn.operations == ['LISTEN "room"']


def test_a_connection_lost_while_its_channels_are_listened_is_retried_after_a_back_off():
    listener, db, _, clock = make()
    listener.listen("room")
    db.hold_operations = True
    start(listener)
    first = db.conn
    kill(first)  # during the LISTEN of the set-up: that attempt failed
    db.hold_operations = False
    second = db.conn
    assert second.connected_at == []
    clock.advance(1)
    assert second.connected_at == [1]
    assert listener.state is State.LISTENING


# -- the check --------------------------------------------------------------------------------


def test_an_unanswered_check_loses_the_session_after_check_interval():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    first = db.conn
    clock.advance(5)
    assert first.queries == ["SELECT 1"]
    clock.advance(5 - STEP)
    assert db.conn is first
    assert listener.losses == 0
    clock.advance(STEP)
    assert listener.losses == 1
    assert db.conn is not first
    assert first.closed
    assert listener.state is State.LISTENING  # made again at once


def test_an_answered_check_keeps_the_session_and_checks_again_an_interval_later():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    clock.advance(5)
    clock.advance(1)
    db.conn.pending_queries.pop(0).callback([(1,)])
    clock.advance(4)
    assert db.conn.queries == ["SELECT 1", "SELECT 1"]
    assert listener.losses == 0
    assert len(db.made) == 1


def test_a_failing_check_loses_the_session_at_once():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    first = db.conn
    clock.advance(5)
    first.pending_queries.pop(0).errback(psycopg2.OperationalError("server closed the connection"))
    assert listener.losses == 1
    assert db.conn is not first


def test_no_check_while_the_sink_is_busy():
    listener, db, sink, clock = make(check_interval=5)
    start(listener)
    first = db.conn
    sink.is_busy = True
    clock.advance(5)
    clock.advance(5)
    assert first.queries == []
    sink.is_busy = False
    clock.advance(5)
    assert first.queries == ["SELECT 1"]
    assert db.made == [first]


def test_no_check_when_data_arrived_within_the_interval():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    first = db.conn
    clock.advance(4)
    first.last_read = clock.seconds()
    clock.advance(1)  # t=5: read 1 s ago
    assert first.queries == []
    clock.advance(5)  # t=10: read 6 s ago
    assert first.queries == ["SELECT 1"]
    assert db.made == [first]


def test_no_check_while_reading_is_paused():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    first = db.conn
    listener.pause_reading()
    clock.advance(5)
    clock.advance(5)
    assert first.queries == []
    assert db.made == [first]


def test_no_check_while_connecting():
    listener, db, _, clock = make(check_interval=5)
    db.connect = "fail"
    start(listener)
    clock.advance(30)
    assert [c.queries for c in db.made] == [[]] * len(db.made)


def test_no_check_without_a_check_interval():
    listener, db, _, clock = make(check_interval=0)
    start(listener)
    first = db.conn
    clock.advance(3600)
    assert first.queries == []
    assert db.made == [first]
    assert clock.getDelayedCalls() == []


# -- listen, unlisten, ready ----------------------------------------------------------------------


def test_listen_while_listening_sends_listen():
    listener, db, _, _ = make()
    start(listener)
    listener.listen("room")
    assert db.conn.operations == ['LISTEN "room"']


def test_listen_while_the_set_up_listen_is_in_flight_gets_its_own_listen():
    listener, db, _, _ = make()
    listener.listen("a")
    db.hold_operations = True
    start(listener)
    listener.listen("b")
    assert db.conn.operations == ['LISTEN "a"', 'LISTEN "b"']


def test_ready_waits_for_the_listen_to_be_executed():
    listener, db, _, _ = make()
    start(listener)
    db.hold_operations = True
    listener.listen("room")
    ready = listener.ready("room")
    assert not ready.called
    db.conn.answer_operations()
    assert ready.called
    assert listener.ready("room").called  # nothing in flight any more


def test_ready_never_fails_even_when_the_listen_does():
    listener, db, _, _ = make()
    start(listener)
    db.hold_operations = True
    listener.listen("room")
    ready = listener.ready("room")
    results: list[object] = []
    ready.addBoth(results.append)
    db.conn.pending_operations.pop(0).errback(psycopg2.OperationalError("server closed the connection"))
    assert results == [None]


def test_ready_fires_at_once_while_the_session_is_down():
    listener, db, _, _ = make()
    db.connect = "hold"
    start(listener)
    listener.listen("room")
    assert listener.ready("room").called


def test_each_ready_is_its_own_deferred():
    listener, db, _, _ = make()
    start(listener)
    db.hold_operations = True
    listener.listen("room")
    first, second = listener.ready("room"), listener.ready("room")
    first.addCallback(lambda _: "changed by the first waiter")
    db.conn.answer_operations()
    assert results_of(second) == [None]


def results_of(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_ready_after_a_loss_does_not_wait_for_a_listen_abandoned_with_its_connection():
    listener, db, _, _ = make()
    start(listener)
    db.hold_operations = True
    db.close_fails_pending = False  # the stuck LISTEN never answers, even once closed
    listener.listen("room")
    assert not listener.ready("room").called
    db.connect = "hold"
    kill(db.conn)
    assert listener.ready("room").called  # down: fires at once, the re-LISTEN follows


def test_two_readies_share_one_listen():
    listener, db, _, _ = make()
    start(listener)
    db.hold_operations = True
    listener.listen("room")
    first, second = listener.ready("room"), listener.ready("room")
    db.conn.answer_operations()
    assert first.called and second.called


def test_unlisten_sends_unlisten():
    listener, db, _, _ = make()
    listener.listen("room")
    start(listener)
    listener.unlisten("room")
    assert db.conn.operations == ['LISTEN "room"', 'UNLISTEN "room"']


def test_unlisten_while_down_sends_nothing_and_the_channel_is_not_listened_again():
    listener, db, _, _ = make()
    listener.listen("room")
    listener.listen("other")
    start(listener)
    db.connect = "hold"
    kill(db.conn)
    listener.unlisten("room")
    assert db.conn.operations == []
    assert db.conn.pending_connect is not None
    db.conn.pending_connect.callback(None)
    assert db.conn.operations == ['LISTEN "other"']


# -- reading, for the fan-out ---------------------------------------------------------------------


def test_deliver_to_attaches_the_listener_to_its_sink_and_received_batches_reach_it():
    listener, db, sink, _ = make()
    assert sink.attached is listener
    start(listener)
    db.conn.received([("room", "a"), ("room", "b")])
    assert sink.batches == [[("room", "a"), ("room", "b")]]


def test_pause_and_resume_reading_act_on_the_current_connection():
    listener, db, _, _ = make()
    start(listener)
    resumed = db.conn.resumed
    listener.pause_reading()
    assert db.conn.paused is True
    listener.resume_reading()
    assert db.conn.paused is False
    assert db.conn.resumed == resumed + 1
    listener.resume_reading()  # not paused: nothing to do
    assert db.conn.resumed == resumed + 1


# -- stop ---------------------------------------------------------------------------------------------


def test_stop_while_listening_closes_the_connection_and_stops_checking():
    listener, db, _, clock = make(check_interval=5)
    start(listener)
    listener.stop()
    assert listener.state is State.STOPPED
    assert db.conn.closed
    assert clock.getDelayedCalls() == []  # the check is stopped, not just idle
    clock.advance(60)
    assert db.conn.queries == []
    assert len(db.made) == 1  # the close reported a loss: not acted on


def test_stop_during_the_back_off_makes_no_more_attempts():
    listener, db, _, clock = make()
    db.connect = "fail"
    start(listener)
    listener.stop()
    clock.advance(1000)
    assert db.attempts() == [0]
    assert listener.state is State.STOPPED


def test_stop_during_an_attempt_schedules_no_retry_when_it_fails():
    listener, db, _, clock = make()
    db.connect = "hold"
    start(listener)
    conn = db.conn
    listener.stop()
    assert conn.pending_connect is not None
    conn.pending_connect.errback(psycopg2.OperationalError("connection refused"))
    assert clock.getDelayedCalls() == []
    assert listener.state is State.STOPPED


def test_a_loss_after_stop_is_ignored():
    listener, db, _, _ = make()
    start(listener)
    conn = db.conn
    listener.stop()
    kill(conn)
    assert len(db.made) == 1
    assert listener.state is State.STOPPED


# -- a connection attempt that never ends -------------------------------------------------------


def test_a_connect_that_never_answers_is_abandoned_and_tried_again():
    reasons: list[str] = []
    listener, db, _, clock = make(max_attempts=2, gave_up=reasons.append)
    db.connect = "hold"
    d = start(listener)
    clock.advance(CONNECT_TIMEOUT - 0.001)
    assert not d.called and len(db.attempts()) == 1  # still waiting for the first answer
    clock.advance(0.001)
    assert d.called  # start() returns after the first attempt, whatever its outcome
    clock.advance(1)  # the back-off before the second attempt
    assert len(db.attempts()) == 2
    assert listener.state is State.CONNECTING
    clock.advance(CONNECT_TIMEOUT)
    assert listener.state is State.GAVE_UP
    assert reasons == [f"no answer within {CONNECT_TIMEOUT:g} s"]
