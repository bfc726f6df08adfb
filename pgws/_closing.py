"""
The WebSocket close codes pgws sends (the list with their meaning is in L{pgws._protocol}'s wire
protocol), and the wording of close reasons.
"""

from __future__ import annotations

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_INTERNAL_ERROR", "CLOSE_JWT_EXPIRED", "CLOSE_POLICY",
           "CLOSE_TOO_BIG", "CLOSE_TRY_LATER", "CLOSE_UNSUPPORTED_DATA", "close_reason",
           "plural"]

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_LATER = 1013
CLOSE_JWT_EXPIRED = 3001

# RFC 6455: a close frame's payload is at most 125 bytes, two of which are the code.
MAX_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """C{text}, cut (on a character boundary, with "...") to fit in a close frame."""
    data = text.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[:MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
