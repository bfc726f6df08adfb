"""
pgws.client's pure logic, without sockets: back-off, which closes reconnect, refresh timing, the
socket URL and subprotocols (read back by the server's own parsers), the token's facts, control
frames, journal positions (duplicates, holes, resume, recovered), and send's queue.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest

import pgws.client
from pgws import _credentials
from pgws._client_journal import Positions
from pgws._client_policy import Backoff, final_close, final_refusal, refresh_delay
from pgws._client_wire import (
    BEARER_PREFIX,
    SUBPROTOCOL,
    offered_protocols,
    parse_control,
    public_url,
    redact,
    refresh_request,
    socket_url,
    token_facts,
)
from pgws._journal import parse_resume
from pgws.client import (
    ClientClosed,
    ClientError,
    Connected,
    Disconnected,
    Gap,
    Message,
    QueueFull,
    Refreshed,
    RefreshFailed,
    Refused,
    Stream,
    connect,
)

SECRET = "reallyreallyreallyreallyverysafe"


def token(**claims: object) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


# -- back-off ----------------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_each_delay_between_half_and_the_whole_step():
    low = Backoff(0.25, 2.0, rng=lambda: 0.0)
    high = Backoff(0.25, 2.0, rng=lambda: 0.999999)
    assert [low.next() for _ in range(6)] == [0.125, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert [round(high.next(), 3) for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_backoff_jitter_spreads_clients_of_one_restart():
    rng = random.Random(7)
    delays = {round(Backoff(1.0, 8.0, rng=rng.random).next(), 3) for _ in range(50)}
    assert len(delays) > 40 and min(delays) >= 0.5 and max(delays) <= 1.0


def test_backoff_reset_starts_again_from_first():
    backoff = Backoff(0.5, 8.0, rng=lambda: 0.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 0.25


def test_backoff_refuses_nonsense():
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


# -- which closes end the client -------------------------------------------------------------------


@pytest.mark.parametrize("code", [1001, 1006, 1008, 1011, 1013, 1000, None])
def test_closes_that_reconnect(code):
    assert final_close(code, renewable=False) is False


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1009, 1010])
def test_closes_that_another_socket_would_only_repeat_end_the_client(code):
    assert final_close(code, renewable=True) is True


def test_3001_reconnects_only_with_a_token_callback():
    assert final_close(3001, renewable=True) is False
    assert final_close(3001, renewable=False) is True


@pytest.mark.parametrize("status,final", [(400, True), (401, True), (403, True), (404, True),
                                          (408, False), (429, False), (500, False), (503, False)])
def test_refusals(status, final):
    assert final_refusal(status) is final


# -- refresh timing ----------------------------------------------------------------------------------


def test_refresh_comes_ahead_of_exp_or_half_way_for_a_short_token():
    assert refresh_delay(1000.0, 0.0, 30.0) == 970.0
    assert refresh_delay(10.0, 0.0, 30.0) == 5.0
    assert refresh_delay(10.0, 20.0, 30.0) == 0.0  # already expired: at once
    assert refresh_delay(None, 0.0, 30.0) is None
    assert refresh_delay(1000.0, 0.0, None) is None


# -- the URL and the subprotocols, as the server reads them -------------------------------------------


def test_the_url_names_the_channel_and_the_token_travels_as_a_subprotocol():
    jwt_text = token(mode="r")
    url = socket_url("ws://h:3000", "test channel/é", {})
    path = urlsplit(url).path
    assert url == "ws://h:3000/test%20channel%2F%C3%A9" and jwt_text not in url
    protocols = offered_protocols(jwt_text)
    assert protocols == [SUBPROTOCOL, BEARER_PREFIX + jwt_text]
    assert (SUBPROTOCOL, BEARER_PREFIX) == (_credentials.SUBPROTOCOL, _credentials.BEARER_PREFIX)
    assert _credentials.locate(path, {}, protocols) == ("test channel/é", jwt_text)
    assert _credentials.accepted_subprotocol(protocols) == "pgws"


def test_log_lines_never_show_the_offered_token():
    jwt_text = token(mode="r")
    line = f"Sec-WebSocket-Protocol: pgws,pgws.bearer.{jwt_text}\r\nHost: 127.0.0.1:3000"
    assert redact(line) == "Sec-WebSocket-Protocol: pgws,pgws.bearer.<token>\r\nHost: 127.0.0.1:3000"
    assert redact(", ".join(offered_protocols(jwt_text))) == "pgws, pgws.bearer.<token>"


def test_without_a_channel_the_path_is_the_root_or_the_mount_point():
    assert socket_url("ws://h:3000", None, {}) == "ws://h:3000/"
    assert socket_url("wss://h/ws/", "c", {}) == "wss://h/ws/c"
    assert socket_url("ws://h/ws", None, {}) == "ws://h/ws/"


def test_the_resume_query_is_what_the_server_parses():
    url = socket_url("ws://h:3000/?x=1", "a", {"a": (17, "e1"), "b b": (0, "e2")}, history=5)
    resume = parse_resume(url.split("//", 1)[1].split("/", 1)[1])
    assert resume is not None
    assert dict(resume.positions) == {"a": (17, "e1"), "b b": (0, "e2")}
    assert resume.history == 5
    assert "x=1" in urlsplit(url).query
    assert public_url(url) == "ws://h:3000/a"


def test_no_resume_query_without_positions():
    assert parse_resume(socket_url("ws://h", "a", {})) is None


def test_only_websocket_urls():
    with pytest.raises(ValueError):
        socket_url("http://h:3000", None, {})
    with pytest.raises(ValueError):
        connect("https://h", token="t")


# -- what a client reads from its own token ----------------------------------------------------------------


def test_the_tokens_channel_wins_over_the_requested_one_as_on_the_server():
    assert token_facts(token(mode="r", channel="own"), "asked").channels == ("own",)
    assert token_facts(token(mode="r"), "asked").channels == ("asked",)
    assert token_facts(token(mode="r", channels=["a", "b"])).channels == ("a", "b")
    assert token_facts(token(mode="r")).channels is None


def test_mode_and_exp():
    facts = token_facts(token(mode="rw", exp=1234.5))
    assert (facts.mode, facts.exp) == ("rw", 1234.5)
    assert token_facts(token(mode="r", exp=True)).exp is None


@pytest.mark.parametrize("text", ["", "abc", "a.b.c", "a.!!!.c", "a." + "WzFd" + ".c"])
def test_an_unreadable_token_gives_no_facts(text):
    facts = token_facts(text)
    assert (facts.channels, facts.mode, facts.exp) == (None, None, None)


# -- control frames ------------------------------------------------------------------------------------------


def control(data: object) -> tuple[str, dict]:
    c = parse_control(json.dumps(data).encode())
    return c.kind, c.data


def test_control_frames_are_told_apart():
    assert control({"channel": "c", "seq": 3})[0] == "position"
    assert control({"event": "stream", "channel": "c", "epoch": "e", "seq": 0})[0] == "stream"
    assert control({"event": "gap", "at": 1.5})[0] == "gap"
    assert control({"refreshed": True, "exp": None})[0] == "refreshed"
    assert control({"refreshed": False, "reason": "no"})[0] == "refreshed"
    # Anything else (presence, a newer pgws) is passed on, never taken for a position.
    for other in ({"event": "join", "channel": "c"}, {"channel": "c", "seq": -1},
                  {"channel": "c", "seq": True}, {"channel": "c", "seq": 1, "x": 2}, [1]):
        assert control(other)[0] == "other", other
    assert parse_control(b"\xff").kind == "other"
    assert json.loads(refresh_request("t")) == {"refresh": "t"}


# -- journal positions --------------------------------------------------------------------------------------


def stream(channel: str, seq: int, epoch: str = "e", recovered: bool | None = None) -> dict:
    data: dict = {"event": "stream", "channel": channel, "epoch": epoch, "seq": seq}
    if recovered is not None:
        data["recovered"] = recovered
    return data


def row(p: Positions, channel: str, seq: int, text: str) -> list:
    p.position(channel, seq)
    return p.text(text)


def test_live_messages_follow_the_streams_position():
    p = Positions(("c",))
    assert p.opened(history=False, reconnect=False) == []
    assert p.stream(stream("c", 5)) == (Stream("c", "e", 5, None), None)
    assert p.resume() == {"c": (5, "e")}
    assert row(p, "c", 6, "m6") == [Message("c", "m6", 6, "e")]
    assert p.resume() == {"c": (6, "e")}


def test_a_duplicate_is_dropped_and_counted():
    p = Positions(("c",))
    p.opened(False, False)
    p.stream(stream("c", 0))
    assert row(p, "c", 1, "m1") != []
    assert row(p, "c", 1, "m1") == [] and row(p, "c", 0, "m0") == []
    assert p.duplicates == 2
    assert row(p, "c", 2, "m2") == [Message("c", "m2", 2, "e")]


def test_a_hole_in_the_sequence_is_a_gap_before_the_message():
    p = Positions(("c",))
    p.opened(False, False)
    p.stream(stream("c", 3))
    assert row(p, "c", 7, "m7") == [Gap("hole", ("c",), after=3, upto=6), Message("c", "m7", 7, "e")]


def test_a_recovered_resume_keeps_the_position_for_the_replay():
    p = Positions(("c",), initial={"c": (10, "e")})
    assert p.resume() == {"c": (10, "e")}
    p.opened(False, False)
    assert p.stream(stream("c", 13, recovered=True))[1] is None
    assert [m.seq for m in row(p, "c", 11, "a") + row(p, "c", 12, "b") + row(p, "c", 13, "c")] == \
        [11, 12, 13]


def test_a_resume_not_recovered_is_a_gap_and_the_position_moves_on():
    p = Positions(("c",), initial={"c": (2, "e")})
    p.opened(False, False)
    _, gap = p.stream(stream("c", 20, recovered=False))
    assert gap == Gap("not recovered", ("c",), after=2, upto=20)
    assert p.resume() == {"c": (20, "e")}
    assert row(p, "c", 21, "m") == [Message("c", "m", 21, "e")]


def test_a_new_epoch_is_a_gap_with_no_known_start():
    p = Positions(("c",), initial={"c": (9, "old")})
    p.opened(False, False)
    _, gap = p.stream(stream("c", 4, epoch="new", recovered=False))
    assert gap == Gap("not recovered", ("c",), after=None, upto=4)
    assert p.resume() == {"c": (4, "new")}


def test_after_history_the_replays_first_message_sets_the_position():
    p = Positions(("c",))
    p.opened(history=True, reconnect=False)
    p.stream(stream("c", 10))
    assert p.resume() == {}
    assert [m.seq for m in row(p, "c", 8, "a") + row(p, "c", 9, "b")] == [8, 9]
    assert p.resume() == {"c": (9, "e")}


def test_a_reconnect_is_a_gap_for_the_channels_not_known_to_be_journaled():
    p = Positions(("j", "plain"))
    p.opened(False, False)
    p.stream(stream("j", 0))
    assert p.opened(False, reconnect=True) == [Gap("disconnected", ("plain",))]
    p.stream(stream("plain", 0))
    assert p.opened(False, reconnect=True) == []
    assert Positions(None).opened(False, reconnect=True) == [Gap("disconnected")]
    assert Positions(()).opened(False, reconnect=True) == []  # write-only: reads nothing


def test_the_servers_gap_names_the_plain_channels_of_this_connection():
    p = Positions(("j", "plain"))
    p.opened(False, False)
    p.stream(stream("j", 0))
    assert p.server_gap({"event": "gap", "at": 12.5}) == Gap("listen", ("plain",), at=12.5)
    assert Positions(None).server_gap({"event": "gap"}) == Gap("listen", None)


def test_a_plain_text_frame_names_the_channel_only_when_the_socket_has_one():
    assert Positions(("c",)).text("x") == [Message("c", "x")]
    assert Positions(("a", "b")).text("x") == [Message(None, "x")]
    assert Positions(None).text("x") == [Message(None, "x")]


# -- send's rule, and a process that runs Autobahn on Twisted ------------------------------------------


def test_send_while_disconnected_queues_up_to_max_queued_and_close_returns_them():
    async def scenario() -> tuple[list[str], str]:
        client = connect("ws://127.0.0.1:9", token=token(mode="w"), max_queued=2)
        await client.send("a")
        await client.send("b")
        with pytest.raises(QueueFull) as full:
            await client.send("c")
        unsent = await client.close()
        with pytest.raises(ClientClosed):
            await client.send("d")
        return unsent, str(full.value)

    unsent, why = asyncio.run(scenario())
    assert unsent == ["a", "b"] and "2 messages already wait" in why


def test_send_with_a_read_only_token_is_an_error_not_a_silent_drop():
    client = connect("ws://127.0.0.1:9", token=token(mode="r"))
    with pytest.raises(ClientError, match="read-only"):
        asyncio.run(client.send("x"))


def test_a_client_in_a_process_that_runs_autobahn_on_twisted_says_so():
    import autobahn.twisted.websocket  # noqa: F401  (as the pgws server does)

    async def scenario() -> None:
        await connect("ws://127.0.0.1:9", token=token(mode="r"), channel="c").open()

    with pytest.raises(ClientError, match="runs Autobahn on Twisted"):
        asyncio.run(scenario())


# -- the connection loop, on sockets of a fake pgws (no Autobahn: this process may run Twisted's) ---


class FakeSocket:
    """An accepted socket of L{FakePgws}: closes with 3001 at its token's exp, answers refreshes."""

    STATE_OPEN = 3

    def __init__(self, server: FakePgws, sink: Any, url: str, jwt_text: str) -> None:
        self.server, self.sink, self.state = server, sink, self.STATE_OPEN
        self.factory = type("Factory", (), {"url": url})()
        self.sent: list[bytes] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._expire_at(jwt_text)

    def _expire_at(self, jwt_text: str) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        exp = token_facts(jwt_text).exp
        if exp is not None:
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, exp - time.time()), self._close, 3001, "JWT expired")

    def _close(self, code: int | None, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.state = 0
            if self._expiry is not None:
                self._expiry.cancel()
            asyncio.get_running_loop().call_soon(self.sink.closed, code, reason, None)

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sent.append(payload)
        if isBinary and "refresh" in json.loads(payload):
            new = json.loads(payload)["refresh"]
            self._expire_at(new)
            reply = {"refreshed": True, "exp": token_facts(new).exp}
            asyncio.get_running_loop().call_soon(
                self.sink.received, json.dumps(reply).encode(), True)

    def sendClose(self, code: int) -> None:
        self._close(code, "")

    def dropConnection(self, abort: bool) -> None:
        self._close(1006, "")

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class FakePgws:
    """
    What pgws does with a handshake, for L{pgws.client}'s loop: C{down} refuses the TCP
    connection; else a token past its exp is refused (401 JWT expired) and the others open.
    """

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.sockets: list[FakeSocket] = []

    async def open_socket(self, url: str, protocols: list[str], sink: Any, **_: Any) -> FakeSocket:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        jwt_text = protocols[1].removeprefix(BEARER_PREFIX)
        socket = FakeSocket(self, sink, url, jwt_text)
        exp = token_facts(jwt_text).exp
        loop = asyncio.get_running_loop()
        if exp is not None and exp <= time.time():
            socket.state = 0
            loop.call_soon(sink.closed, None, "JWT expired", 401)
        else:
            self.sockets.append(socket)
            loop.call_soon(sink.opened, socket)
        return socket


@pytest.fixture
def fake_pgws(monkeypatch: pytest.MonkeyPatch) -> FakePgws:
    server = FakePgws()
    monkeypatch.setattr(pgws.client, "_socket_opener", lambda: server.open_socket)
    return server


def run(scenario: Any) -> Any:
    """C{asyncio.run}, bounded: a client that never stops is a failure, not a hung suite."""
    return asyncio.run(asyncio.wait_for(scenario, 10))


def quick() -> Backoff:
    return Backoff(0.01, 0.02)


def test_a_cancelled_open_stops_the_client_and_the_cancellation_goes_on(fake_pgws):
    fake_pgws.down = True
    calls: list[str] = []
    events: list[object] = []

    def tokens() -> str:
        calls.append("t")
        return token(mode="r")

    async def scenario() -> tuple[pgws.client.Client, int]:
        client = connect("ws://127.0.0.1:9", token=tokens, channel="c", backoff=quick(),
                         on_event=events.append)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.open(), 0.2)
        asked = len(calls)
        assert client._runner is not None and client._runner.done()
        for _ in range(20):  # the loop turns: nothing more happens
            await asyncio.sleep(0)
        assert len(calls) == asked
        assert await client.close() == []
        return client, asked

    client, asked = run(scenario())
    assert asked >= 2
    assert events[-1] == Disconnected(None, "closed by the application", None)
    assert [e for e in events if isinstance(e, Disconnected) and e.retry_in is None] == [events[-1]]
    with pytest.raises(ClientClosed):
        asyncio.run(client.send("x"))


