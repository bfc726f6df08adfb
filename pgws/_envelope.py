"""
The JSON envelope a client message becomes on its way to PostgreSQL.

    {"event": "WebsocketMessage", "channel": <channel>, "payload": <the message text>,
     "claims": {<every claim of the token>, "message_delivered_at": <unix time, float>}}

The claims part is encoded once per connection; per message only the payload and the time are
encoded, and the result is checked against PostgreSQL's NOTIFY payload limit before it is queued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["EnvelopeEncoder", "NOTIFY_PAYLOAD_LIMIT"]

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more ("payload string too long").
NOTIFY_PAYLOAD_LIMIT = 7999

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class EnvelopeEncoder:
    """Builds the envelopes of one connection; the claims are serialised once."""

    def __init__(self, claims: Mapping[str, Any], event: str = "WebsocketMessage") -> None:
        body = {k: v for k, v in claims.items() if k != "message_delivered_at"}
        encoded = _dumps(body)
        # '{"mode":"rw"}' -> '{"mode":"rw",' ready for the time to be appended.
        self._claims_prefix = encoded[:-1] + ("," if body else "")
        self._event = _dumps(event)

    def encode(self, channel: str, payload: str, delivered_at: float) -> str:
        return (
            f'{{"event":{self._event},"channel":{_dumps(channel)},"payload":{_dumps(payload)},'
            f'"claims":{self._claims_prefix}"message_delivered_at":{delivered_at!r}}}}}'
        )


def envelope_size(envelope: str) -> int:
    """Bytes PostgreSQL will count against the NOTIFY limit (the database encoding is UTF-8)."""
    return len(envelope.encode("utf-8"))
