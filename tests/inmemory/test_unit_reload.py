"""
Relay.reload, in memory: the new keys and limits apply to the handshakes and sockets that come
next, open sockets stay open and keep relaying, settings that need a restart are refused by name
and keep their running values, and keys that cannot be used change nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from memory import EPOCH, SECRET, MemoryRelay, status_and_body, token, upgrade_request

from pgws import Config, ConfigError, load_config
from pgws._reload import LOGGING, RELOADED, changed_settings, keeping

NEW_SECRET = "a new secret that is long enough for HS256"
OLD = token({"mode": "rw"})
NEW = token({"mode": "rw"}, secret=NEW_SECRET)


def config(**settings: Any) -> Config:
    """A configuration like MemoryRelay's, with C{settings} (keys with underscores) changed."""
    cli = {"db-uri": "postgresql://memory/pgws", "jwt-secret": SECRET}
    cli.update({k.replace("_", "-"): str(v) for k, v in settings.items()})
    return load_config(None, {}, cli)


def status(relay: MemoryRelay, path: str, extra: str = "") -> tuple[int, str]:
    return status_and_body(relay.request(upgrade_request(path, extra)))


# -- which settings -------------------------------------------------------------------------------


def test_changed_settings_names_the_keys_that_differ_in_the_settings_order():
    old = config()
    new = config(server_port=3001, jwt_secret=NEW_SECRET, max_channels=7)
    assert changed_settings(old, new) == ["server-port", "jwt-secret", "max-channels"]
    assert changed_settings(old, config()) == []


