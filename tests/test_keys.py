"""
Token keys: a plain HMAC secret, a JWK, a JWKS, a key file that changes, and a JWKS fetched over
HTTPS from a local server.  Real crypto throughout; time comes from an injected clock.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import warnings
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import defer, reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorSSL
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.web import resource, server
from twisted.web.client import BrowserLikePolicyForHTTPS
from zope.interface import provider

from pgws._auth import Refusal, TokenVerifier
from pgws._config import ConfigError, load_config
from pgws._keys import KeysUnavailable, RemoteKeys, cache_seconds
from support import self_signed_certificate

# Twisted hands pyOpenSSL objects to pyOpenSSL for the test server and its trust root.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

NOW = 1_700_000_000.0  # the injected clock's start: long before the real now
HMAC_KEY = b"k" * 64
OTHER_HMAC_KEY = b"o" * 64
NONE_TOKEN = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtb2RlIjoicncifQ."


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(**settings: Any) -> Any:
    cli = {"db-uri": "x"}
    cli.update({k.replace("_", "-"): v for k, v in settings.items()})
    return load_config(None, {}, cli)


def make_verifier(clock: Clock | None = None, https_policy: Any = None, **settings: Any) -> TokenVerifier:
    return TokenVerifier.from_config(make_config(**settings), reactor=reactor, clock=clock or Clock(),
                                     https_policy=https_policy)


async def refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Refusal) as info:
        await verifier.claims(token)
    assert info.value.status == 401
    return info.value.reason


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def oct_jwk(secret: bytes, **members: Any) -> dict[str, Any]:
    return {"kty": "oct", "k": b64url(secret), **members}


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


def sign(claims: dict[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid is not None else None)


def private_key(kind: str, n: int = 0) -> Any:
    """Key C{n} of a kind, generated once per run (RSA keys are slow to make)."""
    return _private_key(kind, n)


@functools.cache
def _private_key(kind: str, n: int) -> Any:
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(kind: str, n: int = 0, **members: Any) -> dict[str, Any]:
    public = private_key(kind, n).public_key()
    if kind == "RSA":
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif kind in ("P-256", "P-384"):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, **members}


def rsa_public_pem(n: int = 0) -> bytes:
    return private_key("RSA", n).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def log_lines():
    lines: list[tuple[LogLevel | None, str]] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append((event.get("log_level"), formatEvent(event) or ""))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def warnings_in(lines: list[tuple[LogLevel | None, str]]) -> list[str]:
    return [text for level, text in lines if level == LogLevel.warn]


# -- a plain HMAC secret -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest_twisted.ensureDeferred
async def test_plain_secret_accepts_every_hmac_algorithm(alg):
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await verifier.claims(sign({"mode": "r"}, HMAC_KEY, alg)) == {"mode": "r"}


@pytest_twisted.ensureDeferred
async def test_plain_secret_refuses_another_secrets_token():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await refusal(verifier, sign({}, OTHER_HMAC_KEY, "HS256")) == "JWT signature is invalid"


@pytest_twisted.ensureDeferred
async def test_plain_secret_refuses_alg_none_naming_the_hmac_algorithms():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await refusal(verifier, NONE_TOKEN) == \
        'JWT algorithm "none" is not accepted; use one of HS256, HS384, HS512'


@pytest_twisted.ensureDeferred
async def test_plain_secret_refuses_an_rs256_token():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await refusal(verifier, sign({}, private_key("RSA"), "RS256")) == \
        'JWT algorithm "RS256" is not accepted; use one of HS256, HS384, HS512'


@pytest_twisted.ensureDeferred
async def test_plain_secret_does_not_check_the_tokens_kid():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await verifier.claims(sign({"a": 1}, HMAC_KEY, "HS256", kid="whatever")) == {"a": 1}


@pytest_twisted.ensureDeferred
async def test_short_plain_secret_is_reported_once_at_start_not_per_token(log_lines):
    short = "only-sixteen-byt"
    verifier = make_verifier(jwt_secret=short)
    assert warnings_in(log_lines) == [
        "JWT keys from jwt-secret: the HMAC secret is 16 bytes long; use at least 32 bytes (256 bits)"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            await verifier.claims(sign({}, short.encode(), "HS256"))
    assert caught == []
    assert len(warnings_in(log_lines)) == 1
    assert not any(short in text for _, text in log_lines)


def test_long_enough_plain_secret_is_not_reported(log_lines):
    make_verifier(jwt_secret=HMAC_KEY.decode())
    assert warnings_in(log_lines) == []


def test_pem_public_key_as_plain_secret_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        make_verifier(jwt_secret=rsa_public_pem().decode())
    assert str(info.value) == ('"jwt-secret": this is a PEM or SSH key, not an HMAC secret; '
                               "give a public key as a JWK")


# -- a JWK or a JWKS in jwt-secret -------------------------------------------------------------


@pytest.mark.parametrize("form", ["jwk", "jwks"])
@pytest_twisted.ensureDeferred
async def test_single_jwk_and_jwks_forms_of_the_same_hmac_key_both_accept_it(form):
    key = oct_jwk(HMAC_KEY)
    verifier = make_verifier(jwt_secret=json.dumps(key) if form == "jwk" else jwks(key))
    assert await verifier.claims(sign({"mode": "rw"}, HMAC_KEY, "HS256")) == {"mode": "rw"}


@pytest_twisted.ensureDeferred
async def test_jwks_holding_a_different_key_refuses_the_token():
    verifier = make_verifier(jwt_secret=jwks(oct_jwk(OTHER_HMAC_KEY)))
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256")) == "JWT signature is invalid"


@pytest_twisted.ensureDeferred
async def test_jwks_holding_another_public_key_refuses_the_token():
    verifier = make_verifier(jwt_secret=jwks(public_jwk("RSA", 1)))
    assert await refusal(verifier, sign({}, private_key("RSA", 0), "RS256")) == "JWT signature is invalid"


@pytest.mark.parametrize("kind,alg,members", [
    ("RSA", "RS256", {}),                 # RSA without alg: RS256
    ("RSA", "RS512", {"alg": "RS512"}),
    ("RSA", "PS256", {"alg": "PS256"}),   # PSS needs an explicit alg
    ("P-256", "ES256", {}),               # EC: the curve gives the algorithm
    ("P-384", "ES384", {}),
    ("Ed25519", "EdDSA", {}),
])
@pytest_twisted.ensureDeferred
async def test_public_jwk_accepts_tokens_of_its_algorithm(kind, alg, members):
    verifier = make_verifier(jwt_secret=json.dumps(public_jwk(kind, **members)))
    assert await verifier.claims(sign({"mode": "r"}, private_key(kind), alg)) == {"mode": "r"}


@pytest.mark.parametrize("kind,alg,accepted", [
    ("RSA", "PS256", "RS256"),
    ("RSA", "RS384", "RS256"),
    ("P-256", "ES384", "ES256"),
])
@pytest_twisted.ensureDeferred
async def test_public_jwk_refuses_tokens_of_other_algorithms(kind, alg, accepted):
    verifier = make_verifier(jwt_secret=json.dumps(public_jwk(kind)))
    token = sign({}, private_key("P-384" if alg == "ES384" else kind), alg)
    assert await refusal(verifier, token) == f'JWT algorithm "{alg}" is not accepted; use one of {accepted}'


def forge_hs256(claims: dict[str, Any], secret: bytes, kid: Any = None) -> str:
    """An HS256 token signed by hand (pyjwt will not use a PEM as an HMAC secret, rightly)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid is not None else {})}
    segments = [b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)]
    signing_input = ".".join(segments).encode()
    return ".".join([*segments, b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())])


