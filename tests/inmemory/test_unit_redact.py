"""What the logs hide (anything shaped like a token) and what they keep (host names, dotted
channel names, addresses), checked on the function every log line of a path or reason goes through."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from pgws._redact import redact, redact_path


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


REAL = jwt.encode({"mode": "rw", "channel": "chat"}, "a secret of thirty-two bytes, yes")
UNSIGNED = b64(json.dumps({"alg": "none"}).encode()) + "." + b64(b'{"mode":"r"}') + "."
SPACED = b64(b'{ "alg": "none" }') + "." + b64(b"{}") + "."


@pytest.mark.parametrize("secret", [
    REAL, REAL[:40], REAL.split(".")[2], UNSIGNED, SPACED, "x" * 32,
    REAL.replace(".", "%2E"),
])
def test_token_shapes_are_hidden(secret):
    line = f'refused WebSocket: 401 for "/chat/{secret}" from 127.0.0.1'
    shown = redact(line)
    assert secret not in shown
    assert "<token>" in shown
    assert shown.startswith("refused WebSocket: 401 for \"/chat/")


@pytest.mark.parametrize("text", [
    'origin "https://evil.example.com" is not allowed',
    'channel "orders.eu.west" is not allowed by this token',
    "tcp4:127.0.0.1:40000",
    "pgws 0.1.0 on twisted 26.10.0",
])
def test_host_names_and_dotted_names_are_kept(text):
    assert redact(text) == text


def test_a_path_loses_its_query_and_keeps_its_channel():
    assert redact_path(f"/orders.eu.west/{REAL}?resume=x") == "/orders.eu.west/<token>"
