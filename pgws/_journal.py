"""
The delivery journal (C{journal = true}): messages kept in PostgreSQL, in a dense sequence per
channel, so that nothing is lost across a LISTEN outage or a restart, readers resume from their
last position, and payloads may be megabytes (the tables and their ordering are in
L{pgws._journal_schema}).

How messages flow:
  - A producer calls C{<schema>.send(channel, payload)} (or C{send(channel, payloads[])}) in its
    transaction.  At commit PostgreSQL delivers a wake-up on C{<schema>.wake} whose payload is
    the channel's name, never the message: one per channel per transaction (PostgreSQL folds
    identical notifications of a transaction), however many messages it sent.
  - pgws keeps, for every journaled channel someone reads, a L{_Stream}: how far it has read the
    journal (C{fetched}) and how far the fan-out has written it to the live readers
    (C{written}).  A wake-up makes it read the rows after C{fetched} until there are none, in order,
    and hand them to the fan-out, which writes them like notifications (with positions to
    readers that want them).  After a LISTEN reconnect every stream reads what it missed.
  - A reader that opens with a position is held (the live rows skip it), gets the rows after its
    position up to C{written} from the table, and is released in the same reactor turn as its
    last replayed row is written: every row after C{written} is still ahead of the fan-out, so
    it gets each row once, in order, with no gap at the switch.

Wire protocol (readers that negotiated the C{pgws} subprotocol; others get the payloads as
plain text frames, as without the journal):
  - Opening: C{?resume=<JSON {"<channel>": [<seq>, "<epoch>"], ...}>} resumes after those
    positions; C{?history=<n>} asks for the last n messages of each journaled channel.
  - At open, for each journaled channel: C{{"event": "stream", "channel": c, "epoch": e,
    "seq": <the position live messages follow>}}, with C{"recovered": true|false} when a resume
    was asked: false when the epoch differs (the journal was recreated) or the position is older
    than what is retained; nothing is replayed then (no silent partial replay).
  - Each journaled message: a binary frame C{{"channel": c, "seq": n}}, then the text frame of
    its payload, byte for byte.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pgws._auth import Refusal
from pgws._channels import ChannelRegistry, position_frames
from pgws._closing import CLOSE_INTERNAL_ERROR
from pgws._journal_schema import migrate_until_done, migration, wake_channel
from pgws._postgres import describe_error
from pgws._reactor import backoff_delays, fire_and_log, fired, sleep, within

__all__ = ["Following", "Journal", "Resume", "matcher", "parse_resume"]

_log = Logger()

# Rows read per statement, live or replaying, and about how many payload bytes (always at least
# one row): payloads may be megabytes each.
FETCH_ROWS = 1000
FETCH_BYTES = 16 * 1024 * 1024
# Seconds a read of the journal may take before it is abandoned and tried again.
QUERY_DEADLINE = 5.0
# The journal reads no more while this many entries wait in the fan-out.
FANOUT_ROOM = 5000
# Nor, for a while, while more than 1 in PACE_SHARE of a channel's readers have more than the
# relay's pace bytes not sent yet: the rows wait in the table, and the readers are not driven
# past the slow-reader cut-off by a journal that reads faster than they take.  A minority that
# falls behind does not slow the others (it is cut off and resumes from the table), and a wait
# never lasts more than PACE_LIMIT seconds (a stalled majority is cut off after that).
PACE_SHARE = 10
PACE_STEP = 0.02
PACE_LIMIT = 2.0
# Retention: rows deleted per statement, and seconds between prunings.
PRUNE_BATCH = 10_000
PRUNE_INTERVAL = 10.0


class Database(Protocol):
    """What the journal needs of the pool: queries, and a transaction."""

    def run_query(self, sql: str, args: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]: ...

    def run_transaction(self, statements: list[str]) -> defer.Deferred[None]: ...


class Backlog(Protocol):
    """The fan-out, as the journal sees it."""

    def received_rows(self, channel: str, rows: list[tuple[int, str]]) -> None: ...

    def waiting(self) -> tuple[int, int]:
        """(entries, journaled payload bytes) waiting to be fanned out."""


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Which channels are journaled: those matching one of C{journal-channels}' patterns."""
    patterns = tuple(patterns)
    if patterns == ("*",):
        return lambda channel: True
    return lambda channel: any(fnmatch.fnmatchcase(channel, p) for p in patterns)


