"""
The journal positions a client has seen, and what they make of each frame: which text frame is
which journal message, which is a duplicate (dropped), where a gap is (told), and where to resume
after a reconnect.  Pure: frames in, items out (see the wire protocol at the top of
L{pgws._journal}).

The rules, per journaled channel:
  - The C{{"event": "stream", "seq": n}} frame at open says where live messages follow.  With
    C{"recovered": true} the replay of what came after our position follows it, so our position
    stays; with C{"recovered": false} nothing is replayed: a L{Gap} says what is missing, and
    our position becomes C{n}.  Without a resume the position becomes C{n}, except after
    C{?history=}: the replay's first message sets it.
  - A message at or below our position is a duplicate and is dropped; one past our position + 1
    is delivered after a L{Gap} (C{"hole"}): pgws's sequence is dense, so that would be a loss.
  - We resume with every position we hold, on every reconnect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgws._client_events import Gap, Message, Stream

__all__ = ["Positions"]


@dataclass
class _Position:
    epoch: str
    seq: int | None  # the last message delivered; None: the next one sets it (a history replay)


class Positions:
    """
    @param channels: the socket's channels, when the token and the request say (None: unknown).
    @param initial: positions to resume from on the first connection, channel -> (seq, epoch),
        as an application persisted them.
    """

    def __init__(self, channels: tuple[str, ...] | None,
                 initial: Mapping[str, tuple[int, str]] | None = None) -> None:
        self.channels = channels
        self._known = {name: _Position(epoch, seq) for name, (seq, epoch) in (initial or {}).items()}
        self._journaled: set[str] = set()  # channels with a stream frame on this connection
        self._pending: tuple[str, int] | None = None  # a position frame waiting for its text
        self._history = False
        self.duplicates = 0  # dropped, for whoever wants to know

    def resume(self) -> dict[str, tuple[int, str]]:
        """channel -> (seq, epoch) to resume from: every position known."""
        return {name: (p.seq, p.epoch) for name, p in self._known.items() if p.seq is not None}

    def opened(self, history: bool, reconnect: bool) -> list[Gap]:
        """
        A new connection; C{history}: it asked for C{?history=}.  On a reconnect, the channels not
        known to be journaled lost whatever plain notifications were sent while we were away.
        """
        self._journaled = set()
        self._pending = None
        self._history = history
        if not reconnect:
            return []
        if self.channels is None:
            return [Gap("disconnected")]
        plain = tuple(c for c in self.channels if c not in self._known)
        return [Gap("disconnected", plain)] if plain else []

    def stream(self, data: Mapping[str, Any]) -> tuple[Stream, Gap | None]:
        channel, epoch, seq = data["channel"], data["epoch"], data["seq"]
        recovered = data.get("recovered")
        recovered = recovered if isinstance(recovered, bool) else None
        self._journaled.add(channel)
        known = self._known.get(channel)
        gap = None
        if recovered is True and known is not None and known.epoch == epoch:
            pass  # the replay follows: our position stays where it is
        else:
            if recovered is False:
                after = known.seq if known is not None and known.epoch == epoch else None
                gap = Gap("not recovered", (channel,), after=after, upto=seq)
            self._known[channel] = _Position(
                epoch, None if self._history and recovered is None else seq)
        return Stream(channel, epoch, seq, recovered), gap

    def server_gap(self, data: Mapping[str, Any]) -> Gap:
        """pgws's C{{"event": "gap"}}: the plain channels of this socket may have lost messages."""
        at = data.get("at")
        at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None
        channels = (None if self.channels is None
                    else tuple(c for c in self.channels if c not in self._journaled))
        return Gap("listen", channels, at=at)

    def position(self, channel: str, seq: int) -> None:
        """A position frame: the next text frame is this journal message."""
        self._pending = (channel, seq)

    def text(self, text: str) -> list[Message | Gap]:
        """A text frame: what to deliver (nothing for a duplicate, a L{Gap} before a hole)."""
        pending, self._pending = self._pending, None
        if pending is None:
            single = self.channels[0] if self.channels is not None and len(self.channels) == 1 else None
            return [Message(single, text)]
        channel, seq = pending
        known = self._known.get(channel)
        if known is None:  # a position without its stream frame: pgws does not do that; take it
            known = self._known[channel] = _Position("", None)
        items: list[Message | Gap] = []
        if known.seq is not None:
            if seq <= known.seq:
                self.duplicates += 1
                return []
            if seq > known.seq + 1:
                items.append(Gap("hole", (channel,), after=known.seq, upto=seq - 1))
        known.seq = seq
        items.append(Message(channel, text, seq, known.epoch or None))
        return items
