"""
`pgws token`: the real console script and `python -m pgws token` as subprocesses, the tokens they
print decoded with pyjwt and opened on a real server; the option tables in-process through
L{pgws._mint.main} with an injected clock (the same code the script runs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import reactor

from pgws._auth import TokenVerifier
from pgws._config import load_config
from pgws._mint import main
from support import SECRET, Db, start_server, ws_connect

NOW = 1_800_000_000.0
PGWS = shutil.which("pgws", path=os.path.dirname(sys.executable))
CONSOLE = [PGWS, "token"]
MODULE = [sys.executable, "-m", "pgws", "token"]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any PGWS_* setting, plus C{extra}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWS_")}
    return {**env, **extra}


def run(command: list[Any], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    assert command[0] is not None, "the pgws console script is not installed (bin/setup)"
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30,
                          env=clean_environment(**env))


def minted(result: subprocess.CompletedProcess[str]) -> str:
    """The token of a successful run: standard output is that token and a newline, nothing else."""
    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    return result.stdout[:-1]


def refusal(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """A refused run: nothing on standard output, one line on standard error."""
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    return result.returncode, result.stderr[:-1]


def call(*args: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    """L{main} in-process: (exit status, standard output, standard error)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(args), environ=environ or {}, stdout=out, stderr=err, clock=lambda: NOW)
    return status, out.getvalue(), err.getvalue()


def decode(token: str, key: Any = SECRET, **options: Any) -> dict[str, Any]:
    alg = jwt.get_unverified_header(token)["alg"]
    return jwt.decode(token, key, algorithms=[alg], options={"verify_exp": False,
                                                             "verify_aud": False}, **options)


def private_jwk(kind: str, **members: Any) -> dict[str, Any]:
    if kind == "RSA":
        jwk = RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                  as_dict=True)
    elif kind == "P-256":
        jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    elif kind == "P-384":
        jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True)
    return {**jwk, **members}


def public_part(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "key_ops")}


async def server_accepts(token: str, **settings: Any) -> dict[str, Any]:
    """The claims a server with these settings reads from the token (it raises a Refusal if not)."""
    config = load_config(None, {}, {"db-uri": "x", **{k.replace("_", "-"): v
                                                      for k, v in settings.items()}})
    verifier = TokenVerifier.from_config(config, reactor=reactor, clock=lambda: NOW)
    return await verifier.claims(token)


# -- the console script and python -m, decoded -------------------------------------------------


def test_console_script_mints_the_claims_with_the_configs_secret_audience_and_issuer(tmp_path: Path):
    config = tmp_path / "pgws.conf"
    config.write_text('db-uri = "$(UNSET_DATABASE_URL)"\njwt-secret = "$(TOKEN_SECRET)"\n'
                      'jwt-aud = "chat-app"\njwt-iss = "https://issuer.example"\n'
                      'key-file = "/nonexistent/key.pem"\ncertificate-file = "/nonexistent/c.pem"\n')
    before = time.time()
    token = minted(run(CONSOLE, "--config", str(config), "--mode", "rw", "--channel", "chat",
                       "--channels", "chat,news", "--claim", "sub=alice", "--claim", "n=5",
                       "--claim", 'roles=["a","b"]', "--claim", "admin=true", "--claim", 'id="7"',
                       TOKEN_SECRET=SECRET))
    claims = decode(token, audience="chat-app", issuer="https://issuer.example")
    exp = claims.pop("exp")
    assert claims == {"mode": "rw", "channel": "chat", "channels": ["chat", "news"], "sub": "alice",
                      "n": 5, "roles": ["a", "b"], "admin": True, "id": "7", "aud": "chat-app",
                      "iss": "https://issuer.example"}
    assert int(before) + 3600 <= exp <= time.time() + 3600  # the default: an hour
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}


def test_python_m_pgws_token_without_exp_and_with_the_environments_secret():
    other = "another-secret-of-at-least-32-bytes"
    token = minted(run(MODULE, "--mode", "r", "--exp", "none", PGWS_JWT_SECRET=other))
    assert decode(token, other) == {"mode": "r"}