@dataclass
class Resume:
    """What a reader asked for at opening: positions to resume after, or some history."""

    positions: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # channel -> (seq, epoch)
    history: int = 0


def parse_resume(uri: str) -> Resume | None:
    """The C{resume} / C{history} of a request URI's query, or None; a malformed one is a 400."""
    _, _, query = uri.partition("?")
    if "resume=" not in query and "history=" not in query:
        return None
    params = parse_qs(query, keep_blank_values=True)
    positions: dict[str, tuple[int, str]] = {}
    if "resume" in params:
        try:
            value = json.loads(params["resume"][-1])
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
                and not isinstance(v[0], bool) and v[0] >= 0 and isinstance(v[1], str)
                for v in value.values()):
            raise Refusal(400, 'resume must be JSON {"<channel>": [<seq>, "<epoch>"], ...}')
        positions = {channel: (seq, epoch) for channel, (seq, epoch) in value.items()}
    history = 0
    if "history" in params:
        text = params["history"][-1]
        if not text.isdigit() or int(text) > 100_000:
            raise Refusal(400, "history must be a number of messages from 0 to 100000")
        history = int(text)
    return Resume(positions, history)


@dataclass
class _Stream:
    """One journaled channel that someone reads, in this process."""

    channel: str
    epoch: str = ""
    fetched: int = 0  # the last seq read from the journal (handed to the fan-out)
    written: int = 0  # the last seq the fan-out wrote to the live readers
    reading: bool = False  # a read loop runs
    again: bool = False  # read once more after the current read (a reconnect happened)
    ready: defer.Deferred[None] = field(default_factory=defer.Deferred)


