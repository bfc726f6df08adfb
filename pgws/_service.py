"""
The relay as a Twisted service: it owns the LISTEN session, the NOTIFY pool, the channel registry
and the WebSocket factory, and hands out the resource to mount.  This is what a program that
embeds pgws uses; C{twistd -n pgws} uses it through L{pgws._tap}.
"""

from __future__ import annotations

import time
from typing import Any
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pgws._auth import TokenVerifier
from pgws._channels import ChannelRegistry
from pgws._config import Config
from pgws._database import Listener, NotifyPool, describe_dsn, describe_error, fired, within
from pgws._protocol import RelayFactory
from pgws._routing import ListenChannelRouting, PerChannelRouting, Routing
from pgws._web import RelayResource

__all__ = ["Relay"]

_log = Logger()


class Relay(service.Service):
    """
    One relay per process: the process holds exactly one LISTEN session.

    @param db_uri: overrides C{config.db_uri} (the embedded server's URI is only known later).
    @param https_policy: how HTTPS servers are trusted when fetching C{jwt-jwks-url} (a Twisted
        C{IPolicyForHTTPS}; the default trusts the system's certificate authorities).
    @param ping_interval: seconds between the server's pings; a peer that has not answered one
        within C{ping_timeout} seconds is dropped.
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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self._reactor = reactor
        self.db_uri = db_uri or config.db_uri
        if self.db_uri == "embedded":
            raise ValueError("start the embedded PostgreSQL first and pass its URI as db_uri")
        self.pool = NotifyPool(reactor, self.db_uri, config.db_pool, config.application_name)
        self.registry = ChannelRegistry(self)
        self.routing: Routing = (
            ListenChannelRouting(config.listen_channel) if config.listen_channel
            else PerChannelRouting()
        )
        self._db_readers: dict[str, int] = {}  # database channel -> pgws channels read on it
        self.listener = Listener(
            reactor,
            self.db_uri,
            self._deliver_function(),
            check_interval=config.check_listener_interval / 1000,
            # postgres-websockets gives up after `retries`; pgws's own mode keeps trying.
            max_attempts=config.retries if config.listen_channel else 0,
            gave_up=self._gave_up,
            recovered=lambda: self.factory.tell_gap(),
            slice_bytes=2 * config.max_pending_bytes,
            application_name=config.application_name,
        )
        self.factory = RelayFactory(
            verifier=TokenVerifier.from_config(config, reactor=reactor, clock=clock,
                                               https_policy=https_policy),
            registry=self.registry,
            pool=self.pool,
            audit_channel=config.audit_channel,
            meta_channel=config.meta_channel,
            routing=self.routing,
            reactor=reactor,
            clock=clock,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_connections=config.max_connections,
            max_channels=config.max_channels,
            max_pending_bytes=config.max_pending_bytes,
            max_queued_messages=config.max_queued_messages,
            allowed_origins=config.allowed_origins,
            database_ready=lambda: self.listener.connected,
        )
        self._started: defer.Deferred[None] | None = None
        self.exit_status = 0

    def _deliver_function(self) -> Callable[[str, list[str]], int]:
        """
        What the listener calls with each run of consecutive notifications of one database
        channel, in PostgreSQL's order; it returns how many readers got them.
        """
        deliver, route = self.registry.deliver, self.routing.route
        if isinstance(self.routing, PerChannelRouting):  # the hot path: no routing step
            return lambda channel, payloads: deliver(channel, [p.encode() for p in payloads])

        def routed(db_channel: str, payloads: list[str]) -> int:
            # Consecutive notifications routed to the same channel still go out together.
            readers, current = 0, None
            run: list[bytes] = []
            for payload in payloads:
                target = route(db_channel, payload)
                if target != current and run:
                    readers = max(readers, deliver(current, run))  # type: ignore[arg-type]
                    run = []
                current = target
                run.append(payload.encode())
            if run:
                readers = max(readers, deliver(current, run))  # type: ignore[arg-type]
            return readers

        return routed

    def _gave_up(self, why: str) -> None:
        """Start-up retries exhausted: exit non-zero so that a supervisor restarts pgws."""
        _log.critical("Giving up: the database is unreachable ({why})", why=why)
        self.exit_status = 1
        if self._reactor.running:
            self._reactor.stop()

    # The registry asks the relay, which maps pgws channels to database channels (the routing)
    # and forwards to the listener; this keeps the registry free of txpostgres and routing.
    def listen(self, channel: str) -> None:
        db = self.routing.db_channel(channel)
        self._db_readers[db] = self._db_readers.get(db, 0) + 1
        if self._db_readers[db] == 1:
            self.listener.listen(db)

    def unlisten(self, channel: str) -> None:
        db = self.routing.db_channel(channel)
        self._db_readers[db] -= 1
        if not self._db_readers[db]:
            del self._db_readers[db]
            self.listener.unlisten(db)

    def ready(self, channel: str) -> defer.Deferred[None]:
        return self.listener.ready(self.routing.db_channel(channel))

    def resource(self) -> RelayResource:
        """
        The C{twisted.web} resource to mount: WebSockets, C{livez}/C{readyz}, and static files if
        configured.
        """
        return RelayResource(self.factory, self.config.server_root, health=self)

    async def readiness(self) -> str | None:
        """None when relaying works (LISTEN session up, a pool statement answers), else why not."""
        if not self.listener.connected:
            return "the LISTEN session is not connected"
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

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the first connection attempts are over (for tests and start-up order)."""
        return defer.succeed(None) if self._started is None else fired(self._started)

    def stopService(self) -> defer.Deferred[None]:
        """
        Graceful stop: close every socket with 1001, send what clients already sent (bounded by
        C{shutdown-timeout}), then close the database connections.
        """
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        sockets = list(self.factory.sockets)
        outboxes = [s.outbox for s in sockets if s.outbox is not None]
        self.factory.close_all(1001, "server shutting down")
        self.listener.stop()
        pending = defer.DeferredList([o.flushed() for o in outboxes], consumeErrors=True)
        pending.addTimeout(self.config.shutdown_timeout, self._reactor)
        try:
            await pending
        except defer.TimeoutError:
            left = sum(len(o) for o in outboxes)
            _log.warn("Stopping with {n} client messages not sent (shutdown-timeout)", n=left)
        self.pool.stop()
        _log.info("Relay stopped ({n} sockets closed)", n=len(sockets))
