"""
pgws.client end to end: the asyncio client against real pgws servers, a real PostgreSQL and real
sockets.  The client runs in a process of its own (tests/pyclient_driver.py: this process runs
Autobahn on Twisted, and txaio allows one framework per process); what it saw comes back as JSON
lines, which the tests wait on with bounded polling.

The verdict of the journal tests is the client's messages against the journal's rows: every
message exactly once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_journal import (
    committed_rows,
    head,
    journal_of,
    journal_server,
    schema_fixture,  # noqa: F401  (the fixture "schema")
    send,
)
from test_journal_faults import steady_producer, stop_producer
from test_twistd import Twistd, free_port
from twisted.internet import protocol, reactor

from pgws._web import make_site
from support import SECRET, Db, Server, start_server, until

DRIVER = Path(__file__).resolve().parent / "pyclient_driver.py"


class _Lines(protocol.ProcessProtocol):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.driver.lines.extend(json.loads(line) for line in lines if line.strip())

    def errReceived(self, data: bytes) -> None:
        self.driver.stderr += data.decode("utf-8", "replace")

    def processEnded(self, reason: Any) -> None:
        self.driver.ended = True


class Driver:
    """One pgws.client in its own process; C{lines} is everything it reported, in order."""

    def __init__(self, url: str, **settings: Any) -> None:
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self.ended = False
        config = {"url": url, "secret": SECRET, **settings}
        self.proto = _Lines(self)
        self.process = reactor.spawnProcess(
            self.proto, sys.executable, [sys.executable, str(DRIVER), json.dumps(config)],
            env=dict(os.environ), path=str(DRIVER.parent.parent))

    def of(self, kind: str, type_: str | None = None) -> list[dict[str, Any]]:
        return [line for line in self.lines
                if line["kind"] == kind and (type_ is None or line.get("type") == type_)]

    def items(self) -> list[dict[str, Any]]:
        return self.of("item")

    def messages(self) -> list[tuple[int | None, str]]:
        return [(m["seq"], m["text"]) for m in self.of("item", "Message")]

    def last_seq(self) -> int:
        seqs = [seq for seq, _ in self.messages() if seq is not None]
        return seqs[-1] if seqs else 0

    async def until(self, check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
        def checked() -> Any:
            if self.ended and not check():
                raise AssertionError(f"the client ended before: {what}\n{self.stderr}\n{self.lines}")
            return check()

        try:
            return await until(checked, what, timeout=timeout)
        except AssertionError:
            print(f"client lines: {self.lines}\nstderr: {self.stderr}")
            raise

    async def until_event(self, type_: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        await self.until(lambda: len(self.of("event", type_)) >= count,
                         f"{count} {type_} event(s)", timeout)
        return self.of("event", type_)[count - 1]

    async def until_seq(self, seq: int, timeout: float = 30) -> None:
        await self.until(lambda: self.last_seq() >= seq,
                         f"message #{seq} (the client has #{self.last_seq()})", timeout)

    def command(self, **command: Any) -> None:
        self.process.write(json.dumps(command).encode() + b"\n")

    async def stop(self) -> None:
        if not self.ended:
            self.command(op="close")
            try:
                await until(lambda: self.ended, "the client process ends", timeout=10)
            except AssertionError:
                self.process.signalProcess("KILL")
                raise


def fresh(name: str) -> str:
    """A channel of this test's own: plain NOTIFYs reach every pgws on the database."""
    return f"{name}_{uuid.uuid4().hex[:8]}"


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}"


def wall_clock_past(moment: float) -> Callable[[], bool]:
    return lambda: time.time() > moment


# -- the module itself ----------------------------------------------------------------------------


