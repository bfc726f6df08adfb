"""
The delivery journal (journal = true), end to end against a real PostgreSQL: ordering in commit
order, concurrent producers with rollbacks while readers come and go, megabyte payloads and the
payload limit, history, resume and retention, migration, and the plain paths beside it.

Every test has a journal schema of its own (L{schema}), dropped at the end, so that no two tests
share a head, an epoch or a row.  Readers are real WebSocket clients; what a reader received is
read from its client's queue (L{tape}) without taking it out, so a test can wait for a position
and then look at everything that came, in order.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, threads

from pgws._journal import Journal
from support import (
    Client,
    Db,
    Server,
    handshake,
    sleep,
    start_server,
    tcp,
    token,
    until,
    wait,
    ws_connect,
)

# -- helpers shared with test_journal_faults -------------------------------------------------------


def new_schema() -> str:
    return f"jt_{uuid.uuid4().hex[:8]}"


def drop_schema(db_uri: str, name: str) -> None:
    outside = Db(db_uri)
    try:
        outside.execute("SET lock_timeout = '20s'")
        outside.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        outside.close()


@pytest.fixture(name="schema")
def schema_fixture(db_uri: str) -> Iterator[str]:
    """A journal schema of this test's own, dropped at the end."""
    name = new_schema()
    yield name
    drop_schema(db_uri, name)


def journal_of(server: Server) -> Journal:
    journal = server.relay.journal
    assert journal is not None
    return journal


async def journal_server(db_uri: str, schema: str, **settings: Any) -> Server:
    """A relay with the journal on, once its schema is migrated (handshakes get 503 before)."""
    server = await start_server(db_uri, journal="true", journal_schema=schema, **settings)
    await until(lambda: journal_of(server).migrated, "the journal is migrated", timeout=30)
    return server


def send(db: Db, schema: str, channel: str, payload: str) -> int:
    """A producer's send() in its own transaction; the message's seq."""
    return int(db.execute(f"SELECT {schema}.send(%s, %s)", (channel, payload))[0][0])


def committed_rows(db: Db, schema: str, channel: str) -> list[tuple[int, str]]:
    return [(int(seq), payload) for seq, payload in db.execute(
        f"SELECT seq, payload FROM {schema}.messages WHERE channel = %s ORDER BY seq", (channel,))]


def head(db: Db, schema: str, channel: str) -> int:
    rows = db.execute(f"SELECT head FROM {schema}.streams WHERE channel = %s", (channel,))
    return int(rows[0][0]) if rows else 0


@dataclass
class Tape:
    """What one reader received, parsed: the wire protocol of pgws._journal."""

    events: list[dict[str, Any]] = field(default_factory=list)  # {"event": "stream", ...}
    controls: list[dict[str, Any]] = field(default_factory=list)  # other binary JSON (gap ...)
    rows: list[tuple[str, int, str]] = field(default_factory=list)  # (channel, seq, payload)
    plain: list[str] = field(default_factory=list)  # text frames with no position before them
    kinds: list[str] = field(default_factory=list)  # "event", "control", "position", "text"
    anomalies: list[str] = field(default_factory=list)  # what the protocol does not allow
    incomplete: dict[str, Any] | None = None  # a position frame whose payload has not come

    def seqs(self, channel: str) -> list[int]:
        return [seq for ch, seq, _ in self.rows if ch == channel]

    def last(self, channel: str) -> int:
        seqs = self.seqs(channel)
        return seqs[-1] if seqs else 0

    def pairs(self, channel: str) -> list[tuple[int, str]]:
        return [(seq, payload) for ch, seq, payload in self.rows if ch == channel]


def parse(items: list[Any]) -> Tape:
    tape = Tape()
    position: dict[str, Any] | None = None
    for item in items:
        if isinstance(item, bytes):
            message = json.loads(item)
            if position is not None:
                tape.anomalies.append(f"binary frame {message!r} between {position!r} and its "
                                      "payload")
            if "event" in message:
                kind = "event" if message["event"] == "stream" else "control"
                (tape.events if kind == "event" else tape.controls).append(message)
                tape.kinds.append(kind)
            else:
                if set(message) != {"channel", "seq"}:
                    tape.anomalies.append(f"unknown binary frame {message!r}")
                position = message
                tape.kinds.append("position")
        else:
            tape.kinds.append("text")
            if position is not None:
                tape.rows.append((position["channel"], position["seq"], item))
                position = None
            else:
                tape.plain.append(item)
    tape.incomplete = position
    return tape


def tape(client: Client) -> Tape:
    """Everything C{client} received so far (nothing is taken out of its queue)."""
    return parse(list(client.messages.pending))


def reader_path(channel: str | None, *, mode: str = "r", claims: dict[str, Any] | None = None,
                resume: dict[str, Any] | None = None, history: int | None = None) -> str:
    jwt_text = token({"mode": mode, **(claims or {})})
    path = (f"/{urllib.parse.quote(channel, safe='')}/" if channel else "/") + jwt_text
    query = []
    if resume is not None:
        query.append("resume=" + urllib.parse.quote(json.dumps(resume)))
    if history is not None:
        query.append(f"history={history}")
    return path + ("?" + "&".join(query) if query else "")


