"""
The journal's logic in memory: resume requests, which channels are journaled, position frames,
the registry's journaled writes, and the journal's streams (wake-ups, reading, the replay
switch) over a stand-in for its tables.  The SQL itself is tested on PostgreSQL in
tests/test_journal.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgws._auth import Refusal
from pgws._channels import ChannelRegistry, position_frames
from pgws._fanout import Fanout
from pgws._frames import binary_frame, text_frame
from pgws._journal import FETCH_ROWS, PACE_LIMIT, PACE_STEP, Journal, Resume, matcher, parse_resume

# -- the resume request -------------------------------------------------------------------------


def test_no_query_is_no_resume():
    assert parse_resume("/chat/jwt") is None
    assert parse_resume("/chat/jwt?x=1") is None


def test_resume_positions_are_parsed():
    uri = "/chat/jwt?resume=" + "%7B%22chat%22%3A%20%5B17%2C%20%22e1%22%5D%7D"
    assert parse_resume(uri) == Resume({"chat": (17, "e1")}, 0)


def test_history_is_parsed():
    assert parse_resume("/chat/jwt?history=25") == Resume({}, 25)


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"chat": 5}', '{"chat": [-1, "e"]}',
                                   '{"chat": [1.5, "e"]}', '{"chat": [true, "e"]}',
                                   '{"chat": [1, 2]}', '{"chat": [1, "e", 3]}'])
def test_malformed_resume_is_a_400(value):
    from urllib.parse import quote

    with pytest.raises(Refusal) as refused:
        parse_resume("/c/jwt?resume=" + quote(value))
    assert (refused.value.status, refused.value.reason) == (
        400, 'resume must be JSON {"<channel>": [<seq>, "<epoch>"], ...}')


@pytest.mark.parametrize("value", ["-1", "x", "100001", ""])
def test_malformed_history_is_a_400(value):
    with pytest.raises(Refusal) as refused:
        parse_resume("/c/jwt?history=" + value)
    assert (refused.value.status, refused.value.reason) == (
        400, "history must be a number of messages from 0 to 100000")


def test_channel_patterns():
    journaled = matcher(["orders", "chat-*"])
    assert [journaled(c) for c in ("orders", "chat-1", "chat", "news")] == [True, True, False, False]
    assert matcher(["*"])("anything")


# -- frames -------------------------------------------------------------------------------------


def test_position_frames_are_a_binary_position_then_the_text_payload():
    frames = position_frames("chat", [(7, "héllo"), (8, "x")])
    assert frames == (binary_frame(b'{"channel":"chat","seq":7}') + text_frame("héllo".encode())
                      + binary_frame(b'{"channel":"chat","seq":8}') + text_frame(b"x"))


def test_position_frame_channel_is_json_escaped():
    frames = position_frames('a"b', [(1, "")])
    assert json.loads(frames[2:2 + frames[1]]) == {"channel": 'a"b', "seq": 1}


# -- the registry's journaled writes ----------------------------------------------------------------


class Target:
    def listen(self, channel: str) -> None:
        pass

    def unlisten(self, channel: str) -> None:
        pass

    def ready(self, channel: str) -> defer.Deferred[None]:
        return defer.succeed(None)


class Reader:
    def __init__(self, positions: bool) -> None:
        self.wants_positions = positions
        self.written: list[bytes] = []
        self.unsent = 0

    def pending(self) -> int:
        return self.unsent

    def write_frames(self, frames: bytes) -> None:
        self.written.append(frames)


def test_rows_go_with_positions_to_readers_that_want_them_and_plain_to_others():
    registry = ChannelRegistry(Target())
    plain, positioned = Reader(False), Reader(True)
    registry.add("c", plain)
    registry.add("c", positioned)
    assert registry.deliver_rows("c", [(1, "a"), (2, "b")]) == 2
    assert plain.written == [text_frame(b"a") + text_frame(b"b")]
    assert positioned.written == [position_frames("c", [(1, "a"), (2, "b")])]


def test_a_held_reader_is_skipped_until_released():
    registry = ChannelRegistry(Target())
    reader = Reader(True)
    registry.hold("c", reader)
    registry.add("c", reader)
    assert registry.deliver_rows("c", [(1, "a")]) == 0
    registry.release("c", reader)
    registry.deliver_rows("c", [(2, "b")])
    assert reader.written == [position_frames("c", [(2, "b")])]


def test_plain_notifications_still_reach_a_held_reader():
    registry = ChannelRegistry(Target())
    reader = Reader(True)
    registry.hold("c", reader)
    registry.add("c", reader)
    registry.deliver("c", [b"plain"])
    assert reader.written == [text_frame(b"plain")]


def test_removing_a_reader_releases_it():
    registry = ChannelRegistry(Target())
    reader = Reader(True)
    registry.hold("c", reader)
    registry.add("c", reader)
    registry.remove("c", reader)
    registry.add("c", reader)
    registry.deliver_rows("c", [(1, "a")])
    assert reader.written == [position_frames("c", [(1, "a")])]


# -- the fan-out of rows -----------------------------------------------------------------------------


class Runs:
    wake_channel = "pgws.wake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def deliver(self, channel: str, payloads: list[Any]) -> int:
        self.calls.append((channel, payloads))
        return 1

    def woken(self, payloads: list[str]) -> None:
        self.calls.append(("woken", payloads))


def test_rows_and_notifications_keep_their_order_in_separate_runs():
    readers, journal = Runs(), Runs()
    fanout = Fanout(MemoryReactorClock(), readers, journal=journal)
    fanout.received([("c", "n1")])
    fanout.received_rows("c", [(1, "r1"), (2, "r2")])
    fanout.received([("c", "n2"), ("pgws.wake", "c")])
    assert readers.calls[0] == ("c", [b"n1"])
    assert journal.calls == [("c", [(1, "r1"), (2, "r2")]), ("woken", ["c"])]
    assert readers.calls[1] == ("c", [b"n2"])


# -- the journal's streams, over a stand-in for its tables ----------------------------------------


class Tables:
    """streams and messages, answering the journal's queries as PostgreSQL would."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, str]]] = {}
        self.epoch = "e1"
        self.queries: list[str] = []
        self.held: list[defer.Deferred[None]] = []
        self.hold = False

    def send(self, channel: str, payload: str) -> int:
        rows = self.rows.setdefault(channel, [])
        rows.append((len(rows) + 1, payload))
        return len(rows)

    def run_query(self, sql: str, args: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]:
        self.queries.append(sql)
        answer = self._answer(sql, args)
        if not self.hold:
            return defer.succeed(answer)
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)
        return d.addCallback(lambda _: self._answer(sql, args))

    def _answer(self, sql: str, args: Any) -> list[tuple[Any, ...]]:
        if "streams" in sql:
            return [(self.epoch, len(self.rows.get(args[0], [])))]
        if sql.startswith("SELECT min(seq)"):
            rows = self.rows.get(args[0], [])
            return [(rows[0][0] if rows else None,)]
        if sql.startswith("SELECT seq, payload"):
            channel, after = args
            upto = re.search(r"seq <= (\d+)", sql)
            limit = int(re.search(r"LIMIT (\d+)", sql).group(1))  # type: ignore[union-attr]
            rows = [r for r in self.rows.get(channel, []) if r[0] > after
                    and (upto is None or r[0] <= int(upto.group(1)))]
            return list(rows[:limit])
        raise AssertionError(sql)

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def run_transaction(self, statements: list[str]) -> defer.Deferred[None]:
        return defer.succeed(None)