@pytest_twisted.ensureDeferred
async def test_a_minted_jwk_token_opens_a_socket_on_a_real_server_and_relays(db_uri, db: Db, tmp_path: Path):
    """The server holds the public key (a JWKS) and an audience; the minter the private key."""
    key = private_jwk("P-256", kid="ec-1")
    (tmp_path / "private.jwk").write_text(json.dumps(key))
    config = tmp_path / "pgws.conf"
    public_set = json.dumps({"keys": [public_part(key)]})
    config.write_text(f'jwt-secret = {json.dumps(public_set)}\njwt-aud = "relay-test"\n')
    token = minted(run(CONSOLE, "--config", str(config), "--secret", f"@{tmp_path}/private.jwk",
                       "--mode", "rw", "--channel", "minted", "--claim", "sub=bob"))
    assert jwt.get_unverified_header(token)["kid"] == "ec-1"
    server = await start_server(db_uri, jwt_secret=public_set, jwt_aud="relay-test")
    try:
        client = await ws_connect(server.port, f"/{token}")
        db.notify("minted", "from the database")
        assert await client.next() == "from the database"
        db.listen("minted")
        client.send("from the socket")
        [(channel, payload)] = await db.received(1)
        envelope = json.loads(payload)
        assert (channel, envelope["payload"]) == ("minted", "from the socket")
        assert envelope["claims"]["sub"] == "bob" and envelope["claims"]["aud"] == "relay-test"
        client.close()
        await client.closed
    finally:
        await server.stop()


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "alg"), [("RSA", "RS256"), ("P-384", "ES384"), ("Ed25519", "EdDSA")])
@pytest_twisted.ensureDeferred
async def test_private_jwk_signs_with_its_algorithm_and_kid_and_the_server_accepts_it(kind, alg):
    key = private_jwk(kind, kid=f"{kind}-key")
    status, out, err = call("--secret", json.dumps(key), "--mode", "r", "--channel", "c")
    assert (status, err) == (0, "")
    token = out.strip()
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": f"{kind}-key", "typ": "JWT"}
    claims = await server_accepts(token, jwt_secret=json.dumps({"keys": [public_part(key)]}))
    assert claims == {"mode": "r", "channel": "c", "exp": int(NOW) + 3600}


@pytest_twisted.ensureDeferred
async def test_jwks_signs_with_its_first_private_key_or_the_kid_asked_for():
    first, second = private_jwk("P-256", kid="one"), private_jwk("P-256", kid="two")
    keys = json.dumps({"keys": [public_part(first), first, second]})
    public = json.dumps({"keys": [public_part(first), public_part(second)]})
    for args, kid in (((), "one"), (("--kid", "two"), "two")):
        status, out, err = call("--secret", keys, "--mode", "w", "--channel", "c", "--exp", "none", *args)
        assert (status, err) == (0, "")
        assert jwt.get_unverified_header(out.strip())["kid"] == kid
        assert await server_accepts(out.strip(), jwt_secret=public) == {"mode": "w", "channel": "c"}


def test_oct_jwk_and_base64_and_at_path_secrets_are_read_as_the_server_reads_them(tmp_path: Path):
    raw = b"\x00\xff" + b"binary secret, long enough for HS512: " * 2
    b64 = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    (tmp_path / "secret").write_text(b64 + "\n")
    status, out, err = call("--secret", f"@{tmp_path}/secret", "--mode", "r", "--channel", "c",
                            environ={"PGWS_SECRET_IS_BASE64": "true"})
    assert (status, err) == (0, "")
    assert decode(out.strip(), raw)["channel"] == "c"
    oct_key = {"kty": "oct", "k": b64, "alg": "HS512", "kid": "o"}
    status, out, err = call("--secret", json.dumps(oct_key), "--mode", "r", "--channel", "c")
    assert (status, err) == (0, "")
    assert jwt.get_unverified_header(out.strip()) == {"alg": "HS512", "kid": "o", "typ": "JWT"}
    assert decode(out.strip(), raw)["mode"] == "r"


def test_command_line_secret_wins_over_the_environment_which_wins_over_the_file(tmp_path: Path):
    config = tmp_path / "pgws.conf"
    config.write_text('jwt-secret = "file-secret-file-secret-file-secret"\n')
    env_secret, cli_secret = "env-secret-env-secret-env-secret-env", "cli-secret-cli-secret-cli-secret-cli"
    for args, environ, secret in (
        ((), {}, "file-secret-file-secret-file-secret"),
        ((), {"PGWS_JWT_SECRET": env_secret}, env_secret),
        (("--secret", cli_secret), {"PGWS_JWT_SECRET": env_secret}, cli_secret),
    ):
        status, out, err = call("--config", str(config), "--mode", "r", "--channel", "c", *args,
                                environ=environ)
        assert (status, err) == (0, "")
        assert decode(out.strip(), secret)["mode"] == "r"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("15m", 900), ("1h", 3600),
                                               ("7d", 604800), ("1h30m", 5400), (" 2H ", 7200)])
