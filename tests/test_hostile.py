"""
Hostile input: malformed paths, forged and oddly typed tokens, channel names that look like SQL,
bad frames, ping floods and half-open sockets; and property-based tests of the pure parsers.

Each case checks its documented answer, that the server still serves the next good client, and that
no token or secret reaches the log.  There are no expected failures: every case here passes.

The end-to-end hypothesis test is an C{async def} test under C{@given}: pytest-twisted (1.14) runs
each example on the reactor, as it runs any async test.  (C{pytest_twisted.blockon} cannot be used
instead: pytest-twisted runs even a synchronous test body in the reactor's greenlet.)
"""

from __future__ import annotations

import base64
import functools
import gc
import hashlib
import hmac
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm
from psycopg2 import sql
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from pgws._auth import MODES, Refusal, authorize, split_path
from pgws._credentials import BEARER_PREFIX, locate
from support import (
    SECRET,
    Client,
    Db,
    Server,
    _Raw,
    start_server,
    tcp,
    token,
    until,
    upgrade_request,
    wait,
    ws_connect,
)

NONE_TOKEN = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtb2RlIjoicncifQ."
HS256 = {"alg": "HS256", "typ": "JWT"}
PATH_400 = "the path must be /<channel>/<jwt> or /<jwt>"
MODE_403 = 'JWT claim "mode" must be "r", "w" or "rw"'
CHANNELS_403 = 'JWT claim "channels" must be a list of strings'
CHANNEL_403 = 'JWT claim "channel" must be a string'
HMAC_ONLY = "use one of HS256, HS384, HS512"


# -- helpers ---------------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def server(db_uri):
    s = await start_server(db_uri)
    yield s
    await s.stop()


@pytest_twisted.async_yield_fixture
async def impatient_server(db_uri):
    """A server that gives a client 1 s (not 10) to finish its opening handshake."""
    s = await start_server(db_uri)
    s.relay.factory.setProtocolOptions(openHandshakeTimeout=1)
    s.listening.factory.request_deadline = 1  # twisted.web's part: the request itself
    yield s
    await s.stop()


@implementer(ILogObserver)
class LogLines(list[str]):
    """Every event of the global log publisher while a test runs, formatted; and the failures."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        text = formatEvent(event) or ""
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
            self.failures.append(text)
        elif event.get("isError"):
            self.failures.append(text)
        self.append(text)


@pytest.fixture
def log_lines():
    lines = LogLines()
    globalLogPublisher.addObserver(lines)
    yield lines
    globalLogPublisher.removeObserver(lines)


def assert_not_logged(lines: list[str], *tokens: str) -> None:
    """Neither the secret, nor a token, nor its claims or signature appear in any log line."""
    secrets = {SECRET}
    for jwt_text in tokens:
        secrets.add(jwt_text)
        # Every HS256 token has the same header: only the claims and the signature are secret.
        secrets.update(part for part in jwt_text.split(".")[1:] if len(part) >= 20)
    for line in lines:
        for secret in secrets:
            assert secret not in line, f"a token or secret reached the log: {line[:300]!r}"


def unique(prefix: str) -> str:
    """A channel name that no other test, or test run on the same database, uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes,
          key: bytes = SECRET.encode(), digest: Any = hashlib.sha256) -> str:
    """A token signed by hand: pyjwt will not sign odd headers, raw payloads, or with a PEM as secret."""
    parts = [part if isinstance(part, bytes) else json.dumps(part).encode() for part in (header, payload)]
    signing_input = ".".join(b64url(part) for part in parts)
    return signing_input + "." + b64url(hmac.new(key, signing_input.encode(), digest).digest())


