"""
pgws.js, the JavaScript client, in a real headless Chromium against `twistd -n pgws` with the
journal on: a page of another origin imports it from pgws (CORS), and keeps every message,
exactly once and in order, while pgws's LISTEN session is killed and pgws itself is restarted
with messages produced all along (SQL producers, and the page's own sends, queued while it is
disconnected); and the token callback refreshes before exp and renews after 3001. Shorter
tests check the client's decisions against an in-process pgws: what ends it and what it retries,
the gaps it reports, what close() hands back, the URL it opens.

The browser runs in a worker thread (see test_browser); the twistd processes and the database are
driven from that thread through the reactor (C{from_thread}).
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from test_browser import UI_TIMEOUT_MS, PageWatch, from_thread, in_browser
from test_journal import committed_rows, schema_fixture  # noqa: F401  (the fixture "schema")
from test_journal_faults import steady_producer
from test_twistd import Twistd, free_port
from twisted.internet import reactor
from twisted.web import server as web_server

from pgws._config import load_config
from pgws._service import Relay
from pgws._web import make_site
from support import SECRET, Db, Server, application_name, start_server, token, wait

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # twisted.web.static warns on import
    from twisted.web import static

CHANNEL = "jsc"

PAGE = """<!DOCTYPE html><meta charset="utf-8"><title>pgws.js test</title>
<script type="module">
import { connect, VERSION } from "http://127.0.0.1:%(port)d/pgws.js";
window.got = []; window.events = []; window.sent = 0; window.version = VERSION;
const options = %(options)s;
if (options.token === "callback") options.token = (ask) => window.mint(ask.reason);
const conn = connect(options);
conn.on("message", (text, info) => {
  let payload = text;
  try { const o = JSON.parse(text); if (o.event === "WebsocketMessage") payload = o.payload; }
  catch (e) { /* a SQL payload */ }
  window.got.push([info.seq, payload]);
});
for (const name of ["open", "close", "gap", "recovered", "stream", "error", "refresh"]) {
  conn.on(name, (info) => window.events.push([name, JSON.parse(JSON.stringify(info))]));
}
window.conn = conn;
window.startSending = (prefix) => {
  window.sender = setInterval(() => { conn.send(prefix + window.sent); window.sent += 1; }, 15);
};
window.stopSending = () => clearInterval(window.sender);
</script>
"""


def page_site(folder: Path, pgws_port: int, options: dict[str, Any]) -> int:
    """A page on an origin of its own (another port) that imports pgws.js from pgws; its port."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(PAGE % {"port": pgws_port, "options": json.dumps(options)})
    listening = from_thread(lambda: _listen(folder))
    return int(listening.getHost().port)


async def _listen(folder: Path) -> Any:
    return reactor.listenTCP(0, web_server.Site(static.File(str(folder))), interface="127.0.0.1")  # type: ignore[arg-type]


async def serve_on(db_uri: str, port: int) -> Server:
    """An in-process pgws (no journal) on a fixed port: stopped and started again, the page
    reconnects to it (C{start_server} takes a free port each time)."""
    config = load_config(None, {}, {"db-uri": db_uri, "jwt-secret": SECRET, "server-port": port,
                                    "application-name": application_name()})
    relay = Relay(config, reactor=reactor)
    relay.startService()
    await wait(relay.whenReady())
    listening = reactor.listenTCP(port, make_site(relay.resource()), interface="127.0.0.1")  # type: ignore[arg-type]
    return Server(relay, port, listening, config.application_name)


def open_page(browser: Any, folder: Path, pgws_port: int, options: dict[str, Any],
              mint: Any = None) -> tuple[Any, PageWatch]:
    """A page with the client connecting with C{options}; C{mint(reason)} is its token callback."""
    page = browser.new_page()
    watch = PageWatch(page)
    page.set_default_timeout(UI_TIMEOUT_MS)
    if mint is not None:
        page.expose_function("mint", mint)
    page.goto(f"http://127.0.0.1:{page_site(folder, pgws_port, options)}/")
    page.wait_for_function("window.conn !== undefined")
    return page, watch


