"""Both directions of the relay, end to end: real PostgreSQL, real sockets over loopback."""

from __future__ import annotations

import json
import time
import urllib.parse

import psycopg2.extensions
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from support import Db, sleep, start_server, tcp, token, until, upgrade_request, wait, ws_connect


@pytest_twisted.async_yield_fixture
async def server(db_uri):
    s = await start_server(db_uri, audit_channel="audit")
    yield s
    await s.stop()


@pytest_twisted.async_yield_fixture
async def serial_server(db_uri):
    """
    A server with a NOTIFY pool of one connection: its NOTIFYs run one after the other, in the
    order it issues them, and PostgreSQL delivers them in commit order.  So a message that passes
    is a barrier for one the server received before it and should have dropped.
    """
    s = await start_server(db_uri, audit_channel="audit", db_pool=1)
    yield s
    await s.stop()


async def until_listening(server, channel: str, present: bool = True) -> list[str]:
    """LISTEN/UNLISTEN are asynchronous: wait (bounded) until PostgreSQL shows the change."""
    deadline = time.monotonic() + 10
    while True:
        channels = await server.listening_channels()
        if (channel in channels) == present or time.monotonic() > deadline:
            return channels
        await sleep(0.02)


@pytest_twisted.ensureDeferred
async def test_reader_receives_notification_payload_unchanged(server, db: Db):
    reader = await ws_connect(server.port, "/chat/" + token({"mode": "r"}))
    await until_listening(server, "chat")
    payload = 'not JSON at all: ünïcødé ✓ "quotes" \\ back'
    db.notify("chat", payload)
    assert await reader.next() == payload


@pytest_twisted.ensureDeferred
async def test_client_message_becomes_envelope_on_its_channel(server, db: Db):
    db.listen("chat")
    writer = await ws_connect(server.port, "/chat/" + token({"mode": "w", "role": "alice"}))
    before = time.time()
    writer.send("hello")
    [(channel, raw)] = await db.received(1)
    envelope = json.loads(raw)
    assert channel == "chat"
    assert envelope["event"] == "WebsocketMessage"
    assert envelope["channel"] == "chat"
    assert envelope["payload"] == "hello"
    assert envelope["claims"]["mode"] == "w"
    assert envelope["claims"]["role"] == "alice"
    delivered = envelope["claims"]["message_delivered_at"]
    assert isinstance(delivered, float) and before - 1 <= delivered <= time.time() + 1
    assert list(envelope) == ["event", "channel", "payload", "claims"]


@pytest_twisted.ensureDeferred
async def test_rw_sender_receives_its_own_message(server):
    client = await ws_connect(server.port, "/chat/" + token({"mode": "rw"}))
    await until_listening(server, "chat")
    client.send("echo me")
    envelope = await client.next_json()
    assert envelope["payload"] == "echo me"
    assert envelope["claims"]["mode"] == "rw"


@pytest_twisted.ensureDeferred
async def test_two_clients_chat_through_postgres(server):
    alice = await ws_connect(server.port, "/room/" + token({"mode": "rw", "name": "alice"}))
    bob = await ws_connect(server.port, "/room/" + token({"mode": "rw", "name": "bob"}))
    await until_listening(server, "room")
    alice.send("hi bob")
    got = await bob.next_json()
    assert (got["payload"], got["claims"]["name"]) == ("hi bob", "alice")


@pytest_twisted.ensureDeferred
async def test_write_only_token_never_receives(server, db: Db):
    writer = await ws_connect(server.port, "/wo/" + token({"mode": "w"}))
    reader = await ws_connect(server.port, "/wo/" + token({"mode": "r"}))
    await until_listening(server, "wo")
    writer.send("from the writer")
    assert json.loads(await reader.next())["payload"] == "from the writer"
    db.notify("wo", "from the database")
    assert await reader.next() == "from the database"
    # Both were written to every reader of "wo" before the reader got them; the writer's own
    # stream, up to the answer of a refresh sent now, holds anything it was given.
    assert await writer.received_before_barrier(token({"mode": "w"})) == []


