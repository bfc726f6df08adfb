"""
A request path and its token -> a L{Grant} (channels, mode, claims), or a L{Refusal} with a reason.

Functions of their inputs and an injected clock, and L{Authorizer}, which applies them all; the
keys come from L{pgws._keys}, which may fetch them, so checking a token is asynchronous.  Nothing
here knows about sockets.

Rules (the wire protocol of pgws; see the README):
  - Paths are C{/<channel>/<jwt>} or C{/<jwt>}; the channel segment is percent-decoded (UTF-8);
    a query string is ignored.
  - Tokens are checked with the configured keys: a plain HMAC secret (HS256/HS384/HS512), a JWK or
    a JWKS, and/or a JWKS fetched from a URL (L{pgws._keys}; the kid rules are on L{TokenVerifier}).
    C{exp} and C{nbf} are enforced when present, with the configured leeway; C{aud} and C{iss}
    only when they are configured.  Any problem with the token itself, or with getting its keys,
    is a 401.
  - C{mode} must be C{r}, C{w} or C{rw}.  A string C{channel} claim replaces the URL's channel.
    A C{channels} list limits the connection to those channels; with no channel requested it
    grants all of them.  A token with neither claim opens the requested channel, and is refused
    when no channel is requested.  A valid token that does not allow the request is a 403.
  - A socket may have at most C{max-channels} channels.  The meta channel (C{meta-channel}) opens
    only with a token that names it in C{channel} or C{channels}.  Both are 403s.
  - A token refresh on an open socket must grant the same channels and mode (L{check_refresh}).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from pgws._channelname import ChannelNameError, check_channel_name, show_channel
from pgws._config import ConfigError, decode_secret
from pgws._keys import (
    HMAC_ALGORITHMS,
    Key,
    KeySet,
    KeySetError,
    KeySource,
    KeysUnavailable,
    RemoteKeys,
    local_keys,
)
from pgws._reactor import default_reactor

__all__ = ["HMAC_ALGORITHMS", "Authorizer", "Grant", "Refusal", "TokenVerifier", "authorize",
           "check_refresh", "split_path"]

# The longest token we try to parse; a bigger one is refused before any base64 or JSON work.
# Its claims travel in every envelope, which must stay under PostgreSQL's 8000-byte NOTIFY limit,
# so a longer token could never write anyway.
MAX_TOKEN_BYTES = 8 * 1024
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
    Checks a token's signature with the configured keys (see L{pgws._keys} for where they come from),
    then its time claims against an injected clock (so expiry is testable without sleeping), then
    the audience and issuer when they are configured.

    Which key checks a token (the kid rules):
      - The local keys (C{jwt-secret}) and the fetched ones (C{jwt-jwks-url}) form one key set; a
        kid is looked up in the local keys first, then in the fetched set.
      - A token with a kid uses the keys with that kid.  When the fetched set lacks it, the set is
        re-fetched (at most once per 30 s) and looked up again.  Otherwise, if the whole key set is
        one key without a kid (e.g. a plain HMAC secret), that key is used: the token's kid is ignored.
        Otherwise: 401 C{JWT kid "x" is not in the key set}.
      - A token without a kid uses the plain HMAC secret when there is one, else the only key of
        the key set; with more keys: 401 C{JWT has no kid; the key set needs one}.
      - The token's C{alg} must be one of the chosen key's algorithms, else a 401 that names them.
    """

    def __init__(
        self,
        keys: bytes | KeySource | None,
        clock: Callable[[], float] = time.time,
        *,
        remote: RemoteKeys | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0,
    ) -> None:
        if isinstance(keys, (bytes, bytearray)):
            keys = local_keys(bytes(keys), clock=clock)
        if keys is None and remote is None:
            raise ValueError("a TokenVerifier needs keys: a secret, a key set or a JWKS URL")
        self._local = keys
        self._remote = remote
        self._clock = clock
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    @classmethod
    def from_config(cls, config: Any, reactor: Any = None, clock: Callable[[], float] = time.time,
                    https_policy: Any = None, remote: RemoteKeys | None = None) -> TokenVerifier:
        """
        The verifier the configuration asks for (the keys, audience, issuer and leeway).  Keys that
        cannot be used are a L{ConfigError} naming C{jwt-secret}.

        @param remote: the fetched keys of the verifier this one replaces (a reload): kept, with
            their cache, when C{jwt-jwks-url} is the same.
        """
        local: KeySource | None = None
        if config.jwt_secret is not None:

            def decode(text: str) -> bytes:  # a key file's new text, read as the config reads it
                try:
                    return decode_secret(text, config.secret_is_base64)
                except ConfigError as e:
                    raise KeySetError(str(e)) from None

            try:
                local = local_keys(config.jwt_secret, path=config.jwt_secret_file, clock=clock,
                                   decode=decode)
            except KeySetError as e:
                raise ConfigError(f'"jwt-secret": {e}') from None
        if remote is not None and remote.url != config.jwt_jwks_url:
            remote = None
        if config.jwt_jwks_url and remote is None:
            try:
                remote = RemoteKeys(config.jwt_jwks_url, default_reactor(reactor), clock=clock,
                                    https_policy=https_policy)
            except KeySetError as e:
                raise ConfigError(f'"jwt-jwks-url": {e}') from None
        return cls(local, clock, remote=remote, audience=config.jwt_aud, issuer=config.jwt_iss,
                   leeway=config.jwt_leeway)

    def __repr__(self) -> str:
        return "<TokenVerifier>"

    @property
    def remote(self) -> RemoteKeys | None:
        return self._remote

    async def claims(self, token: str) -> dict[str, Any]:
        """The verified claims, or a 401 L{Refusal}."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Refusal(401, f"JWT is longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refusal(401, "JWT is malformed") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):  # pyjwt refuses these already
            raise Refusal(401, "JWT is malformed")
        candidates = await self._keys_for(kid)
        usable = [key for key in candidates if alg in key.verifiers]
        if not usable:
            accepted = dict.fromkeys(a for key in candidates for a in key.algorithms)
            raise Refusal(401, f"JWT algorithm {show_channel(str(alg))} is not accepted; "
                               f"use one of {', '.join(accepted)}")
        claims = self._decode(token, str(alg), usable)
        self._check_times(claims)
        self._check_audience_and_issuer(claims)
        return claims

    async def _keys_for(self, kid: str | None) -> list[Key]:
        """The keys the token's kid selects (the rules in the class docstring), or a 401."""
        local = self._local.current() if self._local is not None else None
        if kid is None:
            if local is not None and local.plain is not None:
                return [local.plain]
            fetched = (await self._remote_keys()).keys if self._remote is not None else ()
            every = [*(local.keys if local is not None else ()), *fetched]
            if len(every) == 1:
                return every
            raise Refusal(401, "JWT has no kid; the key set needs one")
        found = local.find(kid) if local is not None else []
        if not found and self._remote is not None:
            found = (await self._remote_keys()).find(kid)
            if not found:
                found = (await self._remote_keys(unknown_kid=True)).find(kid)
        if found:
            return found
        cached = self._remote.cached if self._remote is not None else None
        every = [*(local.keys if local is not None else ()), *(cached.keys if cached is not None else ())]
        if len(every) == 1 and every[0].kid is None:
            return every
        raise Refusal(401, f"JWT kid {show_channel(kid)} is not in the key set")

    async def _remote_keys(self, unknown_kid: bool = False) -> KeySet:
        assert self._remote is not None
        try:
            if unknown_kid:
                return await self._remote.keys_for_unknown_kid()
            return await self._remote.keys()
        except KeysUnavailable as e:
            raise Refusal(401, f"JWT keys are not available: {e}") from None

    def _decode(self, token: str, alg: str, keys: list[Key]) -> dict[str, Any]:
        """Signature check by pyjwt, with each key bound to the one algorithm it is used with."""
        for index, key in enumerate(keys):
            try:
                with warnings.catch_warnings():
                    # A short key is reported once when it is loaded, not on every handshake.
                    warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                    claims = jwt.decode(
                        token,
                        key.verifiers[alg],
                        algorithms=[alg],
                        options={
                            "verify_exp": False,  # checked below against the injected clock
                            "verify_nbf": False,
                            "verify_iat": False,  # the original never checked iat
                            "verify_aud": False,  # checked below, only when configured
                            "verify_iss": False,
                            "verify_sub": False,  # claims pgws does not use are not judged
                            "verify_jti": False,
                        },
                    )
            except jwt.InvalidSignatureError:
                if index + 1 < len(keys):
                    continue  # two keys share this kid: try the next one
                raise Refusal(401, "JWT signature is invalid") from None
            except jwt.PyJWTError:
                raise Refusal(401, "JWT is malformed") from None
            if not isinstance(claims, dict):
                raise Refusal(401, "JWT payload is not a JSON object")
            return claims
        raise AssertionError("no key to decode with")  # the caller passes at least one

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        for name in ("exp", "nbf"):
            value = claims.get(name)
            # NaN and Infinity parse as JSON numbers in Python: a NaN exp would never expire.
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or (isinstance(value, float) and not math.isfinite(value))):
                raise Refusal(401, f"JWT claim {name} must be a number")
        if "exp" in claims and now >= claims["exp"] + self._leeway:
            raise Refusal(401, "JWT expired")
        if "nbf" in claims and now < claims["nbf"] - self._leeway:
            raise Refusal(401, "JWT not yet valid")

    def _check_audience_and_issuer(self, claims: Mapping[str, Any]) -> None:
        if self._audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if self._audience not in [a for a in audiences if isinstance(a, str)]:
                raise Refusal(401, "JWT audience is not accepted")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise Refusal(401, "JWT issuer is not accepted")


