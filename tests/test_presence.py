"""
Presence (presence = true), end to end: several pgws processes on one real PostgreSQL (in-process
relays on ports of their own, and a twistd subprocess that is killed), real WebSocket clients,
the bound on what a newcomer to a 10,000-member channel gets, refused requests, and the schema
shared with the journal.

Every test has a schema of its own (as the journal's tests do), dropped at the end.  Negative
checks ("no event for that") use barriers: events of a channel come in its order, so a later
event that does come proves an earlier one did not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from test_journal import drop_schema, new_schema, relations

from pgws._presence import HEARTBEAT, LEASE, PAGE_SIZE
from support import SECRET, Client, Db, Server, start_server, token, until, ws_connect


@pytest.fixture(name="schema")
def schema_fixture(db_uri: str) -> Iterator[str]:
    name = new_schema()
    yield name
    drop_schema(db_uri, name)


async def presence_server(db_uri: str, schema: str, **settings: Any) -> Server:
    server = await start_server(db_uri, presence="true", journal_schema=schema, **settings)
    presence = server.relay.presence
    assert presence is not None
    await until(lambda: presence.migrated, "presence is migrated", timeout=30)
    return server


def path(channel: str, name: str | None = None, mode: str = "rw") -> str:
    claims: dict[str, Any] = {"mode": mode, "channel": channel}
    if name is not None:
        claims["sub"] = name
    return f"/{channel}/{token(claims)}"


async def open_member(port: int, channel: str, name: str | None = None,
                      mode: str = "rw") -> Client:
    return await ws_connect(port, path(channel, name, mode), protocols=["pgws"])


async def control(client: Client, timeout: float = 10) -> dict[str, Any]:
    """The next binary frame, as JSON (text frames before it are skipped)."""
    while True:
        message = await client.next(timeout)
        if isinstance(message, bytes):
            return json.loads(message)


async def ask(client: Client, channel: str, **more: Any) -> dict[str, Any]:
    assert client.proto is not None
    client.proto.sendMessage(json.dumps({"presence": channel, **more}).encode(), isBinary=True)
    return await control(client)


def holds(db: Db, schema: str, channel: str) -> list[tuple[str, str]]:
    """(member, process) rows of a channel."""
    return sorted(db.execute(f"SELECT member, process FROM {schema}.presence_holds "
                             "WHERE channel = %s", (channel,)))


def members(rows: list[tuple[str, str]]) -> list[str]:
    return [m for m, _ in rows]


async def close(client: Client) -> None:
    client.close()
    await client.closed


@pytest_twisted.ensureDeferred
async def test_a_newcomer_sees_every_member_of_two_processes_exactly_once(db_uri, db: Db,
                                                                          schema):
    a = await presence_server(db_uri, schema)
    b = await presence_server(db_uri, schema)
    try:
        await open_member(a.port, "room", "ann")
        await open_member(b.port, "room", "ann")
        await open_member(a.port, "room", "bob")
        await open_member(b.port, "room", "carol")
        await until(lambda: len(holds(db, schema, "room")) == 4, "four holds")
        newcomer = await open_member(b.port, "room")  # no sub: not a member itself
        answer = await ask(newcomer, "room")
        assert answer == {"event": "presence", "channel": "room", "seq": answer["seq"],
                          "count": 3, "members": ["ann", "bob", "carol"], "next": None}
        # In the database: ann is held by both processes, and counted once.
        assert members(holds(db, schema, "room")) == ["ann", "ann", "bob", "carol"]
        assert db.execute(f"SELECT members FROM {schema}.presence_channels WHERE channel = "
                          "'room'") == [(3,)]
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_member_joins_with_its_first_socket_and_leaves_with_its_last(db_uri, db: Db,
                                                                             schema):
    a = await presence_server(db_uri, schema)
    b = await presence_server(db_uri, schema)
    try:
        watcher = await open_member(a.port, "hall")
        first = await ask(watcher, "hall")
        assert (first["count"], first["members"]) == (0, [])
        ann_a = await open_member(a.port, "hall", "ann")
        joined = await control(watcher)
        assert (joined["event"], joined["members"], joined["count"]) == ("join", ["ann"], 1)
        ann_b = await open_member(b.port, "hall", "ann")
        await until(lambda: len(holds(db, schema, "hall")) == 2, "ann held by both processes")
        await open_member(b.port, "hall", "bob")  # a barrier
        event = await control(watcher)
        assert (event["event"], event["members"], event["count"]) == ("join", ["bob"], 2)
        await close(ann_a)
        await until(lambda: len(holds(db, schema, "hall")) == 2, "ann held by b only")
        await close(ann_b)
        event = await control(watcher)
        assert (event["event"], event["members"], event["count"]) == ("leave", ["ann"], 1)
        assert event["seq"] == joined["seq"] + 2  # nothing was announced between
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_members_of_a_killed_process_leave_within_the_lease(db_uri, db: Db, schema,
                                                                  tmp_path):
    from test_twistd import Twistd

    survivor = await presence_server(db_uri, schema)
    victim = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--presence", "true", "--journal-schema", schema,
                    env={"PGWS_JWT_SECRET": SECRET})
    try:
        port = await victim.ready()
        await open_member(port, "lobby", "ann")
        await open_member(port, "lobby", "bob")
        await open_member(survivor.port, "lobby", "bob")  # bob stays, in the survivor
        watcher = await open_member(survivor.port, "lobby")
        await until(lambda: len(holds(db, schema, "lobby")) == 3, "three holds")
        answer = await ask(watcher, "lobby")
        assert (answer["count"], answer["members"]) == (2, ["ann", "bob"])
        victim.proc.kill()  # SIGKILL: it says nothing to anyone
        killed = time.monotonic()
        event = await control(watcher, timeout=LEASE + 4 * HEARTBEAT + 10)
        took = time.monotonic() - killed
        print(f"\nthe killed process's member left after {took:.1f} s "
              f"(lease {LEASE:g} s, heartbeat {HEARTBEAT:g} s)")
        assert (event["event"], event["members"], event["count"]) == ("leave", ["ann"], 1)
        assert took <= LEASE + 4 * HEARTBEAT
        assert members(holds(db, schema, "lobby")) == ["bob"]
    finally:
        if victim.proc.poll() is None:
            victim.proc.kill()
        victim.proc.communicate()
        await survivor.stop()


@pytest_twisted.ensureDeferred
async def test_a_process_that_stops_drops_its_members_at_once(db_uri, db: Db, schema):
    a = await presence_server(db_uri, schema)
    b = await presence_server(db_uri, schema)
    try:
        await open_member(a.port, "deck", "ann")
        watcher = await open_member(b.port, "deck")
        await until(lambda: holds(db, schema, "deck"), "ann is held")
        assert (await ask(watcher, "deck"))["members"] == ["ann"]
        await a.stop()
        await a.relay.whenStopped()
        # Gone when the stop is over, not at the end of the lease.
        assert holds(db, schema, "deck") == []
        assert db.execute(f"SELECT count(*) FROM {schema}.presence_processes") == [(1,)]
        event = await control(watcher)
        assert (event["event"], event["members"], event["count"]) == ("leave", ["ann"], 0)
    finally:
        await b.stop()


def fill(db: Db, schema: str, channel: str, n: int) -> None:
    """n members held by a process that is not pgws (rows written directly)."""
    db.execute(f"INSERT INTO {schema}.presence_processes VALUES ('bulk', 'test', "
               "now() + interval '1 hour')")
    db.execute(f"INSERT INTO {schema}.presence_holds SELECT %s, 'm' || lpad(i::text, 5, '0'), "
               "'bulk' FROM generate_series(0, %s - 1) AS i", (channel, n))
    db.execute(f"INSERT INTO {schema}.presence_channels VALUES (%s, %s, 1)", (channel, n))


@pytest_twisted.ensureDeferred
async def test_a_newcomer_to_10000_members_gets_one_page_and_a_mass_leave_is_one_answer(
        db_uri, db: Db, schema):
    server = await presence_server(db_uri, schema)
    try:
        fill(db, schema, "arena", 10_000)
        watcher = await open_member(server.port, "arena")
        first = await ask(watcher, "arena")
        assert (first["count"], len(first["members"]), first["next"]) == (
            10_000, PAGE_SIZE, f"m{PAGE_SIZE - 1:05}")
        assert first["members"] == [f"m{i:05}" for i in range(PAGE_SIZE)]
        second = await ask(watcher, "arena", after=first["next"])
        assert second["after"] == first["next"]
        assert second["members"] == [f"m{i:05}" for i in range(PAGE_SIZE, 2 * PAGE_SIZE)]
        last = await ask(watcher, "arena", after="m09990")
        assert (len(last["members"]), last["next"]) == (9, None)
        # All 10,000 leave in one transaction (announced in pieces under the NOTIFY limit):
        # the watcher gets one fresh answer, not 10,000 names.
        db.execute(f"SELECT {schema}.presence_release('bulk')")
        fresh = await control(watcher)
        assert fresh == {"event": "presence", "channel": "arena", "seq": 2, "count": 0,
                         "members": [], "next": None}
        # Nothing else came before this barrier.
        await open_member(server.port, "arena", "late")
        event = await control(watcher)
        assert (event["event"], event["members"], event["seq"]) == ("join", ["late"], 3)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_bad_requests_are_answered_and_the_socket_stays_open(db_uri, db: Db, schema):
    server = await presence_server(db_uri, schema)
    off = await start_server(db_uri)
    try:
        seed = await ws_connect(server.port, path("room", "ann"))  # no subprotocol
        assert await ask(seed, "room") == {"event": "presence", "channel": "room",
                                           "error": "presence needs the pgws subprotocol"}
        client = await open_member(server.port, "room", "ann")
        assert await ask(client, "other") == {
            "event": "presence", "channel": "other",
            "error": 'this socket does not read channel "other"'}
        assert await ask(client, "room", after=5) == {
            "event": "presence", "channel": "room",
            "error": 'malformed presence request: "after" must be the "next" of an answer'}
        writer = await open_member(server.port, "room", "w", mode="w")
        assert (await ask(writer, "room"))["error"] == 'this socket does not read channel "room"'
        elsewhere = await open_member(off.port, "room", "ann")
        assert await ask(elsewhere, "room") == {"event": "presence", "channel": "room",
                                                "error": "presence is off on this server"}
        await until(lambda: holds(db, schema, "room"), "ann is held")
        answer = await ask(client, "room")  # still open, and answered
        assert (answer["count"], answer["members"]) == (1, ["ann"])  # the writer is no member
        assert not client.closed.called and not seed.closed.called
    finally:
        await server.stop()
        await off.stop()


# -- the schema, shared with the journal ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_presence_alone_makes_only_its_objects_and_the_journal_adds_its_own(db_uri, db: Db,
                                                                                  schema):
    server = await presence_server(db_uri, schema)
    await server.stop()
    only = set(relations(db, schema))
    assert {"presence_processes", "presence_holds", "presence_channels", "version"} <= only
    assert not {"streams", "messages"} & only
    assert db.execute(f"SELECT version FROM {schema}.version") == [(2,)]
    both = await start_server(db_uri, presence="true", journal="true", journal_schema=schema)
    try:
        assert both.relay.journal is not None and both.relay.presence is not None
        journal, presence = both.relay.journal, both.relay.presence
        await until(lambda: journal.migrated and presence.migrated, "both migrated", timeout=30)
        assert {"streams", "messages"} <= set(relations(db, schema))
        assert db.execute(f"SELECT version FROM {schema}.version") == [(2,)]  # never lowered
    finally:
        await both.stop()


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused_by_presence_with_one_line(db_uri, db: Db, schema,
                                                                   tmp_path):
    from test_twistd import Twistd

    made = await presence_server(db_uri, schema)
    await made.stop()
    db.execute(f"UPDATE {schema}.version SET version = 99")
    before = relations(db, schema)
    server = Twistd(tmp_path, "--db-uri", db_uri, "--port", "0", "--server-host", "127.0.0.1",
                    "--presence", "true", "--journal", "true", "--journal-schema", schema,
                    env={"PGWS_JWT_SECRET": SECRET})
    code = await server.terminate(timeout=60, signal_it=False)
    log = server.text()
    assert code == 1, log
    lines = [line for line in log.splitlines() if "upgrade pgws" in line]
    print("\n" + "\n".join(lines))
    assert len(lines) == 1, log  # both features are refused; one line says so
    assert "version 99" in lines[0] and "versions up to 2" in lines[0] and schema in lines[0]
    assert "Traceback" not in log
    assert relations(db, schema) == before


def _write_at_random(db_uri: str, schema: str, process: str, seed: int,
                     errors: list[BaseException]) -> None:
    """One process's statements: random holds and releases of overlapping members."""
    import random

    import psycopg2

    from pgws._presence_schema import update_sql

    rng = random.Random(seed)
    held: set[tuple[str, str]] = set()
    conn = psycopg2.connect(db_uri)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for _ in range(150):
                keys = {(f"c{rng.randrange(3)}", f"m{rng.randrange(8)}")
                        for _ in range(rng.randrange(1, 6))}
                changes = [(k, k not in held) for k in sorted(keys)]
                cur.execute(update_sql(schema), (
                    process, process, 60, [c for (c, _), _ in changes],
                    [m for (_, m), _ in changes], [h for _, h in changes]))
                for key, hold in changes:
                    (held.add if hold else held.discard)(key)
    except BaseException as e:  # a deadlock would land here
        errors.append(e)
    finally:
        conn.close()


