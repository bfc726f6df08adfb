"""
The processes a benchmark run needs besides its load generator: the throwaway PostgreSQL, pgws
(a separate `twistd -n pgws` process), the stack-ceiling broadcast server; and /proc readings of
their CPU time and memory.  Every process started here is remembered and stopped by `cleanup()`.
"""

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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent
_children: list[subprocess.Popen[Any]] = []


class StartError(Exception):
    pass


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def proc_cpu(pid: int, children: bool = False) -> float:
    """User + system seconds of a process (and of its reaped children)."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, its reaped children and its live children (PostgreSQL)."""
    total = proc_cpu(root, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat_fields(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(f[1]) == root:
            total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


def host_busy() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0)) + int(table.get("ListenDrops", 0))
    return 0


# -- PostgreSQL ------------------------------------------------------------------------------


class Postgres:
    """
    A private PostgreSQL (pgws's embedded launcher) with max_connections raised to 400: the
    writers baseline alone needs 100 connections plus a listener, over the default of 100.
    The launcher has no setting for it, so the cluster is made once without `throwaway`
    (whose stop keeps the data), configured with ALTER SYSTEM, and started again with
    `throwaway=True` (fsync off; its stop deletes the directory).
    """

    def __init__(self, max_connections: int = 400) -> None:
        self.max_connections = max_connections
        self.launcher: Any = None
        self.dir: Path | None = None
        self.uri = ""

    def start(self) -> str:
        import psycopg2

        from pgws._embedded import EmbeddedPostgres

        self.dir = Path(tempfile.mkdtemp(prefix="pgws-bench-pg-", dir="/tmp"))
        first = EmbeddedPostgres(data_dir=self.dir, port=0)
        uri = first.start()
        try:
            conn = psycopg2.connect(uri)
            conn.autocommit = True
            conn.cursor().execute(f"ALTER SYSTEM SET max_connections = {self.max_connections}")
            conn.close()
        finally:
            first.stop()
        self.launcher = EmbeddedPostgres(data_dir=self.dir, port=0, throwaway=True)
        self.uri = self.launcher.start()
        return self.uri

    @property
    def pid(self) -> int:
        return self.launcher.pid

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


# -- pgws ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (even by SIGKILL)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _track(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    _children.append(proc)
    return proc


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


class _Process:
    """CPU and memory figures of a service that runs as one child process (C{self.proc})."""

    proc: subprocess.Popen[Any] | None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss_kb(self) -> int:
        return proc_rss_kb(self.pid)


