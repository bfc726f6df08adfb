"""
Tokens on an open socket, in memory: the close at exp (not a moment before), refresh through a
binary control message, the refusals of a refresh that would change the socket, and the meta
channel's rule that only a token naming it may open it.
"""

from __future__ import annotations

import json
from typing import Any

from memory import EPOCH, MemoryClient, MemoryRelay, envelope, status_and_body, token, upgrade_request

OTHER_SECRET = "another secret, long enough for hmac"


def refresh(client: MemoryClient, jwt: str) -> None:
    client.send_binary(json.dumps({"refresh": jwt}).encode())


def opened(relay: MemoryRelay, path: str) -> MemoryClient:
    client = relay.open(path)
    assert (client.opened, client.closed) == (True, None)
    return client


# -- exp ----------------------------------------------------------------------------------------


def test_exp_closes_3001_exactly_at_exp():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    relay.advance_to(EPOCH + 59.999)
    assert client.closed is None
    relay.advance_to(EPOCH + 60)
    assert client.closed == (3001, "JWT expired")


def test_socket_still_relays_until_exp():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    relay.advance_to(EPOCH + 59.999)
    relay.notify("chat", "just in time")
    assert client.messages == ["just in time"]


def test_token_without_exp_never_closes():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw"}))
    relay.advance(365 * 24 * 3600)
    assert client.closed is None


def test_expired_socket_stops_listening():
    relay = MemoryRelay()
    opened(relay, "/chat/" + token({"mode": "r", "exp": EPOCH + 1}))
    relay.advance_to(EPOCH + 1)
    assert relay.db.listening() == set()


def test_token_accepted_within_the_leeway_is_not_closed_at_once():
    relay = MemoryRelay(jwt_leeway=10)
    client = relay.open("/chat/" + token({"mode": "rw", "exp": EPOCH - 5}))
    assert client.opened
    assert client.closed is None


def test_exp_with_leeway_closes_at_exp_plus_leeway():
    relay = MemoryRelay(jwt_leeway=10)
    client = relay.open("/chat/" + token({"mode": "rw", "exp": EPOCH + 1}))
    relay.advance_to(EPOCH + 10.999)
    assert client.closed is None
    relay.advance_to(EPOCH + 11)
    assert client.closed == (3001, "JWT expired")


# -- refresh ------------------------------------------------------------------------------------


def test_refresh_answers_refreshed_with_the_new_exp():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    refresh(client, token({"mode": "rw", "exp": EPOCH + 120}))
    assert client.controls == [{"refreshed": True, "exp": EPOCH + 120}]
    assert client.messages == []


def test_refreshed_exp_reschedules_the_close():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    relay.advance(30)
    refresh(client, token({"mode": "rw", "exp": EPOCH + 120}))
    relay.advance_to(EPOCH + 60)
    assert client.closed is None
    relay.advance_to(EPOCH + 119.999)
    assert client.closed is None
    relay.advance_to(EPOCH + 120)
    assert client.closed == (3001, "JWT expired")


def test_refresh_to_an_earlier_exp_closes_at_the_earlier_one():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    refresh(client, token({"mode": "rw", "exp": EPOCH + 10}))
    relay.advance_to(EPOCH + 10)
    assert client.closed == (3001, "JWT expired")


def test_refresh_without_exp_answers_null_and_lifts_the_close():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    refresh(client, token({"mode": "rw"}))
    assert client.controls == [{"refreshed": True, "exp": None}]
    relay.advance(3600)
    assert client.closed is None


def test_later_envelopes_carry_the_refreshed_claims():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "v": 1}))
    client.send("before")
    refresh(client, token({"mode": "rw", "v": 2}))
    client.send("after")
    assert client.messages == [envelope("chat", "before", {"mode": "rw", "v": 1}, EPOCH),
                               envelope("chat", "after", {"mode": "rw", "v": 2}, EPOCH)]


def test_refresh_of_a_channel_claim_token_resolves_against_the_opening_request():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "r", "channels": ["chat", "news"]}))
    refresh(client, token({"mode": "r", "channels": ["chat", "news", "sport"]}))
    assert client.controls == [{"refreshed": True, "exp": None}]
    assert relay.db.listening() == {"chat"}


def _refused_refresh(opening: dict[str, Any], new: dict[str, Any], path: str = "/",
                     secret: str | None = None) -> tuple[MemoryRelay, MemoryClient]:
    relay = MemoryRelay()
    client = opened(relay, path + token(opening))
    refresh(client, token(new) if secret is None else token(new, secret=secret))
    return relay, client


