"""
What the relay counts as it works: plain integers, kept by the part that does the work and read
only when something asks (a C{/metrics} scrape, see L{pgws._metrics}).  Nothing here knows about
Prometheus, and counting costs an addition or two per event: the fan-out counts once per run of
notifications, never once per reader.

L{SocketTally} is kept by the WebSocket factory, L{MeteredSender} wraps the NOTIFY pool; the
channel registry, the listener and the journal keep their own counters as attributes.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from pgws._outbox import Sender

__all__ = ["NOTIFY_BUCKETS", "MeteredSender", "SocketTally", "close_class", "refusal_class"]


def refusal_class(status: int, reason: str) -> str:
    """
    A handshake refusal's reason, as one of a few fixed words (a label value must not carry
    user input, and one time series per distinct reason text would be unbounded).
    """
    if status == 401:
        if reason.startswith("no JWT"):
            return "missing_token"
        if reason == "JWT expired":
            return "expired_token"
        if reason.startswith("JWT keys are not available"):
            return "keys_unavailable"
        return "invalid_token"
    if status == 403:
        return "origin" if reason.startswith("origin ") else "forbidden"
    if status == 503:
        if "shutting down" in reason:
            return "shutting_down"
        if "connections" in reason:
            return "max_connections"
        return "database_unavailable"
    if status == 400:
        return "client_left" if "client left" in reason else "bad_request"
    return "other"


class SocketTally:
    """
    The WebSockets' counts: opened (by mode), refused (by status and L{refusal_class}), closed
    (by code and by which side), and the messages clients sent.
    """

    __slots__ = ("opened", "refused", "closes", "text_messages", "control_messages")

    def __init__(self) -> None:
        self.opened: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[tuple[int, str]] = collections.Counter()
        self.closes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.text_messages = 0
        self.control_messages = 0

    def refusal(self, status: int, reason: str) -> None:
        self.refused[(status, refusal_class(status, reason))] += 1

    def closed(self, code: int, by: str) -> None:
        self.closes[(close_class(code) if by == "client" else str(code), by)] += 1


def close_class(code: int) -> str:
    """
    A client's close code as a label value: the codes RFC 6455 and IANA define stay themselves,
    the application ranges are folded (a client may send any of 2000 codes: one time series
    each would be unbounded).
    """
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


# Upper bounds (seconds) of the NOTIFY statement latency histogram: a statement on loopback takes
# a fraction of a millisecond, one waiting for a pool connection or a busy server much longer.
NOTIFY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)


class MeteredSender:
    """
    The NOTIFY pool with a tally of what goes through it: statements (each one batch of client
    messages, with their audit and meta copies), the notifications they carried, how long each
    took from being handed to the pool to PostgreSQL's answer, and the statements that failed.
    """

    def __init__(self, pool: Sender, reactor: IReactorTime) -> None:
        self.pool = pool
        self._reactor = reactor
        self.notifications = 0  # pairs notified by statements that succeeded
        self.failures = 0
        self.bucket_counts = [0] * (len(NOTIFY_BUCKETS) + 1)  # the last: over every bound
        self.seconds = 0.0  # the sum of the latencies of statements that succeeded

    @property
    def batches(self) -> int:
        return sum(self.bucket_counts)

    def notify(self, pairs: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        began = self._reactor.seconds()
        d = self.pool.notify(pairs)
        count = len(pairs)

        def sent(result: None) -> None:
            took = max(0.0, self._reactor.seconds() - began)  # a wall clock may step back
            self.bucket_counts[bisect.bisect_left(NOTIFY_BUCKETS, took)] += 1
            self.seconds += took
            self.notifications += count
            return result

        def failed(failure: Any) -> Any:
            self.failures += 1
            return failure

        d.addCallbacks(sent, failed)
        return d

    async def start(self) -> None:
        await self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def check(self) -> defer.Deferred[Any]:
        return self.pool.check()
