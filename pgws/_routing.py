"""
How a pgws channel maps onto PostgreSQL channels: one interface, two implementations.

L{PerChannelRouting} (the default, as postgrest-ws did it): a client channel is a database channel.
Client messages are notified on their channel, readers of C{chat} make pgws C{LISTEN "chat"},
and a notification reaches the readers of the channel it was sent on.  Pick it when the database
side wants plain C{NOTIFY chat, '...'} and when channels are many: PostgreSQL only wakes pgws for
channels someone reads.

L{ListenChannelRouting} (C{listen-channel}, as postgres-websockets 0.12 does it): everything goes
through one database channel.  A client message becomes C{pg_notify(<listen-channel>, envelope)}
with the envelope's C{channel} field naming the client channel; pgws LISTENs only to the listen
channel, and a notification there whose text is a JSON object with a string C{channel} field is
delivered, whole, to the readers of that channel (anything else goes to readers of the channel
named like the listen channel).  Pick it to switch from postgres-websockets without touching the
database side, or when database code wants one channel to watch.
"""

from __future__ import annotations

import json
from typing import Protocol

__all__ = ["Routing", "PerChannelRouting", "ListenChannelRouting"]


class Routing(Protocol):
    def db_channel(self, channel: str) -> str:
        """The database channel to LISTEN to for readers of C{channel}, and to notify on."""

    def route(self, db_channel: str, payload: str) -> str:
        """The channel whose readers get a notification that arrived on C{db_channel}."""


class PerChannelRouting:
    def db_channel(self, channel: str) -> str:
        return channel

    def route(self, db_channel: str, payload: str) -> str:
        return db_channel


class ListenChannelRouting:
    def __init__(self, listen_channel: str) -> None:
        self.listen_channel = listen_channel

    def db_channel(self, channel: str) -> str:
        return self.listen_channel

    def route(self, db_channel: str, payload: str) -> str:
        if payload[:1] == "{":
            try:
                value = json.loads(payload)
            except (ValueError, RecursionError):  # [[[[... nested past the parser's depth
                return db_channel
            if isinstance(value, dict):
                channel = value.get("channel")
                if isinstance(channel, str):
                    return channel
        return db_channel
