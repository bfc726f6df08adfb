"""
The WebSocket factory: what every socket of one server shares (its settings, the authorizer, the
channel registry, the NOTIFY pool, presence) and what is done to all sockets at once (the gap
message, the closing at shutdown).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.logger import Logger

from pgws._auth import Authorizer, Grant, Refusal
from pgws._channels import ChannelRegistry
from pgws._config import Config
from pgws._credentials import SUBPROTOCOL
from pgws._envelope import NOTIFY_PAYLOAD_LIMIT
from pgws._framewriter import ReaderLag
from pgws._journal import Journal, Resume, parse_resume
from pgws._outbox import Sender, Waiting
from pgws._presence import OFF, Presence, PresenceOff
from pgws._protocol import RelayProtocol
from pgws._reactor import fire_and_log
from pgws._routing import PerChannelRouting, Routing
from pgws._session import SessionSettings
from pgws._tally import SocketTally

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
        journal: Journal | None = None,
        presence: Presence | None = None,
    ) -> None:
        super().__init__(reactor=reactor, server="pgws")
        self.config = config
        self.authorizer = authorizer
        self.registry = registry
        self.database_ready = database_ready
        self.clock = clock
        self.journal = journal
        self.presence: Presence | PresenceOff = presence or OFF
        self.sockets: set[RelayProtocol] = set()
        self.tally = SocketTally()  # opened, refused, closed, messages in (see pgws._metrics)
        self.closing = False  # shutting down: no socket opens any more
        self.session_settings = SessionSettings(
            authorizer=authorizer, pool=pool, reactor=reactor, clock=clock,
            db_channel=(routing or PerChannelRouting()).db_channel,
            max_queued_messages=config.max_queued_messages, leeway=config.jwt_leeway,
            audit_channel=config.audit_channel, meta_channel=config.meta_channel,
            payload_limit=self._payload_limit, presence=self.presence,
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

    @property
    def waiting(self) -> Waiting:
        """Client messages on their way to PostgreSQL, across every socket (for metrics)."""
        return self.session_settings.waiting

    def reconfigure(self, config: Config) -> None:
        """
        Reloaded settings, for the handshakes and sockets that come next: C{allowed-origins},
        C{max-connections}, and the C{max-queued-messages} and C{jwt-leeway} of new sessions
        (an open socket keeps those it opened with).
        """
        self.config = config
        self.session_settings = dataclasses.replace(
            self.session_settings, max_queued_messages=config.max_queued_messages,
            leeway=config.jwt_leeway)
        # Autobahn copies it into each protocol as it connects.
        self.setProtocolOptions(maxConnections=config.max_connections)

    # -- the journal -----------------------------------------------------------------------------

    def journaled(self, channel: str) -> bool:
        return self.journal is not None and self.journal.journaled(channel)

    def _payload_limit(self, db_channel: str) -> int:
        """The largest envelope C{db_channel} takes: a NOTIFY's, or the journal's."""
        if self.journaled(db_channel):
            return self.config.journal_max_payload
        return NOTIFY_PAYLOAD_LIMIT

    def message_limit(self, grant: Grant) -> int | None:
        """
        A writer to a journaled channel may send messages as large as the journal takes (the
        envelope's size is checked again, per channel); None: Autobahn's 64 KiB bound stays.
        """
        if grant.can_write and any(self.journaled(c) for c in grant.channels):
            return max(MAX_MESSAGE_BYTES, self.config.journal_max_payload)
        return None

    def positions_for(self, protocols: list[str]) -> bool:
        """Positions go to readers that speak the pgws subprotocol, when the journal is on."""
        return self.journal is not None and SUBPROTOCOL in protocols

    def resume_of(self, uri: str, protocols: list[str]) -> Resume | None:
        """A handshake's resume / history request (with the journal on), or a L{Refusal}."""
        if self.journal is None:
            return None  # the query string is ignored, as it always was
        resume = parse_resume(uri)
        if resume is not None and SUBPROTOCOL not in protocols:
            raise Refusal(400, "resume and history need the pgws subprotocol")
        return resume

    def open_journaled(self, socket: RelayProtocol, grant: Grant, resume: Resume | None) -> None:
        """Tell a reader with positions where its journaled channels stand, and replay."""
        assert self.journal is not None
        for channel in grant.channels:
            if self.journal.journaled(channel):
                fire_and_log(self.journal.open_reader(socket, channel, resume,
                                                      socket.send_control), "journal replay")

    def reader_lag(self) -> ReaderLag:
        """The slow-reader rule; the largest journaled message must fit in what may wait."""
        largest = self.config.journal_max_payload if self.journal is not None else 0
        return ReaderLag(self.config.max_pending_bytes, self.reactor, largest_frame=largest)

    def tell_gap(self) -> None:
        """
        The LISTEN session was lost and is back: notifications sent meanwhile are lost.  Sockets
        that speak the C{pgws} subprotocol get a control message saying so; others get nothing,
        since a seed-compatible client would take any frame for a notification.
        """
        message = {"event": "gap", "at": self.clock()}
        told = 0
        for socket in list(self.sockets):
            grant = socket.grant
            # A reader of journaled channels only missed nothing: the journal catches up.
            if grant is not None and grant.can_read and \
                    socket.websocket_protocol_in_use == SUBPROTOCOL and \
                    not all(self.journaled(c) for c in grant.channels):
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
