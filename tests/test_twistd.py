"""`twistd -n pgws` as a user runs it: the plugin, start-up errors, serving, embedded mode, stop."""

from __future__ import annotations

import json
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

from support import SECRET, Db, application_name, http_request, sleep, token, until, ws_connect

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
    (["--db-uri", "x", "--server-host", "203.0.113.9", "--port", "0"], {"PGWS_JWT_SECRET": SECRET},
     '"server-port": cannot listen on 203.0.113.9'),
    (["--db-uri", "x"], {"PGWS_JWT_SECRET": '{"kty": "oct"}'}, '"jwt-secret"'),
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
    """
    A running `twistd -n pgws` whose log is read from a file; its database sessions are named
    by an application name of its own, as start_server's are.
    """

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log = tmp_path / "twistd.log"
        self.application_name = application_name()
        self.proc = subprocess.Popen(
            [*TWISTD, "--pidfile=", "-n", "--logfile", str(self.log), "pgws",
             "--application-name", self.application_name, *args],
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

    def sessions(self, db: Db) -> list[str]:
        """The application_name of each of its sessions in pg_stat_activity, sorted."""
        return sorted(name for (name,) in db.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (self.application_name + " %",)))

    async def ready(self, timeout: float = 60) -> int:
        """Listening, and relaying: /readyz says so (the database connects after the port opens)."""
        port = await self.listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = await http_request(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
            if answer.status == 200:
                return port
            await sleep(0.1)
        pytest.fail(f"twistd never became ready: {self.text()}")

    async def terminate(self, timeout: float = 20, signal_it: bool = True) -> int:
        if signal_it:
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
async def test_twistd_serves_the_page_and_relays(db_uri, db: Db, tmp_path):
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--server-root", str(ROOT / "client-example"), "--audit-channel", "audit",
                    "--db-pool", "2", env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.ready()
        # --application-name names its sessions: one LISTEN session, the NOTIFY pool.
        name = server.application_name
        assert server.sessions(db) == [f"{name} listener", f"{name} notify", f"{name} notify"]
        page = await http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert page.status == 200 and b"<html" in page.body.lower()
        jwt_text = token({"mode": "rw"})
        alice = await ws_connect(port, "/twistd-chat/" + jwt_text)
        # The 101 comes once PostgreSQL has executed the LISTEN: bob misses nothing from here on.
        bob = await ws_connect(port, "/twistd-chat/" + token({"mode": "r"}))
        alice.send("through twistd")
        assert (await bob.next_json())["payload"] == "through twistd"
        # A plain GET of a token URL is a 404 whose access-log line hides the token.
        await http_request(port, f"GET /c/{jwt_text} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                           .encode())
    finally:
        code = await server.terminate()
    assert code == 0
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
        port = await server.ready(timeout=120)
        client = await ws_connect(port, "/emb/" + token({"mode": "rw"}))  # open once LISTENing
        client.send("embedded")
        assert (await client.next_json())["payload"] == "embedded"
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    finally:
        code = await server.terminate(timeout=60)
    assert code == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    shutil.rmtree(parent, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_embedded_database_stops_only_after_client_messages_are_flushed(tmp_path):
    # twistd stops its services all at once: the embedded PostgreSQL must wait for the relay.
    parent = Path(tempfile.mkdtemp(prefix="pgws-embedded-test-"))
    parent.chmod(0o755)
    pg_port = free_port()
    server = Twistd(tmp_path, "--db-uri", "embedded", "--embedded-data-dir", str(parent / "pgdata"),
                    "--embedded-port", str(pg_port), "--port", "0", "--server-host", "127.0.0.1",
                    "--db-pool", "1", env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.ready(timeout=120)
        outside = Db(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
        outside.listen("bye")
        writer = await ws_connect(port, "/bye/" + token({"mode": "w"}))
        for i in range(2000):
            writer.send(str(i))
        first = await outside.received(1)
        assert first
        server.proc.send_signal(signal.SIGTERM)
        assert await writer.closed == (1001, "server shutting down")
        got = first + await outside.received(2000, timeout=5)
        assert await server.terminate(timeout=30, signal_it=False) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        shutil.rmtree(parent, ignore_errors=True)
    numbers = [int(json.loads(p)["payload"]) for _, p in got]
    assert numbers == list(range(len(numbers)))  # a prefix, in order, no gap
    log = server.text()
    # Had PostgreSQL stopped under the flush, the rest would have waited for it, then been lost.
    assert "database unavailable" not in log
    assert "client messages not sent" not in log
    assert "Relay stopped" in log


@pytest_twisted.ensureDeferred
async def test_tls_serves_wss_with_the_given_certificate(db_uri, tmp_path):
    from support import make_certificate

    cert, key, pem = make_certificate(tmp_path)
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    env={"PGWS_JWT_SECRET": SECRET, "PGWS_CERTIFICATE_FILE": cert,
                         "PGWS_KEY_FILE": key})
    try:
        port = await server.listening()
        assert "(wss/https)" in server.text()
        deadline = time.monotonic() + 30
        while True:  # 503 until the database is connected
            try:
                # Open once PostgreSQL has executed its LISTEN.
                client = await ws_connect(port, "/tls/" + token({"mode": "rw"}), trust_pem=pem)
                break
            except ConnectionError:
                assert time.monotonic() < deadline
                await sleep(0.2)
        client.send("encrypted")
        assert (await client.next_json())["payload"] == "encrypted"
    finally:
        await server.terminate()


def test_tls_with_only_one_file_is_a_start_up_error(tmp_path):
    from support import make_certificate

    cert, _, _ = make_certificate(tmp_path)
    result = run_twistd("--db-uri", "x", "--certificate-file", cert,
                        env={"PGWS_JWT_SECRET": SECRET})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert '"key-file" is missing' in result.stderr


def test_tls_with_a_key_that_is_not_a_key_is_a_start_up_error(tmp_path):
    from support import make_certificate

    cert, _, _ = make_certificate(tmp_path)
    result = run_twistd("--db-uri", "x", "--certificate-file", cert, "--key-file", cert,
                        "--port", "0", env={"PGWS_JWT_SECRET": SECRET})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot use" in result.stderr


@pytest_twisted.ensureDeferred
async def test_compat_mode_gives_up_after_retries_and_exits_non_zero(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]  # nothing listens there once closed
    server = Twistd(tmp_path, "--port", "0", "--server-host", "127.0.0.1",
                    env={"PGWS_JWT_SECRET": SECRET, "PGWS_LISTEN_CHANNEL": "l",
                         "PGWS_RETRIES": "2",
                         "PGWS_DB_URI": f"postgres://u:hunter2secret@127.0.0.1:{dead_port}/d"})
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        await sleep(0.1)
    assert server.proc.poll() is not None, "pgws did not give up"
    assert server.proc.returncode == 1
    log = server.text()
    assert "attempt 1 failed" in log and "attempt 2 of 2 failed" in log and "giving up" in log
    assert "hunter2secret" not in log


@pytest_twisted.ensureDeferred
async def test_postgres_websockets_sample_env_starts_pgws(db_uri, tmp_path):
    # The variables of postgres-websockets' sample-env, sourced unchanged by a shell, with its
    # @./database-uri.txt pointing at the test database and its client-example folder present.
    (tmp_path / "database-uri.txt").write_text(db_uri + "\n")
    (tmp_path / "client-example").mkdir()
    (tmp_path / "client-example" / "index.html").write_text("<html>example</html>")
    sample_env = ROOT / "tests" / "postgres-websockets-sample-env"
    port = free_port()
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        ["bash", "-c", f'source "{sample_env}" && export PGWS_PORT={port} && '
                       f'exec "{TWISTD[0]}" --pidfile= -n --logfile "{log}" pgws'],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PGWS_")},
    )
    try:
        deadline = time.monotonic() + 60
        while f"Listening on port {port}" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            await sleep(0.1)
        page = await http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert page.body == b"<html>example</html>"
        secret = "auwhfdnskjhewfi34uwehdlaehsfkuaeiskjnfduierhfsiweskjcnzeiluwhskdewishdnpwe"
        import jwt

        client = await ws_connect(port, "/chat/" + jwt.encode({"mode": "rw"}, secret, "HS256"))
        client.send("drop-in")
        got = await client.next_json()
        assert (got["channel"], got["payload"]) == ("chat", "drop-in")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_sockets_1001_flushes_and_exits_0(db_uri, tmp_path):
    db = Db(db_uri)
    db.listen("bye")
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--db-pool", "1", env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.ready()
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        found = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
        assert found is not None, limits
        soft, hard = found.groups()
        assert soft == hard  # raised at start-up
        writer = await ws_connect(port, "/bye/" + token({"mode": "w"}))
        for i in range(2000):
            writer.send(str(i))
        first = await db.received(1)
        assert first
        server.proc.send_signal(signal.SIGTERM)
        code, reason = await writer.closed
        assert (code, reason) == (1001, "server shutting down")
        assert await server.terminate(timeout=20, signal_it=False) == 0
        got = first + await db.received(2000, timeout=3)
        numbers = [int(json.loads(p)["payload"]) for _, p in got]
        assert numbers == list(range(len(numbers)))  # a prefix, in order, no gap
        assert "Relay stopped" in server.text()
    finally:
        db.close()
        if server.proc.poll() is None:
            server.proc.kill()


@pytest_twisted.ensureDeferred
async def test_prompt_reader_is_not_cut_off_after_pgws_stalls(db_uri, tmp_path):
    # pgws is stopped (SIGSTOP) while PostgreSQL queues notifications for it; when it resumes,
    # it reads them in large slices and writes far more than max-pending-bytes to the reader
    # within a few turns.  The reader keeps reading, so it must not be cut off (the benchmark
    # found that it was).
    from test_resilience import CountingFactory
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from support import wait

    count = 40_000
    db = Db(db_uri)
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--max-pending-bytes", "65536", env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await server.ready()
        factory = CountingFactory(f"ws://127.0.0.1:{port}/stall/" + token({"mode": "r"}), count)
        await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory))
        await until(lambda: factory.opened, "the reader is open")
        server.proc.send_signal(signal.SIGSTOP)
        try:
            for start in range(0, count, 10_000):
                db.execute("SELECT pg_notify('stall', lpad(i::text, 8, '0') || repeat('y', 50)) "
                           "FROM generate_series(%s, %s) AS i", (start, start + 9_999))
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await wait(factory.opened[0].done, timeout=60)
        assert "reads too slowly" not in server.text()
    finally:
        db.close()
        await server.terminate()


@pytest_twisted.ensureDeferred
async def test_two_processes_share_a_port_with_reuse_port(db_uri, tmp_path):
    port = free_port()
    args = ("--db-uri", db_uri, "--port", str(port), "--server-host", "127.0.0.1",
            "--reuse-port", "true")
    first = Twistd(tmp_path / "a", *args, env={"PGWS_JWT_SECRET": SECRET})
    second = Twistd(tmp_path / "b", *args, env={"PGWS_JWT_SECRET": SECRET})
    db = Db(db_uri)
    try:
        await first.ready()
        await second.ready()
        readers = []
        for _ in range(40):  # the kernel spreads connections over both processes
            readers.append(await ws_connect(port, "/shared/" + token({"mode": "r"})))
        assert "channels shared" in first.text() and "channels shared" in second.text()
        db.notify("shared", "to every reader, whichever process holds it")
        for reader in readers:
            assert await reader.next() == "to every reader, whichever process holds it"
    finally:
        db.close()
        assert await first.terminate() == 0
        assert await second.terminate() == 0
