"""
Presence (C{presence = true}): who is on a channel, across every pgws process on the database,
kept in PostgreSQL (the tables and their locking are in L{pgws._presence_schema}), never in one
process's memory.

Members: an open socket that reads a channel (mode C{r} or C{rw}) and whose token has the
C{presence-claim} claim (default C{sub}; a non-empty string of at most 256 bytes, or an
integer, taken as its decimal text) is a member of that channel under that name, whatever its
subprotocol.  Write-only sockets are not members: presence says who receives a channel, and a
C{w} socket receives nothing.  A member with several sockets, in one process or several, joins
once (its first socket) and leaves once (its last).  A token refresh that changes the claim is
a leave of the old name and a join of the new one.

How it flows:
  - Each process counts its own sockets per (channel, member) and writes only the first and the
    last to PostgreSQL, one statement at a time, each holding every change of a reactor turn
    (C{presence_update}).  That statement decides, under the channel's row lock, who joined and
    who left, and announces it with C{NOTIFY} on C{<schema>.presence}, which every process's one
    LISTEN session receives (L{PresenceTap} takes those notifications out before the fan-out,
    so they never reach readers, in either routing mode).
  - Liveness: every process renews a lease on its row every 2.5 s (C{presence_beat}), and drops
    the processes whose 10 s lease ran out, with their members: a killed process's members
    leave within about 12.5 s.  A process that finds its own row gone (it was away that long)
    writes its members again.  A process that stops drops its own members at once.
  - Events are only sent to sockets that asked about the channel: each turn's announcements of
    a channel are folded into at most one C{leave} and one C{join} event per socket, each frame
    built once.  A fold of more than C{PAGE_SIZE} (100) changes is sent as a fresh answer
    instead (see below), so no burst sends a socket more than a page of names.

Wire protocol (binary frames of UTF-8 JSON, as the other control messages; only on sockets
that negotiated the C{pgws} subprotocol):
  - C{{"presence": "<channel>"}} asks who is on a channel the socket reads, and starts its
    events.  Answer: C{{"event": "presence", "channel": c, "seq": n, "count": k, "members":
    [up to 100 names, in the database's order], "next": "<cursor>" | null}}.  C{count} is the
    number of members; C{seq} numbers the channel's changes (the answer includes every change
    up to it, and every event after it has a higher one).  Asking again gets a fresh answer.
  - C{{"presence": "<channel>", "after": "<cursor>"}} reads the next page: the same answer with
    C{"after": "<cursor>"} echoed; it is read when asked, and changes nothing about events.
  - Then, while the socket watches the channel: C{{"event": "join" | "leave", "channel": c,
    "seq": n, "count": k, "members": [...]}}, where C{count} is the number of members once that
    event is applied.  A C{presence} answer without C{after} may also come unasked (after a
    burst of more than 100 changes, or after the LISTEN session was lost): it replaces what the
    client knew of the channel.
  - C{{"presence": "<channel>", "stop": true}} stops the events: C{{"event": "presence",
    "channel": c, "stopped": true}}.
  - A refused request is answered C{{"event": "presence", "channel": c | null, "error": "..."}}:
    presence is off, the request is malformed, the socket did not negotiate C{pgws}, the socket
    does not read the channel, a request of the same channel is still being answered, or the
    database did not answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pgws._auth import Grant
from pgws._credentials import SUBPROTOCOL
from pgws._frames import binary_frame
from pgws._journal_schema import migrate_until_done
from pgws._listener import Notification, Reading, Sink
from pgws._postgres import describe_error
from pgws._presence_schema import (
    beat_sql,
    held_sql,
    migration,
    page_sql,
    presence_channel,
    release_sql,
    update_sql,
)
from pgws._reactor import backoff_delays, fire_and_log, sleep, within

__all__ = ["OFF", "Presence", "PresenceOff", "PresenceTap", "SqlStore", "Store", "member_of"]

_log = Logger()

# Members in one answer; a fold of more changes than this is sent as a fresh answer.
PAGE_SIZE = 100
# Seconds between heartbeats, and how long a process's members outlive its last one.
HEARTBEAT = 2.5
LEASE = 10.0
# Seconds a presence statement may take before it is abandoned.
QUERY_DEADLINE = 10.0
# (channel, member) changes written per statement.
UPDATE_BATCH = 5000
# Announcements kept for a socket whose answer is being read; past it the answer is read again.
BUFFERED = 64
MAX_MEMBER_BYTES = 256

Key = tuple[str, str]  # (channel, member)


def member_of(claims: Mapping[str, Any], claim: str) -> str | None:
    """The name a token's claims give a member, or None: the socket is not a member."""
    value = claims.get(claim)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if (not isinstance(value, str) or not value or "\x00" in value
            or len(value.encode("utf-8")) > MAX_MEMBER_BYTES):
        return None
    return value