async def open_reader(port: int, channel: str | None, *, protocols: list[str] | None = None,
                      events: int = 1, **kwargs: Any) -> Client:
    """A reader with the pgws subprotocol, once its C{events} stream events have come."""
    client = await ws_connect(port, reader_path(channel, **kwargs),
                              protocols=["pgws"] if protocols is None else protocols)
    if events:
        await until(lambda: len(tape(client).events) >= events, "the stream events")
    return client


async def until_seq(client: Client, channel: str, seq: int, timeout: float = 20) -> Tape:
    """Wait (bounded) until C{client} has received C{channel}'s message C{seq}."""
    await until(lambda: tape(client).last(channel) >= seq,
                f"{channel} #{seq} reaches the reader (it has "
                f"{tape(client).last(channel)})", timeout=timeout)
    return tape(client)


def only_event(t: Tape) -> dict[str, Any]:
    assert len(t.events) == 1, t.events
    return t.events[0]


def digest(text: str) -> str:
    return f"{len(text.encode())} bytes sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def counts(expected: list[tuple[int, str]], got: list[tuple[int, str]]) -> tuple[int, int]:
    """(missing, duplicated) of C{got} against C{expected}."""
    missing = len(set(expected) - set(got))
    duplicated = len(got) - len(set(got))
    return missing, duplicated


class Producer(threading.Thread):
    """
    A producer with its own psycopg2 connection, in a thread (a send waits for the channel's
    head row lock, which must not block the reactor): C{work(cursor, index)} runs in one
    transaction per call; it returns the payloads sent and whether to commit.
    """

    def __init__(self, db_uri: str, work: Callable[[Any, int], tuple[list[tuple[str, str]], bool]],
                 count: int, stop: threading.Event | None = None, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.db_uri = db_uri
        self.work = work
        self.count = count
        self.stop_event = stop
        self.pause = pause
        self.committed: list[tuple[str, str]] = []
        self.rolled_back: list[tuple[str, str]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        conn = psycopg2.connect(self.db_uri)
        try:
            index = 0
            while index < self.count and not (self.stop_event and self.stop_event.is_set()):
                with conn.cursor() as cur:
                    sent, commit = self.work(cur, index)
                if commit:
                    conn.commit()
                    self.committed.extend(sent)
                else:
                    conn.rollback()
                    self.rolled_back.extend(sent)
                index += 1
                if self.pause:
                    time.sleep(self.pause)
        except Exception as e:  # reported by the test
            self.errors.append(repr(e))
        finally:
            conn.close()


async def twistd_journal(tmp_path: Any, db_uri: str, schema: str, *args: str) -> tuple[Any, int]:
    """`twistd -n pgws` with the journal on in C{schema}: (the Twistd, its port)."""
    from test_twistd import Twistd

    from support import SECRET

    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--journal", "true", "--journal-schema", schema, *args,
                    env={"PGWS_JWT_SECRET": SECRET})
    port = await server.ready()
    return server, port


async def open_when_ready(port: int, channel: str | None, **kwargs: Any) -> Client:
    """A reader of another process: 503 until its journal is migrated, so try again (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await open_reader(port, channel, **kwargs)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            await sleep(0.1)


# -- ordering ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_transactions_committing_out_of_order_reach_readers_in_commit_order(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    a = psycopg2.connect(db_uri)
    b = psycopg2.connect(db_uri)
    try:
        readers = [await open_reader(server.port, "ooo") for _ in range(2)]
        assert [only_event(tape(r))["seq"] for r in readers] == [0, 0]
        b_cur, a_cur = b.cursor(), a.cursor()
        b_cur.execute("SELECT txid_current()")  # B's transaction begins first ...
        a_cur.execute(f"SELECT {schema}.send('ooo', 'a')")  # ... A sends first and holds
        assert a_cur.fetchone()[0] == 1
        b_pid = b.get_backend_pid()

        def b_sends() -> int:
            b_cur.execute(f"SELECT {schema}.send('ooo', 'b')")
            seq = b_cur.fetchone()[0]
            b.commit()
            return int(seq)

        b_done = threads.deferToThread(b_sends)
        # B waits for the head row's lock, held by A's open transaction.
        await until(lambda: db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                       (b_pid,)) == [("Lock",)], "B waits on the head row lock")
        assert not b_done.called
        a.commit()  # A commits first, then B (which only now gets its number)
        assert await wait(b_done) == 2
        assert send(db, schema, "ooo", "z") == 3  # a later message: the barrier
        for r in readers:
            t = await until_seq(r, "ooo", 3)
            assert t.pairs("ooo") == [(1, "a"), (2, "b"), (3, "z")]
            assert t.plain == [] and t.anomalies == [] and t.controls == []
        assert committed_rows(db, schema, "ooo") == [(1, "a"), (2, "b"), (3, "z")]
    finally:
        a.close()
        b.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_reader_opens_while_a_producer_holds_the_channels_head(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    holder = psycopg2.connect(db_uri)
    opening = None
    try:
        assert send(db, schema, "held", "m1") == 1  # the head row exists, committed
        cur = holder.cursor()
        cur.execute(f"SELECT {schema}.send('held', 'm2')")  # and a producer holds it
        assert cur.fetchone()[0] == 2

        opening = defer.ensureDeferred(open_reader(server.port, "held"))
        await until(lambda: opening.called or lock_waits(db, server),
                    "the reader opens, or pgws waits for the producer's lock")
        waiting = lock_waits(db, server)
        print(f"\nreader open: {opening.called}; pgws sessions waiting for a lock: {waiting}")
        assert waiting == 0
        reader = await wait(opening)
        assert only_event(tape(reader))["seq"] == 1  # what is committed
        holder.commit()
        t = await until_seq(reader, "held", 2)
        assert t.pairs("held") == [(2, "m2")]
    finally:
        holder.close()  # rolls back if still open: pgws goes on
        if opening is not None:
            opening.addErrback(lambda f: None)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_producer_holding_one_channels_head_does_not_stop_readers_of_another(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, db_pool="1")
    holder = psycopg2.connect(db_uri)
    opening = None
    try:
        assert send(db, schema, "held", "m1") == 1
        holder.cursor().execute(f"SELECT {schema}.send('held', 'm2')")  # held open
        opening = defer.ensureDeferred(open_reader(server.port, "held"))
        await until(lambda: opening.called or lock_waits(db, server),
                    "the reader of the held channel opens, or pgws waits for the lock")
        try:
            other = await open_reader(server.port, "other")
        except ConnectionError as e:
            raise AssertionError(f"a reader of another channel could not open: {e}") from None
        assert only_event(tape(other))["seq"] == 0
    finally:
        holder.close()
        if opening is not None:
            opening.addErrback(lambda f: None)
        await server.stop()


def lock_waits(db: Db, server: Server) -> int:
    """How many of C{server}'s database sessions wait for a lock."""
    return int(db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                          "AND wait_event_type = 'Lock'", (server.application_name + " %",))[0][0])


