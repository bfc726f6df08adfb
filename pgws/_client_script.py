"""
C{/pgws.js}: the JavaScript client (C{pgws/static/pgws.js}, shipped inside the package), served by
pgws itself whether or not C{server-root} is set, so that a page anywhere can
C{import { connect } from "https://pgws.example.com/pgws.js"}.

A module script from another origin is fetched in CORS mode and refused without
C{Access-Control-Allow-Origin}, and browsers refuse a module whose type is not JavaScript: the
file is public, so it carries C{*}.  Its URL has no version in it, so it is cached as
C{no-cache} with an C{ETag} of its content: a browser keeps it and asks again each time (a 304
while it is the same file), and a pgws upgrade reaches every page at its next load.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from twisted.web import http, server

from pgws._getonly import GetOnlyResource

__all__ = ["ClientScript", "SCRIPT_NAME"]

SCRIPT_NAME = b"pgws.js"


def _shipped() -> bytes:
    return resources.files("pgws").joinpath("static", "pgws.js").read_bytes()


class ClientScript(GetOnlyResource):
    """The client file, read once (at start-up: a package without it fails then, not later)."""

    def __init__(self, body: bytes | None = None) -> None:
        super().__init__()
        self._body = _shipped() if body is None else body
        self._etag = b'"' + hashlib.sha256(self._body).hexdigest()[:32].encode() + b'"'

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.setETag(self._etag) == http.CACHED:  # If-None-Match matched: 304, no body
            return b""
        return self._body
