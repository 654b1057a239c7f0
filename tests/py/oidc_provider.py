"""A real OpenID provider for the tests of JWT/OIDC authentication: the certified `oidc-provider`
npm package (tests/py/npm, installed into .tools/npm) run by Node 22 with tests/py/oidc/provider.mjs
on 127.0.0.1, issuer `http://127.0.0.1:PORT`. No mock: tokens come from its token endpoint.

    with OidcProvider(tmp_path, [{"client_id": "ci", "client_secret": "s", "tenant": "acme",
                                  "roles": ["user"], "scope": "mcp admin"}]) as idp:
        token = idp.token("ci", resource="https://127.0.0.1:8443/mcp", scope="mcp")

Access tokens (client credentials + `resource`) are RFC 9068 JWTs, header
`{"alg": "RS256", "typ": "at+jwt", "kid": KID}`, claims
`tenant?, roles?, jti, sub (= client_id), iat, exp (= iat + ttl), scope?, client_id, iss, aud
(= the resource)`. Without a `resource` the provider issues an *opaque* token instead.

`rotate()` puts a new signing key first and keeps the old one published; `private_key_pem()`,
`private_key_pem()`, `claims()` and `forge()` let a test make tokens the provider never issued.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import select
import signal
import subprocess
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import httpx2
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
NPM = ROOT / ".tools/npm/node_modules"
NODE22 = NPM / ".bin/node"
PROVIDER_MJS = Path(__file__).resolve().parent / "oidc" / "provider.mjs"

START_TIMEOUT = 20.0

# Providers running now: killed at exit whatever happens to the test (their stdin, a pipe from
# us, also closes when this process dies, and provider.mjs then exits on its own).
_LIVE: set[subprocess.Popen] = set()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _LIVE.discard(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        _kill(proc)


class TokenError(Exception):
    """The token endpoint refused: `status` and the provider's error `body` (its JSON, or text)."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"token endpoint answered {status}: {body}")
        self.status = status
        self.body = body