class Answer:
    """An HTTP answer; C{status} is None when the server closed without answering."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1]) if raw else None
        self.headers = {name.strip().lower(): value.strip()
                        for name, _, value in (line.partition(":") for line in lines[1:])}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.body[:200]!r}>"


async def answer(port: int, path: str) -> Answer:
    """The raw answer to a WebSocket upgrade request for C{path}."""
    proto = _Raw(upgrade_request(path), hang_up_after_101=True)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: proto)))
    return Answer(await wait(proto.done))


def is_one_line(text: str) -> bool:
    return text.endswith("\n") and text.count("\n") == 1 and "\r" not in text and "\0" not in text


def assert_refusal(response: Answer, status: int, reason: str) -> None:
    assert (response.status, response.text) == (status, reason + "\n")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


async def round_trip(client: Client, text: str) -> dict[str, Any]:
    """
    A rw client's message comes back through PostgreSQL as its envelope, sent once: no test kills
    another server's LISTEN session (each server's sessions have their own application name), so
    nothing is lost.  Envelopes of others on the same channel (a test run elsewhere on the cluster)
    are skipped.
    """
    client.send(text)
    while True:
        envelope: dict[str, Any] = json.loads(await client.next())
        if envelope["payload"] == text:
            return envelope


def hmac_token() -> str:
    return token({"mode": "rw"})


async def still_serves(server: Server, mint: Callable[[], str] = hmac_token) -> None:
    """The next good client opens a socket and gets its own message back through PostgreSQL."""
    channel = unique("next")
    client = await ws_connect(server.port, f"/{channel}/{mint()}")
    envelope = await round_trip(client, "still here " + uuid.uuid4().hex)
    assert envelope["channel"] == channel
    client.close()
    await wait(client.closed)


def flush_unhandled_errors() -> None:
    """
    A Deferred's unhandled error is logged when it is garbage-collected: collect now, so that one
    this test's input left behind is logged (and seen in C{log_lines.failures}) in this test, not
    in a later one.
    """
    gc.collect()


# -- malformed paths -------------------------------------------------------------------------------

GOOD = token({"mode": "r"})

PATH_REFUSALS = [
    ("/", 401, "no JWT in the request"),
    ("//", 401, "no JWT in the request"),
    ("///", 400, PATH_400),
    ("/chat/?jwt=" + GOOD, 401, "no JWT in the request"),  # a token in the query is not one
    ("/%ff/" + GOOD, 403, "the channel in the path is not valid UTF-8"),
    ("/%c3%28/" + GOOD, 403, "the channel in the path is not valid UTF-8"),
    ("/%ed%a0%80/" + GOOD, 403, "the channel in the path is not valid UTF-8"),  # an encoded surrogate
    ("/a%00b/" + GOOD, 403, 'channel "a\\u0000b" contains a NUL character'),
    ("/%00/" + GOOD, 403, 'channel "\\u0000" contains a NUL character'),
    ("/a/b/" + GOOD, 400, PATH_400),
    ("/a/b/c", 400, PATH_400),
    ("/" + GOOD + "/x/" + GOOD, 400, PATH_400),
    ("/..", 401, "JWT is malformed"),
    ("/../..", 401, "JWT is malformed"),
    ("/./.", 401, "JWT is malformed"),
    ("/.../", 401, "no JWT in the request"),
    ("/../../" + GOOD, 400, PATH_400),
]


@pytest.mark.parametrize("path,status,reason", PATH_REFUSALS, ids=[p[0][:30] for p in PATH_REFUSALS])
@pytest_twisted.ensureDeferred
async def test_malformed_path_is_refused_with_its_reason(server, log_lines, path, status, reason):
    assert_refusal(await answer(server.port, path), status, reason)
    await still_serves(server)
    assert_not_logged(log_lines, GOOD)
    assert not log_lines.failures


@pytest.mark.parametrize("segment,channel", [
    ("%zz", "%zz"),    # not an escape: kept as it is (urllib's unquote does the same)
    ("%", "%"),
    ("%4", "%4"),
    ("..", ".."),      # no dot-segment removal: a channel is a name, not a file
    ("%2e%2e", ".."),
    ("a%2Fb", "a/b"),  # an encoded slash is part of the channel, not a third segment
    ("%20", " "),
])
@pytest_twisted.ensureDeferred
async def test_odd_but_decodable_channel_segment_is_taken_literally(server, log_lines, segment, channel):
    # Channel names are shared by every test run on the cluster: the token pins this one's.
    jwt_text = token({"mode": "rw", "nonce": uuid.uuid4().hex})
    client = await ws_connect(server.port, f"/{segment}/{jwt_text}")
    envelope = await round_trip(client, "literal " + uuid.uuid4().hex)
    assert envelope["channel"] == channel
    client.close()
    assert_not_logged(log_lines, jwt_text)


# Autobahn refuses these itself, quoting the URI; pgws's failHandshake answers with its reason.
AUTOBAHN_REFUSALS = {
    "token in a fragment": ("/chat/x#" + GOOD, 400,
                            f'HTTP requested resource contains a fragment identifier "{GOOD}"'),
    "unparsable URI": ("//[/" + GOOD, 400, f'Bad HTTP request resource - could not parse "//[/{GOOD}"'),
}


@pytest.mark.parametrize("path,status,reason", AUTOBAHN_REFUSALS.values(), ids=AUTOBAHN_REFUSALS.keys())
@pytest_twisted.ensureDeferred
async def test_uri_autobahn_refuses_gets_a_one_line_reason(server, log_lines, path, status, reason):
    assert_refusal(await answer(server.port, path), status, reason)  # the token goes back to its sender
    await still_serves(server)
    assert not log_lines.failures


@pytest.mark.parametrize("path,status,reason", AUTOBAHN_REFUSALS.values(), ids=AUTOBAHN_REFUSALS.keys())
@pytest_twisted.ensureDeferred
async def test_token_in_a_refused_uri_is_not_logged(server, log_lines, path, status, reason):
    await answer(server.port, path)
    assert_not_logged(log_lines, GOOD)


# Over 16 KiB, the request line is longer than twisted.web's line limit.
OVERSIZED = {
    "20 kB path": "/" + "a" * 20_000,
    "17 KiB garbage token": "/chat/" + "b" * (16 * 1024 + 1),
    "17 KiB signed token": "/chat/" + token({"mode": "r", "pad": "p" * 13_000}),
}


@pytest.mark.parametrize("path", OVERSIZED.values(), ids=OVERSIZED.keys())
@pytest_twisted.ensureDeferred
async def test_oversized_request_line_harms_nothing(server, log_lines, path):
    response = await answer(server.port, path)
    assert_refusal(response, 431, "the request line or a header is longer than 16384 bytes")
    await still_serves(server)
    assert_not_logged(log_lines, path.rsplit("/", 1)[1])
    assert not any("a" * 100 in line or "b" * 100 in line for line in log_lines)
    assert not log_lines.failures


@pytest.mark.parametrize("size", [8 * 1024 + 1, 15 * 1024])
@pytest_twisted.ensureDeferred
async def test_oversized_token_is_refused_with_its_reason(server, size):
    # Between pgws's 8 KiB token limit and twisted.web's 16 KiB line limit: pgws's own answer.
    path = "/chat/" + "b" * size
    assert_refusal(await answer(server.port, path), 401, "JWT is longer than 8192 bytes")


@pytest_twisted.ensureDeferred
async def test_large_token_within_the_limit_is_accepted(server):
    jwt_text = token({"mode": "r", "pad": "p" * 5_800})
    assert 7_800 < len(jwt_text) <= 8 * 1024
    response = await answer(server.port, f"/{unique('big')}/{jwt_text}")
    assert response.status == 101


# -- tokens ----------------------------------------------------------------------------------------

TOKEN_REFUSALS = {
    # not a JWT at all
    "not base64": ("!!!.***.~~~", 401, "JWT is malformed"),
    "only dots": ("...", 401, "JWT is malformed"),
    "one segment": ("eyJhbGciOiJIUzI1NiJ9", 401, "JWT is malformed"),
    "header not JSON": (forge(b"\xff\xfe", {"mode": "r"}), 401, "JWT is malformed"),
    "header a list": (forge(b"[1]", {"mode": "r"}), 401, "JWT is malformed"),
    "header nested 2000 deep": (forge(b"[" * 2000 + b"]" * 2000, {"mode": "r"}), 401, "JWT is malformed"),
    "payload a list": (forge(HS256, b"[1, 2]"), 401, "JWT is malformed"),
    "payload not JSON": (forge(HS256, b"\xff"), 401, "JWT is malformed"),
    "payload nested 2000 deep": (forge(HS256, b'{"mode": "r", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
                                 401, "JWT is malformed"),
    "unknown crit header": (forge({**HS256, "crit": ["x"]}, {"mode": "r"}), 401, "JWT is malformed"),
    "kid an object": (forge({**HS256, "kid": {"a": 1}}, {"mode": "r"}), 401, "JWT is malformed"),
    # algorithms
    "alg none": (NONE_TOKEN, 401, f'JWT algorithm "none" is not accepted; {HMAC_ONLY}'),
    "alg NONE": (forge({"alg": "NONE"}, {"mode": "r"}), 401, f'JWT algorithm "NONE" is not accepted; {HMAC_ONLY}'),
    "alg missing": (forge({"typ": "JWT"}, {"mode": "r"}), 401, f'JWT algorithm "None" is not accepted; {HMAC_ONLY}'),
    "alg a number": (forge({"alg": 5}, {"mode": "r"}), 401, f'JWT algorithm "5" is not accepted; {HMAC_ONLY}'),
    "empty signature": (forge(HS256, {"mode": "r"}).rsplit(".", 1)[0] + ".", 401, "JWT signature is invalid"),
    "HS384 signature under HS256": (forge(HS256, {"mode": "r"}, digest=hashlib.sha384), 401,
                                    "JWT signature is invalid"),
    # claims of the wrong type
    "mode 1": (token({"mode": 1}), 403, MODE_403),
    "mode true": (token({"mode": True}), 403, MODE_403),
    "mode null": (token({"mode": None}), 403, MODE_403),
    "mode a list": (token({"mode": ["r"]}), 403, MODE_403),
    "mode an object": (token({"mode": {"r": True}}), 403, MODE_403),
    "mode RW": (token({"mode": "RW"}), 403, MODE_403),
    "mode wr": (token({"mode": "wr"}), 403, MODE_403),
    "channels a string": (token({"mode": "r", "channels": "a"}), 403, CHANNELS_403),
    "channels of objects": (token({"mode": "r", "channels": [{"a": 1}]}), 403, CHANNELS_403),
    "channels of lists": (token({"mode": "r", "channels": [["chat"]]}), 403, CHANNELS_403),
    "channels an object": (token({"mode": "r", "channels": {"chat": True}}), 403, CHANNELS_403),
    "channels with null": (token({"mode": "r", "channels": ["chat", None]}), 403, CHANNELS_403),
    "channel a list": (token({"mode": "r", "channel": ["a"]}), 403, CHANNEL_403),
    "channel an object": (token({"mode": "r", "channel": {"name": "a"}}), 403, CHANNEL_403),
    "channel a number": (token({"mode": "r", "channel": 1}), 403, CHANNEL_403),
    "exp a string": (token({"mode": "r", "exp": "x"}), 401, "JWT claim exp must be a number"),
    "exp an object": (token({"mode": "r", "exp": {"at": 1}}), 401, "JWT claim exp must be a number"),
    "exp true": (token({"mode": "r", "exp": True}), 401, "JWT claim exp must be a number"),
    "exp null": (token({"mode": "r", "exp": None}), 401, "JWT claim exp must be a number"),
    "nbf a list": (token({"mode": "r", "nbf": []}), 401, "JWT claim nbf must be a number"),
    "nbf far future": (token({"mode": "r", "nbf": 10**400}), 401, "JWT not yet valid"),
    "exp far past": (token({"mode": "r", "exp": -(10**400)}), 401, "JWT expired"),
    # channel names that look like SQL, quoted in the reason as JSON
    "SQL channel not allowed": (token({"mode": "r", "channel": 'a"; DROP TABLE x; --', "channels": ["b"]}),
                                403, 'channel "a\\"; DROP TABLE x; --" is not allowed by this token'),
    "backslash channel not allowed": (token({"mode": "r", "channel": "back\\slash", "channels": ["b"]}),
                                      403, 'channel "back\\\\slash" is not allowed by this token'),
    "quoted channel too long": (token({"mode": "r", "channel": 'q"' + "c" * 62}), 403,
                                'channel "q\\"' + "c" * 62 + '" is 64 bytes long; the limit is 63'),
}


@pytest.mark.parametrize("jwt_text,status,reason", TOKEN_REFUSALS.values(), ids=TOKEN_REFUSALS.keys())
@pytest_twisted.ensureDeferred
async def test_hostile_token_is_refused_with_its_reason(server, log_lines, jwt_text, status, reason):
    assert_refusal(await answer(server.port, "/chat/" + jwt_text), status, reason)
    await still_serves(server)
    assert_not_logged(log_lines, jwt_text)
    assert not log_lines.failures


@pytest_twisted.ensureDeferred
async def test_nested_object_claims_travel_in_the_envelope(server, log_lines):
    nested = {"a": {"b": [1, {"c": None, "d": ["é", 2.5, True]}]}, "e": {}}
    jwt_text = token({"mode": "rw", "nested": nested, "list": [[[]]]})
    client = await ws_connect(server.port, f"/{unique('nested')}/{jwt_text}")
    envelope = await round_trip(client, "nested " + uuid.uuid4().hex)
    assert (envelope["claims"]["nested"], envelope["claims"]["list"]) == (nested, [[[]]])
    client.close()
    assert_not_logged(log_lines, jwt_text)


# A lone surrogate is valid in a JSON string ("\ud800") and decodes to a str that is not UTF-8.
SURROGATE_TOKENS = {
    "channel claim": token({"mode": "r", "channel": "\ud800"}),
    "channel not in channels": token({"mode": "r", "channel": "\udfff", "channels": ["a"]}),
    "alg header": forge({"alg": "\ud800"}, {"mode": "r"}),
}


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_in_a_token_harms_nothing_else(impatient_server, log_lines):
    await defer.gatherResults([defer.Deferred.fromCoroutine(answer(impatient_server.port, "/" + t))
                               for t in SURROGATE_TOKENS.values()])
    flush_unhandled_errors()
    await still_serves(impatient_server)
    assert_not_logged(log_lines, *SURROGATE_TOKENS.values())


@pytest_twisted.ensureDeferred
async def test_lone_surrogate_in_a_token_gets_a_one_line_refusal(impatient_server, log_lines):
    responses = await defer.gatherResults([
        defer.Deferred.fromCoroutine(answer(impatient_server.port, "/" + t))
        for t in SURROGATE_TOKENS.values()])
    flush_unhandled_errors()
    assert [r.status for r in responses] == [403, 403, 401]
    assert all(is_one_line(r.text) for r in responses)
    assert not log_lines.failures


@pytest.mark.parametrize("claims", [
    {"mode": "r", "exp": float("nan")},
    {"mode": "r", "nbf": float("nan")},
    {"mode": "r", "exp": float("inf")},
], ids=["exp NaN", "nbf NaN", "exp Infinity"])
@pytest_twisted.ensureDeferred
async def test_non_finite_time_claim_is_refused(server, claims):
    response = await answer(server.port, "/chat/" + token(claims))
    assert response.status == 401 and is_one_line(response.text)


@pytest_twisted.ensureDeferred
async def test_far_future_integer_exp_opens_cleanly(server, log_lines):
    channel = unique("far")
    jwt_text = token({"mode": "rw", "exp": 10**400})
    client = await ws_connect(server.port, f"/{channel}/{jwt_text}")
    await round_trip(client, "far " + uuid.uuid4().hex)
    [opened] = [line for line in log_lines if f" open: mode rw, channels {channel}" in line]
    peer = opened.split(" open: ")[0]  # "WebSocket from <peer>"
    client.close()
    await wait(client.closed)
    # The server's side of the close, done once it logs it.
    await until(lambda: any(line.startswith(f"{peer} closed: ") for line in log_lines),
                "the server's side of the close")
    flush_unhandled_errors()
    assert not log_lines.failures
    assert any(f"open: mode rw, channels {channel}" in line for line in log_lines)


# -- algorithm confusion: an RSA public key configured as a JWK -------------------------------------


@functools.cache
def rsa_private_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_token() -> str:
    return jwt.encode({"mode": "rw"}, rsa_private_key(), algorithm="RS256")


@pytest_twisted.async_yield_fixture
async def rsa_server(db_uri):
    jwk = RSAAlgorithm.to_jwk(rsa_private_key().public_key(), as_dict=True)
    s = await start_server(db_uri, jwt_secret=json.dumps(jwk))
    yield s
    await s.stop()


def confused_tokens() -> dict[str, str]:
    """HMAC tokens whose "secret" is public: the RSA key as PEM (with and without its newline) or JWK."""
    public = rsa_private_key().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_text = RSAAlgorithm.to_jwk(public).encode()
    claims = {"mode": "rw"}
    return {
        "HS256 PEM": forge(HS256, claims, pem),
        "HS256 PEM stripped": forge(HS256, claims, pem.strip()),
        "HS512 PEM": forge({"alg": "HS512", "typ": "JWT"}, claims, pem, hashlib.sha512),
        "HS256 JWK text": forge(HS256, claims, jwk_text),
    }


@pytest.mark.parametrize("name", confused_tokens().keys())
@pytest_twisted.ensureDeferred
async def test_hmac_token_signed_with_the_rsa_public_key_is_refused(rsa_server, log_lines, name):
    jwt_text = confused_tokens()[name]
    alg = json.loads(base64.urlsafe_b64decode(jwt_text.split(".")[0] + "=="))["alg"]
    assert_refusal(await answer(rsa_server.port, "/chat/" + jwt_text), 401,
                   f'JWT algorithm "{alg}" is not accepted; use one of RS256')
    await still_serves(rsa_server, mint=rsa_token)
    assert_not_logged(log_lines, jwt_text)


# -- channel names with quotes, backslashes and SQL, end to end ------------------------------------


def nasty_channels(canary: str) -> list[str]:
    return [
        'a"; DROP TABLE x; --',
        f'a"; DROP TABLE {canary}; --',
        f"a'); DROP TABLE {canary}; --",
        'quote " in the middle',
        '""',
        "back\\slash\\",
        "%s %(x)s $1 $$",
        "ünïcødé ✓ \t tab",
    ]


@pytest.fixture
def canary(db: Db):
    """A table that a channel name tries to drop: it must still be there afterwards."""
    name = "pgws_canary_" + uuid.uuid4().hex[:8]
    db.execute(sql.SQL("CREATE TABLE {} ()").format(sql.Identifier(name)))
    yield name
    db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def table_exists(db: Db, name: str) -> bool:
    return db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0]


async def db_envelope(db: Db, channel: str, text: str, deadline: float) -> dict[str, Any]:
    """The envelope of C{text} as another application LISTENing on C{channel} receives it."""
    while time.monotonic() < deadline:
        for got_channel, payload in await db.received(1, timeout=0.5):
            if got_channel != channel or not payload.startswith("{"):
                continue  # what SQL notified on it
            envelope = json.loads(payload)
            if envelope["payload"] == text:
                return envelope
    raise AssertionError(f"no notification on {channel!r}")


@pytest.mark.parametrize("where", ["path", "channel claim", "channels claim"])
@pytest_twisted.ensureDeferred
async def test_sql_looking_channel_names_are_just_names(server, db, canary, log_lines, where):
    names = nasty_channels(canary)
    for name in names:
        db.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
    for name in names:
        deadline = time.monotonic() + 15
        if where == "path":
            path = f"/{urllib.parse.quote(name, safe='')}/{token({'mode': 'rw'})}"
        elif where == "channel claim":
            path = "/" + token({"mode": "rw", "channel": name})
        else:
            path = f"/{urllib.parse.quote(name, safe='')}/{token({'mode': 'rw', 'channels': ['b', name]})}"
        client = await ws_connect(server.port, path)
        assert name in await server.listening_channels()
        text = f"to {name!r} " + uuid.uuid4().hex
        envelope = await round_trip(client, text)  # out through pg_notify, back by LISTEN
        assert envelope["channel"] == name
        assert (await db_envelope(db, name, text, deadline))["channel"] == name
        from_sql = "from SQL " + uuid.uuid4().hex
        db.notify(name, from_sql)
        while await client.next() != from_sql:
            pass
        client.close()
        await wait(client.closed)
    assert table_exists(db, canary)
    await still_serves(server)
    assert not log_lines.failures


# -- frames ----------------------------------------------------------------------------------------


async def rw_socket(server: Server) -> Client:
    return await ws_connect(server.port, f"/{unique('frames')}/{token({'mode': 'rw'})}")


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_closes_only_that_socket(server, log_lines):
    bystander = await rw_socket(server)
    client = await rw_socket(server)
    assert client.proto is not None
    client.proto.sendMessage(b"valid, then \xff\xfe", isBinary=False)
    await wait(client.closed)
    await round_trip(bystander, "unbothered " + uuid.uuid4().hex)
    await still_serves(server)
    assert not log_lines.failures


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_is_closed_with_1007(server):
    client = await rw_socket(server)
    assert client.proto is not None
    client.proto.sendMessage(b"valid, then \xff\xfe", isBinary=False)
    code, _ = await wait(client.closed)
    assert code == 1007


@pytest_twisted.ensureDeferred
async def test_message_over_64_kib_is_closed_with_1009(server):
    client = await rw_socket(server)
    client.send("x" * (64 * 1024 + 1))
    code, _ = await wait(client.closed)
    assert code == 1009


@pytest.mark.parametrize("payload", [
    b"\x00\x01\x02", b"\xff\xfe", b"", b"[]", b'"refresh"', b'{"x": 1}', b'{"refresh": 1}',
    b'{"refresh": null}', b'{"refresh": ["a"]}',
], ids=repr)
@pytest_twisted.ensureDeferred
async def test_binary_message_that_is_not_a_control_message_is_closed_with_1003(server, log_lines, payload):
    client = await rw_socket(server)
    client.send_binary(payload)
    assert await wait(client.closed) == (1003, "binary messages are not supported; send text (UTF-8)")
    await still_serves(server)
    assert not log_lines.failures


@pytest_twisted.ensureDeferred
async def test_fragmented_text_message_is_relayed_whole(server):
    client = await rw_socket(server)
    text = "fragmented: héllo wörld ✓ " + uuid.uuid4().hex
    data = text.encode("utf-8")
    cut = data.index("é".encode()) + 1  # inside the two bytes of é
    pieces = [data[:cut], b"", data[cut:cut + 3], data[cut + 3:]]
    assert client.proto is not None
    client.proto.beginMessage(isBinary=False)  # as round_trip, but sent in four frames
    for piece in pieces:
        client.proto.sendMessageFrame(piece)
    client.proto.endMessage()
    envelope = json.loads(await client.next())  # the channel is this test's alone
    assert envelope["payload"] == text


@pytest_twisted.ensureDeferred
async def test_ping_flood_disturbs_neither_the_socket_nor_the_server(server, log_lines):
    client = await rw_socket(server)
    assert client.proto is not None
    pings = [str(n).encode() for n in range(2000)]
    for payload in pings:
        client.proto.sendPing(payload)
    await until(lambda: len(client.pongs) >= len(pings), "every ping answered")
    assert client.pongs == pings  # every ping answered, in order
    await round_trip(client, "after the flood " + uuid.uuid4().hex)
    assert not client.closed.called
    await still_serves(server)
    assert not log_lines.failures


class _HalfOpen(protocol.Protocol):
    """Connects, sends what it is given (maybe nothing), then waits to be hung up on."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.lost: defer.Deferred[float] = defer.Deferred()

    def connectionMade(self) -> None:
        tcp(self).write(self.first)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(time.monotonic())