def test_refresh_with_a_wider_channels_claim_is_refused():
    _, client = _refused_refresh({"mode": "r", "channels": ["a", "b"]},
                                 {"mode": "r", "channels": ["a", "b", "c"]})
    assert client.controls == [{"refreshed": False, "reason": 'the new token would add channel "c"'}]
    assert client.closed is None


def test_refresh_with_a_wider_mode_is_refused():
    _, client = _refused_refresh({"mode": "r"}, {"mode": "rw"}, path="/chat/")
    assert client.controls == [{"refreshed": False, "reason": 'the new token\'s mode "rw" is wider than "r"'}]


def test_refresh_with_a_narrower_channel_set_is_refused():
    _, client = _refused_refresh({"mode": "r", "channels": ["a", "b"]},
                                 {"mode": "r", "channels": ["a"]})
    assert client.controls == [{"refreshed": False,
                                "reason": "the new token must grant the same channels and mode"}]


def test_refresh_with_a_narrower_mode_is_refused():
    _, client = _refused_refresh({"mode": "rw"}, {"mode": "r"}, path="/chat/")
    assert client.controls == [{"refreshed": False,
                                "reason": "the new token must grant the same channels and mode"}]


def test_refresh_with_a_bad_signature_is_refused():
    _, client = _refused_refresh({"mode": "rw"}, {"mode": "rw"}, path="/chat/", secret=OTHER_SECRET)
    assert client.controls == [{"refreshed": False, "reason": "JWT signature is invalid"}]


def test_refresh_with_an_expired_token_is_refused():
    _, client = _refused_refresh({"mode": "rw"}, {"mode": "rw", "exp": EPOCH}, path="/chat/")
    assert client.controls == [{"refreshed": False, "reason": "JWT expired"}]


def test_refresh_with_a_malformed_token_is_refused():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw"}))
    refresh(client, "not-a-token")
    assert client.controls == [{"refreshed": False, "reason": "JWT is malformed"}]


def test_refused_refresh_keeps_the_old_claims():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "v": 1}))
    refresh(client, token({"mode": "rw", "v": 2}, secret=OTHER_SECRET))
    client.send("after")
    assert client.messages == [envelope("chat", "after", {"mode": "rw", "v": 1}, EPOCH)]


def test_refused_refresh_keeps_the_old_exp():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw", "exp": EPOCH + 60}))
    refresh(client, token({"mode": "rw", "exp": EPOCH + 120}, secret=OTHER_SECRET))
    relay.advance_to(EPOCH + 59.999)
    assert client.closed is None
    relay.advance_to(EPOCH + 60)
    assert client.closed == (3001, "JWT expired")


def test_refresh_whose_value_is_not_a_string_closes_1003():
    relay = MemoryRelay()
    client = opened(relay, "/chat/" + token({"mode": "rw"}))
    client.send_binary(b'{"refresh": 42}')
    relay.flush()
    assert client.controls == []
    assert client.closed == (1003, "binary messages are not supported; send text (UTF-8)")


# -- the meta channel needs a token that names it ------------------------------------------------


def test_meta_channel_from_the_path_is_403():
    relay = MemoryRelay(meta_channel="meta")
    answer = relay.request(upgrade_request("/meta/" + token({"mode": "r"})))
    assert status_and_body(answer) == (
        403, 'channel "meta" is the meta channel; only a token that names it may open it\n')


def test_writing_the_meta_channel_without_naming_it_is_403():
    relay = MemoryRelay(meta_channel="meta")
    answer = relay.request(upgrade_request("/meta/" + token({"mode": "w"})))
    assert status_and_body(answer) == (
        403, 'channel "meta" is the meta channel; only a token that names it may open it\n')


def test_meta_channel_named_by_the_channel_claim_opens():
    relay = MemoryRelay(meta_channel="meta")
    opened(relay, "/" + token({"mode": "r", "channel": "meta"}))
    assert relay.db.listening() == {"meta"}


def test_meta_channel_named_in_the_channels_claim_opens_from_the_path():
    relay = MemoryRelay(meta_channel="meta")
    opened(relay, "/meta/" + token({"mode": "r", "channels": ["chat", "meta"]}))
    assert relay.db.listening() == {"meta"}
