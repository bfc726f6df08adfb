"""
Unit tests of what pgws puts on the wire and in the database: RFC 6455 text frames
(L{pgws._frames}), close reasons (L{pgws._closing}), the JSON envelope of a client message
(L{pgws._envelope}) and how channels map onto database channels (L{pgws._routing}).
"""

from __future__ import annotations

import json
import struct

import pytest

from pgws._closing import MAX_REASON_BYTES, close_reason, plural
from pgws._envelope import EnvelopeEncoder, envelope_size
from pgws._frames import text_frame
from pgws._routing import ListenChannelRouting, PerChannelRouting

# -- text frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, header", [
    (0, b"\x81\x00"),
    (1, b"\x81\x01"),
    (125, b"\x81\x7d"),  # the largest 7-bit length
    (126, b"\x81\x7e\x00\x7e"),  # 16-bit length from here
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),  # 64-bit length from here
])
def test_text_frame_header_for_each_length_form(size, header):
    payload = b"p" * size
    frame = text_frame(payload)
    assert frame[:len(header)] == header
    assert frame[len(header):] == payload
    assert len(frame) == len(header) + size


def test_text_frame_is_final_unmasked_and_text():
    first, second = text_frame(b"hi")[:2]
    assert first & 0x80  # FIN
    assert first & 0x0F == 0x1  # text
    assert first & 0x70 == 0  # no RSV bits: no extension
    assert second & 0x80 == 0  # a server's frames are not masked


def test_text_frame_64_bit_length_is_big_endian():
    frame = text_frame(b"x" * 70_000)
    assert struct.unpack("!Q", frame[2:10]) == (70_000,)


# -- close reasons -------------------------------------------------------------------------------------


def test_a_reason_that_fits_is_kept_whole():
    text = "x" * MAX_REASON_BYTES
    assert MAX_REASON_BYTES == 123  # 125 bytes of close payload minus the 2-byte code
    assert close_reason(text) == text


def test_a_long_ascii_reason_is_cut_to_123_bytes_with_an_ellipsis():
    out = close_reason("x" * (MAX_REASON_BYTES + 1))
    assert out == "x" * 120 + "..."
    assert len(out.encode()) == 123


def test_a_reason_is_cut_on_a_character_boundary():
    # "a" then 3-byte characters: byte 120 falls inside the 40th "€".
    out = close_reason("a" + "€" * 50)
    assert out == "a" + "€" * 39 + "..."
    assert len(out.encode()) == 121
    out.encode("utf-8")  # valid UTF-8


def test_a_reason_of_two_byte_characters_cut_exactly_at_a_boundary():
    out = close_reason("é" * 100)
    assert out == "é" * 60 + "..."
    assert len(out.encode()) == 123


def test_a_short_text_of_wide_characters_is_measured_in_bytes():
    text = "€" * 41  # 123 bytes: fits
    assert close_reason(text) == text
    assert close_reason(text + "a") == "€" * 40 + "..."


def test_plural():
    assert [plural(n, "message") for n in (0, 1, 2)] == ["0 messages", "1 message", "2 messages"]


# -- envelopes -----------------------------------------------------------------------------------------


def test_envelope_holds_the_event_channel_payload_and_claims_with_the_delivery_time():
    encoder = EnvelopeEncoder({"mode": "rw", "sub": "ann"})
    text = encoder.encode("room", "hello", 1_800_000_000.5)
    assert json.loads(text) == {
        "event": "WebsocketMessage", "channel": "room", "payload": "hello",
        "claims": {"mode": "rw", "sub": "ann", "message_delivered_at": 1_800_000_000.5},
    }
    assert text == ('{"event":"WebsocketMessage","channel":"room","payload":"hello",'
                    '"claims":{"mode":"rw","sub":"ann","message_delivered_at":1800000000.5}}')


def test_envelope_replaces_a_message_delivered_at_claim_of_the_token():
    encoder = EnvelopeEncoder({"message_delivered_at": 1, "mode": "w"})
    text = encoder.encode("c", "p", 2.0)
    assert text.endswith('"claims":{"mode":"w","message_delivered_at":2.0}}')
    assert text.count("message_delivered_at") == 1


def test_envelope_of_empty_claims_is_valid_json():
    text = EnvelopeEncoder({}).encode("c", "p", 3.25)
    assert json.loads(text)["claims"] == {"message_delivered_at": 3.25}


def test_envelope_escapes_the_payload_and_leaves_unicode_unescaped():
    text = EnvelopeEncoder({}, event="ConnectionOpen").encode("é", 'say "hi"\n', 1.0)
    assert json.loads(text)["payload"] == 'say "hi"\n'
    assert json.loads(text)["event"] == "ConnectionOpen"
    assert '"channel":"é"' in text
    assert envelope_size(text) == len(text) + 1  # "é" is two bytes


# -- routing -------------------------------------------------------------------------------------------


def test_per_channel_routing_is_the_identity():
    routing = PerChannelRouting()
    assert routing.db_channel("room") == "room"
    assert routing.route("room", '{"channel": "other"}') == "room"


def test_listen_channel_routing_puts_every_channel_on_the_listen_channel():
    routing = ListenChannelRouting("pgws")
    assert routing.db_channel("room") == "pgws"
    assert routing.db_channel("hall") == "pgws"


@pytest.mark.parametrize("payload, target", [
    ('{"channel": "room", "payload": "x"}', "room"),
    ('{"channel": 5}', "pgws"),
    ('{"event": "x"}', "pgws"),
    ('{not json', "pgws"),
    ("[1]", "pgws"),
    (' {"channel": "room"}', "pgws"),  # only text that starts with "{" is looked into
    ("plain", "pgws"),
    ("", "pgws"),
])
def test_listen_channel_routing_routes_by_the_json_channel_field(payload, target):
    assert ListenChannelRouting("pgws").route("pgws", payload) == target