def test_exp_durations(text, seconds):
    status, out, _ = call("--secret", SECRET, "--mode", "r", "--channel", "c", "--exp", text)
    assert status == 0
    assert decode(out.strip())["exp"] == int(NOW) + seconds


def test_a_claim_that_is_not_json_is_a_string():
    status, out, _ = call("--secret", SECRET, "--mode", "r", "--channel", "c", "--claim", "a=NaN",
                          "--claim", "b=[1,", "--claim", "c=", "--claim", "d=x=y", "--claim", "e=null")
    assert status == 0
    claims = decode(out.strip())
    assert [claims[k] for k in "abcde"] == ["NaN", "[1,", "", "x=y", None]


def test_channels_are_trimmed_and_each_named_once():
    status, out, _ = call("--secret", SECRET, "--mode", "r", "--channels", "a, b", "--channels", "a")
    assert status == 0
    assert decode(out.strip())["channels"] == ["a", "b"]


def test_a_secret_that_starts_like_json_but_is_no_key_mints_with_a_warning():
    status, out, err = call("--secret", '{"kty":"RSA"' + "x" * 40, "--mode", "r")
    assert status == 0
    assert err == ("pgws token: warning: the secret starts like JSON but is not a JWK or a JWKS (a "
                   'JSON object with "kty" or "keys"); it is used as a plain HMAC secret\n')


def test_a_short_secret_mints_with_one_warning_line_that_does_not_quote_it():
    status, out, err = call("--secret", "tiny-secret", "--mode", "r", "--channel", "c")
    assert status == 0 and decode(out.strip(), "tiny-secret")["mode"] == "r"
    assert err.startswith("pgws token: warning: ") and err.count("\n") == 1
    assert "tiny-secret" not in err


# -- refusals --------------------------------------------------------------------------------------


def test_public_jwk_is_refused_with_one_line_and_status_1():
    key = private_jwk("P-256", kid="pub")
    status, line = refusal(run(CONSOLE, "--secret", json.dumps(public_part(key)), "--mode", "r"))
    assert (status, line) == (1, 'pgws token: cannot sign: the JWK is a public key: pgws token signs '
                                 'with a private key (a JWK with "d")')


def test_missing_key_is_refused_with_one_line_and_status_1():
    status, line = refusal(run(MODULE, "--mode", "r", "--channel", "c"))
    assert (status, line) == (1, "pgws token: cannot sign: no key: set jwt-secret in the config file, "
                                 "give --secret, or set PGWS_JWT_SECRET")


def test_bad_exp_is_refused_with_one_line_and_status_2():
    status, line = refusal(run(CONSOLE, "--secret", SECRET, "--mode", "r", "--exp", "soon"))
    assert (status, line) == (2, 'pgws token: --exp: expected seconds, a duration such as 30s, 15m, '
                                 '1h or 7d, or none, got "soon"')


def test_bad_mode_is_refused_with_one_line_and_status_2():
    status, line = refusal(run(MODULE, "--secret", SECRET, "--mode", "admin"))
    assert (status, line) == (2, 'pgws token: --mode: must be r, w or rw, got "admin"')


def test_unknown_command_is_one_line_and_status_2():
    status, line = refusal(run([PGWS], "serve"))
    assert status == 2 and line.startswith('pgws: unknown command "serve"; usage: pgws token')


