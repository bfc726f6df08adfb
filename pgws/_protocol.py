"""
The WebSocket protocol of pgws and its factory.

Wire protocol
=============

Opening: C{GET /<channel>/<jwt>} or C{GET /<jwt>} with a WebSocket upgrade.  The channel segment is
percent-decoded; a query string is ignored.  The token may instead travel in an offered
subprotocol C{pgws.bearer.<jwt>} (offer C{pgws} too; pgws answers C{pgws}) or in an
C{Authorization: Bearer <jwt>} header, and the path is then C{/<channel>} or C{/} (see
L{pgws._credentials}).  The token decides what the socket may do (see L{pgws._auth}).  A refusal is
an HTTP response before any WebSocket opens, with a one-line C{text/plain} body saying why:

    400  the path is not /<channel>/<jwt> or /<jwt>
    401  no token, or a malformed, badly signed, expired or not-yet-valid token
    403  a valid token that does not allow the request (mode, channel, channel name)

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
keeps the old token in that case.  A socket that negotiated the C{pgws} subprotocol also gets
C{{"event": "gap", "at": <unix time>}} when the LISTEN session was lost and is back: notifications
sent while it was down did not reach anyone.  Without the subprotocol nothing is sent (a
seed-compatible client would take any frame for a notification).

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
    3001  the token expired (at its C{exp}), reason C{JWT expired}

The server pings every 30 seconds and drops a peer that has not answered within 10 seconds.
"""

from __future__ import annotations

import fnmatch
import json
import time
from http.client import responses
from typing import Any
from collections.abc import Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pgws._auth import Grant, Refusal, TokenVerifier, authorize
from pgws._channelname import show_channel
from pgws._credentials import SUBPROTOCOL, accepted_subprotocol, locate
from pgws._channels import ChannelRegistry
from pgws._database import NotifyPool, Outbox, plural
from pgws._envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeEncoder, envelope_size
from pgws._redact import redact
from pgws._routing import PerChannelRouting, Routing

__all__ = ["RelayFactory", "RelayProtocol"]

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_LATER = 1013
CLOSE_JWT_EXPIRED = 3001


def _pending_bytes(transport: Any) -> int:
    """
    Bytes a transport holds that the kernel has not taken yet.  Under TLS the wrapper forwards
    these attribute reads to the TCP transport below it, which holds the encrypted bytes.
    """
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


# A reader over max-pending-bytes is cut off if it takes nothing for this long...
SLOW_READER_GRACE = 1.0
# ... or at once past this many times max-pending-bytes, whatever its progress.
SLOW_READER_HARD_FACTOR = 4
# Twisted hands at most SEND_LIMIT bytes to the kernel per socket per reactor turn (128 KiB);
# a fan-out turn can write more than that to one reader, which would then fall behind for
# Twisted's sake, not its own.
SEND_LIMIT = 4 * 1024 * 1024


