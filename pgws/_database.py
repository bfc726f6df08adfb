"""
PostgreSQL: the one LISTEN connection of the process, and the NOTIFY pool with per-socket outboxes.

Traps this module works around (measured, see FACTS.md):
  - txpostgres hands notifications to observers through a Cooperator, which reorders them and is
    slow; L{_ListenConnection} overrides C{checkForNotifies} and gives them to the L{Listener} in
    PostgreSQL's order.
  - One read of the socket can bring hundreds of notifications; fanning them all out at once
    would block the reactor.  The L{Listener} works through its backlog in bounded slices and
    stops reading the LISTEN socket while the backlog is large.
  - A lost connection stays dead unless it has a C{DeadConnectionDetector}; a failed first connect
    is retried only if its errback is handed to the detector; LISTEN must be re-issued after a
    reconnect.
  - A pool of several connections reorders one client's messages: an L{Outbox} sends one batch at
    a time, so each socket's messages reach PostgreSQL in order whatever connection carries them.
  - Identical (channel, payload) pairs in one transaction are folded into one by PostgreSQL: a
    batch never holds the same pair twice.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any
from collections.abc import Callable

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import retrying
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.txpostgres import Connection, ConnectionPool

from pgws._channelname import quote_ident

__all__ = ["Listener", "NotifyPool", "Outbox", "describe_dsn", "connect_kwargs"]

_log = Logger()

# Work through at most this many deliveries (notification x reader) per reactor turn.
DELIVERIES_PER_SLICE = 20_000
# ... and at most about this many bytes of frames (the default; see Listener's slice_bytes), so
# that what one turn hands to the transports, which only flush between turns, stays bounded.
BYTES_PER_SLICE = 2 * 1024 * 1024
# Consecutive notifications of one channel are written together, up to this many / bytes.
MAX_RUN = 256
MAX_RUN_BYTES = 64 * 1024
# Stop reading the LISTEN socket while this many notifications wait to be fanned out.
BACKLOG_PAUSE = 5_000
# The most messages one NOTIFY statement carries.
MAX_BATCH = 500

Pair = tuple[str, str]


def connect_kwargs(application_name: str) -> dict[str, Any]:
    """
    Connection settings added to the user's DSN.  They live in the connection string (not in
    C{SET} commands) so that they survive a reconnect.  Keepalives make a link that died without
    closing show up as an error within seconds instead of hours.
    """
    return {
        "application_name": application_name,
        "client_encoding": "UTF8",
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "connect_timeout": 10,
    }


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for logs: never the password."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "an unparsable database URI"
    host = parts.get("host", "local socket")
    port = parts.get("port", "5432")
    return f"{parts.get('user', '?')}@{host}:{port}/{parts.get('dbname', '?')}"


def describe_error(failure_or_exc: Any) -> str:
    """The first line of a database error, safe to log and to put in a close reason."""
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    text = getattr(exc, "pgerror", None) or str(exc) or exc.__class__.__name__
    return text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__


def backoff_delays(first: float = 1.0, cap: float = 32.0) -> Iterator[float]:
    """1, 2, 4 ... 32, 32 ... seconds between connection attempts."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


class _QuietConnection(Connection):
    """
    A connection whose death is reported as a one-line warning, not as the reactor's "Unhandled
    Error" traceback: returning the exception from C{doRead} makes the reactor call
    C{connectionLost} with it, and the detector then reconnects.
    """

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.Error as e:
            _log.warn("{name} lost its database connection: {why}", name=self.prefix,
                      why=describe_error(e))
            return e
        return None


class _ListenConnection(_QuietConnection):
    """
    A txpostgres connection that hands notifications over in order, can stop reading, and
    reports its own death to the L{Listener} (which reconnects it).
    """

    def __init__(self, reactor: Any, sink: Callable[[list[Any]], None],
                 lost: Callable[[str, Any], None]) -> None:
        super().__init__(reactor=reactor)
        self.prefix = "LISTEN session"
        self._sink = sink
        self._lost = lost
        self.paused = False
        self.last_read = 0.0  # reactor time of the last data from PostgreSQL

    def checkForNotifies(self) -> None:
        notifies = self._connection.notifies
        if notifies:
            batch = list(notifies)
            del notifies[:]
            self._sink(batch)

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