class Watcher(Protocol):
    """A socket, as presence sees it."""

    websocket_protocol_in_use: str | None

    def write_frames(self, frames: bytes) -> None: ...


def _frame(message: dict[str, Any]) -> bytes:
    return binary_frame(json.dumps(message, ensure_ascii=False).encode("utf-8"))


def _refuse(socket: Watcher, channel: object, reason: str) -> None:
    socket.write_frames(_frame({"event": "presence",
                                "channel": channel if isinstance(channel, str) else None,
                                "error": reason}))


def malformed(message: Mapping[str, Any]) -> str | None:
    """What is wrong with a presence request, or None."""
    if not isinstance(message.get("presence"), str):
        return 'malformed presence request: "presence" must be a channel name'
    for key in message:
        if key not in ("presence", "after", "stop"):
            return f"malformed presence request: unknown key {json.dumps(key)}"
    after = message.get("after")
    # A cursor is a member's name: never empty, never with NUL (PostgreSQL's text has none).
    if "after" in message and not (isinstance(after, str) and after and "\x00" not in after):
        return 'malformed presence request: "after" must be the "next" of an answer'
    if "stop" in message and message["stop"] is not True:
        return 'malformed presence request: "stop" must be true'
    if "after" in message and "stop" in message:
        return 'malformed presence request: "after" and "stop" do not go together'
    return None


class PresenceOff:
    """Presence with C{presence = false}: nobody is a member, and requests are refused."""

    def opened(self, socket: Any, grant: Grant) -> None:
        pass

    def closed(self, socket: Any) -> None:
        pass

    def regranted(self, socket: Any, grant: Grant) -> None:
        pass

    def request(self, socket: Any, grant: Grant, message: Mapping[str, Any]) -> None:
        _refuse(socket, message.get("presence"), "presence is off on this server")


OFF = PresenceOff()


# -- PostgreSQL -----------------------------------------------------------------------------------


class Database(Protocol):
    def run_query(self, sql: str, args: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]: ...

    def run_transaction(self, statements: list[str]) -> defer.Deferred[None]: ...


class Store(Protocol):
    """Presence's tables, as the process sees them (L{SqlStore}; the in-memory tests' own)."""

    def migrate(self) -> defer.Deferred[None]: ...

    def update(self, process: str, name: str, lease: float,
               changes: list[tuple[Key, bool]]) -> defer.Deferred[bool]:
        """Renew the lease and hold (True) or release (False) each key; was the row there?"""

    def beat(self, process: str, name: str, lease: float) -> defer.Deferred[bool]:
        """Renew the lease and drop the processes whose lease ran out; was the row there?"""

    def release(self, process: str) -> defer.Deferred[None]: ...

    def held(self, process: str) -> defer.Deferred[list[Key]]: ...

    def page(self, channel: str, after: str | None,
             limit: int) -> defer.Deferred[tuple[int, int, list[str]]]:
        """(count, seq, up to C{limit} members after C{after}), read in one snapshot."""