def test_async_with_under_wait_for_stops_the_client_too(fake_pgws):
    fake_pgws.down = True

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=lambda: token(mode="r"), backoff=quick())

        async def use() -> None:
            async with client:
                pass

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(use(), 0.1)
        assert client._runner is not None and client._runner.done()

    run(scenario())


def test_a_cached_token_is_refreshed_once_then_the_reconnect_says_it_is_expired(fake_pgws):
    cached = token(mode="r", exp=time.time() + 0.6)  # refreshed half-way: at 0.3 s
    calls: list[str] = []
    events: list[object] = []

    def tokens() -> str:
        calls.append("t")
        return cached

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=tokens, channel="c", backoff=quick(),
                         on_event=events.append)
        await client.open()
        with pytest.raises(Refused) as refused:
            async for _ in client:
                pass
        assert (refused.value.status, refused.value.reason) == (401, "JWT expired")
        assert "the token callback returned an expired token" in str(refused.value)

    run(scenario())
    # Asked to connect, once to refresh, and once more after the 3001: no storm.
    assert len(calls) == 3
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Connected", "Refreshed", "RefreshFailed", "Disconnected", "Disconnected"]
    assert "no later than the last one" in events[2].reason  # type: ignore[attr-defined]
    assert (events[3].code, events[4].status, events[4].retry_in) == (  # type: ignore[attr-defined]
        3001, 401, None)


