"""
The settings: a config file, the environment and the command line, merged into one frozen L{Config}.

Precedence, highest first: command line > environment (C{PGWS_<KEY>}) > config file > default.

The file format is the original postgrest-ws one (C{key = "string"}, C{key = 10}, C{key = true},
C{#} comments, dashed keys), which happens to be valid TOML, so C{tomllib} parses it and reports
syntax errors with line numbers.  C{$(NAME)} inside a string value is replaced by the environment
variable C{NAME} after parsing.

Every problem is raised as a L{ConfigError} whose text is one line naming the key, so that
C{twistd} start-up can print it and exit without a traceback.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgws._channelname import ChannelNameError, check_channel_name

__all__ = ["Config", "ConfigError", "SETTINGS", "Setting", "env_names", "load_config",
           "read_secret", "read_settings"]


class ConfigError(Exception):
    """A setting is missing, unknown, malformed or unreadable: the text says which and why."""


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default, and the other names it answers to."""

    key: str
    kind: type
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    required: bool = False

    @property
    def attr(self) -> str:
        return self.key.replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("db-uri", str, None,
            'PostgreSQL to relay through: a postgres:// URI, a libpq keyword string, "@path" to '
            'read it from a file, or "embedded" to start a private server', required=True),
    Setting("application-name", str, "pgws",
            'how PostgreSQL names pgws\'s sessions (pg_stat_activity): "<name> listener" for the '
            'LISTEN session, "<name> notify" for the pool; give each deployment its own'),
    Setting("db-pool", int, 10, "connections in the NOTIFY pool", aliases=("pool-size",)),
    Setting("server-host", str, "*4",
            'address to listen on: "*4" all IPv4, "*6" or "*" all IPv6 (and IPv4 where the OS '
            "maps it), or an address", aliases=("host",)),
    Setting("server-port", int, 3000, "TCP port to listen on (0: any free port)",
            aliases=("port",)),
    Setting("reuse-port", bool, False,
            "listen with SO_REUSEPORT, so that several pgws processes share server-port"),
    Setting("server-root", str, None, "folder of static files served over plain HTTP",
            aliases=("root-path",)),
    Setting("audit-channel", str, None, "channel that receives a copy of every client message"),
    Setting("jwt-secret", str, None,
            'key the tokens are checked with: an HMAC secret, a JWK or a JWKS (JSON), or "@path" '
            "to read one of those from a file (a key set in a file is re-read when it changes); "
            "required unless jwt-jwks-url is set"),
    Setting("jwt-jwks-url", str, None,
            "https:// URL of a JWKS to fetch (cached, re-fetched for an unknown kid)"),
    Setting("jwt-aud", str, None, "when set, tokens must carry this audience (aud)"),
    Setting("jwt-iss", str, None, "when set, tokens must carry this issuer (iss)"),
    Setting("jwt-leeway", int, 0, "seconds of clock skew allowed for exp and nbf"),
    Setting("secret-is-base64", bool, False,
            "jwt-secret is base64 (standard or URL-safe) and is decoded first",
            aliases=("jwt-secret-base64",)),
    Setting("embedded-data-dir", str, None,
            "data directory of the embedded PostgreSQL (default /var/lib/pgws/pgdata as root, "
            "else ~/.local/share/pgws/pgdata)"),
    Setting("embedded-port", int, 54329, "loopback port of the embedded PostgreSQL"),
    Setting("listen-channel", str, None,
            "postgres-websockets mode: route everything through this one database channel"),
    Setting("meta-channel", str, None,
            "channel that gets ConnectionOpen / ConnectionClose events"),
    Setting("retries", int, 5,
            "start-up connection attempts before giving up (with listen-channel set; pgws's own "
            "mode keeps trying)"),
    Setting("check-listener-interval", int, 5000,
            "milliseconds between checks that the LISTEN session is alive (0: keepalives only)"),
    Setting("max-connections", int, 15000,
            "WebSockets served at once; past it new ones get 503 (the open-files limit here is "
            "~20000)"),
    Setting("max-channels", int, 100, "channels one socket may have (a channels claim)"),
    Setting("max-pending-bytes", int, 1048576,
            "bytes waiting to be sent to one socket; a reader that falls further behind is "
            "closed (1008) so that it cannot slow the others or grow memory"),
    Setting("max-queued-messages", int, 1000,
            "client messages one socket may have waiting while the database is away; past it "
            "the socket is closed (1013) with the count not sent"),
    Setting("allowed-origins", str, "*",
            'comma-separated Origin patterns allowed to open WebSockets ("*" wildcards); '
            "others get 403"),
    Setting("shutdown-timeout", int, 10,
            "seconds a graceful stop may take to flush client messages to the database"),
    Setting("journal", bool, False,
            "keep messages in PostgreSQL (schema journal-schema) so that readers resume without "
            "loss, nothing is lost across a listener outage or a restart, and payloads may be "
            "large; producers call journal-schema.send(channel, payload)"),
    Setting("journal-schema", str, "pgws",
            "the schema pgws creates and owns for the journal and for presence"),
    Setting("journal-channels", str, "*",
            'comma-separated channel patterns ("*" wildcards) whose client messages go through '
            "the journal and whose readers get positions"),
    Setting("journal-max-payload", int, 4 * 1024 * 1024,
            "the largest payload the journal takes, in bytes; a larger send() fails in the "
            "producer's transaction"),
    Setting("journal-retention-seconds", int, 86400,
            "journaled messages older than this are pruned (0: no age limit)"),
    Setting("journal-retention-count", int, 10000,
            "at most this many messages are kept per channel (0: no count limit)"),
    Setting("presence", bool, False,
            "sockets with the pgws subprotocol may ask who is on their channels and get join / "
            "leave events, across every pgws process on the database (kept in journal-schema)"),
    Setting("presence-claim", str, "sub",
            "the token claim that names a member in presence (sockets whose token lacks it are "
            "not members)"),
    Setting("metrics", bool, True, "serve Prometheus metrics at /metrics"),
    Setting("metrics-token", str, None,
            'when set, /metrics needs "Authorization: Bearer <this>" (or "@path" to read it '
            "from a file)"),
    Setting("metrics-channel-labels", bool, False,
            "label the per-channel metrics with channel names (one time series per channel: for "
            "a few fixed channels only)"),
    Setting("log-format", str, "text",
            '"text" (lines for people) or "json" (one JSON object a line, for log shippers)'),
    Setting("log-level", str, "info", 'the least severe level logged: "debug", "info", "warn", '
            '"error" or "critical"'),
    Setting("certificate-file", str, None, "TLS certificate (PEM): serve wss:// and https://"),
    Setting("key-file", str, None, "TLS private key (PEM) for certificate-file"),
)

