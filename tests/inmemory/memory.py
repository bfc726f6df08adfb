"""
The in-memory test layer: the whole relay (twisted.web Site, Autobahn protocol, session, outbox,
listener, fan-out, registry) on a MemoryReactorClock, with WebSocket clients connected through
twisted.test.iosim, and a small stand-in for PostgreSQL's LISTEN/NOTIFY.  No sockets, no
database, no sleeping: time moves only when a test advances the clock.  The end-to-end tests in
tests/ check the same behaviour against a real PostgreSQL over real sockets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg2
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from pgws import Relay, load_config, make_site

SECRET = "reallyreallyreallyreallyverysafe"
# The memory clock starts here (seconds since the epoch), so that tokens' exp/nbf are realistic.
EPOCH = 1_800_000_000.0

_STATEMENT = re.compile(r'(UNLISTEN|LISTEN) "((?:[^"]|"")*)"')


def token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def envelope(channel: str, payload: str, claims: dict[str, Any], at: float,
             event: str = "WebsocketMessage") -> str:
    """The envelope the README describes, written independently of pgws: compact JSON, keys in
    this order, the token's claims in their order with message_delivered_at last."""
    body = {"event": event, "channel": channel, "payload": payload,
            "claims": {**claims, "message_delivered_at": at}}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class MemoryPostgres:
    """
    What pgws needs of PostgreSQL: LISTEN / UNLISTEN on one session, NOTIFY from the pool
    delivered in order to that session, and the means to take the database away, kill the
    session, or hold a LISTEN unanswered.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.up = True
        self.sessions: list[MemoryListenConnection] = []
        self.notified: list[tuple[str, str]] = []  # every NOTIFY that reached the database
        # LISTEN statements wait for release_listens(), and so does what follows them on their
        # session (one connection runs one statement at a time).
        self.hold_listen = False
        self._held: list[tuple[MemoryListenConnection, str, defer.Deferred[None]]] = []

    @property
    def session(self) -> MemoryListenConnection:
        """The LISTEN session currently connected."""
        live = [s for s in self.sessions if s.connected]
        assert len(live) == 1, f"{len(live)} connected LISTEN sessions"
        return live[0]

    def listening(self) -> set[str]:
        live = [s for s in self.sessions if s.connected]
        return set().union(*(s.channels for s in live)) if live else set()

    def notify(self, channel: str, payload: str) -> None:
        """A NOTIFY, as if another application had sent it."""
        self.notified.append((channel, payload))
        for session in self.sessions:
            if session.connected and channel in session.channels:
                session.deliver([(channel, payload)])

    def release_listens(self) -> None:
        """Execute the held statements, in the order they were sent."""
        held, self._held = self._held, []
        for session, sql, d in held:
            session.execute(sql)
            d.callback(None)

    def hold(self, session: MemoryListenConnection, sql: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._held.append((session, sql, d))
        return d


class MemoryListenConnection:
    """Stands in for pgws's txpostgres LISTEN connection (same methods, same callbacks)."""

    def __init__(self, db: MemoryPostgres, reactor: Any, received: Any, lost: Any) -> None:
        self.db = db
        self.reactor = reactor
        self._received = received
        self._lost = lost
        self.channels: set[str] = set()
        self.connected = False
        self.paused = False
        self.last_read = 0.0
        self.unread: list[tuple[str, str]] = []  # arrived while reading was paused
        self.statements: list[str] = []  # LISTEN / UNLISTEN statements executed, in order
        db.sessions.append(self)

    def connect(self, dsn: str, **settings: Any) -> defer.Deferred[None]:
        self.settings = settings
        if not self.db.up:
            return defer.fail(psycopg2.OperationalError("connection refused"))
        self.connected = True
        return defer.succeed(None)

    def runOperation(self, sql: str) -> defer.Deferred[None]:
        if not self.connected:
            return defer.fail(psycopg2.InterfaceError("connection already closed"))
        # One connection runs one statement at a time (txpostgres queues them): what follows a
        # held LISTEN waits behind it.
        held = any(session is self for session, _, _ in self.db._held)
        if held or (self.db.hold_listen and sql.startswith("LISTEN")):
            return self.db.hold(self, sql)
        self.execute(sql)
        return defer.succeed(None)

    def execute(self, sql: str) -> None:
        self.statements.append(sql)
        for verb, name in _STATEMENT.findall(sql):
            name = name.replace('""', '"')
            (self.channels.add if verb == "LISTEN" else self.channels.discard)(name)

    def runQuery(self, sql: str) -> defer.Deferred[list[tuple[Any, ...]]]:
        if not self.connected:
            return defer.fail(psycopg2.InterfaceError("connection already closed"))
        if sql == "SELECT pg_listening_channels()":
            return defer.succeed([(c,) for c in sorted(self.channels)])
        return defer.succeed([(1,)])

    def deliver(self, notifications: list[tuple[str, str]]) -> None:
        if self.paused:
            self.unread.extend(notifications)
            return
        self.last_read = self.reactor.seconds()
        self._received(notifications)

    def resumeReading(self) -> None:
        self.paused = False
        unread, self.unread = self.unread, []
        if unread:
            self.deliver(unread)

    def kill(self, why: str = "terminating connection due to administrator command") -> None:
        """
        pg_terminate_backend: the connection is lost.  As in txpostgres, the statements it was
        running fail first, then the loss is reported.
        """
        self._gone(psycopg2.OperationalError(why))
        self._lost(why, self)

    def close(self) -> None:
        self._gone(psycopg2.InterfaceError("connection already closed"))

    def _gone(self, error: Exception) -> None:
        """The connection is gone: the statements held on it fail."""
        self.connected = False
        self.channels.clear()
        mine = [h for h in self.db._held if h[0] is self]
        self.db._held = [h for h in self.db._held if h[0] is not self]
        for _, _, d in mine:
            d.errback(error)


