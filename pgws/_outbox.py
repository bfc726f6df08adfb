"""
One socket's messages on their way to PostgreSQL.

A pool of several connections reorders one client's messages if each is sent as it comes: an
L{Outbox} sends one batch at a time, so each socket's messages reach PostgreSQL in order whatever
connection carries them, and batches what is pending into one statement, so a fast writer costs
one statement per round trip rather than one per message.  Identical (channel, payload) pairs in
one transaction are folded into one by PostgreSQL: a batch never holds the same pair twice.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pgws._closing import plural
from pgws._notifypool import Pair
from pgws._postgres import connection_trouble, describe_error
from pgws._reactor import backoff_delays, fire_and_log, sleep

__all__ = ["MAX_BATCH", "Outbox", "Sender", "Waiting"]

_log = Logger()

# The most messages one NOTIFY statement carries.
MAX_BATCH = 500


class Sender(Protocol):
    """The NOTIFY pool, as the outboxes and the relay see it."""

    def notify(self, pairs: Sequence[Pair]) -> defer.Deferred[None]:
        """One transaction that notifies every pair, in order."""

    async def start(self) -> None: ...

    def stop(self) -> None: ...

    def check(self) -> defer.Deferred[Any]:
        """A cheap statement: does sending work right now?"""


class Waiting:
    """
    How many client messages wait to reach PostgreSQL, across every outbox of a server: queued,
    in the statement in flight, or kept while the database is away; a closed socket's outbox
    counts until it has sent what it was given (for metrics).
    """

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages = 0


class Outbox:
    """
    A FIFO of one socket's messages, sent one batch at a time.

    While the database is away, messages wait here (and the batch in flight is sent again: a
    message may then reach PostgreSQL twice, never zero times) up to C{max_queued} messages
    (C{max-queued-messages});
    past that C{on_overflow(count)} is called and the queue is dropped.  A statement PostgreSQL
    refuses calls C{on_error(reason)}.  C{pause}/C{resume} are called when many messages wait
    while the database is up, so that a flooding client is slowed down at its socket.
    """

    HIGH_WATER = 256
    LOW_WATER = 64

    def __init__(
        self,
        pool: Sender,
        on_error: Callable[[str], None],
        reactor: IReactorTime,
        max_queued: int,
        on_overflow: Callable[[int], None] | None = None,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        waiting: Waiting | None = None,
    ) -> None:
        self._pool = pool
        self._on_error = on_error
        self._reactor = reactor
        self._max_queued = max_queued
        self._on_overflow = on_overflow
        self._pause, self._resume = pause, resume
        self._waiting = waiting or Waiting()
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
        self._waiting.messages += 1
        if self.away and len(self._pending) > self._max_queued:
            self._overflow()
            return
        if (not self.away and not self._paused and self._pause is not None
                and len(self._pending) > self.HIGH_WATER):
            self._paused = True
            self._pause()
        if not self._running:
            self._running = True
            fire_and_log(self._run(), "outbox")

    def _overflow(self) -> None:
        count = len(self._pending)
        self._pending.clear()
        self._waiting.messages -= count
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
                    if not connection_trouble(e):
                        self._refused(batch, e)
                        return
                    if not self._wait_out(batch, e):
                        return
                    await sleep(self._reactor, next(delays))
                    continue
                if self.away:
                    self.away = False
                    delays = backoff_delays(first=0.25, cap=5.0)
                    _log.info("database back: sending queued messages")
                self.sent += len(batch)
                self._waiting.messages -= len(batch)
                if self._paused and len(self._pending) < self.LOW_WATER:
                    self._release()
        finally:
            self._running = False
            self._release()
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _wait_out(self, batch: list[list[Pair]], error: Exception) -> bool:
        """The database is away: keep the batch, in order; False once too much waits."""
        self._pending.extendleft(reversed(batch))
        if not self.away:
            self.away = True
            self._release()
            _log.warn("database unavailable ({why}); keeping {n} messages",
                      why=describe_error(error), n=len(self._pending))
        if len(self._pending) > self._max_queued:
            self._overflow()
            return False
        return True

    def _refused(self, batch: list[list[Pair]], error: Exception) -> None:
        """PostgreSQL refused the statement: what waits would meet the same fate."""
        lost = len(batch) + len(self._pending)
        self._pending.clear()
        self._waiting.messages -= lost
        self._on_error(f"database error, {plural(lost, 'message')} not sent: "
                       f"{describe_error(error)}")

    def _release(self) -> None:
        if self._paused:
            self._paused = False
            if self._resume is not None:
                self._resume()