@pytest.mark.parametrize("form", ["jwk", "jwks"])
@pytest_twisted.ensureDeferred
async def test_hs256_token_signed_with_the_rsa_public_key_pem_is_refused(form):
    key = public_jwk("RSA", kid="rsa")
    verifier = make_verifier(jwt_secret=json.dumps(key) if form == "jwk" else jwks(key))
    for pem in (rsa_public_pem(), rsa_public_pem().strip()):
        forged = forge_hs256({"mode": "rw"}, pem, kid="rsa")
        assert await refusal(verifier, forged) == 'JWT algorithm "HS256" is not accepted; use one of RS256'


@pytest_twisted.ensureDeferred
async def test_key_set_refuses_alg_none_naming_its_algorithms():
    verifier = make_verifier(jwt_secret=jwks(public_jwk("P-256")))
    assert await refusal(verifier, NONE_TOKEN) == 'JWT algorithm "none" is not accepted; use one of ES256'


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest_twisted.ensureDeferred
async def test_oct_jwk_without_alg_accepts_every_hmac_algorithm(alg):
    verifier = make_verifier(jwt_secret=json.dumps(oct_jwk(HMAC_KEY)))
    assert await verifier.claims(sign({}, HMAC_KEY, alg)) == {}


@pytest_twisted.ensureDeferred
async def test_oct_jwk_with_alg_accepts_only_that_algorithm():
    verifier = make_verifier(jwt_secret=json.dumps(oct_jwk(HMAC_KEY, alg="HS512")))
    assert await verifier.claims(sign({}, HMAC_KEY, "HS512")) == {}
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256")) == \
        'JWT algorithm "HS256" is not accepted; use one of HS512'


