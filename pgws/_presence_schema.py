"""
Presence's tables and functions in PostgreSQL (in C{journal-schema}, beside the journal's, with
the same migration rules: see L{pgws._journal_schema}), and the statements pgws runs on them.

Tables:
  - C{presence_processes}: one row per live pgws process with presence on, and when its lease
    C{expires}.  Each process renews its own lease on every heartbeat; any process deletes the
    rows whose lease ran out (a killed process), and their holds with them.
  - C{presence_holds}: (channel, member, process): C{process} has at least one socket of
    C{member} on C{channel}.  A process counts its own sockets; the table only learns of a
    member's first socket on a channel in that process, and of its last.
  - C{presence_channels}: per channel, how many distinct members it has (C{members}) and C{seq},
    a number that grows by one with each transaction that changed its members.

Why a channel row is locked by every change: a member joins when its first hold appears in any
process and leaves when its last goes, and two processes changing the same member at once must
not both say so.  Each change locks the rows of its channels (in channel order, so that two
batches never wait for each other), then decides who joined or left in a statement that sees
every hold committed before the lock.  So a channel's changes are serialised in commit order,
which C{seq} numbers: an answer read at C{seq} = n already holds every change up to n, and
the changes after it come as notifications with higher numbers.

Announcements: C{pg_notify('<schema>.presence', ...)} of C{{"channel": c, "seq": n, "count": k,
"join": [...], "leave": [...]}}, in pieces of under 8000 bytes (PostgreSQL's NOTIFY limit) that
share their C{seq} and C{count}; C{count} is the channel's members once the change is made.
"""

from __future__ import annotations

from pgws._journal_schema import preamble, quote_schema, record_version

__all__ = ["PRESENCE_VERSION", "migration", "presence_channel"]

# The schema version that added presence's objects.
PRESENCE_VERSION = 2

# Bytes of member names (as JSON) in one announcement: with the channel (63 bytes, up to 6 times
# that escaped) and the numbers it stays under the NOTIFY limit.
_CHUNK = 6000


def presence_channel(schema: str) -> str:
    """The NOTIFY channel of presence's announcements."""
    return f"{schema}.presence"


