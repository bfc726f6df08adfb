"""
What L{pgws.client} hands to the application: messages, the events of a connection's life, and
the errors that end a client.  Plain frozen dataclasses, so that an application can compare,
log or pickle them; none of them ever holds a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClientClosed", "ClientError", "Connected", "Disconnected", "Event", "Gap", "Message",
           "QueueFull", "Refreshed", "RefreshFailed", "Refused", "ServerEvent", "Stream",
           "UnsentMessages"]


@dataclass(frozen=True)
class Message:
    """
    A text frame the server relayed.  C{seq} and C{epoch} are its journal position (None for a
    plain C{NOTIFY}); C{channel} is the journal's channel, or for a plain notification the
    socket's channel when it reads only one (pgws's plain frames do not say which), else None.
    """

    channel: str | None
    text: str
    seq: int | None = None
    epoch: str | None = None


@dataclass(frozen=True)
class Gap:
    """
    Messages may be missing here: what came before this item and what comes after it do not
    join up.  C{channels} are the channels concerned (None: unknown, assume all).

    C{reason}:
      - C{"listen"}: the server lost its LISTEN session (pgws's C{{"event": "gap"}});
        plain notifications sent meanwhile reached no one.  C{at} is the server's time.
      - C{"disconnected"}: the client reconnected; plain (not journaled) notifications sent
        while it was away are lost.
      - C{"not recovered"}: the journal could not resume C{channels[0]} (the position is older
        than what is retained, or the journal was recreated: the epoch differs).  The messages
        after C{after} up to C{upto} are not replayed (C{after} is None when the epoch changed).
      - C{"hole"}: a journal position skipped numbers (C{after} + 1 .. C{upto} never came).
    """

    reason: str
    channels: tuple[str, ...] | None = None
    after: int | None = None
    upto: int | None = None
    at: float | None = None


@dataclass(frozen=True)
class Connected:
    """A socket is open; C{attempt} counts connections (1 is the first)."""

    attempt: int
    url: str  # without a token: tokens never travel in the URL


@dataclass(frozen=True)
class Disconnected:
    """
    The socket closed, or a connection attempt failed.  C{retry_in} is the delay before the
    next attempt, or None when the client stops (C{code}/C{status} say why).
    """

    code: int | None  # the WebSocket close code, when the socket had opened
    reason: str
    retry_in: float | None
    status: int | None = None  # the HTTP status of a refused handshake


@dataclass(frozen=True)
class Stream:
    """
    A journaled channel's position at open (C{{"event": "stream"}}); C{recovered} is None when
    no resume was asked for that channel, else whether the journal replays what was missed.
    """

    channel: str
    epoch: str
    seq: int
    recovered: bool | None


@dataclass(frozen=True)
class Refreshed:
    """The server took a new token in place (C{exp} is its expiry, or None)."""

    exp: float | None


@dataclass(frozen=True)
class RefreshFailed:
    """A refresh was refused or the token callback failed: the socket closes at C{exp} (3001)."""

    reason: str


@dataclass(frozen=True)
class ServerEvent:
    """A control message this client does not interpret (e.g. presence), as the server sent it."""

    data: dict[str, Any] = field(default_factory=dict)


Event = Connected | Disconnected | Stream | Gap | Refreshed | RefreshFailed | ServerEvent


class ClientError(Exception):
    """Base of the errors of L{pgws.client}."""


class Refused(ClientError):
    """
    The server refused the handshake for a reason another attempt would not change (C{reason}
    is pgws's one-line answer; C{hint}, when the client can tell, what to do about it).
    """

    def __init__(self, status: int | None, reason: str, hint: str | None = None) -> None:
        message = f"refused: {status} {reason}" if status else f"refused: {reason}"
        super().__init__(f"{message} ({hint})" if hint else message)
        self.status = status
        self.reason = reason


class ClientClosed(ClientError):
    """
    The client has stopped: the application closed it, or the server closed the socket with a
    code that reconnecting would not cure (C{code} and C{reason} are the server's).
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed: {code} {reason}" if code else f"closed: {reason}")
        self.code = code
        self.reason = reason


class QueueFull(ClientError):
    """C{send} while disconnected, with C{max_queued} messages already waiting: this one is not queued."""


class UnsentMessages(ClientError):
    """The client was closed with messages it never wrote to a socket (C{texts}, in order)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__(f"{len(texts)} message{'' if len(texts) == 1 else 's'} never sent")
        self.texts = texts
