"""
Client messages, in memory: the envelope each becomes, who receives what, their order on the way
to PostgreSQL, and the close codes for messages that cannot be relayed.
"""

from __future__ import annotations

import json

from memory import EPOCH, MemoryRelay, envelope, token

RW = {"mode": "rw"}
W = {"mode": "w"}


def payloads(statements: list[list[tuple[str, str]]]) -> list[list[str]]:
    """The client texts carried by each pool statement, statement by statement."""
    return [[json.loads(p)["payload"] for _, p in statement] for statement in statements]


# -- the envelope -----------------------------------------------------------------------------


def test_rw_echo_carries_the_envelope_with_keys_in_order():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token({"mode": "rw", "sub": "alice", "role": "admin"}))
    relay.advance(1.25)
    client.send("hello")
    assert client.messages == [
        '{"event":"WebsocketMessage","channel":"chat","payload":"hello","claims":'
        '{"mode":"rw","sub":"alice","role":"admin","message_delivered_at":1800000001.25}}']
    received = json.loads(client.messages[0])
    assert list(received) == ["event", "channel", "payload", "claims"]
    assert received["claims"]["message_delivered_at"] == relay.clock.seconds()


def test_envelope_goes_to_the_pool_as_pg_notify_on_the_channel():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    client.send("hello")
    assert relay.pool.statements == [[("chat", envelope("chat", "hello", W, EPOCH))]]


def test_message_delivered_at_is_when_each_message_arrived():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    client.send("one")
    relay.advance(0.5)
    client.send("two")
    assert [json.loads(p)["claims"]["message_delivered_at"] for _, p in relay.db.notified] == [
        EPOCH, EPOCH + 0.5]


def test_token_claim_message_delivered_at_is_replaced_by_the_time():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token({"message_delivered_at": 1, "mode": "w"}))
    client.send("x")
    assert relay.db.notified == [("chat", envelope("chat", "x", W, EPOCH))]


def test_payload_is_relayed_character_for_character():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(RW))
    text = 'quote " backslash \\ newline \n tab \t unicode é 漢 😀 {"json": [1]}'
    client.send(text)
    assert json.loads(client.messages[0])["payload"] == text
    assert client.messages == [envelope("chat", text, RW, EPOCH)]


def test_socket_with_several_channels_notifies_each_in_one_statement():
    relay = MemoryRelay()
    claims = {"mode": "w", "channels": ["b", "a"]}
    client = relay.open("/" + token(claims))
    client.send("x")
    assert relay.pool.statements == [[("b", envelope("b", "x", claims, EPOCH)),
                                      ("a", envelope("a", "x", claims, EPOCH))]]


def test_audit_channel_gets_the_same_envelope_in_the_same_statement():
    relay = MemoryRelay(audit_channel="audit")
    client = relay.open("/chat/" + token(W))
    client.send("x")
    sent = envelope("chat", "x", W, EPOCH)
    assert relay.pool.statements == [[("chat", sent), ("audit", sent)]]


def test_audit_channel_gets_one_envelope_per_channel():
    relay = MemoryRelay(audit_channel="audit")
    claims = {"mode": "w", "channels": ["a", "b"]}
    client = relay.open("/" + token(claims))
    client.send("x")
    a, b = envelope("a", "x", claims, EPOCH), envelope("b", "x", claims, EPOCH)
    assert relay.pool.statements == [[("a", a), ("audit", a), ("b", b), ("audit", b)]]


# -- who receives -------------------------------------------------------------------------------


def test_write_only_token_never_receives():
    relay = MemoryRelay()
    writer = relay.open("/chat/" + token(W))
    other = relay.open("/chat/" + token(RW))
    writer.send("from the writer")
    other.send("from the other")
    relay.notify("chat", "from the database")
    assert writer.messages == []
    assert other.messages == [envelope("chat", "from the writer", W, EPOCH),
                              envelope("chat", "from the other", RW, EPOCH),
                              "from the database"]


def test_write_only_socket_does_not_listen():
    relay = MemoryRelay()
    relay.open("/chat/" + token(W))
    assert relay.db.session.statements == []


def test_read_only_socket_message_is_not_relayed_and_the_socket_stays_open():
    relay = MemoryRelay()
    reader = relay.open("/chat/" + token({"mode": "r"}))
    reader.send("ignored")
    reader.send("ignored too")
    relay.advance(1)
    assert relay.pool.statements == []
    assert reader.closed is None
    relay.notify("chat", "still reading")
    assert reader.messages == ["still reading"]


