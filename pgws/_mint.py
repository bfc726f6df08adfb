"""
C{pgws token}: mint a token that the configured server accepts, for testing, scripts and
services (C{$(pgws token ...)}).  Standard output gets the token and a newline, nothing else;
problems are one line on standard error, warnings too.

    pgws token [--config FILE] [--secret S] [--secret-is-base64 true|false] [--kid KID]
               --mode r|w|rw [--channel C] [--channels A,B] [--exp 1h | --exp none]
               [--claim K=V ...]

The key and the claims the server checks are read as the server reads them (L{pgws._config}):
C{jwt-secret}, C{secret-is-base64}, C{jwt-jwks-url}, C{jwt-aud} and C{jwt-iss} from the config
file (with C{$(NAME)} substitution), then C{PGWS_*} environment variables, then the command line
(C{--secret} stands for C{--jwt-secret}, an C{@path} reads it from a file).  No other setting is
needed (not C{db-uri}) nor checked beyond the file's syntax, keys and types: a TLS key file or a
database URI the minting user cannot read, or an unset variable in their C{$(NAME)}, is no
obstacle.

The token:
  - claims C{mode}, C{channel} (C{--channel}), C{channels} (C{--channels}, comma-separated, may be
    repeated), each C{--claim K=V} (V as JSON if it parses as JSON, else the string itself:
    C{n=5} is 5, C{admin=true} is true, C{sub=alice} and C{sub='"5"'} are strings), C{aud} and
    C{iss} from C{jwt-aud} / C{jwt-iss} (without them the server refuses the token; a C{--claim}
    replaces them), and C{exp}: now plus C{--exp}, default 1 hour.  No C{iat}: a token's claims
    go into every envelope, so nothing is added that was not asked for.
  - C{--exp}: seconds (C{90}), or a number with C{s}, C{m}, C{h} or C{d} (C{30s}, C{15m}, C{1h},
    C{7d}, C{1h30m}); C{none} for a token without C{exp}.
  - signed with a plain HMAC secret as HS256; with a JWK or JWKS, by the first key holding a
    private part (an C{oct} key is one), or the one C{--kid} names, with that key's algorithm (its
    C{alg}, else what the server infers from C{kty}/C{crv}, L{pgws._keys}) and its C{kid} in the
    header.

Exit status 0 with a token; 2 for a bad option or a bad setting (as C{twistd} exits for a bad
config); 1 when there is no key that can sign (none set, C{jwt-jwks-url} alone, public keys only,
an unusable key).  No message quotes the secret or key material.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt import PyJWK
from jwt.utils import is_pem_format, is_ssh_key

from pgws._auth import MAX_TOKEN_BYTES
from pgws._channelname import ChannelNameError, check_channel_name
from pgws._config import ConfigError, read_secret, read_settings
from pgws._keys import KeySetError, key_json, parse_key_json, parse_secret

__all__ = ["CannotSign", "UsageError", "main", "mint", "parse_claim", "parse_duration"]

PROG = "pgws token"
DEFAULT_EXP = "1h"
EXIT_USAGE = 2
EXIT_NO_KEY = 1
MODES = ("r", "w", "rw")
# Claims that have options of their own.
_OPTION_CLAIMS = {"mode": "--mode", "channel": "--channel", "channels": "--channels", "exp": "--exp"}
# The settings read, by their keys in SETTINGS.
_KEY_SETTINGS = ("jwt-secret", "secret-is-base64", "jwt-jwks-url", "jwt-aud", "jwt-iss")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# 9999-12-31T23:59:59Z: the latest exp any JWT library reads as a date.
LAST_EXP = 253_402_300_799
_PRIVATE_KEYS = (RSAPrivateKey, EllipticCurvePrivateKey, Ed25519PrivateKey, Ed448PrivateKey)


class UsageError(Exception):
    """A bad option or claim: exit status 2."""


class CannotSign(Exception):
    """There is no key this command can sign with: exit status 1."""


# -- options -----------------------------------------------------------------------------------


def parse_duration(text: str) -> int | None:
    """C{--exp}'s text -> seconds, or None for C{none}."""
    value = text.strip().lower()
    if value == "none":
        return None
    if re.fullmatch(r"\d+", value):
        seconds = int(value)
    elif re.fullmatch(r"(\d+[smhd])+", value):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+)([smhd])", value))
    else:
        raise UsageError(f"--exp: expected seconds, a duration such as 30s, 15m, 1h or 7d, or "
                         f"none, got {_show(text)}")
    if seconds <= 0:
        raise UsageError(f"--exp: must be more than 0 seconds, got {_show(text)}")
    return seconds