def new_rsa_jwk(kid: str | None = None) -> dict:
    """A fresh RSA 2048 private JWK (RS256, use sig) with a random `kid`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.update(kid=kid or secrets.token_hex(8), alg="RS256", use="sig")
    return jwk


class OidcProvider:
    """One oidc-provider process. `clients`: dicts of `client_id`, `client_secret` and optionally
    `tenant` (str), `roles` (list of str), `scope` ("mcp admin": what it may ask for) and any other
    client metadata (`token_endpoint_auth_method: client_secret_post`, ...). `ttl`: lifetime of
    the client-credentials access tokens, in seconds. `scopes`: extra scopes the provider knows
    (those in the clients' `scope` are known anyway), for dynamically registered clients."""

    def __init__(self, dir: Path, clients: list[dict], ttl: int = 300, scopes: Iterable[str] = ()):
        self.dir = Path(dir)
        self.clients = [dict(c) for c in clients]
        self.ttl = ttl
        self.scopes = list(scopes)
        self.keys: list[dict] = []
        self.port = 0
        self.issuer = ""
        self.metadata: dict = {}
        self.proc: subprocess.Popen | None = None
        self.keys_file = self.dir / "oidc-keys.json"
        self.clients_file = self.dir / "oidc-clients.json"
        self.log_file = self.dir / "oidc-provider.log"

    # --- lifecycle ---

    def start(self) -> OidcProvider:
        """Generates the signing key (first start only), writes the files, starts the provider
        (on the same port as before when restarted) and waits until its discovery answers."""
        assert self.proc is None, "already started"
        if not NODE22.exists():
            raise RuntimeError(f"{NODE22} is missing: scripts/test.sh installs the npm test tools")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.keys:
            self.keys = [new_rsa_jwk()]
        self._write_keys()
        _write_json(self.clients_file, self.clients)

        argv = [
            str(NODE22), str(PROVIDER_MJS),
            "--port", str(self.port),
            "--keys", str(self.keys_file),
            "--clients", str(self.clients_file),
            "--ttl", str(self.ttl),
            "--scopes", " ".join(self.scopes),
            "--modules", str(NPM),
            "--exit-on-stdin-eof",
        ]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.log_file, "ab") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True,
                )
            _LIVE.add(proc)
            try:
                ready = self._read_ready_line(proc, deadline)
                break
            except RuntimeError:
                _kill(proc)
                # A restart on a fixed port can lose a race for it: try again until the deadline.
                if self.port and time.monotonic() < deadline and "EADDRINUSE" in self.log_tail():
                    time.sleep(0.1)
                    continue
                raise
        self.proc = proc
        self.issuer, self.port = ready["issuer"], ready["port"]
        self.metadata = wait_until(
            self._discovery, START_TIMEOUT, f"{self.issuer}/.well-known/openid-configuration", 0.05
        )
        return self

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL after 5 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                _kill(proc)
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()
        _LIVE.discard(proc)

    def restart(self) -> None:
        """A real restart of the process: same port, same issuer, same keys and clients (but the
        provider's in-memory state, e.g. dynamically registered clients, is gone)."""
        self.stop()
        self.start()

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- endpoints ---

    @property
    def jwks_uri(self) -> str:
        return self.metadata["jwks_uri"]

    @property
    def token_endpoint(self) -> str:
        return self.metadata["token_endpoint"]

    @property
    def registration_endpoint(self) -> str:
        return self.metadata["registration_endpoint"]

    def jwks(self) -> dict:
        """The public JWKS as the provider serves it."""
        r = httpx2.get(self.jwks_uri, timeout=10)
        r.raise_for_status()
        return r.json()

    def token_response(self, client_id: str, resource: str | None = None, scope: str | None = None) -> dict:
        """The token endpoint's JSON answer to a client-credentials grant (raises TokenError)."""
        client = self._client(client_id)
        form = {"grant_type": "client_credentials"}
        if resource is not None:
            form["resource"] = resource
        if scope is not None:
            form["scope"] = scope
        headers = {}
        if client.get("token_endpoint_auth_method") == "client_secret_post":
            form.update(client_id=client_id, client_secret=client["client_secret"])
        else:  # client_secret_basic: RFC 6749 2.3.1 form-encodes both before base64
            creds = f"{quote(client_id, safe='')}:{quote(client['client_secret'], safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
        r = httpx2.post(self.token_endpoint, data=form, headers=headers, timeout=10)
        if r.status_code != 200:
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            raise TokenError(r.status_code, body)
        return r.json()

    def token(self, client_id: str, resource: str, scope: str | None = None) -> str:
        """An access token (a JWT whose `aud` is `resource`) for `client_id` by the
        client-credentials grant."""
        return self.token_response(client_id, resource, scope)["access_token"]

    # --- keys ---

    @property
    def kid(self) -> str:
        """The `kid` of the signing key."""
        return self.keys[0]["kid"]

    def private_key_pem(self) -> bytes:
        """The signing key, PKCS#8 PEM (what PyJWT takes for RS256)."""
        key = jwt.algorithms.RSAAlgorithm.from_jwk(self.keys[0])
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def rotate(self) -> str:
        """Key rotation: a new signing key first, the old ones kept after it (still published,
        so tokens they signed still verify). The running provider reloads its keys (SIGHUP to
        provider.mjs: same process, same port, registrations kept); returns when its JWKS leads
        with the new key. Returns the new `kid`."""
        self.keys.insert(0, new_rsa_jwk())
        self._reload()
        return self.kid

    def drop_old_keys(self) -> None:
        """Unpublishes every key but the signing one (tokens the old keys signed stop verifying)."""
        del self.keys[1:]
        self._reload()

    def claims(self, client_id: str, resource: str, scope: str | None = None, **overrides: Any) -> dict:
        """A claim set of the layout the provider issues (see the module doc), valid now, for
        forging tokens; `overrides` replace or add claims (a value of None removes the claim)."""
        client = self._client(client_id)
        now = int(time.time())
        claims: dict[str, Any] = {}
        for extra in ("tenant", "roles"):
            if extra in client:
                claims[extra] = client[extra]
        claims.update(
            jti=secrets.token_urlsafe(32), sub=client_id, iat=now, exp=now + self.ttl,
            scope=scope, client_id=client_id, iss=self.issuer, aud=resource,
        )
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def forge(self, claims: dict, alg: str = "RS256", key: Any = None, headers: dict | None = None) -> str:
        """Signs `claims` outside the provider: with its signing key by default (so only the
        claims make it wrong), `key` otherwise; `alg="none"` makes an unsigned token (no `kid`).
        The header is the provider's (`typ: at+jwt`, `kid`), updated with `headers`."""
        if alg == "none":
            return jwt.encode(claims, None, algorithm="none", headers={"typ": "at+jwt", **(headers or {})})
        header = {"typ": "at+jwt", "kid": self.kid, **(headers or {})}
        return jwt.encode(claims, key if key is not None else self.private_key_pem(), algorithm=alg, headers=header)

    # --- internals ---

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _client(self, client_id: str) -> dict:
        for c in self.clients:
            if c["client_id"] == client_id:
                return c
        raise KeyError(f"no client {client_id!r} in this provider")

    def _write_keys(self) -> None:
        _write_json(self.keys_file, {"keys": self.keys})

    def _reload(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "provider not running"
        self._write_keys()
        self.proc.send_signal(signal.SIGHUP)
        want = [k["kid"] for k in self.keys]
        wait_until(
            lambda: [k["kid"] for k in self.jwks()["keys"]] == want,
            START_TIMEOUT, f"the provider to publish keys {want}", 0.05,
        )

    def _discovery(self) -> dict | None:
        r = httpx2.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
        return r.json() if r.status_code == 200 else None

    def _read_ready_line(self, proc: subprocess.Popen, deadline: float) -> dict:
        """The `{"issuer", "port"}` line provider.mjs prints when it listens."""
        fd = proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"oidc provider: no ready line within {START_TIMEOUT} s\n{self.log_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    proc.wait(5)
                    raise RuntimeError(
                        f"oidc provider exited ({proc.returncode}) before listening\n{self.log_tail()}"
                    )
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            ready = json.loads(line)
            return {"issuer": ready["issuer"], "port": int(ready["port"])}
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"oidc provider: bad ready line {line!r} ({e})") from e


def _write_json(path: Path, value: Any) -> None:
    """Writes atomically (the provider may re-read it at any time)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