class SqlStore:
    """L{Store} over the pool, with the statements of L{pgws._presence_schema}."""

    def __init__(self, db: Database, schema: str) -> None:
        self._db = db
        self._schema = schema

    def migrate(self) -> defer.Deferred[None]:
        return self._db.run_transaction(migration(self._schema))

    async def _one(self, sql: str, args: Any) -> Any:
        rows = await self._db.run_query(sql, args)
        return rows[0][0]

    def update(self, process: str, name: str, lease: float,
               changes: list[tuple[Key, bool]]) -> defer.Deferred[bool]:
        args = (process, name, lease, [c for (c, _), _ in changes], [m for (_, m), _ in changes],
                [h for _, h in changes])
        return defer.Deferred.fromCoroutine(self._one(update_sql(self._schema), args))

    def beat(self, process: str, name: str, lease: float) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(self._one(beat_sql(self._schema),
                                                      (process, name, lease)))

    def release(self, process: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._one(release_sql(self._schema), (process,)))

    async def _held(self, process: str) -> list[Key]:
        return [(c, m) for c, m in await self._db.run_query(held_sql(self._schema), (process,))]

    def held(self, process: str) -> defer.Deferred[list[Key]]:
        return defer.Deferred.fromCoroutine(self._held(process))

    async def _page(self, channel: str, after: str | None,
                    limit: int) -> tuple[int, int, list[str]]:
        args = (channel, channel, channel, *([after] if after is not None else []), limit)
        rows = await self._db.run_query(page_sql(self._schema, after is not None), args)
        count, seq, members = rows[0]
        return int(count), int(seq), list(members)

    def page(self, channel: str, after: str | None,
             limit: int) -> defer.Deferred[tuple[int, int, list[str]]]:
        return defer.Deferred.fromCoroutine(self._page(channel, after, limit))


# -- announcements ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One announcement (or one piece of it) on the presence channel."""

    channel: str
    seq: int
    count: int
    join: tuple[str, ...]
    leave: tuple[str, ...]


def _names(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(m, str) for m in value):
        return tuple(value)
    return None