def start_twistd(folder: Path, db_uri: str, schema: str, port: int) -> Twistd:
    """`twistd -n pgws` on C{port} (fixed: the page reconnects to it), journal on, no server-root."""
    async def start() -> Twistd:
        t = Twistd(folder, "--db-uri", db_uri, "--port", str(port), "--server-host", "127.0.0.1",
                   "--journal", "true", "--journal-schema", schema, env={"PGWS_JWT_SECRET": SECRET})
        await t.ready()
        return t
    return from_thread(start)


def events(page: Any, name: str) -> list[dict[str, Any]]:
    return [info for kind, info in page.evaluate("window.events") if kind == name]


def wait_for(page: Any, expression: str, timeout: int = UI_TIMEOUT_MS) -> None:
    page.wait_for_function(expression, timeout=timeout)


def expected(rows: list[tuple[int, str]]) -> list[list[Any]]:
    """The committed rows as the page should have them: a client message's text, else the payload."""
    out = []
    for seq, payload in rows:
        try:
            envelope = json.loads(payload)
        except ValueError:
            envelope = None
        if isinstance(envelope, dict) and envelope.get("event") == "WebsocketMessage":
            payload = envelope["payload"]
        out.append([seq, payload])
    return out


async def browse(pgws: Server, session: Callable[[Any], None]) -> None:
    """Run C{session} in Chromium, then stop C{pgws} whatever happened."""
    try:
        await in_browser(session)
    finally:
        await pgws.stop()


@pytest_twisted.ensureDeferred
async def test_every_message_once_in_order_across_a_listen_kill_and_a_pgws_restart(
        db_uri, schema, tmp_path):
    port = free_port()
    pgws_processes: list[Twistd] = []

    def session(browser: Any) -> None:
        first = start_twistd(tmp_path / "first", db_uri, schema, port)
        pgws_processes.append(first)
        page_port = page_site(tmp_path / "page", port,
                              {"channel": CHANNEL, "token": token({"mode": "rw"}), "minDelay": 200})
        page = browser.new_page()
        watch = PageWatch(page)
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{page_port}/")
        wait_for(page, "window.events.some(e => e[0] === 'stream')")
        assert events(page, "open")[0]["protocol"] == "pgws"
        db = Db(db_uri)
        stop = threading.Event()
        producer = steady_producer(db_uri, schema, CHANNEL, stop, pause=0.01)
        try:
            producer.start()
            page.evaluate("window.startSending('p')")
            wait_for(page, "window.got.length >= 40")

            # The LISTEN session killed: the socket stays open, the journal reads what it missed.
            listener = f"{first.application_name} listener"
            pids = [pid for (_, pid) in db.execute(
                "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity "
                "WHERE application_name = %s", (listener,))]
            assert len(pids) == 1
            deadline = time.monotonic() + 30
            while not db.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                                 "AND pid <> %s", (listener, pids[0])):
                assert time.monotonic() < deadline, "the LISTEN session never came back"
                time.sleep(0.05)
            count = page.evaluate("window.got.length")
            wait_for(page, f"window.got.length >= {count + 40}")

            # pgws restarted (SIGTERM, then a new process on the same port). The page's sends
            # stop first: a text sent while pgws is already closing the socket is not relayed,
            # and the protocol has no acknowledgement to tell (README). They start again once
            # the page knows it is disconnected, so they wait in its queue.
            page.evaluate("window.stopSending()")
            first.proc.send_signal(15)
            wait_for(page, "window.events.some(e => e[0] === 'close' && e[1].code === 1001)")
            page.evaluate("window.startSending('q')")
            assert from_thread(lambda: first.terminate(signal_it=False)) == 0
            assert page.evaluate("window.conn.state") != "open"
            second = start_twistd(tmp_path / "second", db_uri, schema, port)
            pgws_processes.append(second)
            wait_for(page, "window.events.some(e => e[0] === 'recovered')", timeout=60_000)
            count = page.evaluate("window.got.length")
            wait_for(page, f"window.got.length >= {count + 40}")
        finally:
            page.evaluate("window.stopSending()")
            stop.set()
            producer.join(10)
        assert producer.errors == []
        sent = page.evaluate("window.sent")
        try:
            deadline = time.monotonic() + 30
            while True:
                rows = committed_rows(db, schema, CHANNEL)
                texts = [p for _, p in expected(rows) if p[0] in "pq"]
                if len(texts) == sent and page.evaluate("window.got.length") >= len(rows):
                    break
                assert time.monotonic() < deadline, (len(texts), sent, len(rows))
                time.sleep(0.1)
        finally:
            db.close()
        got = page.evaluate("window.got")
        print(f"\n{len(rows)} committed ({sent} sent by the page), {len(got)} received")
        assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
        assert got == expected(rows)  # every message, once, in order
        page_texts = [p for _, p in got if p[0] in "pq"]
        # Each of the page's sends once (p<i> while connected, q<i> queued while disconnected).
        assert sorted(int(text[1:]) for text in page_texts) == list(range(sent))
        assert any(text[0] == "q" for text in page_texts)
        assert events(page, "gap") == []
        assert [(e["recovered"], e["channel"]) for e in events(page, "recovered")] == [(True, CHANNEL)]
        assert any(c["code"] == 1001 and c["reconnect"] for c in events(page, "close"))
        assert page.evaluate("window.conn.state") == "open"
        watch.check()

    try:
        await in_browser(session)
    finally:
        for process in pgws_processes:
            if process.proc.poll() is None:
                await process.terminate()


