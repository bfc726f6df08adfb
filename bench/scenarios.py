"""
The scenarios and baselines.  Each function runs one scenario once and returns a record:

    name, metric, unit, value     the headline figure (deliveries/s, notifications/s, ...)
    p50_ms, p99_ms, max_ms        latency from the send time in the payload to the reader
    lg_cpu                        load generator (all its processes) user+sys s / wall s
    srv_cpu, srv_rss_mb           the server under test (pgws or the broadcast server)
    pg_cpu                        PostgreSQL (postmaster and backends) user+sys s / wall s
    sent_rate                     what the producer / writers sent per second in the window
    drops                         connections the server closed or lost (reason -> count)

    metrics, scrape_*             pgws's `metrics` setting; the /metrics scrapes (Scraper) of
                                  metrics-on-fanout-N

A fresh server process is started for every scenario run and stopped after it; the journal
scenarios (bench/journal.py) start theirs with `--journal true`.  Every pgws gets a config file
with `metrics = true` (pgws's default), except metrics-off-fanout-N's with `metrics = false`;
only metrics-on-fanout-N scrapes /metrics.
"""

from __future__ import annotations

import http.client
import math
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.services import Ceiling, Pgws, Postgres, host_busy, listen_overflows

FANOUT_CHANNEL = "bench_fanout"
WRITE_CHANNEL = "bench_writes"
IDLE_CHANNEL = "bench_idle"


class WorkerError(Exception):
    pass


@dataclass
class Params:
    fanout: list[int]
    ceiling_readers: int
    warmup: float
    duration: float
    batch: int
    payload_size: int
    paced_readers: int
    paced_rate: float
    paced_seconds: float
    channels: int
    channel_readers: int
    writers: int
    connections: list[int]
    concurrency: int = 50  # handshakes in flight per load-generator process
    # The journal scenarios (bench/journal.py).
    journal_readers: int = 1000  # journal-fanout-N: readers
    producers: int = 4  # journal-producers: psycopg2 producer processes, one channel each
    producer_batch: int = 100  # journal-producers, journal-resume: calls per transaction
    resume_messages: int = 10_000  # journal-resume: messages missed, then replayed
    resume_rounds: int = 3  # journal-resume: resumes per scenario run (the median counts)
    # metrics-off-fanout-N / metrics-on-fanout-N: readers (N).
    metrics_readers: int = 1000


@dataclass
class Env:
    pg: Postgres
    secret: str
    workdir: Path
    params: Params
    token_r: str = ""
    token_w: str = ""
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    # profiling: None, or (format, output path) for py-spy during the measured window
    profile: tuple[str, Path] | None = None


# -- worker processes ------------------------------------------------------------------------


class Proc:
    def __init__(self, env: Env, target: Any, *args: Any) -> None:
        self.conn, child = env.ctx.Pipe()
        self.p = env.ctx.Process(target=target, args=(child, *args), daemon=True)
        self.p.start()
        child.close()

    def send(self, msg: tuple[Any, ...]) -> None:
        self.conn.send(msg)

    def recv(self, timeout: float = 60) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise WorkerError(f"no answer from a load-generator process within {timeout} s")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise WorkerError(msg[1])
        return msg

    def go(self, timing: dict[str, float]) -> None:
        self.send(("go", timing))

    def result(self, timeout: float = 60) -> dict[str, Any]:
        return self.recv(timeout)[1]

    def stop(self) -> None:
        try:
            self.conn.send(("quit",))
        except (OSError, ValueError):
            pass
        self.p.join(5)
        if self.p.is_alive():
            self.p.terminate()
            self.p.join(5)
        self.conn.close()


