"""
A Python client of pgws for services and scripts, on asyncio::

    import pgws.client

    async with pgws.client.connect("ws://localhost:3000", token=get_token, channel="orders") as c:
        await c.send("hello")
        async for item in c:
            if isinstance(item, pgws.client.Gap):
                ...  # messages may be missing here: re-read the state, say so, ...
            else:
                print(item.channel, item.seq, item.text)

Why asyncio: services and scripts mostly run on it, and Autobahn, which pgws already depends on,
has an asyncio flavour; no library is added.  A process picks one framework for Autobahn (txaio
refuses a second), so this client cannot run in a process that runs the pgws server, or any
other Autobahn-on-Twisted code: run it in its own process.  Importing this module imports neither
Twisted nor Autobahn; Autobahn is loaded when the client first connects.

What it does (the README's "The Python client" has the same, with the rules in full):
  - The token never travels in the URL: it is offered as the C{pgws.bearer.<jwt>} subprotocol
    beside C{pgws}.
  - It reconnects with exponential back-off and jitter (L{pgws._client_policy} says which closes
    end the client instead).
  - With the journal on it resumes from the positions it has seen (C{?resume=}), drops any
    duplicate, and yields a L{Gap} wherever messages may be missing (C{"recovered": false}, a
    LISTEN loss, plain channels across a reconnect).
  - With a token callback it refreshes the token before C{exp} and gets a fresh one for every
    connection attempt (so after a 3001 close too).
  - L{Client.send} while disconnected queues, up to C{max_queued} messages, sent in order on the
    next connection; past that it raises L{QueueFull}; closing with messages never sent raises
    L{UnsentMessages}.  Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pgws._client_events import (
    ClientClosed,
    ClientError,
    Connected,
    Disconnected,
    Event,
    Gap,
    Message,
    QueueFull,
    Refreshed,
    RefreshFailed,
    Refused,
    ServerEvent,
    Stream,
    UnsentMessages,
)
from pgws._client_journal import Positions
from pgws._client_policy import Backoff, final_close, final_refusal, refresh_delay
from pgws._client_wire import (
    offered_protocols,
    parse_control,
    public_url,
    refresh_request,
    socket_url,
    token_facts,
)

if TYPE_CHECKING:
    from pgws._client_socket import ClientSocket

__all__ = ["Backoff", "Client", "ClientClosed", "ClientError", "Connected", "Disconnected", "Event", "Gap",
           "Message", "QueueFull", "RefreshFailed", "Refreshed", "Refused", "ServerEvent",
           "Stream", "UnsentMessages", "connect"]

_log = logging.getLogger("pgws.client")

TokenSource = str | Callable[[], str | Awaitable[str]]


def connect(url: str, *, token: TokenSource, channel: str | None = None,
            positions: Mapping[str, tuple[int, str]] | None = None, history: int | None = None,
            on_event: Callable[[Event], None] | None = None, max_queued: int = 1000,
            max_buffered: int = 10_000, refresh_ahead: float | None = 30.0,
            backoff: Backoff | None = None, ping_interval: float | None = 20.0,
            open_timeout: float = 30.0, ssl: ssl_module.SSLContext | None = None) -> Client:
    """
    A client of the pgws at C{url} (C{ws://host:port} or C{wss://}, with a path prefix if pgws is
    mounted below one); use it as C{async with connect(...) as c}, or C{await c.open()} and
    C{await c.close()}.

    @param token: the JWT, or a function (plain or async) that returns a valid one: called for
        every connection attempt and for every refresh.  A fixed string cannot be refreshed, so a
        3001 (expired) close ends the client.
    @param channel: the channel to open (C{/<channel>}); None: the token's C{channels}.
    @param positions: journal positions to resume from on the first connection, channel ->
        (seq, epoch), e.g. the last L{Message} a previous run processed.
    @param history: ask for the last N messages of each journaled channel the client has no
        position for.
    @param on_event: called at once with every L{Event} (connections, closes, stream positions,
        gaps, refreshes, unknown control messages); it must not block.
    @param max_queued: messages L{Client.send} queues while disconnected.
    @param max_buffered: received items waiting for the application before the client stops
        reading its socket (the server then cuts it off as too slow, and it resumes later).
    @param refresh_ahead: refresh the token this many seconds before its C{exp} (or half-way,
        for a shorter-lived token); None: never in place, a new connection after each 3001.
    @param backoff: the delays between attempts (L{Backoff}: 0.25 s doubling to 15 s, jittered).
    @param ping_interval: seconds between the client's pings (a dead link is noticed within it
        plus 10 s); None: none (the server pings every 30 s anyway).
    """
    return Client(url, token=token, channel=channel, positions=positions, history=history,
                  on_event=on_event, max_queued=max_queued, max_buffered=max_buffered,
                  refresh_ahead=refresh_ahead, backoff=backoff, ping_interval=ping_interval,
                  open_timeout=open_timeout, ssl=ssl)


def _socket_opener() -> Callable[..., Awaitable[ClientSocket]]:
    """Autobahn's asyncio flavour, loaded only now (see the module docstring)."""
    try:
        from pgws._client_socket import open_socket
    except RuntimeError as e:  # txaio: "Explicitly using 'twisted' already"
        raise _Unusable(
            "pgws.client runs on asyncio, and this process already runs Autobahn on Twisted "
            f"(txaio allows one framework per process: {e}); run the client in a process of "
            "its own") from None
    return open_socket