@pytest_twisted.ensureDeferred
async def test_token_callback_refreshes_before_exp_and_renews_after_3001(db_uri, schema, tmp_path):
    port = free_port()
    pgws_processes: list[Twistd] = []
    asked: list[str] = []

    def mint(reason: str) -> str:
        asked.append(reason)
        now = int(time.time())
        if reason == "connect":
            return token({"mode": "rw", "exp": now + 4})
        if reason == "refresh" and asked.count("refresh") == 1:
            return token({"mode": "rw", "exp": now + 6})  # granted: the socket lives on
        if reason == "refresh":
            return token({"mode": "rw", "channel": "elsewhere", "exp": now + 60})  # refused
        return token({"mode": "rw", "exp": now + 3600})  # after 3001: a fresh, long one

    def session(browser: Any) -> None:
        pgws_processes.append(start_twistd(tmp_path / "pgws", db_uri, schema, port))
        page_port = page_site(tmp_path / "page", port, {"channel": CHANNEL, "token": "callback",
                                                         "refreshMargin": 2})
        page = browser.new_page()
        watch = PageWatch(page)
        page.expose_function("mint", mint)
        page.goto(f"http://127.0.0.1:{page_port}/")
        wait_for(page, "window.events.some(e => e[0] === 'stream')")
        db = Db(db_uri)
        try:
            db.execute(f"SELECT {schema}.send(%s, 'before')", (CHANNEL,))
            wait_for(page, "window.events.some(e => e[0] === 'refresh')")
            wait_for(page, "window.events.some(e => e[0] === 'error' && e[1].kind === 'refresh')",
                     timeout=20_000)
            wait_for(page, "window.events.some(e => e[0] === 'close' && e[1].code === 3001)",
                     timeout=20_000)
            wait_for(page, "window.events.some(e => e[0] === 'recovered')")
            db.execute(f"SELECT {schema}.send(%s, 'after')", (CHANNEL,))
            wait_for(page, "window.got.length >= 2")
        finally:
            db.close()
        assert page.evaluate("window.got") == [[1, "before"], [2, "after"]]
        assert asked == ["connect", "refresh", "refresh", "expired"]
        closes = events(page, "close")
        assert [(c["code"], c["reconnect"], c["delay"]) for c in closes] == [(3001, True, 0)]
        assert events(page, "recovered")[0]["recovered"] is True
        assert [e["kind"] for e in events(page, "error")] == ["refresh"]
        watch.check()

    try:
        await in_browser(session)
    finally:
        for process in pgws_processes:
            if process.proc.poll() is None:
                await process.terminate()


