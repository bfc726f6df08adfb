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
from collections.abc import Sequence
from typing import Any
from collections.abc import Callable

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import retrying
from txpostgres.reconnection import DeadConnectionDetector
from txpostgres.txpostgres import Connection, ConnectionPool

from pgws.channelname import quote_ident

__all__ = ["Listener", "NotifyPool", "Outbox", "describe_dsn", "connect_kwargs"]

_log = Logger()

# Work through at most this many deliveries (notification x reader) per reactor turn.
DELIVERIES_PER_SLICE = 20_000
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


def _backoff() -> Any:
    """1, 2, 4 ... 32 s between reconnection attempts, forever; the first one at once."""
    return retrying.simpleBackoffIterator(
        initialDelay=1.0, maxDelay=32.0, factor=2.0, maxRetries=0, now=True
    )


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
    """A txpostgres connection that hands notifications over in order, and can stop reading."""

    def __init__(self, reactor: Any, detector: DeadConnectionDetector,
                 sink: Callable[[list[Any]], None]) -> None:
        super().__init__(reactor=reactor, detector=detector)
        self.prefix = "LISTEN session"
        self._sink = sink
        self.paused = False

    def checkForNotifies(self) -> None:
        notifies = self._connection.notifies
        if notifies:
            batch = list(notifies)
            del notifies[:]
            self._sink(batch)

    def doRead(self) -> Any:
        lost = super().doRead()
        if self.paused and lost is None:
            self.reactor.removeReader(self)
        return lost

    def resumeReading(self) -> None:
        self.paused = False
        if self._connection is not None and not self._connection.closed and not self._cursors:
            self.reactor.addReader(self)


class Listener:
    """
    The one LISTEN session of the process.  C{listen}/C{unlisten} keep the wanted set; the
    connection is made to match it, now and after every reconnect.  Notifications go to
    C{deliver(channel, payload_bytes)} in PostgreSQL's order.
    """

    def __init__(self, reactor: Any, dsn: str, deliver: Callable[[str, bytes], int]) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._deliver = deliver
        self._wanted: set[str] = set()
        self._inflight: dict[str, defer.Deferred[None]] = {}
        self._backlog: collections.deque[tuple[str, str]] = collections.deque()
        self._draining = False
        self._detector = DeadConnectionDetector(reconnectionIterator=_backoff, reactor=reactor)
        self._detector.addRecoveryHandler(self._recovered)
        self._conn = _ListenConnection(reactor, self._detector, self._received)
        self._stopped = False
        self.connected = False

    async def start(self) -> None:
        """Connect (retrying in the background on failure) and LISTEN to every wanted channel."""
        _log.info("Connecting the LISTEN session to {where}", where=describe_dsn(self._dsn))
        try:
            await self._conn.connect(self._dsn, **connect_kwargs("pgws listener"))
        except Exception as e:
            _log.error("LISTEN session could not connect: {why}; retrying", why=describe_error(e))
            self._detector.checkForDeadConnection(Failure(e))
            return
        await self._recovered()

    def stop(self) -> None:
        self._stopped = True
        self.connected = False
        try:
            self._conn.close()
        except Exception:
            pass

    async def listening_channels(self) -> list[str]:
        """What PostgreSQL says this session LISTENs to (for tests and health checks)."""
        rows = await self._conn.runQuery("SELECT pg_listening_channels()")
        return [r[0] for r in rows]

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def _recovered(self) -> None:
        self.connected = True
        self._conn.resumeReading()
        channels = sorted(self._wanted)
        # Many channels are re-LISTENed in a few statements, not one round trip each.
        for start in range(0, len(channels), 1000):
            chunk = channels[start:start + 1000]
            await self._run("; ".join(f"LISTEN {quote_ident(c)}" for c in chunk))
        _log.info("LISTEN session ready ({n} channels)", n=len(channels))

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
        d: defer.Deferred[None] = defer.Deferred()
        if inflight is None:
            d.callback(None)
        else:
            inflight.addBoth(lambda result: (d.callback(None), result)[1])
        return d

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
            self.connected = False
            _log.warn("LISTEN session: {sql} failed: {why}", sql=sql.split(" ")[0],
                      why=describe_error(e))
            self._detector.checkForDeadConnection(Failure(e))

    # -- the notification pump ------------------------------------------------------------

    def _received(self, notifies: list[Any]) -> None:
        self._backlog.extend((n.channel, n.payload) for n in notifies)
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Fan out the backlog in slices of bounded work, yielding to the reactor between."""
        self._draining = True
        budget = DELIVERIES_PER_SLICE
        backlog, deliver = self._backlog, self._deliver
        while backlog and budget > 0:
            channel, payload = backlog.popleft()
            budget -= 1 + deliver(channel, payload.encode("utf-8"))
        if backlog:
            if len(backlog) >= BACKLOG_PAUSE:
                self._conn.paused = True
            self._reactor.callLater(0, self._drain)
        else:
            self._draining = False
            if self._conn.paused:
                self._conn.resumeReading()


class _PoolConnection(_QuietConnection):
    """A pool connection that reconnects by itself when its link dies."""

    def __init__(self, reactor: Any, cooperator: Any = None) -> None:
        detector = DeadConnectionDetector(reconnectionIterator=_backoff, reactor=reactor)
        super().__init__(reactor=reactor, cooperator=cooperator, detector=detector)
        self.prefix = "NOTIFY pool"


class NotifyPool:
    """C{db-pool} connections that run C{pg_notify}; each statement is its own transaction."""

    def __init__(self, reactor: IReactorCore | IReactorTime | Any, dsn: str, size: int) -> None:
        self._dsn = dsn
        pool_class = type("_Pool", (ConnectionPool,), {
            "connectionFactory": _PoolConnection, "reactor": reactor, "min": size})
        self._pool = pool_class(None, dsn, **connect_kwargs("pgws notify"))

    async def start(self) -> None:
        ds = []
        for conn in self._pool.connections:
            d = conn.connect(self._dsn, **connect_kwargs("pgws notify"))
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


class Outbox:
    """
    One socket's messages on their way to PostgreSQL: a FIFO sent one batch at a time, so order
    is kept over a pool of connections, and batched, so a fast writer costs one statement per
    round trip rather than one per message.
    """

    def __init__(self, pool: NotifyPool, on_error: Callable[[str], None]) -> None:
        self._pool = pool
        self._on_error = on_error
        self._pending: collections.deque[Pair] = collections.deque()
        self._running = False
        self._idle: list[defer.Deferred[None]] = []
        self.sent = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, pairs: Sequence[Pair]) -> None:
        self._pending.extend(pairs)
        if not self._running:
            self._running = True
            d = defer.Deferred.fromCoroutine(self._run())
            d.addErrback(lambda f: _log.failure("outbox failed", f))

    def flushed(self) -> defer.Deferred[None]:
        """Fires once everything put so far has been sent (or given up on)."""
        if not self._running:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def _take_batch(self) -> list[Pair]:
        batch: list[Pair] = []
        seen: set[Pair] = set()
        pending = self._pending
        while pending and len(batch) < MAX_BATCH:
            pair = pending[0]
            if pair in seen:  # PostgreSQL would fold the duplicate: send it next time
                break
            seen.add(pair)
            batch.append(pending.popleft())
        return batch

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = self._take_batch()
                try:
                    await self._pool.notify(batch)
                except Exception as e:
                    lost = len(batch) + len(self._pending)
                    self._pending.clear()
                    self._on_error(f"database error, {lost} notifications not sent: "
                                   f"{describe_error(e)}")
                    return
                self.sent += len(batch)
        finally:
            self._running = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
