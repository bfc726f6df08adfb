"""
Unit tests of L{pgws._auth}'s rules that need no network: L{authorize} (what verified claims and
the URL's channel grant, with the C{max-channels} and C{meta-channel} limits), L{check_refresh}
(a refresh never changes what a socket may do), and L{Authorizer}, which applies them after the
token's signature and times are checked against an injected clock.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from pgws._auth import Authorizer, Grant, Refusal, TokenVerifier, authorize, check_refresh

SECRET = b"unit-test-secret-of-32-bytes-ok!"
NOW = 1_800_000_000.0


def refusal(f: Any, *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(Refusal) as info:
        f(*args, **kwargs)
    return info.value.status, info.value.reason


def grant(channels: tuple[str, ...], mode: str) -> Grant:
    return Grant(channels=channels, mode=mode, claims={"mode": mode})


# -- authorize: max-channels ----------------------------------------------------------------------------


def test_more_channels_than_max_channels_is_refused_with_both_numbers():
    claims = {"mode": "r", "channels": ["a", "b", "c"]}
    assert refusal(authorize, claims, None, max_channels=2) == (
        403, "the token grants 3 channels; the limit is 2")


def test_exactly_max_channels_is_granted_in_the_token_s_order():
    claims = {"mode": "r", "channels": ["c", "a", "b"]}
    g = authorize(claims, None, max_channels=3)
    assert g.channels == ("c", "a", "b")
    assert g.mode == "r"


def test_a_repeated_channel_counts_once_against_max_channels():
    g = authorize({"mode": "r", "channels": ["a", "b", "a"]}, None, max_channels=2)
    assert g.channels == ("a", "b")


def test_a_requested_channel_is_one_channel_whatever_the_token_allows():
    g = authorize({"mode": "rw", "channels": ["a", "b", "c"]}, "b", max_channels=1)
    assert g.channels == ("b",)


def test_no_limit_without_max_channels():
    names = [f"c{n}" for n in range(200)]
    assert len(authorize({"mode": "r", "channels": names}, None).channels) == 200


# -- authorize: the meta channel ---------------------------------------------------------------------


def test_the_meta_channel_requested_in_the_path_alone_is_refused():
    assert refusal(authorize, {"mode": "r"}, "meta", meta_channel="meta") == (
        403, 'channel "meta" is the meta channel; only a token that names it may open it')


def test_the_meta_channel_opens_with_a_token_whose_channel_claim_names_it():
    g = authorize({"mode": "r", "channel": "meta"}, None, meta_channel="meta")
    assert g.channels == ("meta",)


def test_the_meta_channel_opens_with_a_token_whose_channels_claim_names_it():
    g = authorize({"mode": "r", "channels": ["meta", "a"]}, None, meta_channel="meta")
    assert g.channels == ("meta", "a")
    g = authorize({"mode": "r", "channels": ["a", "meta"]}, "meta", meta_channel="meta")
    assert g.channels == ("meta",)


def test_without_a_meta_channel_configured_the_name_is_an_ordinary_channel():
    assert authorize({"mode": "r"}, "meta").channels == ("meta",)


def test_other_channels_are_not_affected_by_the_meta_rule():
    assert authorize({"mode": "r"}, "room", meta_channel="meta").channels == ("room",)


def test_max_channels_is_checked_before_the_meta_rule():
    claims = {"mode": "r", "channels": ["meta", "a", "b"]}
    status, reason = refusal(authorize, claims, None, max_channels=2, meta_channel="meta")
    assert reason == "the token grants 3 channels; the limit is 2"


# -- authorize: the claims themselves --------------------------------------------------------------


@pytest.mark.parametrize("claims, requested, reason", [
    ({}, "a", 'JWT claim "mode" is missing; it must be "r", "w" or "rw"'),
    ({"mode": "x"}, "a", 'JWT claim "mode" must be "r", "w" or "rw"'),
    ({"mode": "r"}, None, "no channel: request one in the path or put one in the token"),
    ({"mode": "r", "channels": []}, None, 'JWT claim "channels" is empty'),
    ({"mode": "r", "channels": ["a"]}, "b", 'channel "b" is not allowed by this token'),
    ({"mode": "r", "channels": "a"}, None, 'JWT claim "channels" must be a list of strings'),
    ({"mode": "r", "channel": 1}, None, 'JWT claim "channel" must be a string'),
])
def test_claims_that_grant_nothing_are_refused_with_their_reason(claims, requested, reason):
    assert refusal(authorize, claims, requested) == (403, reason)


def test_a_channel_claim_replaces_the_channel_in_the_path():
    assert authorize({"mode": "w", "channel": "mine"}, "other").channels == ("mine",)


# -- check_refresh -----------------------------------------------------------------------------------


def test_a_refresh_with_the_same_channels_and_mode_is_accepted():
    check_refresh(grant(("a", "b"), "rw"), grant(("b", "a"), "rw"))  # no Refusal


def test_a_refresh_that_adds_a_channel_is_refused_naming_the_first_added():
    assert refusal(check_refresh, grant(("a",), "r"), grant(("a", "c", "b"), "r")) == (
        403, 'the new token would add channel "b"')


def test_a_refresh_with_a_wider_mode_is_refused_naming_both_modes():
    assert refusal(check_refresh, grant(("a",), "r"), grant(("a",), "rw")) == (
        403, 'the new token\'s mode "rw" is wider than "r"')


def test_a_refresh_that_narrows_the_channels_is_refused():
    assert refusal(check_refresh, grant(("a", "b"), "r"), grant(("a",), "r")) == (
        403, "the new token must grant the same channels and mode")


def test_a_refresh_that_narrows_the_mode_is_refused():
    assert refusal(check_refresh, grant(("a",), "rw"), grant(("a",), "r")) == (
        403, "the new token must grant the same channels and mode")


def test_an_added_channel_is_reported_before_a_wider_mode():
    assert refusal(check_refresh, grant(("a",), "r"), grant(("a", "b"), "rw"))[1] == (
        'the new token would add channel "b"')


# -- Authorizer ---------------------------------------------------------------------------------------


def token(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def outcome(coroutine: Any) -> Any:
    """The result of a coroutine that needs no reactor (local keys): a value or a Failure."""
    results: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert len(results) == 1, "the coroutine waited for something"
    return results[0]


def refused(coroutine: Any) -> tuple[int, str]:
    f = outcome(coroutine)
    assert isinstance(f, Failure) and isinstance(f.value, Refusal), f
    return f.value.status, f.value.reason


def authorizer(max_channels: int = 10, meta_channel: str | None = None) -> Authorizer:
    return Authorizer(TokenVerifier(SECRET, clock=lambda: NOW), max_channels, meta_channel)


def test_the_authorizer_grants_what_a_valid_token_allows():
    g = outcome(authorizer().grant("room", token({"mode": "rw", "exp": NOW + 60})))
    assert isinstance(g, Grant)
    assert (g.channels, g.mode) == (("room",), "rw")
    assert g.claims == {"mode": "rw", "exp": NOW + 60}


def test_the_authorizer_applies_its_max_channels():
    assert refused(authorizer(max_channels=1).grant(None, token({"mode": "r", "channels": ["a", "b"]}))) == (
        403, "the token grants 2 channels; the limit is 1")


def test_the_authorizer_applies_its_meta_channel():
    assert refused(authorizer(meta_channel="meta").grant("meta", token({"mode": "r"}))) == (
        403, 'channel "meta" is the meta channel; only a token that names it may open it')


def test_the_authorizer_refuses_an_expired_token_with_401():
    assert refused(authorizer().grant("room", token({"mode": "r", "exp": NOW}))) == (401, "JWT expired")


def test_a_refresh_is_resolved_against_the_opening_request_and_must_not_widen():
    a = authorizer()
    old = outcome(a.grant("room", token({"mode": "r", "channels": ["room", "hall"]})))
    assert old.channels == ("room",)
    # The new token allows both too; resolved against "room" it grants the same one channel.
    same = outcome(a.refresh(old, "room", token({"mode": "r", "channels": ["hall", "room"]})))
    assert isinstance(same, Grant) and same.channels == ("room",)
    assert refused(a.refresh(old, "room", token({"mode": "rw"}))) == (
        403, 'the new token\'s mode "rw" is wider than "r"')