@pytest_twisted.ensureDeferred
async def test_sends_while_disconnected_are_queued_bounded_and_handed_back(db_uri, tmp_path):
    pgws = await start_server(db_uri)  # no server-root: it serves /pgws.js all the same
    nobody = free_port()  # nothing listens there: every opening handshake fails

    def session(browser: Any) -> None:
        options = {"url": f"ws://127.0.0.1:{nobody}", "channel": CHANNEL,
                   "token": token({"mode": "rw"}), "minDelay": 1000, "maxFailedOpens": 3,
                   "maxQueue": 2}
        page_port = page_site(tmp_path / "page", pgws.port, options)
        page = browser.new_page()
        watch = PageWatch(page)
        page.goto(f"http://127.0.0.1:{page_port}/")
        page.wait_for_function("window.conn !== undefined")
        result = page.evaluate("""() => {
            const queued = [window.conn.send("a"), window.conn.send("b")];
            let refused = null;
            try { window.conn.send("c"); } catch (e) { refused = e.name + ": " + e.message; }
            return { queued, refused, count: window.conn.queued };
        }""")
        assert result == {"queued": [False, False], "count": 2,
                          "refused": "PgwsError: pgws: 2 messages already wait for the connection "
                                     "(maxQueue); not queued"}
        # It gives up after 3 failed handshakes and hands the queue back with its last close.
        wait_for(page, "window.conn.state === 'closed'")
        closes = events(page, "close")
        assert [c["reconnect"] for c in closes] == [True, True, False]
        assert closes[-1]["unsent"] == ["a", "b"]
        assert closes[-1]["why"] == "3 opening handshakes in a row failed"
        assert page.evaluate("""() => { try { window.conn.send("d"); return "sent"; }
                                        catch (e) { return e.message; } }""") == (
            "pgws: the connection is closed; not sent")
        watch.check()

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_close_hands_back_what_was_queued(db_uri, tmp_path):
    pgws = await start_server(db_uri)

    def session(browser: Any) -> None:
        options = {"url": f"ws://127.0.0.1:{free_port()}", "token": token({"mode": "rw"}),
                   "minDelay": 60_000}
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{page_site(tmp_path / 'page', pgws.port, options)}/")
        wait_for(page, "window.conn.state === 'waiting'")
        assert page.evaluate("window.conn.send('x')") is False
        assert page.evaluate("window.conn.close()") == ["x"]
        assert page.evaluate("window.conn.state") == "closed"
        assert events(page, "close")[-1]["reconnect"] is False

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_close_before_the_socket_closed_refuses_sends_and_its_queue_is_the_last_events(
        db_uri, tmp_path):
    pgws = await start_server(db_uri)

    def session(browser: Any) -> None:
        # Waiting to reconnect (nothing listens there): close() ends at once.
        options = {"url": f"ws://127.0.0.1:{free_port()}", "token": token({"mode": "rw"}),
                   "minDelay": 60_000}
        page, watch = open_page(browser, tmp_path / "waiting", pgws.port, options)
        wait_for(page, "window.conn.state === 'waiting'")
        assert page.evaluate("[window.conn.send('x'), window.conn.send('y')]") == [False, False]
        assert page.evaluate("window.conn.close()") == ["x", "y"]
        last = events(page, "close")[-1]
        assert (last["reconnect"], last["unsent"], last["why"]) == (
            False, ["x", "y"], "closed by the application")
        # An open socket: close() starts the closing handshake; a send meanwhile is refused.
        options = {"channel": CHANNEL, "token": token({"mode": "rw"})}
        page, watch = open_page(browser, tmp_path / "open", pgws.port, options)
        wait_for(page, "window.conn.state === 'open'")
        result = page.evaluate("""() => {
            const unsent = window.conn.close();
            let sent;
            try { sent = window.conn.send("z"); } catch (e) { sent = e.message; }
            return { unsent, sent, state: window.conn.state };
        }""")
        assert result == {"unsent": [], "sent": "pgws: the connection is closing; not sent",
                          "state": "open"}
        wait_for(page, "window.conn.state === 'closed'")
        last = events(page, "close")[-1]
        assert (last["reconnect"], last["unsent"], last["code"]) == (False, [], 1000)
        watch.check()

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_token_callback_that_throws_is_a_failed_attempt_retried_with_back_off(
        db_uri, tmp_path):
    pgws = await start_server(db_uri)
    asked: list[str] = []

    def failing_twice(reason: str) -> str:  # e.g. the app's token endpoint is down for a while
        asked.append(reason)
        if len(asked) <= 2:
            raise RuntimeError("token endpoint unreachable")
        return token({"mode": "rw"})

    def session(browser: Any) -> None:
        options = {"channel": CHANNEL, "token": "callback", "minDelay": 50}
        page, watch = open_page(browser, tmp_path / "recovers", pgws.port, options, failing_twice)
        wait_for(page, "window.conn.state === 'open'")
        assert asked == ["connect"] * 3
        closes = events(page, "close")
        assert [(c["reconnect"], c["opened"]) for c in closes] == [(True, False)] * 2
        assert [e["kind"] for e in events(page, "error")] == ["token", "token"]
        assert "token endpoint unreachable" in events(page, "error")[0]["message"]
        watch.check()

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_token_callback_failing_in_an_outage_counts_toward_max_failed_opens(
        db_uri, tmp_path):
    pgws = await start_server(db_uri)
    nobody = free_port()
    asked: list[str] = []

    def mint(reason: str) -> str:
        asked.append(reason)
        if reason == "connect":
            return token({"mode": "rw"})
        raise RuntimeError("token endpoint unreachable")

    def session(browser: Any) -> None:
        # The server is down (handshakes fail) and so is the token endpoint (the callback,
        # asked after two failed handshakes, fails): four attempts in all, then the end.
        options = {"url": f"ws://127.0.0.1:{nobody}", "channel": CHANNEL, "token": "callback",
                   "minDelay": 50, "maxFailedOpens": 4}
        page, watch = open_page(browser, tmp_path / "page", pgws.port, options, mint)
        wait_for(page, "window.conn.state === 'closed'")
        assert asked == ["connect", "failed-opens", "failed-opens"]
        closes = events(page, "close")
        assert [c["reconnect"] for c in closes] == [True, True, True, False]
        assert closes[-1]["why"] == ("4 attempts in a row failed (2 opening handshakes, "
                                     "2 token callback calls)")
        errors = events(page, "error")
        assert [e["kind"] for e in errors] == ["token", "token", "connect"]
        assert errors[-1]["message"].startswith("giving up: 4 attempts in a row failed")
        watch.check()

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_token_callback_that_returns_no_jwt_ends_the_client_at_once(db_uri, tmp_path):
    pgws = await start_server(db_uri)
    asked: list[str] = []

    def mint(reason: str) -> str:
        asked.append(reason)
        return ""

    def session(browser: Any) -> None:
        options = {"channel": CHANNEL, "token": "callback", "minDelay": 50}
        page, watch = open_page(browser, tmp_path / "page", pgws.port, options, mint)
        wait_for(page, "window.conn.state === 'closed'")
        assert asked == ["connect"]
        closes = events(page, "close")
        assert [(c["reconnect"], c["why"]) for c in closes] == [
            (False, "the token callback gave no JWT")]
        errors = events(page, "error")
        assert [e["kind"] for e in errors] == ["token"]
        assert "must return a non-empty string" in errors[0]["message"]
        watch.check()

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_fixed_token_already_expired_fails_at_once(db_uri, tmp_path):
    pgws = await start_server(db_uri)
    opened: list[str] = []

    def session(browser: Any) -> None:
        options = {"channel": CHANNEL, "token": token({"mode": "rw", "exp": int(time.time()) - 5}),
                   "minDelay": 50}
        page = browser.new_page()
        page.on("websocket", lambda ws: opened.append(ws.url))
        page.goto(f"http://127.0.0.1:{page_site(tmp_path / 'page', pgws.port, options)}/")
        wait_for(page, "window.conn !== undefined && window.conn.state === 'closed'")
        assert opened == []  # no handshake pgws would refuse (401) again and again
        closes = events(page, "close")
        assert [(c["reconnect"], c["why"]) for c in closes] == [
            (False, "the token expired and no callback renews it")]
        errors = events(page, "error")
        assert [e["kind"] for e in errors] == ["token"]
        assert "expired" in errors[0]["message"]

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_handshake_refused_to_the_end_is_an_error_event(db_uri, tmp_path):
    pgws = await start_server(db_uri)

    def session(browser: Any) -> None:
        # pgws refuses (403) a channel the token does not allow, at every attempt.
        options = {"channel": CHANNEL, "token": token({"mode": "rw", "channels": ["elsewhere"]}),
                   "minDelay": 50, "maxFailedOpens": 2}
        page, _ = open_page(browser, tmp_path / "page", pgws.port, options)
        wait_for(page, "window.conn.state === 'closed'")
        closes = events(page, "close")
        assert [c["reconnect"] for c in closes] == [True, False]
        assert closes[-1]["why"] == "2 opening handshakes in a row failed"
        errors = events(page, "error")
        assert [e["kind"] for e in errors] == ["connect"]
        assert errors[0]["message"].startswith("giving up: 2 opening handshakes in a row failed")

    await browse(pgws, session)


