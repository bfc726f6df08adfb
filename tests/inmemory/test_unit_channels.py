"""
Unit tests of L{pgws._channels.ChannelRegistry}: which sockets read which channel, when the
listener must LISTEN and UNLISTEN, and how a run of notifications reaches the readers.  The
listener is a L{ListenTarget} recorder, the readers are recorders of what they were written.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from pgws._channels import ChannelRegistry
from pgws._frames import text_frame
from pgws._routing import ListenChannelRouting


class Listener:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.waiting: dict[str, defer.Deferred[None]] = {}

    def listen(self, channel: str) -> None:
        self.commands.append(f"LISTEN {channel}")

    def unlisten(self, channel: str) -> None:
        self.commands.append(f"UNLISTEN {channel}")

    def ready(self, channel: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting[channel] = d
        return d


class Reader:
    wants_positions = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[bytes] = []
        self.on_write: Any = None
        self.unsent = 0

    def pending(self) -> int:
        return self.unsent

    def write_frames(self, frames: bytes) -> None:
        self.writes.append(frames)
        if self.on_write is not None:
            self.on_write()

    def __repr__(self) -> str:
        return f"Reader({self.name})"


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> bytes:
        self.calls.append(payload)
        return b"<" + payload + b">"


# -- LISTEN and UNLISTEN ----------------------------------------------------------------------


def test_the_first_reader_of_a_channel_makes_the_listener_listen():
    listener = Listener()
    registry = ChannelRegistry(listener)
    registry.add("room", Reader("a"))
    assert listener.commands == ["LISTEN room"]
    assert registry.readers("room") == 1


def test_a_second_reader_does_not_listen_again():
    listener = Listener()
    registry = ChannelRegistry(listener)
    registry.add("room", Reader("a"))
    registry.add("room", Reader("b"))
    assert listener.commands == ["LISTEN room"]
    assert registry.readers("room") == 2


def test_the_same_reader_added_twice_is_one_reader():
    listener = Listener()
    registry = ChannelRegistry(listener)
    a = Reader("a")
    registry.add("room", a)
    registry.add("room", a)
    assert registry.readers("room") == 1
    registry.remove("room", a)
    assert listener.commands == ["LISTEN room", "UNLISTEN room"]


def test_only_the_last_reader_leaving_makes_the_listener_unlisten():
    listener = Listener()
    registry = ChannelRegistry(listener)
    a, b = Reader("a"), Reader("b")
    registry.add("room", a)
    registry.add("room", b)
    registry.remove("room", a)
    assert listener.commands == ["LISTEN room"]
    registry.remove("room", b)
    assert listener.commands == ["LISTEN room", "UNLISTEN room"]
    assert registry.readers("room") == 0


def test_removing_a_reader_that_is_not_there_changes_nothing():
    listener = Listener()
    registry = ChannelRegistry(listener)
    a = Reader("a")
    registry.remove("room", a)
    registry.add("room", a)
    registry.remove("room", Reader("b"))
    registry.remove("other", a)
    assert listener.commands == ["LISTEN room"]
    assert registry.readers("room") == 1


def test_a_channel_read_again_after_its_unlisten_is_listened_again():
    listener = Listener()
    registry = ChannelRegistry(listener)
    a = Reader("a")
    registry.add("room", a)
    registry.remove("room", a)
    registry.add("room", a)
    assert listener.commands == ["LISTEN room", "UNLISTEN room", "LISTEN room"]


def test_with_listen_channel_routing_two_channels_share_one_listen():
    listener = Listener()
    registry = ChannelRegistry(listener, ListenChannelRouting("pgws"))
    a, b = Reader("a"), Reader("b")
    registry.add("room", a)
    registry.add("hall", b)
    assert listener.commands == ["LISTEN pgws"]
    registry.remove("room", a)
    assert listener.commands == ["LISTEN pgws"]  # "hall" still reads through it
    registry.remove("hall", b)
    assert listener.commands == ["LISTEN pgws", "UNLISTEN pgws"]


def test_ready_asks_the_listener_about_each_database_channel_and_waits_for_all():
    listener = Listener()
    registry = ChannelRegistry(listener)
    registry.add("a", Reader("r"))
    registry.add("b", Reader("r"))
    d = registry.ready(["a", "b"])
    listener.waiting["a"].callback(None)
    assert not d.called
    listener.waiting["b"].callback(None)
    assert d.called


def test_ready_with_listen_channel_routing_waits_for_the_listen_channel():
    listener = Listener()
    registry = ChannelRegistry(listener, ListenChannelRouting("pgws"))
    registry.add("room", Reader("r"))
    d = registry.ready(["room"])
    assert list(listener.waiting) == ["pgws"]
    listener.waiting["pgws"].callback(None)
    assert d.called


# -- deliver ------------------------------------------------------------------------------------------


def test_deliver_builds_each_frame_once_whatever_the_number_of_readers():
    encode = CountingEncoder()
    registry = ChannelRegistry(Listener(), encode_frame=encode)
    readers = [Reader(str(n)) for n in range(5)]
    for reader in readers:
        registry.add("room", reader)
    assert registry.deliver("room", [b"1", b"2", b"3"]) == 5
    assert encode.calls == [b"1", b"2", b"3"]
    assert [r.writes for r in readers] == [[b"<1><2><3>"]] * 5


def test_deliver_of_a_single_notification_builds_one_frame():
    encode = CountingEncoder()
    registry = ChannelRegistry(Listener(), encode_frame=encode)
    a = Reader("a")
    registry.add("room", a)
    assert registry.deliver("room", [b"x"]) == 1
    assert encode.calls == [b"x"]
    assert a.writes == [b"<x>"]


def test_deliver_writes_text_frames_by_default():
    registry = ChannelRegistry(Listener())
    a = Reader("a")
    registry.add("room", a)
    registry.deliver("room", [b"hi", b"there"])
    assert a.writes == [text_frame(b"hi") + text_frame(b"there")]
    assert a.writes == [b"\x81\x02hi\x81\x05there"]


def test_deliver_to_a_channel_nobody_reads_builds_nothing():
    encode = CountingEncoder()
    registry = ChannelRegistry(Listener(), encode_frame=encode)
    registry.add("other", Reader("a"))
    assert registry.deliver("room", [b"x"]) == 0
    assert encode.calls == []


def test_deliver_reaches_only_the_readers_of_that_channel():
    registry = ChannelRegistry(Listener(), encode_frame=CountingEncoder())
    a, b = Reader("a"), Reader("b")
    registry.add("room", a)
    registry.add("hall", b)
    registry.deliver("room", [b"x"])
    assert a.writes == [b"<x>"]
    assert b.writes == []


def test_deliver_serves_readers_in_the_order_they_came():
    registry = ChannelRegistry(Listener(), encode_frame=CountingEncoder())
    order: list[str] = []
    readers = [Reader(name) for name in ("c", "a", "b")]
    for reader in readers:
        reader.on_write = lambda name=reader.name: order.append(name)
        registry.add("room", reader)
    registry.deliver("room", [b"x"])
    assert order == ["c", "a", "b"]


def test_a_reader_removed_by_its_own_write_does_not_break_the_loop():
    listener = Listener()
    registry = ChannelRegistry(listener, encode_frame=CountingEncoder())
    a, b, c = Reader("a"), Reader("b"), Reader("c")
    for reader in (a, b, c):
        registry.add("room", reader)
    b.on_write = lambda: registry.remove("room", b)  # too slow: its write closes it
    assert registry.deliver("room", [b"x"]) == 3
    assert [a.writes, b.writes, c.writes] == [[b"<x>"]] * 3
    assert registry.readers("room") == 2
    registry.deliver("room", [b"y"])
    assert b.writes == [b"<x>"]
    assert c.writes == [b"<x>", b"<y>"]


def test_the_last_reader_removed_by_its_own_write_unlistens():
    listener = Listener()
    registry = ChannelRegistry(listener, encode_frame=CountingEncoder())
    a = Reader("a")
    registry.add("room", a)
    a.on_write = lambda: registry.remove("room", a)
    assert registry.deliver("room", [b"x"]) == 1
    assert listener.commands == ["LISTEN room", "UNLISTEN room"]
    assert registry.deliver("room", [b"y"]) == 0


def test_behind_counts_the_readers_of_a_channel_over_a_limit():
    registry = ChannelRegistry(Listener())
    a, b, c = Reader("a"), Reader("b"), Reader("c")
    for reader in (a, b):
        registry.add("room", reader)
    registry.add("other", c)
    a.unsent, b.unsent, c.unsent = 101, 100, 10**6
    assert registry.behind("room", 100) == (1, 2)
    assert registry.behind("nobody", 100) == (0, 0)
