"""
`python -m bench.journal_sql`: where PostgreSQL's time goes in the journal's functions, which the
journal-producers and journal-writers scenarios spend most of their time in (py-spy sees only
pgws).  On a throwaway PostgreSQL with the journal schema made by pgws's own migration, it
runs each statement back to back for a few seconds and prints messages/s and PostgreSQL CPU
per message:

  - pg_notify and <schema>.send, `--batch` per statement (the producers' batching);
  - parts of send() alone (scratch copies in schema bench_variants, made here): the head-row
    update, the messages insert;
  - <schema>.send(channel, payloads[]), one call per statement: one head update by the
    batch's size, one INSERT ... SELECT, one wake-up;
  - <schema>.relay (client messages) from 10 connections on one channel, 500 per statement (how
    pgws's pool sends a flood of writers), and a set-based relay: one head update per channel.

The scratch functions copy pgws/_journal_schema.py's statements at the time of writing; the
figures of pgws's own functions are always those of the tree measured.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.loadgen import make_payload
from bench.services import Postgres
from pgws._journal_schema import migration

SCHEMA = "pgws"
CHANNEL = "bench_sql"

VARIANTS = f"""
CREATE SCHEMA bench_variants;
CREATE FUNCTION bench_variants.head_only(channel text, payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
  UPDATE {SCHEMA}.streams AS st SET head = st.head + 1 WHERE st.channel = head_only.channel
    RETURNING st.head INTO n;
  IF NOT FOUND THEN
    INSERT INTO {SCHEMA}.streams AS st (channel, head) VALUES (head_only.channel, 1)
      ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET head = st.head + 1
      RETURNING st.head INTO n;
  END IF;
  RETURN n;
END $$;
CREATE SEQUENCE bench_variants.seq;
CREATE FUNCTION bench_variants.insert_only(channel text, payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE n bigint := nextval('bench_variants.seq');
BEGIN
  INSERT INTO {SCHEMA}.messages (channel, seq, payload) VALUES (insert_only.channel, n, payload);
  RETURN n;
END $$;
CREATE FUNCTION bench_variants.relay_set(channels text[], payloads text[], journaled boolean[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
  PERFORM pg_notify(c, p) FROM unnest(channels, payloads, journaled) WITH ORDINALITY AS t(c, p, j, i)
    WHERE NOT j ORDER BY i;
  WITH items AS (
    SELECT c, p, row_number() OVER (PARTITION BY c ORDER BY i) AS k,
           count(*) OVER (PARTITION BY c) AS cnt
    FROM unnest(channels, payloads, journaled) WITH ORDINALITY AS t(c, p, j, i) WHERE j),
  heads AS (
    INSERT INTO {SCHEMA}.streams AS st (channel, head) SELECT DISTINCT c, cnt FROM items
    ON CONFLICT (channel) DO UPDATE SET head = st.head + excluded.head
    RETURNING st.channel, st.head),
  rows AS (
    INSERT INTO {SCHEMA}.messages (channel, seq, payload)
    SELECT items.c, heads.head - items.cnt + items.k, items.p
    FROM items JOIN heads ON heads.channel = items.c)
  SELECT count(pg_notify('{SCHEMA}.wake', channel)) INTO n FROM heads;
END $$;
"""


def _connect(uri: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(uri, options="-c synchronous_commit=off")
    conn.autocommit = True
    return conn


def _envelope(seq: int) -> str:
    text = make_payload(time.time(), seq, 64)
    claims = f'{{"mode":"w","message_delivered_at":{time.time()!r}}}'
    return f'{{"event":"WebsocketMessage","channel":"{CHANNEL}","payload":"{text}","claims":{claims}}}'


def _loop(uri: str, seconds: float, call: Callable[[Any, int], int], out: list[int],
          conns: list[Any]) -> None:
    """
    One connection running `call(cursor, seq)` (it returns the messages sent) until done; it
    stays open (in `conns`) until PostgreSQL's CPU has been read: an exited backend's time
    reaches the postmaster's figures only once it is reaped.
    """
    conn = _connect(uri)
    conns.append(conn)
    cur = conn.cursor()
    n = 0
    t_end = time.time() + seconds
    while time.time() < t_end:
        n += call(cur, n)
    out.append(n)


def measure(pg: Postgres, label: str, call: Callable[[Any, int], int], seconds: float,
            connections: int = 1) -> dict[str, Any]:
    reset = _connect(pg.uri)
    reset.cursor().execute(f"TRUNCATE {SCHEMA}.messages, {SCHEMA}.streams")
    reset.close()
    out: list[int] = []
    conns: list[Any] = []
    threads = [threading.Thread(target=_loop, args=(pg.uri, seconds, call, out, conns))
               for _ in range(connections)]
    c0, t0 = pg.cpu(), time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu, n = time.time() - t0, pg.cpu() - c0, sum(out)
    for conn in conns:
        conn.close()
    row = {"what": label, "messages_per_s": n / wall, "pg_cpu": cpu / wall,
           "pg_us_per_message": cpu / n * 1e6 if n else None}
    print(f"  {label:66} {row['messages_per_s']:9,.0f}/s  PG {row['pg_cpu']:.2f} cores  "
          f"{row['pg_us_per_message'] or 0:6.1f} us of PG CPU a message", flush=True)
    return row


def per_row(function: str, batch: int) -> Callable[[Any, int], int]:
    sql = f"SELECT {function}(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"

    def call(cur: Any, seq: int) -> int:
        cur.execute(sql, ([CHANNEL] * batch,
                          [make_payload(time.time(), seq + j, 64) for j in range(batch)]))
        return batch

    return call


def many(batch: int) -> Callable[[Any, int], int]:
    def call(cur: Any, seq: int) -> int:
        cur.execute(f"SELECT {SCHEMA}.send(%s, %s::text[])",
                    (CHANNEL, [make_payload(time.time(), seq + j, 64) for j in range(batch)]))
        return batch

    return call


def relay(function: str, batch: int) -> Callable[[Any, int], int]:
    sql = f"SELECT {function}(%s::text[], %s::text[], %s::boolean[])"

    def call(cur: Any, seq: int) -> int:
        cur.execute(sql, ([CHANNEL] * batch, [_envelope(seq + j) for j in range(batch)],
                          [True] * batch))
        return batch

    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.journal_sql", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    ap.add_argument("--batch", type=int, default=100, help="calls per producer statement (100)")
    ap.add_argument("--relay-batch", type=int, default=500,
                    help="messages per relay statement (500, pgws's MAX_BATCH)")
    args = ap.parse_args(argv)
    pg = Postgres()
    pg.start()
    try:
        conn = _connect(pg.uri)
        conn.autocommit = False
        cur = conn.cursor()
        for sql in migration(SCHEMA, 4 * 1024 * 1024):
            cur.execute(sql)
        cur.execute(VARIANTS)
        conn.commit()
        conn.close()
        s, b, rb = args.seconds, args.batch, args.relay_batch
        print(f"one connection, {b} calls per statement (transaction):")
        measure(pg, "pg_notify", per_row("pg_notify", b), s)
        measure(pg, f"{SCHEMA}.send", per_row(f"{SCHEMA}.send", b), s)
        measure(pg, "  its head-row update alone", per_row("bench_variants.head_only", b), s)
        measure(pg, "  its messages insert alone", per_row("bench_variants.insert_only", b), s)
        measure(pg, f"{SCHEMA}.send(channel, payloads[]): one call a statement", many(b), s)
        print(f"client messages, {rb} per statement, one channel:")
        measure(pg, f"{SCHEMA}.relay, 1 connection", relay(f"{SCHEMA}.relay", rb), s)
        measure(pg, f"{SCHEMA}.relay, 10 connections", relay(f"{SCHEMA}.relay", rb), s, 10)
        measure(pg, "set-based relay, 10 connections", relay("bench_variants.relay_set", rb), s,
                10)
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
