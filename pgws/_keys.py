"""
Where the keys that check tokens come from: the C{jwt-secret} setting (a plain HMAC secret, a JWK
or a JWKS, possibly in a file that is re-read when it changes) and a JWKS fetched from
C{jwt-jwks-url}.  Which key a given token is checked with is decided in L{pgws._auth}.

Forms of C{jwt-secret} (after C{@path} and C{secret-is-base64}), told apart by content:
  - a JSON object with C{"keys"}: a JWKS;  a JSON object with C{"kty"}: a single JWK;
  - anything else: a plain HMAC secret, accepted with HS256, HS384 and HS512.  A PEM or SSH public
    key there is refused at start-up: it would be an HMAC secret anyone can read.

Each JWK is used only with its own algorithms, which blocks algorithm confusion:
  - its C{alg} when it has one (any JWS signing algorithm but C{none});
  - else from C{kty}/C{crv}: C{oct} -> HS256, HS384 and HS512; C{RSA} -> RS256 (PS256 needs
    C{"alg": "PS256"}); C{EC} P-256 -> ES256, P-384 -> ES384, P-521 -> ES512, secp256k1 -> ES256K;
    C{OKP} Ed25519 or Ed448 -> EdDSA.
  - In a JWKS, a key whose C{use} is set to anything but C{sig} is ignored; a key that cannot be
    used (unknown C{kty}, bad members) is skipped with a warning; a set left with no key is an
    error.  A single JWK that cannot be used is an error.  Private members of an asymmetric JWK
    (C{d}, C{p}, ...) are dropped with a warning: only the public key is needed.

A key set in a file (C{jwt-secret = "@path"}) is re-read when the file changes: on verification
(no timer), at most once a second by the injected clock, the file's mtime, size and inode are
compared with the last seen ones, and a changed file is read again (a small synchronous read).
A file that becomes unreadable, or no longer holds a usable JWK or JWKS, keeps the last good keys
and logs one warning (again only after a further change).  A file that held a plain HMAC secret at
start-up is not watched.

A fetched JWKS (L{RemoteKeys}) is fetched when a token first needs it, then cached for the
response's C{Cache-Control: max-age} (default 300 s, bounded to 30 s .. 1 day; C{no-cache} and
C{no-store} count as 0, so 30 s), re-fetched when a token names an unknown kid at most once per
30 s, and after a failed fetch not tried again for 10 s.  A failed fetch with a cached set keeps
that set (stale) and logs a warning; with none, tokens that need it are refused.  Concurrent
requests share one fetch.  The answer must be HTTP 200 with a JSON C{{"keys": [...]}} of at most
1 MiB within 10 s.

Nothing here logs or reports key material: messages name keys by C{kid} or position.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from jwt import PyJWK
from jwt.utils import is_pem_format, is_ssh_key
from twisted.internet import defer, error
from twisted.internet.protocol import Protocol as _TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http_headers import Headers

__all__ = [
    "HMAC_ALGORITHMS",
    "SIGNING_ALGORITHMS",
    "FileKeys",
    "Key",
    "KeySet",
    "KeySetError",
    "KeySource",
    "KeysUnavailable",
    "RemoteKeys",
    "StaticKeys",
    "cache_seconds",
    "local_keys",
    "parse_key_json",
    "parse_secret",
]

_log = Logger()

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
SIGNING_ALGORITHMS = HMAC_ALGORITHMS + (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES256K", "ES384", "ES512", "EdDSA",
)
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP_CURVES = {"Ed25519": "EdDSA", "Ed448": "EdDSA"}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")

FILE_CHECK_INTERVAL = 1.0  # seconds between two looks at a key file
DEFAULT_MAX_AGE = 300.0
MIN_MAX_AGE = 30.0
MAX_MAX_AGE = 86400.0
UNKNOWN_KID_REFETCH = 30.0  # an unknown kid re-fetches the set at most this often
FAILED_FETCH_RETRY = 10.0  # after a failed fetch, wait this long before the next
FETCH_TIMEOUT = 10.0
MAX_JWKS_BYTES = 1024 * 1024


class KeySetError(ValueError):
    """The text says, in one line and without key material, why the keys cannot be used."""


class KeysUnavailable(Exception):
    """A fetched key set is needed and there is none: the text is a short reason."""


@dataclass(frozen=True)
class Key:
    """
    One verification key and the algorithms it may be used with.

    @ivar verifiers: algorithm -> what pyjwt verifies with (a L{PyJWK} bound to that algorithm, or
        the raw bytes of a plain HMAC secret).
    @ivar plain: this is the plain HMAC secret of C{jwt-secret} (it has no kid).
    """

    kid: str | None
    verifiers: Mapping[str, Any] = field(repr=False)
    plain: bool = False

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.verifiers)


@dataclass(frozen=True)
class KeySet:
    """Keys in the order they were given; L{skipped} says (without material) what was left out."""

    keys: tuple[Key, ...]
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def find(self, kid: str) -> list[Key]:
        return [k for k in self.keys if k.kid == kid]

    @property
    def plain(self) -> Key | None:
        return next((k for k in self.keys if k.plain), None)

    def describe(self) -> str:
        kids = [k.kid for k in self.keys if k.kid is not None]
        text = f"{len(self.keys)} key{'s' if len(self.keys) != 1 else ''}"
        return text + (f" (kid {', '.join(kids)})" if kids else "")


# -- parsing -----------------------------------------------------------------------------------


def key_json(data: bytes) -> dict[str, Any] | None:
    """The JSON object if C{data} is a JWK or a JWKS, else None (a plain secret)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(obj, dict) and ("kty" in obj or "keys" in obj):
        return obj
    return None