def _announcements(db: Db, schema: str) -> list[dict[str, Any]]:
    """Every announcement, once the last change of each channel has come (bounded wait)."""
    announced: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        db.conn.poll()
        announced += [json.loads(n.payload) for n in db.conn.notifies]
        del db.conn.notifies[:]
        last = dict(db.execute(f"SELECT channel, seq FROM {schema}.presence_channels"))
        if all(any(a["channel"] == c and a["seq"] == s for a in announced)
               for c, s in last.items()):
            break
        time.sleep(0.05)
    return announced


def _replay(announced: list[dict[str, Any]],
            ) -> tuple[dict[str, set[str]], dict[str, int], dict[str, int]]:
    """
    The announcements applied in their order: (members, last seq, last count) per channel.
    A join of a member that is there, a leave of one that is not, a gap in a channel's seq or
    a count that is not the number of members fails.
    """
    state: dict[str, set[str]] = {}
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    for a in announced:  # delivered in commit order
        channel = a["channel"]
        assert a["seq"] in (seen.get(channel, 0), seen.get(channel, 0) + 1), a  # dense
        if a["seq"] != seen.get(channel):  # a new change: the last one is whole
            assert len(state.get(channel, ())) == counts.get(channel, 0), a
        seen[channel], counts[channel] = a["seq"], a["count"]
        members_ = state.setdefault(channel, set())
        for m in a["join"]:
            assert m not in members_, a
            members_.add(m)
        for m in a["leave"]:
            assert m in members_, a
            members_.discard(m)
    return state, seen, counts


