"""
Test helpers: real WebSocket clients (Autobahn over loopback), raw HTTP handshakes for refusals,
token minting, a pgws server started in-process on a free port, and outside database access.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg2
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure

from pgws._config import load_config
from pgws._service import Relay
from pgws._web import make_site

SECRET = "reallyreallyreallyreallyverysafe"
TIMEOUT = 10.0


def token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def wait(d: defer.Deferred[Any], timeout: float = TIMEOUT) -> defer.Deferred[Any]:
    """Every wait in the suite is bounded: a hang fails the test instead of the run."""
    return d.addTimeout(timeout, reactor)


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], Any], what: str, timeout: float = TIMEOUT,
                step: float = 0.02) -> Any:
    """
    Poll C{check} (a function, or an async one) until it returns something true, and return that;
    fail with C{what} after C{timeout} seconds.  For conditions no event announces.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await sleep(step)


def tcp(proto: protocol.Protocol) -> ITCPTransport:
    """A connected protocol's transport, as the TCP transport it is (Twisted types it ITransport)."""
    transport = proto.transport
    assert ITCPTransport.providedBy(transport), transport
    return transport


class _ClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client.messages.put(payload.decode("utf-8") if not isBinary else payload)

    def onPong(self, payload: bytes) -> None:
        self.factory.client.pongs.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(code, reason)


@dataclass
class AheadClock:
    """
    Wall-clock time C{ahead} seconds in the future, for a relay's C{clock}: with C{ahead} = 59.7,
    a token whose exp is a minute away by the real clock expires 0.3 s of real time after now.
    The relay's expiry timer runs on the real reactor, which is why this shifts, never scales.
    """

    ahead: float

    def __call__(self) -> float:
        return time.time() + self.ahead


@dataclass
class Client:
    """A WebSocket client: C{messages} is a queue of received texts; C{closed} fires (code, reason)."""

    messages: defer.DeferredQueue[Any] = field(default_factory=defer.DeferredQueue)
    opened: defer.Deferred[Any] = field(default_factory=defer.Deferred)
    closed: defer.Deferred[tuple[int | None, str | None]] = field(default_factory=defer.Deferred)
    proto: _ClientProtocol | None = None
    pongs: list[bytes] = field(default_factory=list)  # the payload of each pong, in order

    def _opened(self, proto: _ClientProtocol) -> None:
        self.proto = proto
        self.opened.callback(self)

    def _closed(self, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, text: str) -> None:
        assert self.proto is not None
        self.proto.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        assert self.proto is not None
        self.proto.sendMessage(data, isBinary=True)

    async def next(self, timeout: float = TIMEOUT) -> Any:
        return await wait(self.messages.get(), timeout)

    async def next_json(self, timeout: float = TIMEOUT) -> Any:
        return json.loads(await self.next(timeout))

    async def refresh(self, jwt_text: str) -> dict[str, Any]:
        """Send a token refresh; its answer, a binary JSON message, must be the next message."""
        assert self.proto is not None
        self.proto.sendMessage(json.dumps({"refresh": jwt_text}).encode(), isBinary=True)
        reply = await self.next()
        assert isinstance(reply, bytes), reply
        return json.loads(reply)

    async def received_before_barrier(self, jwt_text: str) -> list[Any]:
        """
        A barrier on this socket: send a token refresh (C{jwt_text} grants what the socket has)
        and return every message that arrived before its answer.  The server writes the answer on
        the same TCP stream, after everything it wrote to this socket before it read the refresh:
        whatever the server sent this socket until then is in the list.  A socket that closes
        instead fails at once.
        """
        assert self.proto is not None
        assert not self.closed.called, f"the socket is closed: {self.closed.result!r}"
        self.proto.sendMessage(json.dumps({"refresh": jwt_text}).encode(), isBinary=True)
        before: list[Any] = []
        while True:
            message = await self._next_while_open()
            if isinstance(message, bytes) and "refreshed" in (reply := json.loads(message)):
                assert reply["refreshed"] is True, reply
                return before
            before.append(message)

    async def _next_while_open(self) -> Any:
        got = self.messages.get()
        closed: defer.Deferred[Any] = defer.Deferred()

        def passthrough(result: Any) -> Any:
            closed.callback(result)
            return result

        self.closed.addBoth(passthrough)
        first, index = await wait(defer.DeferredList([got, closed], fireOnOneCallback=True,
                                                     fireOnOneErrback=True, consumeErrors=True))
        if index == 1:
            got.cancel()  # its message, if one comes, stays in the queue
            got.addErrback(lambda f: f.trap(defer.CancelledError))
            raise AssertionError(f"the socket closed {first!r}; received before: "
                                 f"{self.messages.pending!r}")
        return first

    def close(self) -> None:
        if self.proto is not None:
            self.proto.sendClose(1000)


