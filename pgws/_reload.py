"""
Which settings a reload (SIGHUP, or L{pgws.Relay.reload}) may change while every socket stays
open, and which need a restart.

A reload applies the settings of L{RELOADED} (the relay's) and L{LOGGING} (twistd's log observer,
L{pgws._logs}).  Every other setting needs a restart: a changed one is refused by name and keeps
the value it started with, while the rest of the reload still applies (a key rotation is not held
up by an unrelated edit).  A setting added later needs a restart until it is listed here.

Why the others need a restart:
  - C{db-uri}, C{db-pool}, C{application-name}, C{retries}, C{check-listener-interval}: the LISTEN
    session and the pool are connected with them; reconnecting would lose notifications.
  - C{server-host}, C{server-port}, C{reuse-port}, C{certificate-file}, C{key-file}: the listening
    socket is bound with them.
  - C{listen-channel}, C{audit-channel}, C{meta-channel}: open sockets route and report through
    them; half the sockets on the old channels and half on the new would split one stream.
  - C{max-pending-bytes}: the fan-out's slice is sized from it (twice it), so that a prompt reader
    is never cut off after a burst; every open socket's limit and the fan-out would have to
    change at once.
  - C{server-root}, C{journal*}, C{presence*}, C{metrics*}, C{embedded-*}: parts built at start.
"""

from __future__ import annotations

import dataclasses

from pgws._config import SETTINGS, Config

__all__ = ["KEYS", "LOGGING", "RELOADED", "changed_settings", "keeping"]

# The token verifier is rebuilt when one of these changes.
KEYS = frozenset({"jwt-secret", "secret-is-base64", "jwt-jwks-url", "jwt-aud", "jwt-iss",
                  "jwt-leeway"})
RELOADED = KEYS | {"allowed-origins", "max-connections", "max-channels", "max-queued-messages",
                   "shutdown-timeout"}
LOGGING = frozenset({"log-format", "log-level"})

# Config fields derived from a setting, compared with it: the same secret read from another
# "@path" is another file to watch.
_DERIVED = {"jwt-secret": ("jwt_secret_file",)}


def _fields(key: str) -> tuple[str, ...]:
    return (key.replace("-", "_"), *_DERIVED.get(key, ()))


def changed_settings(old: Config, new: Config) -> list[str]:
    """The keys whose values differ, in the settings' order (the values are never shown)."""
    return [s.key for s in SETTINGS
            if any(getattr(old, f) != getattr(new, f) for f in _fields(s.key))]


def keeping(new: Config, old: Config, keys: list[str]) -> Config:
    """C{new}, with the settings C{keys} as they are in C{old}."""
    return dataclasses.replace(new, **{f: getattr(old, f) for k in keys for f in _fields(k)})