def _close_reason(text: str) -> str:
    """A close reason must fit in 123 bytes of UTF-8."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", "ignore") + "..."


class _SendQueue(list[Any]):
    """What Autobahn needs of its send queue (append, popleft, len), in 56 bytes when empty."""

    def popleft(self) -> Any:
        return self.pop(0)


class RelayProtocol(WebSocketServerProtocol):
    factory: RelayFactory
    grant: Grant | None = None
    _outbox: Outbox | None = None
    _envelopes: EnvelopeEncoder | None = None
    _reading = False
    _ignored_reported = False
    _expiry: Any = None
    _opened = False
    _requested: str | None = None  # the channel the opening request asked for
    _written = 0  # bytes of frames written to the transport, ever
    _behind_since: float | None = None  # when the reader last went over max-pending-bytes
    _flushed_mark = 0
    _direct_socket: Any = None  # the socket, when frames may be sent on it directly

    @property
    def outbox(self) -> Outbox | None:
        """This socket's messages on their way to PostgreSQL (None for a read-only socket)."""
        return self._outbox

    # -- opening handshake ---------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:  # Autobahn also takes a Deferred
        return Deferred.fromCoroutine(self._connect(request))

    async def _connect(self, request: ConnectionRequest) -> str | None:
        try:
            # The raw request URI: Autobahn's parsed path reads "//x" as a host name.
            self.factory.check_origin(request.headers.get("origin"))
            if not self.factory.database_ready():
                raise Refusal(503, "the database is unavailable; try again later")
            channel, token = locate(self.http_request_uri, request.headers, request.protocols)
            self._requested = channel
            grant = self.grant = await self.factory.grant_for(channel, token)
        except Refusal as refusal:
            _log.info("refused WebSocket from {peer}: {status} {reason}", peer=self.peer,
                      status=refusal.status, reason=redact(refusal.reason))
            raise ConnectionDeny(refusal.status, refusal.reason) from None
        subprotocol = accepted_subprotocol(request.protocols)
        if not grant.can_read:
            return subprotocol
        # Join the channels now and answer 101 only once PostgreSQL has executed the LISTEN:
        # a client may rely on receiving whatever is notified after its socket opened.
        # write_frames() drops frames until the socket is open, so none precedes the 101.
        self._reading = True
        registry = self.factory.registry
        for name in grant.channels:
            registry.add(name, self)
        await registry.ready(grant.channels)
        return subprotocol

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """
        Autobahn answers a refused handshake with a status line only; clients and people need the
        reason in the body.  The reason may quote user input, so it is kept to one line.
        """
        line = " ".join(str(reason).splitlines())
        # Autobahn logs this when it drops the connection: it may quote the request URI.
        self.wasNotCleanReason = redact(line)
        body = (line + "\n").encode("utf-8", "backslashreplace")
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
        self._opened = True
        factory = self.factory
        transport: Any = self.transport
        if hasattr(transport, "SEND_LIMIT"):
            transport.SEND_LIMIT = SEND_LIMIT
        # Plain TCP only: under TLS every byte must go through the TLS layer (a wrapper that
        # forwards attribute reads to the TCP transport below it, so ask for the class).
        if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
            self._direct_socket = transport.socket
        if grant.can_write:
            self._envelopes = EnvelopeEncoder(grant.claims)
        if grant.can_write or factory.meta_channel is not None:
            self._outbox = factory.outbox(self)
        factory.sockets.add(self)
        self._schedule_expiry(grant)
        self._meta_event("ConnectionOpen")
        _log.info("WebSocket from {peer} open: mode {mode}, channels {channels}", peer=self.peer,
                  mode=grant.mode, channels=",".join(grant.channels))
        self._forget_handshake()

    # What Autobahn keeps of the opening handshake and never reads again: a few KB per idle
    # socket (the request, its headers, the offered subprotocols -- a token among them).
    _HANDSHAKE_ATTRIBUTES = (
        "http_request_data", "http_headers", "http_status_line", "http_request_uri",
        "http_request_path", "http_request_params", "http_request_host", "http_response_data",
        "websocket_protocols", "websocket_extensions", "websocket_origin",
    )

    def _forget_handshake(self) -> None:
        for name in self._HANDSHAKE_ATTRIBUTES:
            if name in self.__dict__:
                setattr(self, name, None)
        # Autobahn's send queue is almost always empty, and an empty deque costs 600+ bytes.
        if not self.send_queue:
            self.send_queue = _SendQueue()  # type: ignore[assignment]

    def _schedule_expiry(self, grant: Grant) -> None:
        """A token with a numeric exp closes its socket at that moment (3001, as the original)."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        exp = grant.claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                delay = max(0.0, float(exp) - self.factory.clock())
            except OverflowError:  # an exp past what a float holds: never within this process
                return
            self._expiry = self.factory.reactor.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_JWT_EXPIRED, "JWT expired")

    def _meta_event(self, event: str) -> None:
        meta, grant = self.factory.meta_channel, self.grant
        if meta is None or grant is None or self._outbox is None:
            return
        envelope = EnvelopeEncoder(grant.claims, event=event).encode(
            meta, ",".join(grant.channels), self.factory.clock())
        if envelope_size(envelope) > NOTIFY_PAYLOAD_LIMIT:
            _log.warn("{event} of {peer} not sent: its envelope is over the NOTIFY limit",
                      event=event, peer=self.peer)
            return
        self._outbox.put([(self.factory.routing.db_channel(meta), envelope)])

    def write_frames(self, frames: bytes) -> None:
        if self.state != self.STATE_OPEN:
            return
        transport: Any = self.transport
        self._written += len(frames)
        sock = self._direct_socket
        if (sock is not None and not transport._tempDataLen and not transport.dataBuffer
                and not transport.disconnecting):
            # Nothing queued: hand the frames to the kernel now.  Twisted would queue them,
            # register the socket with epoll, send at the next turn and unregister it: two
            # epoll_ctl calls per reader per turn, a quarter of fan-out's CPU (bench/README.md).
            try:
                sent = sock.send(frames)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # let Twisted meet the error and close the connection as usual
            if sent == len(frames):
                self._behind_since = None
                return
            frames = frames[sent:]
        transport.write(frames)
        pending = _pending_bytes(transport)
        if pending > self.factory.max_pending_bytes:
            self._behind(pending)
        elif self._behind_since is not None:
            self._behind_since = None

    def _behind(self, pending: int) -> None:
        """
        Over max-pending-bytes.  Twisted only flushes between reactor turns, so a prompt reader
        can be over it for a moment after a burst; a reader is cut off when it has taken nothing
        for L{SLOW_READER_GRACE} seconds while over it, or at once when far over it.
        """
        cap = self.factory.max_pending_bytes
        if pending > cap * SLOW_READER_HARD_FACTOR:
            self._too_slow(pending)
            return
        now = self.factory.reactor.seconds()
        flushed = self._written - pending  # bytes the kernel has taken, ever
        if self._behind_since is None:
            self._behind_since, self._flushed_mark = now, flushed
        elif now - self._behind_since >= SLOW_READER_GRACE:
            if flushed == self._flushed_mark:
                self._too_slow(pending)
            else:
                self._behind_since, self._flushed_mark = now, flushed

    def _too_slow(self, pending: int) -> None:
        """
        A reader whose TCP window stays full would grow our memory without bound and, written to
        in the same loop as everyone else, gain nothing by waiting: it is cut off.
        """
        limit = self.factory.max_pending_bytes
        _log.warn("WebSocket from {peer} closed: it reads too slowly ({pending} bytes waiting, "
                  "limit {limit})", peer=self.peer, pending=pending, limit=limit)
        self.close_with(CLOSE_POLICY, f"reader too slow: over {limit} bytes waiting to be sent")
        self._leave_channels()
        self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        grant = self.grant
        assert grant is not None
        if self.state != self.STATE_OPEN:
            return  # closing: what arrives now is not relayed
        if isBinary:
            self._control(payload)
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
        db_channel = self.factory.routing.db_channel
        pairs: list[tuple[str, str]] = []
        for channel in grant.channels:
            envelope = self._envelopes.encode(channel, text, now)
            size = envelope_size(envelope)
            if size > NOTIFY_PAYLOAD_LIMIT:
                self.close_with(CLOSE_TOO_BIG,
                                f"message too big: its NOTIFY payload is {size} bytes, "
                                f"PostgreSQL's limit is {NOTIFY_PAYLOAD_LIMIT}")
                return
            pairs.append((db_channel(channel), envelope))
            if audit is not None:
                pairs.append((audit, envelope))
        self._outbox.put(pairs)

    def _leave_channels(self) -> None:
        grant = self.grant
        if grant is not None and self._reading:
            self._reading = False
            for channel in grant.channels:
                self.factory.registry.remove(channel, self)

    # Outbox callbacks.

    def queue_overflowed(self, count: int) -> None:
        _log.warn("WebSocket from {peer}: database away, {count} messages not sent",
                  peer=self.peer, count=count)
        self.close_with(CLOSE_TRY_LATER, f"database unavailable: {plural(count, 'message')} "
                                         "not sent")

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state == self.STATE_OPEN:
            self.transport.resumeProducing()

    def _control(self, payload: bytes) -> None:
        """A binary frame: a pgws control message, or a 1003 close."""
        try:
            message = json.loads(payload.decode("utf-8"))
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("refresh"), str):
            d = Deferred.fromCoroutine(self._refresh(message["refresh"]))
            d.addErrback(lambda f: _log.failure("token refresh failed", f))
            return
        self.close_with(CLOSE_UNSUPPORTED_DATA,
                        "binary messages are not supported; send text (UTF-8)")

    async def _refresh(self, token: str) -> None:
        old = self.grant
        assert old is not None
        try:
            # The same request as the opening one: channel claims resolve the same way.
            new = await self.factory.grant_for(self._requested, token)
            widened = set(new.channels) - set(old.channels)
            if widened:
                raise Refusal(403, f"the new token would add channel "
                                   f"{show_channel(sorted(widened)[0])}")
            if not set(new.mode) <= set(old.mode):
                raise Refusal(403, f'the new token\'s mode "{new.mode}" is wider than '
                                   f'"{old.mode}"')
            if set(new.channels) != set(old.channels) or new.mode != old.mode:
                raise Refusal(403, "the new token must grant the same channels and mode")
        except Refusal as refusal:
            _log.info("WebSocket from {peer}: token refresh refused: {reason}", peer=self.peer,
                      reason=redact(refusal.reason))
            self._send_control({"refreshed": False, "reason": refusal.reason})
            return
        self.grant = new
        if self._envelopes is not None:
            self._envelopes = EnvelopeEncoder(new.claims)
        self._schedule_expiry(new)
        exp = new.claims.get("exp")
        _log.info("WebSocket from {peer}: token refreshed", peer=self.peer)
        self._send_control({"refreshed": True, "exp": exp if isinstance(exp, (int, float)) else None})

    def _send_control(self, message: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=True)

    def database_failed(self, why: str) -> None:
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
        self._direct_socket = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._leave_channels()
        self.factory.sockets.discard(self)
        if self._opened:
            self._opened = False
            self._meta_event("ConnectionClose")
            _log.info("WebSocket from {peer} closed: {code} {reason}", peer=self.peer,
                      code=code, reason=redact(reason or ""))
        if self._outbox is not None:
            self._outbox.close()  # what was queued is still sent


class RelayFactory(WebSocketServerFactory):
    """Everything a socket needs: the token verifier, the channel registry and the NOTIFY pool."""

    protocol = RelayProtocol  # type: ignore[assignment]  # Twisted's stub is narrower

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        registry: ChannelRegistry,
        pool: NotifyPool,
        audit_channel: str | None = None,
        meta_channel: str | None = None,
        routing: Routing | None = None,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        ping_interval: float = 30,
        ping_timeout: float = 10,
        max_connections: int = 15000,
        max_channels: int = 100,
        max_pending_bytes: int = 1 << 20,
        max_queued_messages: int = 1000,
        allowed_origins: tuple[str, ...] = ("*",),
        database_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(reactor=reactor, server="pgws")
        self.max_channels = max_channels
        self.max_pending_bytes = max_pending_bytes
        self.max_queued_messages = max_queued_messages
        self.database_ready = database_ready
        self.sockets: set[RelayProtocol] = set()
        self.verifier = verifier
        self.registry = registry
        self.pool = pool
        self.audit_channel = audit_channel
        self.meta_channel = meta_channel
        self.routing: Routing = routing or PerChannelRouting()
        self.clock = clock
        self.setProtocolOptions(
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # The NOTIFY limit bounds what can be relayed; this bounds what is buffered first.
            maxFramePayloadSize=64 * 1024,
            maxMessagePayloadSize=64 * 1024,
            maxConnections=max_connections,
            # Send the close frame (1007, 1009 ...) before dropping, so clients see why.
            failByDrop=False,
        )
        # Checked in onConnect rather than by Autobahn, which answers a foreign origin with 400.
        self.allowed_origins = allowed_origins

    def check_origin(self, origin: str | None) -> None:
        """
        Browsers send C{Origin}; a page from a site not in C{allowed-origins} is refused (403).
        Clients that send no Origin (not browsers) are not subject to it.
        """
        if origin is None or "*" in self.allowed_origins:
            return
        if not any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.allowed_origins):
            raise Refusal(403, f"origin {show_channel(origin)} is not allowed")

    async def grant_for(self, channel: str | None, token: str) -> Grant:
        claims = await self.verifier.claims(token)
        grant = authorize(claims, channel)
        if len(grant.channels) > self.max_channels:
            raise Refusal(403, f"the token grants {len(grant.channels)} channels; the limit is "
                               f"{self.max_channels}")
        meta = self.meta_channel
        if meta is not None and meta in grant.channels:
            named = claims.get("channel") == meta or meta in (claims.get("channels") or ())
            if not named:
                raise Refusal(403, f"channel {show_channel(meta)} is the meta channel; only a "
                                   "token that names it may open it")
        return grant

    def outbox(self, socket: RelayProtocol) -> Outbox:
        return Outbox(self.pool, socket.database_failed, reactor=self.reactor,
                      max_queued=self.max_queued_messages, on_overflow=socket.queue_overflowed,
                      pause=socket.pause_reading, resume=socket.resume_reading)

    def tell_gap(self) -> None:
        """
        The LISTEN session was lost and is back: notifications sent meanwhile are lost.  Sockets
        that speak the C{pgws} subprotocol get a control message saying so; others get nothing,
        since a seed-compatible client would take any frame for a notification.
        """
        message = json.dumps({"event": "gap", "at": self.clock()}).encode("utf-8")
        told = 0
        for socket in list(self.sockets):
            if socket.grant is not None and socket.grant.can_read and \
                    socket.websocket_protocol_in_use == SUBPROTOCOL:
                socket.sendMessage(message, isBinary=True)
                told += 1
        _log.info("Told {n} sockets that notifications may have been lost", n=told)

    def close_all(self, code: int, reason: str) -> None:
        for socket in list(self.sockets):
            socket.close_with(code, reason)