_BY_NAME: dict[str, Setting] = {}
for _s in SETTINGS:
    for _name in (_s.key, *_s.aliases):
        _BY_NAME[_name] = _s

_SUBST = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _default(attr: str) -> Any:
    """A Config field's default: its setting's, from the one table of them."""
    return next(s.default for s in SETTINGS if s.attr == attr)


def _default_patterns(attr: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(_default(attr)).split(","))


@dataclass(frozen=True)
class Config:
    """
    Validated settings: one field per entry of L{SETTINGS} (the defaults are SETTINGS' own),
    plus what is derived from them.  Secrets are kept out of C{repr} so that a logged config
    never leaks them.
    """

    db_uri: str = field(repr=False)
    jwt_secret: bytes | None = field(repr=False)
    jwt_secret_file: str | None = None  # where jwt-secret was read from ("@path"), to re-read it
    application_name: str = _default("application_name")
    db_pool: int = _default("db_pool")
    server_host: str = _default("server_host")
    server_port: int = _default("server_port")
    reuse_port: bool = _default("reuse_port")
    server_root: str | None = _default("server_root")
    audit_channel: str | None = _default("audit_channel")
    jwt_jwks_url: str | None = _default("jwt_jwks_url")
    jwt_aud: str | None = _default("jwt_aud")
    jwt_iss: str | None = _default("jwt_iss")
    jwt_leeway: int = _default("jwt_leeway")
    secret_is_base64: bool = _default("secret_is_base64")
    embedded_data_dir: str | None = _default("embedded_data_dir")
    embedded_port: int = _default("embedded_port")
    listen_channel: str | None = _default("listen_channel")
    meta_channel: str | None = _default("meta_channel")
    retries: int = _default("retries")
    check_listener_interval: int = _default("check_listener_interval")
    max_connections: int = _default("max_connections")
    max_channels: int = _default("max_channels")
    max_pending_bytes: int = _default("max_pending_bytes")
    max_queued_messages: int = _default("max_queued_messages")
    allowed_origins: tuple[str, ...] = _default_patterns("allowed_origins")
    shutdown_timeout: int = _default("shutdown_timeout")
    certificate_file: str | None = _default("certificate_file")
    key_file: str | None = _default("key_file")
    journal: bool = _default("journal")
    journal_schema: str = _default("journal_schema")
    journal_channels: tuple[str, ...] = _default_patterns("journal_channels")
    journal_max_payload: int = _default("journal_max_payload")
    journal_retention_seconds: int = _default("journal_retention_seconds")
    journal_retention_count: int = _default("journal_retention_count")
    presence: bool = _default("presence")
    presence_claim: str = _default("presence_claim")
    metrics: bool = _default("metrics")
    metrics_token: str | None = field(default=_default("metrics_token"), repr=False)
    metrics_channel_labels: bool = _default("metrics_channel_labels")
    log_format: str = _default("log_format")
    log_level: str = _default("log_level")

    @property
    def embedded(self) -> bool:
        return self.db_uri == "embedded"

    @property
    def listen_interface(self) -> str:
        """The interface for C{listenTCP}: C{*4} and C{*6}/C{*} are the original's wildcards."""
        return {"*4": "0.0.0.0", "*6": "::", "*": "::"}.get(self.server_host, self.server_host)


