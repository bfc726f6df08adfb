"""
The journal under faults, against a real PostgreSQL: the LISTEN session killed mid-stream, and
pgws itself restarted (twistd, SIGTERM) mid-stream, each while a producer keeps sending.  The
verdict is always the reader's list against the table's rows: 0 lost, 0 duplicated, in order.
"""

from __future__ import annotations

import signal
import threading
import time
from functools import partial
from typing import Any

import psycopg2
import pytest_twisted
from test_journal import (
    Producer,
    committed_rows,
    counts,
    head,
    journal_server,
    only_event,
    open_reader,
    open_when_ready,
    schema_fixture,  # noqa: F401  (the fixture "schema")
    send,
    tape,
    twistd_journal,
    until_seq,
)

from support import Db, until, wait


def steady_producer(db_uri: str, schema: str, channel: str, stop: threading.Event,
                    pause: float = 0.002) -> Producer:
    """Sends m<i> to C{channel}, one transaction each, until C{stop}."""
    def work(cur: Any, index: int) -> tuple[list[tuple[str, str]], bool]:
        payload = f"m{index}"
        cur.execute(f"SELECT {schema}.send(%s, %s)", (channel, payload))
        return [(channel, payload)], True

    return Producer(db_uri, work, count=10**9, stop=stop, pause=pause)


async def stop_producer(producer: Producer, stop: threading.Event) -> None:
    stop.set()
    await until(lambda: not producer.is_alive(), "the producer stops")
    assert producer.errors == []


@pytest_twisted.ensureDeferred
async def test_killed_listen_session_loses_and_duplicates_nothing_for_journaled_readers(
        db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema, journal_channels="fj*")
    stop = threading.Event()
    producer = steady_producer(db_uri, schema, "fj1", stop)
    try:
        live = await open_reader(server.port, "fj1")
        # A socket that also reads a plain channel: it is told of the gap (the control).
        mixed = await open_reader(server.port, None, claims={"channels": ["fj1", "plain"]})
        producer.start()
        down = 0
        for kill in range(1, 4):  # three times, each in the middle of the stream
            await until_seq(live, "fj1", head(db, schema, "fj1") + 30)
            assert server.terminate_listener(db) == 1
            at_kill = head(db, schema, "fj1")
            await until(partial(lambda n: server.relay.listener.sessions > n, kill),
                        "the LISTEN session is back", timeout=30)
            down += head(db, schema, "fj1") - at_kill
        await stop_producer(producer, stop)
        final = head(db, schema, "fj1")
        await until_seq(live, "fj1", final, timeout=30)
        await until_seq(mixed, "fj1", final, timeout=30)
        rows = committed_rows(db, schema, "fj1")
        got = tape(live).pairs("fj1")
        missing, duplicated = counts(rows, got)
        print(f"\n{len(rows)} committed ({down} while the LISTEN session was down, 3 times), "
              f"{len(got)} received, {missing} missing, {duplicated} duplicated; gap messages: "
              f"{len(tape(live).controls)} journaled-only, {len(tape(mixed).controls)} mixed")
        assert [seq for seq, _ in rows] == list(range(1, final + 1))
        assert (missing, duplicated) == (0, 0)
        assert got == rows
        # Everything after the recovery came after the gap message would have: no gap for it.
        assert tape(live).controls == [] and tape(live).plain == []
        assert [c["event"] for c in tape(mixed).controls] == ["gap"] * 3
        assert tape(mixed).pairs("fj1") == rows
    finally:
        stop.set()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_reader_resuming_after_a_pgws_restart_gets_everything_once(db_uri, db: Db, schema,
                                                                          tmp_path):
    stop = threading.Event()
    producer = steady_producer(db_uri, schema, "rs", stop, pause=0.003)
    first, port = await twistd_journal(tmp_path / "first", db_uri, schema)
    second = None
    try:
        reader = await open_when_ready(port, "rs")
        event = only_event(tape(reader))
        assert event["seq"] == 0
        epoch = event["epoch"]
        producer.start()
        await until_seq(reader, "rs", 100)
        first.proc.send_signal(signal.SIGTERM)
        assert await wait(reader.closed, 20) == (1001, "server shutting down")
        assert await first.terminate(signal_it=False) == 0
        at_stop = head(db, schema, "rs")
        before = tape(reader).pairs("rs")
        restarted = time.monotonic()
        second, port = await twistd_journal(tmp_path / "second", db_uri, schema)
        resumed = await open_when_ready(port, "rs", resume={"rs": [before[-1][0], epoch]})
        down = time.monotonic() - restarted
        at_resume = head(db, schema, "rs")
        event = only_event(tape(resumed))
        assert (event["recovered"], event["epoch"]) == (True, epoch)
        await until(lambda: head(db, schema, "rs") >= at_resume + 100, "100 more after it")
        await stop_producer(producer, stop)
        final = head(db, schema, "rs")
        await until_seq(resumed, "rs", final, timeout=30)
        after = tape(resumed).pairs("rs")
        got = before + after
        rows = committed_rows(db, schema, "rs")
        missing, duplicated = counts(rows, got)
        print(f"\n{len(rows)} committed ({at_resume - at_stop} while pgws restarted, "
              f"{down:.1f} s), {len(before)} received before the restart, {len(after)} after "
              f"the resume from #{before[-1][0]}, {missing} missing, {duplicated} duplicated")
        assert [seq for seq, _ in rows] == list(range(1, final + 1))
        assert (missing, duplicated) == (0, 0)
        assert got == rows
        assert tape(resumed).controls == [] and tape(resumed).plain == []
    finally:
        stop.set()
        if second is not None:
            assert await second.terminate() == 0
        if first.proc.poll() is None:
            await first.terminate()



