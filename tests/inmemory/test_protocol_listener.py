"""
The LISTEN session lost and back, and the relay stopping, in memory: reconnection with its
back-off, the re-LISTEN of every channel with readers, the gap control message (only for sockets
that negotiated the pgws subprotocol), and the 1001 close at shutdown.
"""

from __future__ import annotations

from memory import EPOCH, MemoryClient, MemoryRelay, envelope, status_and_body, token, upgrade_request

R = {"mode": "r"}
W = {"mode": "w"}


def reader(relay: MemoryRelay, channel: str = "chat", subprotocol: bool = True) -> MemoryClient:
    client = relay.open("/" + channel, protocols=["pgws"] if subprotocol else [],
                        headers={"Authorization": "Bearer " + token(R)})
    assert (client.opened, client.closed) == (True, None)
    return client


def handshake_status(relay: MemoryRelay) -> tuple[int, str]:
    return status_and_body(relay.request(upgrade_request("/chat/" + token(R))))


# -- reconnecting -------------------------------------------------------------------------------


def test_killed_session_is_replaced_at_once_when_the_database_is_up():
    relay = MemoryRelay()
    reader(relay)
    first = relay.db.session
    first.kill()
    relay.flush()
    assert relay.db.session is not first
    assert relay.db.listening() == {"chat"}


def test_every_channel_with_readers_is_listened_again_in_one_statement():
    relay = MemoryRelay()
    for channel in ("c", "a", "b"):
        reader(relay, channel)
    relay.db.session.kill()
    relay.flush()
    assert relay.db.session.statements == ['LISTEN "a"; LISTEN "b"; LISTEN "c"']


def test_channel_left_while_the_session_was_down_is_not_listened_again():
    relay = MemoryRelay()
    reader(relay, "stays")
    leaving = reader(relay, "goes")
    relay.db.up = False
    relay.db.session.kill()
    leaving.close()
    relay.flush()
    relay.db.up = True
    relay.advance(1)
    assert relay.db.session.statements == ['LISTEN "stays"']


def test_reconnection_backs_off_one_then_two_seconds():
    relay = MemoryRelay()
    reader(relay)
    relay.db.up = False
    relay.db.session.kill()  # the first attempt, at once, fails
    relay.flush()
    relay.advance_to(EPOCH + 1)  # the second fails
    relay.db.up = True
    relay.advance_to(EPOCH + 2.999)
    assert handshake_status(relay) == (503, "the database is unavailable; try again later\n")
    relay.advance_to(EPOCH + 3)
    assert relay.db.listening() == {"chat"}
    assert relay.open("/chat/" + token(R)).opened


def test_handshake_while_the_session_is_down_is_503():
    relay = MemoryRelay()
    reader(relay)
    relay.db.up = False
    relay.db.session.kill()
    relay.flush()
    assert handshake_status(relay) == (503, "the database is unavailable; try again later\n")


def test_open_sockets_stay_open_while_the_session_is_down():
    relay = MemoryRelay()
    client = reader(relay)
    relay.db.up = False
    relay.db.session.kill()
    relay.advance(10)
    assert client.closed is None


# -- the gap --------------------------------------------------------------------------------------


def test_subprotocol_socket_gets_a_gap_with_the_time_the_session_was_back():
    relay = MemoryRelay()
    client = reader(relay)
    relay.db.up = False
    relay.db.session.kill()
    relay.flush()
    relay.db.up = True
    relay.advance_to(EPOCH + 1)
    assert client.controls == [{"event": "gap", "at": EPOCH + 1}]
    assert client.messages == []


def test_gap_after_an_immediate_reconnect():
    relay = MemoryRelay()
    client = reader(relay)
    relay.advance(7)
    relay.db.session.kill()
    relay.flush()
    assert client.controls == [{"event": "gap", "at": EPOCH + 7}]


def test_socket_without_the_subprotocol_gets_nothing_on_a_gap():
    relay = MemoryRelay()
    plain = reader(relay, subprotocol=False)
    relay.db.session.kill()
    relay.flush()
    assert (plain.controls, plain.messages, plain.closed) == ([], [], None)


