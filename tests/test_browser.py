"""
The example page (client-example/, built on pgws.js) in a real headless Chromium, served by pgws
itself: two pages chat through PostgreSQL (no token in any WebSocket URL), the audit pane shows
the copy, a NOTIFY from the database appears as raw text, and (with the journal on) the
journaled-channel pane resumes after a disconnect with what was sent meanwhile.

The server runs on the Twisted reactor of the test process, so the browser (Playwright's sync
API) runs in a worker thread (``deferToThread``); the thread calls back into the reactor only
through ``blockingCallFromThread``. Every wait is bounded.

Chromium is Debian's /usr/bin/chromium (Playwright cannot download its own build here). The
project's test set-up installs it, so a missing browser fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.interfaces import IReactorFromThreads

from support import Db, start_server, wait

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLIENT_EXAMPLE = Path(__file__).resolve().parent.parent / "client-example"
UI_TIMEOUT_MS = 15_000  # every Playwright wait and action
SESSION_TIMEOUT = 90.0  # the whole browser session, launch to close
OPEN = re.compile(r"\bopen\b")  # app.js: the status says "open" exactly when the socket is open


@pytest_twisted.async_yield_fixture
async def server(db_uri):
    assert (CLIENT_EXAMPLE / "index.html").is_file(), f"no example page in {CLIENT_EXAMPLE}"
    s = await start_server(db_uri, server_root=str(CLIENT_EXAMPLE), audit_channel="audit")
    yield s
    await s.stop()


@pytest.fixture
def journal_schema(db_uri):
    """A journal schema of the test's own, dropped afterwards."""
    schema = f"pgws_browser_{uuid.uuid4().hex[:12]}"
    yield schema
    db = Db(db_uri)
    try:
        db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        db.close()


@pytest_twisted.async_yield_fixture
async def journal_server(db_uri, journal_schema):
    s = await start_server(db_uri, server_root=str(CLIENT_EXAMPLE), audit_channel="audit",
                           journal="true", journal_schema=journal_schema)
    yield s
    await s.stop()


def _require_chromium() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser tests need Debian's chromium package "
            "(apt-get install chromium), which the project's test set-up is meant to install",
            pytrace=False,
        )


async def in_browser(session: Callable[[Any], None]) -> None:
    """Run C{session(browser)} in a worker thread with a fresh headless Chromium."""
    _require_chromium()

    def run() -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=UI_TIMEOUT_MS
            )
            try:
                session(browser)
            finally:
                browser.close()

    await wait(threads.deferToThread(run), SESSION_TIMEOUT)


def from_thread(coro_fn: Callable[[], Any]) -> Any:
    """In the browser thread: run an async function on the reactor and wait for its result."""
    return threads.blockingCallFromThread(IReactorFromThreads(reactor),
                                          lambda: defer.ensureDeferred(coro_fn()))


def wait_listening(server, *channels: str) -> None:
    """In the browser thread: wait (bounded) until pgws's LISTEN session has all C{channels}."""
    deadline = time.monotonic() + 10
    while True:
        listening = from_thread(server.listening_channels)
        if set(channels) <= set(listening):
            return
        assert time.monotonic() < deadline, f"pgws LISTENs to {listening}, not all of {channels}"
        time.sleep(0.05)


