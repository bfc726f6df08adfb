"""
Unit tests of L{pgws._framewriter}: L{FrameWriter} (frames to one socket, straight to the kernel
when nothing waits, else through Twisted's buffer) and L{ReaderLag} (when a reader is too slow).

No fake buffer: the transports are Twisted's own.  L{SlowKernel} is a
L{twisted.internet.abstract.FileDescriptor} whose C{writeSomeData} takes C{per_call} bytes each
time Twisted offers data (what a kernel with a full socket buffer would take), so C{pending()}
reads Twisted's real C{dataBuffer}, C{offset} and C{_tempDataLen}; it has no socket, as under TLS,
so every write goes through the buffer.  For the direct path, a real L{twisted.internet.tcp.Connection}
runs over L{FakeSocket}, whose C{send} takes C{per_call} bytes.  One reactor iteration's write is
L{turn}: a transport registered for writing gets one C{doWrite}.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, cast

import pytest
from twisted.internet import abstract, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import policies

from pgws._channels import ChannelRegistry
from pgws._fanout import Fanout
from pgws._framewriter import (
    LARGEST_NOTIFY_FRAME,
    SEND_LIMIT,
    SLOW_READER_GRACE,
    SLOW_READER_HARD_FACTOR,
    FrameWriter,
    ReaderLag,
)

STEP = 1 / 64
MAX = 1000  # max_pending in most tests


class SlowKernel(abstract.FileDescriptor):
    connected = 1

    def __init__(self, reactor: MemoryReactorClock, per_call: int) -> None:
        super().__init__(reactor)
        self.per_call = per_call
        self.taken = bytearray()

    def writeSomeData(self, data: bytes) -> int:
        n = min(len(data), self.per_call)
        self.taken += bytes(data[:n])
        return n


class FakeSocket:
    def __init__(self, per_call: int) -> None:
        self.per_call = per_call
        self.taken = bytearray()
        self.sends = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def send(self, data: bytes) -> int:
        self.sends += 1
        n = min(len(data), self.per_call)
        if n == 0 and data:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.taken += bytes(data[:n])
        return n


def tcp_connection(clock: MemoryReactorClock, per_call: int) -> tuple[tcp.Connection, FakeSocket]:
    sock = FakeSocket(per_call)
    conn = tcp.Connection(cast(socket.socket, sock), Protocol(), clock)
    conn.connected = 1
    return conn, sock


def turn(clock: MemoryReactorClock) -> None:
    for writer in list(clock.getWriters()):
        cast(Any, writer).doWrite()


class Cuts:
    """The writer's too_slow callback: when, and with how much pending."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.at: list[tuple[float, int]] = []

    def __call__(self, pending: int) -> None:
        self.at.append((self.clock.seconds(), pending))


def slow(per_call: int, max_pending: int = MAX) -> tuple[FrameWriter, SlowKernel, Cuts, MemoryReactorClock]:
    clock = MemoryReactorClock()
    transport = SlowKernel(clock, per_call)
    cuts = Cuts(clock)
    return FrameWriter(transport, ReaderLag(max_pending, clock), cuts), transport, cuts, clock


# -- pending() reads Twisted's buffer -----------------------------------------------------------------


def test_pending_counts_the_unsent_part_of_twisteds_buffer_and_its_queued_writes():
    writer, transport, _, clock = slow(per_call=300)
    writer.write(b"a" * 1000)
    assert (len(transport.dataBuffer), transport.offset, transport._tempDataLen) == (0, 0, 1000)
    assert writer.pending() == 1000
    turn(clock)  # the kernel takes 300
    assert (len(transport.dataBuffer), transport.offset, transport._tempDataLen) == (1000, 300, 0)
    assert writer.pending() == 700
    writer.write(b"b" * 500)
    assert (len(transport.dataBuffer), transport.offset, transport._tempDataLen) == (1000, 300, 500)
    assert writer.pending() == 1200
    turn(clock)
    assert writer.pending() == 900
    for _ in range(3):
        turn(clock)
    assert writer.pending() == 0
    assert bytes(transport.taken) == b"a" * 1000 + b"b" * 500