def test_a_later_token_is_refreshed_again(fake_pgws):
    events: list[object] = []
    ttl = iter([0.4, 0.6, 60.0])

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=lambda: token(mode="r", exp=time.time() + next(ttl)),
                         channel="c", on_event=events.append)
        await client.open()
        while sum(isinstance(e, Refreshed) for e in events) < 2:
            await asyncio.sleep(0.01)
        await client.close()

    run(scenario())
    assert not any(isinstance(e, RefreshFailed) for e in events)


@pytest.mark.parametrize("value", [None, "", b"jwt", 17])
def test_a_token_callback_that_returns_no_token_ends_the_client(fake_pgws, value):
    calls: list[object] = []
    events: list[object] = []

    def tokens() -> object:
        calls.append(value)
        return value

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=tokens, backoff=quick(),  # type: ignore[arg-type]
                         on_event=events.append)
        with pytest.raises(ClientError, match=r"returned .*, not a JWT \(a non-empty str\)"):
            await client.open()

    run(scenario())
    assert len(calls) == 1
    [end] = events
    assert isinstance(end, Disconnected) and end.retry_in is None and "not a JWT" in end.reason


def test_a_token_callback_that_returns_no_token_at_a_refresh_ends_the_client(fake_pgws):
    answers: Any = iter([token(mode="r", exp=time.time() + 0.2), None])
    events: list[object] = []

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=lambda: next(answers), channel="c",
                         on_event=events.append)
        await client.open()
        with pytest.raises(ClientError, match="returned NoneType, not a JWT"):
            async for _ in client:
                pass

    run(scenario())
    assert [type(e).__name__ for e in events] == ["Connected", "Disconnected"]
    assert events[1].retry_in is None  # type: ignore[attr-defined]


