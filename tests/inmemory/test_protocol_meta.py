"""
Meta events, in memory: each accepted socket's ConnectionOpen and ConnectionClose envelopes on the
meta channel, their payload (the socket's channels), and their place among the socket's messages.
"""

from __future__ import annotations

import json

from memory import EPOCH, MemoryRelay, envelope, token

W = {"mode": "w"}


def events(relay: MemoryRelay) -> list[tuple[str, str, str]]:
    """(database channel, event, payload) of everything notified so far."""
    return [(channel, json.loads(p)["event"], json.loads(p)["payload"])
            for channel, p in relay.db.notified]


def test_open_socket_notifies_connection_open_on_the_meta_channel():
    relay = MemoryRelay(meta_channel="meta")
    relay.advance(2)
    relay.open("/chat/" + token({"mode": "rw", "sub": "alice"}))
    assert relay.db.notified == [("meta", envelope("meta", "chat", {"mode": "rw", "sub": "alice"},
                                                   EPOCH + 2, event="ConnectionOpen"))]


def test_closing_socket_notifies_connection_close():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token(W))
    relay.advance(3)
    client.close()
    relay.flush()
    assert relay.db.notified[1:] == [
        ("meta", envelope("meta", "chat", W, EPOCH + 3, event="ConnectionClose"))]


def test_meta_payload_is_the_sockets_channels_comma_separated_in_token_order():
    relay = MemoryRelay(meta_channel="meta")
    relay.open("/" + token({"mode": "r", "channels": ["zeta", "alpha", "mid"]}))
    assert events(relay) == [("meta", "ConnectionOpen", "zeta,alpha,mid")]


def test_meta_events_frame_the_sockets_messages_in_order():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token(W))
    client.send("one")
    client.send("two")
    client.close()
    relay.flush()
    assert events(relay) == [("meta", "ConnectionOpen", "chat"),
                             ("chat", "WebsocketMessage", "one"),
                             ("chat", "WebsocketMessage", "two"),
                             ("meta", "ConnectionClose", "chat")]


def test_meta_events_keep_their_place_while_statements_are_slow():
    relay = MemoryRelay(meta_channel="meta")
    relay.pool.hold = True
    client = relay.open("/chat/" + token(W))
    client.send("one")
    client.send("two")
    client.close()
    relay.flush()
    while relay.pool.held:
        relay.pool.release()
    assert events(relay) == [("meta", "ConnectionOpen", "chat"),
                             ("chat", "WebsocketMessage", "one"),
                             ("chat", "WebsocketMessage", "two"),
                             ("meta", "ConnectionClose", "chat")]


def test_read_only_socket_has_meta_events_too():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token({"mode": "r"}))
    client.close()
    relay.flush()
    assert events(relay) == [("meta", "ConnectionOpen", "chat"), ("meta", "ConnectionClose", "chat")]


def test_meta_reader_receives_other_sockets_events_as_text():
    relay = MemoryRelay(meta_channel="meta")
    watcher = relay.open("/" + token({"mode": "r", "channel": "meta"}))
    other = relay.open("/chat/" + token(W))
    other.close()
    relay.flush()
    assert watcher.messages == [
        envelope("meta", "meta", {"mode": "r", "channel": "meta"}, EPOCH, event="ConnectionOpen"),
        envelope("meta", "chat", W, EPOCH, event="ConnectionOpen"),
        envelope("meta", "chat", W, EPOCH, event="ConnectionClose"),
    ]


def test_expired_socket_notifies_connection_close_at_exp():
    relay = MemoryRelay(meta_channel="meta")
    claims = {"mode": "r", "exp": EPOCH + 5}
    relay.open("/chat/" + token(claims))
    relay.advance_to(EPOCH + 5)
    assert relay.db.notified[1:] == [
        ("meta", envelope("meta", "chat", claims, EPOCH + 5, event="ConnectionClose"))]


def test_socket_closed_for_a_too_big_message_notifies_connection_close():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token(W))
    client.send("x" * 8000)
    relay.flush()
    assert client.closed is not None and client.closed[0] == 1009
    assert events(relay) == [("meta", "ConnectionOpen", "chat"), ("meta", "ConnectionClose", "chat")]


def test_connection_close_carries_the_refreshed_claims():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token({"mode": "r", "v": 1}))
    client.send_binary(json.dumps({"refresh": token({"mode": "r", "v": 2})}).encode())
    client.close()
    relay.flush()
    assert [json.loads(p)["claims"]["v"] for _, p in relay.db.notified] == [1, 2]


def test_refused_handshake_has_no_meta_events():
    relay = MemoryRelay(meta_channel="meta")
    client = relay.open("/chat/" + token({"mode": "rw"}, secret="another secret, long enough for hmac"))
    assert client.opened is False
    assert relay.db.notified == []


def test_client_gone_during_the_listen_wait_has_no_meta_events():
    relay = MemoryRelay(meta_channel="meta")
    relay.db.hold_listen = True
    client = relay.open("/chat/" + token({"mode": "r"}))
    client.drop()
    relay.flush()
    relay.db.release_listens()
    relay.flush()
    assert client.opened is False
    assert relay.db.notified == []


def test_client_gone_during_the_listen_wait_is_not_kept_as_an_open_socket():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    client = relay.open("/chat/" + token({"mode": "r"}))
    client.drop()
    relay.flush()
    relay.db.release_listens()
    relay.flush()
    assert relay.relay.factory.sockets == set()


def test_stop_notifies_connection_close_of_each_socket():
    relay = MemoryRelay(meta_channel="meta")
    relay.open("/chat/" + token(W))
    relay.stop()
    assert events(relay) == [("meta", "ConnectionOpen", "chat"), ("meta", "ConnectionClose", "chat")]
