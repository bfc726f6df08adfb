"""
The HTTP side: one C{twisted.web} resource that takes WebSocket upgrades (any path) and serves
static files from C{server-root} for everything else; and a C{Site} whose access log never shows
a token.

L{RelayResource} can be mounted anywhere in another program's resource tree: the WebSocket path
is taken relative to where it is mounted.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.web import http, resource, server

from pgws._client_script import SCRIPT_NAME, ClientScript
from pgws._factory import RelayFactory
from pgws._getonly import GetOnlyResource
from pgws._redact import redact_path

with warnings.catch_warnings():
    # twisted.web.static warns about a deprecated name on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web import static

__all__ = ["RelayResource", "make_site", "access_log_line"]


def _is_websocket(request: server.Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class _MountedWebSocketResource(WebSocketResource):
    """
    Autobahn replays the request line to its protocol using C{request.uri}; pgws wants the path
    below the mount point, so that C{/ws/<channel>/<jwt>} under a C{/ws} mount means channel and
    token, not C{ws} and channel.
    """

    def render(self, request: server.Request) -> Any:
        # postpath is percent-decoded by twisted.web; the raw segments are taken from the URI
        # (decoding is pgws's job, and a decoded space would break the replayed request line).
        path, sep, query = request.uri.partition(b"?")
        raw = path.split(b"/")
        count = len(request.postpath or ())
        below = b"/" + b"/".join(raw[len(raw) - count:] if count else [])
        request.uri = below + sep + query
        result = super().render(request)
        # The HTTP side is done with this connection: its idle timer would keep the channel and
        # the request (a few KB) alive for another 10 s per socket.
        channel = request.channel
        if channel is not None:
            channel.setTimeout(None)
            channel.requests = []
        return result


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


_NOT_FOUND = _NotFound()


class _StaticFiles(static.File):
    """Files below the root only; no directory listings; plain-text 404s."""

    childNotFound = _NOT_FOUND  # type: ignore[assignment]
    forbidden = _NOT_FOUND  # type: ignore[assignment]

    def directoryListing(self) -> resource.Resource:
        return self.childNotFound


class Health(Protocol):
    async def readiness(self) -> str | None:
        """None when ready, else the reason it is not."""


class _Live(GetOnlyResource):
    """The process serves HTTP: that is all liveness means."""

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class _Ready(GetOnlyResource):
    """200 when relaying works, 503 with the reason otherwise."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")

        def answer(why: str | None) -> None:
            if request.finished or request._disconnected:
                return
            if why is not None:
                request.setResponseCode(503)
            body = ((why or "ready") + "\n").encode("utf-8")
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()

        d = Deferred.fromCoroutine(self._health.readiness())
        d.addCallback(answer)
        d.addErrback(lambda f: answer(f"readiness check failed: {f.getErrorMessage()}"))
        return server.NOT_DONE_YET


class RelayResource(resource.Resource):
    """WebSocket upgrades go to pgws; C{livez}/C{readyz} answer health checks; C{pgws.js} is the
    JavaScript client (pgws's own, even if C{server-root} has a file of that name); C{metrics}
    the Prometheus metrics (when given); other requests get static files (or 404)."""

    def __init__(self, factory: RelayFactory, static_root: str | None = None,
                 health: Health | None = None, metrics: resource.Resource | None = None) -> None:
        super().__init__()
        self._websocket = _MountedWebSocketResource(factory)
        # pgws's own paths, each a single segment, ahead of server-root's files.
        self._own: dict[bytes, resource.Resource] = {SCRIPT_NAME: ClientScript()}
        if health is not None:
            self._own.update({b"livez": _Live(), b"readyz": _Ready(health)})
        if metrics is not None:
            self._own[b"metrics"] = metrics
        self._static: resource.Resource | None = _StaticFiles(static_root) if static_root else None

    def getChildWithDefault(self, name: bytes, request: server.Request) -> resource.Resource:
        if _is_websocket(request):
            # Everything from here down is the WebSocket path.
            assert request.postpath is not None and request.prepath is not None
            request.postpath.insert(0, request.prepath.pop())
            return self._websocket  # type: ignore[return-value]  # Autobahn's is an IResource
        if name in self._own and not request.postpath:
            return self._own[name]
        if self._static is None:
            return _NOT_FOUND
        child: resource.Resource = self._static.getChildWithDefault(name, request)
        return child

    def render(self, request: server.Request) -> Any:
        if _is_websocket(request):
            return self._websocket.render(request)
        return (self._static or _NOT_FOUND).render(request)


def access_log_line(timestamp: str, request: server.Request) -> str:
    """An access-log line with the path's token-like parts hidden and no query string."""
    addr = request.getClientAddress()
    host = getattr(addr, "host", "-")
    method = request.method.decode("latin-1", "replace")
    path = redact_path(request.uri.decode("latin-1", "replace"))
    return f'{host} - - {timestamp} "{method} {path}" {request.code} {request.sentLength or "-"}'


# A request's line and headers must be complete this long after the connection opened.
REQUEST_DEADLINE = 10.0


class _Channel(http.HTTPChannel):
    """
    twisted.web's HTTP connection, with two answers it lacks: a line over its 16 KiB limit gets a
    one-line 431 instead of a silent close, and a request whose headers are not complete within
    L{REQUEST_DEADLINE} seconds is dropped (the idle timeout alone restarts on every byte, so a
    trickling client could hold the socket for ever).
    """

    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        deadline = getattr(self.factory, "request_deadline", REQUEST_DEADLINE)
        self._deadline = self.callLater(deadline, self._too_late)

    def _too_late(self) -> None:
        self._deadline = None
        transport: Any = self.transport  # a TCP transport: an ITCPTransport
        if transport is not None:
            transport.abortConnection()

    def _met_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def allHeadersReceived(self) -> None:
        self._met_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Any = None) -> None:
        self._met_deadline()
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        body = f"the request line or a header is longer than {self.MAX_LENGTH} bytes\n".encode()
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        transport.loseConnection()


def make_site(root: resource.Resource, **kwargs: Any) -> server.Site:
    """
    A Site for pgws's resource: its access log hides tokens, a request must arrive within
    L{REQUEST_DEADLINE} seconds, and an idle keep-alive connection is closed after 10 s.
    """
    kwargs.setdefault("timeout", 10)
    site = server.Site(root, logFormatter=access_log_line, **kwargs)
    site.request_deadline = REQUEST_DEADLINE  # type: ignore[attr-defined]
    # Plain HTTP/1.1 channels (pgws negotiates no HTTP/2), with the answers above.
    site.protocol = _Channel  # type: ignore[method-assign,assignment]
    return site