def parse_claim(text: str) -> tuple[str, Any]:
    """C{K=V} -> (K, V as JSON if it parses, else the string V)."""
    name, equals, raw = text.partition("=")
    if not equals or not name:
        raise UsageError(f"--claim: expected NAME=VALUE, got {_show(text)}")
    if name in _OPTION_CLAIMS:
        raise UsageError(f"--claim {name}: use {_OPTION_CLAIMS[name]}")
    try:
        # NaN and Infinity are not JSON (pyjwt would write them anyway): they stay strings.
        value = json.loads(raw, parse_constant=_not_json, parse_float=_finite(name))
    except ValueError:
        value = raw
    return name, value


def _finite(name: str) -> Callable[[str], float]:
    """A JSON number too large for a float (1e400) would be written as Infinity: refused."""
    def parse(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise UsageError(f"--claim {name}: {_show(text)} is too large for a JSON number")
        return number
    return parse


def _not_json(constant: str) -> NoReturn:
    raise ValueError(constant)


def _show(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:36] + '..."'


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (it prints the whole usage text otherwise)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Mint a JWT that the configured pgws server accepts; print only the token.",
        epilog="Settings (jwt-secret, secret-is-base64, jwt-aud, jwt-iss) come from --config, "
               "then PGWS_* environment variables, then these options. Exit status: 0 a token, "
               "2 a bad option or setting, 1 no key that can sign.",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="the server's config file")
    p.add_argument("--secret", "--jwt-secret", metavar="S",
                   help='the key: an HMAC secret, a JWK or JWKS holding a private key, or "@path"'
                        " (default: the config's jwt-secret)")
    p.add_argument("--secret-is-base64", metavar="true|false",
                   help="the secret is base64 (default: the config's secret-is-base64)")
    p.add_argument("--kid", help="sign with this key of a JWKS (default: its first private key)")
    p.add_argument("--mode", required=True, metavar="r|w|rw", help="what the socket may do")
    p.add_argument("--channel", action="append", metavar="C", help="the socket's channel")
    p.add_argument("--channels", action="append", metavar="A,B",
                   help="channels the token allows, comma-separated (may be repeated; spaces "
                        "around a name are ignored)")
    p.add_argument("--exp", default=DEFAULT_EXP, metavar="DURATION",
                   help=f"lifetime: seconds, 30s, 15m, 1h, 7d, or none (default {DEFAULT_EXP})")
    p.add_argument("--claim", action="append", default=[], metavar="K=V",
                   help="another claim; V is JSON if it parses, else a string (may be repeated)")
    return p