def test_no_token_at_a_refresh_that_outlives_its_socket_ends_the_client_in_its_backoff(fake_pgws):
    events: list[object] = []
    calls: list[str] = []

    async def tokens() -> str | None:
        calls.append("t")
        if len(calls) == 1:
            return token(mode="r", exp=time.time() + 0.2)  # refreshed at 0.1 s, 3001 at 0.2 s
        while not any(isinstance(e, Disconnected) for e in events):
            await asyncio.sleep(0.01)
        return None  # the runner now waits out a long back-off

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=tokens, channel="c",  # type: ignore[arg-type]
                         backoff=Backoff(60, 60), on_event=events.append)
        await client.open()
        with pytest.raises(ClientError, match="returned NoneType, not a JWT"):
            async for _ in client:
                pass
        assert client._runner is not None
        await asyncio.wait({client._runner})

    run(scenario())
    assert [(type(e).__name__, getattr(e, "retry_in", 0) is None) for e in events] == [
        ("Connected", False), ("Disconnected", False), ("Disconnected", True)]
    assert "not a JWT" in events[2].reason  # type: ignore[attr-defined]


def test_a_token_callback_that_raises_is_a_failed_attempt_retried_after_the_backoff(fake_pgws):
    results: list[object] = [ZeroDivisionError("no"), ZeroDivisionError("no"), token(mode="r")]
    events: list[object] = []

    def tokens() -> str:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return str(result)

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=tokens, channel="c", backoff=quick(),
                         on_event=events.append)
        await client.open()
        await client.close()

    run(scenario())
    failed = [e for e in events if isinstance(e, Disconnected) and e.retry_in is not None]
    assert [e.reason for e in failed] == ["the token callback failed: ZeroDivisionError('no')"] * 2
    assert isinstance(events[2], Connected)


