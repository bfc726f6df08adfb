"""
The listen-channel routing (postgres-websockets mode), in memory: everything goes through one
database channel, and notifications on it reach the readers of the channel their JSON names.
"""

from __future__ import annotations

import json

from memory import EPOCH, MemoryRelay, envelope, token

RW = {"mode": "rw"}


def relay() -> MemoryRelay:
    return MemoryRelay(listen_channel="pgws")


def test_client_message_is_notified_on_the_listen_channel_naming_the_client_channel():
    r = relay()
    client = r.open("/room/" + token({"mode": "w"}))
    client.send("hello")
    assert r.pool.statements == [[("pgws", envelope("room", "hello", {"mode": "w"}, EPOCH))]]


def test_readers_of_any_channel_listen_to_the_listen_channel_only():
    r = relay()
    r.open("/room/" + token({"mode": "r"}))
    r.open("/lobby/" + token({"mode": "r"}))
    assert r.db.session.statements == ['LISTEN "pgws"']


def test_last_reader_leaving_unlistens_the_listen_channel():
    r = relay()
    first = r.open("/room/" + token({"mode": "r"}))
    second = r.open("/lobby/" + token({"mode": "r"}))
    first.close()
    r.flush()
    assert r.db.listening() == {"pgws"}
    second.close()
    r.flush()
    assert r.db.session.statements == ['LISTEN "pgws"', 'UNLISTEN "pgws"']


def test_notification_naming_a_channel_reaches_its_readers_only():
    r = relay()
    room = r.open("/room/" + token({"mode": "r"}))
    lobby = r.open("/lobby/" + token({"mode": "r"}))
    text = '{"channel": "room", "payload": "for the room", "extra": [1, 2]}'
    r.notify("pgws", text)
    assert room.messages == [text]
    assert lobby.messages == []


def test_rw_echo_comes_back_through_the_listen_channel_to_its_channel():
    r = relay()
    sender = r.open("/room/" + token(RW))
    other_room = r.open("/room/" + token({"mode": "r"}))
    lobby = r.open("/lobby/" + token({"mode": "r"}))
    sender.send("hi")
    sent = envelope("room", "hi", RW, EPOCH)
    assert sender.messages == other_room.messages == [sent]
    assert lobby.messages == []


def test_notification_without_a_channel_field_reaches_readers_of_the_listen_channels_name():
    r = relay()
    of_listen_channel = r.open("/pgws/" + token({"mode": "r"}))
    room = r.open("/room/" + token({"mode": "r"}))
    for text in ("plain text", '{"no": "channel"}', '{"channel": 5}', "[1, 2]", "{broken"):
        r.notify("pgws", text)
    assert of_listen_channel.messages == ["plain text", '{"no": "channel"}', '{"channel": 5}',
                                          "[1, 2]", "{broken"]
    assert room.messages == []


def test_interleaved_notifications_keep_their_order_per_channel():
    r = relay()
    room = r.open("/room/" + token({"mode": "r"}))
    lobby = r.open("/lobby/" + token({"mode": "r"}))
    texts = [json.dumps({"channel": c, "n": n}) for n, c in enumerate(["room", "lobby", "room", "room", "lobby"])]
    r.db.session.deliver([("pgws", t) for t in texts])  # one read brings them all
    r.flush()
    assert room.messages == [texts[0], texts[2], texts[3]]
    assert lobby.messages == [texts[1], texts[4]]


def test_socket_with_several_channels_notifies_the_listen_channel_once_per_channel():
    r = relay()
    claims = {"mode": "w", "channels": ["a", "b"]}
    client = r.open("/" + token(claims))
    client.send("x")
    assert r.pool.statements == [[("pgws", envelope("a", "x", claims, EPOCH)),
                                  ("pgws", envelope("b", "x", claims, EPOCH))]]


def test_meta_events_go_through_the_listen_channel_to_meta_readers():
    r = MemoryRelay(listen_channel="pgws", meta_channel="meta")
    watcher = r.open("/" + token({"mode": "r", "channel": "meta"}))
    r.open("/room/" + token({"mode": "w"}))
    opened = envelope("meta", "room", {"mode": "w"}, EPOCH, event="ConnectionOpen")
    assert r.db.notified[-1] == ("pgws", opened)
    assert watcher.messages[-1] == opened
