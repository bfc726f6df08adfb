"""
`twistd -n pgws` with log-format = "json": every line of its log file is one JSON object, and no
token (in the path, the subprotocol or the header; accepted or refused) nor the secret is in it;
log-level = "warn" drops info lines, and SIGHUP changes the level.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_twistd import Twistd, free_port
from twisted.internet.error import ConnectError

from support import SECRET, http_request, sleep, token, until, upgrade_request, ws_connect

KEYS = {"time", "level", "namespace", "system", "text"}


def write_config(path: Path, db_uri: str, port: int, extra: str) -> None:
    path.write_text(f'db-uri = "{db_uri}"\njwt-secret = "{SECRET}"\nserver-host = "127.0.0.1"\n'
                    f'server-port = {port}\ndb-pool = 1\nlog-format = "json"\n{extra}')


def records(server: Twistd) -> list[dict[str, Any]]:
    """Every line of the log, parsed: a line that is not one JSON object fails the test."""
    out = []
    for line in server.text().splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and KEYS <= set(record), line
        out.append(record)
    return out


async def readyz(port: int, timeout: float = 60) -> None:
    """Ready, known without reading the log (whose info lines may be filtered out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = await http_request(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
            if answer.status == 200:
                return
        except ConnectError:  # not listening yet
            pass
        await sleep(0.1)
    pytest.fail("twistd never became ready")


@pytest_twisted.ensureDeferred
async def test_json_log_is_one_object_a_line_and_never_holds_a_token(db_uri, tmp_path):
    conf = tmp_path / "pgws.conf"
    write_config(conf, db_uri, 0, "")
    server = Twistd(tmp_path, "--config", str(conf))
    tokens = {name: token({"mode": "r", "n": name}) for name in ("path", "proto", "header")}
    refused = {name: token({"mode": "r", "n": name}, secret="another secret, long enough here")
               for name in ("path", "proto", "header")}
    expired = token({"mode": "r", "exp": 1})
    try:
        port = await server.ready()
        path = await ws_connect(port, "/logs/" + tokens["path"])
        proto = await ws_connect(port, "/logs",
                                 protocols=["pgws", "pgws.bearer." + tokens["proto"]])
        header = await ws_connect(port, "/logs", headers={"Authorization": "Bearer "
                                                                           + tokens["header"]})
        path.send("a read-only socket's message is not relayed, and logged")
        answers = [
            await http_request(port, upgrade_request("/logs/" + refused["path"])),
            await http_request(port, upgrade_request("/logs/" + expired)),
            await http_request(port, upgrade_request(
                "/logs", f"Sec-WebSocket-Protocol: pgws, pgws.bearer.{refused['proto']}\r\n")),
            await http_request(port, upgrade_request(
                "/logs", f"Authorization: Bearer {refused['header']}\r\n")),
            await http_request(port, f"GET /c/{tokens['path']} HTTP/1.1\r\nHost: x\r\n"
                                     f"Connection: close\r\n\r\n".encode()),
        ]
        assert [a.status for a in answers] == [401, 401, 401, 401, 404]
        for client in (path, proto, header):
            client.close()
        await until(lambda: server.text().count("closed: 1000") == 3, "three closes logged")
    finally:
        code = await server.terminate()
    assert code == 0
    logged = records(server)
    texts = [r["text"] for r in logged]
    assert any("refused WebSocket" in t and "JWT signature is invalid" in t for t in texts)
    assert any('"GET /c/<token>" 404' in t for t in texts)
    assert any(t.startswith("Main loop terminated") for t in texts)
    log = server.text()
    for jwt_text in [*tokens.values(), *refused.values(), expired]:
        for part in (jwt_text, *jwt_text.split(".")[1:]):
            assert part not in log
    assert SECRET not in log


@pytest_twisted.ensureDeferred
async def test_log_level_warn_drops_info_lines_and_sighup_changes_it(db_uri, tmp_path):
    conf = tmp_path / "pgws.conf"
    port = free_port()
    write_config(conf, db_uri, port, 'log-level = "warn"\n')
    server = Twistd(tmp_path, "--config", str(conf))
    try:
        await readyz(port)
        client = await ws_connect(port, "/logs/" + token({"mode": "r"}))
        # A warning gets through: a changed setting that needs a restart.
        conf.write_text(conf.read_text().replace("db-pool = 1", "db-pool = 2"))
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: "needs a restart" in server.text(), "the restart warning")
        assert {r["level"] for r in records(server)} == {"warn"}

        conf.write_text(conf.read_text().replace('log-level = "warn"', 'log-level = "info"'))
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: "log-level info" in server.text(), "the new log level")
        # What the reload itself says is logged under the new, more verbose level.
        assert [r["text"] for r in records(server) if "Configuration reloaded:" in r["text"]] == [
            "Configuration reloaded: no relay setting changed"]
        client.close()
        await until(lambda: "closed: 1000" in server.text(), "an info line after the reload")
    finally:
        code = await server.terminate()
    assert code == 0
    levels = [r["level"] for r in records(server)]
    assert levels[0] == "warn" and "info" in levels
    assert not any("open: mode r" in r["text"] for r in records(server))  # logged under warn
