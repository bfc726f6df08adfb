"""
The journal's tables and functions in PostgreSQL, and their migration.

pgws owns one schema (C{journal-schema}, default C{pgws}) and touches nothing else.  Migration
runs at start-up, in one transaction under an advisory lock (several pgws processes may start at
once), and is a no-op when the schema is already at this version; a schema of a newer version is
refused.

One schema, two features: the journal and presence (L{pgws._presence_schema}) each migrate their
own objects, in a transaction of their own under the same advisory lock, with the same
L{preamble}; a feature that is off creates nothing.  The C{version} table holds one number, the
newest layout of what the schema holds: version 1 is the journal's objects, version 2 added
presence's.  Each feature records the version of its own objects (never lowering it), so a
journal-only schema stays at 1 and the pgws versions that know only 1 keep using it, while a
schema that has presence's objects is at 2.  A version above L{SCHEMA_VERSION} is refused, by
either feature, before anything in it is touched.  A later layout change of a feature's objects
alters them where they exist (the other feature's may be absent) and records its version.

Ordering (why a head row, not a sequence): ids from a sequence are handed out at insert time but
become visible at commit time, so they commit out of order and a reader polling C{id > last}
skips rows.  Instead each channel has a head row in C{streams}; L{send} increments its counter
under the row's lock, inside the producer's transaction.  A second producer of the same channel
waits for that lock until the first commits or rolls back, so each channel's numbers are dense
and in commit order: a reader that has seen N has seen everything up to N.  The cost: producers
of one channel are serialised from their C{send} to their commit (keep those transactions short;
other channels are not affected), and a long transaction holding a channel's head holds back
delivery of that channel only.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pgws._postgres import describe_error
from pgws._reactor import backoff_delays, sleep

__all__ = ["JOURNAL_VERSION", "SCHEMA_VERSION", "JournalSchemaError", "migrate_until_done",
           "migration", "preamble", "quote_schema", "record_version", "wake_channel"]

_log = Logger()

# The newest layout this pgws knows (a schema above it is refused), and the journal's own.
SCHEMA_VERSION = 2
JOURNAL_VERSION = 1

# An arbitrary key for pg_advisory_xact_lock: one migration at a time per database.
_MIGRATION_LOCK = 0x70677773  # "pgws"


class JournalSchemaError(Exception):
    """The journal schema cannot be used by this pgws: the text says why, in one line."""


async def migrate_until_done(
    reactor: IReactorTime, migrate: Callable[[], Awaitable[object]], feature: str, schema: str,
    fatal: Callable[[str], None], stopping: Callable[[], bool] = lambda: False,
) -> bool:
    """
    Run one feature's migration, retrying with back-off while the database is away: True once
    it is done.  A schema this pgws cannot use (a newer version) calls C{fatal(reason)} and
    gives False at once, as does C{stopping()} becoming true between attempts.
    """
    delays = backoff_delays()
    while not stopping():
        try:
            await migrate()
        except Exception as e:
            why = describe_error(e)
            if "upgrade pgws" in why or isinstance(e, JournalSchemaError):
                fatal(why)
                return False
            delay = next(delays)
            _log.warn("{feature}: migrating {schema} failed: {why}; retrying in {delay:.0f} s",
                      feature=feature, schema=schema, why=why, delay=delay)
            await sleep(reactor, delay)
            continue
        return True
    return False


def quote_schema(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise JournalSchemaError(f"journal-schema {name!r} must be a lower-case SQL name "
                                 "(letters, digits, _; at most 63)")
    return name


def wake_channel(schema: str) -> str:
    """The NOTIFY channel of the journal's wake-ups: the channel's name, never the payload."""
    return f"{schema}.wake"


def migration(schema: str, max_payload: int) -> list[str]:
    """
    The statements that bring the journal's objects to L{JOURNAL_VERSION}, with the functions
    written for this configuration; run them in one transaction.  A newer schema is refused before anything
    in it is touched.
    """
    s = quote_schema(schema)
    wake = wake_channel(schema)
    return [
        *preamble(s),
        f"""CREATE TABLE IF NOT EXISTS {s}.streams (
              channel text PRIMARY KEY,
              epoch text NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text),
              head bigint NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.messages (
              channel text NOT NULL,
              seq bigint NOT NULL,
              payload text NOT NULL,
              created_at timestamptz NOT NULL DEFAULT now(),
              PRIMARY KEY (channel, seq))""",
        # BRIN: rows arrive in time order, and it costs inserts next to nothing (retention by age).
        f"CREATE INDEX IF NOT EXISTS messages_created_at ON {s}.messages USING brin (created_at)",
        # The limit and the wake-up channel are written into the function (it is replaced at
        # every start, so a changed journal-max-payload takes effect): no lookup per message.
        f"""CREATE OR REPLACE FUNCTION {s}.send(channel text, payload text) RETURNS bigint
            LANGUAGE plpgsql AS $$
            DECLARE
              n bigint;
            BEGIN
              IF channel IS NULL OR channel = '' OR octet_length(channel) > 63 THEN
                RAISE EXCEPTION 'pgws.send: the channel must be 1 to 63 bytes'
                  USING ERRCODE = 'invalid_parameter_value';
              END IF;
              IF payload IS NULL THEN
                RAISE EXCEPTION 'pgws.send: the payload is NULL'
                  USING ERRCODE = 'null_value_not_allowed';
              END IF;
              IF octet_length(payload) > {int(max_payload)} THEN
                RAISE EXCEPTION 'pgws.send: the payload is % bytes; journal-max-payload is %',
                  octet_length(payload), {int(max_payload)}
                  USING ERRCODE = 'program_limit_exceeded';
              END IF;
              -- The head row's lock orders this channel's producers by commit (see above).
              -- UPDATE first: cheaper than an upsert for every channel but a new one.
              UPDATE {s}.streams AS st SET head = st.head + 1 WHERE st.channel = send.channel
                RETURNING st.head INTO n;
              IF NOT FOUND THEN
                INSERT INTO {s}.streams AS st (channel, head) VALUES (send.channel, 1)
                  ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET head = st.head + 1
                  RETURNING st.head INTO n;
              END IF;
              INSERT INTO {s}.messages (channel, seq, payload) VALUES (send.channel, n, payload);
              -- One wake-up per channel per transaction: PostgreSQL folds identical ones.
              PERFORM pg_notify('{wake}', send.channel);
              RETURN n;
            END $$""",
        # A batch in one call: one head update for all of it (what a busy producer wants).
        f"""CREATE OR REPLACE FUNCTION {s}.send(channel text, payloads text[]) RETURNS bigint
            LANGUAGE plpgsql AS $$
            DECLARE
              k integer := coalesce(array_length(payloads, 1), 0);
              n bigint;
            BEGIN
              IF k = 0 THEN
                RETURN NULL;
              END IF;
              IF channel IS NULL OR channel = '' OR octet_length(channel) > 63 THEN
                RAISE EXCEPTION 'pgws.send: the channel must be 1 to 63 bytes'
                  USING ERRCODE = 'invalid_parameter_value';
              END IF;
              IF EXISTS (SELECT FROM unnest(payloads) AS p WHERE p IS NULL) THEN
                RAISE EXCEPTION 'pgws.send: a payload is NULL'
                  USING ERRCODE = 'null_value_not_allowed';
              END IF;
              IF EXISTS (SELECT FROM unnest(payloads) AS p WHERE octet_length(p) > {int(max_payload)}) THEN
                RAISE EXCEPTION 'pgws.send: a payload is % bytes; journal-max-payload is %',
                  (SELECT max(octet_length(p)) FROM unnest(payloads) AS p), {int(max_payload)}
                  USING ERRCODE = 'program_limit_exceeded';
              END IF;
              UPDATE {s}.streams AS st SET head = st.head + k WHERE st.channel = send.channel
                RETURNING st.head INTO n;
              IF NOT FOUND THEN
                INSERT INTO {s}.streams AS st (channel, head) VALUES (send.channel, k)
                  ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET head = st.head + k
                  RETURNING st.head INTO n;
              END IF;
              INSERT INTO {s}.messages (channel, seq, payload)
                SELECT send.channel, n - k + i, p FROM unnest(payloads) WITH ORDINALITY AS t(p, i);
              PERFORM pg_notify('{wake}', send.channel);
              RETURN n;
            END $$""",
        # Client messages: journaled and plain ones in one statement, in the socket's order.
        f"""CREATE OR REPLACE FUNCTION {s}.relay(channels text[], payloads text[],
                                                 journaled boolean[]) RETURNS void
            LANGUAGE plpgsql AS $$
            DECLARE
              n integer := coalesce(array_length(channels, 1), 0);
              j integer;
            BEGIN
              -- A run of one journaled channel is one send (one head update), in order.
              FOR i IN 1 .. n LOOP
                IF NOT journaled[i] THEN
                  PERFORM pg_notify(channels[i], payloads[i]);
                ELSIF i = 1 OR NOT journaled[i - 1] OR channels[i - 1] <> channels[i] THEN
                  j := i;
                  WHILE j < n AND journaled[j + 1] AND channels[j + 1] = channels[i] LOOP
                    j := j + 1;
                  END LOOP;
                  PERFORM {s}.send(channels[i], payloads[i:j]);
                END IF;
              END LOOP;
            END $$""",
        record_version(s, JOURNAL_VERSION),
    ]


def preamble(schema: str) -> list[str]:
    """
    What every feature's migration begins with, in its transaction: one migration at a time,
    the schema and its version table, and the refusal of a newer schema.
    """
    s = quote_schema(schema)
    return [
        f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})",
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.version (one boolean PRIMARY KEY DEFAULT true "
        f"CHECK (one), version integer NOT NULL)",
        # Refuse a newer schema before touching anything in it.
        f"""DO $$ BEGIN
              IF (SELECT max(version) FROM {s}.version) > {SCHEMA_VERSION} THEN
                RAISE EXCEPTION 'pgws: the journal schema "{s}" is at version %; this pgws knows '
                  'versions up to {SCHEMA_VERSION}: upgrade pgws', (SELECT max(version) FROM {s}.version)
                  USING ERRCODE = 'feature_not_supported';
              END IF;
            END $$""",
    ]


def record_version(schema: str, version: int) -> str:
    """The statement that ends a feature's migration: the schema is at least at C{version}."""
    s = quote_schema(schema)
    return (f"INSERT INTO {s}.version (version) VALUES ({int(version)}) ON CONFLICT (one) DO "
            f"UPDATE SET version = excluded.version WHERE {s}.version.version < excluded.version")