@pytest.mark.parametrize(("args", "environ", "status", "line"), [
    ((), {}, 2, "the following arguments are required: --mode"),
    (("--mode", "r", "--exp", "0"), {}, 2, '--exp: must be more than 0 seconds, got "0"'),
    (("--mode", "r", "--claim", "sub"), {}, 2, '--claim: expected NAME=VALUE, got "sub"'),
    (("--mode", "r", "--claim", "mode=w"), {}, 2, "--claim mode: use --mode"),
    (("--mode", "r", "--claim", "exp=1"), {}, 2, "--claim exp: use --exp"),
    (("--mode", "r", "--claim", "a=1", "--claim", "a=2"), {}, 2, "--claim a: given twice"),
    (("--mode", "r", "--channel", "a", "--channels", "b,c"), {}, 2,
     '--channel "a" is not in --channels: the server would refuse every socket'),
    (("--mode", "r", "--channel", "x" * 64), {}, 2,
     f'--channel: channel "{"x" * 64}" is 64 bytes long; the limit is 63'),
    (("--mode", "r", "--channels", "a,,b"), {}, 2, "--channels: channel name is empty"),
    (("--mode", "r", "--channel", "a", "--channel", "b"), {}, 2,
     "--channel: given twice; a token names one channel, --channels allows several"),
    (("--mode", "r", "--claim", "x=[1, 2e400]"), {}, 2,
     '--claim x: "2e400" is too large for a JSON number'),
    (("--mode", "r", "--exp", "99999999999999999d"), {}, 2,
     '--exp: "99999999999999999d" is after the year 9999; use --exp none for a token that does '
     "not expire"),
    (("--mode", "r", "--claim", "big=" + "x" * 9000), {}, 2,
     "the token is 12132 bytes long; the server refuses tokens over 8192 bytes"),
    (("--mode", "r", "--kid", "k"), {}, 2, "--kid: the secret is a plain HMAC secret, which has no kid"),
    (("--mode", "r", "--secret-is-base64", "true"), {"PGWS_JWT_SECRET": "not base64!"}, 2,
     '"jwt-secret": secret-is-base64 is true but the secret is not base64'),
    (("--mode", "r", "--secret-is-base64", "maybe"), {}, 2,
     "\"secret-is-base64\" (from --secret-is-base64): expected true or false, got 'maybe'"),
    (("--mode", "r", "--secret", "@/nonexistent/secret"), {}, 2,
     '"jwt-secret": cannot read /nonexistent/secret: No such file or directory'),
    (("--mode", "r", "--secret", ""), {"PGWS_JWT_JWKS_URL": "https://keys.example/jwks"}, 1,
     "cannot sign: the server's keys come from jwt-jwks-url, which holds public keys only: give the "
     "private key with --secret"),
    (("--mode", "r", "--secret", "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"), {}, 1,
     "cannot sign: the secret is a PEM or SSH key: give the private key as a JWK (the server takes "
     "the public one as a JWK too)"),
])
def test_refusals(args, environ, status, line):
    environ = {"PGWS_JWT_SECRET": SECRET, **environ}
    assert call(*args, environ=environ) == (status, "", f"pgws token: {line}\n")


def test_key_sets_it_cannot_sign_with_are_refused():
    public = public_part(private_jwk("P-256", kid="p"))
    nameless = {k: v for k, v in private_jwk("P-256").items() if k != "kid"}
    broken = {**private_jwk("P-256", kid="b"), "d": "AAAA"}
    for secret, status, line in (
        ({"keys": [public]}, 1, 'cannot sign: the JWKS holds public keys only: pgws token signs '
                                'with a private key (a JWK with "d")'),
        ({"keys": [public, nameless]}, 1,
         "cannot sign: key #2 of the JWKS has no kid: the server picks a key of a set by its kid"),
        (broken, 1, "cannot sign: the JWK is not a valid private EC key for ES256"),
        ({"keys": [{"kty": "nope"}]}, 1, "cannot sign: the JWKS has no usable signing key: key #1: kty "
                                         '"nope" is not supported; use oct, RSA, EC or OKP'),
    ):
        assert call("--secret", json.dumps(secret), "--mode", "r") == (status, "", f"pgws token: {line}\n")
    assert call("--secret", json.dumps({"keys": [public]}), "--mode", "r", "--kid", "q") == (
        2, "", 'pgws token: --kid: no usable key of the JWKS has kid "q"\n')


def test_an_unset_variable_in_the_secret_is_refused_but_not_in_other_settings(tmp_path: Path):
    config = tmp_path / "pgws.conf"
    config.write_text('db-uri = "$(UNSET_DB)"\njwt-secret = "$(UNSET_SECRET)"\n')
    assert call("--config", str(config), "--mode", "r") == (
        2, "", 'pgws token: "jwt-secret": environment variable UNSET_SECRET used as $(UNSET_SECRET) '
               "is not set\n")
    status, out, err = call("--config", str(config), "--mode", "r", "--channel", "c",
                            environ={"UNSET_SECRET": SECRET})
    assert (status, err) == (0, "") and decode(out.strip())["mode"] == "r"