def migration(schema: str) -> list[str]:
    """The statements that bring presence's objects to L{PRESENCE_VERSION}, in one transaction."""
    s = quote_schema(schema)
    notify = presence_channel(schema)
    return [
        *preamble(s),
        f"""CREATE TABLE IF NOT EXISTS {s}.presence_processes (
              process text PRIMARY KEY,
              name text NOT NULL,
              expires timestamptz NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.presence_channels (
              channel text PRIMARY KEY,
              members bigint NOT NULL DEFAULT 0,
              seq bigint NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.presence_holds (
              channel text NOT NULL,
              member text NOT NULL,
              process text NOT NULL,
              PRIMARY KEY (channel, member, process))""",
        f"CREATE INDEX IF NOT EXISTS presence_holds_process ON {s}.presence_holds (process)",
        # Called with the channel's row locked: count, number and announce one change.
        f"""CREATE OR REPLACE FUNCTION {s}.presence_announce(p_channel text, p_joins text[],
                                                             p_leaves text[]) RETURNS void
            LANGUAGE plpgsql AS $$
            DECLARE
              n bigint;
              q bigint;
              js text[] := '{{}}';
              ls text[] := '{{}}';
              size integer := 0;
              w integer;
              m text;
              j boolean;
            BEGIN
              IF cardinality(p_joins) = 0 AND cardinality(p_leaves) = 0 THEN
                RETURN;
              END IF;
              UPDATE {s}.presence_channels AS pc
                SET members = pc.members + cardinality(p_joins) - cardinality(p_leaves),
                    seq = pc.seq + 1
                WHERE pc.channel = p_channel RETURNING pc.members, pc.seq INTO n, q;
              FOR m, j IN SELECT x, true FROM unnest(p_joins) AS x
                          UNION ALL SELECT x, false FROM unnest(p_leaves) AS x LOOP
                w := octet_length(to_json(m)::text) + 1;
                IF size > 0 AND size + w > {_CHUNK} THEN
                  PERFORM pg_notify('{notify}', json_build_object('channel', p_channel, 'seq', q,
                    'count', n, 'join', js, 'leave', ls)::text);
                  js := '{{}}';
                  ls := '{{}}';
                  size := 0;
                END IF;
                IF j THEN
                  js := js || m;
                ELSE
                  ls := ls || m;
                END IF;
                size := size + w;
              END LOOP;
              PERFORM pg_notify('{notify}', json_build_object('channel', p_channel, 'seq', q,
                'count', n, 'join', js, 'leave', ls)::text);
            END $$""",
        # One process's changes: hold (true) or release (false) each (channel, member).
        f"""CREATE OR REPLACE FUNCTION {s}.presence_apply(p_process text, p_channels text[],
                                                          p_members text[], p_holds boolean[])
            RETURNS void LANGUAGE plpgsql AS $$
            DECLARE
              cs text[];
              ms text[];
              hs boolean[];
              r record;
            BEGIN
              INSERT INTO {s}.presence_channels (channel)
                SELECT DISTINCT c FROM unnest(p_channels) AS c ORDER BY c ON CONFLICT DO NOTHING;
              PERFORM 1 FROM {s}.presence_channels WHERE channel = ANY (p_channels)
                ORDER BY channel FOR UPDATE;
              WITH wanted AS (SELECT * FROM unnest(p_channels, p_members, p_holds) AS t(c, m, h)),
                held AS (INSERT INTO {s}.presence_holds (channel, member, process)
                         SELECT c, m, p_process FROM wanted WHERE h ORDER BY c, m
                         ON CONFLICT DO NOTHING RETURNING channel, member),
                released AS (DELETE FROM {s}.presence_holds AS x USING wanted AS w
                             WHERE NOT w.h AND x.channel = w.c AND x.member = w.m
                               AND x.process = p_process RETURNING x.channel, x.member)
              SELECT array_agg(ch.channel), array_agg(ch.member), array_agg(ch.joined)
                INTO cs, ms, hs
                FROM (SELECT channel, member, true AS joined FROM held
                      UNION ALL SELECT channel, member, false FROM released) AS ch;
              -- A new statement, which sees the changes above: a member joins when this
              -- process's hold is its only one, and leaves when none is left.
              FOR r IN SELECT t.c AS channel,
                         coalesce(array_agg(t.m ORDER BY t.m) FILTER (WHERE t.j), '{{}}') AS joins,
                         coalesce(array_agg(t.m ORDER BY t.m) FILTER (WHERE NOT t.j), '{{}}') AS leaves
                       FROM unnest(cs, ms, hs) AS t(c, m, j)
                       WHERE NOT EXISTS (SELECT FROM {s}.presence_holds AS o
                                         WHERE o.channel = t.c AND o.member = t.m
                                           AND (NOT t.j OR o.process <> p_process))
                       GROUP BY t.c ORDER BY t.c LOOP
                PERFORM {s}.presence_announce(r.channel, r.joins, r.leaves);
              END LOOP;
            END $$""",
        # Every hold of these processes goes (a stop, or leases that ran out), with the leaves.
        f"""CREATE OR REPLACE FUNCTION {s}.presence_drop(p_processes text[]) RETURNS void
            LANGUAGE plpgsql AS $$
            DECLARE
              cs text[];
              ms text[];
              r record;
            BEGIN
              PERFORM 1 FROM {s}.presence_channels WHERE channel IN (
                  SELECT channel FROM {s}.presence_holds WHERE process = ANY (p_processes))
                ORDER BY channel FOR UPDATE;
              WITH gone AS (DELETE FROM {s}.presence_holds WHERE process = ANY (p_processes)
                            RETURNING channel, member)
              SELECT array_agg(g.channel), array_agg(g.member) INTO cs, ms
                FROM (SELECT DISTINCT channel, member FROM gone) AS g;
              FOR r IN SELECT t.c AS channel, array_agg(t.m ORDER BY t.m) AS leaves
                       FROM unnest(cs, ms) AS t(c, m)
                       WHERE NOT EXISTS (SELECT FROM {s}.presence_holds AS o
                                         WHERE o.channel = t.c AND o.member = t.m)
                       GROUP BY t.c ORDER BY t.c LOOP
                PERFORM {s}.presence_announce(r.channel, '{{}}', r.leaves);
              END LOOP;
            END $$""",
        # The lease is renewed, then the changes made; true if the process's row was there
        # (false: it is new, or its lease ran out and others dropped its holds).
        f"""CREATE OR REPLACE FUNCTION {s}.presence_update(p_process text, p_name text,
                p_lease double precision, p_channels text[], p_members text[],
                p_holds boolean[]) RETURNS boolean
            LANGUAGE plpgsql AS $$
            DECLARE
              alive boolean;
            BEGIN
              UPDATE {s}.presence_processes SET expires = now() + make_interval(secs => p_lease)
                WHERE process = p_process;
              alive := FOUND;
              IF NOT alive THEN
                INSERT INTO {s}.presence_processes (process, name, expires)
                  VALUES (p_process, p_name, now() + make_interval(secs => p_lease))
                  ON CONFLICT (process) DO UPDATE SET expires = excluded.expires;
              END IF;
              IF cardinality(p_channels) > 0 THEN
                PERFORM {s}.presence_apply(p_process, p_channels, p_members, p_holds);
              END IF;
              RETURN alive;
            END $$""",
        # A heartbeat: the lease is renewed, and the processes whose lease ran out are dropped.
        # A row another transaction has locked is being renewed or dropped: it is skipped.
        f"""CREATE OR REPLACE FUNCTION {s}.presence_beat(p_process text, p_name text,
                                                         p_lease double precision)
            RETURNS boolean LANGUAGE plpgsql AS $$
            DECLARE
              alive boolean;
              dead text[];
            BEGIN
              alive := {s}.presence_update(p_process, p_name, p_lease, '{{}}', '{{}}', '{{}}');
              WITH gone AS (DELETE FROM {s}.presence_processes WHERE process IN (
                  SELECT process FROM {s}.presence_processes WHERE expires < now()
                  FOR UPDATE SKIP LOCKED) RETURNING process)
              SELECT array_agg(process) INTO dead FROM gone;
              IF dead IS NOT NULL THEN
                PERFORM {s}.presence_drop(dead);
              END IF;
              RETURN alive;
            END $$""",
        f"""CREATE OR REPLACE FUNCTION {s}.presence_release(p_process text) RETURNS void
            LANGUAGE plpgsql AS $$
            BEGIN
              DELETE FROM {s}.presence_processes WHERE process = p_process;
              PERFORM {s}.presence_drop(ARRAY[p_process]);
            END $$""",
        record_version(s, PRESENCE_VERSION),
    ]