def test_importing_the_client_loads_neither_twisted_nor_autobahn():
    code = ("import sys, pgws.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'autobahn', 'txaio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest_twisted.ensureDeferred
async def test_the_token_is_in_no_url_and_in_no_log_line_even_at_debug_level(db_uri, db: Db):
    server = await start_server(db_uri)
    channel = fresh("lg")
    client = Driver(url(server.port), channel=channel, debug_log=True)
    try:
        connected = await client.until_event("Connected")
        db.notify(channel, "hello")
        await client.until(lambda: client.messages() == [(None, "hello")], "the message")
        jwt_text = client.of("token")[0]["jwt"]
        assert connected["url"] == f"ws://127.0.0.1:{server.port}/{channel}"
        await client.stop()
        assert "pgws.bearer.<token>" in client.stderr  # the handshake request was logged
        assert jwt_text not in client.stderr
    finally:
        await client.stop()
        await server.stop()


# -- the journal: exactly once, in order, across faults --------------------------------------------


async def twistd_on(tmp_path: Path, db_uri: str, schema: str, port: int) -> Twistd:
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", str(port), "--server-host",
                    "127.0.0.1", "--journal", "true", "--journal-schema", schema,
                    env={"PGWS_JWT_SECRET": SECRET})
    await server.ready()
    return server


def listener_pids(db: Db, server: Twistd) -> list[int]:
    return [pid for (pid,) in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (f"{server.application_name} listener",))]


@pytest_twisted.ensureDeferred
async def test_every_journaled_message_once_in_order_across_a_listen_loss_and_a_pgws_restart(
        db_uri, db: Db, schema, tmp_path):
    port = free_port()
    first = await twistd_on(tmp_path / "first", db_uri, schema, port)
    second = None
    stop = threading.Event()
    producer = steady_producer(db_uri, schema, "pc", stop, pause=0.005)
    client = Driver(url(port), channel="pc", claims={"mode": "r"})
    try:
        await client.until_event("Stream")
        producer.start()
        await client.until_seq(30)
        # The LISTEN session killed while messages keep coming: the client stays connected.
        [pid] = listener_pids(db, first)
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await until(lambda: listener_pids(db, first) not in ([], [pid]), "a new LISTEN session",
                    timeout=30)
        await client.until_seq(head(db, schema, "pc") + 30)
        # pgws restarted while messages keep coming: the client reconnects and resumes.
        first.proc.send_signal(signal.SIGTERM)
        at_stop = head(db, schema, "pc")
        assert await first.terminate(signal_it=False) == 0
        second = await twistd_on(tmp_path / "second", db_uri, schema, port)
        await client.until_event("Connected", 2, timeout=30)
        at_resume = head(db, schema, "pc")
        await client.until_seq(head(db, schema, "pc") + 30)
        await stop_producer(producer, stop)
        final = head(db, schema, "pc")
        await client.until_seq(final)
        rows = committed_rows(db, schema, "pc")
        got = client.messages()
        print(f"\n{len(rows)} committed ({at_resume - at_stop} while pgws restarted), "
              f"{len(got)} received, "
              f"{len(got) - len(set(got))} duplicated, {len(set(rows) - set(got))} missing; "
              f"events: {[e['type'] for e in client.of('event')]}")
        assert [seq for seq, _ in rows] == list(range(1, final + 1))
        assert got == rows
        assert client.of("item", "Gap") == []
        assert [(e["code"], e["reason"]) for e in client.of("event", "Disconnected")][0] == \
            (1001, "server shutting down")
        streams = client.of("event", "Stream")
        assert [s["recovered"] for s in streams] == [None, True]
    finally:
        stop.set()
        await client.stop()
        if second is not None:
            assert await second.terminate() == 0
        if first.proc.poll() is None:
            await first.terminate()


@pytest_twisted.ensureDeferred
async def test_a_position_behind_retention_is_reported_not_recovered(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_retention_count="5")
    client = None
    try:
        for i in range(1, 21):
            send(db, schema, "ret", f"m{i}")
        assert await journal_of(server).prune() == 15
        [(epoch,)] = db.execute(f"SELECT epoch FROM {schema}.streams WHERE channel = 'ret'")
        client = Driver(url(server.port), channel="ret", positions={"ret": [2, epoch]})
        stream = await client.until_event("Stream")
        assert (stream["seq"], stream["recovered"]) == (20, False)
        send(db, schema, "ret", "m21")  # the barrier: nothing else may come before it
        await client.until_seq(21)
        items = client.items()
        assert items[0] == {"kind": "item", "type": "Gap", "reason": "not recovered",
                            "channels": ["ret"], "after": 2, "upto": 20, "at": None}
        assert [(i["type"], i.get("seq")) for i in items] == [("Gap", None), ("Message", 21)]
    finally:
        if client is not None:
            await client.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_position_within_retention_replays_exactly_what_is_missing(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_retention_count="5")
    client = None
    try:
        for i in range(1, 21):
            send(db, schema, "ret", f"m{i}")
        await journal_of(server).prune()
        [(epoch,)] = db.execute(f"SELECT epoch FROM {schema}.streams WHERE channel = 'ret'")
        client = Driver(url(server.port), channel="ret", positions={"ret": [17, epoch]})
        send(db, schema, "ret", "m21")
        await client.until_seq(21)
        assert client.of("event", "Stream")[0]["recovered"] is True
        assert client.messages() == [(i, f"m{i}") for i in range(18, 22)]
        assert client.of("item", "Gap") == []
    finally:
        if client is not None:
            await client.stop()
        await server.stop()