def test_notification_reaches_every_reader_of_its_channel_only():
    relay = MemoryRelay()
    first = relay.open("/chat/" + token({"mode": "r"}))
    second = relay.open("/chat/" + token({"mode": "r"}))
    elsewhere = relay.open("/news/" + token({"mode": "r"}))
    relay.notify("chat", "one")
    relay.notify("news", "two")
    relay.notify("chat", "three")
    assert first.messages == second.messages == ["one", "three"]
    assert elsewhere.messages == ["two"]


def test_last_reader_leaving_unlistens():
    relay = MemoryRelay()
    first = relay.open("/chat/" + token({"mode": "r"}))
    second = relay.open("/chat/" + token({"mode": "r"}))
    first.close()
    relay.flush()
    assert relay.db.listening() == {"chat"}
    second.close()
    relay.flush()
    assert relay.db.session.statements == ['LISTEN "chat"', 'UNLISTEN "chat"']


# -- order and batching -----------------------------------------------------------------------


def test_one_sockets_messages_reach_the_pool_in_order():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    for n in range(20):
        client.send(f"m{n}")
    assert [p for statement in payloads(relay.pool.statements) for p in statement] == [
        f"m{n}" for n in range(20)]


def test_messages_waiting_for_a_statement_go_together_in_the_next_one():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.pool.hold = True
    client.send("m1")
    client.send("m2")
    client.send("m3")
    client.send("m4")
    assert [p for p, _ in relay.pool.held] == [[("chat", envelope("chat", "m1", W, EPOCH))]]
    relay.pool.release()
    relay.pool.release()
    assert payloads(relay.pool.statements) == [["m1"], ["m2", "m3", "m4"]]


def test_identical_messages_at_one_instant_are_not_folded_into_one():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.pool.hold = True
    for _ in range(3):
        client.send("same")
    for _ in range(3):
        relay.pool.release()
    assert payloads(relay.pool.statements) == [["same"], ["same"], ["same"]]


def test_two_sockets_messages_keep_each_sockets_order():
    relay = MemoryRelay()
    alice = relay.open("/chat/" + token({"mode": "w", "sub": "alice"}))
    bob = relay.open("/chat/" + token({"mode": "w", "sub": "bob"}))
    relay.pool.hold = True
    for n in range(3):
        alice.send(f"a{n}")
        bob.send(f"b{n}")
    relay.pool.release()
    relay.pool.release()
    sent = [json.loads(p) for _, p in relay.db.notified]
    assert [m["payload"] for m in sent if m["claims"]["sub"] == "alice"] == ["a0", "a1", "a2"]
    assert [m["payload"] for m in sent if m["claims"]["sub"] == "bob"] == ["b0", "b1", "b2"]


# -- messages that cannot be relayed ----------------------------------------------------------


def _payload_for_envelope_of(size: int) -> str:
    overhead = len(envelope("chat", "", W, EPOCH).encode())
    return "x" * (size - overhead)


def test_envelope_of_7999_bytes_is_sent():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    client.send(_payload_for_envelope_of(7999))
    assert [len(p.encode()) for _, p in relay.db.notified] == [7999]
    assert client.closed is None


def test_envelope_over_7999_bytes_closes_1009_naming_the_size():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    client.send(_payload_for_envelope_of(8000))
    relay.flush()
    assert client.closed == (1009, "message too big: its NOTIFY payload is 8000 bytes, PostgreSQL's limit is 7999")
    assert relay.pool.statements == []


def test_envelope_size_counts_utf8_bytes_not_characters():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    overhead = len(envelope("chat", "", W, EPOCH).encode())
    client.send("é" * ((8000 - overhead) // 2) + "x" * ((8000 - overhead) % 2))
    relay.flush()
    assert client.closed == (1009, "message too big: its NOTIFY payload is 8000 bytes, PostgreSQL's limit is 7999")


def test_message_too_big_for_one_of_its_channels_sends_none_of_them():
    relay = MemoryRelay()
    claims = {"mode": "w", "channels": ["a", "a-much-longer-channel-name"]}
    client = relay.open("/" + token(claims))
    overhead = len(envelope("a", "", claims, EPOCH).encode())
    client.send("x" * (7999 - overhead))
    relay.flush()
    assert client.closed == (1009, "message too big: its NOTIFY payload is 8024 bytes, PostgreSQL's limit is 7999")
    assert relay.pool.statements == []


def test_binary_frame_that_is_no_control_message_closes_1003():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(RW))
    client.send_binary(b"\x00\x01\x02")
    relay.flush()
    assert client.closed == (1003, "binary messages are not supported; send text (UTF-8)")


def test_binary_json_without_refresh_closes_1003():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(RW))
    client.send_binary(b'{"hello": "world"}')
    relay.flush()
    assert client.closed == (1003, "binary messages are not supported; send text (UTF-8)")
    assert relay.pool.statements == []


