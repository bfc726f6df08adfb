"""
Which sockets read which channel.  The first reader of a database channel makes the listener
C{LISTEN} to it, the last one leaving makes it C{UNLISTEN}: the registry alone counts readers.

The registry knows nothing about Autobahn or txpostgres: readers are anything with
C{write_frames}, and the listener is anything with C{listen} / C{unlisten} / C{ready}.  With the
listen-channel routing many pgws channels share one database channel (see L{pgws._routing}).
A notification's frame is built once, whatever the number of readers, and readers are served in
the order notifications are delivered here (the fan-out delivers them in PostgreSQL's order).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults

from pgws._frames import binary_frame, text_frame
from pgws._routing import PerChannelRouting, Routing

__all__ = ["ChannelRegistry", "ListenTarget", "Reader", "position_frames"]


def position_frames(channel: str, rows: list[tuple[int, str]],
                    encode: Callable[[bytes], bytes] = text_frame) -> bytes:
    """
    Journaled messages as a reader with positions gets them: each one a binary frame
    C{{"channel": <channel>, "seq": <n>}} followed by the text frame of its payload.
    """
    prefix = b'{"channel":' + json.dumps(channel, ensure_ascii=False).encode() + b',"seq":'
    return b"".join(binary_frame(prefix + str(seq).encode() + b"}") + encode(payload.encode())
                    for seq, payload in rows)


class Reader(Protocol):
    # Journaled messages reach this reader with their positions (it speaks the pgws subprotocol).
    wants_positions: bool

    def write_frames(self, frames: bytes) -> None:
        """Send pre-built WebSocket frames, one or more back to back, to this reader (never
        blocks, never raises)."""

    def pending(self) -> int:
        """Bytes written to this reader that its connection has not sent yet."""


class ListenTarget(Protocol):
    def listen(self, channel: str) -> None: ...

    def unlisten(self, channel: str) -> None: ...

    def ready(self, channel: str) -> Deferred[None]:
        """Fires once PostgreSQL has executed the LISTEN for C{channel}; never fails."""


class ChannelRegistry:
    def __init__(
        self,
        listener: ListenTarget,
        routing: Routing | None = None,
        encode_frame: Callable[[bytes], bytes] = text_frame,
    ) -> None:
        self._listener = listener
        self._db_channel = (routing or PerChannelRouting()).db_channel
        self._encode_frame = encode_frame
        self._readers: dict[str, dict[Reader, None]] = {}
        # Readers catching up from the journal: its live messages skip them meanwhile.
        self._held: dict[str, set[Reader]] = {}
        self._read_on: dict[str, int] = {}  # database channel -> pgws channels read through it
        # What was written to readers, ever (counted once per run, not per reader).
        self.frames_sent = 0
        self.bytes_sent = 0

    def add(self, channel: str, reader: Reader) -> None:
        readers = self._readers.get(channel)
        if readers is None:
            readers = self._readers[channel] = {}
            db = self._db_channel(channel)
            self._read_on[db] = self._read_on.get(db, 0) + 1
            if self._read_on[db] == 1:
                self._listener.listen(db)
        readers[reader] = None

    def remove(self, channel: str, reader: Reader) -> None:
        readers = self._readers.get(channel)
        if readers is None or reader not in readers:
            return
        del readers[reader]
        self.release(channel, reader)
        if not readers:
            del self._readers[channel]
            db = self._db_channel(channel)
            self._read_on[db] -= 1
            if not self._read_on[db]:
                del self._read_on[db]
                self._listener.unlisten(db)

    def ready(self, channels: Iterable[str]) -> Deferred[Any]:
        """Fires once every one of C{channels} is LISTENed (for opening a socket only then)."""
        return gatherResults([self._listener.ready(self._db_channel(c)) for c in channels])

    def readers(self, channel: str) -> int:
        return len(self._readers.get(channel, ()))

    def reader_counts(self) -> dict[str, int]:
        """Every channel read now, and how many readers it has."""
        return {channel: len(readers) for channel, readers in self._readers.items()}

    @property
    def database_channels(self) -> int:
        """How many database channels are LISTENed for the readers."""
        return len(self._read_on)

    def behind(self, channel: str, limit: int) -> tuple[int, int]:
        """(readers of C{channel} with more than C{limit} bytes not sent yet, all its readers)."""
        readers = self._readers.get(channel, ())
        return sum(1 for reader in readers if reader.pending() > limit), len(readers)

    def hold(self, channel: str, reader: Reader) -> None:
        """Journaled messages of C{channel} skip C{reader} until L{release} (it is replaying)."""
        self._held.setdefault(channel, set()).add(reader)

    def release(self, channel: str, reader: Reader) -> None:
        held = self._held.get(channel)
        if held is not None:
            held.discard(reader)
            if not held:
                del self._held[channel]

    def deliver_rows(self, channel: str, rows: list[tuple[int, str]]) -> int:
        """
        Write a run of C{channel}'s journaled messages (seq, payload) to its readers, each with
        its position (L{position_frames}) to the readers that want positions, as plain text
        frames to the others; readers being held are skipped.  Frames are built once.
        """
        readers = self._readers.get(channel)
        if not readers:
            return 0
        held = self._held.get(channel, ())
        plain = positioned = b""
        encode = self._encode_frame
        plain_readers = positioned_readers = 0
        for reader in list(readers):
            if reader in held:
                continue
            if reader.wants_positions:
                positioned = positioned or position_frames(channel, rows, encode)
                reader.write_frames(positioned)
                positioned_readers += 1
            else:
                plain = plain or b"".join(encode(p.encode()) for _, p in rows)
                reader.write_frames(plain)
                plain_readers += 1
        # A reader with positions gets two frames a message: its position, then its payload.
        self.frames_sent += len(rows) * (plain_readers + 2 * positioned_readers)
        self.bytes_sent += len(plain) * plain_readers + len(positioned) * positioned_readers
        return plain_readers + positioned_readers

    def deliver(self, channel: str, payloads: list[bytes]) -> int:
        """
        Write consecutive notifications of C{channel} to every reader of it, in order; return
        how many readers got them.  Each notification's frame is built once, and a reader gets
        the run's frames in one write (one system call when its socket keeps up).
        """
        readers = self._readers.get(channel)
        if not readers:
            return 0
        encode = self._encode_frame
        frames = encode(payloads[0]) if len(payloads) == 1 else b"".join(map(encode, payloads))
        # A reader may leave while we write (a write can close it): iterate over a snapshot.
        snapshot = list(readers)
        for reader in snapshot:
            reader.write_frames(frames)
        count = len(snapshot)
        self.frames_sent += count * len(payloads)
        self.bytes_sent += count * len(frames)
        return count
