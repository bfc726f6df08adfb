"""
Load-generating worker processes.  Each runs in its own process (multiprocessing, spawn) and talks
to the orchestrator over a Pipe with small tuples:

    parent -> worker   ("open", paths, concurrency, writer, protocol)
                                                       WebSocket workers: open connections
                                                       (offering `protocol`, e.g. "pgws", if set)
                       ("go", timing)                  run until timing["t_stop"], then answer
                       ("quit",)                       close everything and exit
    worker -> parent   ("ready", info) / ("opened", info) / ("result", info) / ("error", text)

Timing is absolute (time.time()): "t_begin" (start sending), "t_start".."t_end" (the measured
window: only frames *received* inside it are counted, and only their latencies recorded),
"t_stop" (stop and report).  Every result carries "cpu": this process's user+sys seconds inside
the window, so the orchestrator can report the load generator's own CPU use.

The WebSocket client is deliberately minimal: a non-blocking socket per connection, one epoll
loop per process, a fixed handshake request (the Sec-WebSocket-Accept answer is not checked,
only the 101 status), and a frame reader that looks at frame headers only and reads the send
timestamp from the first 17 bytes of a text frame's payload ("1764320000.123456 ...").  Client
frames (pongs, writers' messages) are masked with an all-zero key, which is valid framing and
leaves the payload bytes unchanged, so no per-byte work is needed.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import time
import traceback
from typing import Any

# Latency histogram resolution: buckets of 0.1 ms, keyed by int(seconds * 10000).
BUCKETS_PER_SECOND = 10_000

TS_LEN = 17  # len(f"{time.time():.6f}") until the year 2286

# Latency is read from one text frame in LATENCY_SAMPLE of those one recv brings (the last of
# each group, and the last of the recv), and stands for the group: frames that arrive together
# were sent together (one producer batch, one fan-out run), and reading every time stamp cost
# 0.7 of the 0.9 us a frame took, which made the readers the bottleneck of the fan-out
# scenarios (and got them cut off as slow readers).  A recv of one frame (paced) is exact.
LATENCY_SAMPLE = 16

# Bytes a WebSocket reader takes per recv.  Small enough that one epoll pass over a process's
# sockets, each with a backlog, stays well under pgws's 1 s slow-reader grace (at 256 KiB a pass
# over 500 busy sockets took over a second when this process got half a core, and pgws cut
# prompt readers off); large enough that the system call is a small part of a recv's cost.
RECV_BYTES = 16384


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_payload(ts: float, seq: int, size: int) -> str:
    """The benchmark payload: send time, sequence number, padding to `size` characters."""
    head = f"{ts:.6f} {seq:010d} "
    return head + "x" * (size - len(head)) if size > len(head) else head


def upgrade_request(host: str, port: int, path: str, protocol: str | None = None) -> bytes:
    """The fixed WebSocket upgrade request (offering a subprotocol if given)."""
    offer = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"{offer}\r\n").encode("latin-1")


def _ready_then_go(pipe: Any) -> tuple[dict[str, float], _Window] | None:
    """
    A worker's start: say "ready", wait for "go" (None if told anything else), and return the
    timing with a window set to it.
    """
    pipe.send(("ready", {}))
    msg = pipe.recv()
    if msg[0] != "go":
        return None
    win = _Window()
    win.set(msg[1])
    return msg[1], win


class _Window:
    """Counts and a latency histogram for what is received inside [t_start, t_end]."""

    def __init__(self) -> None:
        self.t_start = float("inf")
        self.t_end = float("-inf")
        self.count = 0
        self.binary = 0  # binary frames (WebSocket readers only): the journal's positions
        # WebSocket readers: the longest a socket went unread in the window, between two reads
        # that found data (the slow-reader rule of pgws cuts a reader off after 1 s of no
        # progress while over max-pending-bytes: longer gaps here are the load generator's)
        self.read_gap = 0.0
        self.series: dict[int, int] = {}  # WebSocket readers: text frames per whole second
        self.hist: dict[int, int] = {}
        self.lat_max = 0.0
        self.cpu0: float | None = None
        self.cpu1: float | None = None

    def set(self, timing: dict[str, float]) -> None:
        self.t_start, self.t_end = timing["t_start"], timing["t_end"]

    def tick(self, now: float) -> None:
        """Take CPU readings at the window's edges (called at least every 50 ms)."""
        if self.cpu0 is None and now >= self.t_start:
            self.cpu0 = cpu_seconds()
        if self.cpu1 is None and now >= self.t_end:
            self.cpu1 = cpu_seconds()

    def summary(self) -> dict[str, Any]:
        now = time.time()
        self.tick(now)
        cpu = (self.cpu1 or cpu_seconds()) - (self.cpu0 or cpu_seconds())
        return {"count": self.count, "binary": self.binary, "hist": self.hist,
                "lat_max": self.lat_max, "cpu": cpu, "read_gap": self.read_gap,
                "series": self.series}


