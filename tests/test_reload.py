"""
SIGHUP to a running `twistd -n pgws --config FILE`: the file is read again and what may change
without a restart applies (a new secret), every open socket staying open and relaying; a changed
setting that needs a restart is a log line naming it; an invalid file changes nothing.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest_twisted
from test_twistd import Twistd

from support import SECRET, Db, handshake, token, until, ws_connect

NEW_SECRET = "a rotated secret, long enough for HS256"


def write_config(path: Path, db_uri: str, secret: str, extra: str = "") -> None:
    path.write_text(f'db-uri = "{db_uri}"\njwt-secret = "{secret}"\nserver-host = "127.0.0.1"\n'
                    f'server-port = 0\ndb-pool = 2\n{extra}')


async def hangup(server: Twistd, line: str) -> str:
    """SIGHUP, and the log once C{line} has appeared in it once more than before."""
    seen = server.text().count(line)
    server.proc.send_signal(signal.SIGHUP)
    return await until(lambda: server.text().count(line) > seen and server.text(),
                       f"{line!r} in the log after SIGHUP")


@pytest_twisted.ensureDeferred
async def test_sighup_rotates_the_secret_and_the_open_socket_keeps_relaying(db_uri, db: Db,
                                                                            tmp_path):
    conf = tmp_path / "pgws.conf"
    write_config(conf, db_uri, SECRET)
    server = Twistd(tmp_path, "--config", str(conf))
    try:
        port = await server.ready()
        old = await ws_connect(port, "/reload-chat/" + token({"mode": "rw"}))
        write_config(conf, db_uri, NEW_SECRET)
        await hangup(server, "Configuration reloaded: jwt-secret changed")

        refused = await handshake(port, "/reload-chat/" + token({"mode": "rw"}))
        assert (refused.status, refused.text) == (401, "JWT signature is invalid\n")
        new = await ws_connect(port, "/reload-chat/" + token({"mode": "rw"}, secret=NEW_SECRET))
        # The socket opened with the old secret relays both ways.
        old.send("from the old socket")
        assert (await new.next_json())["payload"] == "from the old socket"
        assert (await old.next_json())["payload"] == "from the old socket"
        db.notify("reload-chat", "from the database")
        assert await old.next() == "from the database"
        assert await new.next() == "from the database"
        assert not old.closed.called
    finally:
        code = await server.terminate()
    assert code == 0
    assert SECRET not in server.text() and NEW_SECRET not in server.text()


@pytest_twisted.ensureDeferred
async def test_sighup_names_settings_that_need_a_restart_and_an_invalid_file_changes_nothing(
        db_uri, tmp_path):
    conf = tmp_path / "pgws.conf"
    write_config(conf, db_uri, SECRET)
    server = Twistd(tmp_path, "--config", str(conf))
    try:
        port = await server.ready()
        # server-port and db-pool need a restart; max-channels applies.
        conf.write_text(conf.read_text().replace("server-port = 0", "server-port = 1")
                        .replace("db-pool = 2", "db-pool = 3") + "max-channels = 1\n")
        log = await hangup(server, "Configuration reloaded: max-channels changed")
        assert "Configuration reloaded without db-pool, server-port: changing them needs a " \
               "restart" in log
        wide = token({"mode": "r", "channels": ["a", "b"]})
        refused = await handshake(port, "/" + wide)
        assert (refused.status, refused.text) == (403, "the token grants 2 channels; the limit "
                                                       "is 1\n")

        write_config(conf, db_uri, NEW_SECRET, extra='max-channels = "many"\n')
        log = await hangup(server, "Configuration not reloaded, nothing changed:")
        assert ('Configuration not reloaded, nothing changed: "max-channels" (from '
                f"{conf}): expected an integer, got 'many'") in log
        # Still the old secret and the reloaded limit.
        assert (await handshake(port, "/" + wide)).status == 403
        client = await ws_connect(port, "/reload-chat/" + token({"mode": "r"}))
        assert not client.closed.called
        assert (await handshake(port, "/reload-chat/" + token({"mode": "r"}, secret=NEW_SECRET))
                ).status == 401
    finally:
        code = await server.terminate()
    assert code == 0