def claims_from(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """The claims the options ask for (C{aud} and C{iss} from the settings are added later)."""
    if args.mode not in MODES:
        raise UsageError(f"--mode: must be r, w or rw, got {_show(args.mode)}")
    claims: dict[str, Any] = {"mode": args.mode}
    channel = None
    if args.channel is not None:
        if len(args.channel) > 1:
            raise UsageError("--channel: given twice; a token names one channel, --channels "
                             "allows several")
        channel = claims["channel"] = _channel(args.channel[0], "--channel")
    if args.channels is not None:
        names = [name.strip() for value in args.channels for name in value.split(",")]
        claims["channels"] = list(dict.fromkeys(_channel(name, "--channels") for name in names))
        if channel is not None and channel not in claims["channels"]:
            raise UsageError(f"--channel {_show(channel)} is not in --channels: the server "
                             "would refuse every socket")
    for text in args.claim:
        name, value = parse_claim(text)
        if name in claims:
            raise UsageError(f"--claim {name}: given twice")
        claims[name] = value
    seconds = parse_duration(args.exp)
    if seconds is not None:
        claims["exp"] = int(now) + seconds
        if claims["exp"] > LAST_EXP:
            raise UsageError(f"--exp: {_show(args.exp)} is after the year 9999; use --exp none "
                             "for a token that does not expire")
    return claims


def _channel(name: str, option: str) -> str:
    try:
        return check_channel_name(name)
    except ChannelNameError as e:
        raise UsageError(f"{option}: {e}") from None


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySettings:
    """What the server checks a token with, as far as minting one needs it."""

    secret: bytes | None
    jwks_url: str | None
    aud: str | None
    iss: str | None


def read_key_settings(config_file: str | None, environ: Mapping[str, str],
                      cli: Mapping[str, str | None]) -> KeySettings:
    """
    The settings of L{_KEY_SETTINGS}: file < environment < C{cli} (by key), as the server merges
    them.  Raises L{ConfigError}.
    """
    values = read_settings(_KEY_SETTINGS, config_file, environ, cli)
    secret = None
    if values["jwt-secret"] not in (None, ""):
        secret, _ = read_secret(values)
    return KeySettings(secret, values["jwt-jwks-url"], values["jwt-aud"], values["jwt-iss"])


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """A key that signs: the algorithm, what pyjwt signs with, and the kid for the header."""

    alg: str
    key: Any
    kid: str | None
    notes: tuple[str, ...] = ()  # what the server says of this key when it loads it


def signer_for(settings: KeySettings, kid: str | None = None) -> Signer:
    """The key to sign with, or L{CannotSign} saying why there is none."""
    if settings.secret is None:
        if settings.jwks_url:
            raise CannotSign("the server's keys come from jwt-jwks-url, which holds public keys "
                             "only: give the private key with --secret")
        raise CannotSign("no key: set jwt-secret in the config file, give --secret, or set "
                         "PGWS_JWT_SECRET")
    secret = settings.secret
    if key_json(secret) is None:
        if is_pem_format(secret) or is_ssh_key(secret):
            raise CannotSign("the secret is a PEM or SSH key: give the private key as a JWK "
                             "(the server takes the public one as a JWK too)")
        if kid is not None:
            raise UsageError("--kid: the secret is a plain HMAC secret, which has no kid")
        return Signer("HS256", secret, None, parse_secret(secret).notes)
    try:
        parse_secret(secret)  # refuses what the server refuses, with its reason
        return _jwk_signer(key_json(secret) or {}, kid)
    except KeySetError as e:
        raise CannotSign(str(e)) from None


def _jwk_signer(obj: Mapping[str, Any], kid: str | None) -> Signer:
    single = "keys" not in obj
    items = [obj] if single else obj["keys"]
    usable: list[tuple[int, Mapping[str, Any], str]] = []  # the keys the server takes, in order
    for index, item in enumerate(items):
        if not isinstance(item, dict) or item.get("use") not in (None, "sig"):
            continue
        try:
            key = parse_key_json(item).keys[0]
        except KeySetError:
            continue  # skipped by the server too
        usable.append((index, item, key.algorithms[0]))
    chosen = [u for u in usable if kid is None or u[1].get("kid") == kid]
    if not chosen:
        what = "the JWK's kid is not" if single else "no usable key of the JWKS has kid"
        raise UsageError(f"--kid: {what} {_show(kid or '')}")
    private = [u for u in chosen if u[1]["kty"] == "oct" or "d" in u[1]]
    if not private:
        what = "the JWK is a public key" if single else "the JWKS holds public keys only"
        raise CannotSign(f'{what}: pgws token signs with a private key (a JWK with "d")')
    index, item, alg = private[0]
    label = "the JWK" if single else f"key #{index + 1} of the JWKS"
    if len(usable) > 1 and item.get("kid") is None:
        raise CannotSign(f"{label} has no kid: the server picks a key of a set by its kid")
    try:
        signing: Any = PyJWK(dict(item), algorithm=alg).key
    except Exception:  # pyjwt's messages may quote the key
        signing = None
    if not isinstance(signing, (bytes, *_PRIVATE_KEYS)):
        raise CannotSign(f"{label} is not a valid private {item['kty']} key for {alg}")
    return Signer(alg, signing, item.get("kid"))


def mint(claims: Mapping[str, Any], signer: Signer) -> tuple[str, list[str]]:
    """
    The signed token, and warnings as lines: what the server says of the key (a short HMAC
    secret, one that looks like a broken JWK), else pyjwt's.
    """
    headers = {"kid": signer.kid} if signer.kid is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token = jwt.encode(dict(claims), signer.key, algorithm=signer.alg, headers=headers)
    if len(token) > MAX_TOKEN_BYTES:
        raise UsageError(f"the token is {len(token)} bytes long; the server refuses tokens over "
                         f"{MAX_TOKEN_BYTES} bytes")
    return token, list(signer.notes) or [str(w.message) for w in caught]


# -- the command -------------------------------------------------------------------------------


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         clock: Callable[[], float] = time.time) -> int:
    """Run C{pgws token} with C{argv} (the arguments after C{token}); the exit status."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        token, notes = _run(argv, environ, clock)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (UsageError, ConfigError) as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_USAGE
    except CannotSign as e:
        err.write(f"{PROG}: cannot sign: {e}\n")
        return EXIT_NO_KEY
    for note in notes:
        err.write(f"{PROG}: warning: {note}\n")
    out.write(token + "\n")
    out.flush()
    return 0


def _run(argv: Sequence[str], environ: Mapping[str, str] | None,
         clock: Callable[[], float]) -> tuple[str, list[str]]:
    args = _parser().parse_args(list(argv))  # --help: printed, then SystemExit
    claims = claims_from(args, clock())
    settings = read_key_settings(
        args.config, os.environ if environ is None else environ,
        {"jwt-secret": args.secret, "secret-is-base64": args.secret_is_base64})
    for name, value in (("aud", settings.aud), ("iss", settings.iss)):
        if value is not None:
            claims.setdefault(name, value)
    return mint(claims, signer_for(settings, args.kid))

