"""
One open socket's life, apart from the WebSocket machinery: its grant and when it expires, token
refresh, the envelopes of its messages on their way to its outbox, meta-channel events, and the
control messages it exchanges.  The wire format of all of these is written at the top of
L{pgws._protocol}; the socket itself is anything that can close, send a control message and pause
its reads (L{Socket}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pgws._auth import Authorizer, Grant, Refusal
from pgws._closing import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_JWT_EXPIRED,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNSUPPORTED_DATA,
    plural,
)
from pgws._envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeEncoder, envelope_size
from pgws._outbox import Outbox, Sender, Waiting
from pgws._presence import OFF
from pgws._reactor import fire_and_log
from pgws._redact import redact

__all__ = ["PresenceRequests", "Session", "SessionSettings", "Socket"]

_log = Logger()


class Socket(Protocol):
    """What a session needs of its WebSocket."""

    peer: str

    def close_with(self, code: int, reason: str) -> None:
        """Close (if open) with C{code} and C{reason}."""

    def send_control(self, message: dict[str, Any]) -> None:
        """Send a control message (a binary frame of JSON), if open."""

    def pause_reading(self) -> None:
        """Read nothing more from the client for now (its messages pile up)."""

    def resume_reading(self) -> None: ...


class PresenceRequests(Protocol):
    """What a session asks of presence (L{pgws._presence}; it answers the socket itself)."""

    def request(self, socket: Any, grant: Grant, message: dict[str, Any]) -> None: ...

    def regranted(self, socket: Any, grant: Grant) -> None: ...


@dataclass(frozen=True)
class SessionSettings:
    """What every session of a server shares."""

    authorizer: Authorizer
    pool: Sender
    reactor: IReactorTime  # for the expiry timer and the outbox's back-off
    clock: Callable[[], float]  # wall-clock time, for exp and message_delivered_at
    db_channel: Callable[[str], str]  # the routing: where a channel's messages are notified
    max_queued_messages: int
    leeway: float = 0  # jwt-leeway: a token is good until exp + leeway, here as at the handshake
    # The largest envelope a database channel takes (a NOTIFY's, or the journal's).
    payload_limit: Callable[[str], int] = lambda db_channel: NOTIFY_PAYLOAD_LIMIT
    audit_channel: str | None = None
    meta_channel: str | None = None
    presence: PresenceRequests = OFF
    waiting: Waiting = field(default_factory=Waiting)  # every outbox's messages, for metrics


def _too_big(size: int, limit: int) -> str:
    if limit == NOTIFY_PAYLOAD_LIMIT:
        return (f"message too big: its NOTIFY payload is {size} bytes, PostgreSQL's limit is "
                f"{limit}")
    return f"message too big: its journal payload is {size} bytes, journal-max-payload is {limit}"


class Session:
    """
    Made when the socket opens; L{closed} when it goes.

    @param requested: the channel the opening request asked for (a refresh resolves the same).
    """

    # One per open socket: no instance dict (idle sockets are counted in kilobytes).
    __slots__ = ("_socket", "grant", "_requested", "_settings", "outbox", "_envelopes", "_expiry",
                 "_ignored_reported")

    def __init__(self, socket: Socket, grant: Grant, requested: str | None,
                 settings: SessionSettings) -> None:
        self._socket = socket
        self.grant = grant
        self._requested = requested
        self._settings = settings
        # Where the socket's notifications go; a read-only socket sends none, unless there is a
        # meta channel to tell about it.
        self.outbox: Outbox | None = None
        if grant.can_write or settings.meta_channel is not None:
            self.outbox = Outbox(settings.pool, self.database_failed, settings.reactor,
                                 max_queued=settings.max_queued_messages,
                                 on_overflow=self.queue_overflowed, pause=socket.pause_reading,
                                 resume=socket.resume_reading, waiting=settings.waiting)
        self._envelopes = EnvelopeEncoder(grant.claims) if grant.can_write else None
        self._expiry: IDelayedCall | None = None
        self._ignored_reported = False
        self._schedule_expiry()
        self._meta_event("ConnectionOpen")

    def closed(self) -> None:
        """The socket is gone: no more timers; what was queued is still sent."""
        self._cancel_expiry()
        self._meta_event("ConnectionClose")
        if self.outbox is not None:
            self.outbox.close()

    # -- expiry ------------------------------------------------------------------------------

    def _schedule_expiry(self) -> None:
        """
        A token with a numeric exp closes its socket at that moment (3001, as the original), plus
        C{jwt-leeway}: the handshake accepted it until then.
        """
        self._cancel_expiry()
        exp = self.grant.claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                delay = max(0.0, float(exp) + self._settings.leeway - self._settings.clock())
            except OverflowError:  # an exp past what a float holds: never within this process
                return
            self._expiry = self._settings.reactor.callLater(delay, self._expired)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _expired(self) -> None:
        self._expiry = None
        self._socket.close_with(CLOSE_JWT_EXPIRED, "JWT expired")

    # -- client messages ---------------------------------------------------------------------

    def message(self, text: str) -> None:
        """A text message: its envelope, for each channel, to the outbox (and the audit channel)."""
        if self.outbox is None or self._envelopes is None:
            if not self._ignored_reported:
                self._ignored_reported = True
                _log.info("WebSocket from {peer} is read-only; its messages are not relayed",
                          peer=self._socket.peer)
            return
        settings = self._settings
        now = settings.clock()
        audit = settings.audit_channel
        pairs: list[tuple[str, str]] = []
        for channel in self.grant.channels:
            envelope = self._envelopes.encode(channel, text, now)
            pairs.append((settings.db_channel(channel), envelope))
            if audit is not None:
                pairs.append((audit, envelope))
        for db_channel, envelope in pairs:
            size, limit = envelope_size(envelope), settings.payload_limit(db_channel)
            if size > limit:
                self._socket.close_with(CLOSE_TOO_BIG, _too_big(size, limit))
                return
        self.outbox.put(pairs)

    def _meta_event(self, event: str) -> None:
        meta = self._settings.meta_channel
        if meta is None or self.outbox is None:
            return
        envelope = EnvelopeEncoder(self.grant.claims, event=event).encode(
            meta, ",".join(self.grant.channels), self._settings.clock())
        if envelope_size(envelope) > NOTIFY_PAYLOAD_LIMIT:
            _log.warn("{event} of {peer} not sent: its envelope is over the NOTIFY limit",
                      event=event, peer=self._socket.peer)
            return
        self.outbox.put([(self._settings.db_channel(meta), envelope)])

    # -- what the outbox reports ---------------------------------------------------------------

    def database_failed(self, why: str) -> None:
        _log.error("WebSocket from {peer}: {why}", peer=self._socket.peer, why=why)
        self._socket.close_with(CLOSE_INTERNAL_ERROR, why)

    def queue_overflowed(self, count: int) -> None:
        _log.warn("WebSocket from {peer}: database away, {count} messages not sent",
                  peer=self._socket.peer, count=count)
        self._socket.close_with(CLOSE_TRY_LATER,
                                f"database unavailable: {plural(count, 'message')} not sent")

    # -- control messages --------------------------------------------------------------------

    def control(self, payload: bytes) -> None:
        """A binary frame: a pgws control message, or a 1003 close."""
        try:
            message = json.loads(payload.decode("utf-8"))
        except ValueError:
            message = None
        if isinstance(message, dict) and isinstance(message.get("refresh"), str):
            fire_and_log(self.refresh(message["refresh"]), "token refresh")
            return
        if isinstance(message, dict) and "presence" in message:
            self._settings.presence.request(self._socket, self.grant, message)
            return
        self._socket.close_with(CLOSE_UNSUPPORTED_DATA,
                                "binary messages are not supported; send text (UTF-8)")

    async def refresh(self, token: str) -> None:
        """Replace the token, if the new one grants the same; the answer says which."""
        peer = self._socket.peer
        try:
            new = await self._settings.authorizer.refresh(self.grant, self._requested, token)
        except Refusal as refusal:
            _log.info("WebSocket from {peer}: token refresh refused: {reason}", peer=peer,
                      reason=redact(refusal.reason))
            self._socket.send_control({"refreshed": False, "reason": refusal.reason})
            return
        self.grant = new
        self._settings.presence.regranted(self._socket, new)
        if self._envelopes is not None:
            self._envelopes = EnvelopeEncoder(new.claims)
        self._schedule_expiry()
        exp = new.claims.get("exp")
        _log.info("WebSocket from {peer}: token refreshed", peer=peer)
        self._socket.send_control({"refreshed": True,
                                   "exp": exp if isinstance(exp, (int, float)) else None})