def test_the_same_secret_from_another_file_is_a_changed_jwt_secret(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_text(SECRET)
    old, new = (config(jwt_secret=f"@{tmp_path / n}") for n in ("a", "b"))
    assert old.jwt_secret == new.jwt_secret
    assert changed_settings(old, new) == ["jwt-secret"]
    assert keeping(new, old, ["jwt-secret"]).jwt_secret_file == str(tmp_path / "a")


def test_connection_settings_need_a_restart_and_the_keys_do_not():
    for key in ("db-uri", "db-pool", "server-port", "server-host", "listen-channel",
                "max-pending-bytes", "journal", "certificate-file"):
        assert key not in RELOADED | LOGGING
    for key in ("jwt-secret", "jwt-jwks-url", "jwt-aud", "allowed-origins", "max-connections",
                "max-channels", "max-queued-messages", "shutdown-timeout"):
        assert key in RELOADED


# -- keys -------------------------------------------------------------------------------------------


def test_new_secret_opens_old_one_is_401_and_the_open_socket_still_relays():
    relay = MemoryRelay()
    before = relay.open("/chat/" + OLD)
    assert relay.relay.reload(config(jwt_secret=NEW_SECRET)) == []
    assert status(relay, "/chat/" + OLD) == (401, "JWT signature is invalid\n")
    after = relay.open("/chat/" + NEW)
    assert (after.opened, after.closed) == (True, None)
    before.send("from the old socket")
    relay.notify("chat", "to both")
    assert before.closed is None
    assert relay.db.notified[0][0] == "chat"
    assert json.loads(relay.db.notified[0][1])["payload"] == "from the old socket"
    assert before.messages[-1] == after.messages[-1] == "to both"


def test_refresh_after_a_reload_is_checked_with_the_new_keys():
    relay = MemoryRelay()
    client = relay.open("/chat/" + OLD)
    relay.relay.reload(config(jwt_secret=NEW_SECRET))
    client.send_binary(json.dumps({"refresh": token({"mode": "rw", "v": 2})}).encode())
    assert client.controls == [{"refreshed": False, "reason": "JWT signature is invalid"}]
    client.send_binary(json.dumps({"refresh": NEW}).encode())
    assert client.controls[1] == {"refreshed": True, "exp": None}
    assert client.closed is None


def test_audience_and_leeway_apply_to_new_handshakes():
    relay = MemoryRelay()
    relay.relay.reload(config(jwt_aud="pgws", jwt_leeway=30))
    assert status(relay, "/chat/" + OLD) == (401, "JWT audience is not accepted\n")
    late = relay.open("/chat/" + token({"mode": "r", "aud": "pgws", "exp": EPOCH - 10}))
    assert (late.opened, late.closed) == (True, None)
    relay.advance_to(EPOCH + 20)  # exp + the new leeway
    assert late.closed == (3001, "JWT expired")


def test_an_open_socket_keeps_the_leeway_it_opened_with():
    relay = MemoryRelay()
    client = relay.open("/chat/" + token({"mode": "r", "exp": EPOCH + 10}))
    relay.relay.reload(config(jwt_leeway=60))
    relay.advance_to(EPOCH + 10)
    assert client.closed == (3001, "JWT expired")


def test_unusable_keys_change_nothing():
    relay = MemoryRelay(max_connections=5)
    with pytest.raises(ConfigError, match='"jwt-secret"'):
        relay.relay.reload(config(jwt_secret='{"kty": "oct"}', max_connections=1))
    assert relay.relay.config.max_connections == 5
    first, second = relay.open("/chat/" + OLD), relay.open("/chat/" + OLD)
    assert first.opened and second.opened  # still the old secret, still 5 connections


def test_unchanged_keys_keep_their_verifier():
    relay = MemoryRelay()
    verifier = relay.relay.factory.authorizer.verifier
    relay.relay.reload(config(max_channels=3))
    assert relay.relay.factory.authorizer.verifier is verifier


# -- limits and origins ---------------------------------------------------------------------------


def test_lower_max_connections_refuses_the_next_handshake_and_closes_none():
    relay = MemoryRelay()
    first, second = relay.open("/chat/" + OLD), relay.open("/chat/" + OLD)
    relay.relay.reload(config(max_connections=1))
    assert status(relay, "/chat/" + OLD) == (503, "maximum number of connections reached\n")
    assert first.closed is None and second.closed is None


def test_higher_max_connections_serves_more():
    relay = MemoryRelay(max_connections=1)
    relay.open("/chat/" + OLD)
    relay.relay.reload(config(max_connections=2))
    assert relay.open("/chat/" + OLD).opened


def test_max_channels_applies_to_new_handshakes():
    relay = MemoryRelay()
    wide = token({"mode": "r", "channels": ["a", "b", "c"]})
    open_before = relay.open("/" + wide)
    relay.relay.reload(config(max_channels=2))
    assert status(relay, "/" + wide) == (403, "the token grants 3 channels; the limit is 2\n")
    assert open_before.closed is None


def test_allowed_origins_apply_to_new_handshakes():
    relay = MemoryRelay()
    evil = "Origin: https://evil.example\r\n"
    assert status(relay, "/chat/" + OLD, evil)[0] != 403
    relay.relay.reload(config(allowed_origins="https://good.example"))
    assert status(relay, "/chat/" + OLD, evil) == (
        403, 'origin "https://evil.example" is not allowed\n')
    good = relay.open("/chat/" + OLD, headers={"Origin": "https://good.example"})
    assert (good.opened, good.closed) == (True, None)


def test_max_queued_messages_applies_to_sockets_opened_after_the_reload():
    relay = MemoryRelay(max_queued_messages=5)
    before = relay.open("/chat/" + OLD)
    relay.relay.reload(config(max_queued_messages=2))
    after = relay.open("/chat/" + OLD)
    relay.db.up = False
    for n in range(3):
        before.send(f"b{n}")
        after.send(f"a{n}")
    relay.flush()
    assert before.closed is None
    assert after.closed == (1013, "database unavailable: 3 messages not sent")


def test_shutdown_timeout_applies_to_the_next_stop():
    relay = MemoryRelay()
    client = relay.open("/chat/" + OLD)
    relay.db.up = False
    client.send("never sent")
    relay.relay.reload(config(shutdown_timeout=2))
    stopped = relay.relay.stopService()
    relay.advance(2.5)
    assert stopped.called


# -- settings that need a restart -------------------------------------------------------------------


def test_settings_that_need_a_restart_are_refused_by_name_and_the_rest_applies():
    relay = MemoryRelay()
    refused = relay.relay.reload(config(server_port=4000, db_pool=3, jwt_secret=NEW_SECRET,
                                        max_pending_bytes=4096))
    assert refused == ["db-pool", "server-port", "max-pending-bytes"]
    running = relay.relay.config
    assert (running.server_port, running.db_pool, running.max_pending_bytes) == (3000, 10, 1048576)
    assert relay.relay.factory.config is running
    assert relay.open("/chat/" + NEW).opened  # the key rotation applied


def test_log_settings_are_neither_applied_nor_refused_by_the_relay():
    relay = MemoryRelay()
    assert relay.relay.reload(config(log_level="warn", log_format="json")) == []
    assert (relay.relay.config.log_level, relay.relay.config.log_format) == ("warn", "json")