# -- gaps without the journal ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_listen_loss_without_the_journal_is_a_gap_between_the_messages(db_uri, db: Db):
    server = await start_server(db_uri)
    channel = fresh("pg")
    client = Driver(url(server.port), channel=channel)
    try:
        await client.until_event("Connected")
        db.notify(channel, "before")
        await client.until(lambda: client.messages() == [(None, "before")], "the first message")
        assert server.terminate_listener(db) == 1
        await client.until(lambda: client.of("item", "Gap"), "the gap")
        db.notify(channel, "after")
        await client.until(lambda: len(client.messages()) == 2, "the second message")
        items = client.items()
        assert [(i["type"], i.get("text"), i.get("reason")) for i in items] == [
            ("Message", "before", None), ("Gap", None, "listen"), ("Message", "after", None)]
        assert items[0]["channel"] == channel and items[1]["channels"] == [channel]
        assert len(client.of("event", "Connected")) == 1  # the socket stayed open
    finally:
        await client.stop()
        await server.stop()


# -- tokens ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_token_is_refreshed_in_place_before_it_expires(db_uri, db: Db):
    server = await start_server(db_uri)
    channel = fresh("rf")
    client = Driver(url(server.port), channel=channel, ttl=3, refresh_ahead=1.5)
    try:
        await client.until_event("Connected")
        first_exp = client.of("token")[0]["exp"]
        refreshed = await client.until_event("Refreshed")
        assert refreshed["exp"] == pytest.approx(client.of("token")[1]["exp"])
        # Past the first token's exp: the socket it opened still reads.
        await until(wall_clock_past(first_exp + 0.5), "the first token's exp passes")
        db.notify(channel, "after the first exp")
        await client.until(lambda: client.messages() == [(None, "after the first exp")],
                           "the message sent after the first exp")
        assert len(client.of("event", "Connected")) == 1
        assert client.of("event", "Disconnected") == []
    finally:
        await client.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_after_a_3001_close_the_client_reconnects_with_a_fresh_token_and_resumes(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    client = Driver(url(server.port), channel="ex", ttl=1.5, refresh_ahead=None)
    try:
        await client.until_event("Stream")
        send(db, schema, "ex", "m1")
        expired = await client.until_event("Disconnected")
        assert (expired["code"], expired["reason"]) == (3001, "JWT expired")
        assert expired["retry_in"] is not None
        send(db, schema, "ex", "m2")  # most likely while the client is away
        await client.until_event("Connected", 2)
        send(db, schema, "ex", "m3")
        await client.until_seq(3)
        # A fresh token for the new connection, minted after the close.
        kinds = [(line["kind"], line.get("type")) for line in client.lines]
        closed_at = kinds.index(("event", "Disconnected"))
        assert ("token", None) in kinds[closed_at:kinds.index(("event", "Connected"), closed_at)]
        assert client.messages()[:3] == [(1, "m1"), (2, "m2"), (3, "m3")]
        assert [s["recovered"] for s in client.of("event", "Stream")][:2] == [None, True]
    finally:
        await client.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_fixed_token_that_expires_ends_the_client(db_uri):
    server = await start_server(db_uri)
    client = Driver(url(server.port), channel="fx", ttl=1.5, static=True)
    try:
        end = await client.until(lambda: client.of("end"), "the client ends")
        assert (end[0]["error"], end[0]["code"]) == ("ClientClosed", 3001)
        assert [e["retry_in"] for e in client.of("event", "Disconnected")] == [None]
        assert len(client.of("token")) == 1
    finally:
        await client.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_handshake_ends_the_client_with_the_servers_reason(db_uri):
    server = await start_server(db_uri)
    client = Driver(url(server.port), channel="other", claims={"mode": "r", "channels": ["mine"]})
    try:
        [failed] = await client.until(lambda: client.of("open_failed"), "open() fails")
        assert (failed["error"], failed["status"]) == ("Refused", 403)
        assert "other" in failed["message"]
        assert len(client.of("token")) == 1  # no second attempt
        # The driver configured no logging: Autobahn's warning of the refusal is not printed.
        await client.until(lambda: client.ended, "the client process ends")
        assert "upgrade failed" not in client.stderr and "dropping connection" not in client.stderr
    finally:
        await client.stop()
        await server.stop()


# -- sending while disconnected ----------------------------------------------------------------------


async def outage(server: Server) -> None:
    """Refuse new connections and break the open ones."""
    await server.listening.stopListening()
    for socket in list(server.relay.factory.sockets):
        socket.dropConnection(abort=True)


def listen_again(server: Server) -> None:
    server.listening = reactor.listenTCP(
        server.port, make_site(server.relay.resource()),  # type: ignore[arg-type]
        interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_sends_while_disconnected_are_queued_up_to_max_queued_then_sent_in_order(
        db_uri, db: Db):
    server = await start_server(db_uri)
    channel = fresh("sq")
    db.listen(channel)
    client = Driver(url(server.port), channel=channel, claims={"mode": "rw"}, max_queued=3)
    try:
        await client.until_event("Connected")
        await outage(server)
        await client.until_event("Disconnected")
        for i in range(1, 5):
            client.command(op="send", text=f"q{i}")
        await client.until(lambda: len(client.of("sent") + client.of("send_error")) == 4,
                           "four sends answered")
        assert [s["text"] for s in client.of("sent")] == ["q1", "q2", "q3"]
        [refused] = client.of("send_error")
        assert (refused["text"], refused["error"]) == ("q4", "QueueFull")
        listen_again(server)
        await client.until_event("Connected", 2)
        got = await db.received(3)
        assert [json.loads(payload)["payload"] for _, payload in got] == ["q1", "q2", "q3"]
        # A rw socket gets its messages back, after the gap the reconnect is for this plain
        # channel (notifications sent while it was away are lost).
        await client.until(lambda: len(client.messages()) == 3, "its own messages back")
        items = client.items()
        assert (items[0]["type"], items[0]["reason"], items[0]["channels"]) == \
            ("Gap", "disconnected", [channel])
        assert [json.loads(i["text"])["payload"] for i in items[1:]] == ["q1", "q2", "q3"]
    finally:
        await client.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_reconnect_is_a_gap_only_for_the_plain_channel_of_a_socket_that_reads_two(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_channels="jr*")
    plain = fresh("plain")
    client = Driver(url(server.port), claims={"mode": "r", "channels": ["jr1", plain]})
    try:
        await client.until_event("Stream")
        send(db, schema, "jr1", "m1")
        await client.until_seq(1)
        await outage(server)
        await client.until_event("Disconnected")
        send(db, schema, "jr1", "m2")  # while the client is away
        db.notify(plain, "lost")  # reaches no one
        listen_again(server)
        await client.until_event("Connected", 2)
        send(db, schema, "jr1", "m3")
        db.notify(plain, "after")
        await client.until(lambda: client.last_seq() == 3 and (None, "after") in client.messages(),
                           "m3 and the plain message after the reconnect")
        assert [(g["reason"], g["channels"]) for g in client.of("item", "Gap")] == \
            [("disconnected", [plain])]
        assert [m for m in client.messages() if m[0] is not None] == [(1, "m1"), (2, "m2"), (3, "m3")]
        assert (None, "lost") not in client.messages()
        [_, resumed] = client.of("event", "Stream")
        assert (resumed["channel"], resumed["recovered"]) == ("jr1", True)
    finally:
        await client.stop()
        await server.stop()
