"""Plain HTTP: files from server-root only, no listings, nothing outside the root."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from support import http_request, start_server

EXAMPLE = str(Path(__file__).resolve().parent.parent / "client-example")


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_index_page_and_its_files_are_served(db_uri):
    server = await start_server(db_uri, server_root=EXAMPLE)
    try:
        index = await http_request(server.port, get("/"))
        assert index.status == 200
        assert index.headers["content-type"].startswith("text/html")
        assert index.body == (Path(EXAMPLE) / "index.html").read_bytes()
        script = await http_request(server.port, get("/app.js"))
        assert script.status == 200 and script.body == (Path(EXAMPLE) / "app.js").read_bytes()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_nothing_outside_the_root_and_no_listings(db_uri, tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    server = await start_server(db_uri, server_root=str(root))
    try:
        assert (await http_request(server.port, get("/sub/file.txt"))).body == b"inside"
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt",
                     "/sub/", "/sub", "/missing"):
            response = await http_request(server.port, get(path))
            assert response.status in (404, 302), path  # /sub -> /sub/ -> 404
            assert b"outside" not in response.body and b"file.txt" not in response.body, path
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_without_server_root_plain_http_is_404(db_uri):
    server = await start_server(db_uri)
    try:
        response = await http_request(server.port, get("/"))
        assert response.status == 404
        assert response.body == b"not found\n"
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_metrics_path_is_pgws_s_when_on_and_a_file_when_off(db_uri, tmp_path):
    (tmp_path / "metrics").write_text("a file named metrics")
    on = await start_server(db_uri, server_root=str(tmp_path))
    off = await start_server(db_uri, server_root=str(tmp_path), metrics="false")
    try:
        scraped = await http_request(on.port, get("/metrics"))
        assert scraped.status == 200 and b"pgws_websockets_open" in scraped.body
        served = await http_request(off.port, get("/metrics"))
        assert (served.status, served.body) == (200, b"a file named metrics")
        refused = await http_request(on.port, get("/livez").replace(b"GET", b"POST", 1))
        assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD")
        assert refused.body == b"method POST is not allowed here; use GET or HEAD\n"
    finally:
        await on.stop()
        await off.stop()