def journal_over(tables: Tables, pace_bytes: int = 0,
                 ) -> tuple[Journal, ChannelRegistry, Fanout, MemoryReactorClock]:
    clock = MemoryReactorClock()
    journal = Journal(clock, tables, "pgws", matcher(["*"]), 1000, 0, 0, pace_bytes=pace_bytes)
    journal.migrated = True
    registry = ChannelRegistry(Target())
    fanout = Fanout(clock, registry, journal=journal)
    journal.deliver_to(registry, fanout)
    return journal, registry, fanout, clock


def test_a_watched_stream_is_ready_once_its_head_is_known():
    tables = Tables()
    tables.send("c", "old")
    journal, *_ = journal_over(tables)
    tables.hold = True
    journal.watch("c")
    ready = journal.ready("c")
    assert not ready.called
    tables.release()
    assert ready.called
    assert journal.stream_info("c") == ("e1", 1)


def test_a_wake_up_reads_the_rows_after_the_last_read_in_order():
    tables = Tables()
    journal, registry, _, _ = journal_over(tables)
    reader = Reader(True)
    registry.add("c", reader)
    journal.watch("c")
    tables.send("c", "a")
    tables.send("c", "b")
    journal.woken(["c"])
    assert reader.written == [position_frames("c", [(1, "a"), (2, "b")])]
    journal.woken(["c", "c"])  # nothing new: nothing is written again
    assert len(reader.written) == 1