def _check_values(value: Any, depth: int = 0) -> None:
    """
    Every claim must survive the envelope (strict JSON, UTF-8): Python's JSON reader takes
    NaN, Infinity and 1e400 (a float infinity) and lone surrogates (\\ud800), which would make
    envelopes that are not JSON or cannot be sent at all.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refusal(401, "JWT payload has a number that is not finite")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refusal(401, "JWT payload has text that is not valid Unicode") from None
    elif depth > 64:
        raise Refusal(401, "JWT payload is nested too deeply")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, depth + 1)
            _check_values(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1)


def authorize(claims: Mapping[str, Any], requested: str | None, *, max_channels: int | None = None,
              meta_channel: str | None = None) -> Grant:
    """
    Decide, from verified claims and the URL's channel, what the connection may do (or 403).

    @param max_channels: the most channels one socket may have (C{max-channels}).
    @param meta_channel: the meta channel, which only a token that names it may open.
    """
    mode = _mode(claims)
    channels = _channels(claims, requested)
    for name in channels:
        try:
            check_channel_name(name)
        except ChannelNameError as e:
            raise Refusal(403, str(e)) from None
    if max_channels is not None and len(channels) > max_channels:
        raise Refusal(403, f"the token grants {len(channels)} channels; the limit is "
                           f"{max_channels}")
    if meta_channel is not None and meta_channel in channels and not _names(claims, meta_channel):
        raise Refusal(403, f"channel {show_channel(meta_channel)} is the meta channel; only a "
                           "token that names it may open it")
    return Grant(channels=tuple(channels), mode=mode, claims=dict(claims))


def _mode(claims: Mapping[str, Any]) -> str:
    if "mode" not in claims:
        raise Refusal(403, 'JWT claim "mode" is missing; it must be "r", "w" or "rw"')
    mode = claims["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise Refusal(403, 'JWT claim "mode" must be "r", "w" or "rw"')
    return mode


def _channels(claims: Mapping[str, Any], requested: str | None) -> list[str]:
    """The channels of the connection: the URL's, or the token's C{channel} / C{channels}."""
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
        return [requested]
    if allowed is None:
        raise Refusal(403, "no channel: request one in the path or put one in the token")
    if not allowed:
        raise Refusal(403, 'JWT claim "channels" is empty')
    return list(dict.fromkeys(allowed))  # keep order, drop repeats


def _names(claims: Mapping[str, Any], channel: str) -> bool:
    """Does the token name C{channel} itself (not merely accept it from the URL)?"""
    return claims.get("channel") == channel or channel in (claims.get("channels") or ())


def check_refresh(old: Grant, new: Grant) -> None:
    """
    A refreshed token replaces the old one only if it grants the same channels and mode: a
    refresh never widens a socket (nor narrows it, which would need a new subscription).
    """
    widened = set(new.channels) - set(old.channels)
    if widened:
        raise Refusal(403, f"the new token would add channel {show_channel(sorted(widened)[0])}")
    if not set(new.mode) <= set(old.mode):
        raise Refusal(403, f'the new token\'s mode "{new.mode}" is wider than "{old.mode}"')
    if set(new.channels) != set(old.channels) or new.mode != old.mode:
        raise Refusal(403, "the new token must grant the same channels and mode")


class Authorizer:
    """
    Every rule of who may open what, in one place: the token's signature and times (the
    L{TokenVerifier}), its claims against the request (L{authorize}), the server's limits, and
    what a refresh may change (L{check_refresh}).
    """

    def __init__(self, verifier: TokenVerifier, max_channels: int,
                 meta_channel: str | None = None) -> None:
        self._meta_channel = meta_channel
        self.use(verifier, max_channels)

    def use(self, verifier: TokenVerifier, max_channels: int) -> None:
        """
        Check what comes next with these (a reload): handshakes, and refreshes of sockets already
        open, since a refresh is a new token.
        """
        self.verifier = verifier
        self._max_channels = max_channels

    async def grant(self, requested: str | None, token: str) -> Grant:
        """What a handshake asking for C{requested} with C{token} may do, or a L{Refusal}."""
        claims = await self.verifier.claims(token)
        grant = authorize(claims, requested, max_channels=self._max_channels,
                          meta_channel=self._meta_channel)
        # After the rules on mode and channels, so that a channel claim that is no valid name
        # stays the 403 it always was; the rest of the claims go into every envelope.
        _check_values(claims)
        return grant

    async def refresh(self, old: Grant, requested: str | None, token: str) -> Grant:
        """
        The grant of a new token for an open socket, or a L{Refusal}.  It is resolved against the
        opening request (C{requested}), so that channel claims resolve the same way.
        """
        new = await self.grant(requested, token)
        check_refresh(old, new)
        return new