TWO_KEYS = jwks(oct_jwk(HMAC_KEY, kid="a"), public_jwk("RSA", kid="b"))


@pytest_twisted.ensureDeferred
async def test_jwks_kid_selects_the_key():
    verifier = make_verifier(jwt_secret=TWO_KEYS)
    assert await verifier.claims(sign({"k": "a"}, HMAC_KEY, "HS256", kid="a")) == {"k": "a"}
    assert await verifier.claims(sign({"k": "b"}, private_key("RSA"), "RS256", kid="b")) == {"k": "b"}


@pytest_twisted.ensureDeferred
async def test_jwks_kid_selects_the_key_and_its_algorithm_only():
    verifier = make_verifier(jwt_secret=TWO_KEYS)
    assert await refusal(verifier, sign({}, private_key("RSA"), "RS256", kid="a")) == \
        'JWT algorithm "RS256" is not accepted; use one of HS256, HS384, HS512'


@pytest_twisted.ensureDeferred
async def test_jwks_unknown_kid_is_refused():
    verifier = make_verifier(jwt_secret=TWO_KEYS)
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256", kid="zzz")) == \
        'JWT kid "zzz" is not in the key set'


@pytest_twisted.ensureDeferred
async def test_jwks_of_several_keys_refuses_a_token_without_kid():
    verifier = make_verifier(jwt_secret=TWO_KEYS)
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256")) == "JWT has no kid; the key set needs one"


@pytest_twisted.ensureDeferred
async def test_single_key_jwks_accepts_a_token_without_kid():
    verifier = make_verifier(jwt_secret=jwks(public_jwk("Ed25519", kid="only")))
    assert await verifier.claims(sign({}, private_key("Ed25519"), "EdDSA")) == {}


@pytest_twisted.ensureDeferred
async def test_single_key_with_a_kid_refuses_a_token_naming_another_kid():
    verifier = make_verifier(jwt_secret=jwks(public_jwk("Ed25519", kid="only")))
    assert await refusal(verifier, sign({}, private_key("Ed25519"), "EdDSA", kid="other")) == \
        'JWT kid "other" is not in the key set'


@pytest_twisted.ensureDeferred
async def test_single_key_without_a_kid_accepts_a_token_with_any_kid():
    verifier = make_verifier(jwt_secret=json.dumps(public_jwk("P-256")))
    assert await verifier.claims(sign({}, private_key("P-256"), "ES256", kid="anything")) == {}


@pytest_twisted.ensureDeferred
async def test_keys_whose_use_is_not_sig_are_ignored():
    verifier = make_verifier(jwt_secret=jwks(oct_jwk(HMAC_KEY, kid="enc", use="enc"),
                                             oct_jwk(OTHER_HMAC_KEY, kid="sig", use="sig")))
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256", kid="enc")) == 'JWT kid "enc" is not in the key set'
    assert await verifier.claims(sign({}, OTHER_HMAC_KEY, "HS256", kid="sig")) == {}
    # The encryption key does not count: the one signing key is used for a token without kid.
    assert await verifier.claims(sign({}, OTHER_HMAC_KEY, "HS256")) == {}


@pytest_twisted.ensureDeferred
async def test_token_kid_that_is_not_a_string_is_malformed():
    verifier = make_verifier(jwt_secret=TWO_KEYS)
    assert await refusal(verifier, forge_hs256({}, HMAC_KEY, kid=5)) == "JWT is malformed"


