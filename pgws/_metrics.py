"""
Prometheus metrics at C{GET /metrics} (C{metrics = true}, the default).

The counters are the relay's own plain integers (L{pgws._tally}, the registry's, the listener's,
the journal's), read only when a scrape asks: the hot paths pay an addition, never a lock or a
label lookup.  The journal's lag, the one figure that needs a query, is read every
L{LAG_REFRESH_SECONDS} by L{Metrics.start}'s loop: a scrape never reaches the database.  A
scrape is answered in the reactor thread with prometheus_client's text exposition (or
OpenMetrics when the scraper asks for it); prometheus_client's own Twisted resource would run a
WSGI app in the thread pool for what takes microseconds here.  Each relay
has its own C{CollectorRegistry} (L{Metrics.registry}): a program that embeds pgws can scrape it
or register its collector elsewhere.

Labels never carry a channel name or a claim unless C{metrics-channel-labels} says so (one time
series per channel: for a few fixed channels only).  With C{metrics-token} set, a scrape needs
C{Authorization: Bearer <token>}; any other answer is 401 with C{WWW-Authenticate}.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import resource, server

from pgws._channels import ChannelRegistry
from pgws._fanout import Fanout
from pgws._getonly import GetOnlyResource
from pgws._journal import Journal
from pgws._listener import Listener
from pgws._outbox import Waiting
from pgws._reactor import within
from pgws._tally import NOTIFY_BUCKETS, MeteredSender, SocketTally

__all__ = ["Metrics"]

_log = Logger()

MODES = ("r", "w", "rw")
# The journal's lag is read this often (one query), not at each scrape: an unauthenticated
# scrape must not cost the database anything, however often it comes.
LAG_REFRESH_SECONDS = 5.0
# A refresh waits this long at most for the journal's heads; without them the lag is left out.
LAG_QUERY_SECONDS = 2.0


class _Factory(Protocol):
    @property
    def sockets(self) -> set[Any]:
        """Open sockets: each has C{grant} and C{outbox} (None, or len() messages waiting)."""

    @property
    def tally(self) -> SocketTally: ...

    @property
    def waiting(self) -> Waiting: ...


class Parts(Protocol):
    """What the metrics read of a relay (L{pgws.Relay} has all of it)."""

    @property
    def factory(self) -> _Factory: ...

    @property
    def registry(self) -> ChannelRegistry: ...

    @property
    def listener(self) -> Listener: ...

    @property
    def fanout(self) -> Fanout: ...

    @property
    def pool(self) -> Any:
        """The NOTIFY pool: a L{MeteredSender} has figures."""

    @property
    def journal(self) -> Journal | None: ...


class RelayCollector(Collector):
    """The relay's figures as metric families, read from its parts at each scrape."""

    def __init__(self, parts: Parts, channel_labels: bool) -> None:
        self._parts = parts
        self._channel_labels = channel_labels
        self.journal_lag: dict[str, int] | None = None  # as of the last refresh (None: unknown)

    def collect(self) -> Iterator[Metric]:
        parts = self._parts
        yield from self._sockets(parts.factory)
        yield from self._channels(parts.registry)
        yield from self._listener(parts.listener)
        backlog, _ = parts.fanout.waiting()
        yield GaugeMetricFamily("pgws_fanout_backlog_messages",
                                "Notifications and journaled messages waiting to be fanned out.",
                                value=backlog)
        yield CounterMetricFamily("pgws_fanout_frames", "WebSocket frames written to readers.",
                                  value=parts.registry.frames_sent)
        yield CounterMetricFamily("pgws_fanout_bytes",
                                  "Bytes of WebSocket frames written to readers.",
                                  value=parts.registry.bytes_sent)
        if isinstance(parts.pool, MeteredSender):
            yield from self._notify(parts.pool)
        if parts.journal is not None:
            yield from self._journal(parts.journal)

    def _sockets(self, factory: _Factory) -> Iterator[Metric]:
        tally = factory.tally
        open_by_mode = dict.fromkeys(MODES, 0)
        for socket in list(factory.sockets):
            grant = socket.grant
            if grant is not None:
                open_by_mode[grant.mode] = open_by_mode.get(grant.mode, 0) + 1
        gauge = GaugeMetricFamily("pgws_websockets_open", "Open WebSockets, by mode.",
                                  labels=["mode"])
        opened = CounterMetricFamily("pgws_websockets_opened", "WebSockets opened, by mode.",
                                     labels=["mode"])
        for mode, count in open_by_mode.items():
            gauge.add_metric([mode], count)
            opened.add_metric([mode], tally.opened[mode])
        yield gauge
        yield opened
        yield _counted("pgws_handshakes_refused",
                       "WebSocket handshakes refused, by HTTP status and reason.",
                       ["status", "reason"], tally.refused)
        yield _counted("pgws_websockets_closed",
                       "Open WebSockets closed, by the code of the side that began the close "
                       "(server, client); a client's 3000-4999 as 3xxx, 4xxx.", ["code", "by"],
                       tally.closes)
        messages = CounterMetricFamily(
            "pgws_client_messages_received",
            "Messages received from clients: text (to relay) or control (binary).",
            labels=["kind"])
        messages.add_metric(["text"], tally.text_messages)
        messages.add_metric(["control"], tally.control_messages)
        yield messages
        yield GaugeMetricFamily(
            "pgws_outbox_messages",
            "Client messages not yet in PostgreSQL: queued, in the statement in flight, or kept "
            "while the database is away (closed sockets' included until sent).",
            value=factory.waiting.messages)

    def _channels(self, registry: ChannelRegistry) -> Iterator[Metric]:
        counts = registry.reader_counts()
        yield GaugeMetricFamily("pgws_channels_read", "Channels with at least one reader.",
                                value=len(counts))
        yield GaugeMetricFamily("pgws_channels_listened",
                                "Database channels LISTENed for readers.",
                                value=registry.database_channels)
        if self._channel_labels:
            readers = GaugeMetricFamily("pgws_channel_readers", "Readers of each channel.",
                                        labels=["channel"])
            for channel, count in sorted(counts.items()):
                readers.add_metric([channel], count)
            yield readers

    @staticmethod
    def _listener(listener: Listener) -> Iterator[Metric]:
        yield GaugeMetricFamily("pgws_listener_up", "1 while the LISTEN session is connected.",
                                value=1 if listener.connected else 0)
        yield CounterMetricFamily("pgws_notifications_received",
                                  "Notifications received by the LISTEN session (the journal's "
                                  "wake-ups and presence's announcements included).",
                                  value=listener.notifications)
        yield CounterMetricFamily("pgws_listener_losses", "Times the LISTEN session was lost.",
                                  value=listener.losses)
        yield CounterMetricFamily("pgws_listener_reconnects",
                                  "Times the LISTEN session was made again after a loss.",
                                  value=max(0, listener.sessions - 1))

    @staticmethod
    def _notify(pool: MeteredSender) -> Iterator[Metric]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(NOTIFY_BUCKETS, pool.bucket_counts[:-1], strict=True):
            total += count
            buckets.append((repr(bound), total))
        buckets.append(("+Inf", pool.batches))
        yield HistogramMetricFamily(
            "pgws_notify_duration_seconds",
            "Time of each NOTIFY statement (one batch of client messages), from the pool to "
            "PostgreSQL's answer.", buckets=buckets, sum_value=pool.seconds)
        yield CounterMetricFamily("pgws_notify_messages",
                                  "Notifications sent by NOTIFY statements that succeeded.",
                                  value=pool.notifications)
        yield CounterMetricFamily("pgws_notify_failures", "NOTIFY statements that failed.",
                                  value=pool.failures)

    def _journal(self, journal: Journal) -> Iterator[Metric]:
        yield CounterMetricFamily("pgws_journal_messages_read",
                                  "Journaled messages read for the live readers.",
                                  value=journal.rows_read)
        yield CounterMetricFamily("pgws_journal_messages_replayed",
                                  "Journaled messages replayed to readers that resumed or asked "
                                  "for history (not in pgws_fanout_frames_total).",
                                  value=journal.rows_replayed)
        lag = self.journal_lag
        if lag is None:
            return  # the heads could not be read: no figure rather than a wrong one
        if self._channel_labels:
            gauge = GaugeMetricFamily(
                "pgws_journal_lag_messages",
                "Journaled messages not yet written to the live readers, by channel.",
                labels=["channel"])
            for channel, count in sorted(lag.items()):
                gauge.add_metric([channel], count)
            yield gauge
        else:
            yield GaugeMetricFamily(
                "pgws_journal_lag_messages",
                "Journaled messages not yet written to the live readers (all channels).",
                value=sum(lag.values()))