def test_close_tells_the_client_stopped(fake_pgws):
    events: list[object] = []

    async def scenario() -> None:
        async with connect("ws://127.0.0.1:9", token=token(mode="r"), channel="c",
                           on_event=events.append):
            pass

    run(scenario())
    assert [type(e).__name__ for e in events] == ["Connected", "Disconnected"]
    assert (events[1].code, events[1].retry_in) == (1000, None)  # type: ignore[attr-defined]


def test_close_during_the_backoff_tells_the_client_stopped(fake_pgws):
    fake_pgws.down = True
    events: list[object] = []

    async def scenario() -> None:
        client = connect("ws://127.0.0.1:9", token=token(mode="r"), channel="c",
                         backoff=Backoff(60, 60), on_event=events.append)
        opening = asyncio.ensure_future(client.open())
        while not events:
            await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(ClientClosed):
            await opening

    run(scenario())
    assert [(type(e).__name__, e.retry_in is None) for e in events] == [  # type: ignore[attr-defined]
        ("Disconnected", False), ("Disconnected", True)]
    assert events[1] == Disconnected(None, "closed by the application", None)


@pytest.mark.parametrize("value", [b"x", None, 17, ["x"]])
def test_send_takes_only_text(value):
    async def scenario() -> list[str]:
        client = connect("ws://127.0.0.1:9", token=token(mode="w"))
        with pytest.raises(TypeError, match="send\\(\\) takes a str"):
            await client.send(value)
        return await client.close()

    assert run(scenario()) == []