@pytest_twisted.ensureDeferred
async def test_unusable_key_in_a_jwks_is_skipped_with_a_warning(log_lines):
    verifier = make_verifier(jwt_secret=jwks({"kty": "XYZ", "kid": "odd"}, {"kty": "RSA", "kid": "broken", "n": "!"},
                                             oct_jwk(HMAC_KEY, kid="good")))
    assert await verifier.claims(sign({}, HMAC_KEY, "HS256", kid="good")) == {}
    assert warnings_in(log_lines) == [
        'JWT keys from jwt-secret: skipped key "odd": kty "XYZ" is not supported; use oct, RSA, EC or OKP',
        'JWT keys from jwt-secret: skipped key "broken" is not a valid RSA key for RS256',
    ]


@pytest.mark.parametrize("secret,message", [
    (jwks({"kty": "oct", "use": "enc", "k": "abc"}), '"jwt-secret": the JWKS has no usable signing key'),
    (jwks({"kty": "RSA", "n": "AQAB"}), '"jwt-secret": the JWKS has no usable signing key: '
                                        "key #1 is not a valid RSA key for RS256"),
    ('{"keys": {}}', '"jwt-secret": the JWKS member "keys" must be a list of JWKs'),
    (json.dumps(oct_jwk(HMAC_KEY, alg="none")), '"jwt-secret": the JWK: algorithm "none" is not accepted; use one '
                                               "of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, "
                                               "ES256, ES256K, ES384, ES512, EdDSA"),
    (json.dumps({"kty": "EC", "crv": "P-999", "x": "AA"}), '"jwt-secret": the JWK: curve "P-999" is not supported '
                                                           "for kty EC"),
    (json.dumps({"kty": "oct", "k": "c2VjcmV0", "use": "enc"}), '"jwt-secret": the JWK\'s "use" is "enc"; '
                                                               'only "sig" keys check tokens'),
    (json.dumps({"kty": "RSA", "alg": "HS256", "k": "c2VjcmV0"}), '"jwt-secret": the JWK is not a valid RSA key for '
                                                                  "HS256"),
])
def test_unusable_jwk_or_jwks_is_a_config_error_without_key_material(secret, message):
    with pytest.raises(ConfigError) as info:
        make_verifier(jwt_secret=secret)
    assert str(info.value) == message
    assert "c2VjcmV0" not in str(info.value) and "AQAB" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_private_jwk_is_used_for_its_public_part(log_lines):
    private = RSAAlgorithm.to_jwk(private_key("RSA"), as_dict=True)
    verifier = make_verifier(jwt_secret=json.dumps({**private, "kid": "p"}))
    assert await verifier.claims(sign({}, private_key("RSA"), "RS256", kid="p")) == {}
    assert warnings_in(log_lines) == [
        'JWT keys from jwt-secret: the JWK holds a private key; only its public part is used (remove the rest)']
    assert not any(private["d"] in text for _, text in log_lines)


@pytest_twisted.ensureDeferred
async def test_base64_secret_may_hold_a_jwks():
    secret = base64.b64encode(jwks(oct_jwk(HMAC_KEY, kid="a")).encode()).decode()
    verifier = make_verifier(jwt_secret=secret, secret_is_base64="true")
    assert await verifier.claims(sign({}, HMAC_KEY, "HS256", kid="a")) == {}


@pytest_twisted.ensureDeferred
async def test_token_longer_than_8_kib_is_refused_before_parsing():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    assert await refusal(verifier, "a" * 8193) == "JWT is longer than 8192 bytes"
    assert await refusal(verifier, "a" * 8192) == "JWT is malformed"  # at the limit: parsed


# -- claims: times, audience, issuer -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_exp_and_nbf_use_the_injected_clock():
    clock = Clock()
    verifier = make_verifier(clock, jwt_secret=HMAC_KEY.decode())
    token = sign({"exp": NOW + 10}, HMAC_KEY, "HS256")  # long past by the real clock
    assert await verifier.claims(token) == {"exp": NOW + 10}
    clock.advance(10)
    assert await refusal(verifier, token) == "JWT expired"