def test_a_transport_without_twisteds_buffer_has_nothing_pending():
    writer = FrameWriter(StringTransport(), ReaderLag(MAX, MemoryReactorClock()), lambda n: None)
    writer.write(b"x" * 10_000)
    assert writer.pending() == 0


def test_the_writer_raises_twisteds_send_limit_on_its_transport():
    writer, transport, _, _ = slow(per_call=0)
    assert SEND_LIMIT == 4 * 1024 * 1024
    assert transport.SEND_LIMIT == SEND_LIMIT
    assert abstract.FileDescriptor.SEND_LIMIT == 128 * 1024  # the class is left alone


# -- the slow-reader policy -----------------------------------------------------------------------


def test_a_reader_over_the_limit_is_not_cut_off_at_once():
    writer, _, cuts, _ = slow(per_call=0)
    writer.write(b"x" * 600)
    writer.write(b"x" * 600)
    assert writer.pending() == 1200
    assert cuts.at == []


def test_a_reader_that_takes_nothing_is_cut_off_after_the_grace_period_over_the_limit():
    writer, transport, cuts, clock = slow(per_call=0)
    writer.write(b"x" * 600)
    writer.write(b"x" * 600)  # over the limit from t=0
    clock.advance(SLOW_READER_GRACE - STEP)
    turn(clock)
    writer.write(b"x" * 100)
    assert cuts.at == []
    clock.advance(STEP)
    turn(clock)
    writer.write(b"x" * 100)
    assert SLOW_READER_GRACE == 1.0
    assert cuts.at == [(1.0, 1400)]


def test_a_reader_that_keeps_taking_is_never_cut_off_though_always_over_the_limit():
    writer, transport, cuts, clock = slow(per_call=600)
    writer.write(b"x" * 2100)
    for _ in range(40):  # 10 s
        clock.advance(0.25)
        turn(clock)
        writer.write(b"x" * 600)
        assert writer.pending() == 2100
    assert cuts.at == []
    assert len(transport.taken) == 40 * 600


def test_any_progress_counts_even_one_byte_per_turn():
    writer, transport, cuts, clock = slow(per_call=1)
    writer.write(b"x" * 2100)
    for _ in range(40):
        clock.advance(0.25)
        turn(clock)
        writer.write(b"x")
    assert cuts.at == []
    assert writer.pending() == 2100


def test_the_grace_period_runs_from_the_reader_s_last_progress():
    writer, transport, cuts, clock = slow(per_call=600)
    writer.write(b"x" * 2100)
    for _ in range(4):  # it takes 600 bytes every 0.25 s until t=1
        clock.advance(0.25)
        turn(clock)
        writer.write(b"x" * 600)
    transport.per_call = 0  # then nothing
    for _ in range(3):
        clock.advance(0.25)
        turn(clock)
        writer.write(b"x" * 100)
    assert cuts.at == []
    clock.advance(0.25)
    turn(clock)
    writer.write(b"x" * 100)
    assert cuts.at == [(2.0, 2500)]


def test_a_reader_that_caught_up_starts_a_new_grace_period_when_it_falls_behind_again():
    writer, transport, cuts, clock = slow(per_call=0)
    writer.write(b"x" * 1200)  # behind at t=0
    clock.advance(0.5)
    transport.per_call = 10**6
    turn(clock)
    writer.write(b"x" * 100)  # at the limit or under: caught up
    clock.advance(0.25)
    transport.per_call = 0
    writer.write(b"x" * 1200)  # behind again at t=0.75
    clock.advance(0.75)
    writer.write(b"x" * 10)
    assert cuts.at == []
    clock.advance(0.25)
    writer.write(b"x" * 10)
    assert cuts.at == [(1.75, 1320)]


BIG = 20_000  # a max_pending whose 4x is past what a few NOTIFY frames need