def test_wake_ups_of_channels_nobody_reads_are_ignored():
    tables = Tables()
    journal, *_ = journal_over(tables)
    tables.send("other", "x")
    journal.woken(["other", ""])
    assert not [q for q in tables.queries if q.startswith("SELECT seq")]


def test_a_full_read_reads_again():
    tables = Tables()
    journal, registry, _, clock = journal_over(tables)
    reader = Reader(False)
    registry.add("c", reader)
    journal.watch("c")
    for i in range(FETCH_ROWS + 5):
        tables.send("c", str(i))
    journal.woken(["c"])
    clock.advance(0)
    got = b"".join(reader.written)
    assert got == b"".join(text_frame(str(i).encode()) for i in range(FETCH_ROWS + 5))


def test_after_a_reconnect_every_stream_reads_what_it_missed():
    tables = Tables()
    journal, registry, _, _ = journal_over(tables)
    reader = Reader(True)
    registry.add("c", reader)
    journal.watch("c")
    tables.send("c", "missed")  # its wake-up was lost with the session
    journal.recovered()
    assert reader.written == [position_frames("c", [(1, "missed")])]


def paced(readers: int, behind: int) -> tuple[Tables, Journal, list[Reader], MemoryReactorClock]:
    """A journal pacing at 1000 bytes, C{behind} of its C{readers} having 5000 not sent."""
    tables = Tables()
    journal, registry, _, clock = journal_over(tables, pace_bytes=1000)
    group = [Reader(True) for _ in range(readers)]
    for i, reader in enumerate(group):
        reader.unsent = 5000 if i < behind else 0
        registry.add("c", reader)
    journal.watch("c")
    tables.send("c", "a")
    journal.woken(["c"])
    return tables, journal, group, clock


def seqs_of(reader: Reader) -> list[int]:
    return [int(m) for m in re.findall(rb'"seq":(\d+)', b"".join(reader.written))]


def test_reads_wait_while_most_readers_are_behind_and_go_on_once_they_catch_up():
    _, _, group, clock = paced(readers=10, behind=5)
    assert seqs_of(group[9]) == []  # the rows wait in the table
    clock.advance(0.1)
    assert seqs_of(group[9]) == []
    for reader in group:
        reader.unsent = 0
    clock.advance(0.05)
    assert seqs_of(group[9]) == [1]


def test_one_reader_in_ten_behind_does_not_slow_the_others():
    _, _, group, _ = paced(readers=10, behind=1)
    assert seqs_of(group[9]) == [1]


def test_a_stalled_majority_holds_reads_back_only_for_a_while():
    # Readers that take nothing are cut off by the slow-reader rule once written to again.
    _, _, group, clock = paced(readers=4, behind=4)
    steps = round(PACE_LIMIT / PACE_STEP)
    clock.pump([PACE_STEP] * (steps - 2))
    assert seqs_of(group[0]) == []
    clock.pump([PACE_STEP] * 4)
    assert seqs_of(group[0]) == [1]


