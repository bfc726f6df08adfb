"""
The WebSocket protocol of pgws: the Autobahn callbacks, each handing over to the module that does
the work (L{pgws._auth}, L{pgws._channels}, L{pgws._session}, L{pgws._framewriter}).

Wire protocol
=============

Opening: C{GET /<channel>/<jwt>} or C{GET /<jwt>} with a WebSocket upgrade.  The channel segment is
percent-decoded; a query string is ignored.  The token may instead travel in an offered
subprotocol C{pgws.bearer.<jwt>} (offer C{pgws} too; pgws answers C{pgws}) or in an
C{Authorization: Bearer <jwt>} header, and the path is then C{/<channel>} or C{/} (see
L{pgws._credentials}).  The token decides what the socket may do (see L{pgws._auth}).  A refusal is
an HTTP response before any WebSocket opens, with a one-line C{text/plain} body saying why:

    400  the path is not /<channel>/<jwt> or /<jwt>
    401  no token, or a malformed, badly signed, expired or not-yet-valid token, or one whose
         claims an envelope cannot carry (NaN, Infinity, lone surrogates, nesting over 64)
    403  a valid token that does not allow the request (mode, channel, channel name)
    503  the database is unavailable, max-connections is reached, or the server is shutting down

Client -> database (modes C{w}, C{rw}): each text message becomes, for each channel of the socket,
C{pg_notify(<channel>, <envelope>)} with the envelope of L{pgws._envelope} (with C{listen-channel}
set, C{pg_notify(<listen-channel>, <envelope>)}: see L{pgws._routing}); with an audit channel
configured the same envelope is also notified there.  A socket's messages reach PostgreSQL in the
order it sent them.  Messages from a read-only socket are not relayed (logged once per socket).

Database -> clients (modes C{r}, C{rw}): each notification on a channel reaches every reader as a
text frame carrying the payload byte for byte, in PostgreSQL's order.  A C{rw} sender receives its
own messages back.

Control messages: binary frames carry pgws's own messages, as UTF-8 JSON objects, so that they
can never be mistaken for relayed text.  A client sends C{{"refresh": "<jwt>"}} to replace its
token before C{exp} (the new token may not widen the socket's channels or mode); pgws answers
C{{"refreshed": true, "exp": <exp or null>}} or C{{"refreshed": false, "reason": "..."}} and
keeps the old token in that case.  A reading socket that negotiated the C{pgws} subprotocol gets
C{{"event": "gap", "at": <unix time>}} when the LISTEN session was lost and is back: notifications
sent while it was down did not reach anyone.  Without the subprotocol nothing is sent (a
seed-compatible client would take any frame for a notification).  With C{presence} on, a socket
with the C{pgws} subprotocol may ask who is on a channel it reads, C{{"presence": "<channel>"}},
and then gets join / leave events (see L{pgws._presence} for the whole exchange).

Meta channel (C{meta-channel}): each accepted socket notifies
C{{"event": "ConnectionOpen", "channel": <meta-channel>, "payload": "<its channels, comma
separated>", "claims": {...}}} there, and C{ConnectionClose} when it goes.  Reading or writing the
meta channel needs a token that names it in C{channel} or C{channels}.

Close codes sent by pgws:

    1003  a binary message that is not a pgws control message
    1007  a text message that is not UTF-8 (Autobahn checks this)
    1009  a message whose envelope is over PostgreSQL's NOTIFY limit (the reason gives it)
    1001  the server is shutting down (what the socket sent before is flushed first)
    1008  the reader fell more than C{max-pending-bytes} behind (it does not read fast enough)
    1011  a database error while sending the socket's messages (the reason gives it)
    1013  the database was away and more than C{max-queued-messages} waited (the reason gives
          how many were not sent)
    3001  the token expired (at its C{exp} plus C{jwt-leeway}), reason C{JWT expired}

The server pings every 30 seconds and drops a peer that has not answered within 10 seconds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pgws._auth import Grant, Refusal
from pgws._closing import CLOSE_POLICY, close_reason
from pgws._credentials import accepted_subprotocol, locate
from pgws._framewriter import FrameWriter
from pgws._handshake import check_origin, forget_handshake, refusal_response
from pgws._journal import Resume
from pgws._outbox import Outbox
from pgws._redact import redact
from pgws._session import Session

if TYPE_CHECKING:
    from pgws._factory import RelayFactory

__all__ = ["RelayProtocol"]

_log = Logger()


class RelayProtocol(WebSocketServerProtocol):
    """
    One WebSocket.  Its reader side joins the channels during the handshake (so that the 101
    comes only once PostgreSQL has executed the LISTEN); its L{Session} exists while it is open.
    """

    factory: RelayFactory
    peer: str  # Autobahn sets it once connected, before any callback here
    session: Session | None = None
    # Between the handshake and the open: the grant, the requested channel, the journal resume.
    _granted: tuple[Grant, str | None, Resume | None] | None = None
    wants_positions = False  # journaled messages come with their positions (see pgws._journal)
    _writer: FrameWriter | None = None
    _reading = False  # in the registry's reader sets
    _gone = False  # the connection is lost (onClose ran), whether it ever opened or not

    @property
    def grant(self) -> Grant | None:
        if self.session is not None:
            return self.session.grant
        return self._granted[0] if self._granted is not None else None

    @property
    def outbox(self) -> Outbox | None:
        """This socket's messages on their way to PostgreSQL (None if it sends none)."""
        return self.session.outbox if self.session is not None else None

    # -- opening handshake ---------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:  # Autobahn also takes a Deferred
        return Deferred.fromCoroutine(self._connect(request))

    async def _connect(self, request: ConnectionRequest) -> str | None:
        factory = self.factory
        try:
            check_origin(factory.config.allowed_origins, request.headers.get("origin"))
            factory.check_open()
            if not factory.database_ready():
                raise Refusal(503, "the database is unavailable; try again later")
            # The raw request URI: Autobahn's parsed path reads "//x" as a host name.
            channel, token = locate(self.http_request_uri, request.headers, request.protocols)
            resume = factory.resume_of(self.http_request_uri, request.protocols)
            grant = await factory.authorizer.grant(channel, token)
            self._still_wanted()
        except Refusal as refusal:
            raise self._refused(refusal) from None
        self._granted = (grant, channel, resume)
        limit = factory.message_limit(grant)
        if limit is not None:
            self.maxFramePayloadSize = self.maxMessagePayloadSize = limit
        if grant.can_read:
            # Join the channels now and answer 101 only once PostgreSQL has executed the LISTEN:
            # a client may rely on receiving whatever is notified after its socket opened.
            # write_frames() drops frames until the socket is open, so none precedes the 101.
            self._reading = True
            self.wants_positions = factory.positions_for(request.protocols)
            for name in grant.channels:
                if self.wants_positions and factory.journaled(name):
                    factory.registry.hold(name, self)  # until the journal says where it stands
                factory.registry.add(name, self)
            await factory.registry.ready(grant.channels)
            try:
                self._still_wanted()
            except Refusal as refusal:
                self._leave_channels()
                raise self._refused(refusal) from None
        return accepted_subprotocol(request.protocols)

    def _still_wanted(self) -> None:
        """After a wait: a refusal if the client left or the server began to stop meanwhile."""
        if self._gone:
            raise Refusal(400, "the client left during the handshake")
        self.factory.check_open()

    def _refused(self, refusal: Refusal) -> ConnectionDeny:
        _log.info("refused WebSocket from {peer}: {status} {reason}", peer=self.peer,
                  status=refusal.status, reason=redact(refusal.reason))
        return ConnectionDeny(refusal.status, refusal.reason)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """A refusal with its reason in the body, kept to one line (it may quote user input)."""
        line = " ".join(str(reason).splitlines())
        self.factory.tally.refusal(code, line)
        # Should Autobahn log this, it may quote the request URI.
        self.wasNotCleanReason = redact(line)
        if code >= 500 or code not in (400, 401, 403):
            _log.info("WebSocket handshake from {peer} failed: {code} {reason}", peer=self.peer,
                      code=code, reason=redact(line))
        self.sendData(refusal_response(code, line, responseHeaders or ()))
        self._drop(abort=False)

    # -- open socket ---------------------------------------------------------------------------

    def onOpen(self) -> None:
        if self._gone:
            return  # the client left while its LISTEN was pending: Autobahn opens it anyway
        assert self._granted is not None
        grant, requested, resume = self._granted
        self._granted = None
        factory = self.factory
        self._writer = FrameWriter(self.transport, factory.reader_lag(), self._too_slow)
        factory.sockets.add(self)
        factory.tally.opened[grant.mode] += 1
        self.session = Session(self, grant, requested, factory.session_settings)
        if self.wants_positions:
            factory.open_journaled(self, grant, resume)
        factory.presence.opened(self, grant)
        _log.info("WebSocket from {peer} open: mode {mode}, channels {channels}", peer=self.peer,
                  mode=grant.mode, channels=",".join(grant.channels))
        forget_handshake(self)

    def write_frames(self, frames: bytes) -> None:
        if self.state == self.STATE_OPEN and self._writer is not None:
            self._writer.write(frames)

    def pending(self) -> int:
        return self._writer.pending() if self._writer is not None else 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN or self.session is None:
            return  # closing: what arrives now is not relayed
        tally = self.factory.tally
        if isBinary:
            tally.control_messages += 1
            self.session.control(payload)
        else:
            tally.text_messages += 1
            self.session.message(payload.decode("utf-8"))  # Autobahn has checked it is UTF-8

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        if self._writer is not None:
            self._writer.stop()
        self._leave_channels()
        self.factory.sockets.discard(self)
        self.factory.presence.closed(self)
        session, self.session = self.session, None
        if session is not None:
            session.closed()
            self._count_close(wasClean, code)
            _log.info("WebSocket from {peer} closed: {code} {reason}", peer=self.peer,
                      code=code, reason=redact(reason or ""))

    def _count_close(self, clean: bool, code: int | None) -> None:
        """
        By the code the side that began the close sent: Autobahn reports the peer's echo of
        ours, or 1006 when the connection went without a closing handshake.
        """
        if self.closedByMe and self.localCloseCode is not None:
            self.factory.tally.closed(self.localCloseCode, "server")
        elif clean:
            self.factory.tally.closed(code or 1005, "client")  # 1005: a close without a code
        else:
            self.factory.tally.closed(1006, "server" if self.droppedByMe else "client")

    def _leave_channels(self) -> None:
        grant = self.grant
        if grant is not None and self._reading:
            self._reading = False
            for channel in grant.channels:
                self.factory.registry.remove(channel, self)

    def _too_slow(self, pending: int) -> None:
        """
        A reader whose TCP window stays full would grow our memory without bound and, written to
        in the same loop as everyone else, gain nothing by waiting: it is cut off.
        """
        limit = self.factory.config.max_pending_bytes
        _log.warn("WebSocket from {peer} closed: it reads too slowly ({pending} bytes waiting, "
                  "limit {limit})", peer=self.peer, pending=pending, limit=limit)
        self.close_with(CLOSE_POLICY, f"reader too slow: over {limit} bytes waiting to be sent")
        self._leave_channels()
        self._drop(abort=True)

    def _drop(self, abort: bool) -> None:
        """
        Drop a connection whose reason pgws has logged: Autobahn logs the drop of a connection
        that did not close cleanly once more, as a warning, so every refusal and cut-off would be
        two lines, one of them a warning even under C{log-level = "warn"}.
        """
        self.wasClean = True  # Autobahn then logs the drop at debug level
        self.dropConnection(abort=abort)

    # -- what the session and the factory ask of the socket --------------------------------------

    def close_with(self, code: int, reason: str) -> None:
        """
        Close with a protocol-level code (1003, 1009, 1011 ...), which Autobahn's C{sendClose}
        reserves for itself: it only lets applications send 1000 and 3000-4999.
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=close_reason(reason).encode("utf-8"))

    def send_control(self, message: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=True)

    def pause_reading(self) -> None:
        transport: Any = self.transport  # a TCP (or TLS) transport: an IPushProducer
        if transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        transport: Any = self.transport
        if transport is not None and self.state == self.STATE_OPEN:
            transport.resumeProducing()