@pytest_twisted.ensureDeferred
async def test_a_resume_whose_query_fails_is_not_a_silent_gap(db_uri, db: Db, schema):
    server = await journal_server(db_uri, schema)
    locker = psycopg2.connect(db_uri)
    try:
        first = await open_reader(server.port, "rf")  # keeps the stream followed
        epoch = only_event(tape(first))["epoch"]
        for i in range(1, 11):
            send(db, schema, "rf", f"m{i}")
        await until_seq(first, "rf", 10)
        # The resume's queries wait behind this lock; the one that waits is then terminated.
        locker.cursor().execute(f"LOCK TABLE {schema}.messages IN ACCESS EXCLUSIVE MODE")
        resumed = await open_reader(server.port, "rf", resume={"rf": [3, epoch]}, events=0)
        blocked = await until(lambda: db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND "
            "wait_event_type = 'Lock'", (server.application_name + " notify",)),
            "the resume's query waits for the lock")
        # The live read of the first reader may wait behind the lock too: it retries.
        assert len(blocked) >= 1
        for (pid,) in blocked:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        locker.commit()
        send(db, schema, "rf", "m11")
        # The failed query's error may come before or after m11 is fanned out: the stream event
        # says where live messages follow (10, or 11 with m11 counted as missed).
        await until(lambda: len(tape(resumed).events) == 1, "the resumed reader's stream event")
        send(db, schema, "rf", "m12")  # the barrier: nothing else may come before it
        t = await until_seq(resumed, "rf", 12)
        print(f"\nafter the failed query: events {t.events}, rows {[s for s, _ in t.pairs('rf')]}")
        # Either replayed (recovered: true, 4 to 12), or told (recovered: false), never neither.
        assert t.kinds[0] == "event"
        [event] = t.events
        expected = range(4, 13) if event["recovered"] else range(event["seq"] + 1, 13)
        assert t.seqs("rf") == list(expected)
    finally:
        locker.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_wake_up_with_nothing_new_reads_once_and_stops(db_uri, db: Db, schema):
    # A stray NOTIFY on the wake-up channel (or one whose rows were pruned before they were
    # read): one read finds nothing, and the read loop ends (an earlier wake-up format made
    # it query back to back for ever).
    server = await journal_server(db_uri, schema)
    journal = server.relay.journal
    assert journal is not None
    queries = 0
    rows = journal._rows

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal queries
        queries += 1
        return rows(*args, **kwargs)

    journal._rows = counted  # type: ignore[method-assign]
    try:
        reader = await open_reader(server.port, "sw")
        for stray in ("sw", "1000000:sw", "no such channel", ""):
            db.notify(f"{schema}.wake", stray)
        assert send(db, schema, "sw", "real") == 1  # the barrier: read and delivered
        await until_seq(reader, "sw", 1)
        try:
            await until(lambda: not journal._streams["sw"].reading, "the read loop ends",
                        timeout=5)
        finally:
            print(f"\n{queries} row queries for 4 stray wake-ups and 1 message")
        assert 1 <= queries <= 3
        assert tape(reader).pairs("sw") == [(1, "real")] and tape(reader).plain == []
    finally:
        await server.stop()