def parse_secret(data: bytes) -> KeySet:
    """C{jwt-secret}'s bytes -> keys: a JWKS, a single JWK, or a plain HMAC secret."""
    obj = key_json(data)
    if obj is not None:
        return parse_key_json(obj)
    if is_pem_format(data) or is_ssh_key(data):
        raise KeySetError("this is a PEM or SSH key, not an HMAC secret; give a public key as a JWK")
    notes: tuple[str, ...] = ()
    if data.lstrip()[:1] in (b"{", b"["):
        # A JWK cut short, or with a typo, would otherwise sign and check as an HMAC secret.
        notes += ("the secret starts like JSON but is not a JWK or a JWKS (a JSON object with "
                  '"kty" or "keys"); it is used as a plain HMAC secret',)
    if len(data) < 32:
        notes += (f"the HMAC secret is {len(data)} bytes long; use at least 32 bytes (256 bits)",)
    return KeySet((Key(None, dict.fromkeys(HMAC_ALGORITHMS, data), plain=True),), notes=notes)


def parse_key_json(obj: Mapping[str, Any]) -> KeySet:
    """A JWKS (C{{"keys": [...]}}) or a single JWK, as a parsed JSON object."""
    if "keys" not in obj:
        use = obj.get("use")
        if use is not None and use != "sig":
            raise KeySetError(f'the JWK\'s "use" is {_show(use)}; only "sig" keys check tokens')
        key, key_notes = _parse_jwk(obj, "the JWK")
        return KeySet((key,), notes=tuple(key_notes + _weak(key, "the JWK")))
    items = obj["keys"]
    if not isinstance(items, list):
        raise KeySetError('the JWKS member "keys" must be a list of JWKs')
    keys: list[Key] = []
    skipped: list[str] = []
    notes: list[str] = []
    for index, item in enumerate(items):
        label = _label(item, index)
        if not isinstance(item, dict):
            skipped.append(f"{label} is not a JSON object")
            continue
        use = item.get("use")
        if use is not None and use != "sig":
            continue  # an encryption key, not ours to use
        try:
            key, key_notes = _parse_jwk(item, label)
        except KeySetError as e:
            skipped.append(str(e))
            continue
        keys.append(key)
        notes += key_notes + _weak(key, label)
    if not keys:
        why = f": {skipped[0]}" if skipped else ""
        raise KeySetError(f'the JWKS has no usable signing key{why}')
    return KeySet(tuple(keys), skipped=tuple(skipped), notes=tuple(notes))


def _label(item: Any, index: int) -> str:
    kid = item.get("kid") if isinstance(item, dict) else None
    return f"key {_show(kid)}" if isinstance(kid, str) else f"key #{index + 1}"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:36] + '..."'