@pytest_twisted.ensureDeferred
async def test_leeway_extends_exp_and_nbf():
    clock = Clock()
    verifier = make_verifier(clock, jwt_secret=HMAC_KEY.decode(), jwt_leeway="5")
    expired = sign({"exp": NOW - 4}, HMAC_KEY, "HS256")
    early = sign({"nbf": NOW + 5}, HMAC_KEY, "HS256")
    assert await verifier.claims(expired) == {"exp": NOW - 4}
    assert await verifier.claims(early) == {"nbf": NOW + 5}
    clock.advance(1)
    assert await refusal(verifier, expired) == "JWT expired"
    clock.now = NOW - 0.5
    assert await refusal(verifier, early) == "JWT not yet valid"


@pytest_twisted.ensureDeferred
async def test_without_leeway_exp_is_exact():
    verifier = make_verifier(Clock(), jwt_secret=HMAC_KEY.decode())
    assert await refusal(verifier, sign({"exp": NOW}, HMAC_KEY, "HS256")) == "JWT expired"
    assert await refusal(verifier, sign({"nbf": NOW + 1}, HMAC_KEY, "HS256")) == "JWT not yet valid"
    assert await refusal(verifier, sign({"nbf": "later"}, HMAC_KEY, "HS256")) == "JWT claim nbf must be a number"


@pytest.mark.parametrize("aud", ["pgws", ["other", "pgws"]])
@pytest_twisted.ensureDeferred
async def test_configured_audience_is_accepted_as_string_or_in_a_list(aud):
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode(), jwt_aud="pgws")
    assert await verifier.claims(sign({"aud": aud}, HMAC_KEY, "HS256")) == {"aud": aud}


@pytest.mark.parametrize("claims", [{}, {"aud": "other"}, {"aud": ["a", "b"]}, {"aud": 5}, {"aud": [["pgws"]]}])
@pytest_twisted.ensureDeferred
async def test_configured_audience_refuses_tokens_without_it(claims):
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode(), jwt_aud="pgws")
    assert await refusal(verifier, sign(claims, HMAC_KEY, "HS256")) == "JWT audience is not accepted"


@pytest_twisted.ensureDeferred
async def test_audience_and_issuer_are_not_checked_when_not_configured():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode())
    claims = {"aud": "postgrest", "iss": "anyone", "sub": 5}
    assert await verifier.claims(sign(claims, HMAC_KEY, "HS256")) == claims


@pytest_twisted.ensureDeferred
async def test_configured_issuer_is_required():
    verifier = make_verifier(jwt_secret=HMAC_KEY.decode(), jwt_iss="https://issuer.example")
    assert await verifier.claims(sign({"iss": "https://issuer.example"}, HMAC_KEY, "HS256"))
    for claims in ({}, {"iss": "https://evil.example"}):
        assert await refusal(verifier, sign(claims, HMAC_KEY, "HS256")) == "JWT issuer is not accepted"
    # pyjwt will not sign a non-string iss; a hand-signed one is refused all the same.
    assert await refusal(verifier, forge_hs256({"iss": ["https://issuer.example"]}, HMAC_KEY)) == \
        "JWT issuer is not accepted"


# -- a key file that changes -------------------------------------------------------------------


def write_keys(path: Any, text: str, stamp: float) -> None:
    """Replace the file as a deploy tool would (new inode), with a distinct mtime."""
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    os.utime(path, (stamp, stamp))


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "jwks.json"
    write_keys(path, jwks(oct_jwk(HMAC_KEY, kid="old")), NOW)
    return path


@pytest_twisted.ensureDeferred
async def test_key_file_is_reread_when_it_changes_at_most_once_a_second(key_file, log_lines):
    clock = Clock()
    verifier = make_verifier(clock, jwt_secret=f"@{key_file}")
    old = sign({"k": "old"}, HMAC_KEY, "HS256", kid="old")
    new = sign({"k": "new"}, OTHER_HMAC_KEY, "HS256", kid="new")
    assert await verifier.claims(old) == {"k": "old"}

    write_keys(key_file, jwks(oct_jwk(OTHER_HMAC_KEY, kid="new")), NOW + 100)
    clock.advance(0.5)  # the file was looked at less than a second ago
    assert await verifier.claims(old) == {"k": "old"}
    assert await refusal(verifier, new) == 'JWT kid "new" is not in the key set'

    clock.advance(0.5)
    assert await verifier.claims(new) == {"k": "new"}
    assert await refusal(verifier, old) == 'JWT kid "old" is not in the key set'
    assert any(f"JWT keys reloaded from {key_file}: 1 key (kid new)" in text for _, text in log_lines)


