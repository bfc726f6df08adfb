"""Settings: file, environment, command line, precedence, and one-line errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pgws._config import ConfigError, load_config

SECRET = "reallyreallyreallyreallyverysafe"
BASE = {"db-uri": "postgres://localhost/db", "jwt-secret": SECRET}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgws.conf"
    path.write_text(text)
    return str(path)


def test_defaults():
    config = load_config(None, {}, BASE)
    assert (config.db_pool, config.server_host, config.server_port) == (10, "*4", 3000)
    assert config.server_root is None and config.audit_channel is None
    assert config.jwt_secret == SECRET.encode()


def test_file_in_the_original_format(tmp_path):
    path = write(tmp_path, '''
# comment
db-uri = "postgres://u:pw@localhost:5432/app"
db-pool = 3
server-host = "127.0.0.1"
server-port = 3001
audit-channel = "audit"
jwt-secret = "reallyreallyreallyreallyverysafe"
secret-is-base64 = false
''')
    config = load_config(path, {}, {})
    assert config.db_uri == "postgres://u:pw@localhost:5432/app"
    assert (config.db_pool, config.server_host, config.server_port) == (3, "127.0.0.1", 3001)
    assert config.audit_channel == "audit"


def test_precedence_command_line_over_environment_over_file(tmp_path):
    path = write(tmp_path, 'db-uri = "file"\njwt-secret = "s"\nserver-port = 1\ndb-pool = 1\n'
                           'audit-channel = "from-file"\n')
    env = {"PGWS_SERVER_PORT": "2", "PGWS_DB_POOL": "2"}
    config = load_config(path, env, {"server-port": "3"})
    assert config.server_port == 3      # command line
    assert config.db_pool == 2          # environment
    assert config.audit_channel == "from-file"  # file
    assert config.server_host == "*4"   # default


def test_short_aliases_on_the_command_line_and_in_the_environment():
    assert load_config(None, {}, {**BASE, "port": "3001"}).server_port == 3001
    assert load_config(None, {"PGWS_PORT": "3002"}, BASE).server_port == 3002
    assert load_config(None, {"PGWS_DB_URI": "x"}, {"jwt-secret": "s"}).db_uri == "x"


def test_environment_substitution_in_file_values(tmp_path):
    path = write(tmp_path, 'db-uri = "postgres://$(DB_USER)@localhost/$(DB_NAME)"\njwt-secret = "s"\n')
    config = load_config(path, {"DB_USER": "alice", "DB_NAME": "app"}, {})
    assert config.db_uri == "postgres://alice@localhost/app"


def test_secret_and_uri_read_from_files_dropping_one_newline(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "uri").write_text("postgres://localhost/x\n")
    config = load_config(None, {}, {"db-uri": f"@{tmp_path}/uri", "jwt-secret": f"@{tmp_path}/secret"})
    assert config.jwt_secret == SECRET.encode()
    assert config.db_uri == "postgres://localhost/x"


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_secret_standard_and_url_safe(encode):
    raw = bytes(range(200, 240))  # has bytes that differ between the two alphabets
    text = encode(raw).decode().rstrip("=")
    config = load_config(None, {}, {**BASE, "jwt-secret": text, "secret-is-base64": "true"})
    assert config.jwt_secret == raw


ERRORS = [
    # (file text or None, env, cli, expected message fragment)
    ('nope = 1\n', {}, BASE, 'unknown key "nope"'),
    (None, {}, {"jwt-secret": "s"}, '"db-uri" is required'),
    (None, {}, {"db-uri": "x"}, '"jwt-secret" is required'),
    (None, {}, {**BASE, "server-port": "abc"}, '"server-port" (from --server-port): expected an integer'),
    (None, {"PGWS_DB_POOL": "many"}, BASE, '"db-pool" (from PGWS_DB_POOL): expected an integer'),
    ('db-pool = "3"\n', {}, BASE, '"db-pool"'),
    ('secret-is-base64 = "yes"\n', {}, BASE, '"secret-is-base64"'),
    (None, {}, {**BASE, "server-port": "70000"}, '"server-port": must be between 0 and 65535'),
    (None, {}, {**BASE, "db-pool": "0"}, '"db-pool": must be between 1 and 1000'),
    (None, {}, {**BASE, "jwt-secret": "@/nonexistent/secret"}, '"jwt-secret": cannot read /nonexistent/secret'),
    (None, {}, {**BASE, "db-uri": "@/nonexistent/uri"}, '"db-uri": cannot read /nonexistent/uri'),
    (None, {}, {**BASE, "jwt-secret": "***", "secret-is-base64": "true"}, "not base64"),
    (None, {}, {**BASE, "server-root": "/nonexistent/root"}, '"server-root"'),
    (None, {}, {**BASE, "audit-channel": "a" * 64}, '"audit-channel"'),
    ('db-uri = "$(UNSET_VARIABLE_X)"\n', {}, {"jwt-secret": "s"}, "UNSET_VARIABLE_X"),
    ('db-uri = \n', {}, {}, "line 1"),
]


@pytest.mark.parametrize("text,env,cli,fragment", ERRORS, ids=[e[3][:30] for e in ERRORS])
def test_config_errors_are_one_line_naming_the_key(tmp_path, text, env, cli, fragment):
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env, cli)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unreadable_config_file():
    with pytest.raises(ConfigError, match="config file /nonexistent.conf"):
        load_config("/nonexistent.conf", {}, {})


def test_repr_never_shows_secrets():
    config = load_config(None, {}, {"db-uri": "postgres://u:hunter2@h/d", "jwt-secret": SECRET})
    assert "hunter2" not in repr(config) and SECRET not in repr(config)
