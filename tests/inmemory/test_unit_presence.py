"""
Presence's parts, one at a time: member names, request checks, announcements and their folding,
the LISTEN tap, and the process's writer (one statement at a time, each turn's changes in one,
what an abandoned statement leaves).  The whole exchange through the relay is in
test_protocol_presence.py; the SQL, on PostgreSQL, in tests/test_presence.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgws._auth import Grant
from pgws._frames import binary_frame
from pgws._presence import (
    QUERY_DEADLINE,
    RESYNC,
    Change,
    Presence,
    PresenceTap,
    fold,
    malformed,
    member_of,
    parse_change,
)


def test_member_names():
    assert member_of({"sub": "ann"}, "sub") == "ann"
    assert member_of({"sub": 7}, "sub") == "7"
    assert member_of({"uid": "u"}, "uid") == "u"
    assert member_of({"sub": "é" * 128}, "sub") == "é" * 128  # 256 bytes
    for value in (None, "", True, 1.5, ["a"], {"a": 1}, "a\x00b", "é" * 129):
        assert member_of({"sub": value}, "sub") is None, value
    assert member_of({}, "sub") is None


@pytest.mark.parametrize("message", [
    {"presence": "c"}, {"presence": "c", "after": "x"}, {"presence": "c", "stop": True}])
def test_good_requests(message):
    assert malformed(message) is None


def test_announcements_are_parsed_and_anything_else_is_not():
    text = '{"channel" : "c", "seq" : 3, "count" : 2, "join" : ["a"], "leave" : []}'
    assert parse_change(text) == Change("c", 3, 2, ("a",), ())
    for bad in ("", "[]", "null", '{"channel": "c"}', '{"channel": 1, "seq": 1, "count": 1, '
                '"join": [], "leave": []}', '{"channel": "c", "seq": true, "count": 1, '
                '"join": [], "leave": []}', '{"channel": "c", "seq": 1, "count": 1, '
                '"join": [1], "leave": []}', "[" * 100_000):
        assert parse_change(bad) is None, bad


def frames_of(data: bytes) -> list[dict[str, Any]]:
    out = []
    while data:
        assert data[0] == 0x82
        n, header = data[1], 2
        if n == 126:
            n, header = int.from_bytes(data[2:4], "big"), 4
        out.append(json.loads(data[header:header + n]))
        data = data[header + n:]
    return out


def test_a_fold_is_the_net_change_as_one_leave_and_one_join():
    changes = [Change("c", 5, 3, ("a", "b"), ()), Change("c", 6, 2, ("x",), ("a", "old")),
               Change("c", 7, 2, ("old",), ("y",))]
    # a joined then left, old left then came back: neither changed; y left without joining here.
    got = frames_of(fold("c", changes))  # type: ignore[arg-type]
    assert got == [
        {"event": "leave", "channel": "c", "seq": 7, "count": 0, "members": ["y"]},
        {"event": "join", "channel": "c", "seq": 7, "count": 2, "members": ["b", "x"]}]


def test_a_fold_that_cancels_out_is_nothing_and_a_large_one_a_resync():
    assert fold("c", [Change("c", 1, 1, ("a",), ()), Change("c", 2, 0, (), ("a",))]) == b""
    many = [Change("c", 1, 101, tuple(f"m{i}" for i in range(101)), ())]
    assert fold("c", many) is RESYNC
    assert fold("c", many, limit=101) != RESYNC


class Sink:
    def __init__(self) -> None:
        self.got: list[Any] = []

    def received(self, notifications: Any) -> None:
        self.got.append(notifications)

    def busy(self) -> bool:
        return True

    def attach(self, reading: Any) -> None:
        self.got.append(("attached", reading))


class Store:
    """A store whose statements are answered by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.pages: tuple[int, int, list[str]] = (0, 0, [])
        self.holds: list[tuple[str, str]] = []

    def _call(self, what: str, args: Any) -> defer.Deferred[Any]:
        self.calls.append((what, args))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, result: Any = False) -> None:
        self.pending.pop(0).callback(result)

    def migrate(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def update(self, process: str, name: str, lease: float, changes: Any) -> defer.Deferred[bool]:
        return self._call("update", sorted(changes))

    def beat(self, process: str, name: str, lease: float) -> defer.Deferred[bool]:
        return self._call("beat", None)

    def release(self, process: str) -> defer.Deferred[None]:
        return self._call("release", None)

    def held(self, process: str) -> defer.Deferred[list[tuple[str, str]]]:
        return self._call("held", None)

    def page(self, channel: str, after: str | None, limit: int) -> defer.Deferred[Any]:
        return defer.succeed(self.pages)


class Socket:
    websocket_protocol_in_use = "pgws"

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write_frames(self, frames: bytes) -> None:
        self.frames.extend(frames_of(frames))


def started(store: Store) -> tuple[Presence, MemoryReactorClock]:
    clock = MemoryReactorClock()
    presence = Presence(clock, store, "pgws", "sub", "test")
    fired = defer.Deferred.fromCoroutine(presence.start(lambda why: None))
    assert fired.called
    clock.advance(0)
    store.answer(False)  # the first heartbeat: the process's row is new
    return presence, clock


def test_the_tap_takes_presence_notifications_out_and_passes_the_rest_in_order():
    sink, presence = Sink(), Presence(MemoryReactorClock(), Store(), "pgws", "sub", "t")
    got: list[list[str]] = []
    presence.received = got.append  # type: ignore[method-assign,assignment]
    tap = PresenceTap(sink, presence)
    tap.received([("a", "1"), ("pgws.presence", "p1"), ("b", "2"), ("pgws.presence", "p2")])
    tap.received([("pgws.presence", "p3")])
    tap.received([("c", "3")])
    assert got == [["p1", "p2"], ["p3"]]
    assert sink.got == [[("a", "1"), ("b", "2")], [("c", "3")]]
    assert tap.busy()


def grant(member: str, channels: tuple[str, ...] = ("c",)) -> Grant:
    return Grant(channels=channels, mode="rw", claims={"mode": "rw", "sub": member})


def test_the_changes_of_a_turn_go_in_one_statement_and_the_next_waits_for_it():
    store = Store()
    presence, clock = started(store)
    a, b, c = Socket(), Socket(), Socket()
    presence.opened(a, grant("ann", ("c", "d")))
    presence.opened(b, grant("ann"))  # a second socket: nothing more to write
    presence.opened(c, grant("bob"))
    clock.advance(0)
    assert store.calls[-1] == ("update", [(("c", "ann"), True), (("c", "bob"), True),
                                          (("d", "ann"), True)])
    presence.closed(a)  # d's ann goes; c's ann stays (b)
    presence.closed(c)
    clock.advance(0)
    assert len(store.calls) == 2  # the first statement has not answered
    store.answer(True)
    clock.advance(0)
    assert store.calls[-1] == ("update", [(("c", "bob"), False), (("d", "ann"), False)])
    store.answer(True)
    assert presence.members_here() == {("c", "ann"): 1}


def test_a_failed_statement_is_written_again_and_an_abandoned_one_is_checked_first():
    store = Store()
    presence, clock = started(store)
    presence.opened(Socket(), grant("ann"))
    clock.advance(0)
    store.pending.pop(0).errback(RuntimeError("deadlock detected"))
    clock.advance(0.5)
    assert store.calls[-1] == ("update", [(("c", "ann"), True)])
    clock.advance(QUERY_DEADLINE)  # abandoned: it may still commit
    clock.advance(1)
    assert store.calls[-1] == ("held", None)
    abandoned = store.pending.pop(0)
    store.answer([("c", "ann"), ("c", "ghost")])  # it did commit, with a stale hold beside it
    abandoned.callback(True)  # its answer, late, changes nothing
    clock.advance(0)
    assert store.calls[-1] == ("update", [(("c", "ghost"), False)])


def test_a_socket_whose_answer_is_older_than_some_announcements_gets_only_the_later_ones():
    store = Store()
    presence, clock = started(store)
    watcher = Socket()
    store.pages = (1, 1, ["ann"])
    presence.request(watcher, grant("zed"), {"presence": "c"})
    assert watcher.frames[-1]["seq"] == 1
    # ann's announcement (already in the answer) arrives with bob's, in one turn.
    presence.received([json.dumps({"channel": "c", "seq": 1, "count": 1, "join": ["ann"],
                                   "leave": []}),
                       json.dumps({"channel": "c", "seq": 2, "count": 2, "join": ["bob"],
                                   "leave": []})])
    clock.advance(0)
    assert watcher.frames[1:] == [{"event": "join", "channel": "c", "seq": 2, "count": 2,
                                   "members": ["bob"]}]


def test_stopping_waits_for_the_statement_under_way_then_drops_the_members():
    store = Store()
    presence, clock = started(store)
    presence.opened(Socket(), grant("ann"))
    clock.advance(0)
    stopped = defer.Deferred.fromCoroutine(presence.stop())
    assert [what for what, _ in store.calls] == ["beat", "update"]
    store.answer(True)
    assert [what for what, _ in store.calls] == ["beat", "update", "release"]
    store.answer(None)
    assert stopped.called
    clock.advance(60)
    assert len(store.calls) == 3  # no heartbeat after the stop


def test_frames_are_binary():
    socket = Socket()
    from pgws._presence import OFF

    OFF.request(socket, grant("a"), {"presence": "c"})
    assert socket.frames == [{"event": "presence", "channel": "c",
                              "error": "presence is off on this server"}]
    assert binary_frame(b"x")[0] == 0x82


def test_presence_alone_checks_the_schema_name_and_takes_either_routing():
    from pgws._config import ConfigError, load_config

    base = {"db-uri": "postgresql://x/y", "jwt-secret": "s" * 32, "presence": "true"}
    with pytest.raises(ConfigError, match='"journal-schema": must be a lower-case SQL name'):
        load_config(None, {}, {**base, "journal-schema": "Bad-Name"})
    config = load_config(None, {}, {**base, "listen-channel": "everything"})
    assert config.presence and config.listen_channel == "everything"
    with pytest.raises(ConfigError, match='"presence-claim" is empty'):
        load_config(None, {}, {**base, "presence-claim": " "})


def test_a_configured_channel_may_not_be_presences_own():
    from pgws._config import ConfigError, load_config

    base = {"db-uri": "postgresql://x/y", "jwt-secret": "s" * 32, "presence": "true"}
    for key in ("listen-channel", "audit-channel", "meta-channel"):
        with pytest.raises(ConfigError, match=f'"{key}": pgws.presence is presence\'s own'):
            load_config(None, {}, {**base, key: "pgws.presence"})
    assert load_config(None, {}, {**base, "presence": "false", "audit-channel": "pgws.presence"})


def test_notifications_that_are_not_announcements_are_logged_at_most_once_a_minute():
    from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
    from zope.interface import provider

    logged: list[LogEvent] = []

    @provider(ILogObserver)
    def observer(event: LogEvent) -> None:
        logged.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        clock = MemoryReactorClock()
        presence = Presence(clock, Store(), "pgws", "sub", "t")
        presence.received(["x"] * 500)
        clock.advance(30)
        presence.received(["x"])
        clock.advance(31)
        presence.received(["x"])
    finally:
        globalLogPublisher.removeObserver(observer)
    counts = [e["n"] for e in logged if "ignored" in e.get("log_format", "")]
    assert counts == [1, 501]  # the first at once; the 499, 1 and 1 after, a minute later