class Journal:
    """
    The journal of one process (see the module docstring).

    @param patterns: which channels are journaled (C{journal-channels}).
    """

    def __init__(self, reactor: IReactorTime, db: Database, schema: str,
                 journaled: Callable[[str], bool], max_payload: int, retention_seconds: int,
                 retention_count: int, pace_bytes: int = 0) -> None:
        """
        @param pace_bytes: reads of a channel wait while its readers have more than this many
            bytes not sent yet (see L{PACE_SHARE}); 0: they never wait for readers.
        """
        self._reactor = reactor
        self._pace_bytes = pace_bytes
        self._db = db
        self.schema = schema
        self.wake_channel = wake_channel(schema)
        self.journaled = journaled
        self._max_payload = max_payload
        self._retention = (retention_seconds, retention_count)
        self._streams: dict[str, _Stream] = {}
        self._registry: ChannelRegistry | None = None
        self._backlog: Backlog | None = None
        self._pruner: LoopingCall | None = None
        self.migrated = False
        self._migrated: defer.Deferred[None] = defer.Deferred()
        self.rows_read = 0  # journaled messages read for the live readers, ever (metrics)
        self.rows_replayed = 0  # journaled messages replayed to resuming readers, ever (metrics)

    def deliver_to(self, registry: ChannelRegistry, backlog: Backlog) -> None:
        self._registry = registry
        self._backlog = backlog

    # -- start and stop ----------------------------------------------------------------------------

    async def start(self, fatal: Callable[[str], None]) -> None:
        """
        Migrate the schema (retrying while the database is away), then prune in the background.
        A schema this pgws cannot use calls C{fatal(reason)}.
        """
        self.migrated = await migrate_until_done(
            self._reactor, lambda: self._db.run_transaction(migration(self.schema,
                                                                      self._max_payload)),
            "Journal", self.schema, fatal)
        if not self.migrated:
            return
        _log.info("Journal ready in schema {schema}", schema=self.schema)
        self._migrated.callback(None)
        self._pruner = LoopingCall(lambda: fire_and_log(self.prune(), "journal pruning"))
        self._pruner.clock = self._reactor
        self._pruner.start(PRUNE_INTERVAL, now=False)

    def stop(self) -> None:
        if self._pruner is not None and self._pruner.running:
            self._pruner.stop()

    # -- which channels are read (the registry asks, through the relay's listen target) ------------

    def watch(self, channel: str) -> None:
        """The first reader of a journaled channel: learn its epoch and head, then follow it."""
        stream = self._streams[channel] = _Stream(channel)
        fire_and_log(self._begin(stream), "journal stream")

    async def _begin(self, stream: _Stream) -> None:
        delays = backoff_delays(first=0.25, cap=5.0)
        while self._streams.get(stream.channel) is stream:
            try:
                await self._migrated_or_now()
                rows = await self._head(stream.channel)
            except Exception as e:
                _log.warn("Journal: cannot read the head of {channel}: {why}",
                          channel=stream.channel, why=describe_error(e))
                await sleep(self._reactor, next(delays))
                continue
            stream.epoch, head = rows[0]
            stream.fetched = stream.written = max(stream.fetched, int(head))
            stream.ready.callback(None)
            if stream.again:  # woken while its head was being read
                self._read(stream)
            return

    async def _head(self, channel: str) -> list[tuple[Any, ...]]:
        """
        (epoch, head) of a channel, its row made if there is none.  A plain read first: it never
        waits for a producer that holds the head row's lock (an upsert would, with its pool
        connection, and every other channel's readers behind it).
        """
        s = self.schema
        rows = await self._query(
            f"SELECT epoch, head FROM {s}.streams WHERE channel = %s", (channel,))
        if rows:
            return rows
        return await self._query(
            f"WITH made AS (INSERT INTO {s}.streams (channel) VALUES (%s) ON CONFLICT DO NOTHING "
            f"RETURNING epoch, head) SELECT epoch, head FROM made UNION ALL "
            f"SELECT epoch, head FROM {s}.streams WHERE channel = %s", (channel, channel))

    def _query(self, sql: str, args: Any = None) -> defer.Deferred[list[tuple[Any, ...]]]:
        """
        A read with a deadline: a query stuck on a pool connection that died under it would
        hold a stream (or a resume) for good; abandoned, it is retried (or told).
        """
        return within(self._db.run_query(sql, args), QUERY_DEADLINE, self._reactor)

    def _migrated_or_now(self) -> defer.Deferred[None]:
        return defer.succeed(None) if self.migrated else fired(self._migrated)

    def unwatch(self, channel: str) -> None:
        self._streams.pop(channel, None)

    def ready(self, channel: str) -> defer.Deferred[None]:
        """Fires once C{channel}'s stream knows its head (a socket opens only then)."""
        stream = self._streams.get(channel)
        return defer.succeed(None) if stream is None else fired(stream.ready)

    def stream_info(self, channel: str) -> tuple[str, int] | None:
        """(epoch, the position live messages follow) of a channel being read, once known."""
        stream = self._streams.get(channel)
        if stream is None or not stream.ready.called:
            return None
        return stream.epoch, stream.written

    async def lag(self) -> dict[str, int]:
        """
        How many journaled messages each channel read here has that its live readers were not
        written yet: the journal's head, read now, minus what the fan-out wrote.  One query.
        """
        streams = {c: s for c, s in self._streams.items() if s.ready.called}
        if not streams:
            return {}
        rows = await self._query(
            f"SELECT channel, head FROM {self.schema}.streams WHERE channel = ANY(%s)",
            (list(streams),))
        return {channel: max(0, int(head) - streams[channel].written)
                for channel, head in rows if channel in streams}

    # -- live: wake-ups, reading, writing ------------------------------------------------------------

    def woken(self, payloads: list[str]) -> None:
        """Wake-ups from the LISTEN session: each names a channel with new rows."""
        streams = self._streams
        for channel in payloads:
            stream = streams.get(channel)
            if stream is None:
                continue
            stream.again = True
            if stream.ready.called:
                self._read(stream)

    def recovered(self) -> None:
        """The LISTEN session is back: wake-ups may have been missed; read every stream."""
        for stream in self._streams.values():
            if stream.ready.called:
                stream.again = True
                self._read(stream)

    def _read(self, stream: _Stream) -> None:
        if not stream.reading:
            stream.reading = True
            fire_and_log(self._read_loop(stream), "journal read")

    async def _read_loop(self, stream: _Stream) -> None:
        assert self._backlog is not None
        delays = backoff_delays(first=0.25, cap=5.0)
        try:
            while self._streams.get(stream.channel) is stream and stream.again:
                stream.again = False
                while self._no_room():
                    await sleep(self._reactor, 0.01)
                await self._paced(stream.channel)
                try:
                    rows = await self._rows(stream.channel, stream.fetched)
                except Exception as e:
                    _log.warn("Journal: reading {channel} failed: {why}", channel=stream.channel,
                              why=describe_error(e))
                    stream.again = True
                    await sleep(self._reactor, next(delays))
                    continue
                if self._streams.get(stream.channel) is not stream:
                    return
                if rows:
                    stream.fetched = rows[-1][0]
                    self.rows_read += len(rows)
                    self._backlog.received_rows(stream.channel, rows)
                if len(rows) == FETCH_ROWS or sum(len(p) for _, p in rows) >= FETCH_BYTES // 2:
                    stream.again = True  # there may be more
        finally:
            stream.reading = False

    async def _paced(self, channel: str) -> None:
        """Wait (bounded) while too many of C{channel}'s readers are behind (L{PACE_SHARE})."""
        assert self._registry is not None
        if not self._pace_bytes:
            return
        for _ in range(int(PACE_LIMIT / PACE_STEP)):
            behind, readers = self._registry.behind(channel, self._pace_bytes)
            if behind * PACE_SHARE <= readers:
                return
            await sleep(self._reactor, PACE_STEP)

    def _no_room(self) -> bool:
        assert self._backlog is not None
        entries, size = self._backlog.waiting()
        return entries > FANOUT_ROOM or size > FETCH_BYTES

    def _rows(self, channel: str, after: int, upto: int | None = None,
              ) -> defer.Deferred[list[tuple[Any, ...]]]:
        bound = "" if upto is None else f" AND seq <= {int(upto)}"
        # The running total stops at about FETCH_BYTES; octet_length reads a stored value's size
        # without detoasting it, and rows past the total are never sent.
        return self._query(
            f"SELECT seq, payload FROM (SELECT seq, payload, sum(octet_length(payload)) OVER "
            f"(ORDER BY seq) - octet_length(payload) AS before FROM {self.schema}.messages "
            f"WHERE channel = %s AND seq > %s{bound} ORDER BY seq LIMIT {FETCH_ROWS}) AS t "
            f"WHERE before < {FETCH_BYTES} ORDER BY seq", (channel, after))

    def deliver(self, channel: str, rows: list[tuple[int, str]]) -> int:
        """The fan-out writes a run of rows: to the registry, and C{written} moves on."""
        assert self._registry is not None
        readers = self._registry.deliver_rows(channel, rows)
        stream = self._streams.get(channel)
        if stream is not None:
            stream.written = max(stream.written, rows[-1][0])
        return readers

    # -- a reader that opens with a position -----------------------------------------------------------

    async def open_reader(self, reader: Any, channel: str, resume: Resume | None,
                          send_control: Callable[[dict[str, Any]], None]) -> None:
        """
        Tell a reader with positions where C{channel} stands, then replay what it asked for.
        The reader is held in the registry (since before it opened) until it is live.
        """
        assert self._registry is not None
        try:
            stream = self._streams.get(channel)
            if stream is None or not stream.ready.called:
                return
            info: dict[str, Any] = {"event": "stream", "channel": channel,
                                    "epoch": stream.epoch, "seq": stream.written}
            try:
                after = await self._start_position(stream, resume, info)
            except Exception as e:
                # Told, never a silent gap: the reader starts from here, knowing it.
                _log.warn("Journal: resume of {channel} failed: {why}", channel=channel,
                          why=describe_error(e))
                info["recovered"], after = False, None
            if after is None:
                info["seq"] = stream.written  # where live messages now follow
            send_control(info)
            if after is not None:
                try:
                    await self._replay(reader, stream, after)
                except Exception as e:
                    # It was told "recovered": only a new resume can fill what is missing.
                    _log.warn("Journal: replay of {channel} failed: {why}", channel=channel,
                              why=describe_error(e))
                    reader.close_with(CLOSE_INTERNAL_ERROR,
                                      "journal replay failed; resume from your last position")
        finally:
            self._registry.release(channel, reader)

    async def _start_position(self, stream: _Stream, resume: Resume | None,
                              info: dict[str, Any]) -> int | None:
        """Where the replay starts (None: no replay); C{info} gets C{recovered}."""
        if resume is None:
            return None
        asked = resume.positions.get(stream.channel)
        if asked is not None:
            seq, epoch = asked
            if epoch == stream.epoch and seq > stream.written:
                # Ahead of this process (it came from another pgws): wait for the fan-out.
                await self._caught_up(stream, seq)
            recovered = epoch == stream.epoch and seq <= stream.written and (
                seq == stream.written or seq + 1 >= await self._oldest(stream.channel))
            info["recovered"] = recovered
            info["seq"] = stream.written
            return seq if recovered else None
        if resume.history:
            return max(0, stream.written - resume.history)
        return None

    async def _caught_up(self, stream: _Stream, seq: int, seconds: float = 10.0) -> None:
        """Wait (a while) until the live readers have been written up to C{seq}."""
        stream.again = True
        self._read(stream)
        for _ in range(int(seconds / 0.01)):
            if stream.written >= seq or self._streams.get(stream.channel) is not stream:
                return
            await sleep(self._reactor, 0.01)

    async def _oldest(self, channel: str) -> int:
        rows = await self._query(
            f"SELECT min(seq) FROM {self.schema}.messages WHERE channel = %s", (channel,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else 2 ** 62

    async def _replay(self, reader: Any, stream: _Stream, after: int) -> None:
        position = after
        while self._streams.get(stream.channel) is stream and position < stream.written:
            rows = await self._rows(stream.channel, position, upto=stream.written)
            if not rows:
                return  # pruned meanwhile: what is left comes live
            reader.write_frames(position_frames(stream.channel, rows))
            self.rows_replayed += len(rows)
            position = rows[-1][0]
        # No reactor turn since the check above: the fan-out writes everything after it.

    # -- retention ---------------------------------------------------------------------------------------

    async def prune(self) -> int:
        """Delete what retention lets go, in batches; how many rows went."""
        seconds, count = self._retention
        s = self.schema
        deleted = 0
        statements = []
        if seconds:
            statements.append(
                f"SELECT ctid FROM {s}.messages WHERE created_at < now() - "
                f"make_interval(secs => {int(seconds)}) LIMIT {PRUNE_BATCH}")
        if count:
            statements.append(
                f"SELECT m.ctid FROM {s}.streams st JOIN {s}.messages m ON m.channel = st.channel "
                f"AND m.seq <= st.head - {int(count)} LIMIT {PRUNE_BATCH}")
        for select in statements:
            while True:
                rows = await self._db.run_query(
                    f"WITH gone AS (DELETE FROM {s}.messages WHERE ctid = ANY (ARRAY({select})) "
                    f"RETURNING 1) SELECT count(*) FROM gone")
                n = int(rows[0][0])
                deleted += n
                if n < PRUNE_BATCH:
                    break
                await sleep(self._reactor, 0)
        return deleted




class ListenTarget(Protocol):
    def listen(self, channel: str) -> None: ...

    def unlisten(self, channel: str) -> None: ...

    def ready(self, channel: str) -> defer.Deferred[None]: ...


class Following:
    """
    The registry's listen target with the journal on: a channel is LISTENed (plain NOTIFYs still
    reach its readers) and, when journaled, followed in the journal; it is ready when both are.
    """

    def __init__(self, listener: ListenTarget, journal: Journal) -> None:
        self._listener = listener
        self._journal = journal
        listener.listen(journal.wake_channel)  # for as long as the process runs

    def listen(self, channel: str) -> None:
        self._listener.listen(channel)
        if self._journal.journaled(channel):
            self._journal.watch(channel)

    def unlisten(self, channel: str) -> None:
        self._listener.unlisten(channel)
        self._journal.unwatch(channel)

    def ready(self, channel: str) -> defer.Deferred[None]:
        # The wake-ups' LISTEN too: a commit after the stream read its head must wake it.
        waits = [self._listener.ready(channel), self._listener.ready(self._journal.wake_channel),
                 self._journal.ready(channel)]
        return fired(defer.gatherResults(waits))