class MemoryPool:
    """
    Stands in for the NOTIFY pool: each statement reaches the MemoryPostgres, in order.  With
    C{hold} set, statements wait unanswered until L{release}, which runs them as the database
    is then (up or not, refusing or not).
    """

    def __init__(self, db: MemoryPostgres) -> None:
        self.db = db
        self.statements: list[list[tuple[str, str]]] = []  # each one that succeeded, in order
        self.refuse: str | None = None  # a statement error (e.g. "payload string too long")
        self.hold = False
        self.held: list[tuple[list[tuple[str, str]], defer.Deferred[None]]] = []

    async def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self) -> defer.Deferred[Any]:
        return self.notify([]) if self.db.up else defer.fail(psycopg2.OperationalError("down"))

    def notify(self, pairs: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        if self.hold and pairs:
            d: defer.Deferred[None] = defer.Deferred()
            self.held.append((list(pairs), d))
            return d
        return self._run(pairs)

    def release(self) -> None:
        """Answer the statements held so far, in order (not those they lead to)."""
        held, self.held = self.held, []
        for pairs, d in held:
            self._run(pairs).chainDeferred(d)

    def _run(self, pairs: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        if not self.db.up:
            return defer.fail(psycopg2.OperationalError("server closed the connection"))
        if self.refuse is not None:
            return defer.fail(psycopg2.DataError(self.refuse))
        if pairs:
            self.statements.append(list(pairs))
        for channel, payload in pairs:
            self.db.notify(channel, payload)
        return defer.succeed(None)


class _ClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        client = self.factory.client
        if isBinary:
            client.controls.append(json.loads(payload))
        else:
            client.messages.append(payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client.closed = (code, reason)


@dataclass
class MemoryClient:
    """
    A WebSocket client over iosim: what it received, and how it was closed.  Each action is
    followed by C{flush}: the relay's, so that what it makes other sockets receive has arrived.
    """

    pump: iosim.IOPump
    protocol: _ClientProtocol
    flush: Callable[[], None]
    messages: list[str] = field(default_factory=list)
    controls: list[Any] = field(default_factory=list)  # binary frames, parsed as JSON
    opened: bool = False
    closed: tuple[int | None, str | None] | None = None

    def send(self, text: str) -> None:
        self.protocol.sendMessage(text.encode("utf-8"), isBinary=False)
        self.flush()

    def send_binary(self, data: bytes) -> None:
        self.protocol.sendMessage(data, isBinary=True)
        self.flush()

    def close(self) -> None:
        self.protocol.sendClose(1000)
        self.flush()

    def drop(self) -> None:
        """The client's TCP connection goes, without a closing handshake."""
        assert self.protocol.transport is not None
        self.protocol.transport.loseConnection()
        self.flush()

    @property
    def server_protocol(self) -> Any:
        return self.pump.server  # the HTTP channel; after the upgrade its transport's protocol


class MemoryRelay:
    """
    The relay of one test, in memory.  C{settings} are config keys with dashes or underscores;
    C{database_up=False} starts it with the database away (set C{db.up} to bring it back).
    Relays given the same C{db} are processes on one database, on its clock; C{relay_options}
    go to L{Relay} as they are.
    """

    def __init__(self, *, database_up: bool = True, db: MemoryPostgres | None = None,
                 relay_options: dict[str, Any] | None = None, **settings: Any) -> None:
        if db is None:
            clock = MemoryReactorClock()
            clock.advance(EPOCH)
            db = MemoryPostgres(clock)
            db.up = database_up
        self.clock = db.clock
        self.db = db
        cli = {"db-uri": "postgresql://memory/pgws", "jwt-secret": SECRET}
        cli.update({k.replace("_", "-"): str(v) for k, v in settings.items()})
        self.config = load_config(None, {}, cli)
        self.pool = MemoryPool(self.db)
        self.relay = Relay(
            self.config, reactor=self.clock, clock=self.clock.seconds, pool=self.pool,
            listen_connection=lambda reactor, received, lost: MemoryListenConnection(
                self.db, reactor, received, lost),
            **(relay_options or {}),
        )
        self.relay.startService()
        self.clock.advance(0)
        self.site = make_site(self.relay.resource(), reactor=self.clock)
        self._pumps: list[iosim.IOPump] = []

    def _server(self) -> tuple[Any, iosim.FakeTransport, IPv4Address]:
        """A new server-side HTTP connection: (protocol, transport, the server's address)."""
        port = 40000 + len(self._pumps)  # the client's port, told apart in the logs
        client_address = IPv4Address("TCP", "127.0.0.1", port)
        server_address = IPv4Address("TCP", "127.0.0.1", 3000)
        server = self.site.buildProtocol(client_address)
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_address,
                                        peerAddress=client_address)
        return server, server_io, server_address

    def open(self, path: str, protocols: Sequence[str] = (), headers: dict[str, str] | None = None,
             ) -> MemoryClient:
        """A WebSocket client on C{path}, connected and pumped until the handshake is over."""
        server, server_io, server_address = self._server()
        factory = WebSocketClientFactory(f"ws://127.0.0.1:3000{path}", reactor=self.clock,
                                         protocols=list(protocols), headers=headers or {})
        factory.protocol = _ClientProtocol
        protocol = factory.buildProtocol(server_address)
        assert isinstance(protocol, _ClientProtocol)
        client_io = iosim.FakeTransport(protocol, isServer=False, hostAddress=server_io.getPeer(),
                                        peerAddress=server_address)
        pump = iosim.connect(server, server_io, protocol, client_io, greet=False, clock=self.clock)
        client = MemoryClient(pump, protocol, self.flush)
        factory.client = client  # type: ignore[attr-defined]
        self._pumps.append(pump)
        self.flush()
        return client

    def request(self, raw: bytes) -> bytes:
        """Raw bytes in, the server's raw answer out (for refusals: status line and body)."""
        server, server_io, server_address = self._server()
        collected: list[bytes] = []

        class Collect(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(raw)

            def dataReceived(self, data: bytes) -> None:
                collected.append(data)

        proto = Collect()
        client_io = iosim.FakeTransport(proto, isServer=False, peerAddress=server_address)
        pump = iosim.connect(server, server_io, proto, client_io, greet=False, clock=self.clock)
        self._pumps.append(pump)
        self.flush()
        return b"".join(collected)

    def flush(self) -> None:
        """Move every byte that waits, in every connection, and run what is due now."""
        for _ in range(100):
            self.clock.advance(0)
            if not any([p.flush() for p in self._pumps]):
                return

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def advance_to(self, when: float) -> None:
        """Move the clock to exactly C{when} (an absolute time, e.g. a token's exp)."""
        self.advance(when - self.clock.seconds())
        assert self.clock.seconds() == when

    def notify(self, channel: str, payload: str) -> None:
        """A NOTIFY from another application, then everything that follows from it."""
        self.db.notify(channel, payload)
        self.flush()

    def stop(self) -> None:
        self.relay.stopService()
        self.flush()


def http_get(relay: MemoryRelay, path: str, extra: str = "", method: str = "GET",
             ) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request (C{extra}: header lines); (status, headers by lower-case name, body)."""
    raw = relay.request(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def upgrade_request(path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def status_and_body(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8")
