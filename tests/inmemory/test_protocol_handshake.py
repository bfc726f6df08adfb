"""
The opening handshake, in memory: each refusal's exact status and one-line body, that the relay
serves the next good client after it, that the 101 waits for PostgreSQL's LISTEN, and the two
ways of carrying the token outside the URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from memory import EPOCH, SECRET, MemoryRelay, status_and_body, token, upgrade_request

GOOD = token({"mode": "rw"})


def refused(relay: MemoryRelay, path: str, extra: str = "") -> tuple[int, str, bytes]:
    """(status, body, raw answer) of a handshake on C{path}."""
    answer = relay.request(upgrade_request(path, extra))
    status, body = status_and_body(answer)
    return status, body, answer


def assert_refused(relay: MemoryRelay, path: str, status: int, line: str, extra: str = "") -> None:
    """Refused with C{status} and the one-line text/plain body C{line}; the next client is served."""
    got_status, body, answer = refused(relay, path, extra)
    assert (got_status, body) == (status, line + "\n")
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in answer
    assert b"Upgrade" not in answer.partition(b"\r\n\r\n")[0]
    client = relay.open("/chat/" + GOOD)
    assert (client.opened, client.closed) == (True, None)


def relay_for_refusals(**settings: Any) -> MemoryRelay:
    # One connection at a time: a refused handshake that kept counting would refuse the next one.
    return MemoryRelay(max_connections=1, **settings)


# -- 400 / 401 / 403 ---------------------------------------------------------------------------


def test_path_with_three_segments_is_400():
    assert_refused(relay_for_refusals(), "/a/b/" + GOOD, 400,
                   "the path must be /<channel>/<jwt> or /<jwt>")


def test_root_path_without_token_is_401():
    assert_refused(relay_for_refusals(), "/", 401, "no JWT in the request")


def test_channel_path_with_empty_token_is_401():
    assert_refused(relay_for_refusals(), "/chat/", 401, "no JWT in the request")


def test_malformed_token_is_401():
    assert_refused(relay_for_refusals(), "/chat/not-a-token", 401, "JWT is malformed")


def test_token_signed_with_another_secret_is_401():
    other = token({"mode": "rw"}, secret="another secret, long enough for hmac")
    assert_refused(relay_for_refusals(), "/chat/" + other, 401, "JWT signature is invalid")


def test_token_past_its_exp_is_401():
    expired = token({"mode": "rw", "exp": EPOCH - 1})
    assert_refused(relay_for_refusals(), "/chat/" + expired, 401, "JWT expired")


def test_token_whose_exp_is_now_is_401():
    assert_refused(relay_for_refusals(), "/chat/" + token({"mode": "rw", "exp": EPOCH}), 401,
                   "JWT expired")


def test_token_one_millisecond_before_its_exp_is_accepted():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token({"mode": "rw", "exp": EPOCH + 0.001}))
    assert client.opened


def test_token_before_its_nbf_is_401():
    early = token({"mode": "rw", "nbf": EPOCH + 1})
    assert_refused(relay_for_refusals(), "/chat/" + early, 401, "JWT not yet valid")


def test_unsigned_token_is_401_naming_the_accepted_algorithms():
    unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtb2RlIjoicncifQ."  # alg none, mode rw
    assert_refused(relay_for_refusals(), "/chat/" + unsigned, 401,
                   'JWT algorithm "none" is not accepted; use one of HS256, HS384, HS512')


def test_token_without_mode_is_403():
    assert_refused(relay_for_refusals(), "/chat/" + token({"channel": "chat"}), 403,
                   'JWT claim "mode" is missing; it must be "r", "w" or "rw"')


def test_token_with_unknown_mode_is_403():
    assert_refused(relay_for_refusals(), "/chat/" + token({"mode": "read"}), 403,
                   'JWT claim "mode" must be "r", "w" or "rw"')


def test_channel_outside_the_channels_claim_is_403():
    narrow = token({"mode": "r", "channels": ["news", "sport"]})
    assert_refused(relay_for_refusals(), "/chat/" + narrow, 403,
                   'channel "chat" is not allowed by this token')


def test_more_channels_than_max_channels_is_403():
    wide = token({"mode": "r", "channels": ["a", "b", "c", "d"]})
    assert_refused(relay_for_refusals(max_channels=3), "/" + wide, 403,
                   "the token grants 4 channels; the limit is 3")


def test_exactly_max_channels_is_accepted():
    relay = MemoryRelay(max_channels=3)
    client = relay.open("/" + token({"mode": "r", "channels": ["a", "b", "c"]}))
    assert client.opened
    assert relay.db.listening() == {"a", "b", "c"}


def test_foreign_origin_is_403():
    assert_refused(relay_for_refusals(allowed_origins="https://good.example"), "/chat/" + GOOD,
                   403, 'origin "https://evil.example" is not allowed',
                   extra="Origin: https://evil.example\r\n")


def test_allowed_origin_is_accepted():
    relay = MemoryRelay(allowed_origins="https://good.example")
    client = relay.open("/chat/" + GOOD, headers={"Origin": "https://good.example"})
    assert (client.opened, client.closed) == (True, None)


def test_request_without_origin_is_accepted_when_origins_are_restricted():
    relay = MemoryRelay(allowed_origins="https://good.example")
    answer = relay.request(upgrade_request("/chat/" + GOOD))
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


def test_token_in_both_header_and_path_is_400():
    assert_refused(relay_for_refusals(), "/chat/" + GOOD, 400,
                   "with the token in a header, the path must be /<channel> or /",
                   extra=f"Authorization: Bearer {GOOD}\r\n")


def test_refusal_body_never_quotes_the_token():
    relay = MemoryRelay()
    bad = token({"mode": "rw"}, secret="another secret, long enough for hmac")
    _, _, answer = refused(relay, "/chat/" + bad)
    assert bad.encode() not in answer
    assert bad.split(".")[1].encode() not in answer


# -- 503 -----------------------------------------------------------------------------------------


def test_database_down_at_start_is_503():
    relay = MemoryRelay(database_up=False)
    status, body, _ = refused(relay, "/chat/" + GOOD)
    assert (status, body) == (503, "the database is unavailable; try again later\n")


def test_database_back_after_start_is_served_at_the_first_retry_one_second_later():
    relay = MemoryRelay(database_up=False)
    relay.db.up = True
    relay.advance_to(EPOCH + 0.999)
    assert refused(relay, "/chat/" + GOOD)[:2] == (503, "the database is unavailable; try again later\n")
    relay.advance_to(EPOCH + 1)
    client = relay.open("/chat/" + GOOD)
    assert (client.opened, client.closed) == (True, None)
    assert relay.db.listening() == {"chat"}


def test_connection_past_max_connections_is_503():
    relay = MemoryRelay(max_connections=2)
    first, second = relay.open("/chat/" + GOOD), relay.open("/chat/" + GOOD)
    assert first.opened and second.opened
    status, body, _ = refused(relay, "/chat/" + GOOD)
    assert (status, body) == (503, "maximum number of connections reached\n")


def test_refused_connections_do_not_count_against_max_connections():
    relay = MemoryRelay(max_connections=2)
    relay.open("/chat/" + GOOD)
    second = relay.open("/chat/" + GOOD)
    for _ in range(3):
        assert refused(relay, "/chat/" + GOOD)[0] == 503
    second.close()
    relay.flush()
    third = relay.open("/chat/" + GOOD)
    assert (third.opened, third.closed) == (True, None)


# -- the 101 waits for the LISTEN --------------------------------------------------------------


def test_reader_is_not_open_until_its_listen_executed():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    client = relay.open("/chat/" + token({"mode": "r"}))
    relay.advance(5)
    assert (client.opened, client.closed) == (False, None)
    relay.db.release_listens()
    relay.flush()
    assert client.opened
    relay.notify("chat", "after the LISTEN")
    assert client.messages == ["after the LISTEN"]


def test_second_reader_of_a_channel_waits_for_the_same_listen():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    first = relay.open("/chat/" + token({"mode": "r"}))
    second = relay.open("/chat/" + token({"mode": "r"}))
    assert (first.opened, second.opened) == (False, False)
    relay.db.release_listens()
    relay.flush()
    assert (first.opened, second.opened) == (True, True)
    assert relay.db.session.statements == ['LISTEN "chat"']


def test_writer_does_not_wait_for_any_listen():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    writer = relay.open("/chat/" + token({"mode": "w"}))
    assert writer.opened
    assert relay.db.session.statements == []


def test_client_gone_during_listen_wait_leaves_the_channel_unlistened():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    client = relay.open("/chat/" + token({"mode": "r"}))
    client.drop()
    relay.flush()
    relay.db.release_listens()
    relay.flush()
    assert client.opened is False
    assert relay.db.session.statements == ['LISTEN "chat"', 'UNLISTEN "chat"']
    assert relay.db.listening() == set()


def test_token_expiring_during_listen_wait_closes_the_socket_as_it_opens():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    client = relay.open("/chat/" + token({"mode": "r", "exp": EPOCH + 1}))
    relay.advance(2)
    relay.db.release_listens()
    relay.flush()
    assert client.opened
    assert client.closed == (3001, "JWT expired")


# -- the token outside the URL -----------------------------------------------------------------


def test_token_in_subprotocol_opens_with_pgws_answered():
    relay = MemoryRelay()
    client = relay.open("/chat", protocols=["pgws", "pgws.bearer." + token({"mode": "rw"})])
    assert client.opened
    assert client.protocol.websocket_protocol_in_use == "pgws"
    client.send("hi")
    assert [channel for channel, _ in relay.db.notified] == ["chat"]


def test_subprotocol_answer_never_echoes_the_token():
    relay = MemoryRelay()
    jwt = token({"mode": "rw"})
    answer = relay.request(upgrade_request("/chat", f"Sec-WebSocket-Protocol: pgws, pgws.bearer.{jwt}\r\n"))
    head = answer.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 101 Switching Protocols"
    assert [h for h in head if h.lower().startswith(b"sec-websocket-protocol")] == [
        b"Sec-WebSocket-Protocol: pgws"]
    assert jwt.encode() not in answer


def test_token_in_subprotocol_on_root_path_opens_the_tokens_channel():
    relay = MemoryRelay()
    client = relay.open("/", protocols=["pgws", "pgws.bearer." + token({"mode": "r", "channel": "news"})])
    assert client.opened
    assert relay.db.listening() == {"news"}


def test_bad_token_in_subprotocol_is_401():
    relay = relay_for_refusals()
    bad = token({"mode": "rw"}, secret="another secret, long enough for hmac")
    assert_refused(relay, "/chat", 401, "JWT signature is invalid",
                   extra=f"Sec-WebSocket-Protocol: pgws, pgws.bearer.{bad}\r\n")


def test_authorization_bearer_header_with_channel_path():
    relay = MemoryRelay()
    client = relay.open("/chat", headers={"Authorization": "Bearer " + token({"mode": "rw"})})
    assert client.opened
    assert client.protocol.websocket_protocol_in_use is None
    client.send("hi")
    assert client.messages == [
        '{"event":"WebsocketMessage","channel":"chat","payload":"hi",'
        '"claims":{"mode":"rw","message_delivered_at":1800000000.0}}']


def test_percent_encoded_channel_is_decoded():
    relay = MemoryRelay()
    client = relay.open("/test%20channel/" + token({"mode": "r"}))
    assert client.opened
    assert relay.db.session.statements == ['LISTEN "test channel"']


def test_query_string_is_ignored():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token({"mode": "r"}) + "?x=1")
    assert client.opened
    assert relay.db.listening() == {"chat"}


def test_channel_claim_takes_precedence_over_the_path():
    relay = MemoryRelay()
    client = relay.open("/elsewhere/" + token({"mode": "r", "channel": "chat"}))
    assert client.opened
    assert relay.db.session.statements == ['LISTEN "chat"']


def test_channels_claim_without_a_path_channel_opens_all_of_them():
    relay = MemoryRelay()
    client = relay.open("/" + token({"mode": "r", "channels": ["b", "a", "b"]}))
    assert client.opened
    assert relay.db.session.statements == ['LISTEN "b"', 'LISTEN "a"']


def test_bearer_scheme_is_case_insensitive():
    relay = MemoryRelay()
    client = relay.open("/chat", headers={"Authorization": "bearer " + token({"mode": "r"})})
    assert client.opened


def test_request_line_over_16_kib_is_431():
    relay = MemoryRelay()
    status, body, _ = refused(relay, "/chat/" + "x" * 17000)
    assert (status, body) == (431, "the request line or a header is longer than 16384 bytes\n")


def test_token_over_8_kib_is_401():
    big = token({"mode": "r", "pad": "x" * 8200})
    assert_refused(relay_for_refusals(), "/chat/" + big, 401, "JWT is longer than 8192 bytes")


def test_channel_name_over_63_bytes_is_403():
    name = "é" * 32  # 64 bytes of UTF-8, 32 characters
    assert_refused(relay_for_refusals(), f"/{'%C3%A9' * 32}/" + token({"mode": "r"}), 403,
                   f'channel "{name}" is 64 bytes long; the limit is 63')


def test_channel_name_of_63_bytes_is_accepted():
    relay = MemoryRelay()
    assert relay.open("/" + "c" * 63 + "/" + token({"mode": "r"})).opened
    assert relay.db.listening() == {"c" * 63}


def test_token_in_subprotocol_without_pgws_offered_opens_with_no_subprotocol():
    relay = MemoryRelay()
    client = relay.open("/chat", protocols=["pgws.bearer." + token({"mode": "r"})])
    assert client.opened
    assert client.protocol.websocket_protocol_in_use is None


def signed(payload_json: str) -> str:
    """A token whose payload is exactly this JSON text (jwt.encode would normalise it)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload_json.encode())
    mac = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + b64(mac)


