"""`twistd -n pgws` as a user runs it: the plugin, start-up errors, serving, embedded mode, stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted

from support import SECRET, http_request, sleep, token, ws_connect

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [str(Path(sys.executable).parent / "twistd")]  # the twistd of this virtualenv


def run_twistd(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
               logfile: Path | None = None):
    log = ["--logfile", str(logfile)] if logfile else []
    return subprocess.run(
        [*TWISTD, "--pidfile=", "-n", *log, "pgws", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_plugin_is_found_by_twistd():
    out = subprocess.run([*TWISTD, "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert re.search(r"^\s+pgws\s+WebSocket <-> PostgreSQL", out.stdout, re.M), out.stdout


@pytest.mark.parametrize("args,env,fragment", [
    (["--config", "/nonexistent.conf"], {}, "config file /nonexistent.conf"),
    (["--db-uri", "x", "--port", "abc"], {"PGWS_JWT_SECRET": SECRET}, '"server-port"'),
    (["--db-uri", "x"], {}, '"jwt-secret" is required'),
    (["--db-uri", "x", "--jwt-secret", "@/nonexistent"], {}, '"jwt-secret": cannot read'),
])
def test_start_up_errors_are_one_line_without_traceback(args, env, fragment):
    result = run_twistd(*args, env={k: v for k, v in env.items()})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pgws: ") and fragment in lines[0], lines


def test_taken_port_is_a_clean_start_up_error(db_uri, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd("--db-uri", db_uri, "--server-host", "127.0.0.1", "--port", str(port),
                            logfile=tmp_path / "log", env={"PGWS_JWT_SECRET": SECRET})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr


class Twistd:
    """A running `twistd -n pgws` whose log is read from a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp_path / "twistd.log"
        self.proc = subprocess.Popen(
            [*TWISTD, "--pidfile=", "-n", "--logfile", str(self.log), "pgws", *args],
            cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.port = 0

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    async def listening(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Listening on port (\d+)", self.text())
            if m:
                self.port = int(m.group(1))
                return self.port
            if self.proc.poll() is not None:
                break
            await sleep(0.1)
        self.proc.kill()
        out, err = self.proc.communicate()
        pytest.fail(f"twistd did not start: {err}\n{self.text()}")

    async def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            pytest.fail("twistd did not stop on SIGTERM")
        self.proc.communicate()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_page_and_relays(db_uri, tmp_path):
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--server-root", str(ROOT / "client-example"), "--audit-channel", "audit",
                    env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.listening()
        page = await http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert page.status == 200 and b"<html" in page.body.lower()
        jwt_text = token({"mode": "rw"})
        alice = await ws_connect(port, "/twistd-chat/" + jwt_text)
        bob = await ws_connect(port, "/twistd-chat/" + token({"mode": "r"}))
        await sleep(0.3)  # LISTEN is issued asynchronously
        alice.send("through twistd")
        assert (await bob.next_json())["payload"] == "through twistd"
        # A plain GET of a token URL is a 404 whose access-log line hides the token.
        await http_request(port, f"GET /c/{jwt_text} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                           .encode())
    finally:
        code = await server.terminate()
    # twistd stops cleanly, then re-raises SIGTERM so a supervisor sees why it ended.
    assert code in (0, -signal.SIGTERM)
    log = server.text()
    assert "Main loop terminated" in log
    assert jwt_text not in log and SECRET not in log
    assert '"GET /c/<token>" 404' in log


@pytest_twisted.ensureDeferred
async def test_embedded_database_starts_relays_and_stops_with_pgws(tmp_path):
    # Not under tmp_path: pytest makes that 0700 for root, and PostgreSQL runs as another user.
    parent = Path(tempfile.mkdtemp(prefix="pgws-embedded-test-"))
    parent.chmod(0o755)
    data_dir = parent / "pgdata"
    pg_port = free_port()
    server = Twistd(tmp_path, "--db-uri", "embedded", "--embedded-data-dir", str(data_dir),
                    "--embedded-port", str(pg_port), "--port", "0", "--server-host", "127.0.0.1",
                    env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.listening(timeout=120)
        client = await ws_connect(port, "/emb/" + token({"mode": "rw"}))
        await sleep(0.3)
        client.send("embedded")
        assert (await client.next_json())["payload"] == "embedded"
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    finally:
        code = await server.terminate(timeout=60)
    assert code in (0, -signal.SIGTERM)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    shutil.rmtree(parent, ignore_errors=True)