async def ws_connect(port: int, path: str, headers: dict[str, str] | None = None,
                     trust_pem: bytes | None = None, protocols: list[str] | None = None) -> Client:
    """
    Open a WebSocket to 127.0.0.1:port + path and wait until it is open; with C{trust_pem},
    over TLS (wss://) trusting that certificate.
    """
    client = Client()
    scheme = "wss" if trust_pem else "ws"
    factory = WebSocketClientFactory(f"{scheme}://localhost:{port}{path}", headers=headers or {},
                                     protocols=protocols or [])
    factory.protocol = _ClientProtocol
    factory.client = client  # type: ignore[attr-defined]
    endpoint: Any
    if trust_pem:
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint

        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(trust_pem))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
    else:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await wait(endpoint.connect(factory))
    await wait(client.opened)
    return client


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class _Raw(protocol.Protocol):
    """
    Sends raw bytes and collects the answer until the server closes; with C{hang_up_after_101}
    it hangs up itself once a 101 head has arrived (an accepted socket would stay open).
    """

    def __init__(self, request: bytes, hang_up_after_101: bool = False) -> None:
        self.request = request
        self.hang_up_after_101 = hang_up_after_101
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        tcp(self).write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if (self.hang_up_after_101 and self.data.startswith(b"HTTP/1.1 101 ")
                and b"\r\n\r\n" in self.data):
            tcp(self).abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(self.data)


async def http_request(port: int, raw: bytes) -> HttpResponse:
    """Send raw bytes, read until the server closes, parse the response."""
    proto = _Raw(raw)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: proto)))
    data = await wait(proto.done)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(status, headers, body)


def upgrade_request(path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


async def handshake(port: int, path: str) -> HttpResponse:
    """A WebSocket upgrade request whose answer is read raw (to see refusals' status and body)."""
    return await http_request(port, upgrade_request(path))


def application_name() -> str:
    """
    A name of its own for a test server's sessions: a test that terminates or stops "its" LISTEN
    session must never touch another server's, nor another pgws on a shared database.
    """
    return f"pgws-test-{uuid.uuid4().hex[:8]}"


@dataclass
class Server:
    relay: Relay
    port: int
    listening: Any
    application_name: str

    async def stop(self) -> None:
        await self.listening.stopListening()
        self.relay.stopService()

    async def listening_channels(self) -> list[str]:
        return sorted(await self.relay.listener.listening_channels())

    @property
    def listener_name(self) -> str:
        """The application_name of this server's LISTEN session in pg_stat_activity."""
        return f"{self.application_name} listener"

    def listener_pids(self, db: Db) -> list[int]:
        """The backends of this server's LISTEN session (one while it is connected)."""
        return [pid for (pid,) in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.listener_name,))]

    def terminate_listener(self, db: Db) -> int:
        """Terminate this server's LISTEN session, and no other; how many backends that ended."""
        rows = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s", (self.listener_name,))
        return sum(1 for (ended,) in rows if ended)


async def start_server(db_uri: str, relay_options: dict[str, Any] | None = None,
                       **settings: Any) -> Server:
    """A relay on a free port of 127.0.0.1; its sessions are named by a fresh L{application_name}."""
    cli = {"db-uri": db_uri, "jwt-secret": SECRET, "server-port": 0,
           "application-name": application_name()}
    cli.update({k.replace("_", "-"): v for k, v in settings.items()})
    config = load_config(None, {}, {k: v for k, v in cli.items() if v is not None})
    relay = Relay(config, reactor=reactor, **(relay_options or {}))
    relay.startService()
    await wait(relay.whenReady())
    # Twisted types the factory as ServerFactory[Protocol] and Factory is invariant: a Site (a
    # ServerFactory of HTTP channels) does not match, though listenTCP takes any server factory.
    listening = reactor.listenTCP(0, make_site(relay.resource()), backlog=1024,  # type: ignore[arg-type]
                                  interface="127.0.0.1")
    address = listening.getHost()
    assert isinstance(address, IPv4Address), address
    return Server(relay, address.port, listening, config.application_name)


class Db:
    """Outside access to PostgreSQL, as another application would have it."""

    def __init__(self, uri: str) -> None:
        self.conn = psycopg2.connect(uri)
        self.conn.autocommit = True

    def execute(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def notify(self, channel: str, payload: str) -> None:
        self.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def listen(self, channel: str) -> None:
        self.execute(f'LISTEN "{channel}"')

    async def received(self, count: int, timeout: float = TIMEOUT) -> list[tuple[str, str]]:
        """
        Wait (letting the reactor run) until C{count} notifications arrived, the timeout passed,
        or the server closed the connection (a server that is shut down).
        """
        got: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline and not self.conn.closed:
            await sleep(0.02)
            try:
                self.conn.poll()
            except psycopg2.OperationalError:
                pass  # closed by the server: what arrived before is in notifies
            while self.conn.notifies:
                n = self.conn.notifies.pop(0)
                got.append((n.channel, n.payload))
        return got

    def close(self) -> None:
        self.conn.close()


@functools.cache
def self_signed_certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost / 127.0.0.1: (certificate PEM, key PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_certificate(folder: Any) -> tuple[str, str, bytes]:
    """The self-signed certificate written to C{folder}: (certificate path, key path, PEM)."""
    from pathlib import Path

    pem, key_pem = self_signed_certificate()
    folder = Path(folder)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(key_pem)
    return str(folder / "cert.pem"), str(folder / "key.pem"), pem