class Listener:
    """
    The one LISTEN session of the process.  C{listen}/C{unlisten} keep the wanted set; the
    connection is made to match it, now and after every reconnect.  Notifications go to
    C{deliver(channel, [payload, ...])} in PostgreSQL's order, consecutive ones of a channel
    together (it returns how many readers got them).

    The session is watched: libpq keepalives notice a dead link, and every
    C{check_interval} seconds a C{SELECT 1} must answer within that interval or the session is
    dropped and made again.  Reconnection backs off 1, 2, 4 ... 32 s.  With C{max_attempts},
    start-up gives up after that many failed attempts and calls C{gave_up(reason)} (the
    postgres-websockets-compatible behaviour, for an outside supervisor); pgws's own mode keeps
    trying.

    @param recovered: called (with no argument) each time the session is back after a loss,
        once every wanted channel is LISTENed again: readers may have missed notifications.
    @param slice_bytes: bytes of frames one reactor turn may write at most (about); the relay
        keeps it under what one reader may have pending, so that a prompt reader is never taken
        for a slow one after a burst.
    """

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        deliver: Callable[[str, list[str]], Any],
        check_interval: float = 5.0,
        max_attempts: int = 0,
        gave_up: Callable[[str], None] | None = None,
        recovered: Callable[[], None] | None = None,
        slice_bytes: int = BYTES_PER_SLICE,
        application_name: str = "pgws",
    ) -> None:
        self._reactor = reactor
        self._application_name = f"{application_name} listener"
        self._slice_bytes = slice_bytes
        self._dsn = dsn
        self._deliver = deliver
        self._check_interval = check_interval
        self._max_attempts = max_attempts
        self._gave_up = gave_up
        self._on_recovered = recovered
        self._wanted: set[str] = set()
        self._inflight: dict[str, defer.Deferred[None]] = {}
        self._backlog: collections.deque[tuple[str, str]] = collections.deque()
        self._draining = False
        self._conn = _ListenConnection(reactor, self._received, self._lost)
        self._stopped = False
        self._connecting = False
        self._ever_connected = False
        self._heartbeat: LoopingCall | None = None
        self._first_attempt: defer.Deferred[None] | None = None
        self.connected = False
        self.losses = 0  # how many times the session was lost (metrics, tests)

    async def start(self) -> None:
        """
        Connect and LISTEN to every wanted channel.  Returns after the first attempt, whatever
        its outcome: later attempts go on in the background (see L{connected}).
        """
        _log.info("Connecting the LISTEN session to {where}", where=describe_dsn(self._dsn))
        if self._check_interval > 0:
            self._heartbeat = LoopingCall(self._check)
            self._heartbeat.clock = self._reactor
            self._heartbeat.start(self._check_interval, now=False).addErrback(
                lambda f: _log.failure("LISTEN session check failed", f))
        self._first_attempt = defer.Deferred()
        connecting = defer.Deferred.fromCoroutine(self._connect())
        connecting.addErrback(lambda f: _log.failure("LISTEN session connection failed", f))
        await self._first_attempt

    def stop(self) -> None:
        self._stopped = True
        self.connected = False
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        try:
            self._conn.close()
        except Exception:
            pass

    async def _connect(self) -> None:
        if self._connecting or self._stopped:
            return
        self._connecting = True
        try:
            delays = backoff_delays()
            attempt = 0
            while not self._stopped:
                attempt += 1
                conn = self._conn
                try:
                    await conn.connect(self._dsn, **connect_kwargs(self._application_name))
                    if conn is self._conn:
                        await self._listen_all()
                        if self.connected:
                            return
                    why = "the session was lost while it was being set up"
                except Exception as e:
                    why = describe_error(e)
                if self._stopped:
                    return
                self._attempted()
                if (self._max_attempts and not self._ever_connected
                        and attempt >= self._max_attempts):
                    _log.error("LISTEN session: attempt {n} of {total} failed: {why}; giving up",
                               n=attempt, total=self._max_attempts, why=why)
                    if self._gave_up is not None:
                        self._gave_up(why)
                    return
                delay = next(delays)
                _log.warn("LISTEN session: connection attempt {n} failed: {why}; "
                          "retrying in {delay:.0f} s", n=attempt, why=why, delay=delay)
                await deferLater(self._reactor, delay, lambda: None)
        finally:
            self._connecting = False
            self._attempted()

    def _attempted(self) -> None:
        first = self._first_attempt
        if first is not None and not first.called:
            first.callback(None)

    async def _listen_all(self) -> None:
        self.connected = True
        self._conn.resumeReading()
        channels = sorted(self._wanted)
        # Many channels are re-LISTENed in a few statements, not one round trip each.
        for start in range(0, len(channels), 1000):
            chunk = channels[start:start + 1000]
            await self._run("; ".join(f"LISTEN {quote_ident(c)}" for c in chunk))
        if not self.connected:
            return
        after_loss = self._ever_connected
        self._ever_connected = True
        _log.info("LISTEN session ready ({n} channels)", n=len(channels))
        if after_loss and self._on_recovered is not None:
            self._on_recovered()

    def _lost(self, why: str, conn: Any = None) -> None:
        """The session died (read error, failed command or failed check): make it again."""
        if self._stopped or (conn is not None and conn is not self._conn):
            return  # a connection already replaced
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.losses += 1
            _log.warn("LISTEN session lost ({why}); reconnecting, sockets stay open", why=why)
        # A fresh connection object: a query stuck on the dead one would hold its lock forever.
        old, self._conn = self._conn, _ListenConnection(self._reactor, self._received, self._lost)
        self._inflight.clear()
        try:
            old.close()
        except Exception:
            pass
        d = defer.Deferred.fromCoroutine(self._connect())
        d.addErrback(lambda f: _log.failure("LISTEN session reconnection failed", f))

    async def _check(self) -> None:
        """
        A cheap query that must answer in time, or the session counts as dead.  A session that
        is delivering (data arrived within the interval, or a backlog is being worked through
        with reading paused) is alive, and its answer would wait behind the backlog: no check.
        """
        conn = self._conn
        if not self.connected or self._connecting or conn.paused or self._backlog:
            return
        if self._reactor.seconds() - conn.last_read < self._check_interval:
            return
        try:
            await within(conn.runQuery("SELECT 1"), self._check_interval, self._reactor)
        except Exception as e:
            if conn is self._conn:
                self._lost(f"check failed: {describe_error(e)}")

    async def listening_channels(self) -> list[str]:
        """What PostgreSQL says this session LISTENs to (for tests and health checks)."""
        rows = await self._conn.runQuery("SELECT pg_listening_channels()")
        return [r[0] for r in rows]

    def listen(self, channel: str) -> None:
        self._wanted.add(channel)
        if self.connected:
            d = self._command(f"LISTEN {quote_ident(channel)}")
            self._inflight[channel] = d
            d.addBoth(self._landed, channel, d)

    def _landed(self, result: Any, channel: str, d: defer.Deferred[None]) -> Any:
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
        d = defer.Deferred.fromCoroutine(self._run(sql))
        d.addErrback(lambda f: _log.failure("LISTEN session command failed", f))
        return d

    async def _run(self, sql: str) -> None:
        try:
            await self._conn.runOperation(sql)
        except Exception as e:
            if self.connected:
                self._lost(f"{sql.split(' ')[0]} failed: {describe_error(e)}")

    # -- the notification pump ------------------------------------------------------------

    def _received(self, notifies: list[Any]) -> None:
        self._backlog.extend((n.channel, n.payload) for n in notifies)
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Fan out the backlog in slices of bounded work, yielding to the reactor between."""
        self._draining = True
        budget, byte_budget = DELIVERIES_PER_SLICE, self._slice_bytes
        backlog, deliver = self._backlog, self._deliver
        while backlog and budget > 0 and byte_budget > 0:
            channel, payload = backlog.popleft()
            run, size = [payload], len(payload)
            while (backlog and backlog[0][0] == channel and len(run) < MAX_RUN
                   and size < MAX_RUN_BYTES):
                payload = backlog.popleft()[1]
                run.append(payload)
                size += len(payload)
            readers = deliver(channel, run) or 0
            budget -= len(run) * (1 + readers)
            byte_budget -= readers * (size + 10 * len(run))
        if backlog:
            if len(backlog) >= BACKLOG_PAUSE:
                self._conn.paused = True
            self._reactor.callLater(0, self._drain)
        else:
            self._draining = False
            if self._conn.paused:
                self._conn.resumeReading()


def _pool_backoff() -> Any:
    """Pool connections retry at once, then 1, 2, 4, 5, 5 ... s: queued messages are waiting."""
    return retrying.simpleBackoffIterator(
        initialDelay=1.0, maxDelay=5.0, factor=2.0, maxRetries=0, now=True
    )


class _PoolConnection(_QuietConnection):
    """A pool connection that reconnects by itself when its link dies."""

    def __init__(self, reactor: Any, cooperator: Any = None) -> None:
        detector = DeadConnectionDetector(reconnectionIterator=_pool_backoff, reactor=reactor)
        super().__init__(reactor=reactor, cooperator=cooperator, detector=detector)
        self.prefix = "NOTIFY pool"


class NotifyPool:
    """C{db-pool} connections that run C{pg_notify}; each statement is its own transaction."""

    def __init__(self, reactor: IReactorCore | IReactorTime | Any, dsn: str, size: int,
                 application_name: str = "pgws") -> None:
        self._dsn = dsn
        self._settings = connect_kwargs(f"{application_name} notify")
        pool_class = type("_Pool", (ConnectionPool,), {
            "connectionFactory": _PoolConnection, "reactor": reactor, "min": size})
        self._pool = pool_class(None, dsn, **self._settings)

    async def start(self) -> None:
        ds = []
        for conn in self._pool.connections:
            d = conn.connect(self._dsn, **self._settings)
            d.addErrback(conn.detector.checkForDeadConnection)
            ds.append(d)
        results = await defer.DeferredList(ds, consumeErrors=True)
        failed = [r for ok, r in results if not ok]
        if failed:
            _log.error("NOTIFY pool: {n} of {total} connections failed: {why}; retrying",
                       n=len(failed), total=len(ds), why=describe_error(failed[0]))

    def stop(self) -> None:
        for conn in self._pool.connections:
            try:
                conn.close()
            except Exception:
                pass

    def check(self) -> defer.Deferred[Any]:
        """A cheap statement through the pool: does sending work right now?"""
        return self._pool.runQuery("SELECT 1")

    def notify(self, pairs: Sequence[Pair]) -> defer.Deferred[Any]:
        """One transaction that notifies every pair, in order."""
        if len(pairs) == 1:
            return self._pool.runOperation("SELECT pg_notify(%s, %s)", pairs[0])
        channels = [c for c, _ in pairs]
        payloads = [p for _, p in pairs]
        return self._pool.runOperation(
            "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
            (channels, payloads),
        )


def fired(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A new Deferred that fires (with None, never failing) once C{d} has fired; C{d}'s own
    callback chain is left as it was."""
    out: defer.Deferred[None] = defer.Deferred()

    def passthrough(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(passthrough)
    return out


def within(d: defer.Deferred[Any], seconds: float, reactor: Any) -> defer.Deferred[Any]:
    """
    C{d}'s result, or a C{TimeoutError} after C{seconds} -- without cancelling C{d}.  Cancelling a
    txpostgres query calls psycopg2's C{cancel()}, which blocks while it connects to the server
    and leaves the query's Deferred unfired: a stuck query is abandoned instead, with its
    connection.
    """
    out: defer.Deferred[Any] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(defer.TimeoutError(f"no answer within {seconds:g} s"))

    timer = reactor.callLater(seconds, expire)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(settle)
    return out


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _connection_trouble(exc: BaseException) -> bool:
    """Errors that mean "the database is away", worth waiting out, unlike a refused statement."""
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError, ConnectionDead,
                            defer.CancelledError))


