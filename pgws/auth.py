"""
A request path and its token -> a L{Grant} (channels, mode, claims), or a L{Refusal} with a reason.

Pure functions of their inputs and an injected clock: nothing here knows about Twisted or sockets.

Rules (the wire protocol of pgws; see the README):
  - Paths are C{/<channel>/<jwt>} or C{/<jwt>}; the channel segment is percent-decoded (UTF-8);
    a query string is ignored.
  - Tokens are HS256/HS384/HS512 signed with the configured secret; C{exp} and C{nbf} are enforced
    when present.  Any problem with the token itself is a 401.
  - C{mode} must be C{r}, C{w} or C{rw}.  A string C{channel} claim replaces the URL's channel.
    A C{channels} list limits the connection to those channels; with no channel requested it
    grants all of them.  A token with neither claim opens the requested channel, and is refused
    when no channel is requested.  A valid token that does not allow the request is a 403.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import jwt

from pgws.channelname import ChannelNameError, check_channel_name, show_channel

__all__ = ["Grant", "Refusal", "TokenVerifier", "split_path", "authorize", "HMAC_ALGORITHMS"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# The longest token we try to parse; a bigger one is refused before any base64 or JSON work.
MAX_TOKEN_BYTES = 16 * 1024
MODES = ("r", "w", "rw")


class Refusal(Exception):
    """An HTTP status and a one-line reason for refusing a WebSocket handshake."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@dataclass(frozen=True)
class Grant:
    """What one accepted connection may do."""

    channels: tuple[str, ...]
    mode: str
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def can_read(self) -> bool:
        return "r" in self.mode

    @property
    def can_write(self) -> bool:
        return "w" in self.mode


def split_path(path: str) -> tuple[str | None, str]:
    """
    C{/<channel>/<jwt>} or C{/<jwt>} -> (channel or None, token).

    The path is the raw request path (as Autobahn gives it: not percent-decoded).
    """
    path = path.split("?", 1)[0]
    if not path.startswith("/"):
        raise Refusal(400, "the path must be /<channel>/<jwt> or /<jwt>")
    parts = path[1:].split("/")
    if len(parts) == 1:
        channel_raw, token = None, parts[0]
    elif len(parts) == 2:
        channel_raw, token = parts
    else:
        raise Refusal(400, "the path must be /<channel>/<jwt> or /<jwt>")
    if not token:
        raise Refusal(401, "no JWT in the request")
    channel: str | None = None
    if channel_raw is not None:
        try:
            channel = unquote_to_bytes(channel_raw).decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal(403, "the channel in the path is not valid UTF-8") from None
    return channel, token


class TokenVerifier:
    """
    Checks a token's signature with the configured HMAC secret, then its time claims against an
    injected clock (so expiry is testable without sleeping).
    """

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    @classmethod
    def from_config(cls, config: Any, reactor: Any = None, clock: Callable[[], float] = time.time,
                    https_policy: Any = None) -> TokenVerifier:
        """The verifier the configuration asks for (the keys, audience, issuer and leeway)."""
        assert config.jwt_secret is not None
        return cls(config.jwt_secret, clock=clock)

    def __repr__(self) -> str:
        return "<TokenVerifier>"

    async def claims(self, token: str) -> dict[str, Any]:
        """The verified claims, or a 401 L{Refusal}."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Refusal(401, f"JWT is longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refusal(401, "JWT is malformed") from None
        alg = header.get("alg")
        if alg not in HMAC_ALGORITHMS:
            raise Refusal(401, f"JWT algorithm {show_channel(str(alg))} is not accepted; "
                               f"use one of {', '.join(HMAC_ALGORITHMS)}")
        try:
            with warnings.catch_warnings():
                # A short secret is reported once at start-up, not on every handshake.
                warnings.simplefilter("ignore")
                claims = jwt.decode(
                    token,
                    self._secret,
                    algorithms=list(HMAC_ALGORITHMS),
                    options={
                        "verify_exp": False,  # checked below against the injected clock
                        "verify_nbf": False,
                        "verify_iat": False,  # the original never checked iat
                        "verify_aud": False,  # audiences are not configured (yet)
                        "verify_iss": False,
                    },
                )
        except jwt.InvalidSignatureError:
            raise Refusal(401, "JWT signature is invalid") from None
        except jwt.PyJWTError:
            raise Refusal(401, "JWT is malformed") from None
        if not isinstance(claims, dict):
            raise Refusal(401, "JWT payload is not a JSON object")
        self._check_times(claims)
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        for name in ("exp", "nbf"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Refusal(401, f"JWT claim {name} must be a number")
        if "exp" in claims and now >= claims["exp"]:
            raise Refusal(401, "JWT expired")
        if "nbf" in claims and now < claims["nbf"]:
            raise Refusal(401, "JWT not yet valid")


def authorize(claims: Mapping[str, Any], requested: str | None) -> Grant:
    """Decide, from verified claims and the URL's channel, what the connection may do (or 403)."""
    mode = claims.get("mode")
    if "mode" not in claims:
        raise Refusal(403, 'JWT claim "mode" is missing; it must be "r", "w" or "rw"')
    if not isinstance(mode, str) or mode not in MODES:
        raise Refusal(403, 'JWT claim "mode" must be "r", "w" or "rw"')

    allowed: list[str] | None = None
    if "channels" in claims:
        value = claims["channels"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise Refusal(403, 'JWT claim "channels" must be a list of strings')
        allowed = value
    if "channel" in claims:
        if not isinstance(claims["channel"], str):
            raise Refusal(403, 'JWT claim "channel" must be a string')
        # The seed: a channel claim takes precedence over the channel in the URL.
        requested = claims["channel"]

    if requested is not None:
        if allowed is not None and requested not in allowed:
            raise Refusal(403, f"channel {show_channel(requested)} is not allowed by this token")
        channels = [requested]
    elif allowed is not None:
        if not allowed:
            raise Refusal(403, 'JWT claim "channels" is empty')
        channels = list(dict.fromkeys(allowed))  # keep order, drop repeats
    else:
        raise Refusal(403, "no channel: request one in the path or put one in the token")

    for name in channels:
        try:
            check_channel_name(name)
        except ChannelNameError as e:
            raise Refusal(403, str(e)) from None
    return Grant(channels=tuple(channels), mode=mode, claims=dict(claims))
