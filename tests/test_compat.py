"""postgres-websockets 0.12 behaviour: listen channel, meta channel, exp closing, env config."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted

from pgws._config import load_config
from support import AheadClock, Db, handshake, sleep, start_server, token, wait, ws_connect

LISTEN = "postgres-websockets-listener"


@pytest_twisted.async_yield_fixture
async def compat(db_uri):
    s = await start_server(db_uri, listen_channel=LISTEN, meta_channel="server-info")
    yield s
    await s.stop()


async def listening(server, channel: str) -> list[str]:
    deadline = time.monotonic() + 10
    while channel not in (channels := await server.listening_channels()):
        if time.monotonic() > deadline:
            break
        await sleep(0.02)
    return channels


@pytest_twisted.ensureDeferred
async def test_client_message_goes_to_the_listen_channel_with_its_channel_field(compat, db: Db):
    db.listen(LISTEN)
    writer = await ws_connect(compat.port, "/" + token({"mode": "w", "channels": ["a", "b"]}))
    got = await db.received(1)  # ConnectionOpen on the meta channel goes there too
    writer.send("hello")
    got += await db.received(2)
    assert {c for c, _ in got} == {LISTEN}
    envelopes = [json.loads(p) for _, p in got]
    messages = [e for e in envelopes if e["event"] == "WebsocketMessage"]
    assert sorted(e["channel"] for e in messages) == ["a", "b"]
    assert all(e["payload"] == "hello" for e in messages)


@pytest_twisted.ensureDeferred
async def test_readers_only_make_pgws_listen_to_the_listen_channel(compat):
    reader = await ws_connect(compat.port, "/room/" + token({"mode": "r"}))
    channels = await listening(compat, LISTEN)
    assert channels == [LISTEN]
    reader.close()


@pytest_twisted.ensureDeferred
async def test_listen_channel_notification_is_routed_by_its_channel_field(compat, db: Db):
    room = await ws_connect(compat.port, "/room/" + token({"mode": "r"}))
    other = await ws_connect(compat.port, "/other/" + token({"mode": "r"}))
    fallback = await ws_connect(compat.port, f"/{LISTEN}/" + token({"mode": "r"}))
    await listening(compat, LISTEN)
    routed = '{"channel": "room", "payload": "x", "extra": [1, 2]}'
    db.notify(LISTEN, routed)
    db.notify(LISTEN, "plain text, not JSON")
    db.notify(LISTEN, '{"channel": 5}')
    # Then one for each reader, from the same session on the same channel: delivered after the
    # three above, so whatever of those was routed to a reader came before its own.
    last = {name: json.dumps({"channel": name, "payload": "last"}) for name in ("room", "other")}
    for text in last.values():
        db.notify(LISTEN, text)
    assert await room.next() == routed  # the whole notification text
    assert await room.next() == last["room"]
    assert await fallback.next() == "plain text, not JSON"
    assert await fallback.next() == '{"channel": 5}'
    assert await other.next() == last["other"]


@pytest_twisted.ensureDeferred
async def test_rw_client_gets_its_own_message_back_through_the_listen_channel(compat):
    client = await ws_connect(compat.port, "/chat/" + token({"mode": "rw"}))
    client.send("round trip")
    got = await client.next_json()
    assert (got["channel"], got["payload"]) == ("chat", "round trip")


@pytest_twisted.ensureDeferred
async def test_meta_channel_gets_connection_open_and_close(db_uri, db: Db):
    server = await start_server(db_uri, meta_channel="server-info")
    try:
        db.listen("server-info")
        client = await ws_connect(server.port, "/" + token({"mode": "r", "channels": ["x", "y"],
                                                            "sub": "alice"}))
        [(channel, raw)] = await db.received(1)
        opened = json.loads(raw)
        assert channel == "server-info"
        assert opened["event"] == "ConnectionOpen"
        assert (opened["channel"], opened["payload"]) == ("server-info", "x,y")
        assert opened["claims"]["sub"] == "alice"
        assert isinstance(opened["claims"]["message_delivered_at"], float)
        client.close()
        [(_, raw)] = await db.received(1)
        closed = json.loads(raw)
        assert (closed["event"], closed["payload"]) == ("ConnectionClose", "x,y")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_meta_channel_needs_a_token_that_names_it(compat):
    refused = await handshake(compat.port, "/server-info/" + token({"mode": "r"}))
    assert refused.status == 403
    assert refused.text == ('channel "server-info" is the meta channel; only a token that '
                            "names it may open it\n")
    watcher = await ws_connect(compat.port, "/" + token({"mode": "r", "channel": "server-info"}))
    await listening(compat, LISTEN)
    # Earlier tests' servers share the database and the listen channel: their sockets' closing
    # events may arrive too, so look for the ones this test causes.
    async def next_event(event: str, payload: str) -> dict:
        while True:
            got = await watcher.next_json()
            if (got["event"], got["payload"]) == (event, payload):
                return got

    await next_event("ConnectionOpen", "server-info")  # its own opening
    other = await ws_connect(compat.port, "/z/" + token({"mode": "r"}))
    assert (await next_event("ConnectionOpen", "z"))["channel"] == "server-info"
    other.close()


@pytest_twisted.ensureDeferred
async def test_token_exp_closes_the_socket_with_3001_at_that_moment(db_uri):
    # The relay's clock runs ahead: the token expires a minute from now by the real clock, and
    # 0.3 s from now by the relay's, which is the one "that moment" is measured on.
    clock = AheadClock(60 - 0.3)
    server = await start_server(db_uri, relay_options={"clock": clock})
    try:
        exp = time.time() + 60
        client = await ws_connect(server.port, "/soon/" + token({"mode": "r", "exp": exp}))
        code, reason = await wait(client.closed, timeout=5)
        assert (code, reason) == (3001, "JWT expired")
        assert clock() >= exp - 0.05
    finally:
        await server.stop()


def test_postgres_websockets_environment_names():
    env = {
        "PGWS_DB_URI": "postgres://localhost/db",
        "PGWS_ROOT_PATH": ".",
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": "3001",
        "PGWS_LISTEN_CHANNEL": "listener",
        "PGWS_META_CHANNEL": "meta",
        "PGWS_JWT_SECRET": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA",
        "PGWS_JWT_SECRET_BASE64": "True",
        "PGWS_POOL_SIZE": "3",
        "PGWS_RETRIES": "2",
        "PGWS_CHECK_LISTENER_INTERVAL": "10000",
    }
    config = load_config(None, env, {})
    assert (config.server_root, config.server_host, config.server_port) == (".", "127.0.0.1", 3001)
    assert (config.listen_channel, config.meta_channel) == ("listener", "meta")
    assert config.jwt_secret == b"secret-secret-secret-secret-secret"
    assert (config.db_pool, config.retries, config.check_listener_interval) == (3, 2, 10000)
    assert load_config(None, {**env, "PGWS_JWT_SECRET_BASE64": "False"}, {}).jwt_secret == \
        env["PGWS_JWT_SECRET"].encode()


@pytest.mark.parametrize("name,value,fragment", [
    ("PGWS_RETRIES", "-1", '"retries"'),
    ("PGWS_CHECK_LISTENER_INTERVAL", "soon", '"check-listener-interval"'),
    ("PGWS_JWT_SECRET_BASE64", "maybe", '"secret-is-base64"'),
    ("PGWS_LISTEN_CHANNEL", "x" * 64, '"listen-channel"'),
    ("PGWS_META_CHANNEL", "", '"meta-channel"'),
    ("PGWS_CERTIFICATE_FILE", "/nonexistent.pem", '"key-file" is missing'),
])
def test_postgres_websockets_environment_misuse(name, value, fragment):
    from pgws._config import ConfigError

    env = {"PGWS_DB_URI": "x", "PGWS_JWT_SECRET": "s", name: value}
    with pytest.raises(ConfigError) as info:
        load_config(None, env, {})
    assert fragment in str(info.value)
