"""
When L{pgws.client} reconnects, how long it waits, and when it refreshes its token.  Pure: the
clock and the randomness are parameters.

Reconnecting: every close and every failed attempt is followed by another attempt, except
  - the application's own close;
  - close codes that say the client broke the protocol or sent what pgws cannot take, which
    another socket would only repeat: 1002 (protocol error), 1003 (a binary frame that is not
    a control message), 1007 (text that is not UTF-8), 1009 (a message over the size limit),
    1010 (an extension); the message is lost, and the application must hear of it;
  - 3001 (the token expired) when the token is a fixed string: there is no fresh one to use;
  - a refused handshake that another attempt would not change: any 4xx but 408 and 429
    (400 bad path, 401 bad or expired token, 403 not allowed).
Everything else reconnects: 1001 (server stopping), 1006 (connection lost), 1008 (read too
slowly), 1011 (database error, or a journal replay that failed: "resume from your last
position"), 1013 (database away), 3001 with a token callback, 5xx (503: database unavailable,
max-connections, shutting down), and failures to connect at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pgws._closing import (
    CLOSE_JWT_EXPIRED,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
)

__all__ = ["Backoff", "final_close", "final_refusal", "refresh_delay"]

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_TEXT = 1007
CLOSE_EXTENSION = 1010
FINAL_CLOSE_CODES = frozenset({CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, CLOSE_INVALID_TEXT,
                               CLOSE_TOO_BIG, CLOSE_EXTENSION})


def final_close(code: int | None, renewable: bool) -> bool:
    """Whether a close with C{code} ends the client (C{renewable}: a token callback is given)."""
    if code == CLOSE_JWT_EXPIRED:
        return not renewable
    return code in FINAL_CLOSE_CODES


def final_refusal(status: int) -> bool:
    """Whether a handshake refused with HTTP C{status} ends the client."""
    return 400 <= status < 500 and status not in (408, 429)


class Backoff:
    """
    Delays between attempts: exponential (C{first}, doubling up to C{cap}) with "equal jitter",
    each delay drawn between half its step and the whole step, so that the clients of a
    restarted server come back spread over time, yet never sooner than half a step.

    L{reset} starts again from C{first}; the client calls it once a socket has stayed open for
    C{stable} seconds (a server that closes every socket at once is not hammered).
    """

    def __init__(self, first: float = 0.25, cap: float = 15.0, stable: float = 5.0,
                 rng: Callable[[], float] | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"back-off needs 0 < first <= cap, not {first}, {cap}")
        self.first = first
        self.cap = cap
        self.stable = stable
        self._random = rng if rng is not None else random.random
        self._step = first

    def next(self) -> float:
        step = self._step
        self._step = min(self._step * 2, self.cap)
        return step / 2 + self._random() * step / 2

    def reset(self) -> None:
        self._step = self.first


def refresh_delay(exp: float | None, now: float, ahead: float | None) -> float | None:
    """
    Seconds from C{now} until a token expiring at C{exp} is refreshed: C{ahead} seconds before
    C{exp}, or half-way there for a token with less than twice C{ahead} left; None for no refresh
    (no C{exp}, or C{ahead} None).  An expired token is refreshed at once (0).
    """
    if exp is None or ahead is None:
        return None
    left = exp - now
    if left <= 0:
        return 0.0
    return left - min(ahead, left / 2)