def test_database_error_closes_1011_with_the_error():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.pool.refuse = "payload string too long"
    client.send("x")
    relay.flush()
    assert client.closed == (1011, "database error, 1 message not sent: payload string too long")


def test_database_error_counts_every_message_waiting_behind_the_refused_one():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.pool.hold = True
    client.send("m1")
    client.send("m2")
    client.send("m3")
    relay.pool.refuse = "permission denied for function pg_notify"
    relay.pool.release()
    relay.flush()
    assert client.closed == (1011, "database error, 3 messages not sent: permission denied for function pg_notify")
    assert relay.pool.statements == []


def test_database_away_with_more_than_max_queued_messages_closes_1013():
    relay = MemoryRelay(max_queued_messages=5)
    client = relay.open("/chat/" + token(W))
    relay.db.up = False
    for n in range(5):
        client.send(f"m{n}")
    relay.flush()
    assert client.closed is None
    client.send("m5")
    relay.flush()
    assert client.closed == (1013, "database unavailable: 6 messages not sent")
    relay.db.up = True
    relay.advance(10)
    assert relay.pool.statements == []


def test_messages_waiting_while_the_database_is_away_are_sent_in_order_when_it_is_back():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.db.up = False
    client.send("m1")  # fails: the next attempt is 0.25 s later
    relay.advance_to(EPOCH + 0.1)
    client.send("m2")
    client.send("m3")
    relay.advance_to(EPOCH + 0.25)  # fails again: the next attempt is 0.5 s later
    relay.db.up = True
    relay.advance_to(EPOCH + 0.749)
    assert relay.pool.statements == []
    relay.advance_to(EPOCH + 0.75)
    assert relay.pool.statements == [[("chat", envelope("chat", "m1", W, EPOCH)),
                                      ("chat", envelope("chat", "m2", W, EPOCH + 0.1)),
                                      ("chat", envelope("chat", "m3", W, EPOCH + 0.1))]]
    assert client.closed is None


def test_after_the_database_is_back_messages_are_sent_at_once_again():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.db.up = False
    client.send("m1")
    relay.db.up = True
    relay.advance(0.25)
    client.send("m2")
    assert payloads(relay.pool.statements) == [["m1"], ["m2"]]


def test_batch_in_flight_when_the_database_went_away_is_sent_again():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    relay.pool.hold = True
    client.send("m1")
    client.send("m2")
    relay.db.up = False
    relay.pool.release()  # m1's statement fails: the database is away
    relay.pool.hold = False
    relay.db.up = True
    relay.advance(0.25)
    assert payloads(relay.pool.statements) == [["m1", "m2"]]


def test_text_that_is_not_utf8_closes_1007():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(RW))
    client.protocol.sendMessage(b"ok \xff\xfe", isBinary=False)
    relay.flush()
    assert client.closed == (1007, "encountered invalid UTF-8 while processing text message at payload octet index 3")
    assert relay.pool.statements == []


def test_message_over_64_kib_closes_1009():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(RW))
    client.send("x" * (64 * 1024 + 1))
    assert client.closed == (1009, "received WebSocket message size 65537 exceeds payload limit of 65536 octets")
    assert relay.pool.statements == []


def test_message_after_a_closing_one_is_not_relayed():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token(W))
    client.protocol.sendMessage(b"x" * 8000, isBinary=False)  # 1009
    client.protocol.sendMessage(b"after", isBinary=False)  # arrives while the socket closes
    relay.flush()
    assert client.closed is not None and client.closed[0] == 1009
    assert relay.pool.statements == []


def test_burst_of_notifications_reaches_every_reader_in_order():
    relay = MemoryRelay()
    readers = [relay.open("/chat/" + token({"mode": "r"})) for _ in range(3)]
    burst = [("chat", f"n{i}") for i in range(12000)]  # several fan-out slices, reading paused
    relay.db.session.deliver(burst)
    relay.db.notify("chat", "after the burst")  # arrives while the burst is being fanned out
    relay.flush()
    for client in readers:
        assert client.messages == [p for _, p in burst] + ["after the burst"]