def test_no_pacing_without_pace_bytes():
    tables = Tables()
    journal, registry, _, _ = journal_over(tables)
    reader = Reader(True)
    reader.unsent = 10**9
    registry.add("c", reader)
    journal.watch("c")
    tables.send("c", "a")
    journal.woken(["c"])
    assert seqs_of(reader) == [1]


def open_reader(journal: Journal, registry: ChannelRegistry, reader: Reader,
                resume: Resume | None) -> tuple[list[dict[str, Any]], defer.Deferred[None]]:
    controls: list[dict[str, Any]] = []
    registry.hold("c", reader)
    registry.add("c", reader)
    d = defer.Deferred.fromCoroutine(journal.open_reader(reader, "c", resume, controls.append))
    return controls, d


def test_resume_replays_after_the_position_then_live_without_gap_or_duplicate():
    tables = Tables()
    for i in range(1, 6):
        tables.send("c", f"m{i}")
    journal, registry, _, _ = journal_over(tables)
    journal.watch("c")
    tables.hold = True
    reader = Reader(True)
    controls, done = open_reader(journal, registry, reader, Resume({"c": (2, "e1")}))
    # While the replay's statements wait, two more messages commit and are fanned out live.
    tables.send("c", "m6")
    tables.send("c", "m7")
    journal.woken(["c"])
    while tables.held:
        tables.release()
    assert done.called
    # Sent before the replay: where the channel stood when the reader opened.
    assert controls == [{"event": "stream", "channel": "c", "epoch": "e1", "seq": 5,
                         "recovered": True}]
    seqs = [int(m) for m in re.findall(rb'"seq":(\d+)', b"".join(reader.written))]
    assert seqs == [3, 4, 5, 6, 7]
    tables.hold = False
    tables.send("c", "m8")
    journal.woken(["c"])
    seqs = [int(m) for m in re.findall(rb'"seq":(\d+)', b"".join(reader.written))]
    assert seqs == [3, 4, 5, 6, 7, 8]


def test_resume_with_another_epoch_is_not_recovered_and_replays_nothing():
    tables = Tables()
    tables.send("c", "m1")
    journal, registry, _, _ = journal_over(tables)
    journal.watch("c")
    reader = Reader(True)
    controls, _ = open_reader(journal, registry, reader, Resume({"c": (0, "recreated")}))
    assert controls == [{"event": "stream", "channel": "c", "epoch": "e1", "seq": 1,
                         "recovered": False}]
    assert reader.written == []


def test_resume_from_before_what_is_retained_is_not_recovered():
    tables = Tables()
    for i in range(1, 11):
        tables.send("c", f"m{i}")
    del tables.rows["c"][:5]  # pruned: 6..10 are left
    journal, registry, _, _ = journal_over(tables)
    journal.watch("c")
    reader = Reader(True)
    controls, _ = open_reader(journal, registry, reader, Resume({"c": (3, "e1")}))
    assert controls[0]["recovered"] is False
    assert reader.written == []
    controls, _ = open_reader(journal, registry, Reader(True), Resume({"c": (5, "e1")}))
    assert controls[0]["recovered"] is True


def test_history_replays_the_last_messages():
    tables = Tables()
    for i in range(1, 11):
        tables.send("c", f"m{i}")
    journal, registry, _, _ = journal_over(tables)
    journal.watch("c")
    reader = Reader(True)
    controls, _ = open_reader(journal, registry, reader, Resume({}, history=3))
    assert controls == [{"event": "stream", "channel": "c", "epoch": "e1", "seq": 10}]
    assert reader.written == [position_frames("c", [(8, "m8"), (9, "m9"), (10, "m10")])]


def test_no_resume_is_live_from_the_head():
    tables = Tables()
    tables.send("c", "before")
    journal, registry, _, _ = journal_over(tables)
    journal.watch("c")
    reader = Reader(True)
    controls, _ = open_reader(journal, registry, reader, None)
    assert controls == [{"event": "stream", "channel": "c", "epoch": "e1", "seq": 1}]
    tables.send("c", "after")
    journal.woken(["c"])
    assert reader.written == [position_frames("c", [(2, "after")])]