@pytest.mark.parametrize("payload, line", [
    ('{"mode":"rw","x":Infinity}', "JWT payload has a number that is not finite"),
    ('{"mode":"rw","x":NaN}', "JWT payload has a number that is not finite"),
    ('{"mode":"rw","x":[1e400]}', "JWT payload has a number that is not finite"),
    ('{"mode":"rw","sub":"\\ud800"}', "JWT payload has text that is not valid Unicode"),
    ('{"mode":"rw","a":{"\\udfff":1}}', "JWT payload has text that is not valid Unicode"),
    ('{"mode":"rw","deep":' + "[" * 100 + "]" * 100 + "}", "JWT payload is nested too deeply"),
    ('{"mode":"rw","deep":' + "[" * 3000 + "]" * 3000 + "}", "JWT is malformed"),
])
def test_claims_an_envelope_could_not_carry_are_401(payload, line):
    # Python's JSON reader takes each of these; the envelope (strict JSON, UTF-8) could not.
    assert_refused(relay_for_refusals(), "/chat/" + signed(payload), 401, line)


def test_nested_claims_within_reason_are_accepted():
    nested = '{"mode":"rw","deep":' + "[" * 60 + "1.5" + "]" * 60 + ',"e":"\\u00e9\\ud83d\\ude00"}'
    client = relay_for_refusals().open("/chat/" + signed(nested))
    assert (client.opened, client.closed) == (True, None)


def test_a_refusal_is_one_info_line_and_no_warning():
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
    from zope.interface import provider

    relay = relay_for_refusals(allowed_origins="https://good.example")
    logged: list[tuple[Any, str]] = []

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        logged.append((event.get("log_level"), formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    try:
        refused(relay, "/chat/not-a-token")
        refused(relay, "/chat/" + token({"mode": "r"}), "Origin: https://evil.example.com\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [text for level, text in logged if "127.0.0.1" in text]
    assert lines == ["refused WebSocket from tcp4:127.0.0.1:40000: 401 JWT is malformed",
                     'refused WebSocket from tcp4:127.0.0.1:40001: 403 origin '
                     '"https://evil.example.com" is not allowed']
    assert not [text for level, text in logged if level >= LogLevel.warn]