def update_sql(schema: str) -> str:
    return (f"SELECT {quote_schema(schema)}.presence_update(%s, %s, %s, %s::text[], %s::text[], "
            f"%s::boolean[])")


def beat_sql(schema: str) -> str:
    return f"SELECT {quote_schema(schema)}.presence_beat(%s, %s, %s)"


def release_sql(schema: str) -> str:
    return f"SELECT {quote_schema(schema)}.presence_release(%s)"


def held_sql(schema: str) -> str:
    return f"SELECT channel, member FROM {quote_schema(schema)}.presence_holds WHERE process = %s"


def page_sql(schema: str, after: bool) -> str:
    """
    (count, seq, members) of a channel in one statement, so one snapshot: the page is as the
    count and the seq say.  C{%s} are the channel (three times), the cursor if C{after}, and
    the number of members to read.
    """
    s = quote_schema(schema)
    cursor = " AND member > %s" if after else ""
    return (f"SELECT coalesce((SELECT members FROM {s}.presence_channels WHERE channel = %s), 0), "
            f"coalesce((SELECT seq FROM {s}.presence_channels WHERE channel = %s), 0), "
            f"ARRAY(SELECT member FROM {s}.presence_holds WHERE channel = %s{cursor} "
            f"GROUP BY member ORDER BY member LIMIT %s)")