@pytest_twisted.ensureDeferred
async def test_a_reconnect_is_a_gap_for_plain_channels(db_uri, tmp_path):
    port = free_port()
    pgws = await serve_on(db_uri, port)
    servers = [pgws]

    def session(browser: Any) -> None:
        options = {"channel": CHANNEL, "token": token({"mode": "rw"}), "minDelay": 50}
        page, watch = open_page(browser, tmp_path / "page", port, options)
        wait_for(page, "window.conn.state === 'open'")
        from_thread(servers.pop().stop)  # pgws stops (1001) and starts again
        wait_for(page, "window.events.some(e => e[0] === 'close' && e[1].code === 1001)")
        assert events(page, "gap") == []
        servers.append(from_thread(lambda: serve_on(db_uri, port)))
        wait_for(page, "window.events.filter(e => e[0] === 'open').length === 2")
        assert events(page, "gap") == [{"source": "disconnected", "channels": [CHANNEL]}]
        kinds = [kind for kind, _ in page.evaluate("window.events") if kind in ("open", "gap")]
        assert kinds == ["open", "open", "gap"]
        watch.check()

    try:
        await in_browser(session)
    finally:
        for s in servers:
            await s.stop()


@pytest_twisted.ensureDeferred
async def test_the_url_options_query_is_kept(db_uri, tmp_path):
    pgws = await start_server(db_uri)
    opened: list[str] = []

    def session(browser: Any) -> None:
        options = {"url": f"ws://127.0.0.1:{pgws.port}/?app=1&x=a%20b", "channel": CHANNEL,
                   "token": token({"mode": "rw"}), "history": 3}
        page = browser.new_page()
        watch = PageWatch(page)
        page.on("websocket", lambda ws: opened.append(ws.url))
        page.goto(f"http://127.0.0.1:{page_site(tmp_path / 'page', pgws.port, options)}/")
        wait_for(page, "window.conn !== undefined && window.conn.state === 'open'")
        assert opened == [f"ws://127.0.0.1:{pgws.port}/{CHANNEL}?app=1&x=a%20b&history=3"]
        watch.check()

    await browse(pgws, session)
