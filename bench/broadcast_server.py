"""
The stack ceiling: a minimal Twisted + Autobahn WebSocket server, with no database and no
authentication, that broadcasts to every connected client as fast as it can.

    python bench/broadcast_server.py [--port 0] [--control-port 0]

prints `ws PORT control PORT` on standard output once both ports listen.  The control port takes
one-line commands:

    count                                   -> the number of open WebSockets
    go T_BEGIN T_END PAYLOAD_SIZE [RATE]    -> "started"; from T_BEGIN to T_END (Unix times) it
                                               broadcasts (as fast as it can, or RATE messages
                                               a second), then answers "done MESSAGES"
    quit                                    -> stops the reactor

Broadcasting works like pgws's fan-out path, minus PostgreSQL: each message (the send time,
a sequence number and padding, the same payload as the benchmark's producer) becomes one
unmasked text frame, built once and written to every open socket's transport.  Each reactor turn
writes at most 20,000 frames (pgws's slice, DELIVERIES_PER_SLICE) before yielding so that the
reactor can flush sockets and take new connections.  While any socket has more than 256 KiB
waiting, the broadcast waits a millisecond instead (the readers are the limit then), so memory
stays bounded; pgws instead cuts such a reader off at 1 MiB.
"""

from __future__ import annotations

import argparse
import resource
import struct
import sys
import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.protocols.basic import LineReceiver

SLICE = 20_000
HIGH_WATER = 256 * 1024

clients: set[BroadcastProtocol] = set()


class BroadcastProtocol(WebSocketServerProtocol):
    def onOpen(self) -> None:
        clients.add(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        clients.discard(self)


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    return struct.pack("!BBH", 0x81, 126, n) + payload


def pending(transport) -> int:
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


class Broadcast:
    def __init__(self, t_begin: float, t_end: float, size: int, done, rate: float = 0) -> None:
        self.t_end = t_end
        self.size = size
        self.done = done
        self.seq = 0
        self.rate = rate
        self.next = t_begin
        reactor.callLater(max(0.0, t_begin - time.time()),
                          self.paced if rate else self.step)

    def frame(self) -> bytes:
        head = f"{time.time():.6f} {self.seq:010d} "
        self.seq += 1
        return text_frame((head + "x" * (self.size - len(head))).encode("ascii"))

    def paced(self) -> None:
        """One message to every socket at each tick of a fixed schedule (the paced baseline)."""
        now = time.time()
        if now >= self.t_end:
            self.done(self.seq)
            return
        budget = SLICE
        while now >= self.next and budget > 0:  # when late, catch up in one turn (as pgws does)
            frame = self.frame()
            for c in list(clients):
                t = c.transport
                if c.state == c.STATE_OPEN and t is not None:  # an open one has its transport
                    t.write(frame)
                    budget -= 1
            self.next += 1.0 / self.rate
            budget -= 1
        reactor.callLater(max(0.0, self.next - time.time()), self.paced)

    def step(self) -> None:
        if time.time() >= self.t_end:
            self.done(self.seq)
            return
        transports = [c.transport for c in clients
                      if c.state == c.STATE_OPEN and c.transport is not None]
        if not transports:
            reactor.callLater(0.001, self.step)
            return
        if max(pending(t) for t in transports) > HIGH_WATER:
            reactor.callLater(0.001, self.step)
            return
        for _ in range(max(1, SLICE // len(transports))):
            frame = self.frame()
            for t in transports:
                t.write(frame)
        reactor.callLater(0, self.step)


class Control(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        words = line.decode().split()
        if not words:
            return
        if words[0] == "count":
            self.sendLine(str(sum(1 for c in clients if c.state == c.STATE_OPEN)).encode())
        elif words[0] == "go":
            t_begin, t_end, size = float(words[1]), float(words[2]), int(words[3])
            rate = float(words[4]) if len(words) > 4 else 0.0
            Broadcast(t_begin, t_end, size, lambda n: self.sendLine(f"done {n}".encode()), rate)
            self.sendLine(b"started")
        elif words[0] == "quit":
            self.sendLine(b"bye")
            reactor.callLater(0.1, reactor.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    factory = WebSocketServerFactory(server="bench")
    factory.protocol = BroadcastProtocol
    ws = reactor.listenTCP(args.port, factory, interface="127.0.0.1")
    # What ServerFactory.forProtocol(Control) does, but typed as the ServerFactory listenTCP
    # wants (forProtocol is annotated as returning a plain Factory).
    control_factory = protocol.ServerFactory()
    control_factory.protocol = Control
    control = reactor.listenTCP(args.control_port, control_factory, interface="127.0.0.1")
    ws_host, control_host = ws.getHost(), control.getHost()
    assert isinstance(ws_host, IPv4Address) and isinstance(control_host, IPv4Address)
    print(f"ws {ws_host.port} control {control_host.port}", flush=True)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
