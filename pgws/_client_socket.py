"""
One WebSocket of L{pgws.client}, on Autobahn's asyncio flavour: the Autobahn callbacks, each handed
to a L{Sink} (the client), and the HTTP status and one-line body of a refused handshake, which
Autobahn only puts in a log line.

Importing this module makes txaio (Autobahn's framework switch) use asyncio for the whole
process: L{pgws.client} imports it only when it connects, and a process that already runs
Autobahn on Twisted (the pgws server) cannot load it.

Autobahn logs through the standard C{logging} (txaio's asyncio flavour), under C{autobahn.*}, and
warns of every refused handshake ("dropping connection to peer ...: upgrade failed [401]").  In a
process that configured no logging, Python's last-resort handler would print each warning to
stderr: a library's loggers get a C{NullHandler}, so that they are quiet unless the application
configures logging (then the lines reach its handlers as before).  The client tells the
application of a refusal itself (L{pgws.client.Disconnected}, L{pgws.client.Refused}).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from collections.abc import Callable
from typing import Any, Protocol

from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url

from pgws._client_wire import redact

__all__ = ["Sink", "open_socket"]

logging.getLogger("autobahn").addHandler(logging.NullHandler())


class Sink(Protocol):
    """What a socket tells its client."""

    def opened(self, socket: ClientSocket) -> None: ...

    def received(self, payload: bytes, binary: bool) -> None: ...

    def closed(self, code: int | None, reason: str, status: int | None) -> None: ...


class _RedactedLog:
    """
    Autobahn's logger for this socket, each line through L{redact}: at debug level Autobahn logs
    the handshake request, whose C{Sec-WebSocket-Protocol} header carries the token.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, level: str) -> Callable[..., None]:
        method = getattr(self._inner, level)

        def log(format: str = "", **kwargs: Any) -> None:
            if level == "failure":  # log.failure(format, failure=None, ...): keep its shape
                method(format, **kwargs)
                return
            try:
                text = format.format(**kwargs)
            except (KeyError, IndexError, ValueError):
                text = format
            method("{line}", line=redact(text))

        return log


class ClientSocket(WebSocketClientProtocol):
    factory: WebSocketClientFactory
    sink: Sink
    log = _RedactedLog(WebSocketClientProtocol.log)
    refused: tuple[int, str] | None = None  # the status and body of a refused handshake

    def onOpen(self) -> None:
        self.sink.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sink.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.refused is not None:
            status, body = self.refused
            self.sink.closed(None, body, status)
        else:
            self.sink.closed(code, reason or "", None)

    def failHandshake(self, reason: str) -> None:
        # pgws refuses with an HTTP status and a one-line text/plain body saying why.
        status_line = getattr(self, "http_status_line", "") or ""
        parts = status_line.split()
        if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
            data: bytes = self.data or b""
            end = data.find(b"\r\n\r\n")
            body = data[end + 4:].decode("utf-8", "replace").strip() if end >= 0 else ""
            self.refused = (int(parts[1]), body.splitlines()[0] if body else " ".join(parts[2:]))
        super().failHandshake(reason)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


async def open_socket(url: str, protocols: list[str], sink: Sink, *,
                      ssl: ssl_module.SSLContext | None, ping_interval: float | None,
                      open_timeout: float) -> ClientSocket:
    """
    Connect a socket to C{url} (TCP, and TLS for C{wss://}); its opening handshake then runs and
    the sink hears how it ends.  Failing to connect at all raises C{OSError} or C{TimeoutError}.
    """
    loop = asyncio.get_running_loop()
    secure, host, port, _, _, _ = parse_url(url)
    factory = WebSocketClientFactory(url, protocols=protocols, loop=loop)
    factory.setProtocolOptions(openHandshakeTimeout=open_timeout, closeHandshakeTimeout=5,
                               autoPingInterval=ping_interval or 0,
                               autoPingTimeout=min(10.0, ping_interval or 10.0))

    def make() -> ClientSocket:
        socket = ClientSocket()
        socket.factory = factory
        socket.sink = sink
        return socket

    context = (ssl or ssl_module.create_default_context()) if secure else None
    _, socket = await asyncio.wait_for(
        loop.create_connection(make, host, port, ssl=context), open_timeout)
    return socket