class Outbox:
    """
    One socket's messages on their way to PostgreSQL: a FIFO sent one batch at a time, so order
    is kept over a pool of connections, and batched, so a fast writer costs one statement per
    round trip rather than one per message.

    While the database is away, messages wait here (and the batch in flight is sent again: a
    message may then reach PostgreSQL twice, never zero times) up to C{max_queued} messages;
    past that C{on_overflow(count)} is called and the queue is dropped.  A statement PostgreSQL
    refuses calls C{on_error(reason)}.  C{pause}/C{resume} are called when many messages wait
    while the database is up, so that a flooding client is slowed down at its socket.
    """

    HIGH_WATER = 256
    LOW_WATER = 64

    def __init__(
        self,
        pool: NotifyPool,
        on_error: Callable[[str], None],
        reactor: Any = None,
        max_queued: int = 1000,
        on_overflow: Callable[[int], None] | None = None,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._pool = pool
        self._on_error = on_error
        self._reactor = reactor
        self._max_queued = max_queued
        self._on_overflow = on_overflow
        self._pause, self._resume = pause, resume
        self._paused = False
        self._pending: collections.deque[list[Pair]] = collections.deque()  # one list per message
        self._running = False
        self._closed = False
        self._idle: list[defer.Deferred[None]] = []
        self.away = False  # the last attempt failed for want of a database
        self.sent = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, pairs: Sequence[Pair]) -> None:
        """Queue one message's notifications (sent together, in order)."""
        if self._closed:
            return
        # The same pair twice in one transaction is folded by PostgreSQL: it is one NOTIFY.
        self._pending.append(list(dict.fromkeys(pairs)))
        if self.away and len(self._pending) > self._max_queued:
            self._overflow()
            return
        if (not self.away and not self._paused and self._pause is not None
                and len(self._pending) > self.HIGH_WATER):
            self._paused = True
            self._pause()
        if not self._running:
            self._running = True
            d = defer.Deferred.fromCoroutine(self._run())
            d.addErrback(lambda f: _log.failure("outbox failed", f))

    def _overflow(self) -> None:
        count = len(self._pending)
        self._pending.clear()
        self._closed = True
        if self._on_overflow is not None:
            self._on_overflow(count)

    def close(self) -> None:
        """Accept nothing more; what is queued is still sent."""
        self._closed = True

    def flushed(self) -> defer.Deferred[None]:
        """Fires once everything put so far has been sent (or given up on)."""
        if not self._running:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def _take_batch(self) -> list[list[Pair]]:
        batch: list[list[Pair]] = []
        seen: set[Pair] = set()
        size = 0
        pending = self._pending
        while pending and size < MAX_BATCH:
            message = pending[0]
            if batch and not seen.isdisjoint(message):
                break  # PostgreSQL would fold the repeat: it goes in the next statement
            seen.update(message)
            size += len(message)
            batch.append(pending.popleft())
        return batch

    async def _run(self) -> None:
        delays = backoff_delays(first=0.25, cap=5.0)
        try:
            while self._pending:
                batch = self._take_batch()
                try:
                    await self._pool.notify([pair for message in batch for pair in message])
                except Exception as e:
                    if _connection_trouble(e):
                        self._pending.extendleft(reversed(batch))  # kept, in order
                        if not self.away:
                            self.away = True
                            self._release()
                            _log.warn("database unavailable ({why}); keeping {n} messages",
                                      why=describe_error(e), n=len(self._pending))
                        if len(self._pending) > self._max_queued:
                            self._overflow()
                            return
                        await deferLater(self._reactor, next(delays), lambda: None)
                        continue
                    lost = len(batch) + len(self._pending)
                    self._pending.clear()
                    self._on_error(f"database error, {plural(lost, 'message')} not sent: "
                                   f"{describe_error(e)}")
                    return
                if self.away:
                    self.away = False
                    delays = backoff_delays(first=0.25, cap=5.0)
                    _log.info("database back: sending queued messages")
                self.sent += len(batch)
                if self._paused and len(self._pending) < self.LOW_WATER:
                    self._release()
        finally:
            self._running = False
            self._release()
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _release(self) -> None:
        if self._paused:
            self._paused = False
            if self._resume is not None:
                self._resume()
