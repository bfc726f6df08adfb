"""
The WebSocket factory: what every socket of one server shares (its settings, the authorizer, the
channel registry, the NOTIFY pool) and what is done to all sockets at once (the gap message, the
closing at shutdown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.logger import Logger

from pgws._auth import Authorizer, Refusal
from pgws._channels import ChannelRegistry
from pgws._config import Config
from pgws._credentials import SUBPROTOCOL
from pgws._outbox import Sender
from pgws._protocol import RelayProtocol
from pgws._routing import PerChannelRouting, Routing
from pgws._session import SessionSettings

__all__ = ["RelayFactory"]

_log = Logger()

# What Autobahn may buffer of one frame or message.  PostgreSQL's NOTIFY limit (8000 bytes)
# bounds what can be relayed; this bounds what is read before that is checked.
MAX_MESSAGE_BYTES = 64 * 1024


class RelayFactory(WebSocketServerFactory):
    """
    @param database_ready: whether handshakes may be accepted now (the LISTEN session is up);
        while it says no, they get 503.
    """

    protocol = RelayProtocol  # type: ignore[assignment]  # Twisted's stub is narrower

    def __init__(
        self,
        config: Config,
        *,
        authorizer: Authorizer,
        registry: ChannelRegistry,
        pool: Sender,
        reactor: Any,
        routing: Routing | None = None,
        clock: Callable[[], float] = time.time,
        ping_interval: float = 30,
        ping_timeout: float = 10,
        database_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(reactor=reactor, server="pgws")
        self.config = config
        self.authorizer = authorizer
        self.registry = registry
        self.database_ready = database_ready
        self.clock = clock
        self.sockets: set[RelayProtocol] = set()
        self.closing = False  # shutting down: no socket opens any more
        self.session_settings = SessionSettings(
            authorizer=authorizer, pool=pool, reactor=reactor, clock=clock,
            db_channel=(routing or PerChannelRouting()).db_channel,
            max_queued_messages=config.max_queued_messages, leeway=config.jwt_leeway,
            audit_channel=config.audit_channel, meta_channel=config.meta_channel,
        )
        self.setProtocolOptions(
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            maxConnections=config.max_connections,
            # Send the close frame (1007, 1009 ...) before dropping, so clients see why.
            failByDrop=False,
        )

    def tell_gap(self) -> None:
        """
        The LISTEN session was lost and is back: notifications sent meanwhile are lost.  Sockets
        that speak the C{pgws} subprotocol get a control message saying so; others get nothing,
        since a seed-compatible client would take any frame for a notification.
        """
        message = {"event": "gap", "at": self.clock()}
        told = 0
        for socket in list(self.sockets):
            if socket.grant is not None and socket.grant.can_read and \
                    socket.websocket_protocol_in_use == SUBPROTOCOL:
                socket.send_control(message)
                told += 1
        _log.info("Told {n} sockets that notifications may have been lost", n=told)

    def check_open(self) -> None:
        """A L{Refusal} (503) once the server is shutting down."""
        if self.closing:
            raise Refusal(503, "the server is shutting down")

    def close_all(self, code: int, reason: str) -> None:
        """Close every open socket, and open no more."""
        self.closing = True
        for socket in list(self.sockets):
            socket.close_with(code, reason)