def parse_change(payload: str) -> Change | None:
    """An announcement, or None if the payload is not one (pgws never sends such)."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    channel, seq, count = value.get("channel"), value.get("seq"), value.get("count")
    join, leave = _names(value.get("join")), _names(value.get("leave"))
    if (not isinstance(channel, str) or join is None or leave is None
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in (seq, count))):
        return None
    assert isinstance(seq, int) and isinstance(count, int)
    return Change(channel, seq, count, join, leave)


class _Resync:
    """A fold too large to send as events: the socket gets a fresh answer instead."""


RESYNC = _Resync()


def fold(channel: str, changes: Iterable[Change], limit: int = PAGE_SIZE) -> bytes | _Resync:
    """
    Consecutive changes of a channel as the frames of at most one C{leave} and one C{join}
    event (b"" if they cancel out), or L{RESYNC} when more than C{limit} members changed.
    """
    net: dict[str, bool] = {}  # member -> joined (True) or left (False), since before the first
    last: Change | None = None
    for change in changes:
        last = change
        for member in change.leave:
            if net.get(member) is True:
                del net[member]  # joined, then left: as it was
            else:
                net[member] = False
        for member in change.join:
            if net.get(member) is False:
                del net[member]
            else:
                net[member] = True
    if last is None or not net:
        return b""
    if len(net) > limit:
        return RESYNC
    joins = sorted(m for m, joined in net.items() if joined)
    leaves = sorted(m for m, joined in net.items() if not joined)
    frames = b""
    if leaves:
        frames += _frame({"event": "leave", "channel": channel, "seq": last.seq,
                          "count": last.count - len(joins), "members": leaves})
    if joins:
        frames += _frame({"event": "join", "channel": channel, "seq": last.seq,
                          "count": last.count, "members": joins})
    return frames


class PresenceTap:
    """
    The LISTEN session's sink with presence on: notifications on the presence channel go to
    presence, and only to it; everything else goes on to the fan-out, in order.
    """

    def __init__(self, sink: Sink, presence: Presence) -> None:
        self._sink = sink
        self._presence = presence
        self._channel = presence.channel

    def received(self, notifications: list[Notification]) -> None:
        channel = self._channel
        if any(c == channel for c, _ in notifications):
            self._presence.received([p for c, p in notifications if c == channel])
            notifications = [n for n in notifications if n[0] != channel]
            if not notifications:
                return
        self._sink.received(notifications)

    def busy(self) -> bool:
        return self._sink.busy()

    def attach(self, reading: Reading) -> None:
        self._sink.attach(reading)


class Listening(Protocol):
    def listen(self, channel: str) -> None: ...

    def ready(self, channel: str) -> defer.Deferred[None]: ...


# -- the process's presence -------------------------------------------------------------------------


@dataclass(eq=False)
class _Watch:
    """A socket that asked about a channel."""

    since: int | None = None  # the seq its view is at; None while its answer is being read
    buffer: list[Change] = field(default_factory=list)  # announcements meanwhile
    stale: bool = False  # the buffer overflowed: the answer being read is too old for it


@dataclass(eq=False)
class _Answers:
    """The answers of one channel: one read at a time, shared by every socket waiting for it."""

    waiting: dict[Any, _Watch] = field(default_factory=dict)
    reading: dict[Any, _Watch] | None = None


class Presence:
    """
    The presence of one process (see the module docstring): its members, written to the
    database; its sockets that asked, and their events.

    @param store: the tables (L{SqlStore} over the pool).
    @param name: what the process's row is called (C{application-name}), for people.
    """

    def __init__(self, reactor: IReactorTime, store: Store, schema: str, claim: str, name: str,
                 *, page_size: int = PAGE_SIZE, heartbeat: float = HEARTBEAT,
                 lease: float = LEASE) -> None:
        self._reactor = reactor
        self._store = store
        self.channel = presence_channel(schema)
        self.schema = schema
        self._claim = claim
        self._name = name
        self._page_size = page_size
        self._heartbeat = heartbeat
        self._lease = lease
        self.process = uuid.uuid4().hex
        self.migrated = False
        self._stopping = False
        # Members: this process's sockets, and what the database holds for it.
        self._members: dict[Any, tuple[str, tuple[str, ...]]] = {}  # socket -> (member, channels)
        self._local: dict[Key, int] = {}  # sockets per (channel, member)
        self._stored: set[Key] = set()  # what this process holds in the database
        self._dirty: set[Key] = set()  # keys to compare, at the next statement
        self._registered = False  # the process's row was written once
        self._beat_due = False
        self._reconcile = False  # a statement was abandoned: read what is held first
        self._writing = False
        self._idle: defer.Deferred[None] | None = None
        self._beats: LoopingCall | None = None
        # Sockets that asked.
        self._watchers: dict[str, dict[Any, _Watch]] = {}
        self._watching: dict[Any, set[str]] = {}  # socket -> channels it asked about
        self._answers: dict[str, _Answers] = {}
        self._pages: set[tuple[Any, str]] = set()  # (socket, channel) with a page being read
        self._incoming: dict[str, list[Change]] = {}
        self._delivering = False
        self._ignored_count, self._ignored_next_log = 0, 0.0
        self._listening: Listening | None = None

    def listen_on(self, listener: Listening) -> None:
        """LISTEN to the presence channel on the process's session, for as long as it runs."""
        self._listening = listener
        listener.listen(self.channel)

    # -- start and stop ---------------------------------------------------------------------------

    async def start(self, fatal: Callable[[str], None]) -> None:
        """
        Migrate presence's objects (retrying while the database is away), then beat.  A schema
        this pgws cannot use calls C{fatal(reason)}.
        """
        self.migrated = await migrate_until_done(
            self._reactor, lambda: self._store.migrate(), "Presence", self.schema, fatal,
            stopping=lambda: self._stopping)
        if not self.migrated:
            return
        _log.info("Presence ready in schema {schema}", schema=self.schema)
        self._beats = LoopingCall(self._beat)
        self._beats.clock = self._reactor
        self._beats.start(self._heartbeat, now=True)

    async def stop(self) -> None:
        """Drop this process's members at once (they leave), after the statement under way."""
        self._stopping = True
        if self._beats is not None and self._beats.running:
            self._beats.stop()
        if self._writing:
            self._idle = defer.Deferred()
            await self._idle
        if self.migrated:
            try:
                await within(self._store.release(self.process), QUERY_DEADLINE, self._reactor)
            except Exception as e:
                _log.warn("Presence: dropping this process's members failed ({why}); they "
                          "leave when its lease runs out", why=describe_error(e))

    # -- members ----------------------------------------------------------------------------------

    def opened(self, socket: Any, grant: Grant) -> None:
        """An open socket: a member of the channels it reads, if its token names one."""
        member = member_of(grant.claims, self._claim)
        if member is None or not grant.can_read:
            return
        self._members[socket] = (member, grant.channels)
        for channel in grant.channels:
            key = (channel, member)
            count = self._local.get(key, 0)
            self._local[key] = count + 1
            if not count:
                self._dirty.add(key)
        self._write_soon()

    def closed(self, socket: Any) -> None:
        """The socket is gone: its memberships, and what it asked."""
        self._leave(socket)
        for channel in self._watching.pop(socket, ()):
            self._unwatch(socket, channel)
        self._write_soon()

    def regranted(self, socket: Any, grant: Grant) -> None:
        """A refreshed token: a changed claim is a leave of the old name, a join of the new."""
        held = self._members.get(socket)
        if (held[0] if held else None) != member_of(grant.claims, self._claim):
            self._leave(socket)
            self.opened(socket, grant)

    def _leave(self, socket: Any) -> None:
        held = self._members.pop(socket, None)
        if held is None:
            return
        member, channels = held
        for channel in channels:
            key = (channel, member)
            count = self._local[key] - 1
            if count:
                self._local[key] = count
            else:
                del self._local[key]
                self._dirty.add(key)

    def members_here(self) -> dict[Key, int]:
        """Sockets per (channel, member) in this process (for tests)."""
        return dict(self._local)

    # -- writing to the database: one statement at a time ------------------------------------------

    def _beat(self) -> None:
        self._beat_due = True
        self._write_soon()

    def _write_soon(self) -> None:
        """Write at the next turn: every change of this one goes in the same statement."""
        if not self._writing and self.migrated and not self._stopping and (
                self._dirty or self._beat_due):
            self._writing = True
            self._reactor.callLater(0, lambda: fire_and_log(self._write(), "presence update"))

    def _changes(self) -> list[tuple[Key, bool]]:
        changes: list[tuple[Key, bool]] = []
        dirty, local, stored = self._dirty, self._local, self._stored
        while dirty and len(changes) < UPDATE_BATCH:
            key = dirty.pop()
            hold = key in local
            if hold != (key in stored):
                changes.append((key, hold))
        return changes

    async def _write(self) -> None:
        delays = backoff_delays(first=0.5, cap=5.0)
        try:
            while not self._stopping:
                changes: list[tuple[Key, bool]] = []
                try:
                    if self._reconcile:
                        await self._reconciled()
                        continue
                    changes = self._changes()
                    if changes:
                        alive = await self._run(self._store.update(
                            self.process, self._name, self._lease, changes))
                    elif self._beat_due:
                        self._beat_due = False
                        alive = await self._run(self._store.beat(self.process, self._name,
                                                                 self._lease))
                    else:
                        return
                except Exception as e:
                    self._dirty.update(key for key, _ in changes)  # compared again next time
                    if isinstance(e, defer.TimeoutError):
                        self._reconcile = True  # it may still commit: read what is held
                    delay = next(delays)
                    _log.warn("Presence: updating the database failed: {why}; retrying in "
                              "{delay:.1f} s", why=describe_error(e), delay=delay)
                    await sleep(self._reactor, delay)
                    continue
                self._written(changes, alive)
        finally:
            self._writing = False
            if self._idle is not None:
                idle, self._idle = self._idle, None
                idle.callback(None)
            else:
                self._write_soon()  # a beat that came during the back-off

    def _run(self, d: defer.Deferred[bool]) -> defer.Deferred[bool]:
        return within(d, QUERY_DEADLINE, self._reactor)

    def _written(self, changes: list[tuple[Key, bool]], alive: bool) -> None:
        stored = self._stored
        for key, hold in changes:
            (stored.add if hold else stored.discard)(key)
        if not alive and self._registered:
            # The process was taken for dead and its holds dropped: hold everything again.
            _log.warn("Presence: this process's lease ran out and other processes dropped its "
                      "members; writing them again")
            self._stored = {key for key, hold in changes if hold}
            self._dirty.update(self._local)
        self._registered = True

    async def _reconciled(self) -> None:
        """After an abandoned statement: what the database holds for this process, as it is."""
        held = await self._run_held()
        self._reconcile = False
        self._stored = set(held)
        self._dirty.update(self._stored)
        self._dirty.update(self._local)

    def _run_held(self) -> defer.Deferred[list[Key]]:
        return within(self._store.held(self.process), QUERY_DEADLINE, self._reactor)

    # -- requests -----------------------------------------------------------------------------------

    def request(self, socket: Any, grant: Grant, message: Mapping[str, Any]) -> None:
        """A presence control message (see the wire protocol in the module docstring)."""
        channel = message.get("presence")
        problem = malformed(message)
        if problem is None and getattr(socket, "websocket_protocol_in_use", None) != SUBPROTOCOL:
            problem = "presence needs the pgws subprotocol"
        if problem is None and not (grant.can_read and channel in grant.channels):
            problem = f"this socket does not read channel {json.dumps(channel)}"
        if problem is not None:
            _refuse(socket, channel, problem)
            return
        assert isinstance(channel, str)
        if message.get("stop"):
            self._watching.get(socket, set()).discard(channel)
            self._unwatch(socket, channel)
            socket.write_frames(_frame({"event": "presence", "channel": channel,
                                        "stopped": True}))
        elif "after" in message:
            if (socket, channel) in self._pages:
                _refuse(socket, channel, "a page of this channel is already being read")
                return
            self._pages.add((socket, channel))
            fire_and_log(self._next_page(socket, channel, message["after"]), "presence page")
        else:
            watch = self._watchers.get(channel, {}).get(socket)
            if watch is not None and watch.since is None:
                _refuse(socket, channel, "an answer about this channel is already being read")
                return
            watch = _Watch()
            self._watchers.setdefault(channel, {})[socket] = watch
            self._watching.setdefault(socket, set()).add(channel)
            self._answers.setdefault(channel, _Answers()).waiting[socket] = watch
            self._answer(channel)

    def _unwatch(self, socket: Any, channel: str) -> None:
        watchers = self._watchers.get(channel)
        if watchers is not None:
            watchers.pop(socket, None)
            if not watchers:
                del self._watchers[channel]
        answers = self._answers.get(channel)
        if answers is not None:
            answers.waiting.pop(socket, None)

    async def _page(self, channel: str, after: str | None,
                    ) -> tuple[int, int, list[str], str | None]:
        """(count, seq, a page of members, the cursor of the next page or None)."""
        page = self._page_size
        count, seq, members = await within(self._store.page(channel, after, page + 1),
                                           QUERY_DEADLINE, self._reactor)
        return count, seq, members[:page], (members[page - 1] if len(members) > page else None)

    async def _next_page(self, socket: Any, channel: str, after: str) -> None:
        try:
            count, seq, members, cursor = await self._page(channel, after)
        except Exception as e:
            _log.warn("Presence: reading a page of {channel} failed: {why}", channel=channel,
                      why=describe_error(e))
            _refuse(socket, channel, "the database did not answer; ask again later")
        else:
            socket.write_frames(_frame({"event": "presence", "channel": channel, "after": after,
                                        "seq": seq, "count": count, "members": members,
                                        "next": cursor}))
        finally:
            self._pages.discard((socket, channel))

    # -- answers: one read of a channel at a time, for every socket waiting for it ------------------

    def _answer(self, channel: str) -> None:
        answers = self._answers.get(channel)
        if answers is None or answers.reading is not None:
            return
        if not answers.waiting:
            del self._answers[channel]
            return
        # Only sockets already waiting share this read: each one has kept the announcements
        # since before the read began, so those after its seq are all in its buffer.
        answers.reading, answers.waiting = answers.waiting, {}
        fire_and_log(self._read_answer(channel, answers), "presence answer")

    async def _read_answer(self, channel: str, answers: _Answers) -> None:
        assert answers.reading is not None
        try:
            failed = False
            try:
                if self._listening is not None:
                    # Announcements after the read must reach this process.
                    await self._listening.ready(self.channel)
                count, seq, members, cursor = await self._page(channel, None)
            except Exception as e:
                _log.warn("Presence: reading {channel} failed: {why}", channel=channel,
                          why=describe_error(e))
                failed = True
            frame = b"" if failed else _frame({
                "event": "presence", "channel": channel, "seq": seq, "count": count,
                "members": members, "next": cursor})
            watchers = self._watchers.get(channel, {})
            for socket, watch in answers.reading.items():
                if watchers.get(socket) is not watch:
                    continue  # gone, stopped, or asked again meanwhile
                if watch.stale:
                    watch.stale = False
                    answers.waiting[socket] = watch
                elif failed:
                    self._watching.get(socket, set()).discard(channel)
                    self._unwatch(socket, channel)
                    _refuse(socket, channel, "the database did not answer; ask again later")
                else:
                    socket.write_frames(frame)
                    watch.since = seq
                    later, watch.buffer = [c for c in watch.buffer if c.seq > seq], []
                    if later:
                        self._send(channel, socket, watch, later)
        finally:
            answers.reading = None
            self._answer(channel)

    def recovered(self) -> None:
        """
        The LISTEN session is back: announcements may have been lost, so every socket that asked
        gets a fresh answer (one read per channel).
        """
        for channel, watchers in self._watchers.items():
            answers = self._answers.setdefault(channel, _Answers())
            for socket, watch in watchers.items():
                if watch.since is None:
                    watch.stale = True
                else:
                    watch.since, watch.buffer = None, []
                    answers.waiting[socket] = watch
        for channel in list(self._answers):
            self._answer(channel)

    # -- announcements: folded per channel per turn ---------------------------------------------

    def received(self, payloads: list[str]) -> None:
        """Notifications on the presence channel, in PostgreSQL's order."""
        for payload in payloads:
            change = parse_change(payload)
            if change is None:
                self._ignored()
            elif change.channel in self._watchers:
                self._incoming.setdefault(change.channel, []).append(change)
        if self._incoming and not self._delivering:
            self._delivering = True
            self._reactor.callLater(0, self._deliver)

    def _ignored(self) -> None:
        """
        A notification on the presence channel that is not an announcement (a client that
        writes to a channel of that name): logged at most once a minute, with how many.
        """
        self._ignored_count += 1
        now = self._reactor.seconds()
        if now >= self._ignored_next_log:
            _log.warn("Presence: ignored {n} notifications on {channel} that pgws did not send",
                      n=self._ignored_count, channel=self.channel)
            self._ignored_count, self._ignored_next_log = 0, now + 60

    def _deliver(self) -> None:
        incoming, self._incoming = self._incoming, {}
        self._delivering = False
        for channel, changes in incoming.items():
            watchers = self._watchers.get(channel)
            if not watchers:
                continue
            first, last = changes[0].seq, changes[-1].seq
            common: bytes | _Resync | None = None
            for socket, watch in list(watchers.items()):
                if watch.since is None:
                    watch.buffer.extend(changes)
                    if len(watch.buffer) > BUFFERED:
                        watch.buffer, watch.stale = [], True
                elif watch.since < first:
                    if common is None:
                        common = fold(channel, changes, self._page_size)
                    self._write_fold(channel, socket, watch, common, last)
                elif watch.since < last:
                    self._send(channel, socket, watch, [c for c in changes if c.seq > watch.since])

    def _send(self, channel: str, socket: Any, watch: _Watch, changes: list[Change]) -> None:
        self._write_fold(channel, socket, watch, fold(channel, changes, self._page_size),
                         changes[-1].seq)

    def _write_fold(self, channel: str, socket: Any, watch: _Watch, frames: bytes | _Resync,
                    seq: int) -> None:
        if isinstance(frames, _Resync):
            watch.since, watch.buffer = None, []
            self._answers.setdefault(channel, _Answers()).waiting[socket] = watch
            self._answer(channel)
            return
        if frames:
            socket.write_frames(frames)
        watch.since = seq