def _counted(name: str, documentation: str, labels: list[str],
             counts: Mapping[tuple[Any, ...], int]) -> CounterMetricFamily:
    """A counter family of a tally keyed by label values (only those that happened)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric([str(part) for part in key], count)
    return family


class Metrics:
    """
    A relay's metrics: L{registry} (the relay's figures, and the process's: CPU, memory, file
    descriptors, garbage collection) and the C{/metrics} resource.
    """

    def __init__(self, parts: Parts, reactor: Any, channel_labels: bool = False) -> None:
        self._parts = parts
        self._reactor = reactor
        self._refresher: LoopingCall | None = None
        self.collector = RelayCollector(parts, channel_labels)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def start(self) -> None:
        """Read what needs a query (the journal's lag) now and every L{LAG_REFRESH_SECONDS}."""
        if self._parts.journal is None or self._refresher is not None:
            return
        self._refresher = LoopingCall(lambda: Deferred.fromCoroutine(self.refresh()))
        self._refresher.clock = self._reactor
        self._refresher.start(LAG_REFRESH_SECONDS, now=True)

    def stop(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None

    async def refresh(self) -> None:
        """Read the journal's heads, for its lag (left out of scrapes when they cannot be read)."""
        journal = self._parts.journal
        if journal is None:
            return
        try:
            self.collector.journal_lag = await within(
                Deferred.fromCoroutine(journal.lag()), LAG_QUERY_SECONDS, self._reactor)
        except Exception:
            self.collector.journal_lag = None

    def resource(self, token: str | None = None) -> resource.Resource:
        return _MetricsResource(self, token)


class _MetricsResource(GetOnlyResource):
    """C{/metrics}: the registry's exposition, behind the optional bearer token."""

    def __init__(self, metrics: Metrics, token: str | None) -> None:
        super().__init__()
        self._metrics = metrics
        self._expected = token.encode() if token is not None else None

    def _authorized(self, request: server.Request) -> bool:
        if self._expected is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._expected)

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        if not self._authorized(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="pgws metrics"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics need Authorization: Bearer <metrics-token>\n"
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        try:
            body = encode(self._metrics.registry)
        except Exception:
            _log.failure("metrics scrape failed")
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics failed: see the server's log\n"
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return body