def env_names(setting: Setting) -> list[str]:
    """C{PGWS_} + upper case + dashes to underscores, for the key and each alias."""
    return ["PGWS_" + n.upper().replace("-", "_") for n in (setting.key, *setting.aliases)]


def _convert(setting: Setting, value: Any, source: str, typed: bool = False) -> Any:
    """
    Coerce a value to the setting's type.  Environment and command-line values are always
    strings; a config file has types of its own (C{typed}), so C{db-pool = "3"} is an error there.
    """
    where = f'"{setting.key}" (from {source})'
    if typed and not isinstance(value, setting.kind):
        expected = {bool: "true or false", int: "an integer", str: "a string"}[setting.kind]
        raise ConfigError(f"{where}: expected {expected}, got {_show(value)}")
    if setting.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if setting.kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A short, single-line rendering of a bad value (never used for secrets' contents)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _substitute(value: str, environ: Mapping[str, str], key: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in environ:
            raise ConfigError(f'"{key}": environment variable {name} used as $({name}) is not set')
        return environ[name]

    return _SUBST.sub(repl, value)


def read_config_file(path: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Parse the file and return C{{key: value}} with C{$(NAME)} substituted in strings."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        setting = _BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f'config file {path}: unknown key "{key}"')
        if isinstance(value, str):
            value = _substitute(value, environ, key)
        out[setting.key] = _convert(setting, value, path, typed=True)
    return out


def _read_at_path(value: str, key: str) -> str:
    """C{@path} values are read from a file; one trailing newline is dropped."""
    if not value.startswith("@"):
        return value
    path = value[1:]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f'"{key}": cannot read {path}: {reason}') from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def decode_secret(secret: str, is_base64: bool) -> bytes:
    """The HMAC key bytes; base64 may be the standard or the URL-safe alphabet, padded or not."""
    if not is_base64:
        return secret.encode("utf-8")
    # The original's URL-safe variant: "-" "_" "." stand for "+" "/" "=".
    text = secret.strip().replace("-", "+").replace("_", "/").replace(".", "=").rstrip("=")
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ConfigError('"jwt-secret": secret-is-base64 is true but the secret is not base64') from None


def load_config(
    file: str | None,
    environ: Mapping[str, str],
    cli: Mapping[str, Any],
) -> Config:
    """
    Merge the three sources and validate.

    @param cli: values given on the command line, by key or alias (unset ones absent or None).
    """
    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    if file is not None:
        values.update(read_config_file(file, environ))
    values.update(_from_environment(environ))
    values.update(_from_command_line(cli))
    for setting in SETTINGS:
        if setting.required and values[setting.key] in (None, ""):
            names = " or ".join(env_names(setting)[:1])
            raise ConfigError(
                f'"{setting.key}" is required: set it in the config file, with '
                f"--{setting.key}, or with {names}"
            )
    return _validate(values)


def read_settings(keys: Collection[str], file: str | None, environ: Mapping[str, str],
                  cli: Mapping[str, Any]) -> dict[str, Any]:
    """
    Only the settings C{keys}, merged as L{load_config} merges them (file < environment <
    command line, each value converted to its type), the others neither read nor validated: for
    a tool that needs a few settings of a server's configuration (C{pgws token} its keys).  A
    C{$(NAME)} in the file need only be set where a setting asked for uses it.
    """
    wanted = [s for s in SETTINGS if s.key in keys]
    values: dict[str, Any] = {s.key: s.default for s in wanted}
    if file is not None:
        in_file = read_config_file(file, _LenientEnvironment(environ))
        for key in keys:
            if key not in in_file:
                continue
            value = in_file[key]
            unset = re.search("\0(.*?)\0", value) if isinstance(value, str) else None
            if unset:
                name = unset.group(1)
                raise ConfigError(f'"{key}": environment variable {name} used as $({name}) is not '
                                  "set")
            values[key] = value
    values.update(_from_environment(environ, wanted))
    values.update({k: v for k, v in _from_command_line(cli).items() if k in keys})
    return values


class _LenientEnvironment(Mapping[str, str]):
    """
    The environment for L{read_settings}'s reading of the file: an unset C{$(NAME)} becomes a
    marker instead of an error (a NUL cannot be in an environment variable, so the marker cannot
    be mistaken for a value).
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: str) -> str:
        return self._environ.get(name, f"\0{name}\0")

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


def _from_environment(environ: Mapping[str, str],
                      settings: Iterable[Setting] = SETTINGS) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in settings:
        for name in reversed(env_names(setting)):  # the canonical name wins over an alias
            if name in environ:
                values[setting.key] = _convert(setting, environ[name], name)
    return values


def _from_command_line(cli: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in cli.items():
        if value is None:
            continue
        given = _BY_NAME.get(name)
        if given is None:
            raise ConfigError(f'unknown option "--{name}"')
        values[given.key] = _convert(given, value, f"--{name}")
    return values


# Bounds of the numeric settings: (key, test, what the error says).
_BOUNDS: tuple[tuple[str, Callable[[int], bool], str], ...] = (
    ("db-pool", lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
    ("server-port", lambda v: 0 <= v <= 65535, "must be between 0 and 65535"),
    ("embedded-port", lambda v: 1 <= v <= 65535, "must be between 1 and 65535"),
    ("max-connections", lambda v: v >= 1, "must be 1 or more"),
    ("max-channels", lambda v: v >= 1, "must be 1 or more"),
    ("max-pending-bytes", lambda v: v >= 1024, "must be 1024 or more"),
    ("max-queued-messages", lambda v: v >= 0, "must be 0 or more"),
    ("shutdown-timeout", lambda v: v >= 0, "must be 0 or more"),
    ("jwt-leeway", lambda v: v >= 0, "must be 0 or more"),
    ("retries", lambda v: v >= 0, "must be 0 or more"),
    ("check-listener-interval", lambda v: v >= 0, "must be 0 (off) or more milliseconds"),
    ("journal-max-payload", lambda v: 1 <= v <= 256 * 1024 * 1024,
     "must be between 1 and 268435456 bytes"),
    ("journal-retention-seconds", lambda v: v >= 0, "must be 0 (no limit) or more"),
    ("journal-retention-count", lambda v: v >= 0, "must be 0 (no limit) or more"),
)


def _validate(values: dict[str, Any]) -> Config:
    for key, ok, why in _BOUNDS:
        if not ok(values[key]):
            raise ConfigError(f'"{key}": {why}, got {values[key]}')
    db_uri = _read_at_path(values["db-uri"], "db-uri").strip()
    if not db_uri:
        raise ConfigError('"db-uri" is empty')
    secret, secret_file = read_secret(values)
    url = values["jwt-jwks-url"]
    if url is not None and not url.startswith("https://"):
        raise ConfigError(f'"jwt-jwks-url": must be an https:// URL, got {_show(url)}')
    _check_tls(values["certificate-file"], values["key-file"])
    root = values["server-root"]
    if root is not None and not os.path.isdir(root):
        raise ConfigError(f'"server-root": {root} is not a directory')
    _check_journal(values)
    _check_choices(values)
    for name in ("audit-channel", "listen-channel", "meta-channel"):
        if values[name] is not None:
            try:
                check_channel_name(values[name])
            except ChannelNameError as e:
                raise ConfigError(f'"{name}": {e}') from None

    # Every setting is a Config field of the same name; a few are read or parsed above.
    fields: dict[str, Any] = {setting.attr: values[setting.key] for setting in SETTINGS}
    fields.update(
        db_uri=db_uri,
        jwt_secret=secret,
        jwt_secret_file=secret_file,
        allowed_origins=_patterns(values["allowed-origins"]),
        journal_channels=_patterns(values["journal-channels"]),
    )
    return Config(**fields)


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("log-format", ("text", "json")),
    ("log-level", ("debug", "info", "warn", "error", "critical")),
)


def _check_choices(values: dict[str, Any]) -> None:
    for key, choices in _CHOICES:
        values[key] = values[key].strip().lower()
        if values[key] not in choices:
            raise ConfigError(f'"{key}": must be one of {", ".join(choices)}, got '
                              f"{_show(values[key])}")
    if values["metrics-token"] is not None:
        values["metrics-token"] = _read_at_path(values["metrics-token"], "metrics-token").strip()
        if not values["metrics-token"]:
            raise ConfigError('"metrics-token" is empty')
    if values["presence"] and not values["presence-claim"].strip():
        raise ConfigError('"presence-claim" is empty')


def _check_journal(values: Mapping[str, Any]) -> None:
    # Presence works in both routing modes (its notifications never go through the routing).
    if not values["journal"] and not values["presence"]:
        return
    if values["journal"] and values["listen-channel"] is not None:
        raise ConfigError('"journal": the journal needs per-channel routing; unset '
                          '"listen-channel" or "journal"')
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", values["journal-schema"]):
        raise ConfigError('"journal-schema": must be a lower-case SQL name (letters, digits, _; '
                          f"at most 63), got {_show(values['journal-schema'])}")
    for name in ("listen-channel", "audit-channel", "meta-channel"):
        if values["presence"] and values[name] == f"{values['journal-schema']}.presence":
            raise ConfigError(f'"{name}": {values[name]} is presence\'s own channel')


def read_secret(values: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    """
    The HMAC secret or key text of merged settings (read from its file for "@path"), and that
    file; (None, None) with C{jwt-jwks-url} and no secret.
    """
    raw = values["jwt-secret"]
    if raw in (None, ""):
        if not values["jwt-jwks-url"]:
            raise ConfigError(
                '"jwt-secret" is required: set it in the config file, with --jwt-secret, or with '
                "PGWS_JWT_SECRET (or set jwt-jwks-url)"
            )
        return None, None
    secret_file = raw[1:] if raw.startswith("@") else None
    secret = decode_secret(_read_at_path(raw, "jwt-secret"), values["secret-is-base64"])
    if not secret:
        raise ConfigError('"jwt-secret" is empty')
    return secret, secret_file


def _check_tls(cert: str | None, key: str | None) -> None:
    if (cert is None) != (key is None):
        missing, given = ("key-file", "certificate-file") if key is None else (
            "certificate-file", "key-file")
        raise ConfigError(f'"{missing}" is missing: "{given}" alone cannot serve TLS')
    for name, path in (("certificate-file", cert), ("key-file", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f'"{name}": cannot read {path}')
