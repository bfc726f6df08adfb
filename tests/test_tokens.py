"""Tokens out of the URL (subprotocol, Authorization header) and refresh over an open socket."""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from support import (
    AheadClock,
    Client,
    Db,
    _Raw,
    handshake,
    http_request,
    start_server,
    token,
    upgrade_request,
    wait,
    ws_connect,
)

# Tokens here expire a minute from now by the real clock; the relay's clock runs ahead so that
# for it they expire REAL_LIFE seconds from now.  The expiry still closes a real socket.
MINUTE = 60.0
REAL_LIFE = 0.3


@pytest_twisted.async_yield_fixture
async def server(db_uri):
    s = await start_server(db_uri)
    yield s
    await s.stop()


@pytest_twisted.async_yield_fixture
async def ahead_server(db_uri):
    """A server whose clock runs MINUTE - REAL_LIFE seconds ahead of the real one."""
    s = await start_server(db_uri, relay_options={"clock": AheadClock(MINUTE - REAL_LIFE)})
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_token_in_subprotocol_is_accepted_and_not_echoed(server, db: Db):
    jwt_text = token({"mode": "r"})
    client = await ws_connect(server.port, "/sub", protocols=["pgws", "pgws.bearer." + jwt_text])
    assert client.proto is not None
    assert client.proto.websocket_protocol_in_use == "pgws"
    db.notify("sub", "via subprotocol")
    assert await client.next() == "via subprotocol"


@pytest_twisted.ensureDeferred
async def test_subprotocol_answer_never_contains_the_token(server):
    jwt_text = token({"mode": "r"})
    raw = upgrade_request("/sub").replace(
        b"Connection: close\r\n", f"Sec-WebSocket-Protocol: pgws, pgws.bearer.{jwt_text}\r\n"
                                  "Connection: close\r\n".encode())
    proto = _Raw(raw, hang_up_after_101=True)  # reads the raw 101 answer, then hangs up
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: proto)))
    head = (await wait(proto.done)).split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 101")
    assert "sec-websocket-protocol: pgws\r\n" in head.lower() + "\r\n"
    assert jwt_text not in head


@pytest_twisted.ensureDeferred
async def test_authorization_bearer_header(server, db: Db):
    client = await ws_connect(server.port, "/hdr",
                           headers={"Authorization": "Bearer " + token({"mode": "r"})})
    db.notify("hdr", "via header")
    assert await client.next() == "via header"


@pytest_twisted.ensureDeferred
async def test_header_token_with_channel_in_the_token_and_root_path(server, db: Db):
    client = await ws_connect(server.port, "/",
                           headers={"Authorization": "Bearer " + token({"mode": "r", "channel": "c"})})
    db.notify("c", "root path")
    assert await client.next() == "root path"


@pytest_twisted.ensureDeferred
async def test_header_token_with_two_path_segments_is_400(server):
    raw = upgrade_request("/a/b").replace(
        b"Connection: close\r\n",
        f"Authorization: Bearer {token({'mode': 'r'})}\r\nConnection: close\r\n".encode())
    response = await http_request(server.port, raw)
    assert response.status == 400
    assert response.text == "with the token in a header, the path must be /<channel> or /\n"


@pytest_twisted.ensureDeferred
async def test_bad_header_token_is_401_and_never_logged(server):
    lines: list[str] = []

    @provider(ILogObserver)
    def observer(event: LogEvent) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observer)
    try:
        bad = token({"mode": "r"}, secret="not the server's secret, but long enough")
        raw = upgrade_request("/x").replace(
            b"Connection: close\r\n", f"Authorization: Bearer {bad}\r\nConnection: close\r\n".encode())
        response = await http_request(server.port, raw)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert (response.status, response.text) == (401, "JWT signature is invalid\n")
    assert not any(bad in line for line in lines)


async def refresh(client: Client, jwt_text: str) -> dict:
    return await client.refresh(jwt_text)


@pytest_twisted.ensureDeferred
async def test_refresh_extends_an_expiring_connection(ahead_server):
    server = ahead_server
    soon = time.time() + MINUTE
    client = await ws_connect(server.port, "/r/" + token({"mode": "r", "exp": soon}))
    later = time.time() + 3600
    assert await refresh(client, token({"mode": "r", "exp": later})) == {"refreshed": True,
                                                                         "exp": later}
    # A socket whose token expires a little after the first one's old exp, not refreshed: once it
    # is closed, the relay's timers have passed that old exp.
    control = await ws_connect(server.port, "/r/" + token({"mode": "r", "exp": soon + 0.1}))
    assert await wait(control.closed) == (3001, "JWT expired")
    # The refreshed socket is still open: a refresh it sends now is answered, nothing before it.
    assert await client.received_before_barrier(token({"mode": "r", "exp": later})) == []
    assert not client.closed.called


@pytest_twisted.ensureDeferred
async def test_refresh_may_not_widen_mode_or_channels(ahead_server):
    server = ahead_server
    soon = time.time() + MINUTE
    client = await ws_connect(server.port, "/" + token({"mode": "r", "channels": ["a"], "exp": soon}))
    wider_mode = await refresh(client, token({"mode": "rw", "channels": ["a"]}))
    assert wider_mode == {"refreshed": False,
                          "reason": 'the new token\'s mode "rw" is wider than "r"'}
    more = await refresh(client, token({"mode": "r", "channels": ["a", "b"]}))
    assert more == {"refreshed": False, "reason": 'the new token would add channel "b"'}
    bad = await refresh(client, "not.a.token")
    assert bad == {"refreshed": False, "reason": "JWT is malformed"}
    # The old token still rules: it expires on time.
    code, reason = await wait(client.closed, timeout=5)
    assert (code, reason) == (3001, "JWT expired")


@pytest_twisted.ensureDeferred
async def test_refreshed_claims_go_into_later_envelopes(server, db: Db):
    db.listen("rc")
    client = await ws_connect(server.port, "/rc/" + token({"mode": "w", "v": 1}))
    assert (await refresh(client, token({"mode": "w", "v": 2})))["refreshed"] is True
    client.send("after refresh")
    [(_, raw)] = await db.received(1)
    assert json.loads(raw)["claims"]["v"] == 2


@pytest_twisted.ensureDeferred
async def test_other_binary_frames_close_1003(server):
    client = await ws_connect(server.port, "/b/" + token({"mode": "rw"}))
    assert client.proto is not None
    client.proto.sendMessage(b'{"not": "a control message"}', isBinary=True)
    code, reason = await wait(client.closed)
    assert code == 1003


@pytest_twisted.ensureDeferred
async def test_url_token_still_refused_with_reason(server):
    response = await handshake(server.port, "/x/" + token({"mode": "r", "exp": 1}))
    assert (response.status, response.text) == (401, "JWT expired\n")
