"""
pgws's wire protocol as L{pgws.client} speaks it (the server's side is written at the top of
L{pgws._protocol} and L{pgws._journal}): the socket URL with its resume query, the offered
subprotocols that carry the token, what a client can read from its own token, and the control
messages.  Pure functions: no sockets, no event loop.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["BEARER_PREFIX", "SUBPROTOCOL", "Control", "TokenFacts", "offered_protocols",
           "parse_control", "public_url", "redact", "refresh_request", "socket_url", "token_facts"]

# As pgws._credentials (which imports the server's token checks): pgws answers "pgws" and never
# echoes the "pgws.bearer.<jwt>" one, so the token stays out of URLs and proxies' logs.
SUBPROTOCOL = "pgws"
BEARER_PREFIX = "pgws.bearer."


def offered_protocols(token: str) -> list[str]:
    return [SUBPROTOCOL, BEARER_PREFIX + token]


_BEARER = re.compile(re.escape(BEARER_PREFIX) + r"[^\s,]*")


def redact(text: str) -> str:
    """C{text} (a log line) with the token of every C{pgws.bearer.<jwt>} subprotocol hidden."""
    return _BEARER.sub(BEARER_PREFIX + "<token>", text)


def socket_url(base: str, channel: str | None, resume: Mapping[str, tuple[int, str]],
               history: int | None = None) -> str:
    """
    The URL to open: C{base} (C{ws://host:port}, with a path prefix if pgws is mounted below
    one), then C{/<channel>} percent-encoded, then C{resume} (channel -> (seq, epoch)) as
    C{?resume=<JSON>} and C{history}; a query C{base} already has is kept.
    """
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"the URL must be ws:// or wss://, not {base!r}")
    path = parts.path.rstrip("/")
    path = f"{path}/{quote(channel, safe='')}" if channel is not None else path + "/"
    query = [parts.query] if parts.query else []
    if resume:
        positions = {name: [seq, epoch] for name, (seq, epoch) in sorted(resume.items())}
        query.append("resume=" + quote(json.dumps(positions, separators=(",", ":")), safe=""))
    if history:
        query.append(f"history={int(history)}")
    return urlunsplit((parts.scheme, parts.netloc, path, "&".join(query), ""))


def public_url(url: str) -> str:
    """C{url} without its query (positions are not secret, but they are long): for events."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class TokenFacts:
    """What a client may read from its own token, unverified (the server verifies it)."""

    channels: tuple[str, ...] | None  # None: the token does not say
    mode: str | None
    exp: float | None


def token_facts(token: str, requested: str | None = None) -> TokenFacts:
    """
    The socket's channels as pgws resolves them (the token's C{channel} over the requested one;
    else the requested one; else the token's C{channels}), its mode and C{exp}.  A token that is
    not a readable JWT gives no facts: the server will say what is wrong with it.
    """
    claims = _claims(token)
    channel, channels = claims.get("channel"), claims.get("channels")
    resolved: tuple[str, ...] | None = None
    if isinstance(channel, str):
        resolved = (channel,)
    elif requested is not None:
        resolved = (requested,)
    elif isinstance(channels, list) and all(isinstance(c, str) for c in channels):
        resolved = tuple(channels)
    mode = claims.get("mode")
    exp = claims.get("exp")
    return TokenFacts(resolved, mode if isinstance(mode, str) else None,
                      float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool)
                      else None)


def _claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        data = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(data)
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def refresh_request(token: str) -> bytes:
    """The binary control message that replaces the socket's token before its exp."""
    return json.dumps({"refresh": token}).encode("utf-8")


@dataclass(frozen=True)
class Control:
    """
    A binary frame, classified: C{kind} is C{"position"} (C{{"channel", "seq"}}: the next text
    frame is that journal message), C{"stream"}, C{"gap"}, C{"refreshed"}, or C{"other"} (a
    control message this client does not interpret, passed on as it is).
    """

    kind: str
    data: dict[str, Any]


def parse_control(payload: bytes) -> Control:
    try:
        data = json.loads(payload.decode("utf-8"))
    except ValueError:
        return Control("other", {"unreadable": payload[:200].decode("utf-8", "replace")})
    if not isinstance(data, dict):
        return Control("other", {"unreadable": data})
    event = data.get("event")
    if event == "stream" and _is_stream(data):
        return Control("stream", data)
    if event == "gap":
        return Control("gap", data)
    if "refreshed" in data and event is None:
        return Control("refreshed", data)
    if set(data) == {"channel", "seq"} and isinstance(data["channel"], str) and _is_seq(data["seq"]):
        return Control("position", data)
    return Control("other", data)


def _is_seq(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_stream(data: dict[str, Any]) -> bool:
    return (isinstance(data.get("channel"), str) and isinstance(data.get("epoch"), str)
            and _is_seq(data.get("seq")))
