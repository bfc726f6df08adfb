"""
The WebSocket protocol of pgws and its factory.

Wire protocol
=============

Opening: C{GET /<channel>/<jwt>} or C{GET /<jwt>} with a WebSocket upgrade.  The channel segment is
percent-decoded; a query string is ignored.  The token decides what the socket may do (see
L{pgws.auth}).  A refusal is an HTTP response before any WebSocket opens, with a one-line
C{text/plain} body saying why:

    400  the path is not /<channel>/<jwt> or /<jwt>
    401  no token, or a malformed, badly signed, expired or not-yet-valid token
    403  a valid token that does not allow the request (mode, channel, channel name)

Client -> database (modes C{w}, C{rw}): each text message becomes, for each channel of the socket,
C{pg_notify(<channel>, <envelope>)} with the envelope of L{pgws.envelope}; with an audit channel
configured the same envelope is also notified there.  A socket's messages reach PostgreSQL in the
order it sent them.  Messages from a read-only socket are not relayed (logged once per socket).

Database -> clients (modes C{r}, C{rw}): each notification on a channel reaches every reader as a
text frame carrying the payload byte for byte, in PostgreSQL's order.  A C{rw} sender receives its
own messages back.

Close codes sent by pgws:

    1003  a binary message (pgws relays text only)
    1007  a text message that is not UTF-8 (Autobahn checks this)
    1009  a message whose envelope is over PostgreSQL's NOTIFY limit (the reason gives it)
    1011  a database error while sending the socket's messages (the reason gives it)

The server pings every 30 seconds and drops a peer that has not answered within 10 seconds.
"""

from __future__ import annotations

import time
from http.client import responses
from typing import Any
from collections.abc import Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pgws.auth import Grant, Refusal, TokenVerifier, authorize, split_path
from pgws.channels import ChannelRegistry
from pgws.database import NotifyPool, Outbox
from pgws.envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeEncoder, envelope_size
from pgws.redact import redact

__all__ = ["RelayFactory", "RelayProtocol"]

_log = Logger()

CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


def _close_reason(text: str) -> str:
    """A close reason must fit in 123 bytes of UTF-8."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", "ignore") + "..."


class RelayProtocol(WebSocketServerProtocol):
    factory: RelayFactory
    grant: Grant | None = None
    _outbox: Outbox | None = None
    _envelopes: EnvelopeEncoder | None = None
    _reading = False
    _ignored_reported = False

    # -- opening handshake ---------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[None]:
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> None:
        try:
            # The raw request URI: Autobahn's parsed path reads "//x" as a host name.
            grant = self.grant = await self.factory.grant_for(self.http_request_uri)
        except Refusal as refusal:
            _log.info("refused WebSocket from {peer}: {status} {reason}", peer=self.peer,
                      status=refusal.status, reason=redact(refusal.reason))
            raise ConnectionDeny(refusal.status, refusal.reason) from None
        if not grant.can_read:
            return
        # Join the channels now and answer 101 only once PostgreSQL has executed the LISTEN:
        # a client may rely on receiving whatever is notified after its socket opened.
        # write_frame() drops frames until the socket is open, so none precedes the 101.
        self._reading = True
        registry = self.factory.registry
        for channel in grant.channels:
            registry.add(channel, self)
        await registry.ready(grant.channels)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """
        Autobahn answers a refused handshake with a status line only; clients and people need the
        reason in the body.  The reason may quote user input, so it is kept to one line.
        """
        self.wasNotCleanReason = reason
        line = " ".join(str(reason).splitlines())
        body = (line + "\n").encode("utf-8")
        head = [
            f"HTTP/1.1 {code} {responses.get(code, 'Error')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        for name, value in responseHeaders or ():
            head.append(f"{name}: {value}")
        if code >= 500 or code not in (400, 401, 403):
            _log.info("WebSocket handshake from {peer} failed: {code} {reason}", peer=self.peer,
                      code=code, reason=redact(line))
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.dropConnection(abort=False)

    # -- open socket ---------------------------------------------------------------------------

    def onOpen(self) -> None:
        grant = self.grant
        assert grant is not None
        if grant.can_write:
            self._envelopes = EnvelopeEncoder(grant.claims)
            self._outbox = self.factory.outbox(self._database_failed)
        _log.info("WebSocket from {peer} open: mode {mode}, channels {channels}", peer=self.peer,
                  mode=grant.mode, channels=",".join(grant.channels))

    def write_frame(self, frame: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.transport.write(frame)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        grant = self.grant
        assert grant is not None
        if self.state != self.STATE_OPEN:
            return  # closing: what arrives now is not relayed
        if isBinary:
            self.close_with(CLOSE_UNSUPPORTED_DATA,
                            "binary messages are not supported; send text (UTF-8)")
            return
        if self._outbox is None or self._envelopes is None:
            if not self._ignored_reported:
                self._ignored_reported = True
                _log.info("WebSocket from {peer} is read-only; its messages are not relayed",
                          peer=self.peer)
            return
        text = payload.decode("utf-8")  # Autobahn has already checked it is UTF-8
        now = self.factory.clock()
        audit = self.factory.audit_channel
        pairs: list[tuple[str, str]] = []
        for channel in grant.channels:
            envelope = self._envelopes.encode(channel, text, now)
            size = envelope_size(envelope)
            if size > NOTIFY_PAYLOAD_LIMIT:
                self.close_with(CLOSE_TOO_BIG,
                                f"message too big: its NOTIFY payload is {size} bytes, "
                                f"PostgreSQL's limit is {NOTIFY_PAYLOAD_LIMIT}")
                return
            pairs.append((channel, envelope))
            if audit is not None:
                pairs.append((audit, envelope))
        self._outbox.put(pairs)

    def _database_failed(self, why: str) -> None:
        _log.error("WebSocket from {peer}: {why}", peer=self.peer, why=why)
        self.close_with(CLOSE_INTERNAL_ERROR, why)

    def close_with(self, code: int, reason: str) -> None:
        """
        Close with a protocol-level code (1003, 1009, 1011 ...), which Autobahn's C{sendClose}
        reserves for itself: it only lets applications send 1000 and 3000-4999.
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=_close_reason(reason).encode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        grant = self.grant
        if grant is not None and self._reading:
            self._reading = False
            for channel in grant.channels:
                self.factory.registry.remove(channel, self)
        if grant is not None and self.state is not None:
            _log.info("WebSocket from {peer} closed: {code} {reason}", peer=self.peer,
                      code=code, reason=redact(reason or ""))


class RelayFactory(WebSocketServerFactory):
    """Everything a socket needs: the token verifier, the channel registry and the NOTIFY pool."""

    protocol = RelayProtocol

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        registry: ChannelRegistry,
        pool: NotifyPool,
        audit_channel: str | None = None,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        ping_interval: float = 30,
        ping_timeout: float = 10,
    ) -> None:
        super().__init__(reactor=reactor, server="pgws")
        self.verifier = verifier
        self.registry = registry
        self.pool = pool
        self.audit_channel = audit_channel
        self.clock = clock
        self.setProtocolOptions(
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # The NOTIFY limit bounds what can be relayed; this bounds what is buffered first.
            maxFramePayloadSize=64 * 1024,
            maxMessagePayloadSize=64 * 1024,
        )

    async def grant_for(self, path: str) -> Grant:
        channel, token = split_path(path)
        return authorize(await self.verifier.claims(token), channel)

    def outbox(self, on_error: Callable[[str], None]) -> Outbox:
        return Outbox(self.pool, on_error)
