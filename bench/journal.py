"""
The journal scenarios (pgws with `journal = true`), each measured against its journal-off
counterpart in the same invocation, on the same PostgreSQL:

    journal-fanout-N    N readers speaking the pgws subprotocol; the flood producer calls
                        <schema>.send in batches exactly as fanout-N's calls pg_notify
    journal-fanout-N-plain  the same with readers that do not offer the subprotocol (plain
                        text frames, no positions): the journal's cost without the positions
    journal-writers     writers' client messages on a journaled channel (through <schema>.relay)
    producers           several psycopg2 producer processes, batches of pg_notify (no pgws)
    journal-producers   the same through <schema>.send (no pgws in the window either)
    journal-producers-array  the same through send(channel, payloads[]): one call a batch
    journal-resume      one reader away while 10,000 messages are sent, then back with ?resume:
                        the time from its connect to the 10,000th replayed message

Every journal run starts a fresh `twistd pgws --journal true` on emptied journal tables (see
scenarios.reset_journal); the journal-off runs use a fresh pgws without it, as every scenario.
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.scenarios import (
    FANOUT_CHANNEL,
    JOURNAL_SCHEMA,
    SUBPROTOCOL,
    Env,
    Proc,
    Window,
    WorkerError,
    _start_pgws,
    readers,
    ready,
    record,
    reset_journal,
    timing_for,
    writers,
)
from bench.services import Pgws, host_busy

RESUME_CHANNEL = "bench_resume"
PRODUCER_CHANNEL = "bench_prod"
# Messages the resuming reader gets live before it goes away (its position is the last one).
PRIMED = 100


def journal_fanout(env: Env, n: int, positions: bool = True) -> dict[str, Any]:
    return readers(env, f"journal-fanout-{n}" + ("" if positions else "-plain"), ceiling=False,
                   channels=[FANOUT_CHANNEL], per_channel=n, journal=True, positions=positions)


def journal_writers(env: Env) -> dict[str, Any]:
    return writers(env, journal=True)


# -- producers ---------------------------------------------------------------------------------


def _make_schema(env: Env) -> None:
    """The journal's schema as pgws makes it: a journal pgws is started (it migrates) and stopped."""
    server = _start_pgws(env, journal=True)
    server.stop()
    reset_journal(env)


def _journal_rows(env: Env) -> int:
    import psycopg2

    conn = psycopg2.connect(env.pg.uri)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT count(*) FROM {JOURNAL_SCHEMA}.messages")
        row = cur.fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def producers(env: Env, journal: bool = False, array: bool = False) -> dict[str, Any]:
    """
    `producers` psycopg2 processes, each flooding its own channel with batches of
    `producer_batch` calls per transaction: pg_notify, or with `journal` <schema>.send (with
    `array`, one call of send(channel, payloads[]) per batch instead).  No pgws runs (nor
    anything else) during the window, so this is the producers' and PostgreSQL's cost alone;
    nobody LISTENs (PostgreSQL queues a NOTIFY at commit all the same).
    """
    p = env.params
    name = ("journal-producers-array" if array else "journal-producers") if journal \
        else "producers"
    function = (f"{JOURNAL_SCHEMA}.send" + ("[]" if array else "")) if journal else "pg_notify"
    if journal:
        _make_schema(env)
    procs: list[Proc] = []
    try:
        procs = [Proc(env, loadgen.producer_worker, env.pg.uri, [f"{PRODUCER_CHANNEL}{i}"],
                      "flood", p.producer_batch, 0.0, p.payload_size, function)
                 for i in range(p.producers)]
        ready(procs)
        timing = timing_for(p.warmup, p.duration, 0.3)
        for w in procs:
            w.go(timing)
        win = Window(env, None, timing).measure()
        res = [w.result(timeout=p.duration + 60) for w in procs]
    finally:
        for w in procs:
            w.stop()
    sent = sum(r["sent"] for r in res)
    got = {"count": sent, "hist": {}, "lat_max": 0.0, "drops": {}}
    return record(name, "messages/s", "messages/s", got, win, res, p.duration,
                  producers=p.producers, batch=p.producer_batch, function=function,
                  sent_rate=sent / p.duration, journal=journal,
                  journal_rows=_journal_rows(env) if journal else None)


# -- resume ------------------------------------------------------------------------------------