# ---------------------------------------------------------------------------------------------
# WebSocket worker: readers and writers


class _Conn:
    __slots__ = ("sock", "fd", "state", "buf", "out", "path", "writer", "t0")

    def __init__(self, sock: socket.socket, path: str, writer: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = 0  # 0 connecting, 1 handshake sent, 2 open, 3 closed
        self.buf = b""
        self.out = b""
        self.path = path
        self.writer = writer
        self.t0 = 0.0  # when the handshake began; once open, when data was last read


_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class WsWorker:
    def __init__(self, pipe: Any, host: str, port: int, payload_size: int = 64,
                 chunk: int = 16) -> None:
        self.pipe = pipe
        self.host = host
        self.port = port
        self.payload_size = payload_size
        self.chunk = chunk  # messages per write for writers
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.pending: list[tuple[str, bool]] = []
        self.protocol: str | None = None  # the subprotocol offered (the journal's "pgws")
        self.inflight = 0
        self.concurrency = 64
        self.opening = False
        self.open_stats: dict[str, Any] = {}
        self.win = _Window()
        self.timing: dict[str, float] | None = None
        self.writing = False
        self.sent = 0
        self.seq = 0
        self.drops: dict[str, int] = {}
        self.frames_total = 0
        self.watch_until = 0.0
        self.watch_count = 0

    # -- connections --------------------------------------------------------------------------

    def request(self, path: str) -> bytes:
        return upgrade_request(self.host, self.port, path, self.protocol)

    def start_more(self) -> None:
        while self.pending and self.inflight < self.concurrency:
            path, writer = self.pending.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            c = _Conn(sock, path, writer)
            c.t0 = time.time()
            st = self.open_stats
            if st["t_first"] is None:
                st["t_first"] = c.t0
            err = sock.connect_ex((self.host, self.port))
            if err not in (0, errno.EINPROGRESS):
                self._open_failed(c, f"connect: {os.strerror(err)}", registered=False)
                continue
            self.conns[c.fd] = c
            self.ep.register(c.fd, _OUT)
            self.inflight += 1

    def _open_failed(self, c: _Conn, why: str, registered: bool = True) -> None:
        st = self.open_stats
        st["failed"] += 1
        key = why[:80]
        st["errors"][key] = st["errors"].get(key, 0) + 1
        self._close(c, registered)
        if registered:
            self.inflight -= 1

    def _close(self, c: _Conn, registered: bool = True) -> None:
        if c.state == 3:
            return
        c.state = 3
        if registered:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.conns.pop(c.fd, None)
        try:
            c.sock.close()
        except OSError:
            pass

    def _drop(self, c: _Conn, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1
        self._close(c)

    def _check_opened(self) -> None:
        if self.opening and not self.pending and self.inflight == 0:
            self.opening = False
            st = self.open_stats
            st["open"] = sum(1 for c in self.conns.values() if c.state == 2)
            st["cpu"] = cpu_seconds() - st.pop("cpu0")
            self.pipe.send(("opened", st))

    # -- events -------------------------------------------------------------------------------

    def on_writable(self, c: _Conn) -> None:
        if c.state == 0:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._open_failed(c, f"connect: {os.strerror(err)}")
                return
            try:
                c.sock.send(self.request(c.path))
            except OSError as e:
                self._open_failed(c, f"send: {e}")
                return
            c.state = 1
            self.ep.modify(c.fd, _IN)
            return
        if c.state == 2:
            self.write_some(c)

    def write_some(self, c: _Conn) -> None:
        try:
            if c.out:
                n = c.sock.send(c.out)
                c.out = c.out[n:]
                if c.out:
                    return
            if not (self.writing and c.writer):
                self.ep.modify(c.fd, _IN)
                return
            now = time.time()
            frames = []
            size = self.payload_size
            seq = self.seq
            head = bytes([0x81, 0x80 | size]) + b"\0\0\0\0"  # masked with a zero key
            for _ in range(self.chunk):
                frames.append(head + make_payload(now, seq, size).encode("ascii"))
                seq += 1
            self.seq = seq
            data = b"".join(frames)
            n = c.sock.send(data)
            if self.win.t_start <= now <= self.win.t_end:
                self.sent += self.chunk  # counted once handed to the kernel (or queued below)
            if n < len(data):
                c.out = data[n:]
        except BlockingIOError:
            pass
        except OSError as e:
            self._drop(c, f"send: {e.__class__.__name__}")

    def on_readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            if c.state == 1:
                self._open_failed(c, f"recv: {e}")
            else:
                self._drop(c, f"recv: {e.__class__.__name__}")
            return
        if not data:
            if c.state == 1:
                self._open_failed(c, "closed during the handshake")
            else:
                self._drop(c, "eof")
            return
        if c.state == 1:
            data = c.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            status = data[:data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                body = data[end + 4:].decode("utf-8", "replace").strip()
                self._open_failed(c, f"{status.decode('latin-1')} {body}")
                return
            c.state = 2
            c.buf = b""
            self.inflight -= 1
            st = self.open_stats
            st["ok"] += 1
            now = time.time()
            st["t_last"] = now
            st["hs_time"] += now - c.t0
            c.t0 = now
            data = data[end + 4:]
            if not data:
                return
        self.frames(c, data)

    def frames(self, c: _Conn, data: bytes) -> None:
        if c.buf:
            data = c.buf + data
        now = time.time()
        win = self.win
        counting = win.t_start <= now <= win.t_end
        if counting and now - c.t0 > win.read_gap:
            win.read_gap = now - c.t0
        c.t0 = now
        i, count, binary = self._scan(c, data, now, counting)
        c.buf = data[i:] if i < len(data) else b""
        self.frames_total += count
        if counting:
            win.count += count
            win.binary += binary
            second = int(now)
            win.series[second] = win.series.get(second, 0) + count
        if self.watch_until:
            self.watch_count += count

    def _scan(self, c: _Conn, data: bytes, now: float, counting: bool) -> tuple[int, int, int]:
        """
        Handle the complete frames at the start of `data`: count the text frames (and, when
        `counting`, record latencies: see LATENCY_SAMPLE), answer pings, drop the connection at
        a close.  Returns the bytes used up, the number of text frames and of binary ones
        (pgws's control messages, and the journal's positions).  This is the per-frame hot loop,
        so it calls nothing for most text frames.
        """
        n = len(data)
        i = 0
        count = binary = 0
        last = -1  # where the last text frame's payload starts
        while n - i >= 2:
            ln = data[i + 1] & 127
            h = 2
            if ln >= 126:  # a 16- or 64-bit length follows; if it is cut off, end > n below
                h = 4 if ln == 126 else 10
                ln = int.from_bytes(data[i + 2:i + h], "big")
            end = i + h + ln
            if end > n:
                break
            op = data[i] & 15
            if op == 1:
                count += 1
                last = i + h
                if counting and count % LATENCY_SAMPLE == 0:
                    self._latency(data, last, now, LATENCY_SAMPLE)
            elif op == 2:
                binary += 1
            elif op >= 8 and self._control(c, op, data[i + h:end]):
                break  # closed
            i = end
        if counting and count % LATENCY_SAMPLE:
            self._latency(data, last, now, count % LATENCY_SAMPLE)
        return i, count, binary

    def _latency(self, data: bytes, at: int, now: float, weight: int) -> None:
        """The latency of the text frame whose payload starts at `at`, for `weight` frames."""
        try:
            lat = now - float(data[at:at + TS_LEN])
        except ValueError:
            return
        win = self.win
        k = int(lat * BUCKETS_PER_SECOND)
        win.hist[k] = win.hist.get(k, 0) + weight
        if lat > win.lat_max:
            win.lat_max = lat

    def _control(self, c: _Conn, op: int, payload: bytes) -> bool:
        """A ping is answered with a pong carrying the same data; a close drops (True)."""
        if op == 9:
            pong = bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
            c.out += pong
            self.write_some(c) if c.writer else self._send_now(c)
        elif op == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._drop(c, f"close {code}")
            return True
        return False

    def _send_now(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
            c.out = c.out[n:]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(c, "send failed")
        if c.out:
            self.ep.modify(c.fd, _IN | _OUT)

    # -- commands -----------------------------------------------------------------------------

    def command(self, msg: tuple[Any, ...]) -> bool:
        kind = msg[0]
        if kind == "open":
            _, paths, concurrency, writer, self.protocol = msg
            self.pending = [(p, writer) for p in reversed(paths)]
            self.concurrency = concurrency
            self.opening = True
            self.open_stats = {"ok": 0, "failed": 0, "errors": {}, "t_first": None,
                               "t_last": None, "hs_time": 0.0,
                               "cpu0": cpu_seconds()}
            self.start_more()
            self._check_opened()
        elif kind == "go":
            self.timing = msg[1]
            self.win = _Window()
            self.win.set(self.timing)
            self.sent = 0
            self.drops = {}
        elif kind == "watch":  # count frames until a time (the "served" check)
            self.watch_until = msg[1]
            self.watch_count = 0
        elif kind == "count":
            self.pipe.send(("count", sum(1 for c in self.conns.values() if c.state == 2)))
        elif kind == "quit":
            return False
        return True

    def tick(self, now: float) -> None:
        t = self.timing
        if t is not None:
            self.win.tick(now)
            want = t["t_begin"] <= now < t["t_end"]
            if want != self.writing:
                self.writing = want
                if want:
                    for c in self.conns.values():
                        if c.writer and c.state == 2:
                            self.ep.modify(c.fd, _IN | _OUT)
            if now >= t["t_stop"]:
                s = self.win.summary()
                s.update(sent=self.sent, drops=self.drops,
                         open=sum(1 for c in self.conns.values() if c.state == 2))
                self.pipe.send(("result", s))
                self.timing = None
                self.writing = False
        if self.watch_until and now >= self.watch_until:
            self.watch_until = 0.0
            self.pipe.send(("watched", self.watch_count))

    def run(self) -> None:
        pipe_fd = self.pipe.fileno()
        self.ep.register(pipe_fd, _IN)
        conns = self.conns
        poll = self.ep.poll
        last_tick = 0.0
        while True:
            events = poll(0.05)
            for fd, ev in events:
                if fd == pipe_fd:
                    if not self.command(self.pipe.recv()):
                        return
                    continue
                c = conns.get(fd)
                if c is not None:
                    self.on_event(c, ev)
            if self.opening:
                self.start_more()
                self._check_opened()
            now = time.time()
            if now - last_tick >= 0.01:
                last_tick = now
                self.tick(now)

    def on_event(self, c: _Conn, ev: int) -> None:
        """One epoll event of a connection: read first (an error while connecting is a write)."""
        if ev & _IN or (ev & _ERR and c.state != 0):
            self.on_readable(c)
            if c.state == 3:
                return
        if ev & _OUT or (ev & _ERR and c.state == 0):
            self.on_writable(c)


def _report(pipe: Any, e: BaseException) -> None:
    """Send the traceback to the orchestrator; if the orchestrator is gone, just exit."""
    if isinstance(e, (EOFError, BrokenPipeError)):
        return
    try:
        pipe.send(("error", traceback.format_exc()))
    except (OSError, EOFError):
        pass


def ws_worker(pipe: Any, host: str, port: int, payload_size: int = 64) -> None:
    raise_nofile()
    try:
        WsWorker(pipe, host, port, payload_size).run()
    except Exception as e:
        _report(pipe, e)


# ---------------------------------------------------------------------------------------------
# PostgreSQL clients: the producer, a plain LISTEN client, plain psycopg2 writers


def _connect(dsn: str, **kw: Any) -> Any:
    import psycopg2

    conn = psycopg2.connect(dsn, application_name="pgws-bench", **kw)
    conn.autocommit = True
    return conn


def _wait_until(t: float, step: float) -> None:
    while time.time() < t:
        time.sleep(step)


def producer_worker(pipe: Any, dsn: str, channels: list[str], mode: str, batch: int,
                    rate: float, payload_size: int, function: str = "pg_notify") -> None:
    """
    `flood`: batches of `batch` calls of `function(channel, payload)` in one statement (one
    transaction each), as fast as PostgreSQL takes them, channels taken in turn.  `function` is
    pg_notify, or the journal's <schema>.send; "<schema>.send[]" is one call of
    send(channel, payloads[]) per batch instead (one channel a batch).  `paced`: one pg_notify
    per transaction, `rate` per second on a fixed schedule.  Runs from t_begin to t_end.
    """
    try:
        conn = _connect(dsn, options="-c synchronous_commit=off")
        cur = conn.cursor()
        started = _ready_then_go(pipe)
        if started is None:
            return
        timing, win = started
        _wait_until(timing["t_begin"], 0.001)
        if mode == "flood":
            sent = _flood(cur, win, timing["t_end"], channels, batch, payload_size, function)
        else:
            sent = _paced(cur, win, timing["t_begin"], timing["t_end"], channels, rate,
                          payload_size)
        _wait_until(timing["t_stop"], 0.01)
        s = win.summary()
        s["sent"] = sent
        pipe.send(("result", s))
        pipe.recv()
        conn.close()
    except Exception as e:
        _report(pipe, e)


def _flood(cur: Any, win: _Window, t_end: float, channels: list[str], batch: int,
           payload_size: int, function: str = "pg_notify") -> int:
    """The flood producer's loop until t_end; returns the notifications sent inside the window."""
    nch = len(channels)
    seq = 0
    sent = 0
    array = function.endswith("[]")  # one call with the batch's payloads (one channel)
    if array:
        sql = f"SELECT {function[:-2]}(%s, %s::text[])"
    else:
        sql = f"SELECT {function}(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"
    while True:
        now = time.time()
        win.tick(now)
        if now >= t_end:
            break
        pays = [make_payload(now, seq + j, payload_size) for j in range(batch)]
        if array:
            cur.execute(sql, (channels[(seq // batch) % nch], pays))
        else:
            cur.execute(sql, ([channels[(seq + j) % nch] for j in range(batch)], pays))
        seq += batch
        if win.t_start <= now < win.t_end:
            sent += batch
    return sent


def _paced(cur: Any, win: _Window, t_begin: float, t_end: float, channels: list[str],
           rate: float, payload_size: int) -> int:
    """The paced producer's loop until t_end; returns the notifications sent inside the window."""
    nch = len(channels)
    seq = 0
    sent = 0
    interval = 1.0 / rate
    nxt = t_begin
    while True:
        now = time.time()
        win.tick(now)
        if now >= t_end:
            break
        if now < nxt:
            time.sleep(min(nxt - now, 0.05))
            continue
        nxt += interval
        cur.execute("SELECT pg_notify(%s, %s)",
                    (channels[seq % nch], make_payload(time.time(), seq, payload_size)))
        seq += 1
        if win.t_start <= now < win.t_end:
            sent += 1
    return sent


def _envelope_ts(payload: str) -> float:
    i = payload.find('"payload":"')
    return float(payload[i + 11:i + 11 + TS_LEN])


def _raw_ts(payload: str) -> float:
    return float(payload[:TS_LEN])


def listener_worker(pipe: Any, dsn: str, channel: str, kind: str) -> None:
    """
    A plain psycopg2 LISTEN client: counts notifications and their latency in the window.
    `kind` "raw": the payload starts with the send time; "envelope": pgws's envelope with the
    send time as its payload.
    """
    try:
        from pgws._channelname import quote_ident

        conn = _connect(dsn)
        conn.cursor().execute(f"LISTEN {quote_ident(channel)}")
        started = _ready_then_go(pipe)
        if started is None:
            return
        timing, win = started
        count = _Counter(win, kind)
        fd = conn.fileno()
        while True:
            now = time.time()
            win.tick(now)
            if now >= timing["t_stop"]:
                break
            r, _, _ = select.select([fd], [], [], 0.05)
            if not r:
                continue
            conn.poll()
            if conn.notifies:
                count.add(conn.notifies, time.time())
                del conn.notifies[:]
        pipe.send(("result", win.summary()))
        pipe.recv()
        conn.close()
    except Exception as e:
        _report(pipe, e)


class _Counter:
    """What the LISTEN client does with the notifications of one poll (see listener_worker)."""

    def __init__(self, win: _Window, kind: str) -> None:
        self.win = win
        self.ts_of = _envelope_ts if kind == "envelope" else _raw_ts

    def add(self, notifies: list[Any], now: float) -> None:
        win = self.win
        if not win.t_start <= now <= win.t_end:
            return
        win.count += len(notifies)
        hist, ts_of = win.hist, self.ts_of
        for n in notifies:
            lat = now - ts_of(n.payload)
            k = int(lat * BUCKETS_PER_SECOND)
            hist[k] = hist.get(k, 0) + 1
            if lat > win.lat_max:
                win.lat_max = lat


def head_worker(pipe: Any, dsn: str, schema: str, channel: str) -> None:
    """
    The journal's count of a channel's messages: its head (the last seq committed) read at
    t_start and at t_end; "count" is the difference, the messages committed in the window.
    (The wake-ups cannot be counted: there is one per channel per transaction.)
    """
    try:
        conn = _connect(dsn)
        cur = conn.cursor()
        started = _ready_then_go(pipe)
        if started is None:
            return
        timing, win = started

        def head() -> int:
            cur.execute(f"SELECT head FROM {schema}.streams WHERE channel = %s", (channel,))
            row = cur.fetchone()
            return int(row[0]) if row else 0

        _wait_until(timing["t_start"], 0.001)
        h0 = head()
        _wait_until(timing["t_end"], 0.001)
        win.count = head() - h0
        _wait_until(timing["t_stop"], 0.01)
        pipe.send(("result", win.summary()))
        pipe.recv()
        conn.close()
    except Exception as e:
        _report(pipe, e)


def pg_writers_worker(pipe: Any, dsn: str, n: int, channel: str, payload_size: int) -> None:
    """
    The writers baseline: `n` plain psycopg2 connections (asynchronous mode, one epoll loop),
    each running one `SELECT pg_notify(channel, envelope)` per transaction, back to back.  The
    envelope has pgws's shape and size, with the send time where pgws puts the client's text.
    """
    try:
        raise_nofile()
        conns = _connect_async(dsn, n)
        started = _ready_then_go(pipe)
        if started is None:
            return
        timing, win = started
        writers = _PgWriters(conns, channel, payload_size, timing, win)
        _wait_until(timing["t_begin"], 0.001)
        writers.run()
        _wait_until(timing["t_stop"], 0.01)
        s = win.summary()
        s["sent"] = writers.sent
        pipe.send(("result", s))
        pipe.recv()
        for c in conns:
            c.close()
    except Exception as e:
        _report(pipe, e)


def _connect_async(dsn: str, n: int) -> list[Any]:
    """`n` psycopg2 connections in asynchronous mode, each polled until it is connected."""
    import psycopg2
    import psycopg2.extensions as ext

    conns = []
    for _ in range(n):
        conn = psycopg2.connect(dsn, application_name="pgws-bench-writer", async_=1)
        while True:
            state = conn.poll()
            if state == ext.POLL_OK:
                break
            select.select([conn.fileno()] if state == ext.POLL_READ else [],
                          [conn.fileno()] if state == ext.POLL_WRITE else [], [], 5)
        conns.append(conn)
    return conns


class _PgWriters:
    """
    The writers baseline's epoll loop: each connection runs its next pg_notify as soon as the
    previous one is done, until t_end; `sent` counts the statements issued inside the window
    that completed (before t_stop).
    """

    SQL = "SELECT pg_notify(%s, %s)"
    CLAIMS = '{"mode":"w","message_delivered_at":'

    def __init__(self, conns: list[Any], channel: str, payload_size: int,
                 timing: dict[str, float], win: _Window) -> None:
        import psycopg2.extensions as ext

        self.poll_ok = ext.POLL_OK
        self.poll_read = ext.POLL_READ
        self.channel = channel
        self.payload_size = payload_size
        self.timing = timing
        self.win = win
        self.ep = select.epoll()
        self.by_fd = {c.fileno(): c for c in conns}
        self.cursors = {c.fileno(): c.cursor() for c in conns}
        self.issued_at: dict[int, float] = {}  # when each connection's statement was issued
        self.registered: set[int] = set()
        self.busy: set[int] = set()
        self.seq = 0
        self.sent = 0

    def wait_for(self, fd: int, state: int) -> None:
        mask = _IN if state == self.poll_read else _OUT
        if fd in self.registered:
            self.ep.modify(fd, mask)
        else:
            self.ep.register(fd, mask)
            self.registered.add(fd)

    def issue(self, fd: int) -> None:
        """Start the next statement on this connection (until t_end)."""
        while True:
            now = time.time()
            if now >= self.timing["t_end"]:
                self.busy.discard(fd)
                return
            text = make_payload(now, self.seq, self.payload_size)
            self.seq += 1
            channel = self.channel
            env = (f'{{"event":"WebsocketMessage","channel":"{channel}","payload":"{text}",'
                   f'"claims":{self.CLAIMS}{now!r}}}}}')
            self.cursors[fd].execute(self.SQL, (channel, env))
            self.issued_at[fd] = now
            state = self.by_fd[fd].poll()
            if state != self.poll_ok:
                self.wait_for(fd, state)
                return
            if self.win.t_start <= now < self.win.t_end:
                self.sent += 1

    def run(self) -> None:
        """From t_begin (now) until every connection is done or t_stop."""
        win, by_fd = self.win, self.by_fd
        self.busy = set(by_fd)
        for fd in list(by_fd):
            self.issue(fd)
        while self.busy:
            now = time.time()
            win.tick(now)
            if now >= self.timing["t_stop"]:
                break
            for fd, _ev in self.ep.poll(0.05):
                if fd not in self.busy:
                    continue
                state = by_fd[fd].poll()
                if state != self.poll_ok:
                    self.wait_for(fd, state)
                    continue
                if win.t_start <= self.issued_at[fd] < win.t_end:
                    self.sent += 1
                self.issue(fd)