HALF_OPEN = {
    "nothing sent": b"",
    "half a request line": b"GET /chat/",
    "headers never end": upgrade_request("/chat/" + GOOD).rstrip(b"\r\n") + b"\r\n",
}


async def half_open(port: int, first: bytes) -> _HalfOpen:
    proto = _HalfOpen(first)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await wait(endpoint.connect(protocol.Factory.forProtocol(lambda: proto)))
    return proto


@pytest_twisted.ensureDeferred
async def test_half_open_connections_do_not_block_other_clients(impatient_server, log_lines):
    stuck = [await half_open(impatient_server.port, first) for first in HALF_OPEN.values() for _ in range(10)]
    try:
        await still_serves(impatient_server)
    finally:
        for proto in stuck:
            tcp(proto).abortConnection()
    assert_not_logged(log_lines, GOOD)


@pytest.mark.parametrize("first", HALF_OPEN.values(), ids=HALF_OPEN.keys())
@pytest_twisted.ensureDeferred
async def test_half_open_connection_is_closed_within_the_open_handshake_timeout(impatient_server, first):
    proto = await half_open(impatient_server.port, first)
    started = time.monotonic()
    try:
        closed_at = await wait(proto.lost, 3)
    finally:
        if not proto.lost.called:
            tcp(proto).abortConnection()
    assert closed_at - started < 3


