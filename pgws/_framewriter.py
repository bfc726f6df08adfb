"""
Writing pre-built frames to one socket, and cutting off a reader that does not keep up.

This is the only module that touches Twisted's private transport state (C{dataBuffer},
C{offset}, C{_tempDataLen}, C{SEND_LIMIT}, the socket itself): a Twisted upgrade is checked here.

Why it goes around Twisted's buffering:
  - Twisted queues every write, registers the socket with epoll, sends at the next reactor turn
    and unregisters it: two C{epoll_ctl} calls per reader per turn, a quarter of fan-out's CPU.
    When nothing is queued, L{FrameWriter} hands the frames to the kernel at once.
  - Twisted hands at most C{SEND_LIMIT} bytes (128 KiB) to the kernel per socket per turn; a
    fan-out turn can write more than that to one reader, which would then fall behind for
    Twisted's sake, not its own.
  - A reader that never reads would grow server memory without bound: Twisted pauses a
    registered producer but never drops writes.  L{ReaderLag} decides when a reader is too slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import IReactorTime

__all__ = ["FrameWriter", "ReaderLag", "SEND_LIMIT", "SLOW_READER_GRACE",
           "SLOW_READER_HARD_FACTOR"]

# A reader over max-pending-bytes is cut off if it takes nothing for this long...
SLOW_READER_GRACE = 1.0
# ... or at once past this many times max-pending-bytes, whatever its progress.
SLOW_READER_HARD_FACTOR = 4
# What Twisted may hand to the kernel per socket per reactor turn (its default is 128 KiB).
SEND_LIMIT = 4 * 1024 * 1024


# How many of the largest frames may wait for a reader that is taking them.
LARGE_FRAMES_WAITING = 4
# The largest frame any reader may be sent without the journal: a NOTIFY payload (under 8000
# bytes) and its header.
LARGEST_NOTIFY_FRAME = 8 * 1024


class ReaderLag:
    """
    When a reader over C{max_pending} bytes is too slow.  Twisted only flushes between reactor
    turns, so a prompt reader can be over the limit for a moment after a burst: a reader is cut
    off when it has taken nothing for L{SLOW_READER_GRACE} seconds while over it, or at once
    when more than L{SLOW_READER_HARD_FACTOR} times over it.
    """

    __slots__ = ("max_pending", "_hard", "_clock", "_behind_since", "_flushed_mark")

    def __init__(self, max_pending: int, clock: IReactorTime, largest_frame: int = 0) -> None:
        """
        @param largest_frame: the largest single message the reader may be sent (a journaled
            one may be megabytes): the cut-off at once is never below what it needs.
        """
        self.max_pending = max_pending
        largest_frame = max(largest_frame, LARGEST_NOTIFY_FRAME)
        # Room for a few of the largest frames: the fan-out writes the next one a turn later,
        # before a prompt reader has taken the last (a run of megabyte messages).  A reader that
        # takes nothing is still cut off after the grace period.
        self._hard = max(max_pending * SLOW_READER_HARD_FACTOR,
                         max_pending + LARGE_FRAMES_WAITING * largest_frame)
        self._clock = clock
        self._behind_since: float | None = None  # when the reader last went over max_pending
        self._flushed_mark = 0  # what the kernel had taken then

    def caught_up(self) -> None:
        self._behind_since = None

    def too_slow(self, pending: int, written: int) -> bool:
        """
        After a write: C{pending} bytes wait in user space, C{written} were ever written.  True
        when the reader must be cut off.
        """
        if pending <= self.max_pending:
            self._behind_since = None
            return False
        if pending > self._hard:
            return True
        now = self._clock.seconds()
        flushed = written - pending  # bytes the kernel has taken, ever
        if self._behind_since is None:
            self._behind_since, self._flushed_mark = now, flushed
        elif now - self._behind_since >= SLOW_READER_GRACE:
            if flushed == self._flushed_mark:
                return True
            self._behind_since, self._flushed_mark = now, flushed
        return False


def _buffer_below(transport: Any) -> abstract.FileDescriptor | None:
    """
    The transport that holds Twisted's write buffer under C{transport} (itself, or the TCP
    transport below a TLS wrapper).  A wrapper forwards attribute reads to the transport below
    but not writes, so a setting must be made there.
    """
    for _ in range(4):  # TLS over TCP is two levels; a deeper stack is not pgws's
        if isinstance(transport, abstract.FileDescriptor):
            return transport
        transport = vars(transport).get("transport") if hasattr(transport, "__dict__") else None
        if transport is None:
            return None
    return None


class FrameWriter:
    """
    Writes frames to one open socket's transport.  C{too_slow(pending)} is called (once per
    verdict) when the reader falls too far behind; the caller closes the socket.
    """

    __slots__ = ("_transport", "_buffer", "_lag", "_too_slow", "_written", "_socket")

    def __init__(self, transport: Any, lag: ReaderLag, too_slow: Callable[[int], None]) -> None:
        self._transport = transport
        self._lag = lag
        self._too_slow = too_slow
        self._written = 0  # bytes of frames written to the transport, ever
        self._socket: Any = None  # the socket, when frames may be sent on it directly
        # Under TLS the encrypted bytes wait in the TCP transport below the wrapper.
        self._buffer = below = _buffer_below(transport)
        if below is not None:
            below.SEND_LIMIT = SEND_LIMIT
        # Plain TCP only: under TLS every byte must go through the TLS layer (a wrapper that
        # forwards attribute reads to the TCP transport below it, so ask for the class).
        if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
            self._socket = transport.socket

    def pending(self) -> int:
        """
        Bytes the transport holds that the kernel has not taken yet (under TLS: the encrypted
        bytes in the TCP transport).  A transport without Twisted's buffer (an in-memory one)
        holds nothing.
        """
        buffer = self._buffer
        if buffer is None:
            return 0
        return len(buffer.dataBuffer) - buffer.offset + buffer._tempDataLen

    def write(self, frames: bytes) -> None:
        self._written += len(frames)
        transport = self._transport
        sock = self._socket
        if sock is not None and not transport.disconnecting and not self.pending():
            try:
                sent = sock.send(frames)
            except OSError:  # EAGAIN included; any other error Twisted meets and closes on
                sent = 0
            if sent == len(frames):
                self._lag.caught_up()
                return
            frames = frames[sent:]
        transport.write(frames)
        pending = self.pending()
        if self._lag.too_slow(pending, self._written):
            self._too_slow(pending)

    def stop(self) -> None:
        """The socket is closing: never write to it directly again."""
        self._socket = None