def _algorithms_for(jwk: Mapping[str, Any], label: str) -> tuple[str, ...]:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in SIGNING_ALGORITHMS:
            raise KeySetError(f"{label}: algorithm {_show(alg)} is not accepted; use one of "
                              f"{', '.join(SIGNING_ALGORITHMS)}")
        return (alg,)
    crv = jwk.get("crv")
    if kty == "oct":
        return HMAC_ALGORITHMS
    if kty == "RSA":
        return ("RS256",)
    if kty == "EC" and crv in _EC_CURVES:
        return (_EC_CURVES[crv],)
    if kty == "OKP" and crv in _OKP_CURVES:
        return (_OKP_CURVES[crv],)
    if kty in ("EC", "OKP"):
        raise KeySetError(f"{label}: curve {_show(crv)} is not supported for kty {kty}")
    raise KeySetError(f"{label}: kty {_show(kty)} is not supported; use oct, RSA, EC or OKP")


def _parse_jwk(jwk: Mapping[str, Any], label: str) -> tuple[Key, list[str]]:
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeySetError(f"{label}: kid must be a string")
    if not isinstance(jwk.get("kty"), str):
        raise KeySetError(f'{label} has no "kty"')
    algorithms = _algorithms_for(jwk, label)
    notes: list[str] = []
    public = dict(jwk)
    if jwk["kty"] != "oct" and any(m in jwk for m in _PRIVATE_MEMBERS):
        for member in _PRIVATE_MEMBERS:
            public.pop(member, None)
        notes.append(f"{label} holds a private key; only its public part is used (remove the rest)")
    verifiers: dict[str, PyJWK] = {}
    for alg in algorithms:
        try:
            verifiers[alg] = PyJWK(public, algorithm=alg)
        except Exception:  # pyjwt's messages may quote the JWK, so none of them is passed on
            raise KeySetError(f"{label} is not a valid {jwk['kty']} key for {alg}") from None
    return Key(kid, verifiers), notes


def _weak(key: Key, label: str) -> list[str]:
    """pyjwt's own 'too short' message for the key's first (weakest) algorithm, if any."""
    verifier = key.verifiers[key.algorithms[0]]
    if not isinstance(verifier, PyJWK):
        return []
    try:
        message = verifier.Algorithm.check_key_length(verifier.Algorithm.prepare_key(verifier.key))
    except Exception:
        return []
    return [f"{label}: {message}"] if message else []


def _log_loaded(keys: KeySet, source: str) -> None:
    for why in keys.skipped:
        _log.warn("JWT keys from {source}: skipped {why}", source=source, why=why)
    for note in keys.notes:
        _log.warn("JWT keys from {source}: {note}", source=source, note=note)


# -- local keys: jwt-secret --------------------------------------------------------------------


class KeySource(Protocol):
    """Local keys as they are now (a file may have changed since the last call)."""

    def current(self) -> KeySet: ...