@pytest.mark.parametrize("damage", ["invalid", "plain secret", "deleted"])
@pytest_twisted.ensureDeferred
async def test_key_file_that_goes_bad_keeps_the_last_keys_and_warns_once(key_file, log_lines, damage):
    clock = Clock()
    verifier = make_verifier(clock, jwt_secret=f"@{key_file}")
    old = sign({}, HMAC_KEY, "HS256", kid="old")
    if damage == "deleted":
        os.remove(key_file)
    else:
        write_keys(key_file, '{"keys": [' if damage == "invalid" else HMAC_KEY.decode(), NOW + 100)
    for _ in range(3):
        clock.advance(2)
        assert await verifier.claims(old) == {}
    why = {"invalid": "it is not a JWK or a JWKS", "plain secret": "it is not a JWK or a JWKS",
           "deleted": "cannot read it: No such file or directory"}[damage]
    assert warnings_in(log_lines) == [
        f"JWT key file {key_file} changed but {why}; keeping the keys loaded before"]
    assert not any(HMAC_KEY.decode() in text or b64url(HMAC_KEY) in text for _, text in log_lines)

    # Mended: the new keys are used and the next breakage is reported again.
    write_keys(key_file, jwks(oct_jwk(OTHER_HMAC_KEY, kid="new")), NOW + 200)
    clock.advance(2)
    assert await verifier.claims(sign({}, OTHER_HMAC_KEY, "HS256", kid="new")) == {}
    write_keys(key_file, "[]", NOW + 300)
    clock.advance(2)
    assert await verifier.claims(sign({}, OTHER_HMAC_KEY, "HS256", kid="new")) == {}
    assert len(warnings_in(log_lines)) == 2


@pytest_twisted.ensureDeferred
async def test_key_file_holding_a_plain_secret_is_not_watched(tmp_path):
    path = tmp_path / "secret"
    write_keys(path, HMAC_KEY.decode(), NOW)
    clock = Clock()
    verifier = make_verifier(clock, jwt_secret=f"@{path}")
    write_keys(path, jwks(oct_jwk(OTHER_HMAC_KEY)), NOW + 100)
    clock.advance(10)
    assert await verifier.claims(sign({}, HMAC_KEY, "HS256")) == {}


# -- a JWKS fetched over HTTPS -----------------------------------------------------------------


def certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM)."""
    return self_signed_certificate()


def trusting_policy() -> BrowserLikePolicyForHTTPS:
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(certificate()[0]))


class JwksResource(resource.Resource):
    """Serves C{body} with C{status} and C{cache_control}, counting requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = [public_jwk("RSA", kid="a")]
        self.body: bytes | None = None
        self.status = 200
        self.cache_control: str | None = "max-age=60"
        self.requests = 0
        self.hold = False  # never answer

    def render_GET(self, request: Any) -> Any:
        self.requests += 1
        if self.hold:
            return server.NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        if self.cache_control is not None:
            request.setHeader(b"cache-control", self.cache_control.encode())
        return self.body if self.body is not None else jwks(*self.keys).encode()


class JwksServer:
    def __init__(self) -> None:
        self.resource = JwksResource()
        cert_pem, key_pem = certificate()
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.port = IReactorSSL(reactor).listenSSL(0, server.Site(self.resource), options,
                                                   interface="127.0.0.1")
        address = self.port.getHost()
        assert isinstance(address, IPv4Address), address
        self.url = f"https://127.0.0.1:{address.port}/jwks.json"


@pytest_twisted.async_yield_fixture
async def jwks_server():
    s = JwksServer()
    yield s
    await defer.maybeDeferred(s.port.stopListening)


def rsa_token(kid: str | None = "a", n: int = 0, **claims: Any) -> str:
    """An RS256 token; its claims default to a non-empty set, so that C{assert await ...} means it."""
    return sign(claims or {"mode": "r"}, private_key("RSA", n), "RS256", kid=kid)


