"""
The one LISTEN session of the process: its connection's life (connect, re-LISTEN, watch, lose,
reconnect) and the set of channels it must LISTEN to.  What it receives goes, in PostgreSQL's
order, to a L{Sink} (the fan-out), which may ask it to stop reading while it works through a
backlog.

Traps this module works around:
  - txpostgres hands notifications to observers through a Cooperator, one task per batch read:
    10,000 notifications of one transaction arrived with hundreds of pairs out of order, and
    several times slower than a direct call.  L{ListenConnection} overrides C{checkForNotifies}
    and hands them over in order.
  - A lost txpostgres connection stays dead unless something reconnects it, and LISTEN must be
    re-issued after a reconnect: the L{Listener} runs its own reconnect loop with a fresh
    connection object each time (a query stuck on the dead one would hold its lock forever).
  - A link that dies without closing is never noticed by the driver: libpq keepalives (see
    L{pgws._postgres.connect_kwargs}) and a C{SELECT 1} check every C{check_interval} catch it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pgws._channelname import quote_ident
from pgws._postgres import (
    QuietConnection,
    close_quietly,
    connect_kwargs,
    describe_dsn,
    describe_error,
)
from pgws._reactor import backoff_delays, fire_and_log, fired, sleep, within

__all__ = ["ListenConnection", "Listener", "Sink", "State"]

_log = Logger()

# Seconds a connection attempt may take (libpq's connect_timeout does not apply to it).
CONNECT_TIMEOUT = 10.0
# Channels re-LISTENed per statement after a reconnect: a few round trips, not one per channel.
RELISTEN_CHUNK = 1000

Notification = tuple[str, str]  # (database channel, payload)


class State(enum.Enum):
    """Where the LISTEN session is in its life."""

    IDLE = "idle"  # not started
    CONNECTING = "connecting"  # an attempt, or the wait before the next one, is under way
    LISTENING = "listening"  # connected: LISTEN / UNLISTEN commands flow as channels change
    GAVE_UP = "gave up"  # start-up attempts exhausted (postgres-websockets' retries)
    STOPPED = "stopped"


class Sink(Protocol):
    """Where notifications go (the fan-out)."""

    def received(self, notifications: list[Notification]) -> None:
        """Take a batch, in PostgreSQL's order; never raises."""

    def busy(self) -> bool:
        """True while a backlog is being worked through (the session is alive, just behind)."""

    def attach(self, reading: Reading) -> None:
        """Use C{reading} to stop and restart reading the LISTEN socket."""


