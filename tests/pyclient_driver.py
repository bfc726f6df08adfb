"""
A program that runs one L{pgws.client} and reports everything it sees, for tests/test_pyclient.py.

The test suite runs on Twisted's reactor with pgws servers in its own process, where Autobahn
is loaded on Twisted; txaio allows one framework per process, so the asyncio client runs here,
in a process of its own.  It is the client as an application uses it: C{async with connect(...)},
C{async for} over the items, C{on_event}, and a token callback that mints tokens.

    python tests/pyclient_driver.py '<JSON settings>'

Settings: C{url}, C{channel}, C{claims}, C{secret}, C{ttl} (seconds a minted token lives; None:
no exp), C{static} (a fixed token instead of the callback), C{refresh_ahead}, C{positions}
(channel -> [seq, epoch]), C{history}, C{max_queued}, C{backoff} ([first, cap]), C{debug_log}
(Autobahn's debug log to stderr).

Out, one JSON object a line: C{{"kind": "token", "n", "exp"}} for each token minted,
C{{"kind": "event", "type", ...}}, C{{"kind": "item", "type": "Message"|"Gap", ...}},
C{{"kind": "sent"|"send_error", "text", ...}}, C{{"kind": "open_failed", ...}} and, last,
C{{"kind": "end", "error", ...}}.  In, one JSON object a line: C{{"op": "send", "text"}},
C{{"op": "close"}}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import sys
import time
from typing import Any

import jwt

import pgws.client


def say(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def described(thing: Any) -> dict[str, Any]:
    return {"type": type(thing).__name__, **dataclasses.asdict(thing)}


def error_fields(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "message": str(e), "code": getattr(e, "code", None),
            "status": getattr(e, "status", None)}


class Tokens:
    def __init__(self, claims: dict[str, Any], secret: str, ttl: float | None) -> None:
        self.claims, self.secret, self.ttl = claims, secret, ttl
        self.minted = 0

    def __call__(self) -> str:
        self.minted += 1
        claims = dict(self.claims)
        if self.ttl is not None:
            claims["exp"] = time.time() + self.ttl
        jwt_text = jwt.encode(claims, self.secret, algorithm="HS256")
        say("token", n=self.minted, exp=claims.get("exp"), jwt=jwt_text)
        return jwt_text


async def commands(client: pgws.client.Client, done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if command["op"] == "send":
            try:
                await client.send(command["text"])
                say("sent", text=command["text"])
            except pgws.client.ClientError as e:
                say("send_error", text=command["text"], **error_fields(e))
        elif command["op"] == "close":
            break
    done.set()


async def main(settings: dict[str, Any]) -> None:
    if settings.get("debug_log"):  # everything Autobahn logs, to stderr
        import logging

        import txaio

        # txaio on asyncio, as the client's first connection does (a plain import would make
        # "pgws" a local name of this function).
        importlib.import_module("pgws._client_socket")

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        txaio.set_global_log_level("debug")  # type: ignore[attr-defined]
    tokens = Tokens(settings.get("claims", {"mode": "r"}), settings["secret"], settings.get("ttl"))
    token: Any = tokens() if settings.get("static") else tokens
    first, cap = settings.get("backoff", [0.05, 0.5])
    client = pgws.client.connect(
        settings["url"], token=token, channel=settings.get("channel"),
        positions={c: (p[0], p[1]) for c, p in settings.get("positions", {}).items()},
        history=settings.get("history"), max_queued=settings.get("max_queued", 1000),
        refresh_ahead=settings.get("refresh_ahead", 30.0),
        backoff=pgws.client.Backoff(first, cap),
        on_event=lambda event: say("event", **described(event)))
    try:
        await client.open()
    except pgws.client.ClientError as e:
        say("open_failed", **error_fields(e))
        say("end", **error_fields(e))
        return
    done = asyncio.Event()
    control = asyncio.create_task(commands(client, done))

    async def read() -> None:
        try:
            async for item in client:
                say("item", **described(item))
            say("end", error=None)
        except pgws.client.ClientError as e:
            say("end", **error_fields(e))

    reading = asyncio.create_task(read())
    await asyncio.wait([reading, asyncio.create_task(done.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    unsent = await client.close()
    await reading
    say("closed", unsent=unsent)
    control.cancel()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