@pytest_twisted.ensureDeferred
async def test_fetched_keys_are_cached_for_max_age(jwks_server):
    clock = Clock()
    verifier = make_verifier(clock, trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await verifier.claims(rsa_token(mode="r")) == {"mode": "r"}
    assert await verifier.claims(rsa_token(mode="w")) == {"mode": "w"}
    assert jwks_server.resource.requests == 1
    clock.advance(59)
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 1
    clock.advance(1)
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 2


@pytest_twisted.ensureDeferred
async def test_fetched_keys_refuse_a_token_signed_by_another_key(jwks_server):
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await refusal(verifier, rsa_token(n=1)) == "JWT signature is invalid"
    assert await refusal(verifier, forge_hs256({}, rsa_public_pem(), kid="a")) == \
        'JWT algorithm "HS256" is not accepted; use one of RS256'


@pytest_twisted.ensureDeferred
async def test_unknown_kid_refetches_at_most_once_per_30_seconds(jwks_server):
    clock = Clock()
    verifier = make_verifier(clock, trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await verifier.claims(rsa_token("a"))
    jwks_server.resource.keys.append(public_jwk("RSA", 1, kid="b"))  # the issuer adds a key

    clock.advance(10)  # fetched 10 s ago: not again yet
    assert await refusal(verifier, rsa_token("b", n=1)) == 'JWT kid "b" is not in the key set'
    assert jwks_server.resource.requests == 1

    clock.advance(20)
    assert await verifier.claims(rsa_token("b", n=1, k="b")) == {"k": "b"}
    assert jwks_server.resource.requests == 2

    clock.advance(1)
    assert await refusal(verifier, rsa_token("c")) == 'JWT kid "c" is not in the key set'
    assert jwks_server.resource.requests == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_verifications_share_one_fetch(jwks_server):
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url)
    results = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(verifier.claims(rsa_token(i=i))) for i in range(5)])
    assert results == [{"i": i} for i in range(5)]
    assert jwks_server.resource.requests == 1


@pytest.mark.parametrize("status,body,reason", [
    (500, None, "HTTP 500 from the key server"),
    (200, b"<html>", "the key server's answer is not JSON"),
    (200, b'{"kty": "oct", "k": "c2VjcmV0"}', 'the key server\'s answer is not a JWKS ({"keys": [...]})'),
    (200, b'{"keys": [{"kty": "XYZ"}]}', 'the JWKS has no usable signing key: key #1: kty "XYZ" is not supported; '
                                         "use oct, RSA, EC or OKP"),
])
@pytest_twisted.ensureDeferred
async def test_bad_answer_without_a_cached_set_is_a_401(jwks_server, status, body, reason):
    jwks_server.resource.status, jwks_server.resource.body = status, body
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await refusal(verifier, rsa_token()) == f"JWT keys are not available: {reason}"


@pytest_twisted.ensureDeferred
async def test_unreachable_key_server_is_a_401(jwks_server):
    url = jwks_server.url
    await jwks_server.port.stopListening()
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=url)
    assert await refusal(verifier, rsa_token()) == "JWT keys are not available: connection refused"


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_a_401(jwks_server, log_lines):
    verifier = make_verifier(Clock(), None, jwt_jwks_url=jwks_server.url)  # the system's CAs only
    assert await refusal(verifier, rsa_token()) == \
        "JWT keys are not available: TLS handshake failed (is the server's certificate trusted?)"
    assert any(jwks_server.url in text for text in warnings_in(log_lines))


@pytest_twisted.ensureDeferred
async def test_key_server_that_does_not_answer_times_out(jwks_server):
    jwks_server.resource.hold = True
    keys = RemoteKeys(jwks_server.url, reactor, clock=Clock(), https_policy=trusting_policy(), timeout=0.2)
    with pytest.raises(KeysUnavailable) as info:
        await keys.keys()
    assert str(info.value) == "no answer within 0.2 s"


@pytest_twisted.ensureDeferred
async def test_key_set_larger_than_1_mib_is_refused(jwks_server):
    jwks_server.resource.body = b'{"keys": [], "padding": "' + b"x" * (1024 * 1024) + b'"}'
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await refusal(verifier, rsa_token()) == \
        "JWT keys are not available: the key set is larger than 1048576 bytes"


