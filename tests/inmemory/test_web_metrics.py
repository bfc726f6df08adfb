"""
/metrics in memory: the figures after known traffic (sockets by mode, refusals by status and
reason class, closes by code and side, messages both ways, NOTIFY statements and their latency,
the LISTEN session lost and back), the bearer token, the channel-label switch, the formats, and
no /metrics with metrics = false.
"""

from __future__ import annotations

from memory import EPOCH, MemoryRelay, http_get, status_and_body, token, upgrade_request
from prometheus_client.parser import text_string_to_metric_families

R, W, RW = {"mode": "r"}, {"mode": "w"}, {"mode": "rw"}


def get(relay: MemoryRelay, extra: str = "", method: str = "GET",
        ) -> tuple[int, dict[str, str], bytes]:
    return http_get(relay, "/metrics", extra, method)


def scrape(relay: MemoryRelay, extra: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by (name, sorted labels)."""
    status, headers, body = get(relay, extra=extra)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_figures_after_known_traffic():
    relay = MemoryRelay(audit_channel="audit")
    readers = [relay.open("/chat/" + token(R)) for _ in range(3)]
    writer = relay.open("/chat/" + token(W))
    both = relay.open("/other/" + token(RW))
    for path, want in [("/chat/" + token({"mode": "r", "exp": EPOCH - 1}), 401),
                       ("/chat/not-a-token", 401), ("/chat/" + token({"mode": "x"}), 403),
                       ("/chat/" + token({"mode": "r", "channels": ["x"]}), 403),
                       ("/a/b/c", 400)]:
        assert status_and_body(relay.request(upgrade_request(path)))[0] == want
    assert status_and_body(relay.request(upgrade_request("/", "")))[0] == 401  # no token

    writer.send("one")
    writer.send("two")
    both.send("three")
    writer.send_binary(b'{"refresh": "x"}')
    relay.notify("chat", "from the database")
    relay.notify("nobody", "unread")
    assert [len(r.messages) for r in readers] == [3, 3, 3]

    s = scrape(relay)
    assert value(s, "pgws_websockets_open", mode="r") == 3
    assert value(s, "pgws_websockets_open", mode="w") == 1
    assert value(s, "pgws_websockets_open", mode="rw") == 1
    assert value(s, "pgws_websockets_opened_total", mode="r") == 3
    assert value(s, "pgws_handshakes_refused_total", status="401", reason="expired_token") == 1
    assert value(s, "pgws_handshakes_refused_total", status="401", reason="invalid_token") == 1
    assert value(s, "pgws_handshakes_refused_total", status="401", reason="missing_token") == 1
    assert value(s, "pgws_handshakes_refused_total", status="403", reason="forbidden") == 2
    assert value(s, "pgws_handshakes_refused_total", status="400", reason="bad_request") == 1
    assert value(s, "pgws_client_messages_received_total", kind="text") == 3
    assert value(s, "pgws_client_messages_received_total", kind="control") == 1
    # Each text message is one statement of two notifications (its channel and the audit copy).
    assert value(s, "pgws_notify_messages_total") == 6
    assert value(s, "pgws_notify_duration_seconds_count") == 3
    assert value(s, "pgws_notify_duration_seconds_bucket", le="0.0005") == 3  # memory: no delay
    assert value(s, "pgws_notify_failures_total") == 0
    # chat got "one", "two" and the database's; other got "three"; nobody's went to no reader;
    # audit (not read) got three copies; every NOTIFY reached the LISTEN session only if read.
    assert value(s, "pgws_notifications_received_total") == 4
    frames = 3 * 3 + 1  # three readers of chat, one reader (rw) of other
    assert value(s, "pgws_fanout_frames_total") == frames
    # a text frame here: 2 header bytes and the payload
    sizes = 3 * sum(2 + len(p) for p in ("one", "two", "from the database"))
    assert value(s, "pgws_fanout_bytes_total") > sizes  # envelopes are longer than their text
    assert value(s, "pgws_channels_read") == 2
    assert value(s, "pgws_channels_listened") == 2
    assert value(s, "pgws_listener_up") == 1
    assert value(s, "pgws_fanout_backlog_messages") == 0
    assert value(s, "pgws_outbox_messages") == 0
    assert ("pgws_channel_readers", (("channel", "chat"),)) not in s  # no channel names
    assert "process_open_fds" in {name for name, _ in s}


def test_frame_bytes_are_counted_exactly():
    relay = MemoryRelay()
    readers = [relay.open("/chat/" + token(R)) for _ in range(2)]
    relay.notify("chat", "x" * 200)  # a 200-byte payload: 4 header bytes (16-bit length)
    relay.notify("chat", "y")
    assert [r.messages for r in readers] == [["x" * 200, "y"]] * 2
    s = scrape(relay)
    assert value(s, "pgws_fanout_frames_total") == 4
    assert value(s, "pgws_fanout_bytes_total") == 2 * ((4 + 200) + (2 + 1))


def test_closes_by_code_and_side_and_listener_loss():
    relay = MemoryRelay()
    leaving = relay.open("/chat/" + token(R))
    dropped = relay.open("/chat/" + token(R))
    binary = relay.open("/chat/" + token(RW))
    stays = relay.open("/chat/" + token(R))
    leaving.close()
    dropped.drop()
    binary.send_binary(b"not json")  # 1003 from the server
    relay.db.session.kill()
    relay.flush()
    s = scrape(relay)
    assert value(s, "pgws_websockets_closed_total", code="1000", by="client") == 1
    assert value(s, "pgws_websockets_closed_total", code="1006", by="client") == 1
    assert value(s, "pgws_websockets_closed_total", code="1003", by="server") == 1
    assert value(s, "pgws_websockets_open", mode="r") == 1
    assert value(s, "pgws_listener_losses_total") == 1
    assert value(s, "pgws_listener_reconnects_total") == 1
    assert value(s, "pgws_listener_up") == 1
    assert stays.closed is None


def test_client_close_codes_are_folded_into_a_few_series():
    relay = MemoryRelay()
    for code in (1001, 3000, 3999, 4000, 4001, 4999):
        client = relay.open("/chat/" + token(R))
        # Autobahn's sendClose takes only 1000 and 3000-4999; a browser sends 1001 on leaving.
        client.protocol.sendCloseFrame(code=code, isReply=False)
        relay.flush()
    s = scrape(relay)
    closes = {labels: v for (name, labels), v in s.items()
              if name == "pgws_websockets_closed_total"}
    assert closes == {(("by", "client"), ("code", "1001")): 1,
                      (("by", "client"), ("code", "3xxx")): 2,
                      (("by", "client"), ("code", "4xxx")): 3}


def test_messages_in_flight_and_of_closed_sockets_count_until_sent():
    relay = MemoryRelay()
    writer = relay.open("/chat/" + token(W))
    relay.pool.hold = True
    writer.send("in flight")
    writer.send("queued")
    assert value(scrape(relay), "pgws_outbox_messages") == 2
    writer.close()  # what it sent is still sent
    assert value(scrape(relay), "pgws_outbox_messages") == 2
    relay.pool.release()
    relay.flush()
    assert value(scrape(relay), "pgws_outbox_messages") == 1
    relay.pool.release()
    relay.flush()
    s = scrape(relay)
    assert value(s, "pgws_outbox_messages") == 0
    assert value(s, "pgws_notify_messages_total") == 2


def test_database_away_shows_in_the_listener_and_the_outbox():
    relay = MemoryRelay()
    writer = relay.open("/chat/" + token(W))
    relay.db.up = False
    relay.db.session.kill()
    writer.send("waits")
    writer.send("waits too")
    s = scrape(relay)
    assert value(s, "pgws_listener_up") == 0
    assert value(s, "pgws_notify_failures_total") == 1
    assert value(s, "pgws_outbox_messages") == 2
    relay.db.up = True
    relay.advance(5)
    s = scrape(relay)
    assert value(s, "pgws_outbox_messages") == 0
    assert value(s, "pgws_listener_up") == 1
    assert value(s, "pgws_notify_messages_total") == 2


def test_max_connections_and_shutdown_refusals_have_their_class():
    relay = MemoryRelay(max_connections=1)
    relay.open("/chat/" + token(R))
    assert status_and_body(relay.request(upgrade_request("/chat/" + token(R))))[0] == 503
    s = scrape(relay)
    assert value(s, "pgws_handshakes_refused_total", status="503", reason="max_connections") == 1


def test_channel_labels_only_when_asked():
    relay = MemoryRelay(metrics_channel_labels="true")
    relay.open("/chat/" + token(R))
    relay.open("/chat/" + token(R))
    relay.open("/news/" + token(R))
    s = scrape(relay)
    assert value(s, "pgws_channel_readers", channel="chat") == 2
    assert value(s, "pgws_channel_readers", channel="news") == 1


def test_token_protects_the_metrics():
    relay = MemoryRelay(metrics_token="s3cret-scrape")
    status, headers, body = get(relay)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="pgws metrics"'
    assert body == b"metrics need Authorization: Bearer <metrics-token>\n"
    assert get(relay, extra="Authorization: Bearer wrong\r\n")[0] == 401
    assert get(relay, extra="Authorization: s3cret-scrape\r\n")[0] == 401
    assert get(relay, extra="Authorization: Basic s3cret-scrape\r\n")[0] == 401
    assert get(relay, extra="Authorization: bearer s3cret-scrape\r\n")[0] == 200  # RFC 9110
    assert "pgws_websockets_open" in {n for n, _ in scrape(
        relay, "Authorization: Bearer s3cret-scrape\r\n")}


def test_openmetrics_when_asked_and_head_without_body():
    relay = MemoryRelay()
    status, headers, body = get(relay, extra="Accept: application/openmetrics-text; version=1.0.0\r\n")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, headers, body = get(relay, method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 1000
    assert get(relay, method="POST")[0] == 405


def test_no_metrics_when_off():
    relay = MemoryRelay(metrics="false")
    assert get(relay)[0::2] == (404, b"not found\n")


def test_an_embedding_program_gets_the_registry():
    from prometheus_client.exposition import generate_latest

    relay = MemoryRelay()
    relay.open("/chat/" + token(RW))
    metrics = relay.relay.metrics
    assert metrics is not None
    assert b'pgws_websockets_open{mode="rw"} 1.0' in generate_latest(metrics.registry)
    assert MemoryRelay(metrics="false").relay.metrics is None
