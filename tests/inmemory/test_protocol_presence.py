"""
Presence through the whole relay, in memory: members, answers, join / leave events and their
folding, bounds, several processes on one database, leases, and refused requests.  Presence's
tables are a stand-in (L{MemoryPresenceStore}) that decides joins and leaves as the SQL of
pgws._presence_schema does and announces them on the memory database's presence channel; the
SQL itself is tested on PostgreSQL in tests/test_presence.py.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import pytest
from memory import EPOCH, MemoryClient, MemoryPostgres, MemoryRelay, token
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgws._presence import HEARTBEAT, LEASE

Key = tuple[str, str]


class MemoryPresenceStore:
    """presence_processes, presence_holds and presence_channels, with their functions."""

    def __init__(self, db: MemoryPostgres, schema: str = "pgws") -> None:
        self.db = db
        self.channel = f"{schema}.presence"
        self.expires: dict[str, float] = {}  # process -> when its lease runs out
        self.holds: set[tuple[str, str, str]] = set()  # (channel, member, process)
        self.counts: dict[str, list[int]] = {}  # channel -> [members, seq]
        # Page reads wait for release_pages(), then read the tables ("read now": read at once,
        # answered at release).
        self.hold_pages: bool | str = False
        self._held_pages: list[defer.Deferred[None]] = []
        self.updates = 0

    def _now(self) -> float:
        return self.db.clock.seconds()

    def _down(self) -> defer.Deferred[Any] | None:
        if not self.db.up:
            return defer.fail(psycopg2.OperationalError("server closed the connection"))
        return None

    def migrate(self) -> defer.Deferred[None]:
        return self._down() or defer.succeed(None)

    def update(self, process: str, name: str, lease: float,
               changes: list[tuple[Key, bool]]) -> defer.Deferred[bool]:
        down = self._down()
        if down is not None:
            return down
        self.updates += 1
        alive = process in self.expires
        self.expires[process] = self._now() + lease
        joins: dict[str, list[str]] = {}
        leaves: dict[str, list[str]] = {}
        for (channel, member), hold in sorted(changes):
            others = any(c == channel and m == member and p != process for c, m, p in self.holds)
            if hold and (channel, member, process) not in self.holds:
                self.holds.add((channel, member, process))
                if not others:
                    joins.setdefault(channel, []).append(member)
            elif not hold and (channel, member, process) in self.holds:
                self.holds.discard((channel, member, process))
                if not others:
                    leaves.setdefault(channel, []).append(member)
        for channel in sorted(set(joins) | set(leaves)):
            self._announce(channel, joins.get(channel, []), leaves.get(channel, []))
        return defer.succeed(alive)

    def _announce(self, channel: str, joins: list[str], leaves: list[str]) -> None:
        count = self.counts.setdefault(channel, [0, 0])
        count[0] += len(joins) - len(leaves)
        count[1] += 1
        self.db.notify(self.channel, json.dumps({"channel": channel, "seq": count[1],
                                                 "count": count[0], "join": joins,
                                                 "leave": leaves}))

    def drop(self, processes: list[str]) -> None:
        gone = sorted({(c, m) for c, m, p in self.holds if p in processes})
        self.holds = {h for h in self.holds if h[2] not in processes}
        leaves: dict[str, list[str]] = {}
        for channel, member in gone:
            if not any(c == channel and m == member for c, m, _ in self.holds):
                leaves.setdefault(channel, []).append(member)
        for channel, members in sorted(leaves.items()):
            self._announce(channel, [], members)

    def beat(self, process: str, name: str, lease: float) -> defer.Deferred[bool]:
        d = self.update(process, name, lease, [])
        if self.db.up:
            dead = [p for p, expires in self.expires.items() if expires < self._now()]
            for p in dead:
                del self.expires[p]
            self.drop(dead)
        return d

    def release(self, process: str) -> defer.Deferred[None]:
        down = self._down()
        if down is not None:
            return down
        self.expires.pop(process, None)
        self.drop([process])
        return defer.succeed(None)

    def held(self, process: str) -> defer.Deferred[list[Key]]:
        return self._down() or defer.succeed([(c, m) for c, m, p in self.holds if p == process])

    def page(self, channel: str, after: str | None,
             limit: int) -> defer.Deferred[tuple[int, int, list[str]]]:
        down = self._down()
        if down is not None:
            return down

        def read(_: object = None) -> tuple[int, int, list[str]]:
            members = sorted({m for c, m, _ in self.holds if c == channel
                              and (after is None or m > after)})
            count, seq = self.counts.get(channel, [0, 0])
            return count, seq, members[:limit]

        if not self.hold_pages:
            return defer.succeed(read())
        d: defer.Deferred[None] = defer.Deferred()
        self._held_pages.append(d)
        if self.hold_pages == "read now":  # read now, answered at release
            now = read()
            return d.addCallback(lambda _: now)
        return d.addCallback(read)

    def release_pages(self) -> None:
        held, self._held_pages = self._held_pages, []
        for d in held:
            d.callback(None)

    def members(self, channel: str) -> list[str]:
        return sorted({m for c, m, _ in self.holds if c == channel})


def presence_relay(store: MemoryPresenceStore | None = None, db: MemoryPostgres | None = None,
                   **settings: Any) -> tuple[MemoryRelay, MemoryPresenceStore]:
    if db is None:
        clock = MemoryReactorClock()
        clock.advance(EPOCH)
        db = MemoryPostgres(clock)
    store = store or MemoryPresenceStore(db)
    relay = MemoryRelay(db=db, relay_options={"presence_store": store}, presence=True,
                        **settings)
    return relay, store


def member(relay: MemoryRelay, name: str | None, channel: str = "room", mode: str = "rw",
           protocols: tuple[str, ...] = ("pgws",), **claims: Any) -> MemoryClient:
    if name is not None:
        claims["sub"] = name
    client = relay.open(f"/{channel}/{token({'mode': mode, 'channel': channel, **claims})}",
                        protocols=protocols)
    assert client.opened, client.closed
    return client


def ask(client: MemoryClient, channel: str = "room", **more: Any) -> None:
    client.send_binary(json.dumps({"presence": channel, **more}).encode())


def events(client: MemoryClient) -> list[Any]:
    taken, client.controls[:] = list(client.controls), []
    return taken


def answer(count: int, members: list[str], seq: int, next: str | None = None,
           channel: str = "room") -> dict[str, Any]:
    return {"event": "presence", "channel": channel, "seq": seq, "count": count,
            "members": members, "next": next}


def change(kind: str, members: list[str], count: int, seq: int,
           channel: str = "room") -> dict[str, Any]:
    return {"event": kind, "channel": channel, "seq": seq, "count": count, "members": members}


# -- asking, and the events after -----------------------------------------------------------------


def test_asking_answers_the_count_and_members_then_join_and_leave_events():
    relay, _ = presence_relay()
    member(relay, "ann")
    member(relay, "bob")
    watcher = member(relay, "zed")
    ask(watcher)
    assert events(watcher) == [answer(3, ["ann", "bob", "zed"], seq=3)]
    carol = member(relay, "carol")
    assert events(watcher) == [change("join", ["carol"], 4, seq=4)]
    carol.close()
    assert events(watcher) == [change("leave", ["carol"], 3, seq=5)]


def test_a_member_with_several_sockets_joins_once_and_leaves_once():
    relay, _ = presence_relay()
    watcher = member(relay, None)  # not a member: no "sub"
    ask(watcher)
    assert events(watcher) == [answer(0, [], seq=0)]
    first = member(relay, "ann")
    second = member(relay, "ann")
    first.close()
    member(relay, "bob")  # a barrier: its join comes after anything ann's sockets caused
    assert events(watcher) == [change("join", ["ann"], 1, seq=1),
                               change("join", ["bob"], 2, seq=2)]
    second.close()
    assert events(watcher) == [change("leave", ["ann"], 1, seq=3)]


def test_sockets_that_never_asked_get_no_presence_traffic():
    relay, _ = presence_relay()
    quiet = member(relay, "ann")
    watcher = member(relay, "zed")
    ask(watcher)
    member(relay, "bob").close()
    assert [e["event"] for e in events(watcher)] == ["presence", "join", "leave"]
    assert quiet.controls == [] and quiet.messages == []


def test_write_only_sockets_and_tokens_without_the_claim_are_not_members():
    relay, store = presence_relay()
    member(relay, "writer", mode="w")
    member(relay, None)
    member(relay, "", )  # an empty name names nobody
    member(relay, None, sub=["a", "list"])
    member(relay, None, sub=True)
    member(relay, None, sub=42)  # an integer is its decimal text
    member(relay, "x" * 257)  # over 256 bytes
    watcher = member(relay, "reader", mode="r")
    ask(watcher)
    assert events(watcher) == [answer(2, ["42", "reader"], seq=2)]
    assert store.members("room") == ["42", "reader"]


def test_another_claim_can_name_members():
    relay, _ = presence_relay(presence_claim="user_id")
    member(relay, "ignored", user_id="u1")
    watcher = member(relay, "ignored too", user_id="u2")
    ask(watcher)
    assert events(watcher)[0]["members"] == ["u1", "u2"]


def test_join_bursts_of_one_turn_are_folded_into_one_event():
    relay, store = presence_relay()
    watcher = member(relay, None)
    ask(watcher)
    events(watcher)
    # Another process writes three statements whose announcements arrive in one turn.
    store.update("other", "other", LEASE, [(("room", "a"), True), (("room", "b"), True)])
    store.update("other", "other", LEASE, [(("room", "c"), True)])
    store.update("other", "other", LEASE, [(("room", "a"), False), (("room", "d"), True)])
    relay.flush()
    assert events(watcher) == [change("join", ["b", "c", "d"], 3, seq=3)]


def test_a_fold_of_joins_and_leaves_is_one_leave_then_one_join():
    relay, store = presence_relay()
    store.update("other", "other", LEASE, [(("room", "old"), True)])
    watcher = member(relay, None)
    ask(watcher)
    events(watcher)
    store.update("other", "other", LEASE, [(("room", "old"), False), (("room", "new"), True)])
    relay.flush()
    assert events(watcher) == [change("leave", ["old"], 0, seq=2),
                               change("join", ["new"], 1, seq=2)]


def test_stop_ends_the_events_and_asking_again_starts_them():
    relay, _ = presence_relay()
    watcher = member(relay, "zed")
    ask(watcher)
    ask(watcher, stop=True)
    member(relay, "ann")
    assert events(watcher) == [answer(1, ["zed"], seq=1),
                               {"event": "presence", "channel": "room", "stopped": True}]
    ask(watcher)
    member(relay, "bob")
    assert events(watcher) == [answer(2, ["ann", "zed"], seq=2), change("join", ["bob"], 3, seq=3)]


def test_announcements_already_in_the_answer_are_not_sent_again():
    relay, store = presence_relay()
    watcher = member(relay, None)
    store.hold_pages = True
    ask(watcher)
    # While the answer is being read, ann joins: the read (made after) already counts her.
    member(relay, "ann")
    assert events(watcher) == []
    store.release_pages()
    relay.flush()
    member(relay, "bob")
    assert events(watcher) == [answer(1, ["ann"], seq=1), change("join", ["bob"], 2, seq=2)]


def test_announcements_after_the_answer_was_read_follow_it():
    relay, store = presence_relay()
    watcher = member(relay, None)
    store.hold_pages = "read now"
    ask(watcher)  # read now: nobody is there yet
    member(relay, "ann")  # announced before the answer is handed over
    assert events(watcher) == []
    store.release_pages()
    relay.flush()
    assert events(watcher) == [answer(0, [], seq=0), change("join", ["ann"], 1, seq=1)]


# -- bounds -----------------------------------------------------------------------------------------


def fill(store: MemoryPresenceStore, n: int, channel: str = "room") -> None:
    store.update("other", "other", 10 ** 9, [((channel, f"m{i:05}"), True) for i in range(n)])


def test_a_newcomer_to_a_large_channel_gets_one_page_and_the_next_on_request():
    relay, store = presence_relay()
    fill(store, 10_000)
    watcher = member(relay, None)
    ask(watcher)
    [first] = events(watcher)
    assert (first["count"], len(first["members"]), first["next"]) == (10_000, 100, "m00099")
    assert first["members"] == [f"m{i:05}" for i in range(100)]
    ask(watcher, after=first["next"])
    [second] = events(watcher)
    assert second == {**answer(10_000, [f"m{i:05}" for i in range(100, 200)], seq=1,
                               next="m00199"), "after": "m00099"}
    ask(watcher, after="m09950")
    [last] = events(watcher)
    assert len(last["members"]) == 49 and last["next"] is None


def test_a_burst_of_more_than_a_page_is_a_fresh_answer_not_a_long_event():
    relay, store = presence_relay()
    watcher = member(relay, None)
    ask(watcher)
    events(watcher)
    fill(store, 500)
    relay.flush()
    [fresh] = events(watcher)
    assert (fresh["event"], fresh["count"], len(fresh["members"]), fresh["seq"]) == (
        "presence", 500, 100, 1)
    assert "after" not in fresh
    store.update("other", "other", LEASE, [(("room", "late"), True)])
    relay.flush()
    assert events(watcher) == [change("join", ["late"], 501, seq=2)]


def test_announcements_for_a_socket_waiting_for_its_answer_are_bounded():
    relay, store = presence_relay()
    watcher = member(relay, None)
    store.hold_pages = True
    ask(watcher)
    for i in range(200):  # far more announcements than are kept while the answer is read
        store.update("other", "other", LEASE, [(("room", f"m{i}"), True)])
        relay.flush()
    store.release_pages()  # this answer is too old for what was dropped: it is read again
    relay.flush()
    assert events(watcher) == []
    store.release_pages()
    relay.flush()
    [fresh] = events(watcher)
    assert (fresh["count"], fresh["seq"]) == (200, 200)


# -- several processes ---------------------------------------------------------------------------------


def test_members_of_two_processes_are_listed_once_and_leave_with_their_last_socket():
    first, store = presence_relay()
    second, _ = presence_relay(store, first.db)
    ann_1 = member(first, "ann")
    ann_2 = member(second, "ann")
    member(second, "bob")
    watcher = member(first, None)
    ask(watcher)
    assert events(watcher) == [answer(2, ["ann", "bob"], seq=2)]
    ann_1.close()
    second.flush()
    member(first, "carol")  # a barrier
    assert events(watcher) == [change("join", ["carol"], 3, seq=3)]
    ann_2.close()
    second.flush()
    first.flush()
    assert events(watcher) == [change("leave", ["ann"], 2, seq=4)]


def test_a_process_whose_lease_runs_out_has_its_members_leave():
    relay, store = presence_relay()
    store.update("ghost", "killed pgws", LEASE, [(("room", "ann"), True), (("room", "bob"), True)])
    watcher = member(relay, None)
    ask(watcher)
    assert events(watcher) == [answer(2, ["ann", "bob"], seq=1)]
    relay.advance(LEASE - HEARTBEAT)
    assert events(watcher) == []
    relay.advance(2 * HEARTBEAT)  # a heartbeat after the lease ran out drops its members
    assert events(watcher) == [change("leave", ["ann", "bob"], 0, seq=2)]
    assert "ghost" not in store.expires


def test_a_process_taken_for_dead_writes_its_members_again():
    relay, store = presence_relay()
    member(relay, "ann")
    relay.advance(HEARTBEAT)
    [process] = store.expires
    store.expires.pop(process)  # as another process would, after a long stall of this one
    store.drop([process])
    assert store.members("room") == []
    relay.advance(HEARTBEAT)
    relay.flush()
    assert store.members("room") == ["ann"]


def test_a_stopping_process_drops_its_members_at_once():
    first, store = presence_relay()
    second, _ = presence_relay(store, first.db)
    member(first, "ann")
    watcher = member(second, None)
    ask(watcher)
    events(watcher)
    first.stop()
    second.flush()
    assert events(watcher) == [change("leave", ["ann"], 0, seq=2)]
    assert len(store.expires) == 1


def test_members_are_written_again_once_the_database_is_back():
    relay, store = presence_relay()
    relay.db.up = False
    member(relay, "ann")
    relay.advance(1)
    assert store.members("room") == []
    relay.db.up = True
    relay.advance(5)
    assert store.members("room") == ["ann"]


# -- the LISTEN session ----------------------------------------------------------------------------


def test_a_lost_listen_session_gives_every_asker_a_fresh_answer():
    relay, store = presence_relay()
    watcher = member(relay, "zed")
    ask(watcher)
    events(watcher)
    relay.db.up = False
    relay.db.session.kill()
    relay.flush()
    relay.db.up = True  # back, but the LISTEN session is not yet
    store.update("other", "other", LEASE, [(("room", "missed"), True)])  # nobody hears it
    assert not any(s.connected for s in relay.db.sessions)
    relay.advance(1)  # the session is back
    got = events(watcher)
    assert [e for e in got if e["event"] != "gap"] == [answer(2, ["missed", "zed"], seq=2)]
    assert [e["event"] for e in got].count("gap") == 1


def test_presence_notifications_never_reach_readers():
    relay, _ = presence_relay()
    spy = relay.open(f"/pgws.presence/{token({'mode': 'r'})}")
    assert spy.opened
    member(relay, "ann").close()
    relay.notify("pgws.presence", "not an announcement")
    assert spy.messages == [] and spy.controls == []


def test_presence_works_in_listen_channel_mode():
    relay, _ = presence_relay(listen_channel="everything")
    member(relay, "ann")
    watcher = member(relay, "zed")
    ask(watcher)
    assert events(watcher) == [answer(2, ["ann", "zed"], seq=2)]
    member(relay, "bob").send("hello")
    assert events(watcher) == [change("join", ["bob"], 3, seq=3)]
    assert watcher.messages == [m for m in watcher.messages if "hello" in m] != []


def test_a_refresh_that_changes_the_claim_is_a_leave_and_a_join():
    relay, store = presence_relay()
    watcher = member(relay, "zed")
    ann = member(relay, "ann")
    ask(watcher)
    events(watcher)
    ann.send_binary(json.dumps({"refresh": token({"mode": "rw", "channel": "room",
                                                  "sub": "anne"})}).encode())
    assert ann.controls == [{"refreshed": True, "exp": None}]
    assert events(watcher) == [change("leave", ["ann"], 1, seq=3),
                               change("join", ["anne"], 2, seq=3)]
    assert store.members("room") == ["anne", "zed"]


# -- refused requests ---------------------------------------------------------------------------------


def refusal(reason: str, channel: str | None = "room") -> dict[str, Any]:
    return {"event": "presence", "channel": channel, "error": reason}


@pytest.mark.parametrize("message,reason,channel", [
    ({"presence": 5}, 'malformed presence request: "presence" must be a channel name', None),
    ({"presence": None}, 'malformed presence request: "presence" must be a channel name', None),
    ({"presence": "room", "x": 1}, 'malformed presence request: unknown key "x"', "room"),
    ({"presence": "room", "after": 3},
     'malformed presence request: "after" must be the "next" of an answer', "room"),
    ({"presence": "room", "after": ""},
     'malformed presence request: "after" must be the "next" of an answer', "room"),
    ({"presence": "room", "after": "a\u0000"},
     'malformed presence request: "after" must be the "next" of an answer', "room"),
    ({"presence": "room", "stop": False}, 'malformed presence request: "stop" must be true',
     "room"),
    ({"presence": "room", "stop": True, "after": "a"},
     'malformed presence request: "after" and "stop" do not go together', "room"),
    ({"presence": "elsewhere"}, 'this socket does not read channel "elsewhere"', "elsewhere"),
])
def test_malformed_requests_and_unread_channels_are_answered(message, reason, channel):
    relay, _ = presence_relay()
    client = member(relay, "ann")
    client.send_binary(json.dumps(message).encode())
    assert events(client) == [refusal(reason, channel)]
    assert client.closed is None


def test_a_write_only_socket_may_not_ask():
    relay, _ = presence_relay()
    writer = member(relay, "ann", mode="w")
    ask(writer)
    assert events(writer) == [refusal('this socket does not read channel "room"')]


def test_asking_without_the_pgws_subprotocol_is_answered():
    relay, _ = presence_relay()
    seed = member(relay, "ann", protocols=())
    ask(seed)
    assert events(seed) == [refusal("presence needs the pgws subprotocol")]


def test_asking_with_presence_off_is_answered():
    relay = MemoryRelay()
    client = relay.open(f"/room/{token({'mode': 'rw', 'sub': 'ann'})}", protocols=["pgws"])
    ask(client)
    assert client.controls == [refusal("presence is off on this server")]
    assert client.closed is None
    client.send_binary(b'{"presents": "room"}')  # not a control message: 1003, as always
    assert client.closed is not None and client.closed[0] == 1003


def test_asking_twice_while_the_answer_is_read_is_answered():
    relay, store = presence_relay()
    watcher = member(relay, "zed")
    store.hold_pages = True
    ask(watcher)
    ask(watcher)
    assert events(watcher) == [refusal("an answer about this channel is already being read")]
    store.release_pages()
    relay.flush()
    assert events(watcher) == [answer(1, ["zed"], seq=1)]


def test_a_database_that_does_not_answer_is_answered():
    relay, _ = presence_relay()
    watcher = member(relay, "zed")
    relay.db.up = False
    ask(watcher)
    ask(watcher, after="a")
    assert events(watcher) == [refusal("the database did not answer; ask again later")] * 2
    relay.db.up = True
    ask(watcher)  # asking again works, and it watches again
    member(relay, "ann")
    assert [e["event"] for e in events(watcher)] == ["presence", "join"]


def test_handshakes_wait_for_presence_to_be_migrated():
    clock = MemoryReactorClock()
    clock.advance(EPOCH)
    db = MemoryPostgres(clock)
    store = MemoryPresenceStore(db)
    failing = store.migrate
    store.migrate = lambda: defer.fail(psycopg2.OperationalError("not yet"))  # type: ignore
    relay, _ = presence_relay(store, db)
    refused = relay.open(f"/room/{token({'mode': 'r'})}")
    assert not refused.opened
    store.migrate = failing  # type: ignore[method-assign]
    relay.advance(2)
    assert member(relay, "ann").opened