@pytest_twisted.ensureDeferred
async def test_query_string_of_the_url_is_not_logged(jwks_server, log_lines):
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url + "?api_key=hunter2")
    assert await verifier.claims(rsa_token())
    assert any(jwks_server.url in text for _, text in log_lines)
    ours = [text for _, text in log_lines if text.startswith("JWT keys")]  # not the test server's access log
    assert ours and not any("hunter2" in text for text in ours)


def test_url_with_a_password_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        make_verifier(jwt_jwks_url="https://user:hunter2@keys.example/jwks.json")
    assert str(info.value) == '"jwt-jwks-url": the JWKS URL must not hold a user name or password'


@pytest_twisted.ensureDeferred
async def test_failed_fetch_is_retried_after_10_seconds(jwks_server):
    clock = Clock()
    jwks_server.resource.status = 503
    verifier = make_verifier(clock, trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await refusal(verifier, rsa_token()) == "JWT keys are not available: HTTP 503 from the key server"
    jwks_server.resource.status = 200
    clock.advance(9)
    assert await refusal(verifier, rsa_token()) == "JWT keys are not available: HTTP 503 from the key server"
    assert jwks_server.resource.requests == 1
    clock.advance(1)
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 2


@pytest_twisted.ensureDeferred
async def test_stale_set_is_used_when_a_refetch_fails(jwks_server, log_lines):
    clock = Clock()
    verifier = make_verifier(clock, trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await verifier.claims(rsa_token())
    jwks_server.resource.status = 500
    clock.advance(61)
    assert await verifier.claims(rsa_token(k=1)) == {"k": 1}
    assert jwks_server.resource.requests == 2
    assert warnings_in(log_lines) == [f"JWT keys from {jwks_server.url}: fetch failed "
                                      "(HTTP 500 from the key server); using the set fetched before"]
    clock.advance(5)  # no new attempt within 10 s of a failure
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 2


@pytest.mark.parametrize("header,seconds", [
    (None, 300), ("max-age=3600", 3600), ("public, max-age=120", 120), ("max-age=5", 30),
    ("max-age=999999999", 86400), ("no-cache", 30), ("max-age=oops", 300),
])
def test_cache_seconds_honours_max_age_within_bounds(header, seconds):
    assert cache_seconds([header] if header else None) == seconds


@pytest_twisted.ensureDeferred
async def test_cache_control_of_the_answer_sets_how_long_keys_are_kept(jwks_server):
    jwks_server.resource.cache_control = "max-age=5"  # raised to the 30 s minimum
    clock = Clock()
    verifier = make_verifier(clock, trusting_policy(), jwt_jwks_url=jwks_server.url)
    assert await verifier.claims(rsa_token())
    clock.advance(29)
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 1
    clock.advance(1)
    assert await verifier.claims(rsa_token())
    assert jwks_server.resource.requests == 2


@pytest_twisted.ensureDeferred
async def test_secret_and_url_together_form_one_key_set(jwks_server):
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url,
                             jwt_secret=HMAC_KEY.decode())
    # A token without kid goes to the plain secret: no fetch needed.
    assert await verifier.claims(sign({"k": "hmac"}, HMAC_KEY, "HS256")) == {"k": "hmac"}
    assert jwks_server.resource.requests == 0
    # A kid is looked up in the fetched set.
    assert await verifier.claims(rsa_token("a", k="rsa")) == {"k": "rsa"}
    assert jwks_server.resource.requests == 1
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256", kid="x")) == 'JWT kid "x" is not in the key set'


@pytest_twisted.ensureDeferred
async def test_local_kid_is_found_before_the_fetched_set(jwks_server):
    verifier = make_verifier(Clock(), trusting_policy(), jwt_jwks_url=jwks_server.url,
                             jwt_secret=jwks(oct_jwk(HMAC_KEY, kid="local")))
    assert await verifier.claims(sign({}, HMAC_KEY, "HS256", kid="local")) == {}
    assert jwks_server.resource.requests == 0
    assert await verifier.claims(rsa_token("a")) == {"mode": "r"}
    # Two keys in all (one local, one fetched): a token must say which.
    assert await refusal(verifier, sign({}, HMAC_KEY, "HS256")) == "JWT has no kid; the key set needs one"