# -- property-based tests of the pure parsers ------------------------------------------------------

# What twisted.web lets through in a request target: printable ASCII without space.
URI_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))
percent_escapes = st.binary(max_size=12).map(lambda b: "".join(f"%{x:02X}" for x in b))
uri_segments = st.one_of(
    st.text(alphabet=URI_CHARS, max_size=20),
    percent_escapes,
    st.sampled_from(["", ".", "..", "%", "%zz", "%ff", "%00", "%2F", "?", "?a=b", "#", "[", "//", GOOD]),
)
uri_paths = st.lists(uri_segments, max_size=4).map(lambda s: "/" + "/".join(s))
any_paths = st.one_of(uri_paths, st.text(max_size=40))

channel_names = st.one_of(
    st.text(max_size=70),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Zl", "Zp", "Lo"]), max_size=5),
    st.sampled_from(["", "a", "\x00", "a\x00b", "é" * 31 + "e", "é" * 32, "c" * 63, "c" * 64, "\r\n"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
claim_sets = st.fixed_dictionaries({}, optional={
    "mode": st.one_of(st.sampled_from([*MODES, "", "R", "wr", "rwx"]), json_values),
    "channel": st.one_of(channel_names, json_values),
    "channels": st.one_of(st.lists(channel_names, max_size=4), json_values),
    "role": json_values,
})


def check_refusal(refusal: Refusal, statuses: tuple[int, ...] = (400, 401, 403)) -> None:
    assert refusal.status in statuses
    assert isinstance(refusal.reason, str) and refusal.reason
    assert not set(refusal.reason) & {"\r", "\n", "\0"}, refusal.reason


def is_channel_name(name: Any) -> bool:
    if not isinstance(name, str) or "\0" in name:
        return False
    try:
        return 1 <= len(name.encode("utf-8")) <= 63
    except UnicodeEncodeError:
        return False


@settings(max_examples=500, deadline=None, database=None)
@given(any_paths)
def test_split_path_gives_a_channel_and_token_or_a_refusal(path):
    try:
        channel, jwt_text = split_path(path)
    except Refusal as refusal:
        check_refusal(refusal)
        return
    target = path.split("?", 1)[0]
    assert target.startswith("/") and target.count("/") in (1, 2)
    assert jwt_text and target.endswith("/" + jwt_text) and "/" not in jwt_text
    if channel is None:
        assert target == "/" + jwt_text
    else:
        raw = target.split("/")[1]
        assert channel == urllib.parse.unquote_to_bytes(raw).decode("utf-8")


@settings(max_examples=500, deadline=None, database=None)
@given(claim_sets, st.one_of(st.none(), channel_names))
def test_authorize_grants_only_what_the_rules_allow(claims, requested):
    try:
        grant = authorize(claims, requested)
    except Refusal as refusal:
        check_refusal(refusal, (403,))
        # A token with a valid mode and no channel claims opens any valid requested channel.
        if isinstance(claims.get("mode"), str) and claims["mode"] in MODES \
                and "channel" not in claims and "channels" not in claims:
            assert not is_channel_name(requested)
        return
    assert isinstance(grant.mode, str) and grant.mode in MODES and grant.mode == claims["mode"]
    assert grant.channels and all(is_channel_name(name) for name in grant.channels)
    assert len(set(grant.channels)) == len(grant.channels)
    if "channel" in claims:  # a channel claim wins over the URL
        assert grant.channels == (claims["channel"],)
    elif requested is not None:
        assert grant.channels == (requested,)
    if "channels" in claims:
        assert set(grant.channels) <= set(claims["channels"])
    assert dict(grant.claims) == claims


headers = st.fixed_dictionaries({}, optional={"authorization": st.one_of(
    st.text(max_size=20),
    st.tuples(st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", " Bearer "]), st.text(max_size=20))
    .map(" ".join),
)})
subprotocols = st.lists(st.one_of(st.just("pgws"), st.text(max_size=10),
                                  st.text(max_size=20).map(lambda t: BEARER_PREFIX + t)), max_size=3)


@settings(max_examples=500, deadline=None, database=None)
@given(any_paths, headers, subprotocols)
def test_locate_finds_the_token_or_refuses(uri, request_headers, protocols):
    try:
        channel, jwt_text = locate(uri, request_headers, protocols)
    except Refusal as refusal:
        check_refusal(refusal)
        return
    assert isinstance(jwt_text, str)
    assert channel is None or isinstance(channel, str)
    offered = [p[len(BEARER_PREFIX):] for p in protocols if p.startswith(BEARER_PREFIX)]
    if offered:
        assert jwt_text == offered[0]  # the subprotocol wins, and its token is used as offered
    elif not request_headers.get("authorization", "").strip().lower().startswith("bearer "):
        assert (channel, jwt_text) == split_path(uri)  # no header token: the path's


# -- random paths against a running server ---------------------------------------------------------

e2e_claims = st.fixed_dictionaries({"mode": st.sampled_from(["r", "w", "rw", "x"])}, optional={
    "channel": st.text(max_size=8),
    "channels": st.lists(st.text(max_size=8), max_size=3),
})
e2e_tokens = e2e_claims.map(token)
e2e_paths = st.one_of(
    st.builds("/{}/{}".format, uri_segments, e2e_tokens),  # mostly the two documented shapes
    e2e_tokens.map("/{}".format),
    st.lists(st.one_of(uri_segments, e2e_tokens), max_size=4).map(lambda s: "/" + "/".join(s)),
)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one server for all examples
@given(path=e2e_paths)
@pytest_twisted.ensureDeferred
async def test_random_paths_get_a_documented_answer(server, log_lines, path):
    # No other test kills this server's LISTEN session: a 503 is a failure too.
    response = await answer(server.port, path)
    event(f"status {response.status}")
    assert response.status in (101, 400, 401, 403), response
    if response.status != 101:
        assert is_one_line(response.text), response
    await still_serves(server)
    assert_not_logged(log_lines)
    assert not log_lines.failures