MIX_CHANNELS = ("mix1", "mix2", "mix3")


class Roamer:
    """
    A reader that disconnects (cleanly or by dropping the TCP connection) at random moments and
    resumes from its last complete position and epoch, until told to finish; then it resumes
    once more and stays until it has the head.  L{start} opens its first session (from seq 0:
    before any message is sent).
    """

    def __init__(self, name: str, port: int, channel: str, seed: int) -> None:
        self.name = name
        self.port = port
        self.channel = channel
        self.rng = random.Random(seed)
        self.received: list[tuple[int, str]] = []
        self.epoch: str | None = None
        self.sessions = 0
        self.not_recovered: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.log: list[str] = []  # each session: from where, its event, what came, how it ended
        self._client: Client | None = None

    @property
    def last(self) -> int:
        return self.received[-1][0] if self.received else 0

    async def _open(self) -> tuple[Client, dict[str, Any]]:
        resume = None if self.epoch is None else {self.channel: [self.last, self.epoch]}
        client = await open_reader(self.port, self.channel, resume=resume)
        self.sessions += 1
        event = only_event(tape(client))
        if resume is None:
            self.epoch = event["epoch"]
            if event["seq"] != 0:
                self.problems.append(f"first open at seq {event['seq']}")
        elif event.get("recovered") is not True or event["epoch"] != self.epoch:
            self.not_recovered.append(event)
        return client, event

    async def start(self) -> None:
        self._client, _ = await self._open()

    async def session(self, stay: Callable[[Client], Any]) -> None:
        start = self.last
        if self._client is not None:
            client, self._client = self._client, None
            event = only_event(tape(client))
        else:
            client, event = await self._open()
        await stay(client)
        clean = self.rng.random() < 0.5
        if clean:
            client.close()
        else:
            assert client.proto is not None
            tcp(client.proto).abortConnection()
        await wait(client.closed)
        t = tape(client)
        self.problems.extend(t.anomalies)
        if t.plain or t.controls:
            self.problems.append(f"unexpected frames {t.plain!r} {t.controls!r}")
        seqs = t.seqs(self.channel)
        self.log.append(f"after {start}: event seq {event['seq']} recovered "
                        f"{event.get('recovered')}, got {seqs[:1]}..{seqs[-1:]} ({len(seqs)}), "
                        f"{'closed' if clean else 'dropped'}")
        self.received.extend(t.pairs(self.channel))

    async def roam(self, finished: threading.Event) -> None:
        while not finished.is_set():
            async def random_stay(client: Client) -> None:
                await sleep(self.rng.uniform(0.005, 0.2))

            await self.session(random_stay)
            await sleep(self.rng.uniform(0, 0.05))

    async def finish(self, final_head: int) -> None:
        async def to_the_head(client: Client) -> None:
            await until(lambda: (self.received + tape(client).pairs(self.channel) or [(0, "")])
                        [-1][0] >= final_head, f"{self.name} reaches #{final_head}", timeout=30)

        await self.session(to_the_head)


