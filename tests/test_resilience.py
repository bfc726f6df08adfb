"""
Faults injected against a real PostgreSQL: a killed LISTEN session, a restarted server, a database
that is down at start-up or away while clients write, slow readers during a burst.  Each test is
bounded in time; none relies on timing for its verdict beyond generous deadlines.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer, IReactorSocket

from pgws._embedded import EmbeddedPostgres
from support import (
    Db,
    _Raw,
    handshake,
    http_request,
    sleep,
    start_server,
    tcp,
    token,
    until,
    upgrade_request,
    wait,
    ws_connect,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_pg():
    """A PostgreSQL of this test's own, that it may stop and start again (same port, same data)."""
    parent = Path(tempfile.mkdtemp(prefix="pgws-fault-"))
    parent.chmod(0o755)
    pg = EmbeddedPostgres(data_dir=parent / "data", port=free_port(), throwaway=False)
    yield pg
    pg.stop()
    shutil.rmtree(parent, ignore_errors=True)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def eventually(check, timeout: float = 30, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await sleep(step)


@pytest_twisted.ensureDeferred
async def test_livez_and_readyz(db_uri):
    server = await start_server(db_uri)
    try:
        live = await http_request(server.port, get("/livez"))
        ready = await http_request(server.port, get("/readyz"))
        assert (live.status, live.body) == (200, b"ok\n")
        assert (ready.status, ready.body) == (200, b"ready\n")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_database_down_at_start_up_then_up(own_pg):
    uri = f"postgresql://postgres@127.0.0.1:{own_pg._requested_port}/postgres"
    server = await start_server(uri)  # nothing listens there yet
    try:
        assert (await http_request(server.port, get("/livez"))).status == 200
        ready = await http_request(server.port, get("/readyz"))
        assert (ready.status, ready.body) == (503, b"the LISTEN session is not connected\n")
        refused = await handshake(server.port, "/late/" + token({"mode": "rw"}))
        assert (refused.status, refused.text) == (503, "the database is unavailable; try again later\n")
        own_pg.start()
        started = time.monotonic()

        async def relaying():
            return (await http_request(server.port, get("/readyz"))).status == 200

        assert await eventually(relaying, timeout=40), "pgws did not start relaying"
        client = await ws_connect(server.port, "/late/" + token({"mode": "rw"}))
        client.send("finally")
        assert (await client.next_json())["payload"] == "finally"
        print(f"relaying {time.monotonic() - started:.1f} s after PostgreSQL came up")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_killed_listen_session_recovers_while_messages_flow(db_uri, db: Db):
    server = await start_server(db_uri)
    try:
        readers = {ch: await ws_connect(server.port, f"/{ch}/" + token({"mode": "r"}),
                                        headers=None) for ch in ("k1", "k2", "k3")}
        gap_reader = await ws_connect(server.port, "/k1/" + token({"mode": "r"}),
                                      protocols=["pgws"])
        assert sorted(await server.listening_channels()) == ["k1", "k2", "k3"]
        assert server.terminate_listener(db) == 1  # this server's session, and only it
        killed = time.monotonic()
        # Notifications keep being sent; once the session is back, every later one arrives.
        listener = server.relay.listener

        async def back():
            return listener.connected and listener.losses >= 1

        assert await eventually(back, timeout=40)
        recovery = time.monotonic() - killed
        for i in range(20):
            for ch in readers:
                db.notify(ch, f"after {i}")
        for ch, reader in readers.items():
            got = [await reader.next() for _ in range(20)]
            assert got == [f"after {i}" for i in range(20)], ch
            assert not reader.closed.called
        assert sorted(await server.listening_channels()) == ["k1", "k2", "k3"]
        gap = await gap_reader.next()
        assert isinstance(gap, bytes) and json.loads(gap)["event"] == "gap"
        print(f"LISTEN session recovered {recovery:.2f} s after pg_terminate_backend")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_restarted_postgres_under_load(own_pg):
    uri = own_pg.start()
    server = await start_server(uri)
    db = Db(uri)
    try:
        reader = await ws_connect(server.port, "/load/" + token({"mode": "r"}))
        writer = await ws_connect(server.port, "/load/" + token({"mode": "w"}))
        for i in range(50):
            writer.send(f"before {i}")
        for _ in range(50):
            await reader.next()
        db.close()
        own_pg.stop()
        stopped = time.monotonic()
        for i in range(5):
            writer.send(f"during {i}")  # kept while the database is away
        listener = server.relay.listener

        async def lost():
            return not listener.connected

        # PostgreSQL comes back only once pgws has noticed it gone.
        assert await eventually(lost, timeout=30), "pgws did not notice PostgreSQL stopping"
        own_pg.start()
        db = Db(uri)

        async def back():
            return listener.connected

        assert await eventually(back, timeout=60)
        recovery = time.monotonic() - stopped
        got = [json.loads(await reader.next(timeout=30))["payload"] for _ in range(5)]
        assert got == [f"during {i}" for i in range(5)]
        db.notify("load", "after restart")
        assert await reader.next() == "after restart"
        assert not reader.closed.called and not writer.closed.called
        print(f"relaying again {recovery:.1f} s after PostgreSQL was stopped")
    finally:
        db.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_queue_bound_while_database_away_closes_1013_with_the_count(own_pg):
    uri = own_pg.start()
    server = await start_server(uri, max_queued_messages=10)
    db = Db(uri)
    try:
        db.listen("q")
        writer = await ws_connect(server.port, "/q/" + token({"mode": "w"}))
        writer.send("first")
        [(_, first)] = await db.received(1)  # sent while the database is there
        assert json.loads(first)["payload"] == "first"
        db.close()
        own_pg.stop()
        # Paced, as a client writes: each message meets a database that is away.
        for i in range(30):
            if writer.closed.called:
                break
            writer.send(f"queued {i}")
            await sleep(0.05)
        code, reason = await wait(writer.closed, timeout=20)
        assert code == 1013
        assert reason == "database unavailable: 11 messages not sent"
    finally:
        db.close()
        await server.stop()


class SlowReader(protocol.Protocol):
    """Completes the handshake, then never reads again (its TCP window fills up)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.head = b""
        self.opened = False

    def connectionMade(self) -> None:
        tcp(self).write(upgrade_request(self.path).replace(b"Connection: close\r\n", b""))

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head and not self.opened:
            self.opened = True
            IPushProducer(tcp(self)).pauseProducing()


def factory_of(proto: protocol.Protocol) -> protocol.ServerFactory:
    """A factory that hands out C{proto} itself."""
    factory = protocol.ServerFactory()
    factory.protocol = lambda: proto
    return factory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class CountingReader(WebSocketClientProtocol):
    """A reader that checks order and counts, keeping nothing (so the test's memory stays flat)."""

    factory: CountingFactory

    def onOpen(self) -> None:
        self.next_index = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.factory.opened.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert int(payload[:8]) == self.next_index, (payload[:8], self.next_index)
        self.next_index += 1
        if self.next_index == self.factory.expected:
            self.done.callback(None)


class CountingFactory(WebSocketClientFactory):
    """Makes L{CountingReader}s that expect C{expected} notifications; C{opened}: those open."""

    def __init__(self, url: str, expected: int) -> None:
        super().__init__(url)
        self.protocol = CountingReader
        self.expected = expected
        self.opened: list[CountingReader] = []


@pytest_twisted.ensureDeferred
async def test_slow_readers_are_cut_off_and_others_get_everything(db_uri, db: Db):
    cap = 64 * 1024
    count, size = 2000, 4000
    server = await start_server(db_uri, max_pending_bytes=cap)
    try:
        slow = []
        for _ in range(200):
            reader = SlowReader("/burst/" + token({"mode": "r"}))
            # A small receive window, so the kernel holds little and pgws's own buffer fills:
            # that buffer is what max-pending-bytes bounds.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            IReactorSocket(reactor).adoptStreamConnection(sock.fileno(), socket.AF_INET,
                                                          factory_of(reader))
            sock.close()  # Twisted holds its own duplicate of the descriptor
            slow.append(reader)
            await sleep(0)  # let the server accept (the connect above blocks the reactor)
        factory = CountingFactory(f"ws://127.0.0.1:{server.port}/burst/" + token({"mode": "r"}), count)
        for _ in range(10):
            await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(factory))
        await until(lambda: len(factory.opened) == 10 and server.relay.registry.readers("burst") == 210,
                    "210 readers of burst", timeout=30)
        before = rss_bytes()
        payload = "x" * (size - 8)
        for start in range(0, count, 100):
            db.execute("SELECT pg_notify('burst', lpad(i::text, 8, '0') || %s) "
                       "FROM generate_series(%s, %s) AS i", (payload, start, start + 99))
            await sleep(0)
        for counting in factory.opened:
            await wait(counting.done, timeout=60)
        growth = rss_bytes() - before
        assert server.relay.registry.readers("burst") == 10, "slow readers still registered"
        # Bound: what a reader may hold before it is cut off at once (4 x the cap) plus one frame,
        # per slow reader, and 32 MB of slack for the rest.
        bound = 200 * (4 * cap + size) + 32 * 1024 * 1024
        assert growth < bound, (growth, bound)
        print(f"{count} x {size} B to 10 readers, 200 slow readers cut off; "
              f"RSS grew {growth / 1e6:.1f} MB (bound {bound / 1e6:.1f} MB)")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_connection_limit_gives_503(db_uri):
    server = await start_server(db_uri, max_connections=2)
    try:
        a = await ws_connect(server.port, "/lim/" + token({"mode": "r"}))
        b = await ws_connect(server.port, "/lim/" + token({"mode": "r"}))
        refused = await handshake(server.port, "/lim/" + token({"mode": "r"}))
        assert refused.status == 503 and "maximum number of connections" in refused.text
        a.close()
        await wait(a.closed)
        c = await ws_connect(server.port, "/lim/" + token({"mode": "r"}))
        assert not b.closed.called and not c.closed.called
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_channel_limit_gives_403(db_uri):
    server = await start_server(db_uri, max_channels=3)
    try:
        many = token({"mode": "r", "channels": ["a", "b", "c", "d"]})
        refused = await handshake(server.port, "/" + many)
        assert (refused.status, refused.text) == (
            403, "the token grants 4 channels; the limit is 3\n")
        await ws_connect(server.port, "/" + token({"mode": "r", "channels": ["a", "b", "c"]}))
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_allowed_origins(db_uri):
    server = await start_server(db_uri, allowed_origins="https://app.example.com")
    try:
        path = "/o/" + token({"mode": "r"})
        bad = await http_request(server.port, upgrade_request(path).replace(
            b"Connection: close\r\n", b"Origin: https://evil.example.com\r\nConnection: close\r\n"))
        assert bad.status == 403
        # Hangs up itself once the 101 is in; a refusal would be followed by the server's close.
        good = _Raw(upgrade_request(path).replace(
            b"Connection: close\r\n", b"Origin: https://app.example.com\r\n"), hang_up_after_101=True)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: good)))
        assert (await wait(good.done)).startswith(b"HTTP/1.1 101")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_silent_listen_session_is_noticed_by_the_check(db_uri, db: Db):
    import os
    import signal

    # A backend that stops answering without closing its socket: only the check can notice.
    server = await start_server(db_uri, check_listener_interval=500)
    frozen = None
    try:
        reader = await ws_connect(server.port, "/frozen/" + token({"mode": "r"}))
        [frozen] = server.listener_pids(db)  # this server's LISTEN session, and only it
        os.kill(frozen, signal.SIGSTOP)
        listener = server.relay.listener
        started = time.monotonic()

        async def replaced():
            return listener.losses >= 1 and listener.connected

        assert await eventually(replaced, timeout=30), "the frozen session was not replaced"
        noticed = time.monotonic() - started
        db.notify("frozen", "new session")
        assert await reader.next() == "new session"
        print(f"frozen LISTEN session replaced after {noticed:.1f} s (check every 0.5 s)")
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
            db.execute("SELECT pg_terminate_backend(%s)", (frozen,))
        await server.stop()