def test_one_gap_per_loss():
    relay = MemoryRelay()
    client = reader(relay)
    relay.db.session.kill()
    relay.flush()
    relay.advance(5)
    relay.db.session.kill()
    relay.flush()
    assert client.controls == [{"event": "gap", "at": EPOCH}, {"event": "gap", "at": EPOCH + 5}]


def test_no_gap_when_the_session_first_connects():
    relay = MemoryRelay(database_up=False)
    relay.db.up = True
    relay.advance(1)
    client = reader(relay)
    relay.advance(10)
    assert client.controls == []


def test_gap_comes_only_after_the_relisten_executed():
    relay = MemoryRelay()
    client = reader(relay)
    relay.db.hold_listen = True
    relay.db.session.kill()
    relay.flush()
    assert client.controls == []
    relay.db.release_listens()
    relay.flush()
    assert client.controls == [{"event": "gap", "at": EPOCH}]


def test_notifications_after_the_session_is_back_arrive():
    relay = MemoryRelay()
    with_gap, without = reader(relay), reader(relay, subprotocol=False)
    relay.db.session.kill()
    relay.flush()
    relay.notify("chat", "after")
    assert with_gap.messages == without.messages == ["after"]


def test_notification_while_the_session_is_down_reaches_no_one():
    relay = MemoryRelay()
    client = reader(relay)
    relay.db.up = False
    relay.db.session.kill()
    relay.notify("chat", "lost")
    relay.db.up = True
    relay.advance(1)
    relay.notify("chat", "after")
    assert client.messages == ["after"]


def test_writers_keep_sending_across_a_listener_loss():
    relay = MemoryRelay()
    writer = relay.open("/chat/" + token(W))
    relay.db.session.kill()
    relay.flush()
    writer.send("x")
    assert relay.pool.statements == [[("chat", envelope("chat", "x", W, EPOCH))]]


def test_handshake_during_the_relisten_waits_for_it():
    relay = MemoryRelay()
    reader(relay)
    relay.db.hold_listen = True
    relay.db.session.kill()
    relay.flush()
    late = relay.open("/chat/" + token(R))
    assert late.opened is False
    relay.db.release_listens()
    relay.flush()
    assert late.opened


# -- stopping -------------------------------------------------------------------------------------


def test_stop_closes_open_sockets_1001():
    relay = MemoryRelay()
    clients = [reader(relay), relay.open("/chat/" + token(W)), reader(relay, "news", subprotocol=False)]
    relay.stop()
    assert [c.closed for c in clients] == [(1001, "server shutting down")] * 3


def test_stop_still_sends_what_waited_for_the_database():
    relay = MemoryRelay()
    writer = relay.open("/chat/" + token(W))
    relay.db.up = False
    writer.send("queued")
    relay.stop()
    assert writer.closed == (1001, "server shutting down")
    relay.db.up = True
    relay.advance(0.25)
    assert relay.pool.statements == [[("chat", envelope("chat", "queued", W, EPOCH))]]


def test_stop_closes_the_listen_session():
    relay = MemoryRelay()
    reader(relay)
    session = relay.db.session
    relay.stop()
    assert session.connected is False


def test_no_socket_is_left_open_by_a_handshake_pending_at_stop():
    relay = MemoryRelay()
    relay.db.hold_listen = True
    pending = relay.open("/chat/" + token(R))
    relay.stop()
    relay.advance(30)
    assert not (pending.opened and pending.closed is None)


def test_listen_channel_mode_gives_up_after_retries_failed_attempts():
    relay = MemoryRelay(listen_channel="pgws", retries=2, database_up=False)
    assert relay.relay.exit_status == 0
    relay.advance_to(EPOCH + 0.999)
    assert relay.relay.exit_status == 0
    relay.advance_to(EPOCH + 1)
    assert relay.relay.exit_status == 1
    relay.db.up = True
    relay.advance(60)
    assert handshake_status(relay) == (503, "the database is unavailable; try again later\n")


def test_pgws_mode_never_gives_up():
    relay = MemoryRelay(database_up=False)
    relay.advance(600)
    relay.db.up = True
    relay.advance(32)
    assert relay.relay.exit_status == 0
    assert reader(relay).opened
