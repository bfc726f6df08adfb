"""
What the opening handshake needs beyond Autobahn: the Origin rule, a refusal whose body says why,
and forgetting the handshake once the socket is open.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from http.client import responses
from typing import Any

from pgws._auth import Refusal
from pgws._channelname import show_channel

__all__ = ["check_origin", "forget_handshake", "refusal_response"]


def check_origin(allowed: Iterable[str], origin: str | None) -> None:
    """
    Browsers send C{Origin}; a page from a site not in C{allowed-origins} is refused (403).
    Clients that send no Origin (not browsers) are not subject to it.  (Checked here rather than
    by Autobahn, which answers a foreign origin with 400 and no reason.)
    """
    patterns = tuple(allowed)
    if origin is None or "*" in patterns:
        return
    if not any(fnmatch.fnmatchcase(origin, pattern) for pattern in patterns):
        raise Refusal(403, f"origin {show_channel(origin)} is not allowed")


def refusal_response(code: int, line: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """
    An HTTP response refusing a handshake with a one-line C{text/plain} body: Autobahn answers
    with a status line only, and clients and people need the reason.
    """
    body = (line + "\n").encode("utf-8", "backslashreplace")
    head = [
        f"HTTP/1.1 {code} {responses.get(code, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    head.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _SendQueue(list[Any]):
    """What Autobahn needs of its send queue (append, popleft, len), in 56 bytes when empty."""

    def popleft(self) -> Any:
        return self.pop(0)


# What Autobahn keeps of the opening handshake and never reads again: a few KB per idle socket
# (the request, its headers, the offered subprotocols -- a token among them).
_HANDSHAKE_ATTRIBUTES = (
    "http_request_data", "http_headers", "http_status_line", "http_request_uri",
    "http_request_path", "http_request_params", "http_request_host", "http_response_data",
    "websocket_protocols", "websocket_extensions", "websocket_origin",
)


def forget_handshake(protocol: Any) -> None:
    """Drop what an open Autobahn protocol keeps of its handshake: memory, and the token."""
    for name in _HANDSHAKE_ATTRIBUTES:
        if name in protocol.__dict__:
            setattr(protocol, name, None)
    # Autobahn's send queue is almost always empty, and an empty deque costs 600+ bytes.
    if not protocol.send_queue:
        protocol.send_queue = _SendQueue()