class PageWatch:
    """Collects what should never happen on the page: script errors and failed HTTP requests."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"script error: {exc}"))
        page.on("response", self._response)
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status} for {response.url}")

    def check(self) -> None:
        assert self.errors == []


def open_chat(page: Any, port: int, channel: str, token_choice: str = "rw") -> PageWatch:
    """Load the example page, connect the chat pane to C{channel}, wait until both panes are open."""
    from playwright.sync_api import expect

    watch = PageWatch(page)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(f"http://127.0.0.1:{port}/")
    page.fill("#channel", channel)
    page.select_option("#token-choice", token_choice)
    assert not OPEN.search(page.text_content("#status") or "")
    page.click("#connect")
    expect(page.locator("#status")).to_have_text(OPEN, timeout=UI_TIMEOUT_MS)
    expect(page.locator("#audit-status")).to_have_text(OPEN, timeout=UI_TIMEOUT_MS)
    return watch


def entries(page: Any, list_id: str, text: str) -> Any:
    """The <li> items of list C{list_id} whose payload is exactly C{text}."""
    return page.locator(f"#{list_id} li").filter(
        has=page.locator(".payload", has_text=re.compile("^" + re.escape(text) + "$"))
    )


@pytest_twisted.ensureDeferred
async def test_two_pages_chat_and_audit_pane_shows_the_copy(server):
    channel = "chat-browser"
    text = "hello from page A: ünïcødé ✓ <b>not bold</b>"

    def session(browser: Any) -> None:
        from playwright.sync_api import expect

        # Two contexts (like two users' windows), so that neither page is a hidden background
        # tab, which Chromium throttles (a second tab in one context made this test ~2 s slower).
        context_a, context_b = browser.new_context(), browser.new_context()
        a, b = context_a.new_page(), context_b.new_page()
        socket_urls: list[str] = []  # the page uses pgws.js: no token in any WebSocket URL
        a.on("websocket", lambda ws: socket_urls.append(ws.url))
        watch_a = open_chat(a, server.port, channel)
        watch_b = open_chat(b, server.port, channel)
        # The pages' sockets are open; pgws's LISTENs follow asynchronously.
        wait_listening(server, channel, "audit")

        a.fill("#message", text)
        a.click("#send")

        for page in (b, a):  # page B gets it; page A (rw) gets its own echo
            got = entries(page, "messages", text)
            expect(got).to_have_count(1, timeout=UI_TIMEOUT_MS)
            expect(got).to_have_class(re.compile(r"\benvelope\b"))
            expect(got.locator(".tag.channel")).to_have_text(f"#{channel}")
            expect(got.locator(".tag.mode")).to_have_text("mode rw")
            # Each page's audit pane (read-only socket on "audit") shows the copy.
            copy = entries(page, "audit-messages", text)
            expect(copy).to_have_count(1, timeout=UI_TIMEOUT_MS)
            expect(copy.locator(".tag.channel")).to_have_text(f"#{channel}")
        # Put in with textContent: the markup in the payload stayed text.
        assert b.locator("#messages b").count() == 0
        for page in (a, b):
            expect(page.locator("#messages li")).to_have_count(1)
            expect(page.locator("#audit-messages li")).to_have_count(1)
        watch_a.check()
        watch_b.check()
        assert sorted(socket_urls) == sorted([f"ws://127.0.0.1:{server.port}/audit",
                                              f"ws://127.0.0.1:{server.port}/{channel}"])
        context_a.close()
        context_b.close()

    await in_browser(session)


@pytest_twisted.ensureDeferred
async def test_database_notify_shows_as_raw_text(server, db_uri):
    channel = "notify-browser"
    text = 'from psql: not JSON, "quoted" ✓ {'

    def session(browser: Any) -> None:
        from playwright.sync_api import expect

        page = browser.new_page()
        watch = open_chat(page, server.port, channel, token_choice="r")
        wait_listening(server, channel)

        db = Db(db_uri)
        try:
            db.notify(channel, text)
        finally:
            db.close()

        got = entries(page, "messages", text)
        expect(got).to_have_count(1, timeout=UI_TIMEOUT_MS)
        expect(got).to_have_class(re.compile(r"\braw\b"))
        expect(got.locator(".tag.rawtag")).to_have_text("raw")
        watch.check()
        page.close()

    await in_browser(session)


@pytest_twisted.ensureDeferred
async def test_journal_pane_resumes_with_what_was_sent_while_away(journal_server, journal_schema,
                                                                   db_uri):
    server, schema = journal_server, journal_schema
    channel = "journal-browser"
    first = "before going away"
    from_chat = ["while away 1: from the chat pane", "while away 2: ünïcødé ✓ <b>x</b>"]
    from_sql = ["while away 3: from SQL", 'while away 4: "not JSON" {']
    live = "after coming back"

    def session(browser: Any) -> None:
        from playwright.sync_api import expect

        context_a, context_b = browser.new_context(), browser.new_context()
        a, b = context_a.new_page(), context_b.new_page()
        watch_a = PageWatch(a)
        a.set_default_timeout(UI_TIMEOUT_MS)
        a.goto(f"http://127.0.0.1:{server.port}/")
        expect(a.locator("#audit-status")).to_have_text(OPEN, timeout=UI_TIMEOUT_MS)
        a.fill("#journal-channel", channel)
        expect(a.locator("#journal-connect")).to_have_text("Connect")
        a.click("#journal-connect")
        expect(a.locator("#journal-status")).to_have_text(OPEN, timeout=UI_TIMEOUT_MS)
        expect(a.locator("#journal-status")).to_contain_text("subprotocol pgws")
        expect(a.locator("#journal-stream")).to_contain_text("Fresh start", timeout=UI_TIMEOUT_MS)
        expect(a.locator("#journal-connect")).to_have_text("Disconnect")

        # A live journaled message: the pane's own (rw) message comes back with its seq.
        a.fill("#journal-message", first)
        a.click("#journal-send")
        got = entries(a, "journal-messages", first)
        expect(got).to_have_count(1, timeout=UI_TIMEOUT_MS)
        expect(got.locator(".tag.seq")).to_have_text("seq 1", timeout=UI_TIMEOUT_MS)

        a.click("#journal-connect")  # disconnect
        closed = re.compile(r"^closed")
        expect(a.locator("#journal-status")).to_have_text(closed, timeout=UI_TIMEOUT_MS)
        expect(a.locator("#journal-connect")).to_have_text("Reconnect")
        expect(a.locator("#journal-position")).to_contain_text("seq 1 ")

        # Meanwhile: two messages from the other page's chat pane, two from SQL.  Each is waited
        # for on page B (a plain reader of the channel), so their order is known and all of
        # them are in the journal before page A comes back.
        watch_b = open_chat(b, server.port, channel)
        for text in from_chat:
            b.fill("#message", text)
            b.click("#send")
            expect(entries(b, "messages", text)).to_have_count(1, timeout=UI_TIMEOUT_MS)
        db = Db(db_uri)
        try:
            for text in from_sql:
                db.execute(f"SELECT {schema}.send(%s, %s)", (channel, text))
            for text in from_sql:
                expect(entries(b, "messages", text)).to_have_count(1, timeout=UI_TIMEOUT_MS)

            a.click("#journal-connect")  # reconnect: resumes after seq 1
            expect(a.locator("#journal-status")).to_have_text(OPEN, timeout=UI_TIMEOUT_MS)
            stream = a.locator("#journal-stream")
            expect(stream).to_contain_text("recovered: true", timeout=UI_TIMEOUT_MS)
            expect(stream).to_have_attribute("data-recovered", "true")
            expect(stream).to_contain_text("Resumed after seq 1")

            # Every message sent while away, in order, each once, then live ones go on.
            db.execute(f"SELECT {schema}.send(%s, %s)", (channel, live))
        finally:
            db.close()
        away = from_chat + from_sql
        expect(a.locator("#journal-messages li .payload")).to_have_text([first, *away, live],
                                                                        timeout=UI_TIMEOUT_MS)
        expect(a.locator("#journal-messages li .tag.seq")).to_have_text(
            [f"seq {n}" for n in range(1, len(away) + 3)])
        for text in away:
            expect(entries(a, "journal-messages", text).locator(".tag.away")).to_have_count(1)
        for text in (first, live):
            expect(entries(a, "journal-messages", text).locator(".tag.away")).to_have_count(0)
        expect(a.locator("#journal-messages .tag.problem")).to_have_count(0)
        expect(a.locator("#journal-position")).to_contain_text(f"seq {len(away) + 2} ")
        assert a.locator("#journal-messages b").count() == 0
        # The other panes work with the journal on: page B's audit pane got the chat copies.
        for text in from_chat:
            expect(entries(b, "audit-messages", text)).to_have_count(1, timeout=UI_TIMEOUT_MS)
        watch_a.check()
        watch_b.check()
        context_a.close()
        context_b.close()

    await in_browser(session)
