"""
The fan-out: notifications from the LISTEN session, in PostgreSQL's order, to the readers of
their channel, in bounded slices.

One read of the LISTEN socket can bring hundreds of notifications, and fanning all of them out to
a thousand sockets at once blocked the reactor for seconds.  So the backlog is worked through in
slices of bounded work (deliveries and bytes), yielding to the reactor between slices, and the
LISTEN socket is not read while the backlog is long.  Consecutive notifications of one channel go
out together (a "run"): each reader gets them in one write.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pgws._listener import Notification, Reading
from pgws._routing import PerChannelRouting, Routing

__all__ = ["Fanout", "Readers"]

_log = Logger()

# Work through at most this many deliveries (notification x reader) per reactor turn.
DELIVERIES_PER_SLICE = 20_000
# ... and at most about this many bytes of frames (the default; see Fanout's slice_bytes), so that
# what one turn hands to the transports, which only flush between turns, stays bounded.
BYTES_PER_SLICE = 2 * 1024 * 1024
# Consecutive notifications of one channel are written together, up to this many / bytes (and at
# most half of a slice's bytes).
MAX_RUN = 256
MAX_RUN_BYTES = 64 * 1024
# Stop reading the LISTEN socket while this many notifications wait to be fanned out.
BACKLOG_PAUSE = 5_000
# A frame's header: what one delivery costs beyond its payload, for the byte budget.
FRAME_OVERHEAD = 10


class Readers(Protocol):
    """The channel registry, as the fan-out sees it."""

    def deliver(self, channel: str, payloads: list[bytes]) -> int:
        """Write a run of one channel's notifications to its readers; how many readers got it."""


class Journaled(Protocol):
    """The journal, as the fan-out sees it (see L{pgws._journal})."""

    wake_channel: str

    def woken(self, payloads: list[str]) -> None:
        """Wake-ups (each the name of a channel with new rows) arrived on L{wake_channel}."""

    def deliver(self, channel: str, rows: list[tuple[int, str]]) -> int:
        """Write a run of one channel's journaled messages (seq, payload) to its readers."""


Deliver = Callable[[str, list[str]], int]
# A backlog entry: (channel, payload, seq); seq is 0 for a plain notification, else the journaled
# message's number in its channel.
Entry = tuple[str, str, int]


