"""
The relay as a Twisted service: it owns the LISTEN session, the NOTIFY pool, the channel registry
and the WebSocket factory, and hands out the resource to mount.  This is what a program that
embeds pgws uses; C{twistd -n pgws} uses it through L{pgws._tap}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pgws._auth import Authorizer, TokenVerifier
from pgws._channels import ChannelRegistry, ListenTarget
from pgws._closing import CLOSE_GOING_AWAY
from pgws._config import Config
from pgws._factory import RelayFactory
from pgws._fanout import Fanout
from pgws._journal import Following, Journal, matcher
from pgws._listener import ConnectionFactory, ListenConnection, Listener
from pgws._metrics import Metrics
from pgws._notifypool import NotifyPool
from pgws._outbox import Sender
from pgws._postgres import describe_dsn, describe_error
from pgws._presence import Presence, PresenceTap, SqlStore, Store
from pgws._reactor import default_reactor, fire_and_log, fired, within
from pgws._reload import KEYS, LOGGING, RELOADED, changed_settings, keeping
from pgws._routing import ListenChannelRouting, PerChannelRouting, Routing
from pgws._tally import MeteredSender
from pgws._web import RelayResource

__all__ = ["Relay"]

_log = Logger()


class Relay(service.Service):
    """
    One relay per process: the process holds exactly one LISTEN session.  The relay only wires
    the parts together (see the README's "How the code is laid out") and starts and stops them.

    @param db_uri: overrides C{config.db_uri} (the embedded server's URI is only known later).
    @param https_policy: how HTTPS servers are trusted when fetching C{jwt-jwks-url} (a Twisted
        C{IPolicyForHTTPS}; the default trusts the system's certificate authorities).
    @param ping_interval: seconds between the server's pings; a peer that has not answered one
        within C{ping_timeout} seconds is dropped.
    @param pool: what sends client messages (default: a L{NotifyPool} of C{db-pool} connections).
    @param listen_connection: makes the LISTEN session's connections (default: txpostgres).
        The in-memory tests pass both, to run the whole relay without a database.
    @param presence_store: presence's tables (default: L{SqlStore} over the NOTIFY pool).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        db_uri: str | None = None,
        ping_interval: float = 30,
        ping_timeout: float = 10,
        https_policy: Any = None,
        *,
        pool: Sender | None = None,
        listen_connection: ConnectionFactory = ListenConnection,
        presence_store: Store | None = None,
    ) -> None:
        reactor = default_reactor(reactor)
        self.config = config
        self._reactor = reactor
        self._clock = clock
        self._https_policy = https_policy
        self.db_uri = db_uri or config.db_uri
        if self.db_uri == "embedded":
            raise ValueError("start the embedded PostgreSQL first and pass its URI as db_uri")
        self.routing: Routing = (
            ListenChannelRouting(config.listen_channel) if config.listen_channel
            else PerChannelRouting()
        )
        journaled = matcher(config.journal_channels) if config.journal else None
        notify_pool = NotifyPool(
            reactor, self.db_uri, config.db_pool, config.application_name,
            journal=(config.journal_schema, journaled) if journaled else None)
        # Every client message's statement is timed and counted here (see pgws._metrics).
        self.pool: Sender = MeteredSender(pool or notify_pool, reactor)
        self.journal: Journal | None = None
        if journaled is not None:
            self.journal = Journal(reactor, notify_pool, config.journal_schema, journaled,
                                   config.journal_max_payload, config.journal_retention_seconds,
                                   config.journal_retention_count,
                                   # Under the slow-reader cut-off (max-pending-bytes), with
                                   # room for the read in flight.
                                   pace_bytes=config.max_pending_bytes // 2)
        self.listener = Listener(
            reactor,
            self.db_uri,
            check_interval=config.check_listener_interval / 1000,
            # postgres-websockets gives up after `retries`; pgws's own mode keeps trying.
            max_attempts=config.retries if config.listen_channel else 0,
            gave_up=self._gave_up,
            recovered=self._recovered,
            application_name=config.application_name,
            connection_factory=listen_connection,
        )
        # database -> sockets: listener -> fan-out -> registry -> each socket's frame writer;
        # with the journal: listener (wake-ups) -> journal (rows) -> fan-out -> registry.
        target: ListenTarget = self.listener
        if self.journal is not None:
            target = Following(self.listener, self.journal)
        self.registry = ChannelRegistry(target, self.routing)
        self.fanout = Fanout(reactor, self.registry, self.routing,
                             # A turn writes at most 2x what one reader may have pending, under
                             # the 4x that cuts a reader off at once: a prompt reader is never
                             # taken for a slow one after a burst.
                             slice_bytes=2 * config.max_pending_bytes, journal=self.journal)
        self.presence: Presence | None = None
        if config.presence:
            self.presence = Presence(
                reactor, presence_store or SqlStore(notify_pool, config.journal_schema),
                config.journal_schema, config.presence_claim, config.application_name)
            self.presence.listen_on(self.listener)
        # Presence's announcements are taken out before the fan-out, in either routing mode.
        self.listener.deliver_to(self.fanout if self.presence is None
                                 else PresenceTap(self.fanout, self.presence))
        if self.journal is not None:
            self.journal.deliver_to(self.registry, self.fanout)
        verifier = TokenVerifier.from_config(config, reactor=reactor, clock=clock,
                                             https_policy=https_policy)
        # sockets -> database: protocol -> session -> outbox -> pool.
        self.factory = RelayFactory(
            config,
            authorizer=Authorizer(verifier, config.max_channels, config.meta_channel),
            registry=self.registry,
            pool=self.pool,
            reactor=reactor,
            routing=self.routing,
            clock=clock,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            database_ready=self._database_ready,
            journal=self.journal,
            presence=self.presence,
        )
        self.metrics: Metrics | None = None
        if config.metrics:
            self.metrics = Metrics(self, reactor, config.metrics_channel_labels)
        self._started: defer.Deferred[None] | None = None
        self._stopped: defer.Deferred[None] | None = None
        self.exit_status = 0

    def reload(self, config: Config) -> list[str]:
        """
        Apply a re-read configuration to what comes next, every socket staying open: the keys
        and limits that L{pgws._reload} lists (C{log-*} are twistd's: see L{pgws._logs}).  An
        open socket keeps its grant until its token's C{exp}; a refresh is checked anew.

        @return: the changed settings that need a restart: they keep their running values, the
            rest applies.
        @raise ConfigError: the new keys cannot be used; nothing changed.
        """
        changed = [k for k in changed_settings(self.config, config) if k not in LOGGING]
        refused = [k for k in changed if k not in RELOADED]
        config = keeping(config, self.config, refused)
        authorizer = self.factory.authorizer
        verifier = authorizer.verifier
        if any(k in KEYS for k in changed):
            verifier = TokenVerifier.from_config(config, self._reactor, self._clock,
                                                 self._https_policy, remote=verifier.remote)
        authorizer.use(verifier, config.max_channels)
        self.factory.reconfigure(config)
        self.config = config
        if refused:
            _log.warn("Configuration reloaded without {keys}: changing them needs a restart",
                      keys=", ".join(refused))
        applied = [k for k in changed if k not in refused]
        _log.info("Configuration reloaded: {what}",
                  what=", ".join(applied) + " changed" if applied else "no relay setting changed")
        return refused

    def _database_ready(self) -> bool:
        return self.listener.connected and (self.journal is None or self.journal.migrated) and (
            self.presence is None or self.presence.migrated)

    def _recovered(self) -> None:
        """The LISTEN session is back after a loss."""
        if self.journal is not None:
            self.journal.recovered()  # journaled channels read what they missed
        if self.presence is not None:
            self.presence.recovered()  # sockets that asked get a fresh answer
        self.factory.tell_gap()  # plain ones cannot: they are told

    def _journal_unusable(self, why: str) -> None:
        self._schema_unusable("The journal", why)

    def _presence_unusable(self, why: str) -> None:
        self._schema_unusable("Presence", why)

    def _schema_unusable(self, feature: str, why: str) -> None:
        if self.exit_status:
            return  # the other feature of the schema said so already
        _log.critical("{feature} cannot be used: {why}", feature=feature, why=why)
        self.exit_status = 1
        if self._reactor.running:
            self._reactor.stop()

    def _gave_up(self, why: str) -> None:
        """Start-up retries exhausted: exit non-zero so that a supervisor restarts pgws."""
        _log.critical("Giving up: the database is unreachable ({why})", why=why)
        self.exit_status = 1
        if self._reactor.running:
            self._reactor.stop()

    def resource(self) -> RelayResource:
        """
        The C{twisted.web} resource to mount: WebSockets, C{livez}/C{readyz}, C{pgws.js},
        C{metrics} (unless C{metrics = false}), and static files if configured.
        """
        metrics = (self.metrics.resource(self.config.metrics_token)
                   if self.metrics is not None else None)
        return RelayResource(self.factory, self.config.server_root, health=self, metrics=metrics)

    async def readiness(self) -> str | None:
        """None when relaying works (LISTEN session up, a pool statement answers), else why not."""
        if not self.listener.connected:
            return "the LISTEN session is not connected"
        if self.journal is not None and not self.journal.migrated:
            return "the journal schema is not ready yet"
        if self.presence is not None and not self.presence.migrated:
            return "the presence schema is not ready yet"
        try:
            await within(self.pool.check(), 2, self._reactor)
        except Exception as e:
            return f"the NOTIFY pool does not answer: {describe_error(e) or 'timed out'}"
        return None

    def startService(self) -> None:
        super().startService()
        _log.info("Relaying through PostgreSQL at {where}", where=describe_dsn(self.db_uri))
        self._started = defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self.listener.start()),
             defer.Deferred.fromCoroutine(self.pool.start())],
            consumeErrors=True,
        )
        if self.journal is not None:
            # In the background: it retries while the database is away (handshakes get 503).
            fire_and_log(self.journal.start(self._journal_unusable), "journal start")
        if self.presence is not None:
            fire_and_log(self.presence.start(self._presence_unusable), "presence start")
        if self.metrics is not None:
            self.metrics.start()  # the journal's lag, read every few seconds

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the first connection attempts are over (for tests and start-up order)."""
        return defer.succeed(None) if self._started is None else fired(self._started)

    def stopService(self) -> defer.Deferred[None]:
        """
        Graceful stop: close every socket with 1001, send what clients already sent (bounded by
        C{shutdown-timeout}), then close the database connections.
        """
        super().stopService()
        self._stopped = defer.Deferred.fromCoroutine(self._stop())
        return self._stopped  # a failure reaches the caller; whenStopped() never fails

    def whenStopped(self) -> defer.Deferred[None]:
        """Fires once a stop is over (what clients sent is flushed): the database may go then."""
        return defer.succeed(None) if self._stopped is None else fired(self._stopped)

    async def _stop(self) -> None:
        sockets = list(self.factory.sockets)
        outboxes = [s.outbox for s in sockets if s.outbox is not None]
        self.factory.close_all(CLOSE_GOING_AWAY, "server shutting down")
        self.listener.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.journal is not None:
            self.journal.stop()
        waits = [o.flushed() for o in outboxes]
        if self.presence is not None:  # this process's members leave at once
            waits.append(defer.Deferred.fromCoroutine(self.presence.stop()))
        pending = defer.DeferredList(waits, consumeErrors=True)
        pending.addTimeout(self.config.shutdown_timeout, self._reactor)
        try:
            await pending
        except defer.TimeoutError:
            left = sum(len(o) for o in outboxes)
            _log.warn("Stopping with {n} client messages not sent (shutdown-timeout)", n=left)
        self.pool.stop()
        _log.info("Relay stopped ({n} sockets closed)", n=len(sockets))