class Fleet:
    """Several WebSocket load-generator processes sharing the connections."""

    def __init__(self, env: Env, port: int, nprocs: int) -> None:
        self.procs = [Proc(env, loadgen.ws_worker, "127.0.0.1", port, env.params.payload_size)
                      for _ in range(nprocs)]

    def open(self, paths: list[str], concurrency: int, writer: bool = False,
             timeout: float = 180, protocol: str | None = None) -> dict[str, Any]:
        n = len(self.procs)
        for i, p in enumerate(self.procs):
            p.send(("open", paths[i::n], concurrency, writer, protocol))
        stats = [p.recv(timeout)[1] for p in self.procs]
        errors: dict[str, int] = {}
        for s in stats:
            for k, v in s["errors"].items():
                errors[k] = errors.get(k, 0) + v
        firsts = [s["t_first"] for s in stats if s["t_first"]]
        lasts = [s["t_last"] for s in stats if s["t_last"]]
        return {
            "ok": sum(s["ok"] for s in stats), "failed": sum(s["failed"] for s in stats),
            "open": sum(s["open"] for s in stats), "errors": errors,
            "t_first": min(firsts) if firsts else None, "t_last": max(lasts) if lasts else None,
            "cpu": sum(s["cpu"] for s in stats), "hs_time": sum(s["hs_time"] for s in stats),
        }

    def go(self, timing: dict[str, float]) -> None:
        for p in self.procs:
            p.go(timing)

    def results(self, timeout: float = 60) -> list[dict[str, Any]]:
        return [p.result(timeout) for p in self.procs]

    def watch(self, seconds: float) -> int:
        until = time.time() + seconds
        for p in self.procs:
            p.send(("watch", until))
        return sum(p.recv(seconds + 30)[1] for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def procs_for(n: int) -> int:
    """Load-generator processes for n connections: one up to 100, two up to 2000, else 2500 each."""
    if n <= 100:
        return 1
    if n <= 2000:
        return 2
    return math.ceil(n / 2500)


def ready(procs: list[Proc], timeout: float = 60) -> None:
    for p in procs:
        msg = p.recv(timeout)
        if msg[0] != "ready":
            raise WorkerError(f"unexpected message {msg[0]}")


# -- measuring -------------------------------------------------------------------------------


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    hist: dict[int, int] = {}
    drops: dict[str, int] = {}
    for r in results:
        for k, v in r.get("hist", {}).items():
            hist[k] = hist.get(k, 0) + v
        for k, v in (r.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + v
    return {
        "count": sum(r.get("count", 0) for r in results),
        "binary": sum(r.get("binary", 0) for r in results),
        "read_gap": max((r.get("read_gap", 0.0) for r in results), default=0.0),
        "series": _sum_series(results),
        "sent": sum(r.get("sent", 0) for r in results),
        "cpu": sum(r.get("cpu", 0.0) for r in results),
        "lat_max": max((r.get("lat_max", 0.0) for r in results), default=0.0),
        "hist": hist,
        "drops": drops,
    }


def _sum_series(results: list[dict[str, Any]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for r in results:
        for k, v in (r.get("series") or {}).items():
            total[k] = total.get(k, 0) + v
    return total


def before_cut(series: dict[int, int], timing: dict[str, float],
               cut: dict[str, Any] | None) -> dict[str, Any]:
    """
    Deliveries/s over the whole seconds of the window before pgws cut the first reader off
    (the log's second), i.e. while every reader was connected; the window's rate if none was.
    """
    first = math.ceil(timing["t_start"])
    end = math.floor(timing["t_end"])
    if cut and cut.get("count") and cut.get("first_s") is not None:
        end = min(end, math.floor(timing["t_begin"] + cut["first_s"]))
    seconds = list(range(first, end))
    if not seconds:
        return {"value_before_cut": None, "seconds_before_cut": 0}
    return {"value_before_cut": sum(series.get(s, 0) for s in seconds) / len(seconds),
            "seconds_before_cut": len(seconds)}


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    goal = q * total
    cum = 0
    for k in sorted(hist):
        cum += hist[k]
        if cum >= goal:
            return (k + 0.5) * 1000 / loadgen.BUCKETS_PER_SECOND
    return None


def timing_for(warmup: float, duration: float, grace: float) -> dict[str, float]:
    t_begin = time.time() + 0.5
    t_start = t_begin + warmup
    t_end = t_start + duration
    return {"t_begin": t_begin, "t_start": t_start, "t_end": t_end, "t_stop": t_end + grace}


def sleep_until(t: float) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


class Window:
    """Server and PostgreSQL CPU over the measured window, and a py-spy profile if asked."""

    def __init__(self, env: Env, server: Any, timing: dict[str, float]) -> None:
        self.env, self.server, self.timing = env, server, timing
        self.spy: subprocess.Popen[Any] | None = None

    def measure(self) -> dict[str, Any]:
        t = self.timing
        server, pg = self.server, self.env.pg
        sleep_until(t["t_start"])
        w0 = time.time()
        h0 = host_busy()
        s0 = server.cpu() if server else 0.0
        p0 = pg.cpu()
        if server is not None and self.env.profile is not None:
            fmt, out = self.env.profile
            py_spy = Path(sys.executable).parent / "py-spy"
            self.spy = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(server.pid), "--duration",
                 str(int(round(t["t_end"] - t["t_start"]))), "--rate", "250",
                 "--format", fmt, "-o", str(out),
                 *(["--nolineno"] if fmt == "raw" else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sleep_until(t["t_end"])
        w1 = time.time()
        h1 = host_busy()
        s1 = server.cpu() if server else 0.0
        p1 = pg.cpu()
        rss = server.rss_kb() if server else 0
        if self.spy is not None:
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
        wall = w1 - w0
        return {"wall": wall, "host_cpu": (h1 - h0) / wall,
                "srv_cpu": (s1 - s0) / wall if server else None,
                "pg_cpu": (p1 - p0) / wall, "srv_rss_mb": rss / 1024 if server else None}


SCRAPE_INTERVAL = 1.0  # seconds between the starts of two scrapes of /metrics
SCRAPE_TIMEOUT = 5.0  # seconds a scrape may take (connect and whole answer)


class Scraper:
    """
    A thread of the benchmark's own process that GETs http://127.0.0.1:<port>/metrics every
    SCRAPE_INTERVAL seconds from t_begin (the warm-up's start) until t_end, as a Prometheus
    server would, over a new connection each time.  A scrape that is late (the one before took
    longer than the interval) starts at the next slot: scrapes never overlap.  Every answer is
    counted by its status code and every failure (timeout, refused, reset) by its exception;
    nothing is raised, so a pgws without /metrics (404) still yields the scenario's figures.
    """

    def __init__(self, port: int, timing: dict[str, float], path: str = "/metrics") -> None:
        self.port, self.timing, self.path = port, timing, path
        self.status: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.ms: list[float] = []
        self.sizes: list[int] = []
        self.content_type: str | None = None
        self.samples: int | None = None  # lines of the last 200 answer that are not comments
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        c0 = time.thread_time()
        t = self.timing["t_begin"]
        while t < self.timing["t_end"]:
            sleep_until(t)
            self._scrape()
            t += SCRAPE_INTERVAL
            while t < time.time():
                t += SCRAPE_INTERVAL
        self.cpu = time.thread_time() - c0

    def _scrape(self) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=SCRAPE_TIMEOUT)
        try:
            conn.request("GET", self.path, headers={"Accept": "text/plain"})
            answer = conn.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as e:
            key = e.__class__.__name__
            self.errors[key] = self.errors.get(key, 0) + 1
            return
        finally:
            conn.close()
        self.ms.append((time.perf_counter() - t0) * 1000)
        self.sizes.append(len(body))
        key = str(answer.status)
        self.status[key] = self.status.get(key, 0) + 1
        if answer.status == 200:
            self.content_type = answer.getheader("Content-Type")
            self.samples = sum(1 for line in body.decode("utf-8", "replace").splitlines()
                               if line.strip() and not line.startswith("#"))

    def figures(self) -> dict[str, Any]:
        """
        What the scrapes got; durations (request to the answer's last byte) and sizes (body
        bytes) are of the answered scrapes, whatever their status.
        """
        self.thread.join(SCRAPE_TIMEOUT + SCRAPE_INTERVAL + 5)
        answered = len(self.ms)
        return {
            "scrapes": answered + sum(self.errors.values()),
            "scrape_ok": self.status.get("200", 0),
            "scrape_status": dict(self.status), "scrape_errors": dict(self.errors),
            "scrape_ms_p50": statistics.median(self.ms) if answered else None,
            "scrape_ms_max": max(self.ms) if answered else None,
            "scrape_bytes_p50": statistics.median(self.sizes) if answered else None,
            "scrape_bytes_max": max(self.sizes) if answered else None,
            "scrape_content_type": self.content_type, "scrape_samples": self.samples,
            "scrape_cpu_s": self.cpu,
        }


def record(name: str, metric: str, unit: str, got: dict[str, Any], win: dict[str, Any],
           lg_results: list[dict[str, Any]], duration: float, **extra: Any) -> dict[str, Any]:
    lg_cpu = sum(r.get("cpu", 0.0) for r in lg_results) / win["wall"]
    ours = lg_cpu + (win["srv_cpu"] or 0.0) + win["pg_cpu"]
    value = got["count"] / duration
    rec = {
        "name": name, "metric": metric, "unit": unit,
        "value": value,
        "p50_ms": percentile_ms(got["hist"], 0.5),
        "p99_ms": percentile_ms(got["hist"], 0.99),
        "max_ms": got["lat_max"] * 1000 if got["count"] else None,
        "lg_cpu": lg_cpu, "srv_cpu": win["srv_cpu"], "srv_rss_mb": win["srv_rss_mb"],
        "pg_cpu": win["pg_cpu"], "drops": got.get("drops") or {},
        "host_cpu": win["host_cpu"], "other_cpu": max(0.0, win["host_cpu"] - ours),
        "per_srv_core": value / win["srv_cpu"] if win["srv_cpu"] else None,
    }
    rec.update(extra)
    return rec


# -- scenarios ---------------------------------------------------------------------------------


# The journal's schema (journal-schema), and what the journal-on pgws is started with.
JOURNAL_SCHEMA = "pgws"
JOURNAL_ARGS = ["--journal", "true", "--journal-schema", JOURNAL_SCHEMA]
# Readers of the journal-on scenarios offer pgws's subprotocol: they get positions.
SUBPROTOCOL = "pgws"


def reset_journal(env: Env) -> None:
    """
    Empty the journal's tables (if a journal pgws ever made them), so that every journal run
    starts from the same state; called while no pgws runs.
    """
    import psycopg2

    conn = psycopg2.connect(env.pg.uri)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute("SELECT to_regclass(%s)", (f"{JOURNAL_SCHEMA}.messages",))
        row = cur.fetchone()
        if row is not None and row[0] is not None:
            cur.execute(f"TRUNCATE {JOURNAL_SCHEMA}.messages, {JOURNAL_SCHEMA}.streams")
    finally:
        conn.close()


def _start_pgws(env: Env, journal: bool = False, metrics: bool = True) -> Pgws:
    """
    A fresh pgws; with the journal, on empty journal tables.  `metrics` goes into its config
    file (pgws's default, true, for every scenario but metrics-off-fanout-N).
    """
    if journal:
        reset_journal(env)
    server = Pgws(env.pg.uri, env.secret, env.workdir, JOURNAL_ARGS if journal else None,
                  settings={"metrics": metrics})
    server.start()
    return server


def _check_open(opened: dict[str, Any], want: int, what: str) -> None:
    if opened["ok"] < want:
        raise WorkerError(f"{what}: only {opened['ok']} of {want} WebSockets opened; errors: "
                          f"{opened['errors']}")


def _readers_server(env: Env, ceiling: bool, journal: bool, channels: list[str],
                    per_channel: int, metrics: bool = True) -> tuple[Any, list[str]]:
    """The server of a readers scenario (started), and the readers' paths."""
    if ceiling:
        server: Any = Ceiling(env.workdir)
        server.start()
        return server, ["/ceiling"] * (len(channels) * per_channel)
    server = _start_pgws(env, journal, metrics)
    return server, [f"/{ch}/{env.token_r}" for ch in channels for _ in range(per_channel)]


def readers(env: Env, name: str, *, ceiling: bool, channels: list[str], per_channel: int,
            mode: str = "flood", rate: float = 0.0, duration: float | None = None,
            warmup: float | None = None, journal: bool = False,
            positions: bool = True, metrics: bool = True,
            scrape: bool = False) -> dict[str, Any]:
    """
    Readers on pgws (a producer notifies through PostgreSQL) or on the broadcast server.  With
    `journal`, pgws runs with the journal and the producer calls <schema>.send where it would
    call pg_notify, batched the same way; with `positions` the readers speak pgws's subprotocol
    (each message comes as its position's binary frame and the text frame; only text frames
    are counted), else they get plain text frames as without the journal.  `metrics` is pgws's
    `metrics` setting; with `scrape`, a Scraper GETs /metrics once a second through the
    warm-up and the window, and its figures join the record.
    """
    p = env.params
    duration = duration or p.duration
    warmup = p.warmup if warmup is None else warmup
    server: Any = None
    fleet = producer = None
    try:
        server, paths = _readers_server(env, ceiling, journal, channels, per_channel, metrics)
        fleet = Fleet(env, server.port, procs_for(len(paths)))
        opened = fleet.open(paths, p.concurrency,
                            protocol=SUBPROTOCOL if journal and positions else None)
        _check_open(opened, len(paths), name)
        if not ceiling:
            producer = Proc(env, loadgen.producer_worker, env.pg.uri, channels, mode, p.batch,
                            rate, p.payload_size,
                            f"{JOURNAL_SCHEMA}.send" if journal else "pg_notify")
            ready([producer])
        timing = timing_for(warmup, duration, 0.5 if mode == "paced" else 0.3)
        scraper = Scraper(server.port, timing) if scrape else None
        if scraper is not None:
            scraper.start()
        fleet.go(timing)
        if producer is not None:
            producer.go(timing)
        else:
            go = f"go {timing['t_begin']} {timing['t_end']} {p.payload_size}"
            assert server.command(go + (f" {rate}" if mode == "paced" else "")) == "started"
        win = Window(env, server, timing).measure()
        scraped = scraper.figures() if scraper is not None else {}
        res = fleet.results(timeout=duration + 60)
        prod: dict[str, Any] = producer.result(timeout=60) if producer else {"sent": 0, "cpu": 0.0}
        if producer is None:
            messages, sent_rate = int(server.answer(timeout=30).split()[1]), None
        else:
            messages, sent_rate = prod["sent"], prod["sent"] / duration
        got = merge(res)
        cut = None if ceiling else server.cut_offs(timing["t_begin"])
        return record(name, "deliveries/s", "deliveries/s", got, win, res + [prod],
                      duration, readers=len(paths), sent_rate=sent_rate, messages=messages,
                      binary_frames=got["binary"], positions=journal and positions,
                      lg_read_gap_ms=got["read_gap"] * 1000,
                      cut_off=cut, **before_cut(got["series"], timing, cut),
                      lg_cpu_producer=prod["cpu"] / win["wall"], journal=journal,
                      metrics=None if ceiling else metrics, **scraped,
                      server_warnings=None if ceiling else server.warnings())
    finally:
        if producer:
            producer.stop()
        if fleet:
            fleet.stop()
        if server:
            server.stop()


def fanout(env: Env, n: int) -> dict[str, Any]:
    return readers(env, f"fanout-{n}", ceiling=False, channels=[FANOUT_CHANNEL], per_channel=n)


def metrics_fanout(env: Env, n: int, on: bool) -> dict[str, Any]:
    """
    fanout-N with pgws's `metrics` setting off, or on with /metrics scraped once a second (the
    cost of metrics on fan-out is the pair's ratio).
    """
    return readers(env, f"metrics-{'on' if on else 'off'}-fanout-{n}", ceiling=False,
                   channels=[FANOUT_CHANNEL], per_channel=n, metrics=on, scrape=on)


def stack_ceiling(env: Env) -> dict[str, Any]:
    n = env.params.ceiling_readers
    return readers(env, f"stack-ceiling-{n}", ceiling=True, channels=[FANOUT_CHANNEL],
                   per_channel=n)


def paced(env: Env) -> dict[str, Any]:
    p = env.params
    return readers(env, "paced", ceiling=False, channels=[FANOUT_CHANNEL],
                   per_channel=p.paced_readers, mode="paced", rate=p.paced_rate,
                   duration=p.paced_seconds, warmup=min(1.0, p.warmup))


def metrics_paced(env: Env, on: bool) -> dict[str, Any]:
    """
    paced with pgws's `metrics` setting off, or on with /metrics scraped once a second: below
    saturation, so the pair's pgws CPU and latency show what metrics cost when nothing else
    limits (the fan-out flood's figures move with when its readers get cut off).
    """
    p = env.params
    return readers(env, f"metrics-{'on' if on else 'off'}-paced", ceiling=False,
                   channels=[FANOUT_CHANNEL], per_channel=p.paced_readers, mode="paced",
                   rate=p.paced_rate, duration=p.paced_seconds, warmup=min(1.0, p.warmup),
                   metrics=on, scrape=on)


def paced_ceiling(env: Env) -> dict[str, Any]:
    p = env.params
    return readers(env, "paced-ceiling", ceiling=True, channels=[FANOUT_CHANNEL],
                   per_channel=p.paced_readers, mode="paced", rate=p.paced_rate,
                   duration=p.paced_seconds, warmup=min(1.0, p.warmup))


def channels(env: Env) -> dict[str, Any]:
    p = env.params
    names = [f"bench_ch{i:05d}" for i in range(p.channels)]
    return readers(env, "channels", ceiling=False, channels=names, per_channel=p.channel_readers)


def pg_ceiling(env: Env) -> dict[str, Any]:
    """The producer with one plain psycopg2 LISTEN client and no pgws."""
    p = env.params
    listener = producer = None
    try:
        listener = Proc(env, loadgen.listener_worker, env.pg.uri, FANOUT_CHANNEL, "raw")
        producer = Proc(env, loadgen.producer_worker, env.pg.uri, [FANOUT_CHANNEL], "flood",
                        p.batch, 0.0, p.payload_size)
        ready([listener, producer])
        timing = timing_for(p.warmup, p.duration, 0.3)
        listener.go(timing)
        producer.go(timing)
        win = Window(env, None, timing).measure()
        got = listener.result(timeout=p.duration + 60)
        prod = producer.result(timeout=60)
        return record("pg-ceiling", "notifications/s", "notifications/s", merge([got]), win,
                      [got, prod], p.duration, readers=1, sent_rate=prod["sent"] / p.duration,
                      lg_cpu_producer=prod["cpu"] / win["wall"])
    finally:
        for w in (producer, listener):
            if w:
                w.stop()


def writers(env: Env, journal: bool = False) -> dict[str, Any]:
    """
    `writers` WebSockets (mode w) sending as fast as they can; envelopes at a plain LISTEN.
    With `journal`, pgws runs with the journal: the channel is journaled, so its client
    messages go through <schema>.relay, which inserts each one and NOTIFYs only a wake-up;
    the envelopes are counted by the channel's head in the journal, read at the window's
    edges (no latency then).
    """
    p = env.params
    name = "journal-writers" if journal else "writers"
    server = fleet = listener = None
    try:
        server = _start_pgws(env, journal)
        if journal:
            listener = Proc(env, loadgen.head_worker, env.pg.uri, JOURNAL_SCHEMA, WRITE_CHANNEL)
        else:
            listener = Proc(env, loadgen.listener_worker, env.pg.uri, WRITE_CHANNEL, "envelope")
        ready([listener])
        fleet = Fleet(env, server.port, 1 if p.writers <= 50 else 2)
        opened = fleet.open([f"/{WRITE_CHANNEL}/{env.token_w}"] * p.writers, p.concurrency,
                            writer=True)
        _check_open(opened, p.writers, name)
        timing = timing_for(p.warmup, p.duration, 0.3)
        fleet.go(timing)
        listener.go(timing)
        win = Window(env, server, timing).measure()
        res = fleet.results(timeout=p.duration + 60)
        got = listener.result(timeout=60)
        sent = merge(res)
        return record(name, "envelopes/s", "envelopes/s", merge([got]), win, res + [got],
                      p.duration, writers=p.writers, sent_rate=sent["sent"] / p.duration,
                      drops=sent["drops"], journal=journal, server_warnings=server.warnings())
    finally:
        for w in (fleet, listener, server):
            if w:
                w.stop()


def pg_writers(env: Env) -> dict[str, Any]:
    """The writers baseline: plain psycopg2 connections, one pg_notify per transaction."""
    p = env.params
    listener = None
    workers: list[Proc] = []
    try:
        listener = Proc(env, loadgen.listener_worker, env.pg.uri, WRITE_CHANNEL, "envelope")
        nprocs = 1 if p.writers <= 50 else 2
        share = [p.writers // nprocs + (1 if i < p.writers % nprocs else 0) for i in range(nprocs)]
        workers = [Proc(env, loadgen.pg_writers_worker, env.pg.uri, k, WRITE_CHANNEL,
                        p.payload_size) for k in share]
        ready([listener, *workers])
        timing = timing_for(p.warmup, p.duration, 0.3)
        listener.go(timing)
        for w in workers:
            w.go(timing)
        win = Window(env, None, timing).measure()
        res = [w.result(timeout=p.duration + 60) for w in workers]
        got = listener.result(timeout=60)
        return record("pg-writers", "envelopes/s", "envelopes/s", merge([got]), win, res + [got],
                      p.duration, writers=p.writers, sent_rate=merge(res)["sent"] / p.duration)
    finally:
        for proc in (*workers, listener):
            if proc:
                proc.stop()


def connections(env: Env) -> dict[str, Any]:
    """
    Open idle readers in steps (e.g. 1000, then up to 10000) with many handshakes in flight:
    handshakes/s per step, pgws's RSS growth per connection after each step, and at the end one
    notification that every connection must receive (the "served" check).
    """
    import psycopg2

    p = env.params
    server = fleet = None
    try:
        server = _start_pgws(env)
        time.sleep(1.0)
        rss0 = server.rss_kb()
        fleet = Fleet(env, server.port, procs_for(max(p.connections)))
        steps = []
        total = 0
        for target in p.connections:
            add = target - total
            c0, w0, o0 = server.cpu(), time.time(), listen_overflows()
            opened = fleet.open([f"/{IDLE_CHANNEL}/{env.token_r}"] * add, p.concurrency)
            c1, w1, o1 = server.cpu(), time.time(), listen_overflows()
            total += opened["ok"]
            span = (opened["t_last"] or w1) - (opened["t_first"] or w0)
            time.sleep(2.0)  # let the handshakes' garbage go
            rss = server.rss_kb()
            steps.append({
                "connections": total, "attempted": add, "ok": opened["ok"],
                "failed": opened["failed"], "errors": opened["errors"],
                "handshakes_per_s": opened["ok"] / span if span > 0 else None,
                "rss_mb": rss / 1024, "rss_per_conn_kb": (rss - rss0) / total if total else None,
                "srv_cpu": (c1 - c0) / (w1 - w0), "lg_cpu": opened["cpu"] / (w1 - w0),
                "listen_overflows": o1 - o0,
                "per_srv_core": opened["ok"] / (c1 - c0) if c1 > c0 else None,
                "handshake_ms": opened["hs_time"] * 1000 / opened["ok"] if opened["ok"] else None,
            })
            if opened["ok"] < add:
                break
        # Served: one notification reaches every open connection.
        conn = psycopg2.connect(env.pg.uri)
        conn.autocommit = True
        fleet_watch = time.time()
        for proc in fleet.procs:
            proc.send(("watch", fleet_watch + 5.0))
        conn.cursor().execute("SELECT pg_notify(%s, %s)",
                              (IDLE_CHANNEL, loadgen.make_payload(time.time(), 0, 64)))
        conn.close()
        received = sum(proc.recv(60)[1] for proc in fleet.procs)
        last = steps[-1]
        return {
            "name": "connections", "metric": "handshakes/s", "unit": "handshakes/s",
            "value": last["handshakes_per_s"], "p50_ms": None, "p99_ms": None, "max_ms": None,
            "lg_cpu": last["lg_cpu"], "srv_cpu": last["srv_cpu"], "srv_rss_mb": last["rss_mb"],
            "pg_cpu": None, "drops": {}, "steps": steps, "rss0_mb": rss0 / 1024,
            "served": received, "connections": total, "server_warnings": server.warnings(),
        }
    finally:
        for w in (fleet, server):
            if w:
                w.stop()


def catalogue(params: Params) -> list[tuple[str, Any]]:
    """
    Every scenario and baseline, in the order a run performs them; each journal scenario right
    after its journal-off counterpart (bench/journal.py), and metrics-on-fanout-N right after
    metrics-off-fanout-N, so that the two of a pair see the same machine.
    """
    from bench import journal

    items: list[tuple[str, Any]] = [("pg-ceiling", pg_ceiling)]
    fanouts = list(params.fanout)
    if params.journal_readers not in fanouts:  # journal-fanout-N is compared with fanout-N
        fanouts.append(params.journal_readers)
    for n in fanouts:
        items.append((f"fanout-{n}", lambda env, n=n: fanout(env, n)))
    items += [
        (f"stack-ceiling-{params.ceiling_readers}", stack_ceiling),
        ("paced", paced),
        ("paced-ceiling", paced_ceiling),
        ("channels", channels),
        ("pg-writers", pg_writers),
        ("writers", writers),
        ("connections", connections),
    ]
    after = journal.catalogue_items(params)
    # The metrics pair, one right after the other; after fanout-N (and its journal scenarios)
    # when fanout-N is run, else after the last fanout.
    n = params.metrics_readers
    pair = [(f"metrics-off-fanout-{n}", lambda env: metrics_fanout(env, n, on=False)),
            (f"metrics-on-fanout-{n}", lambda env: metrics_fanout(env, n, on=True))]
    key = f"fanout-{n}" if n in fanouts else f"fanout-{fanouts[-1]}"
    after[key] = after.get(key, []) + pair
    after["paced"] = after.get("paced", []) + [
        ("metrics-off-paced", lambda env: metrics_paced(env, on=False)),
        ("metrics-on-paced", lambda env: metrics_paced(env, on=True))]
    out: list[tuple[str, Any]] = []
    for item in items:
        out.append(item)
        out += after.get(item[0], [])
    return out