@pytest_twisted.ensureDeferred
async def test_read_only_socket_messages_are_not_relayed(serial_server, db: Db):
    server = serial_server
    db.listen("ro")
    reader = await ws_connect(server.port, "/ro/" + token({"mode": "r"}))
    reader.send("should not pass")
    # The refresh's answer means the server has read (and dropped) the message before it; what
    # a writer sends after that is NOTIFYed after it would have been: it must come first.
    assert await reader.received_before_barrier(token({"mode": "r"})) == []
    writer = await ws_connect(server.port, "/ro/" + token({"mode": "w"}))
    writer.send("from a writer")
    [(channel, raw)] = await db.received(1)
    assert (channel, json.loads(raw)["payload"]) == ("ro", "from a writer")
    # The socket stays open and keeps reading: the writer's message first (the dropped one would
    # have come before it), then one from the database.
    assert json.loads(await reader.next())["payload"] == "from a writer"
    db.notify("ro", "still reading")
    assert await reader.next() == "still reading"


@pytest_twisted.ensureDeferred
async def test_audit_channel_gets_a_copy_of_every_message(server, db: Db):
    db.listen("audit")
    db.listen("a1")
    writer = await ws_connect(server.port, "/a1/" + token({"mode": "w"}))
    writer.send("audited")
    got = await db.received(2)
    assert sorted(c for c, _ in got) == ["a1", "audit"]
    assert got[0][1] == got[1][1]
    assert json.loads(got[0][1])["channel"] == "a1"


@pytest_twisted.ensureDeferred
async def test_socket_with_several_channels_sends_once_per_channel_and_reads_all(server, db: Db):
    db.listen("m1")
    db.listen("m2")
    client = await ws_connect(server.port, "/" + token({"mode": "rw", "channels": ["m1", "m2"]}))
    await until_listening(server, "m2")
    await until_listening(server, "m1")
    client.send("to both")
    got = await db.received(2)
    assert sorted((c, json.loads(p)["channel"]) for c, p in got) == [("m1", "m1"), ("m2", "m2")]
    # It reads both channels too: its own two envelopes come back, then a raw notification.
    echoes = sorted([(await client.next_json())["channel"], (await client.next_json())["channel"]])
    assert echoes == ["m1", "m2"]
    db.notify("m2", "raw on m2")
    assert await client.next() == "raw on m2"


@pytest_twisted.ensureDeferred
async def test_first_reader_listens_and_last_reader_unlistens(server):
    assert "lu" not in await server.listening_channels()
    first = await ws_connect(server.port, "/lu/" + token({"mode": "r"}))
    second = await ws_connect(server.port, "/lu/" + token({"mode": "r"}))
    assert "lu" in await until_listening(server, "lu")
    first.close()
    await wait(first.closed)
    await until(lambda: server.relay.registry.readers("lu") == 1, "the first reader is gone")
    # pg_listening_channels() runs on the LISTEN session after any UNLISTEN its leaving issued.
    assert "lu" in await server.listening_channels()
    second.close()
    await wait(second.closed)
    assert "lu" not in await until_listening(server, "lu", present=False)


@pytest_twisted.ensureDeferred
async def test_write_only_socket_does_not_listen(server):
    writer = await ws_connect(server.port, "/wonly/" + token({"mode": "w"}))
    # A reader opened after it opens once its own LISTEN has run, and the LISTEN session runs
    # its commands in order: a LISTEN the writer had caused would have run before.
    await ws_connect(server.port, "/wonly-after/" + token({"mode": "r"}))
    channels = await server.listening_channels()
    assert "wonly-after" in channels
    assert "wonly" not in channels
    writer.close()


@pytest_twisted.ensureDeferred
async def test_one_sockets_messages_reach_postgres_in_order(server, db: Db):
    db.listen("order")
    writer = await ws_connect(server.port, "/order/" + token({"mode": "w"}))
    count = 2000
    for i in range(count):
        writer.send(str(i))
    got = await db.received(count, timeout=30)
    assert [int(json.loads(p)["payload"]) for _, p in got] == list(range(count))


@pytest_twisted.ensureDeferred
async def test_identical_messages_are_not_folded_by_postgres(server, db: Db):
    db.listen("same")
    writer = await ws_connect(server.port, "/same/" + token({"mode": "w"}))
    for _ in range(50):
        writer.send("same text")
    got = await db.received(50)
    assert len(got) == 50