def test_concurrent_processes_announce_every_join_and_leave_exactly_once(db_uri, db: Db, schema):
    """
    Four writers, as four processes, hold and release overlapping members of a few channels at
    once.  Replayed in seq order, the announcements must never join a member that is there nor
    drop one that is not, must count right, and must end where the tables are.
    """
    import threading

    import psycopg2

    from pgws._presence_schema import migration

    with psycopg2.connect(db_uri) as conn, conn.cursor() as cur:
        for sql in migration(schema):
            cur.execute(sql)
    db.listen(f"{schema}.presence")
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_write_at_random, args=(db_uri, schema, f"p{i}", i, errors))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    announced = _announcements(db, schema)
    state, seen, counts = _replay(announced)
    for channel, seq in db.execute(f"SELECT channel, seq FROM {schema}.presence_channels"):
        assert seen.get(channel, 0) == seq
        assert len(state.get(channel, ())) == counts.get(channel, 0)
        in_table = {m for (m,) in db.execute(
            f"SELECT DISTINCT member FROM {schema}.presence_holds WHERE channel = %s",
            (channel,))}
        assert state.get(channel, set()) == in_table, channel
        assert db.execute(f"SELECT members FROM {schema}.presence_channels WHERE channel = %s",
                          (channel,)) == [(len(in_table),)]
    print(f"\n{len(announced)} announcements, {sum(seen.values())} changes over {len(seen)} "
          "channels")