class StaticKeys:
    """Keys that never change: a plain secret, or a JWK/JWKS given inline."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    def current(self) -> KeySet:
        return self._keys


class FileKeys:
    """
    A JWK or JWKS in a file, re-read when the file changes (see the module docstring).

    @param decode: the file's text (one trailing newline dropped) -> the key bytes, as the config
        does it at start-up (C{secret-is-base64}); it raises L{KeySetError} for bad text.
    """

    def __init__(self, path: str, keys: KeySet, clock: Callable[[], float] = time.time,
                 decode: Callable[[str], bytes] = str.encode) -> None:
        self.path = path
        self._keys = keys
        self._clock = clock
        self._decode = decode
        self._checked_at = clock()
        self._seen = self._signature()
        self._warned: object = None

    def current(self) -> KeySet:
        now = self._clock()
        if not 0 <= now - self._checked_at < FILE_CHECK_INTERVAL:
            self._checked_at = now
            self.check()
        return self._keys

    def _signature(self) -> tuple[int, int, int] | str:
        try:
            st = os.stat(self.path)
        except OSError as e:
            return f"cannot read it: {e.strerror}"
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> None:
        """Re-read the file now if it changed since it was last read."""
        seen = self._signature()
        if seen == self._seen:
            return
        self._seen = seen
        if isinstance(seen, str):
            self._warn(seen)
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            if text.endswith("\n"):
                text = text[:-1].removesuffix("\r")
            obj = key_json(self._decode(text))
            if obj is None:
                raise KeySetError("it is not a JWK or a JWKS")
            keys = parse_key_json(obj)
        except OSError as e:
            self._warn(f"cannot read it: {e.strerror}")
            return
        except UnicodeDecodeError:
            self._warn("it is not UTF-8 text")
            return
        except KeySetError as e:
            self._warn(str(e))
            return
        except Exception as e:  # anything else: its name only, a message might quote the file
            self._warn(type(e).__name__)
            return
        self._keys = keys
        self._warned = None
        _log.info("JWT keys reloaded from {path}: {keys}", path=self.path, keys=keys.describe())
        _log_loaded(keys, self.path)

    def _warn(self, why: str) -> None:
        if self._warned == self._seen:
            return
        self._warned = self._seen
        _log.warn("JWT key file {path} changed but {why}; keeping the keys loaded before",
                  path=self.path, why=why)


def local_keys(secret: bytes, path: str | None = None, clock: Callable[[], float] = time.time,
               decode: Callable[[str], bytes] = str.encode) -> KeySource:
    """
    The keys of C{jwt-secret}, warnings about them logged once; a JWK/JWKS read from C{path} is
    watched for changes.  Raises L{KeySetError} when they cannot be used.
    """
    keys = parse_secret(secret)
    source = path or "jwt-secret"
    _log_loaded(keys, source)
    if path is not None and keys.plain is None:
        return FileKeys(path, keys, clock=clock, decode=decode)
    return StaticKeys(keys)


# -- fetched keys: jwt-jwks-url ----------------------------------------------------------------


def cache_seconds(values: Iterable[bytes | str] | None) -> float:
    """How long a fetched set is used: C{Cache-Control} C{max-age}, bounded (module docstring)."""
    age = DEFAULT_MAX_AGE
    for value in values or ():
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for directive in text.split(","):
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name in ("no-cache", "no-store"):
                age = 0
            elif name == "max-age":
                try:
                    age = int(arg.strip().strip('"'))
                except ValueError:
                    pass
    return float(min(max(age, MIN_MAX_AGE), MAX_MAX_AGE))


class _FetchFailed(Exception):
    """A short reason, fit for a 401 line."""


class _BoundedBody(_TwistedProtocol):
    """Reads a response body of at most C{limit} bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._stop()
            self.done.errback(_FetchFailed(f"the key set is larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(client.ResponseDone, client.PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def _cancel(self, d: defer.Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        producer: Any = self.transport  # a response body's transport is a push producer
        if producer is not None:
            producer.stopProducing()


def _describe(exc: BaseException, timeout: float) -> str:
    """A failed fetch -> a few words (for the 401 line and the log)."""
    if isinstance(exc, _FetchFailed):
        return str(exc)
    if isinstance(exc, (defer.TimeoutError, defer.CancelledError)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, client.ResponseFailed) and exc.reasons:
        return _describe(exc.reasons[0].value, timeout)
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "host name not found"
    if isinstance(exc, (error.TimeoutError, error.ConnectingCancelledError)):
        return "cannot connect: timed out"
    if isinstance(exc, error.ConnectError):
        return "cannot connect"
    if type(exc).__module__.startswith("OpenSSL") or isinstance(exc, error.VerifyError):
        return "TLS handshake failed (is the server's certificate trusted?)"
    if isinstance(exc, error.ConnectionLost):
        return "connection lost"
    return type(exc).__name__


class RemoteKeys:
    """
    The JWKS at C{url}, fetched with Twisted's C{Agent} (never blocking the reactor) and cached
    by the rules in the module docstring.  Times come from the injected C{clock}.

    @param https_policy: the Agent's C{contextFactory} (an C{IPolicyForHTTPS}); by default the
        system's certificate authorities are trusted.
    """

    def __init__(self, url: str, reactor: Any, clock: Callable[[], float] = time.time,
                 https_policy: Any = None, timeout: float = FETCH_TIMEOUT) -> None:
        if not url.startswith("https://"):
            raise KeySetError("the JWKS URL must be an https:// URL")
        parts = urlsplit(url)
        if "@" in parts.netloc:  # Twisted's Agent would take "user:pass@host" for the host name
            raise KeySetError("the JWKS URL must not hold a user name or password")
        self.url = url
        # For the log: no query string, which could carry a credential.
        self.shown_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self._reactor = reactor
        self._clock = clock
        self._timeout = timeout
        if https_policy is None:
            self._agent = client.Agent(reactor)
        else:
            self._agent = client.Agent(reactor, contextFactory=https_policy)
        self._keys: KeySet | None = None
        self._expires_at = 0.0
        self._attempted_at: float | None = None
        self._failure: str | None = None  # why the last attempt failed (None: it succeeded)
        self._waiters: list[defer.Deferred[None]] | None = None  # set while a fetch runs
        self._reported: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def __repr__(self) -> str:
        return f"<RemoteKeys {self.shown_url}>"

    @property
    def cached(self) -> KeySet | None:
        """The last fetched set, however old."""
        return self._keys

    async def keys(self) -> KeySet:
        """A set young enough to use, fetched if need be, or L{KeysUnavailable}."""
        now = self._clock()
        if self._keys is None or now >= self._expires_at:
            if self._waiters is not None or self._may_retry(now):
                await self._fetch()
        return self._result()

    async def keys_for_unknown_kid(self) -> KeySet:
        """After a token named a kid the set lacks: re-fetch, unless that was tried recently."""
        now = self._clock()
        recent = self._attempted_at is not None and 0 <= now - self._attempted_at < UNKNOWN_KID_REFETCH
        if self._waiters is not None or (not recent and self._may_retry(now)):
            await self._fetch()
        return self._result()

    def _may_retry(self, now: float) -> bool:
        if self._failure is None or self._attempted_at is None:
            return True
        return not 0 <= now - self._attempted_at < FAILED_FETCH_RETRY

    def _result(self) -> KeySet:
        if self._keys is None:
            raise KeysUnavailable(self._failure or "not fetched yet")
        return self._keys

    def _fetch(self) -> defer.Deferred[None]:
        """Join the running fetch, or start one.  The caller's Deferred may be cancelled alone."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
        else:
            self._waiters = [waiter]
            defer.Deferred.fromCoroutine(self._run())
        return waiter

    async def _run(self) -> None:
        self._attempted_at = self._clock()
        try:
            download = defer.Deferred.fromCoroutine(self._download())
            download.addTimeout(self._timeout, self._reactor)
            keys, max_age = await download
        except Exception as e:
            self._failure = _describe(e, self._timeout)
            if self._keys is not None:
                _log.warn("JWT keys from {url}: fetch failed ({why}); using the set fetched before",
                          url=self.shown_url, why=self._failure)
            else:
                _log.warn("JWT keys from {url}: fetch failed ({why})", url=self.shown_url, why=self._failure)
        else:
            self._keys = keys
            self._failure = None
            self._expires_at = self._clock() + max_age
            _log.info("JWT keys fetched from {url}: {keys}, cached for {age:g} s", url=self.shown_url,
                      keys=keys.describe(), age=max_age)
            if (keys.skipped, keys.notes) != self._reported:  # not again on every re-fetch
                self._reported = (keys.skipped, keys.notes)
                _log_loaded(keys, self.shown_url)
        finally:
            waiters, self._waiters = self._waiters or [], None
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    async def _download(self) -> tuple[KeySet, float]:
        headers = Headers({b"accept": [b"application/json, application/jwk-set+json"],
                           b"user-agent": [b"pgws"]})
        response: Any = await self._agent.request(b"GET", self.url.encode("ascii"), headers)
        reader = _BoundedBody(MAX_JWKS_BYTES)
        response.deliverBody(reader)
        body = await reader.done
        if response.code != 200:
            raise _FetchFailed(f"HTTP {response.code} from the key server")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _FetchFailed("the key server's answer is not JSON") from None
        if not isinstance(obj, dict) or "keys" not in obj:
            raise _FetchFailed('the key server\'s answer is not a JWKS ({"keys": [...]})')
        try:
            keys = parse_key_json(obj)
        except KeySetError as e:
            raise _FetchFailed(str(e)) from None
        return keys, cache_seconds(response.headers.getRawHeaders(b"cache-control"))