@pytest_twisted.ensureDeferred
async def test_readers_get_notifications_in_postgres_order(server, db: Db):
    readers = [await ws_connect(server.port, "/burst/" + token({"mode": "r"})) for _ in range(3)]
    await until_listening(server, "burst")
    count = 3000
    db.execute("SELECT pg_notify('burst', i::text) FROM generate_series(0, %s) AS i", (count - 1,))
    for reader in readers:
        got = [int(await reader.next()) for _ in range(count)]
        assert got == list(range(count))


@pytest_twisted.ensureDeferred
async def test_percent_encoded_channel_is_decoded(server, db: Db):
    reader = await ws_connect(server.port, "/test%20channel/" + token({"mode": "r"}))
    await until_listening(server, "test channel")
    db.notify("test channel", "spaced")
    assert await reader.next() == "spaced"


@pytest_twisted.ensureDeferred
async def test_channel_with_quotes_and_sql_is_only_a_name(server, db: Db):
    name = 'a"; DROP TABLE x; --'
    reader = await ws_connect(server.port, "/" + urllib.parse.quote(name, safe="") + "/"
                              + token({"mode": "r"}))
    await until_listening(server, name)
    db.notify(name, "safe")
    assert await reader.next() == "safe"


@pytest_twisted.ensureDeferred
async def test_query_string_is_ignored(server, db: Db):
    reader = await ws_connect(server.port, "/qs/" + token({"mode": "r"}) + "?foo=bar")
    await until_listening(server, "qs")
    db.notify("qs", "x")
    assert await reader.next() == "x"


@pytest_twisted.ensureDeferred
async def test_channel_claim_takes_precedence_over_url(server, db: Db):
    db.listen("claimed")
    client = await ws_connect(server.port, "/requested/" + token({"mode": "rw", "channel": "claimed"}))
    await until_listening(server, "claimed")
    assert "requested" not in await server.listening_channels()
    client.send("x")
    [(channel, raw)] = await db.received(1)
    assert channel == "claimed" and json.loads(raw)["channel"] == "claimed"


@pytest_twisted.ensureDeferred
async def test_token_only_url_uses_channel_claim(server, db: Db):
    reader = await ws_connect(server.port, "/" + token({"mode": "r", "channel": "only"}))
    await until_listening(server, "only")
    db.notify("only", "y")
    assert await reader.next() == "y"


@pytest_twisted.ensureDeferred
async def test_oversize_message_closes_1009_with_the_limit(serial_server, db: Db):
    server = serial_server
    db.listen("big")
    writer = await ws_connect(server.port, "/big/" + token({"mode": "w"}))
    writer.send("x" * 7990)  # the envelope around it pushes it over 7999 bytes
    code, reason = await wait(writer.closed)
    assert code == 1009
    assert reason is not None and "7999" in reason
    # Others are served as before; the next message is the first (and only) one to arrive.
    other = await ws_connect(server.port, "/big/" + token({"mode": "w"}))
    other.send("small")
    got = await db.received(1)
    assert len(got) == 1
    assert [json.loads(p)["payload"] for _, p in got] == ["small"]


@pytest_twisted.ensureDeferred
async def test_message_just_under_the_limit_passes(server, db: Db):
    db.listen("edge")
    writer = await ws_connect(server.port, "/edge/" + token({"mode": "w"}))
    probe = len(json.dumps({"event": "WebsocketMessage", "channel": "edge", "payload": "",
                            "claims": {"mode": "w", "message_delivered_at": time.time()}},
                           separators=(",", ":")))
    writer.send("y" * (7999 - probe - 5))
    got = await db.received(1)
    assert len(got) == 1 and len(got[0][1].encode()) <= 7999


@pytest_twisted.ensureDeferred
async def test_binary_message_closes_1003(server):
    writer = await ws_connect(server.port, "/bin/" + token({"mode": "w"}))
    writer.send_binary(b"\x00\x01")
    code, reason = await wait(writer.closed)
    assert code == 1003 and reason is not None and "binary" in reason


