"""
Keeping tokens out of logs: anything shaped like a JWT (three base64url parts joined by dots, or a
long base64url run) becomes C{<token>} before a path, a request line or a reason is logged.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

# A JWT's header is base64 of at least '{"alg":"none"}', 20 characters: a shorter first part is a
# host name or a dotted channel name (evil.example.com, orders.eu.west), which the log should show.
_JWT = re.compile(r"[A-Za-z0-9_\-=%]{16,}\.[A-Za-z0-9_\-=%]+\.[A-Za-z0-9_\-=%]*")
# A JWT's header is base64 of '{"...', so it starts with "eyJ"; a cut-off token still does.
_JWT_START = re.compile(r"eyJ[A-Za-z0-9_\-=%.+/]*")
_LONG = re.compile(r"[A-Za-z0-9_\-=%+]{32,}")


def redact(text: str) -> str:
    """C{text} with every token-like run replaced by C{<token>}."""
    return _LONG.sub("<token>", _JWT_START.sub("<token>", _JWT.sub("<token>", text)))


def redact_path(path: str) -> str:
    """A request path for logs: the query string dropped, token-like segments hidden."""
    return redact(path.split("?", 1)[0])