class Fanout:
    """
    Takes batches from the LISTEN session (a L{pgws._listener.Sink}) and hands runs of one
    database channel's notifications, routed to pgws channels, to the readers.

    @param slice_bytes: bytes of frames one reactor turn may write at most (about); the relay
        keeps it under what one reader may have pending, so that a prompt reader is never taken
        for a slow one after a burst.
    """

    def __init__(self, reactor: IReactorTime, readers: Readers, routing: Routing | None = None,
                 slice_bytes: int = BYTES_PER_SLICE, journal: Journaled | None = None) -> None:
        self._reactor = reactor
        self._slice_bytes = slice_bytes
        # A run is one write to each reader: at most half a slice, so that even a reader behind
        # TLS (whose writes wait for the next turn) is never far over its limit after one turn.
        self._run_bytes = min(MAX_RUN_BYTES, slice_bytes // 2)
        self._deliver = _deliver_function(readers, routing or PerChannelRouting(), journal)
        self._deliver_rows = journal.deliver if journal is not None else None
        self._backlog: collections.deque[Entry] = collections.deque()
        self._row_bytes = 0  # payload bytes of the journaled rows waiting
        self._draining = False
        self._paused = False
        self._reading: Reading | None = None

    def attach(self, reading: Reading) -> None:
        self._reading = reading

    def busy(self) -> bool:
        return bool(self._backlog)

    def received(self, notifications: list[Notification]) -> None:
        self._backlog.extend([(channel, payload, 0) for channel, payload in notifications])
        if not self._draining:
            self._drain()

    def received_rows(self, channel: str, rows: list[tuple[int, str]]) -> None:
        """Journaled messages of C{channel}, read from the journal, in order."""
        self._backlog.extend([(channel, payload, seq) for seq, payload in rows])
        self._row_bytes += sum(len(payload) for _, payload in rows)
        if not self._draining:
            self._drain()

    def waiting(self) -> tuple[int, int]:
        """
        Entries waiting to be fanned out, and the payload bytes of the journaled ones among
        them: the journal reads no more while either is large.
        """
        return len(self._backlog), self._row_bytes

    def _drain(self) -> None:
        """Fan out the backlog in slices of bounded work, yielding to the reactor between."""
        self._draining = True
        budget, byte_budget = DELIVERIES_PER_SLICE, self._slice_bytes
        backlog, deliver = self._backlog, self._deliver
        while backlog and budget > 0 and byte_budget > 0:
            try:
                if backlog[0][2]:
                    channel, rows, size = self._take_rows()
                    assert self._deliver_rows is not None
                    readers, count = self._deliver_rows(channel, rows), len(rows)
                else:
                    channel, run, size = self._take_run()
                    readers, count = deliver(channel, run), len(run)
            except Exception:
                # A bug met by one run must not stop the fan-out for everyone after it.
                _log.failure("fan-out of a run of notifications failed")
                continue
            budget -= count * (1 + readers)
            byte_budget -= readers * (size + FRAME_OVERHEAD * count)
        if backlog:
            if len(backlog) >= BACKLOG_PAUSE and self._reading is not None:
                # Every slice: the session may have a new connection since the last one.
                self._paused = True
                self._reading.pause_reading()
            self._reactor.callLater(0, self._drain)
        else:
            self._draining = False
            if self._paused and self._reading is not None:
                self._paused = False
                self._reading.resume_reading()

    def _take_run(self) -> tuple[str, list[str], int]:
        """The next plain notifications of one channel: (channel, payloads, their size)."""
        backlog = self._backlog
        channel, payload, _ = backlog.popleft()
        run, size = [payload], len(payload)
        while (backlog and backlog[0][0] == channel and not backlog[0][2] and len(run) < MAX_RUN
               and size + len(backlog[0][1]) <= self._run_bytes):
            payload = backlog.popleft()[1]
            run.append(payload)
            size += len(payload)
        return channel, run, size

    def _take_rows(self) -> tuple[str, list[tuple[int, str]], int]:
        """The next journaled messages of one channel: (channel, rows, their size)."""
        backlog = self._backlog
        channel, payload, seq = backlog.popleft()
        rows, size = [(seq, payload)], len(payload)
        while (backlog and backlog[0][0] == channel and backlog[0][2] and len(rows) < MAX_RUN
               and size + len(backlog[0][1]) <= self._run_bytes):
            _, payload, seq = backlog.popleft()
            rows.append((seq, payload))
            size += len(payload)
        self._row_bytes -= size
        return channel, rows, size


def _deliver_function(readers: Readers, routing: Routing, journal: Journaled | None) -> Deliver:
    """
    What the fan-out calls with each run of consecutive notifications of one database channel;
    it returns how many readers got them.  The journal's wake-ups go to the journal.
    """
    deliver, route = readers.deliver, routing.route
    if journal is not None:
        wake, woken = journal.wake_channel, journal.woken

        def waking(channel: str, payloads: list[str]) -> int:
            if channel == wake:
                woken(payloads)
                return 0
            return deliver(channel, [p.encode() for p in payloads])

        return waking
    if isinstance(routing, PerChannelRouting):  # the hot path: no routing step
        return lambda channel, payloads: deliver(channel, [p.encode() for p in payloads])

    def routed(db_channel: str, payloads: list[str]) -> int:
        # Consecutive notifications routed to the same channel still go out together.
        readers, current = 0, ""
        run: list[bytes] = []
        for payload in payloads:
            target = route(db_channel, payload)
            if target != current and run:
                readers = max(readers, deliver(current, run))
                run = []
            current = target
            run.append(payload.encode())
        if run:
            readers = max(readers, deliver(current, run))
        return readers

    return routed