@pytest_twisted.ensureDeferred
async def test_database_error_closes_1011_and_others_keep_working(db_uri, db: Db):
    # pgws connects as a role that may not call pg_notify: every NOTIFY fails in PostgreSQL.
    db.execute("DROP ROLE IF EXISTS pgws_no_notify")
    db.execute("CREATE ROLE pgws_no_notify LOGIN")
    db.execute("REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC")
    try:
        uri = psycopg2.extensions.make_dsn(db_uri, user="pgws_no_notify")
        server = await start_server(uri)
        try:
            writer = await ws_connect(server.port, "/dberr/" + token({"mode": "w"}))
            reader = await ws_connect(server.port, "/dberr/" + token({"mode": "r"}))
            writer.send("refused by the database")
            code, reason = await wait(writer.closed)
            assert code == 1011
            assert reason is not None
            assert "permission denied" in reason and "1 message not sent" in reason
            # The server and its other sockets carry on.
            await until_listening(server, "dberr")
            db.notify("dberr", "still here")
            assert await reader.next() == "still here"
        finally:
            await server.stop()
    finally:
        db.execute("GRANT EXECUTE ON FUNCTION pg_notify(text, text) TO PUBLIC")
        db.execute("DROP ROLE pgws_no_notify")


@pytest_twisted.ensureDeferred
async def test_listen_session_killed_comes_back_with_its_channels(server, db: Db):
    reader = await ws_connect(server.port, "/revive/" + token({"mode": "r"}))
    await until_listening(server, "revive")
    assert server.terminate_listener(db) == 1  # this server's session, and only it
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        db.notify("revive", "after")
        try:
            assert await reader.next(timeout=0.5) == "after"
            break
        except Exception:
            continue
    else:
        pytest.fail("the LISTEN session did not come back")
    assert reader.closed.called is False


@pytest_twisted.ensureDeferred
async def test_notification_right_after_open_is_received(server, db: Db):
    # The 101 answer waits for LISTEN, so nothing sent after the socket opened is missed.
    for i in range(5):
        reader = await ws_connect(server.port, f"/fresh{i}/" + token({"mode": "r"}))
        db.notify(f"fresh{i}", "first")
        assert await reader.next() == "first"
        reader.close()


@pytest_twisted.ensureDeferred
async def test_handshake_abandoned_midway_leaves_no_reader(server):
    class SendAndLeave(protocol.Protocol):
        def __init__(self) -> None:
            self.lost: defer.Deferred[None] = defer.Deferred()

        def connectionMade(self) -> None:
            tcp(self).write(upgrade_request("/gone/" + token({"mode": "r"})))
            # Gone: the server reads the end of the stream right after the request.
            tcp(self).loseWriteConnection()

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
            self.lost.callback(None)

    # The client sends its upgrade and is gone before reading the answer.  It sees the server
    # hang up only after the server has handled the end of the stream (its socket closed).
    leaving = SendAndLeave()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: leaving)))
    await wait(leaving.lost)
    assert server.relay.registry.readers("gone") == 0
    assert "gone" not in await until_listening(server, "gone", present=False)


@pytest_twisted.ensureDeferred
async def test_peer_that_does_not_answer_pings_is_dropped(db_uri):
    class Mute(protocol.Protocol):
        """Completes the handshake, then never answers anything."""

        def __init__(self) -> None:
            self.data = b""
            self.lost: defer.Deferred[None] = defer.Deferred()

        def connectionMade(self) -> None:
            tcp(self).write(upgrade_request("/mute/" + token({"mode": "r"})).replace(
                b"Connection: close\r\n", b""))

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
            self.lost.callback(None)

    server = await start_server(db_uri, relay_options={"ping_interval": 0.5, "ping_timeout": 1})
    try:
        polite = await ws_connect(server.port, "/mute/" + token({"mode": "r"}))  # answers pings
        mute = Mute()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: mute)))
        await wait(mute.lost, timeout=5)
        assert mute.data.startswith(b"HTTP/1.1 101")
        assert b"\x89" in mute.data  # a ping frame was sent before the drop
        assert not polite.closed.called
    finally:
        await server.stop()
