"""
The NOTIFY pool: C{db-pool} connections that run C{pg_notify}, each statement its own
transaction, reconnecting by themselves when their link dies.

A lost txpostgres connection stays dead unless it has a C{DeadConnectionDetector}, and a failed
first connect is retried only if its errback is handed to the detector: every pool connection has
one, and L{NotifyPool.start} hands it the first connect's errback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from txpostgres import retrying
from txpostgres.reconnection import DeadConnectionDetector
from txpostgres.txpostgres import ConnectionPool

from pgws._postgres import QuietConnection, close_quietly, connect_kwargs, describe_error

__all__ = ["NotifyPool", "Pair"]

_log = Logger()

Pair = tuple[str, str]  # (database channel, payload)


def _pool_backoff() -> Any:
    """Pool connections retry at once, then 1, 2, 4, 5, 5 ... s: queued messages are waiting."""
    return retrying.simpleBackoffIterator(
        initialDelay=1.0, maxDelay=5.0, factor=2.0, maxRetries=0, now=True
    )


class _PoolConnection(QuietConnection):
    """A pool connection that reconnects by itself when its link dies."""

    prefix = "NOTIFY pool"

    def __init__(self, reactor: Any, cooperator: Any = None) -> None:
        detector = DeadConnectionDetector(reconnectionIterator=_pool_backoff, reactor=reactor)
        super().__init__(reactor=reactor, cooperator=cooperator, detector=detector)


class NotifyPool:
    """C{db-pool} connections that run C{pg_notify}; each statement is its own transaction."""

    def __init__(self, reactor: Any, dsn: str, size: int, application_name: str,
                 journal: tuple[str, Callable[[str], bool]] | None = None) -> None:
        """
        @param journal: (schema, which channels are journaled) when the journal is on: their
            messages then go through C{<schema>.relay}, in the same statement as the others.
        """
        self._dsn = dsn
        self._journal = journal
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
            close_quietly(conn)

    def check(self) -> defer.Deferred[Any]:
        """A cheap statement through the pool: does sending work right now?"""
        d: defer.Deferred[Any] = self._pool.runQuery("SELECT 1")
        return d

    def run_query(self, sql: str, args: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]:
        d: defer.Deferred[list[tuple[Any, ...]]] = self._pool.runQuery(sql, args)
        return d

    def run_transaction(self, statements: list[str]) -> defer.Deferred[None]:
        """The statements in one transaction, in order."""

        async def run(cursor: Any) -> None:
            for sql in statements:
                await cursor.execute(sql)

        def interaction(cursor: Any) -> defer.Deferred[None]:
            return defer.Deferred.fromCoroutine(run(cursor))

        d: defer.Deferred[None] = self._pool.runInteraction(interaction)
        return d

    def notify(self, pairs: Sequence[Pair]) -> defer.Deferred[None]:
        """One transaction that notifies (or journals) every pair, in order."""
        d: defer.Deferred[None]
        if self._journal is not None:
            schema, journaled = self._journal
            flags = [journaled(channel) for channel, _ in pairs]
            if any(flags):
                d = self._pool.runOperation(
                    f"SELECT {schema}.relay(%s::text[], %s::text[], %s::boolean[])",
                    ([c for c, _ in pairs], [p for _, p in pairs], flags))
                return d
        if len(pairs) == 1:
            d = self._pool.runOperation("SELECT pg_notify(%s, %s)", pairs[0])
            return d
        channels = [c for c, _ in pairs]
        payloads = [p for _, p in pairs]
        d = self._pool.runOperation(
            "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
            (channels, payloads),
        )
        return d
