"""
Where the token of a handshake is: in the URL (the original's way), in an offered subprotocol,
or in an C{Authorization: Bearer} header.

A token in a URL ends up in proxy and browser logs (postgres-websockets issue 84).  Browsers cannot
set headers on a WebSocket, but they can offer subprotocols: a client offers
C{["pgws", "pgws.bearer.<jwt>"]} and pgws answers C{pgws}, never echoing the token (Kubernetes and
Jupyter carry tokens the same way).  Non-browser clients may send C{Authorization: Bearer <jwt>}.
With the token in a header, the path is C{/<channel>} or C{/}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pgws._auth import Refusal, split_path

__all__ = ["BEARER_PREFIX", "SUBPROTOCOL", "locate"]

SUBPROTOCOL = "pgws"
BEARER_PREFIX = "pgws.bearer."


def _header_token(headers: Mapping[str, str], protocols: Sequence[str]) -> str | None:
    for offered in protocols:
        if offered.startswith(BEARER_PREFIX):
            return offered[len(BEARER_PREFIX):]
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def locate(uri: str, headers: Mapping[str, str], protocols: Sequence[str]) -> tuple[str | None, str]:
    """
    (requested channel or None, token) of a handshake, or a L{Refusal}.

    @param uri: the raw request URI (not percent-decoded).
    @param headers: request headers, names in lower case.
    @param protocols: the subprotocols the client offered.
    """
    token = _header_token(headers, protocols)
    if token is None:
        return split_path(uri)
    path = uri.split("?", 1)[0]
    if path.strip("/") == "":
        return None, token
    if path.count("/") != 1:
        raise Refusal(400, "with the token in a header, the path must be /<channel> or /")
    channel, _ = split_path(path + "/" + token)
    return channel, token


def accepted_subprotocol(protocols: Sequence[str]) -> str | None:
    """The subprotocol pgws answers with: C{pgws} if offered (never the token-carrying one)."""
    return SUBPROTOCOL if SUBPROTOCOL in protocols else None