def mixed_producer(schema: str, seed: int) -> Callable[[Any, int], tuple[list[tuple[str, str]], bool]]:
    """One or two of MIX_CHANNELS per transaction, random small delays, ~10% rolled back."""
    rng = random.Random(seed)

    def work(cur: Any, index: int) -> tuple[list[tuple[str, str]], bool]:
        # Several channels in a transaction: always in the same order (no deadlock).
        channels = sorted(rng.sample(MIX_CHANNELS, rng.choice((1, 1, 1, 2))))
        sent = []
        for ch in channels:
            payload = f"p{seed}.{index}.{ch}." + "x" * rng.randrange(0, 300)
            cur.execute(f"SELECT {schema}.send(%s, %s)", (ch, payload))
            sent.append((ch, payload))
            time.sleep(rng.uniform(0, 0.003))  # the head row stays locked meanwhile
        return sent, rng.random() >= 0.1

    return work


def check_readers(db: Db, schema: str, channel: str, committed: list[tuple[str, str]],
                  readers: list[tuple[str, list[tuple[int, str]], int, list[str]]]) -> None:
    """The table holds exactly the committed messages, densely; every reader got exactly them."""
    rows = committed_rows(db, schema, channel)
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert sorted(p for _, p in rows) == sorted(p for c, p in committed if c == channel)
    for name, got, sessions, log in readers:
        missing, duplicated = counts(rows, got)
        print(f"  {name}: {len(got)} received of {len(rows)} in {sessions} sessions, "
              f"{missing} missing, {duplicated} duplicated")
        if got != rows:
            seqs = [seq for seq, _ in got]
            print(f"    missing {sorted(set(range(1, len(rows) + 1)) - set(seqs))}")
            print("\n".join("    " + line for line in log))
        assert (missing, duplicated) == (0, 0)
        assert got == rows


@pytest_twisted.ensureDeferred
async def test_concurrent_producers_with_rollbacks_and_roaming_readers_lose_nothing(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        # mix3 has only roaming readers: its stream is dropped and followed anew again and again.
        steady = {ch: await open_reader(server.port, ch) for ch in MIX_CHANNELS[:2]}
        roamers = [Roamer(f"{ch}/{i}", server.port, ch, seed=100 * n + i)
                   for n, ch in enumerate(MIX_CHANNELS) for i in range(3)]
        for r in roamers:
            await r.start()
        producers = [Producer(db_uri, mixed_producer(schema, seed), count=80, pause=0.004)
                     for seed in range(8)]
        finished = threading.Event()
        started = time.monotonic()
        roaming = [defer.ensureDeferred(r.roam(finished)) for r in roamers]
        for p in producers:
            p.start()
        await until(lambda: not any(p.is_alive() for p in producers), "the producers finish",
                    timeout=120)
        finished.set()
        await wait(defer.gatherResults(roaming, consumeErrors=True), timeout=30)
        heads = {ch: head(db, schema, ch) for ch in MIX_CHANNELS}
        await wait(defer.gatherResults([defer.ensureDeferred(r.finish(heads[r.channel]))
                                        for r in roamers], consumeErrors=True), timeout=60)
        for ch, client in steady.items():
            await until_seq(client, ch, heads[ch], timeout=30)
        elapsed = time.monotonic() - started

        assert [e for p in producers for e in p.errors] == []
        committed = [m for p in producers for m in p.committed]
        rolled_back = [m for p in producers for m in p.rolled_back]
        print(f"\n{len(committed)} messages committed, {len(rolled_back)} rolled back, "
              f"{elapsed:.1f} s; heads {heads}")
        for ch in MIX_CHANNELS:
            named: list[tuple[str, list[tuple[int, str]], int, list[str]]] = []
            if ch in steady:
                named.append((f"{ch}/steady", tape(steady[ch]).pairs(ch), 1, []))
            check_readers(db, schema, ch, committed, named + [
                (r.name, r.received, r.sessions, r.log) for r in roamers if r.channel == ch])
        for r in roamers:
            assert r.not_recovered == [] and r.problems == [], (r.name, r.not_recovered, r.problems)
        assert sum(r.sessions for r in roamers) >= 2 * len(roamers)
        assert rolled_back and not set(rolled_back) & set(committed)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_one_transaction_of_many_messages_and_a_batch_reach_readers_whole(db_uri, db: Db,
                                                                               schema):
    limit = 100_000
    server = await journal_server(db_uri, schema, journal_max_payload=str(limit))
    try:
        reader = await open_reader(server.port, "many")
        # 2500 messages, one transaction: one wake-up, read in several batches.
        db.execute(f"SELECT {schema}.send('many', 'm' || i) FROM generate_series(1, 2500) AS i")
        t = await until_seq(reader, "many", 2500, timeout=30)
        assert t.pairs("many") == [(i, f"m{i}") for i in range(1, 2501)]
        # send(channel, payloads[]): a batch in one call, numbered in its order.
        rows = db.execute(f"SELECT {schema}.send('many', %s::text[])", (["b1", "b2", "b3"],))
        assert rows == [(2503,)]
        with pytest.raises(psycopg2.Error, match="journal-max-payload is 100000"):
            db.execute(f"SELECT {schema}.send('many', %s::text[])", (["ok", "x" * (limit + 1)],))
        assert send(db, schema, "many", "after") == 2504  # the barrier: the refused batch left nothing
        t = await until_seq(reader, "many", 2504)
        assert t.pairs("many")[2500:] == [(2501, "b1"), (2502, "b2"), (2503, "b3"), (2504, "after")]
        assert len(t.rows) == 2504 and t.anomalies == [] and t.plain == []
    finally:
        await server.stop()


# -- large payloads and the limit --------------------------------------------------------------------

BIG_LIMIT = 8 * 1024 * 1024


def big_text(size: int, seed: int, json_escaped: bool = True) -> str:
    """
    C{size} bytes of varied UTF-8 (1-, 2-, 3- and 4-byte characters); with C{json_escaped}
    false, none that JSON escapes (an envelope is then the text's size plus the envelope's).
    """
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 üéß✓€😀" + ("\"\\\n\t" if json_escaped else "")
    chars = [rng.choice(alphabet) for _ in range(4096)]
    chunk = "".join(chars)
    repeat = size // len(chunk.encode())
    parts, left = [chunk] * repeat, size - repeat * len(chunk.encode())
    for c in chars:
        if len(c.encode()) > left:
            break
        parts.append(c)
        left -= len(c.encode())
    return "".join(parts) + "." * left


