"""Refusals happen in the HTTP handshake, with the right status and a one-line reason."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from support import SECRET, handshake, start_server, token, ws_connect


@pytest_twisted.async_yield_fixture
async def server(db_uri):
    s = await start_server(db_uri)
    yield s
    await s.stop()


@pytest.fixture
def log_lines():
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


REFUSALS = [
    # (path, status, reason)
    ("/", 401, "no JWT in the request"),
    ("/chat/", 401, "no JWT in the request"),
    ("/chat/not-a-token", 401, "JWT is malformed"),
    ("/chat/" + token({"mode": "r"}, secret="another secret, long enough for hmac"), 401,
     "JWT signature is invalid"),
    ("/chat/" + token({"mode": "r", "channel": "test", "exp": 1}), 401, "JWT expired"),
    ("/chat/" + token({"mode": "r", "nbf": 4102444800}), 401, "JWT not yet valid"),
    ("/chat/" + token({"mode": "r", "exp": "soon"}), 401, "JWT claim exp must be a number"),
    ("/chat/eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtb2RlIjoicncifQ.", 401,
     'JWT algorithm "none" is not accepted; use one of HS256, HS384, HS512'),
    ("/chat/" + token({}), 403, 'JWT claim "mode" is missing; it must be "r", "w" or "rw"'),
    ("/chat/" + token({"mode": "x"}), 403, 'JWT claim "mode" must be "r", "w" or "rw"'),
    ("/chat/" + token({"mode": 1}), 403, 'JWT claim "mode" must be "r", "w" or "rw"'),
    ("/x/" + token({"mode": "r", "channels": ["test", "test2"]}), 403,
     'channel "x" is not allowed by this token'),
    ("/" + token({"mode": "r"}), 403, "no channel: request one in the path or put one in the token"),
    ("/" + token({"mode": "r", "channels": "a"}), 403, 'JWT claim "channels" must be a list of strings'),
    ("/" + token({"mode": "r", "channel": ["a"]}), 403, 'JWT claim "channel" must be a string'),
    ("/" + token({"mode": "r", "channels": []}), 403, 'JWT claim "channels" is empty'),
    ("/" + "c" * 64 + "/" + token({"mode": "r"}), 403,
     'channel "' + "c" * 64 + '" is 64 bytes long; the limit is 63'),
    ("/a%00b/" + token({"mode": "r"}), 403, 'channel "a\\u0000b" contains a NUL character'),
    ("//" + token({"mode": "r"}), 403, "channel name is empty"),
    ("/%ff/" + token({"mode": "r"}), 403, "the channel in the path is not valid UTF-8"),
    ("/a/b/" + token({"mode": "r"}), 400, "the path must be /<channel>/<jwt> or /<jwt>"),
]


@pytest.mark.parametrize("path,status,reason", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
@pytest_twisted.ensureDeferred
async def test_refusal_status_and_reason(server, log_lines, path, status, reason):
    response = await handshake(server.port, path)
    assert response.status == status
    assert response.text == reason + "\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    # The refusal is logged, without the token.
    jwt_part = path.rsplit("/", 1)[-1]
    assert any(str(status) in line and "refused" in line for line in log_lines)
    if len(jwt_part) > 20:
        assert not any(jwt_part in line for line in log_lines)
    # And the server still serves the next client.
    ok = await ws_connect(server.port, "/chat/" + token({"mode": "r"}))
    ok.close()


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest_twisted.ensureDeferred
async def test_every_hmac_algorithm_is_accepted(server, alg):
    client = await ws_connect(server.port, "/chat/" + token({"mode": "r"}, alg=alg))
    client.close()


@pytest_twisted.ensureDeferred
async def test_channels_claim_with_requested_channel_gives_only_that_channel(server):
    client = await ws_connect(server.port, "/test/" + token({"mode": "r", "channels": ["test", "test2"]}))
    channels = await server.listening_channels()
    assert "test" in channels and "test2" not in channels
    client.close()


@pytest_twisted.ensureDeferred
async def test_accepted_connection_is_logged_without_the_token(server, log_lines):
    jwt_text = token({"mode": "rw", "secret_note": "x"})
    client = await ws_connect(server.port, "/logged/" + jwt_text)
    client.close()
    assert any("open: mode rw, channels logged" in line for line in log_lines)
    assert not any(jwt_text in line or SECRET in line for line in log_lines)


@pytest_twisted.ensureDeferred
async def test_crlf_in_channel_cannot_split_the_response(server):
    response = await handshake(server.port, "/a%0d%0aX-Evil:%201/" + token(
        {"mode": "r", "channels": ["b"]}))
    assert response.status == 403
    assert "x-evil" not in response.headers
    assert response.text == 'channel "a\\r\\nX-Evil: 1" is not allowed by this token\n'
