"""The README's embedding example, run exactly as written, relays through PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted

from support import SECRET, http_request, sleep, token, until, ws_connect

README = Path(__file__).resolve().parent.parent / "README.md"


def embedding_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- embedding-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its embedding example"
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_readme_embedding_example_runs_and_relays(db_uri, tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(embedding_example())
    out = tmp_path / "out.txt"
    env = {**os.environ, "PGWS_DB_URI": db_uri, "PGWS_JWT_SECRET": SECRET, "PORT": "0"}
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"listening on port (\d+)", out.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            await sleep(0.1)
        port = int(m.group(1))
        page = await http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert page.body == b"my application\n"

        async def ready() -> bool:  # the relay connects once the reactor runs: until then, 503
            answer = await http_request(port, b"GET /ws/readyz HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
            return answer.status == 200

        await until(ready, "the mounted relay's /ws/readyz answers 200")
        # The 101 comes once PostgreSQL has executed the LISTEN: its own message comes back.
        client = await ws_connect(port, "/ws/embedded-chat/" + token({"mode": "rw"}))
        client.send("mounted")
        got = await client.next_json()
        assert (got["channel"], got["payload"]) == ("embedded-chat", "mounted")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