@pytest_twisted.ensureDeferred
async def test_a_5_mb_payload_reaches_readers_byte_for_byte(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_max_payload=str(BIG_LIMIT))
    try:
        positioned = await open_reader(server.port, "big")
        plain = await ws_connect(server.port, reader_path("big"))  # no subprotocol
        payload = big_text(5_000_000, seed=1)
        assert len(payload.encode()) == 5_000_000
        started = time.monotonic()
        assert send(db, schema, "big", payload) == 1
        t = await until_seq(positioned, "big", 1, timeout=30)
        await until(lambda: plain.messages.pending, "the plain reader gets it", timeout=30)
        print(f"\n5 MB payload delivered in {time.monotonic() - started:.2f} s")
        [(seq, got)] = t.pairs("big")
        assert digest(got) == digest(payload)
        assert got == payload
        assert [digest(p) for p in plain.messages.pending] == [digest(payload)]
        [(_, stored)] = committed_rows(db, schema, "big")
        assert stored == payload
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_message_close_to_journal_max_payload_is_journaled(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_max_payload=str(BIG_LIMIT))
    try:
        reader = await open_reader(server.port, "bigw")
        writer = await ws_connect(server.port, reader_path("bigw", mode="w"))
        text = big_text(BIG_LIMIT - 300, seed=2, json_escaped=False)  # the envelope adds under 300 bytes
        writer.send(text)
        await until(lambda: tape(reader).last("bigw") >= 1 or writer.closed.called,
                    "the message reaches the reader", timeout=30)
        assert not writer.closed.called, writer.closed.result
        t = tape(reader)
        [(seq, envelope)] = t.pairs("bigw")
        size = len(envelope.encode())
        print(f"\nclient message of {len(text.encode())} bytes, envelope {size} bytes, limit "
              f"{BIG_LIMIT}")
        assert BIG_LIMIT - 300 < size <= BIG_LIMIT
        decoded = json.loads(envelope)
        assert (decoded["event"], decoded["channel"]) == ("WebsocketMessage", "bigw")
        assert digest(decoded["payload"]) == digest(text)
        # A few bytes more and the envelope is over the limit: the socket is closed (1009).
        writer.send(text + "y" * 300)
        code, reason = await wait(writer.closed, timeout=30)
        assert code == 1009 and "journal-max-payload" in reason, (code, reason)
        assert send(db, schema, "bigw", "after") == 2  # barrier: nothing came between
        t = await until_seq(reader, "bigw", 2)
        assert [seq for seq, _ in t.pairs("bigw")] == [1, 2] and t.pairs("bigw")[1][1] == "after"
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_over_limit_payload_is_refused_in_the_producers_transaction(db_uri, db: Db,
                                                                              schema):
    limit = 100_000
    server = await journal_server(db_uri, schema, journal_max_payload=str(limit))
    try:
        reader = await open_reader(server.port, "lim")
        assert send(db, schema, "lim", "x" * limit) == 1  # exactly the limit: taken
        with pytest.raises(psycopg2.Error) as refused:
            send(db, schema, "lim", "x" * (limit + 1))
        message = str(refused.value)
        print(f"\nrefused: {message.splitlines()[0]}")
        assert "journal-max-payload" in message and f"{limit + 1} bytes" in message
        assert refused.value.pgcode == "54000"  # program_limit_exceeded
        # Refused inside a producer's own transaction: it fails, nothing of it is kept.
        conn = psycopg2.connect(db_uri)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT {schema}.send('lim', 'in the same transaction')")
                with pytest.raises(psycopg2.Error, match="journal-max-payload"):
                    cur.execute(f"SELECT {schema}.send('lim', %s)", ("é" * (limit // 2 + 1),))
            conn.rollback()
        finally:
            conn.close()
        assert send(db, schema, "lim", "small") == 2  # the barrier
        t = await until_seq(reader, "lim", 2)
        assert [(seq, len(p)) for seq, p in t.pairs("lim")] == [(1, limit), (2, 5)]
        assert t.plain == [] and t.anomalies == []
        assert [seq for seq, _ in committed_rows(db, schema, "lim")] == [1, 2]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_consecutive_payloads_at_journal_max_payload_reach_a_prompt_reader(
        db_uri, db: Db, schema, tmp_path):
    # pgws in its own process (twistd): the readers here read as fast as they can.
    server, port = await twistd_journal(tmp_path, db_uri, schema)
    try:
        positioned = await open_when_ready(port, "maxes")
        plain = await ws_connect(port, reader_path("maxes"))
        payload = big_text(4 * 1024 * 1024, seed=4)  # the default journal-max-payload
        count = 4
        for _ in range(count):
            send(db, schema, "maxes", payload)

        def settled(client: Client, got: int) -> bool:
            return got >= count or client.closed.called

        await until(lambda: settled(positioned, len(tape(positioned).rows))
                    and settled(plain, len(plain.messages.pending)), "both readers settle",
                    timeout=60)
        slow = [line for line in server.text().splitlines() if "reads too slowly" in line]
        print(f"\npositioned reader got {tape(positioned).seqs('maxes')}, closed "
              f"{positioned.closed.called}; plain reader got {len(plain.messages.pending)}, "
              f"closed {plain.closed.called}")
        print("\n".join(slow))
        assert slow == []
        assert not positioned.closed.called and not plain.closed.called
        assert tape(positioned).seqs("maxes") == list(range(1, count + 1))
        assert all(p == payload for _, p in tape(positioned).pairs("maxes"))
        assert len(plain.messages.pending) == count
    finally:
        await server.terminate()


# -- history, resume, retention -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_history_gives_the_last_messages_then_live(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        for i in range(1, 11):
            send(db, schema, "hist", f"m{i}")
        reader = await open_reader(server.port, "hist", history=3)
        event = only_event(tape(reader))
        assert {k: v for k, v in event.items() if k != "epoch"} == \
            {"event": "stream", "channel": "hist", "seq": 10}
        send(db, schema, "hist", "m11")
        t = await until_seq(reader, "hist", 11)
        assert t.pairs("hist") == [(8, "m8"), (9, "m9"), (10, "m10"), (11, "m11")]
        assert t.kinds == ["event"] + ["position", "text"] * 4
    finally:
        await server.stop()


async def epoch_after(server: Server, db: Db, schema: str, channel: str, count: int) -> tuple[str, Client]:
    """A reader from the start; C{count} messages sent and received: (epoch, reader)."""
    reader = await open_reader(server.port, channel)
    epoch = only_event(tape(reader))["epoch"]
    for i in range(1, count + 1):
        send(db, schema, channel, f"m{i}")
    await until_seq(reader, channel, count)
    return epoch, reader


@pytest_twisted.ensureDeferred
async def test_resume_from_behind_retention_is_not_recovered_and_replays_nothing(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_retention_count="5")
    try:
        epoch, _ = await epoch_after(server, db, schema, "ret", 20)
        assert await journal_of(server).prune() == 15
        assert [seq for seq, _ in committed_rows(db, schema, "ret")] == [16, 17, 18, 19, 20]
        late = await open_reader(server.port, "ret", resume={"ret": [2, epoch]})
        assert only_event(tape(late)) == {"event": "stream", "channel": "ret", "epoch": epoch,
                                          "seq": 20, "recovered": False}
        send(db, schema, "ret", "m21")  # barrier: nothing may come before it
        t = await until_seq(late, "ret", 21)
        assert t.pairs("ret") == [(21, "m21")]
        assert t.kinds == ["event", "position", "text"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resume_within_retention_replays_exactly_what_is_missing(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_retention_count="5")
    try:
        epoch, _ = await epoch_after(server, db, schema, "ret", 20)
        await journal_of(server).prune()
        late = await open_reader(server.port, "ret", resume={"ret": [15, epoch]})
        assert only_event(tape(late))["recovered"] is True
        send(db, schema, "ret", "m21")
        t = await until_seq(late, "ret", 21)
        assert t.pairs("ret") == [(i, f"m{i}") for i in range(16, 22)]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resume_with_a_wrong_epoch_is_not_recovered(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        epoch, _ = await epoch_after(server, db, schema, "ep", 5)
        wrong = "0" * 32 if epoch != "0" * 32 else "1" * 32
        late = await open_reader(server.port, "ep", resume={"ep": [2, wrong]})
        assert only_event(tape(late)) == {"event": "stream", "channel": "ep", "epoch": epoch,
                                          "seq": 5, "recovered": False}
        send(db, schema, "ep", "m6")
        t = await until_seq(late, "ep", 6)
        assert t.pairs("ep") == [(6, "m6")]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resume_at_the_head_is_recovered_and_replays_nothing(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        epoch, _ = await epoch_after(server, db, schema, "hd", 7)
        late = await open_reader(server.port, "hd", resume={"hd": [7, epoch]})
        assert only_event(tape(late)) == {"event": "stream", "channel": "hd", "epoch": epoch,
                                          "seq": 7, "recovered": True}
        send(db, schema, "hd", "m8")
        t = await until_seq(late, "hd", 8)
        assert t.pairs("hd") == [(8, "m8")]
        assert t.kinds == ["event", "position", "text"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_one_socket_resumes_two_channels_each_from_its_own_position(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        claims = {"channels": ["two1", "two2"]}
        first = await open_reader(server.port, None, claims=claims, events=2)
        epochs = {e["channel"]: e["epoch"] for e in tape(first).events}
        assert sorted(epochs) == ["two1", "two2"] and epochs["two1"] != epochs["two2"]
        for i in range(1, 6):
            send(db, schema, "two1", f"a{i}")
            send(db, schema, "two2", f"b{i}")
        await until_seq(first, "two2", 5)
        again = await open_reader(server.port, None, claims=claims, events=2, resume={
            "two1": [4, epochs["two1"]], "two2": [1, epochs["two2"]]})
        assert sorted((e["channel"], e["recovered"], e["seq"]) for e in tape(again).events) == \
            [("two1", True, 5), ("two2", True, 5)]
        send(db, schema, "two1", "a6")
        send(db, schema, "two2", "b6")
        await until_seq(again, "two1", 6)
        t = await until_seq(again, "two2", 6)
        assert t.pairs("two1") == [(5, "a5"), (6, "a6")]
        assert t.pairs("two2") == [(i, f"b{i}") for i in range(2, 7)]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_reader_moves_to_another_pgws_of_the_same_journal(db_uri, db: Db, schema):
    one = await journal_server(db_uri, schema)
    other = await journal_server(db_uri, schema)
    try:
        epoch, reader = await epoch_after(one, db, schema, "move", 4)
        reader.close()
        await wait(reader.closed)
        moved = await open_reader(other.port, "move", resume={"move": [4, epoch]})
        assert only_event(tape(moved)) == {"event": "stream", "channel": "move", "epoch": epoch,
                                           "seq": 4, "recovered": True}
        send(db, schema, "move", "m5")
        t = await until_seq(moved, "move", 5)
        assert t.pairs("move") == [(5, "m5")]
    finally:
        await one.stop()
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_resume_after_the_journal_was_recreated_is_not_recovered(db_uri, db: Db, schema):
    first = await journal_server(db_uri, schema)
    try:
        epoch, _ = await epoch_after(first, db, schema, "again", 3)
    finally:
        await first.stop()
    drop_schema(db_uri, schema)
    second = await journal_server(db_uri, schema)  # a new journal: new epochs, seqs from 1
    try:
        assert send(db, schema, "again", "new 1") == 1
        late = await open_reader(second.port, "again", resume={"again": [3, epoch]})
        event = only_event(tape(late))
        assert event["epoch"] != epoch
        assert {k: v for k, v in event.items() if k != "epoch"} == {
            "event": "stream", "channel": "again", "seq": 1, "recovered": False}
        assert send(db, schema, "again", "new 2") == 2
        t = await until_seq(late, "again", 2)
        assert t.pairs("again") == [(2, "new 2")]
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_retention_keeps_the_table_bounded(db_uri, db: Db, schema):
    keep, sent = 100, 5000
    server = await journal_server(db_uri, schema, journal_retention_count=str(keep))
    try:
        def size() -> int:
            return int(db.execute(f"SELECT pg_total_relation_size('{schema}.messages')")[0][0])

        empty = size()
        sizes = []
        for round_ in range(3):
            for ch in ("bound1", "bound2"):
                db.execute(f"SELECT {schema}.send(%s, 'payload ' || i || repeat('r', 100)) "
                           "FROM generate_series(1, %s) AS i", (ch, sent))
            before = size()
            deleted = await journal_of(server).prune()
            pruned = size()
            db.execute(f"VACUUM {schema}.messages")
            after = size()
            rows = dict(db.execute(f"SELECT channel, count(*) FROM {schema}.messages "
                                   "GROUP BY channel"))
            sizes.append((before, after))
            print(f"\nround {round_ + 1}: {sent} sent per channel, {deleted} pruned, rows per "
                  f"channel {rows}, pg_total_relation_size {before} before pruning, {pruned} after, "
                  f"{after} after VACUUM (empty: {empty})")
            assert deleted == 2 * sent - (2 * keep if round_ == 0 else 0)
            assert rows == {"bound1": keep, "bound2": keep}
            for ch in ("bound1", "bound2"):
                h = head(db, schema, ch)
                assert h == sent * (round_ + 1)
                assert [s for s, _ in committed_rows(db, schema, ch)] == \
                    list(range(h - keep + 1, h + 1))
        # Space freed by pruning is reused: the table does not grow with every round (kept
        # unpruned, round 3 would hold three times round 1's rows).
        assert sizes[2][0] <= sizes[0][0] * 1.6, sizes
    finally:
        await server.stop()


# -- migration ------------------------------------------------------------------------------------------


def relations(db: Db, schema: str) -> dict[str, int]:
    return dict(db.execute("SELECT c.relname, c.oid::bigint FROM pg_class c JOIN pg_namespace n "
                           "ON n.oid = c.relnamespace WHERE n.nspname = %s", (schema,)))


@pytest_twisted.ensureDeferred
async def test_migrating_twice_is_a_no_op(db_uri, db: Db, schema):
    first = await journal_server(db_uri, schema)
    try:
        epoch, _ = await epoch_after(first, db, schema, "mig", 3)
    finally:
        await first.stop()
    before = relations(db, schema)
    streams = db.execute(f"SELECT channel, epoch, head FROM {schema}.streams")
    second = await journal_server(db_uri, schema)
    try:
        assert db.execute(f"SELECT version FROM {schema}.version") == [(1,)]
        assert relations(db, schema) == before  # nothing dropped and made again
        assert db.execute(f"SELECT channel, epoch, head FROM {schema}.streams") == streams
        assert committed_rows(db, schema, "mig") == [(1, "m1"), (2, "m2"), (3, "m3")]
        # The same journal: a reader of the first server resumes on the second one.
        reader = await open_reader(second.port, "mig", resume={"mig": [1, epoch]})
        assert only_event(tape(reader))["recovered"] is True
        send(db, schema, "mig", "m4")
        t = await until_seq(reader, "mig", 4)
        assert t.pairs("mig") == [(2, "m2"), (3, "m3"), (4, "m4")]
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_servers_starting_at_once_migrate_one_at_a_time(db_uri, db: Db, schema):
    servers = await wait(defer.gatherResults(
        [defer.ensureDeferred(journal_server(db_uri, schema)) for _ in range(3)]), timeout=40)
    try:
        assert db.execute(f"SELECT version FROM {schema}.version") == [(1,)]
        assert all(s.relay.journal.migrated for s in servers)
    finally:
        for s in servers:
            await s.stop()


@pytest_twisted.ensureDeferred
async def test_a_newer_journal_schema_is_refused_with_one_clear_line(db_uri, db: Db, schema,
                                                                      tmp_path):
    from test_twistd import Twistd

    from support import SECRET

    made = await journal_server(db_uri, schema)
    await made.stop()
    db.execute(f"UPDATE {schema}.version SET version = 99")
    before = relations(db, schema)
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--journal", "true", "--journal-schema", schema,
                    env={"PGWS_JWT_SECRET": SECRET})
    started = time.monotonic()
    code = await server.terminate(timeout=60, signal_it=False)
    log = server.text()
    print(f"\ntwistd exited {code} after {time.monotonic() - started:.1f} s")
    assert code == 1, log
    lines = [line for line in log.splitlines() if "upgrade pgws" in line]
    print("\n".join(lines))
    assert len(lines) == 1, log
    assert "version 99" in lines[0] and schema in lines[0]
    assert "Traceback" not in log
    assert db.execute(f"SELECT version FROM {schema}.version") == [(99,)]
    assert relations(db, schema) == before


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_while_the_journal_is_not_migrated(db_uri, db: Db, schema):
    from support import http_request

    async def readyz() -> tuple[int, bytes]:
        answer = await http_request(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n"
                                                 b"Connection: close\r\n\r\n")
        return answer.status, answer.body

    first = await journal_server(db_uri, schema)
    await first.stop()
    locker = psycopg2.connect(db_uri)
    try:
        # The next migration reads the version table: it waits behind this lock.
        locker.cursor().execute(f"LOCK TABLE {schema}.version IN ACCESS EXCLUSIVE MODE")
        server = await start_server(db_uri, journal="true", journal_schema=schema)
        try:
            await until(lambda: lock_waits(db, server), "the migration waits for the lock")
            refused = await handshake(server.port, reader_path("rz"))
            ready = await readyz()
            print(f"\nhandshake {refused.status}, /readyz {ready}")
            assert (refused.status, refused.text) == (
                503, "the database is unavailable; try again later\n")
            assert ready == (503, b"the journal schema is not ready yet\n")
            locker.rollback()  # the migration goes on: then both answer
            await until(lambda: journal_of(server).migrated, "the journal is migrated")
            assert await readyz() == (200, b"ready\n")
            reader = await open_reader(server.port, "rz")
            assert only_event(tape(reader))["seq"] == 0
        finally:
            await server.stop()
    finally:
        locker.close()


# -- the plain paths beside the journal -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_notify_on_a_journaled_channel_still_reaches_readers(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    try:
        reader = await open_reader(server.port, "pn")
        db.notify("pn", "plain hello")
        await until(lambda: tape(reader).plain, "the plain notification")
        assert send(db, schema, "pn", "journaled") == 1
        t = await until_seq(reader, "pn", 1)
        assert t.plain == ["plain hello"]
        assert t.pairs("pn") == [(1, "journaled")]
        # The plain one is a text frame with no position frame before it.
        assert t.kinds == ["event", "text", "position", "text"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_without_the_subprotocol_gets_plain_text_frames_only(db_uri, db: Db,
                                                                            schema):
    server = await journal_server(db_uri, schema)
    try:
        seed = await ws_connect(server.port, reader_path("seedc"))
        assert seed.proto is not None and seed.proto.websocket_protocol_in_use is None
        send(db, schema, "seedc", "a")
        send(db, schema, "seedc", "b")
        await until(lambda: len(seed.messages.pending) >= 2, "a and b")
        db.notify("seedc", "c (plain)")
        await until(lambda: len(seed.messages.pending) >= 3, "c")
        send(db, schema, "seedc", "d")
        await until(lambda: len(seed.messages.pending) >= 4, "d")
        assert list(seed.messages.pending) == ["a", "b", "c (plain)", "d"]
        assert all(isinstance(m, str) for m in seed.messages.pending)
        # Resume and history need the subprotocol (a seed client would not understand them).
        refused = await handshake(server.port, reader_path("seedc", history=2))
        assert (refused.status, refused.text) == (400, "resume and history need the pgws "
                                                       "subprotocol\n")
    finally:
        await server.stop()