class Reading(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ListenConnection(QuietConnection):
    """
    A txpostgres connection that hands notifications over in order, can stop reading, and
    reports its own death.
    """

    prefix = "LISTEN session"

    def __init__(self, reactor: Any, received: Callable[[list[Notification]], None],
                 lost: Callable[[str, object], None]) -> None:
        super().__init__(reactor=reactor)
        self._received = received
        self._lost = lost
        self.paused = False
        self.last_read = 0.0  # reactor time of the last data from PostgreSQL

    def checkForNotifies(self) -> None:
        notifies = self._connection.notifies
        if notifies:
            batch = [(n.channel, n.payload) for n in notifies]
            del notifies[:]
            self._received(batch)

    def doRead(self) -> Any:
        self.last_read = self.reactor.seconds()
        lost = super().doRead()
        if self.paused and lost is None:
            self.reactor.removeReader(self)
        return lost

    def resumeReading(self) -> None:
        self.paused = False
        if self._connection is not None and not self._connection.closed and not self._cursors:
            self.reactor.addReader(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._lost(describe_error(reason), self)


ConnectionFactory = Callable[[Any, Callable[[list[Notification]], None],
                              Callable[[str, object], None]], Any]


class Listener:
    """
    The one LISTEN session of the process.  C{listen}/C{unlisten} keep the wanted set; the
    connection is made to match it, now and after every reconnect.

    The session is watched: libpq keepalives notice a dead link, and every C{check_interval}
    seconds a C{SELECT 1} must answer within that interval or the session is dropped and made
    again.  Reconnection backs off 1, 2, 4 ... 32 s.  With C{max_attempts}, start-up gives up
    after that many failed attempts and calls C{gave_up(reason)} (the postgres-websockets
    behaviour, for an outside supervisor); pgws's own mode keeps trying.

    Notifications go to the L{Sink} given to L{deliver_to} (the fan-out), in PostgreSQL's order.

    @param check_interval: seconds between checks (C{check-listener-interval}; 0: none).
    @param application_name: what the session is called in C{pg_stat_activity}, before
        C{listener} (C{application-name}).
    @param recovered: called each time the session is back after a loss, once every wanted
        channel is LISTENed again: readers may have missed notifications.
    @param connection_factory: makes each connection (a fresh one per attempt); tests pass one
        that needs no database.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        dsn: str,
        check_interval: float,
        application_name: str,
        max_attempts: int = 0,
        gave_up: Callable[[str], None] | None = None,
        recovered: Callable[[], None] | None = None,
        connection_factory: ConnectionFactory = ListenConnection,
    ) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._sink: Sink | None = None
        self._check_interval = check_interval
        self._max_attempts = max_attempts
        self._gave_up = gave_up
        self._on_recovered = recovered
        self._application_name = f"{application_name} listener"
        self._new_connection = connection_factory
        self._wanted: set[str] = set()
        self._inflight: dict[str, defer.Deferred[None]] = {}
        self._conn = self._fresh_connection()
        self._reconnecting = False  # the reconnect loop is running
        self._heartbeat: LoopingCall | None = None
        self._first_attempt: defer.Deferred[None] | None = None
        self.state = State.IDLE
        self.sessions = 0  # how many times the session was made ready
        self.losses = 0  # how many times it was lost (metrics, tests)
        self.notifications = 0  # how many it received, ever (metrics)

    def deliver_to(self, sink: Sink) -> None:
        """Hand notifications to C{sink} (which may pause and resume this session's reading)."""
        self._sink = sink
        sink.attach(self)

    def _received(self, notifications: list[Notification]) -> None:
        assert self._sink is not None, "deliver_to() was not called"
        self.notifications += len(notifications)
        self._sink.received(notifications)

    @property
    def connected(self) -> bool:
        """The session is up (LISTEN commands are being sent as channels change)."""
        return self.state is State.LISTENING

    def _fresh_connection(self) -> Any:
        return self._new_connection(self._reactor, self._received, self._lost)

    async def start(self) -> None:
        """
        Connect and LISTEN to every wanted channel.  Returns after the first attempt, whatever
        its outcome: later attempts go on in the background (see L{connected}).
        """
        if self._stopped():
            return
        _log.info("Connecting the LISTEN session to {where}", where=describe_dsn(self._dsn))
        if self._check_interval > 0:
            self._heartbeat = LoopingCall(self._check)
            self._heartbeat.clock = self._reactor
            self._heartbeat.start(self._check_interval, now=False).addErrback(
                lambda f: _log.failure("LISTEN session check failed", f))
        self._first_attempt = defer.Deferred()
        self._reconnect()
        await self._first_attempt

    def stop(self) -> None:
        self.state = State.STOPPED
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        close_quietly(self._conn)

    def _stopped(self) -> bool:
        return self.state is State.STOPPED

    # -- the connection's life ----------------------------------------------------------------

    def _reconnect(self) -> None:
        """Start the reconnect loop unless it is already running."""
        if not self._reconnecting and self.state is not State.STOPPED:
            # Set before the loop runs: it may end before fire_and_log returns.
            self._reconnecting = True
            self.state = State.CONNECTING
            fire_and_log(self._attempt_until_connected(), "LISTEN session connection")

    async def _attempt_until_connected(self) -> None:
        try:
            delays = backoff_delays()
            attempt = 0
            while not self._stopped():
                attempt += 1
                why = await self._attempt()
                if why is None or self._stopped():
                    return
                self._attempted()
                if self._max_attempts and not self.sessions and attempt >= self._max_attempts:
                    self._give_up(attempt, why)
                    return
                delay = next(delays)
                _log.warn("LISTEN session: connection attempt {n} failed: {why}; "
                          "retrying in {delay:.0f} s", n=attempt, why=why, delay=delay)
                await sleep(self._reactor, delay)
        finally:
            self._reconnecting = False
            self._attempted()

    async def _attempt(self) -> str | None:
        """One attempt: None once the session is ready, else why not."""
        conn = self._conn
        try:
            # libpq ignores connect_timeout for asynchronous connections (txpostgres's kind): a
            # server that accepts TCP and never answers would hold the attempt for ever.
            await within(conn.connect(self._dsn, **connect_kwargs(self._application_name)),
                         CONNECT_TIMEOUT, self._reactor)
            if conn is self._conn:
                await self._listen_all()
                if self.connected:
                    return None
        except Exception as e:
            if conn is self._conn:
                # The next attempt gets a fresh connection: this one may still be connecting.
                self._conn = self._fresh_connection()
                close_quietly(conn)
            if self.state is State.LISTENING:
                self.state = State.CONNECTING  # not connected until the next attempt says so
            return describe_error(e)
        return "the session was lost while it was being set up"

    def _give_up(self, attempt: int, why: str) -> None:
        _log.error("LISTEN session: attempt {n} of {total} failed: {why}; giving up",
                   n=attempt, total=self._max_attempts, why=why)
        self.state = State.GAVE_UP
        if self._gave_up is not None:
            self._gave_up(why)

    def _attempted(self) -> None:
        first = self._first_attempt
        if first is not None and not first.called:
            first.callback(None)

    async def _listen_all(self) -> None:
        # LISTENING before the re-LISTEN, so that a channel added meanwhile gets its own LISTEN.
        self.state = State.LISTENING
        self._conn.resumeReading()
        channels = sorted(self._wanted)
        statements = []
        for start in range(0, len(channels), RELISTEN_CHUNK):
            chunk = channels[start:start + RELISTEN_CHUNK]
            d = self._command("; ".join(f"LISTEN {quote_ident(c)}" for c in chunk))
            # A socket opening meanwhile waits for its channel's LISTEN (see ready()).
            for channel in chunk:
                self._track(channel, d)
            statements.append(d)
        # They run in order on the one connection; each handles its own failure.  A session that
        # takes the re-LISTEN and never answers is as lost as one that says no.
        try:
            await within(defer.gatherResults(statements), CONNECT_TIMEOUT, self._reactor)
        except defer.TimeoutError as e:
            self._lost(f"re-LISTEN: {e}")
            return
        if not self.connected:
            return
        self.sessions += 1
        _log.info("LISTEN session ready ({n} channels)", n=len(channels))
        if self.sessions > 1 and self._on_recovered is not None:
            self._on_recovered()

    def _lost(self, why: str, conn: object = None) -> None:
        """The session died (read error, failed command or failed check): make it again."""
        if self.state in (State.STOPPED, State.GAVE_UP):
            return
        if conn is not None and conn is not self._conn:
            return  # a connection already replaced
        if self.connected:
            self.losses += 1
            _log.warn("LISTEN session lost ({why}); reconnecting, sockets stay open", why=why)
        self.state = State.CONNECTING
        old, self._conn = self._conn, self._fresh_connection()
        self._inflight.clear()
        close_quietly(old)
        self._reconnect()

    async def _check(self) -> None:
        """
        A cheap query that must answer in time, or the session counts as dead.  A session that
        is delivering (data arrived within the interval, or a backlog is being worked through)
        is alive, and its answer would wait behind the backlog: no check then.
        """
        conn = self._conn
        if not self.connected or self._reconnecting or conn.paused or self._busy():
            return
        if self._reactor.seconds() - conn.last_read < self._check_interval:
            return
        try:
            await within(conn.runQuery("SELECT 1"), self._check_interval, self._reactor)
        except Exception as e:
            if conn is self._conn:
                self._lost(f"check failed: {describe_error(e)}")

    def _busy(self) -> bool:
        return self._sink is not None and self._sink.busy()

    # -- reading, for the sink ------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading the LISTEN socket (after the current read) until L{resume_reading}."""
        self._conn.paused = True

    def resume_reading(self) -> None:
        if self._conn.paused:
            self._conn.resumeReading()

    # -- the wanted channels ---------------------------------------------------------------------

    async def listening_channels(self) -> list[str]:
        """What PostgreSQL says this session LISTENs to (for tests and health checks)."""
        rows = await self._conn.runQuery("SELECT pg_listening_channels()")
        return [r[0] for r in rows]

    def listen(self, channel: str) -> None:
        self._wanted.add(channel)
        if self.connected:
            self._track(channel, self._command(f"LISTEN {quote_ident(channel)}"))

    def _track(self, channel: str, d: defer.Deferred[None]) -> None:
        """C{d} is the latest LISTEN of C{channel}: L{ready} waits for it."""
        self._inflight[channel] = d
        d.addBoth(self._landed, channel, d)

    def _landed(self, result: object, channel: str, d: defer.Deferred[None]) -> object:
        if self._inflight.get(channel) is d:
            del self._inflight[channel]
        return result

    def ready(self, channel: str) -> defer.Deferred[None]:
        """
        Fires once the latest C{LISTEN} asked for C{channel} has been executed, so that a socket
        opened after it misses nothing sent after it opened.  Never fails: with the session down,
        it fires at once (reconnection re-LISTENs later).
        """
        inflight = self._inflight.get(channel)
        return defer.succeed(None) if inflight is None else fired(inflight)

    def unlisten(self, channel: str) -> None:
        self._wanted.discard(channel)
        if self.connected:
            self._command(f"UNLISTEN {quote_ident(channel)}")

    def _command(self, sql: str) -> defer.Deferred[None]:
        return fire_and_log(self._run(sql), "LISTEN session command")

    async def _run(self, sql: str) -> None:
        try:
            await self._conn.runOperation(sql)
        except Exception as e:
            if self.connected:
                self._lost(f"{sql.split(' ')[0]} failed: {describe_error(e)}")