def test_a_reader_over_the_hard_factor_is_cut_off_at_once():
    writer, _, cuts, _ = slow(per_call=0, max_pending=BIG)
    assert SLOW_READER_HARD_FACTOR == 4
    writer.write(b"x" * (SLOW_READER_HARD_FACTOR * BIG + 1))
    assert cuts.at == [(0.0, 80001)]


def test_a_reader_at_exactly_the_hard_factor_is_not_cut_off_at_once():
    writer, _, cuts, _ = slow(per_call=0, max_pending=BIG)
    writer.write(b"x" * (SLOW_READER_HARD_FACTOR * BIG))
    assert cuts.at == []


def test_with_a_small_limit_one_largest_notification_is_not_cut_off_at_once():
    # 4 x 1000 is less than one 8000-byte NOTIFY frame: a prompt reader would be cut for it.
    writer, _, cuts, _ = slow(per_call=0, max_pending=1000)
    writer.write(b"x" * (1000 + 4 * LARGEST_NOTIFY_FRAME))
    assert cuts.at == []
    writer.write(b"x")
    assert cuts.at == [(0.0, 1001 + 4 * LARGEST_NOTIFY_FRAME)]


def test_the_largest_journaled_frame_raises_the_cut_off_at_once():
    clock = MemoryReactorClock()
    lag = ReaderLag(BIG, clock, largest_frame=5_000_000)
    # A few of them may wait: the next is written a turn later, before the reader took the last.
    assert lag.too_slow(BIG + 20_000_000, 0) is False  # over: the grace period starts
    assert lag.too_slow(BIG + 20_000_001, 0) is True


def test_a_reader_over_the_hard_factor_is_cut_off_even_while_it_takes_data():
    writer, transport, cuts, clock = slow(per_call=10000, max_pending=BIG)
    writer.write(b"x" * 60000)
    clock.advance(0.1)
    turn(clock)  # it took 10000
    writer.write(b"x" * 32000)
    assert cuts.at == [(0.1, 82000)]


def test_reader_lag_alone_exact_limits():
    clock = MemoryReactorClock()
    lag = ReaderLag(MAX, clock)
    assert lag.too_slow(MAX, MAX) is False  # at the limit: fine
    assert lag.too_slow(MAX + 1, MAX + 1) is False  # over: the grace period starts
    clock.advance(1.0)
    assert lag.too_slow(MAX + 1, MAX + 1) is True  # nothing flushed in 1 s


# -- the direct path over a TCP transport ----------------------------------------------------------


def test_with_nothing_pending_frames_go_straight_to_the_socket():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=10**6)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), lambda n: None)
    writer.write(b"frame-1")
    writer.write(b"frame-2")
    assert bytes(sock.taken) == b"frame-1frame-2"
    assert sock.sends == 2
    assert clock.getWriters() == []  # Twisted was never asked to write
    assert writer.pending() == 0


def test_what_the_socket_does_not_take_goes_to_twisteds_buffer_and_later_frames_queue_behind_it():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=100)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), lambda n: None)
    writer.write(b"a" * 300)
    assert len(sock.taken) == 100
    assert writer.pending() == 200
    assert clock.getWriters() == [conn]
    writer.write(b"b" * 50)
    assert sock.sends == 1  # not sent around the buffer
    assert writer.pending() == 250
    for _ in range(3):
        turn(clock)
    assert bytes(sock.taken) == b"a" * 300 + b"b" * 50
    assert clock.getWriters() == []


def test_a_socket_that_would_block_leaves_everything_to_twisteds_buffer():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=0)
    cuts = Cuts(clock)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), cuts)
    writer.write(b"x" * 300)
    assert sock.sends == 1
    assert writer.pending() == 300
    assert cuts.at == []


def test_a_full_direct_send_counts_as_caught_up():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=0)
    cuts = Cuts(clock)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), cuts)
    writer.write(b"x" * 1200)  # behind at t=0
    clock.advance(0.5)
    sock.per_call = 10**6
    turn(clock)
    writer.write(b"x" * 10)  # straight to the kernel
    assert writer.pending() == 0
    clock.advance(0.25)
    sock.per_call = 0
    writer.write(b"x" * 1200)  # behind again at t=0.75
    clock.advance(0.5)
    writer.write(b"x" * 10)
    assert cuts.at == []
    clock.advance(0.5)
    writer.write(b"x" * 10)
    assert cuts.at == [(1.75, 1220)]