class PositionedReader:
    """
    One blocking WebSocket offering the pgws subprotocol: its control messages (binary JSON)
    and its journaled messages (a binary {"channel", "seq"} frame, then the text frame).
    """

    def __init__(self, port: int, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.pos = 0
        self.controls: list[dict[str, Any]] = []
        self.pending: list[tuple[int, bytes]] = []  # frames parsed but not yet handed out
        self.sock.sendall(loadgen.upgrade_request("127.0.0.1", port, path, SUBPROTOCOL))
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end]).decode("latin-1")
        self.pos = end + 4
        if " 101 " not in head.split("\r\n", 1)[0] + " ":
            raise WorkerError(f"resume: no upgrade: {head.splitlines()[0]} "
                              f"{bytes(self.buf[self.pos:]).decode('utf-8', 'replace')[:200]}")
        if f"sec-websocket-protocol: {SUBPROTOCOL}" not in head.lower():
            raise WorkerError("resume: pgws did not answer with its subprotocol")

    def _recv(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise WorkerError("resume: pgws closed the connection")
        self.buf += data

    def frames(self) -> list[tuple[int, bytes]]:
        """The frames left over, or else the complete ones received (waiting for at least one)."""
        if self.pending:
            out, self.pending = self.pending, []
            return out
        while True:
            out = []
            buf, i, n = self.buf, self.pos, len(self.buf)
            while n - i >= 2:
                ln, h = buf[i + 1] & 127, 2
                if ln >= 126:
                    h = 4 if ln == 126 else 10
                    if n - i < h:
                        break
                    ln = int.from_bytes(buf[i + 2:i + h], "big")
                if i + h + ln > n:
                    break
                out.append((buf[i] & 15, bytes(buf[i + h:i + h + ln])))
                i += h + ln
            del buf[:i]
            self.pos = 0
            if out:
                return out
            self._recv()

    def stream_event(self) -> dict[str, Any]:
        """The {"event": "stream", ...} control message pgws sends at the open (before any message)."""
        while True:
            frames = self.frames()
            for k, (op, payload) in enumerate(frames):
                if op == 2 and not payload.startswith(b'{"channel"'):
                    message = json.loads(payload)
                    if message.get("event") == "stream":
                        self.pending = frames[k + 1:]
                        return dict(message)
                    self.controls.append(message)
                elif op in (1, 2):
                    raise WorkerError("resume: a message came before the stream event")
                elif op == 8:
                    raise WorkerError(f"resume: pgws closed the socket: {payload[2:]!r}")

    def messages(self, n: int) -> tuple[list[int], float]:
        """Read until `n` journaled messages: their seqs, and when the n-th arrived."""
        seqs: list[int] = []
        count = 0
        while count < n:
            for op, payload in self.frames():
                if op == 1:
                    count += 1
                elif op == 2 and payload.startswith(b'{"channel"'):
                    seqs.append(int(payload[payload.rindex(b":") + 1:-1]))
                elif op == 2:
                    self.controls.append(json.loads(payload))
                elif op == 8:
                    raise WorkerError(f"resume: pgws closed the socket: {payload[2:]!r}")
        return seqs, time.time()

    def close(self) -> None:
        """A clean close (code 1000, masked with a zero key), and wait for pgws to drop it."""
        try:
            self.sock.sendall(bytes([0x88, 0x82, 0, 0, 0, 0]) + (1000).to_bytes(2, "big"))
            self.sock.settimeout(5)
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            self.sock.close()


def _send(cur: Any, n: int, batch: int, payload_size: int) -> int:
    """`n` messages to RESUME_CHANNEL through <schema>.send, `batch` per transaction; the last seq."""
    last = 0
    for start in range(0, n, batch):
        k = min(batch, n - start)
        now = time.time()
        cur.execute(f"SELECT max({JOURNAL_SCHEMA}.send(c, p)) FROM unnest(%s::text[], "
                    "%s::text[]) AS t(c, p)",
                    ([RESUME_CHANNEL] * k,
                     [loadgen.make_payload(now, start + j, payload_size) for j in range(k)]))
        last = cur.fetchone()[0]
    return int(last)


class _Usage:
    """CPU seconds of pgws, PostgreSQL, this process and the machine over some spans."""

    def __init__(self, env: Env, server: Pgws) -> None:
        self.env, self.server = env, server
        self.wall = self.srv = self.pg = self.lg = self.host = 0.0
        self.rss_kb = 0
        self._at: tuple[float, ...] = ()

    def begin(self) -> None:
        self._at = (time.time(), self.server.cpu(), self.env.pg.cpu(), loadgen.cpu_seconds(),
                    host_busy())

    def end(self) -> None:
        now = (time.time(), self.server.cpu(), self.env.pg.cpu(), loadgen.cpu_seconds(),
               host_busy())
        wall, srv, pg, lg, host = (b - a for a, b in zip(self._at, now, strict=True))
        self.wall += wall
        self.srv += srv
        self.pg += pg
        self.lg += lg
        self.host += host
        self.rss_kb = max(self.rss_kb, self.server.rss_kb())

    def figures(self) -> dict[str, Any]:
        w = self.wall or 1.0
        ours = (self.srv + self.pg + self.lg) / w
        return {"lg_cpu": self.lg / w, "srv_cpu": self.srv / w, "pg_cpu": self.pg / w,
                "host_cpu": self.host / w, "other_cpu": max(0.0, self.host / w - ours),
                "srv_rss_mb": self.rss_kb / 1024}


def _resume_once(env: Env, server: Pgws, cur: Any, position: int, epoch: str,
                 usage: _Usage) -> dict[str, Any]:
    """One round: `resume_messages` sent while away, then the resume; its figures."""
    p = env.params
    n = p.resume_messages
    t_send = time.time()
    head = _send(cur, n, p.producer_batch, p.payload_size)
    send_s = time.time() - t_send
    time.sleep(0.5)  # pgws has seen the wake-ups (of a channel nobody reads here)
    path = (f"/{RESUME_CHANNEL}/{env.token_r}?resume="
            + urllib.parse.quote(json.dumps({RESUME_CHANNEL: [position, epoch]})))
    usage.begin()
    t0 = time.time()
    reader = PositionedReader(server.port, path)
    t_open = time.time()
    try:
        event = reader.stream_event()
        t_event = time.time()
        seqs, t_last = reader.messages(n)
    finally:
        usage.end()
        reader.close()
    want = list(range(position + 1, position + n + 1))
    if event.get("recovered") is not True or seqs != want or head != position + n:
        raise WorkerError(f"resume after {position} (head {head}): stream event {event}; got "
                          f"{len(seqs)} positions {seqs[:2]}..{seqs[-2:]}, wanted {want[0]}.."
                          f"{want[-1]}")
    return {"ms": (t_last - t0) * 1000, "upgrade_ms": (t_open - t0) * 1000,
            "stream_event_ms": (t_event - t0) * 1000, "send_s": send_s, "after": position,
            "event": event}


def _prime(server: Pgws, env: Env, cur: Any) -> tuple[int, str]:
    """The reader's first visit: it reads PRIMED messages live and goes; (its position, epoch)."""
    reader = PositionedReader(server.port, f"/{RESUME_CHANNEL}/{env.token_r}")
    try:
        event = reader.stream_event()
        _send(cur, PRIMED, PRIMED, env.params.payload_size)
        seqs, _ = reader.messages(PRIMED)
    finally:
        reader.close()
    time.sleep(0.3)  # pgws has closed it: nobody reads the channel now
    return seqs[-1], str(event["epoch"])


def _spy(env: Env, server: Pgws) -> subprocess.Popen[Any] | None:
    """py-spy on pgws until SIGINT, if profiling (the resume rounds have no fixed window)."""
    if env.profile is None:
        return None
    fmt, out = env.profile
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [str(py_spy), "record", "--pid", str(server.pid), "--rate", "250", "--format", fmt,
         "-o", str(out), *(["--nolineno"] if fmt == "raw" else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_spy(spy: subprocess.Popen[Any] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def journal_resume(env: Env) -> dict[str, Any]:
    """
    One reader (pgws subprotocol) reads a little live and goes; `resume_messages` are sent
    through <schema>.send (`producer_batch` per transaction) while nobody reads the channel;
    it comes back with ?resume at its old position.  The figure: from its connect to the
    `resume_messages`-th message, median of `resume_rounds` rounds (each a cold resume: the
    channel has no reader in between).  Every message must come once, in order.
    """
    import psycopg2

    p = env.params
    server = _start_pgws(env, journal=True)
    spy = None
    try:
        conn = psycopg2.connect(env.pg.uri, options="-c synchronous_commit=off")
        conn.autocommit = True
        cur = conn.cursor()
        position, epoch = _prime(server, env, cur)
        usage = _Usage(env, server)
        spy = _spy(env, server)
        rounds = []
        for _ in range(p.resume_rounds):
            rounds.append(_resume_once(env, server, cur, position, epoch, usage))
            position = rounds[-1]["after"] + p.resume_messages
            time.sleep(0.3)
        conn.close()
    finally:
        _stop_spy(spy)
        warnings = server.warnings()
        server.stop()
    ms = statistics.median(r["ms"] for r in rounds)
    return {
        "name": "journal-resume", "metric": f"connect to the {p.resume_messages:,}th message",
        "unit": "ms", "value": ms, "p50_ms": None, "p99_ms": None, "max_ms": None,
        "drops": {}, **usage.figures(), "per_srv_core": None,
        "sent_rate": None, "messages_per_s": p.resume_messages / (ms / 1000),
        "upgrade_ms": statistics.median(r["upgrade_ms"] for r in rounds),
        "stream_event_ms": statistics.median(r["stream_event_ms"] for r in rounds),
        "resume_messages": p.resume_messages, "rounds": rounds, "journal": True,
        "server_warnings": warnings,
    }


def catalogue_items(params: Any) -> dict[str, list[tuple[str, Any]]]:
    """The journal scenarios, keyed by the journal-off scenario each follows in a run."""
    n = params.journal_readers
    return {
        f"fanout-{n}": [(f"journal-fanout-{n}", lambda env: journal_fanout(env, n)),
                        (f"journal-fanout-{n}-plain",
                         lambda env: journal_fanout(env, n, positions=False))],
        "writers": [("journal-writers", journal_writers),
                    ("producers", producers),
                    ("journal-producers", lambda env: producers(env, journal=True)),
                    ("journal-producers-array",
                     lambda env: producers(env, journal=True, array=True)),
                    ("journal-resume", journal_resume)],
    }


def counterparts(params: Any) -> list[str]:
    """The journal-off scenarios the journal ones are compared with."""
    return [f"fanout-{params.journal_readers}", "writers", "producers"]
