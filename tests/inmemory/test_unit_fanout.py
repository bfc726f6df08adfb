"""
Unit tests of L{pgws._fanout.Fanout}: notifications, in PostgreSQL's order, to the readers of their
channel in slices of bounded work, one reactor turn per slice.  The readers are a recorder that
says how many sockets each run reached; the LISTEN session's reading is a recorder of
pause/resume.

C{Clock.advance(0)} runs a C{callLater(0)} made by a call it runs, so it drains the whole backlog
at once; a real reactor runs such a call at its next iteration, after I/O.  L{one_turn} does what
one iteration does: it runs the calls that were due when it began, and only those.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from pgws._fanout import BACKLOG_PAUSE, DELIVERIES_PER_SLICE, MAX_RUN, MAX_RUN_BYTES, Fanout
from pgws._routing import ListenChannelRouting


class Readers:
    """Records each run handed over; C{count} readers per channel (1 unless told)."""

    def __init__(self, count: dict[str, int] | None = None) -> None:
        self.count = count or {}
        self.runs: list[tuple[str, list[bytes]]] = []

    def deliver(self, channel: str, payloads: list[bytes]) -> int:
        self.runs.append((channel, list(payloads)))
        return self.count.get(channel, 1)

    def delivered(self) -> int:
        return sum(len(p) for _, p in self.runs)


class Reading:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")


def make(count: dict[str, int] | None = None, **kwargs) -> tuple[Fanout, Readers, Reading, MemoryReactorClock]:
    clock = MemoryReactorClock()
    readers = Readers(count)
    fanout = Fanout(clock, readers, **kwargs)
    reading = Reading()
    fanout.attach(reading)
    return fanout, readers, reading, clock


def one_turn(clock: MemoryReactorClock) -> None:
    now = clock.seconds()
    due = [call for call in clock.calls if call.getTime() <= now]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def alternating(n: int, size: int = 10) -> list[tuple[str, str]]:
    """n notifications, channels a, b, a, b ... (runs of one), payloads of C{size} characters."""
    return [("ab"[i % 2], f"{i:0{size}d}") for i in range(n)]


# -- runs -------------------------------------------------------------------------------------------


def test_a_small_batch_is_delivered_at_once_in_order():
    fanout, readers, _, _ = make()
    fanout.received([("a", "1"), ("b", "2"), ("a", "3")])
    assert readers.runs == [("a", [b"1"]), ("b", [b"2"]), ("a", [b"3"])]
    assert fanout.busy() is False


def test_consecutive_notifications_of_one_channel_go_as_one_run():
    fanout, readers, _, _ = make()
    fanout.received([("a", "1"), ("a", "2"), ("b", "3"), ("b", "4"), ("a", "5")])
    assert readers.runs == [("a", [b"1", b"2"]), ("b", [b"3", b"4"]), ("a", [b"5"])]


def test_a_run_is_split_at_max_run_notifications():
    fanout, readers, _, _ = make()
    fanout.received([("a", str(i)) for i in range(MAX_RUN + 44)])
    assert [len(p) for _, p in readers.runs] == [MAX_RUN, 44]
    assert readers.runs[1][1][0] == str(MAX_RUN).encode()


def test_a_run_never_goes_past_max_run_bytes():
    fanout, readers, _, _ = make()
    fanout.received([("a", "x" * 1000)] * 100)
    # 65 payloads are 65,000 bytes, under 64 KiB: the 66th would go past it and starts the next.
    assert MAX_RUN_BYTES == 65536
    assert [len(p) for _, p in readers.runs] == [65, 35]


def test_one_payload_larger_than_max_run_bytes_is_a_run_of_its_own():
    fanout, readers, _, _ = make()
    fanout.received([("a", "s"), ("a", "x" * 70000), ("a", "t")])
    assert [len(p) for _, p in readers.runs] == [1, 1, 1]


def test_a_run_that_raises_is_logged_and_the_fan_out_goes_on():
    fanout, readers, _, _ = make()
    calls = []

    def deliver(channel, payloads):
        calls.append(payloads)
        if payloads == [b"boom"]:
            raise RuntimeError("a bug")
        return 1

    fanout._deliver = lambda c, p: deliver(c, [x.encode() for x in p])  # a bug in delivery
    fanout.received([("a", "boom"), ("b", "next")])
    fanout.received([("a", "later")])
    assert calls == [[b"boom"], [b"next"], [b"later"]]


def test_payloads_are_handed_over_as_utf8():
    fanout, readers, _, _ = make()
    fanout.received([("a", "é€")])
    assert readers.runs == [("a", ["é€".encode()])]


# -- slices -----------------------------------------------------------------------------------------


def test_a_backlog_over_the_byte_budget_goes_over_several_turns_in_order():
    # Each run: one 10-byte payload to one reader, plus 10 bytes of frame overhead.
    fanout, readers, _, clock = make(slice_bytes=100)
    fanout.received(alternating(12))
    assert readers.delivered() == 5
    assert fanout.busy() is True
    one_turn(clock)
    assert readers.delivered() == 10
    one_turn(clock)
    assert readers.delivered() == 12
    assert fanout.busy() is False
    assert [p[0] for _, p in readers.runs] == [f"{i:010d}".encode() for i in range(12)]
    assert clock.getDelayedCalls() == []


def test_the_memory_clock_runs_every_slice_in_one_advance():
    fanout, readers, reading, clock = make(slice_bytes=100)
    fanout.received(alternating(12))
    clock.advance(0)
    assert readers.delivered() == 12
    assert fanout.busy() is False


def test_the_byte_budget_counts_every_reader():
    fanout, readers, _, _ = make(count={"a": 3, "b": 3}, slice_bytes=100)
    fanout.received(alternating(12))
    assert readers.delivered() == 2  # 3 readers x 20 bytes per run


def test_a_backlog_over_the_delivery_budget_goes_over_several_turns():
    # A run of MAX_RUN to one reader costs 2 x 256 deliveries (the notification, the write):
    # 40 runs exhaust 20,000, so a slice is 10,240 notifications.
    fanout, readers, _, clock = make()
    fanout.received([("a", "x")] * 25_000)
    assert readers.delivered() == 40 * MAX_RUN
    one_turn(clock)
    assert readers.delivered() == 80 * MAX_RUN
    one_turn(clock)
    assert readers.delivered() == 25_000


def test_notifications_nobody_reads_count_against_the_slice_too():
    fanout, readers, _, _ = make(count={"a": 0})
    fanout.received([("a", "x")] * 25_000)
    # 78 runs are 19,968 deliveries, under 20,000: the 79th run ends the slice.
    assert DELIVERIES_PER_SLICE == 20_000
    assert readers.delivered() == 79 * MAX_RUN


def test_a_batch_received_while_draining_waits_behind_the_backlog():
    fanout, readers, _, clock = make(slice_bytes=100)
    fanout.received(alternating(12))
    fanout.received([("c", "late")])
    assert readers.delivered() == 5  # no extra slice for the new batch
    one_turn(clock)
    one_turn(clock)
    one_turn(clock)
    assert readers.runs[-1] == ("c", [b"late"])
    assert readers.delivered() == 13


# -- pausing the LISTEN socket --------------------------------------------------------------------


def test_reading_pauses_at_backlog_pause_and_resumes_once_drained():
    fanout, readers, reading, clock = make()
    fanout.received([("a", "x")] * (40 * MAX_RUN + BACKLOG_PAUSE))
    assert readers.delivered() == 40 * MAX_RUN  # BACKLOG_PAUSE left
    assert reading.events == ["pause"]
    one_turn(clock)
    assert fanout.busy() is False
    assert reading.events == ["pause", "resume"]


def test_reading_does_not_pause_just_under_backlog_pause():
    fanout, readers, reading, clock = make()
    fanout.received([("a", "x")] * (40 * MAX_RUN + BACKLOG_PAUSE - 1))
    assert readers.delivered() == 40 * MAX_RUN  # BACKLOG_PAUSE - 1 left
    one_turn(clock)
    assert reading.events == []


def test_pause_is_asked_again_every_slice_while_the_backlog_is_long():
    # The session may have a new connection (which reads) since the last slice.
    fanout, readers, reading, clock = make()
    fanout.received([("a", "x")] * (80 * MAX_RUN + BACKLOG_PAUSE))
    assert reading.events == ["pause"]
    one_turn(clock)
    assert readers.delivered() == 80 * MAX_RUN  # BACKLOG_PAUSE left
    assert reading.events == ["pause", "pause"]
    one_turn(clock)
    assert reading.events == ["pause", "pause", "resume"]


# -- listen-channel routing --------------------------------------------------------------------------


def test_listen_channel_routing_sends_a_json_channel_field_to_that_channel_and_text_to_the_listen_channel():
    fanout, readers, _, _ = make(routing=ListenChannelRouting("pgws"))
    fanout.received([
        ("pgws", '{"channel": "room", "n": 1}'),
        ("pgws", '{"channel": "room", "n": 2}'),
        ("pgws", "plain text"),
        ("pgws", '{"channel": "other"}'),
    ])
    assert readers.runs == [
        ("room", [b'{"channel": "room", "n": 1}', b'{"channel": "room", "n": 2}']),
        ("pgws", [b"plain text"]),
        ("other", [b'{"channel": "other"}']),
    ]


def test_listen_channel_routing_sends_what_names_no_channel_to_the_listen_channel():
    fanout, readers, _, _ = make(routing=ListenChannelRouting("pgws"))
    odd = ["[1, 2]", "{not json", '{"channel": 5}', '{"event": "x"}', ""]
    fanout.received([("pgws", p) for p in odd])
    assert readers.runs == [("pgws", [p.encode() for p in odd])]


def test_listen_channel_routing_keeps_order_across_channels():
    fanout, readers, _, _ = make(routing=ListenChannelRouting("pgws"))
    fanout.received([
        ("pgws", '{"channel": "a"}'),
        ("pgws", '{"channel": "b"}'),
        ("pgws", '{"channel": "a"}'),
    ])
    assert [c for c, _ in readers.runs] == ["a", "b", "a"]