def _toml_value(value: Any) -> str:
    """A bool, int or str as a TOML value (what pgws's config file takes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no TOML form for {value!r} here")


class Pgws(_Process):
    """
    `twistd -n --logfile FILE pgws --config FILE ...` on 127.0.0.1, any free port.

    The config file (pgws-<n>.conf in the work folder) holds `settings`: by default
    `metrics = true`, pgws's own default, written out so that every run says what it ran with;
    `metrics = false` for metrics-off-fanout-N.  Environment variables PGWS_METRICS* are left
    out of pgws's environment, since they would override the file (the command line, which
    carries the database, secret, address and `extra`, overrides both).
    """

    def __init__(self, uri: str, secret: str, workdir: Path, extra: list[str] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.secret = secret
        self.workdir = workdir
        self.extra = extra or []
        self.settings: dict[str, Any] = {"metrics": True, **(settings or {})}
        self.proc: subprocess.Popen[Any] | None = None
        self.port = 0
        self.log = workdir / "pgws.log"

    def start(self, timeout: float = 60) -> int:
        twistd = Path(sys.executable).parent / "twistd"
        n = len(list(self.workdir.glob("pgws-*.log")))
        self.log = self.workdir / f"pgws-{n}.log"
        config = self.workdir / f"pgws-{n}.conf"
        config.write_text("".join(f"{key} = {_toml_value(value)}\n"
                                  for key, value in self.settings.items()))
        cmd = [str(twistd), "-n", "--logfile", str(self.log), "--pidfile", "", "pgws",
               "--config", str(config),
               "--db-uri", self.uri, "--jwt-secret", self.secret, "--port", "0",
               "--server-host", "127.0.0.1", *self.extra]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PGWS_METRICS")}
        err = open(self.workdir / f"pgws-{n}.stderr", "wb")
        self.proc = _track(subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err, env=environ,
                                            preexec_fn=_die_with_parent))
        err.close()
        deadline = time.monotonic() + timeout
        while not self.port:
            if self.proc.poll() is not None:
                raise StartError(f"pgws exited with status {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"pgws did not listen within {timeout} s: {self.tail()}")
            try:
                m = re.search(r"Listening on port (\d+)", self.log.read_text())
            except FileNotFoundError:
                m = None
            if m:
                self.port = int(m.group(1))
            else:
                time.sleep(0.05)
        while True:  # ready once the LISTEN session and the pool are connected
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        return self.port
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise StartError(f"pgws was not ready within {timeout} s: {self.tail()}")
            time.sleep(0.1)


    def warnings(self) -> dict[str, Any]:
        """Warnings and errors pgws logged (count, and the first few with peers elided)."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return {"count": 0, "first": []}
        bad = [ln for ln in lines if re.search(r"#(warn|error|critical)\]", ln)]
        first: list[str] = []
        for ln in bad:
            text = re.sub(r"^\S+ \[[^]]*\] ", "", ln)
            text = re.sub(r"tcp4:127\.0\.0\.1:\d+", "tcp4:127.0.0.1:*", text)
            if text not in first:
                first.append(text)
            if len(first) >= 3:
                break
        return {"count": len(bad), "first": first}

    def cut_offs(self, t0: float) -> dict[str, Any]:
        """
        Readers pgws closed as too slow (max-pending-bytes), and when the first and the last
        were, in seconds after t0 (the log's time stamps have whole seconds).
        """
        import datetime

        try:
            lines = [ln for ln in self.log.read_text().splitlines() if "reads too slowly" in ln]
        except FileNotFoundError:
            lines = []

        def at(line: str) -> float | None:
            try:
                return datetime.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp() - t0
            except ValueError:
                return None

        return {"count": len(lines), "first_s": at(lines[0]) if lines else None,
                "last_s": at(lines[-1]) if lines else None}

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


# -- stack ceiling -----------------------------------------------------------------------------


class Ceiling(_Process):
    """bench/broadcast_server.py as a separate process, driven over its control port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[Any] | None = None
        self.port = 0
        self.control: socket.socket | None = None
        self._buf = b""

    def start(self) -> int:
        err_path = self.workdir / "broadcast_server.stderr"
        with open(err_path, "ab") as err:
            self.proc = _track(subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "broadcast_server.py")],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                preexec_fn=_die_with_parent))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.match(r"ws (\d+) control (\d+)", line)
        if not m:
            raise StartError(f"broadcast_server.py did not start: {line} {err_path.read_text()[-2000:]}")
        self.port = int(m.group(1))
        self.control = socket.create_connection(("127.0.0.1", int(m.group(2))))
        return self.port

    def command(self, line: str, timeout: float = 30) -> str:
        assert self.control is not None
        self.control.sendall(line.encode() + b"\n")
        return self.answer(timeout)

    def answer(self, timeout: float = 30) -> str:
        assert self.control is not None
        self.control.settimeout(timeout)
        while b"\n" not in self._buf:
            data = self.control.recv(4096)
            if not data:
                raise StartError("broadcast_server.py closed its control connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


    def stop(self) -> None:
        if self.control is not None:
            try:
                self.control.close()
            except OSError:
                pass
            self.control = None
        stop_process(self.proc, timeout=5)
        self.proc = None


def cleanup() -> None:
    """Stop every process this module started that is still running."""
    for proc in _children:
        stop_process(proc, timeout=5)
    _children.clear()