class _Unusable(ClientError):
    """This process cannot run the client at all."""


class _NotAToken(ClientError):
    """The token callback returned something that is not a token: a programming error."""


def _kind_of(value: object) -> str:
    return "an empty str" if value == "" else type(value).__name__


_CLOSED_BY_APP = "closed by the application"


class _End:
    """The end of the items: iteration stops, or raises the error that stopped the client."""


_END = _End()


class Client:
    """A pgws socket that reconnects and resumes (see L{connect}, which documents the arguments)."""

    def __init__(self, url: str, *, token: TokenSource, channel: str | None,
                 positions: Mapping[str, tuple[int, str]] | None, history: int | None,
                 on_event: Callable[[Event], None] | None, max_queued: int, max_buffered: int,
                 refresh_ahead: float | None, backoff: Backoff | None,
                 ping_interval: float | None, open_timeout: float,
                 ssl: ssl_module.SSLContext | None) -> None:
        socket_url(url, channel, {})  # a bad URL is an error here, not at the first attempt
        self.url = url
        self.channel = channel
        self._token_source = token
        self._history = history
        self._on_event = on_event
        self._max_queued = max_queued
        self._max_buffered = max_buffered
        self._refresh_ahead = refresh_ahead
        self._backoff = backoff or Backoff()
        self._ping_interval = ping_interval
        self._open_timeout = open_timeout
        self._ssl = ssl
        self._initial = dict(positions or {})
        self._positions: Positions | None = None  # made with the first token (it names channels)
        self._token = token if isinstance(token, str) else None
        self._items: asyncio.Queue[Message | Gap | _End] = asyncio.Queue()
        self._outgoing: deque[str] = deque()  # written on the next open
        self._socket: ClientSocket | None = None  # the open socket
        self._connecting: ClientSocket | None = None  # the socket of the attempt under way
        self._paused = False
        self._attempts = 0
        self._opened_at = 0.0
        self._socket_closed: asyncio.Future[tuple[int | None, str, int | None]] | None = None
        self._first_open: asyncio.Future[None] | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._refresh_answer: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # cuts a back-off sleep short on close()
        self._closing = False
        self._error: ClientError | None = None  # why the client stopped, if not asked to
        # A read-only token's messages would be dropped by pgws: send() refuses them.
        self.read_only = isinstance(token, str) and token_facts(token).mode == "r"

    # -- what the application calls ---------------------------------------------------------------

    async def open(self) -> Client:
        """
        Start, and return once the first socket is open.  Attempts that fail for a reason that
        may pass (server down, 503, a token callback that raised) are retried, with no limit; a
        final refusal raises (L{Refused}, L{ClientClosed}), and so does a token callback that
        returns something else than a non-empty C{str} (L{ClientError}).  Cancelling it (e.g.
        C{asyncio.wait_for(c.open(), 10)}) stops the client, as L{close} does.
        """
        if self._runner is None:
            loop = asyncio.get_running_loop()
            self._first_open = loop.create_future()
            self._wake = asyncio.Event()
            self._runner = loop.create_task(self._run())
        assert self._first_open is not None and self._runner is not None
        try:
            await asyncio.shield(self._first_open)
        except asyncio.CancelledError:
            # Cancelled (e.g. by asyncio.wait_for): the caller never gets this client, so no one
            # would close it; stop it here, at once, and let the cancellation go on.
            self._abort()
            await asyncio.wait({self._runner})
            raise
        return self

    async def close(self) -> list[str]:
        """
        Close the socket (1000) and stop reconnecting; return the messages L{send} queued that
        were never written to a socket (in order).  Items already received stay readable.
        """
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        self._hang_up()
        if self._runner is not None:
            await asyncio.wait({self._runner})  # (a cancellation of close() itself goes on)
        for task in list(self._tasks):
            task.cancel()
        unsent = list(self._outgoing)
        self._outgoing.clear()
        return unsent

    def _abort(self) -> None:
        """Stop now, without waiting for anything: the runner is cancelled wherever it waits."""
        self._closing = True
        self._hang_up()
        if self._runner is not None:
            self._runner.cancel()
        for task in list(self._tasks):
            task.cancel()

    def _hang_up(self) -> None:
        """Close the open socket (1000), or drop one still in its opening handshake."""
        if self._socket is not None:
            self._socket.sendClose(1000)
        elif self._connecting is not None:  # nothing to say goodbye to yet
            self._connecting.dropConnection(abort=True)

    async def __aenter__(self) -> Client:
        return await self.open()

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        unsent = await self.close()
        if unsent and kind is None:
            raise UnsentMessages(unsent)

    async def send(self, text: str) -> None:
        """
        Send a text message.  Open: written now.  Disconnected (or reconnecting): queued, and
        written in order as soon as a socket opens; with C{max_queued} already waiting,
        L{QueueFull} is raised and the message is not queued.  Once the client has stopped:
        L{ClientClosed}.  A read-only token (mode C{r}): L{ClientError}, since pgws would drop it.
        Not a C{str}: C{TypeError}, and nothing is queued.  A message written to a socket that
        then breaks may or may not have reached pgws: a WebSocket has no acknowledgement (for
        what must not be lost, write to the database).
        """
        if not isinstance(text, str):
            raise TypeError(f"send() takes a str, not {type(text).__name__}: pgws relays text")
        if self._closing or self._error is not None:
            raise self._error or ClientClosed(None, "the client is closed")
        if self.read_only:
            raise ClientError("this token is read-only (mode r): pgws does not relay its messages")
        socket = self._socket
        if socket is not None and not self._outgoing and socket.state == socket.STATE_OPEN:
            socket.sendMessage(text.encode("utf-8"), isBinary=False)
            return
        if len(self._outgoing) >= self._max_queued:
            raise QueueFull(f"disconnected, and {len(self._outgoing)} messages already wait "
                            f"(max_queued)")
        self._outgoing.append(text)

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message | Gap:
        """The next L{Message} or L{Gap}, in the order received; ends when the client stops."""
        item = await self._items.get()
        if self._paused and self._items.qsize() <= self._max_buffered // 2:
            self._paused = False
            if self._socket is not None:
                self._socket.resume_reading()
        if isinstance(item, _End):
            self._items.put_nowait(item)  # every later call ends too
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return item

    @property
    def connected(self) -> bool:
        return self._socket is not None

    @property
    def positions(self) -> dict[str, tuple[int, str]]:
        """The journal positions received so far, channel -> (seq, epoch): where it resumes."""
        return self._positions.resume() if self._positions is not None else dict(self._initial)

    # -- the connection loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        # The last event: Disconnected with retry_in None, once the client has stopped.
        end: Disconnected | None = None
        try:
            while True:
                if self._closing:  # close() during a back-off sleep (or before the first attempt)
                    end = Disconnected(None, _CLOSED_BY_APP if self._error is None
                                       else str(self._error), None)
                    break
                code, reason, status = await self._attempt()
                end = self._final(code, reason, status)
                if end is not None:
                    break
                if time.monotonic() - self._opened_at >= self._backoff.stable and self._opened_at:
                    self._backoff.reset()
                delay = self._backoff.next()
                self._event(Disconnected(code, reason, delay, status))
                await self._sleep(delay)
        except (_NotAToken, _Unusable) as e:
            self._stop(e)
            end = Disconnected(None, str(e), None) if isinstance(e, _NotAToken) else None
        except asyncio.CancelledError:  # a cancelled open() (L{_abort})
            end = Disconnected(None, _CLOSED_BY_APP, None)
            raise
        except Exception as e:  # a bug here must end the client loudly, not hang it
            _log.exception("pgws client stopped by an error")
            self._stop(ClientError(f"the client failed: {e!r}"))
        finally:
            if self._error is None:
                self._stop(None)
            if end is not None:
                self._event(end)

    def _final(self, code: int | None, reason: str, status: int | None) -> Disconnected | None:
        """The last event if this close ends the client (then stopped), else None."""
        if self._closing:  # close(), or a token callback that gave no token (L{_refresh})
            return Disconnected(code, reason if self._error is None else str(self._error),
                                None, status)
        if status is not None and final_refusal(status):
            self._stop(self._refused(status, reason))
        elif status is None and final_close(code, not isinstance(self._token_source, str)):
            self._stop(ClientClosed(code, reason))
        else:
            return None
        return Disconnected(code, reason, None, status)

    def _refused(self, status: int, reason: str) -> Refused:
        if status == 401 and reason == "JWT expired" and not isinstance(self._token_source, str):
            # After a 3001 the callback was asked for this token: it gave an expired one again.
            return Refused(status, reason, "the token callback returned an expired token: it "
                           "must return a valid one, not a cached one that has expired")
        return Refused(status, reason)

    async def _attempt(self) -> tuple[int | None, str, int | None]:
        """One connection, from its token to its close: (code, reason, HTTP status)."""
        self._opened_at = 0.0
        try:
            token = await self._fresh_token()
        except _NotAToken:
            raise  # a programming error: the client ends (L{_run})
        except Exception as e:  # a failed attempt, retried after the back-off like the others
            return None, f"the token callback failed: {e!r}", None
        self._token = token
        facts = token_facts(token, self.channel)
        if self._positions is None:
            # A write-only socket reads nothing: no channel of it can have a gap.
            self._positions = Positions(() if facts.mode == "w" else facts.channels,
                                        self._initial)
        self.read_only = facts.mode == "r"
        url = socket_url(self.url, self.channel, self._positions.resume(), self._history)
        open_socket = _socket_opener()

        closed: asyncio.Future[tuple[int | None, str, int | None]]
        closed = self._socket_closed = asyncio.get_running_loop().create_future()
        try:
            self._connecting = await open_socket(
                url, offered_protocols(token), self, ssl=self._ssl,
                ping_interval=self._ping_interval, open_timeout=self._open_timeout)
        except (TimeoutError, OSError) as e:
            return None, f"cannot connect: {e}", None
        try:
            return await closed
        finally:
            self._connecting = None

    async def _fresh_token(self) -> str:
        source = self._token_source
        if isinstance(source, str):
            return source
        value = source()
        token = await value if inspect.isawaitable(value) else value
        if not isinstance(token, str) or not token:
            raise _NotAToken(f"the token callback returned {_kind_of(token)}, not a JWT "
                             "(a non-empty str)")
        return token

    def _end_with(self, error: ClientError) -> None:
        """Stop for C{error}, from outside the runner: it ends its attempt or its back-off."""
        self._stop(error)
        if self._wake is not None:
            self._wake.set()
        self._hang_up()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _stop(self, error: ClientError | None) -> None:
        self._error = error
        self._closing = True
        self._cancel_refresh()
        if self._first_open is not None and not self._first_open.done():
            self._first_open.set_exception(error or ClientClosed(None, "the client is closed"))
            self._first_open.exception()  # retrieved: open() may never be awaited
        self._items.put_nowait(_END)

    # -- what the socket tells (L{pgws._client_socket.Sink}) ----------------------------------------

    def opened(self, socket: ClientSocket) -> None:
        assert self._positions is not None
        if self._closing:  # close() came during the handshake
            socket.sendClose(1000)
            return
        self._socket = socket
        if self._paused:  # the application is still behind: this socket waits too
            socket.pause_reading()
        self._attempts += 1
        self._opened_at = time.monotonic()
        self._event(Connected(self._attempts, public_url(socket.factory.url)))
        for gap in self._positions.opened(bool(self._history), reconnect=self._attempts > 1):
            self._deliver(gap)
        while self._outgoing:
            socket.sendMessage(self._outgoing.popleft().encode("utf-8"), isBinary=False)
        self._schedule_refresh()
        if self._first_open is not None and not self._first_open.done():
            self._first_open.set_result(None)

    def received(self, payload: bytes, binary: bool) -> None:
        assert self._positions is not None
        if not binary:
            for item in self._positions.text(payload.decode("utf-8")):
                self._deliver(item)
            return
        control = parse_control(payload)
        data = control.data
        if control.kind == "position":
            self._positions.position(data["channel"], data["seq"])
        elif control.kind == "stream":
            stream, gap = self._positions.stream(data)
            self._event(stream)
            if gap is not None:
                self._deliver(gap)
        elif control.kind == "gap":
            self._deliver(self._positions.server_gap(data))
        elif control.kind == "refreshed":
            answer = self._refresh_answer
            if answer is not None and not answer.done():
                answer.set_result(data)
        else:
            self._event(ServerEvent(data))

    def closed(self, code: int | None, reason: str, status: int | None) -> None:
        self._socket = None
        self._cancel_refresh()
        if self._refresh_answer is not None and not self._refresh_answer.done():
            self._refresh_answer.cancel()
        if self._socket_closed is not None and not self._socket_closed.done():
            self._socket_closed.set_result((code, reason, status))

    def _deliver(self, item: Message | Gap) -> None:
        if isinstance(item, Gap):
            self._event(item)
        self._items.put_nowait(item)
        if not self._paused and self._items.qsize() >= self._max_buffered and self._socket:
            self._paused = True
            self._socket.pause_reading()

    def _event(self, event: Event) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            _log.exception("the on_event callback failed on %s", type(event).__name__)

    # -- token refresh --------------------------------------------------------------------------------

    def _schedule_refresh(self) -> None:
        self._cancel_refresh()
        if isinstance(self._token_source, str) or self._token is None:
            return
        delay = refresh_delay(token_facts(self._token).exp, time.time(), self._refresh_ahead)
        if delay is not None:
            self._refresh_timer = asyncio.get_running_loop().call_later(delay, self._refresh_now)

    def _cancel_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None

    def _refresh_now(self) -> None:
        self._refresh_timer = None
        task = asyncio.get_running_loop().create_task(self._refresh(self._socket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, socket: ClientSocket | None) -> None:
        """Ask for a new token in place; a refusal leaves the old one to expire (3001, reconnect)."""
        if socket is None:
            return
        before = token_facts(self._token).exp if self._token is not None else None
        try:
            token = await self._fresh_token()
        except _NotAToken as e:  # a programming error: the client ends
            self._end_with(e)
            return
        except Exception as e:
            self._event(RefreshFailed(f"the token callback failed: {e!r}"))
            return
        if self._socket is not socket:
            return  # closed meanwhile: the next connection asks the callback again
        answer = self._refresh_answer = asyncio.get_running_loop().create_future()
        socket.sendMessage(refresh_request(token), isBinary=True)
        try:
            reply = await answer
        except asyncio.CancelledError:
            return  # the socket closed before the answer
        if reply.get("refreshed") is True:
            self._token = token
            exp = reply.get("exp")
            self._event(Refreshed(float(exp) if isinstance(exp, (int, float)) else None))
            after = token_facts(token).exp
            if after is not None and before is not None and after <= before:
                # A cached token, say: asking again before it expires would only get it again,
                # sooner and sooner.  At its exp comes a 3001, and the reconnect asks again.
                self._event(RefreshFailed(
                    "the token callback gave a token that expires no later than the last one; "
                    "not asking again before it expires"))
            elif self._socket is socket:
                self._schedule_refresh()
        else:
            self._event(RefreshFailed(str(reply.get("reason", "refused"))))
