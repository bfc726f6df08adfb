"""/pgws.js: pgws's own JavaScript client, served with or without server-root, importable from
any origin (CORS, a JavaScript type), cached by its ETag."""

from __future__ import annotations

from importlib import resources

import pytest
from memory import MemoryRelay
from memory import http_get as get

SHIPPED = resources.files("pgws").joinpath("static", "pgws.js").read_bytes()


@pytest.fixture(params=["no server-root", "server-root with its own pgws.js"])
def relay(request, tmp_path):
    if request.param == "no server-root":
        relay = MemoryRelay()
    else:
        (tmp_path / "pgws.js").write_text("export const NOT_PGWS = 1;\n")
        (tmp_path / "index.html").write_text("<p>page</p>")
        relay = MemoryRelay(server_root=str(tmp_path))
    yield relay
    relay.stop()


def test_the_client_is_served_importable_from_any_origin(relay):
    status, headers, body = get(relay, "/pgws.js", "Origin: https://app.example.com\r\n")
    assert status == 200
    assert body == SHIPPED  # pgws's own file, even where server-root has one of that name
    assert b"export function connect" in body
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"
    assert headers["etag"].startswith('"') and len(headers["etag"]) == 34


def test_an_unchanged_client_is_a_304_without_body(relay):
    etag = get(relay, "/pgws.js")[1]["etag"]
    status, headers, body = get(relay, "/pgws.js", f"If-None-Match: {etag}\r\n")
    assert (status, body) == (304, b"")
    assert headers["etag"] == etag
    status, _, body = get(relay, "/pgws.js", 'If-None-Match: "another"\r\n')
    assert (status, body) == (200, SHIPPED)


def test_head_has_the_headers_and_length_without_a_body(relay):
    from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
    from zope.interface import provider

    logged: list[str] = []

    @provider(ILogObserver)
    def observer(event: dict) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        status, headers, body = get(relay, "/pgws.js", method="HEAD")
    finally:
        globalLogPublisher.removeObserver(observer)
    # twisted.web logs a warning for a HEAD whose resource returns a body: this one has none.
    assert not [line for line in logged if "returning a message body" in line], logged
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(SHIPPED))
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["etag"] == get(relay, "/pgws.js")[1]["etag"]


def test_only_the_exact_path_is_the_client(relay):
    assert get(relay, "/pgws.js/x")[0] == 404
    assert get(relay, "/pgws.jsx")[0] == 404
