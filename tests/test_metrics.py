"""
/metrics end to end: a real PostgreSQL, real sockets, real traffic both ways, the LISTEN session
terminated by PostgreSQL and made again, then a scrape over HTTP whose numbers are checked
exactly (parsed with prometheus_client's own parser).
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from test_journal import (
    drop_schema,
    journal_server,
    new_schema,
    open_reader,
    send,
    until_seq,
)

from support import (
    Db,
    Server,
    handshake,
    http_request,
    start_server,
    token,
    until,
    ws_connect,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: Server, extra: str = "") -> Samples:
    answer = await http_request(server.port, (
        f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n").encode())
    assert answer.status == 200, answer.text
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest_twisted.ensureDeferred
async def test_scrape_after_real_traffic(db_uri, db: Db):
    server = await start_server(db_uri, audit_channel="audit", metrics_token="scrape-me")
    try:
        readers = [await ws_connect(server.port, "/chat/" + token({"mode": "r"}))
                   for _ in range(3)]
        writer = await ws_connect(server.port, "/chat/" + token({"mode": "w"}))
        both = await ws_connect(server.port, "/side/" + token({"mode": "rw"}))
        refused = [await handshake(server.port, path) for path in (
            "/chat/" + token({"mode": "r", "exp": int(time.time()) - 60}),
            "/chat/" + token({"mode": "r"}, secret="another-secret-another-secret-00"),
            "/chat/" + token({"mode": "r", "channels": ["elsewhere"]}),
            "/chat/")]
        assert [r.status for r in refused] == [401, 401, 403, 401]

        for i in range(20):
            writer.send(f"w{i}")
        both.send("to side")
        for i in range(5):
            db.notify("chat", f"db{i}")
        for reader in readers:
            got = [await reader.next() for _ in range(25)]
            assert [p for p in got if p.startswith("db")] == [f"db{i}" for i in range(5)]
            assert sum(1 for p in got if p.startswith('{"event":"WebsocketMessage"')) == 20
        assert (await both.next()).startswith('{"event":"WebsocketMessage"')

        # PostgreSQL ends the LISTEN session; pgws makes it again.
        assert server.terminate_listener(db) == 1
        await until(lambda: server.relay.listener.sessions == 2, "the LISTEN session is back")
        readers[0].close()
        await until(lambda: len(server.relay.factory.sockets) == 4, "the reader closed")

        s = await scrape(server, "Authorization: Bearer scrape-me\r\n")
        assert value(s, "pgws_websockets_open", mode="r") == 2
        assert value(s, "pgws_websockets_open", mode="w") == 1
        assert value(s, "pgws_websockets_open", mode="rw") == 1
        assert value(s, "pgws_websockets_opened_total", mode="r") == 3
        assert value(s, "pgws_handshakes_refused_total", status="401",
                     reason="expired_token") == 1
        assert value(s, "pgws_handshakes_refused_total", status="401",
                     reason="invalid_token") == 1
        assert value(s, "pgws_handshakes_refused_total", status="401",
                     reason="missing_token") == 1
        assert value(s, "pgws_handshakes_refused_total", status="403", reason="forbidden") == 1
        assert value(s, "pgws_websockets_closed_total", code="1000", by="client") == 1
        assert value(s, "pgws_client_messages_received_total", kind="text") == 21
        # 21 messages, each with its audit copy, in one statement or more (batched).
        assert value(s, "pgws_notify_messages_total") == 42
        batches = value(s, "pgws_notify_duration_seconds_count")
        assert 2 <= batches <= 21
        assert value(s, "pgws_notify_duration_seconds_bucket", le="+Inf") == batches
        assert 0 < value(s, "pgws_notify_duration_seconds_sum") < 21 * 5
        assert value(s, "pgws_notify_failures_total") == 0
        # On chat: 20 envelopes and 5 plain; on side: 1 envelope (audit is not read here).
        assert value(s, "pgws_notifications_received_total") == 26
        assert value(s, "pgws_fanout_frames_total") == 3 * 25 + 1
        assert value(s, "pgws_channels_read") == 2
        assert value(s, "pgws_channels_listened") == 2
        assert value(s, "pgws_listener_up") == 1
        assert value(s, "pgws_listener_losses_total") == 1
        assert value(s, "pgws_listener_reconnects_total") == 1
        assert value(s, "pgws_fanout_backlog_messages") == 0
        assert value(s, "process_resident_memory_bytes") > 10_000_000
        assert not any(name.startswith("pgws_journal") for name, _ in s)

        unauthorized = await http_request(server.port, (
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
        assert unauthorized.status == 401
        assert unauthorized.headers["www-authenticate"] == 'Bearer realm="pgws metrics"'
    finally:
        await server.stop()


async def lag_after_refresh(server: Server) -> Samples:
    """A scrape after the next of pgws's own reads of the lag (every 5 s; a scrape reads none)."""
    metrics = server.relay.metrics
    assert metrics is not None and metrics._refresher is not None
    metrics.collector.journal_lag = None
    await until(lambda: metrics.collector.journal_lag is not None, "the lag read again",
                timeout=15)
    return await scrape(server)


@pytest_twisted.ensureDeferred
async def test_journal_lag_and_reads(db_uri, db: Db):
    schema = new_schema()
    server: Any = None
    try:
        server = await journal_server(db_uri, schema, journal_channels="j*",
                                      metrics_channel_labels="true")
        reader = await ws_connect(server.port, "/jobs/" + token({"mode": "r"}))
        for i in range(7):
            send(db, schema, "jobs", f"m{i}")
        assert [await reader.next() for _ in range(7)] == [f"m{i}" for i in range(7)]
        s = await lag_after_refresh(server)
        assert value(s, "pgws_journal_messages_read_total") == 7
        assert value(s, "pgws_journal_lag_messages", channel="jobs") == 0
        assert value(s, "pgws_journal_messages_replayed_total") == 0
        late = await open_reader(server.port, "jobs", history=3)
        await until_seq(late, "jobs", 7)
        s = await scrape(server)
        assert value(s, "pgws_journal_messages_replayed_total") == 3
        assert value(s, "pgws_fanout_frames_total") == 7  # replays are not the fan-out's
        # The head moves on without a wake-up: three messages the journal has not read.
        db.execute(f"UPDATE {schema}.streams SET head = head + 3 WHERE channel = 'jobs'")
        s = await lag_after_refresh(server)
        assert value(s, "pgws_journal_lag_messages", channel="jobs") == 3
        assert value(s, "pgws_channel_readers", channel="jobs") == 2
    finally:
        if server is not None:
            await server.stop()
        drop_schema(db_uri, schema)