def test_after_stop_frames_only_go_through_twisteds_buffer():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=10**6)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), lambda n: None)
    writer.stop()
    writer.write(b"x" * 10)
    assert sock.sends == 0
    assert writer.pending() == 10


def test_a_closing_transport_gets_no_direct_send():
    clock = MemoryReactorClock()
    conn, sock = tcp_connection(clock, per_call=10**6)
    writer = FrameWriter(conn, ReaderLag(MAX, clock), lambda n: None)
    conn.disconnecting = True
    writer.write(b"x" * 10)
    assert sock.sends == 0


class TLSLayer(Protocol):
    """What a TCP transport with TLS started writes through."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_tcp_transport_with_tls_started_gets_no_direct_send():
    clock = MemoryReactorClock()
    sock = FakeSocket(per_call=10**6)
    layer = TLSLayer()
    conn = tcp.Connection(cast(socket.socket, sock), layer, clock)
    conn.connected = 1
    cast(Any, conn).TLS = True
    writer = FrameWriter(conn, ReaderLag(MAX, clock), lambda n: None)
    writer.write(b"x" * 10)
    assert sock.sends == 0
    assert layer.written == [b"x" * 10]


# -- bugs -------------------------------------------------------------------------------------------


def wrapped(clock: MemoryReactorClock, per_call: int) -> tuple[policies.ProtocolWrapper, tcp.Connection]:
    """A wrapping transport over TCP, as TLS is: writes go down, attribute reads are forwarded."""
    conn, _ = tcp_connection(clock, per_call)
    wrapper = policies.ProtocolWrapper(cast(Any, None), Protocol())
    wrapper.transport = conn
    return wrapper, conn


def test_under_tls_the_send_limit_of_the_tcp_transport_below_is_raised():
    pytest.importorskip("OpenSSL")
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    clock = MemoryReactorClock()
    conn, _ = tcp_connection(clock, per_call=10**9)
    tls = TLSMemoryBIOProtocol(cast(Any, None), Protocol())
    tls.transport = conn
    FrameWriter(tls, ReaderLag(MAX, clock), lambda n: None)
    assert conn.SEND_LIMIT == SEND_LIMIT


def test_a_prompt_reader_behind_a_wrapping_transport_is_not_cut_off_by_full_slices():
    clock = MemoryReactorClock()
    wrapper, conn = wrapped(clock, per_call=10**9)
    cuts = Cuts(clock)
    max_pending = 1024 * 1024
    writer = FrameWriter(wrapper, ReaderLag(max_pending, clock), cuts)
    for _ in range(4):
        writer.write(b"x" * (2 * max_pending))
        turn(clock)
    assert cuts.at == []


class Listener:
    def listen(self, channel: str) -> None:
        pass

    def unlisten(self, channel: str) -> None:
        pass

    def ready(self, channel: str) -> Any:
        raise AssertionError("not used")


class SocketReader:
    """A socket as the registry sees it: write_frames goes to its FrameWriter."""

    wants_positions = False

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer

    def write_frames(self, frames: bytes) -> None:
        self.writer.write(frames)

    def pending(self) -> int:
        return self.writer.pending()


def test_a_prompt_reader_is_not_cut_off_by_one_run_when_max_pending_is_small():
    clock = MemoryReactorClock()
    max_pending = 16 * 1024
    wrapper, conn = wrapped(clock, per_call=10**9)
    cuts = Cuts(clock)
    registry = ChannelRegistry(Listener())
    registry.add("room", SocketReader(FrameWriter(wrapper, ReaderLag(max_pending, clock), cuts)))
    fanout = Fanout(clock, registry, slice_bytes=2 * max_pending)
    fanout.received([("room", "x" * 700)] * 100)
    assert cuts.at == []
