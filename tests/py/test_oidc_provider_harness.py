"""Self-test of the OpenID provider harness (oidc_provider.py, oidc/provider.mjs): the real
oidc-provider issues RFC 9068 JWT access tokens for any resource, with the clients' tenant and
roles, that verify at its JWKS, across a key rotation. No mcpd here."""

from __future__ import annotations

import time

import httpx2
import jwt
import pytest

from oidc_provider import OidcProvider, TokenError

RESOURCE = "https://127.0.0.1:9/mcp"
TTL = 120
CLIENTS = [
    {"client_id": "acme-ci", "client_secret": "acme-secret", "tenant": "acme", "roles": ["user"], "scope": "mcp"},
    {"client_id": "ops", "client_secret": "ops-secret", "roles": ["cluster-admin"], "scope": "mcp admin"},
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    with OidcProvider(tmp_path_factory.mktemp("oidc"), CLIENTS, ttl=TTL) as p:
        yield p


def verify(idp: OidcProvider, token: str, audience: str = RESOURCE) -> dict:
    """Verifies `token` against the JWKS the provider serves over HTTP."""
    kid = jwt.get_unverified_header(token).get("kid", idp.kid)
    jwk = next(k for k in idp.jwks()["keys"] if k["kid"] == kid)
    key = jwt.PyJWK(jwk).key
    return jwt.decode(
        token, key, algorithms=["RS256"], audience=audience, issuer=idp.issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )


def test_client_credentials_jwt_for_any_resource(idp):
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert idp.metadata["issuer"] == idp.issuer
    assert idp.jwks_uri == f"{idp.issuer}/jwks"
    assert "client_credentials" in idp.metadata["grant_types_supported"]

    token = idp.token("acme-ci", RESOURCE, scope="mcp")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": idp.kid}
    claims = verify(idp, token)
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == RESOURCE
    assert claims["sub"] == "acme-ci"
    assert claims["client_id"] == "acme-ci"
    assert claims["tenant"] == "acme"
    assert claims["roles"] == ["user"]
    assert claims["scope"] == "mcp"
    assert claims["exp"] - claims["iat"] == TTL
    assert abs(claims["iat"] - time.time()) < 60
    assert claims["jti"]
    assert set(claims) == {"iss", "aud", "sub", "client_id", "tenant", "roles", "scope", "iat", "exp", "jti"}

    # Another client, another resource: no tenant, two scopes.
    other = "https://node2.example:8443/servers/time/mcp"
    claims = verify(idp, idp.token("ops", other, scope="mcp admin"), audience=other)
    assert (claims["aud"], claims["sub"], claims["roles"], claims["scope"]) == (
        other, "ops", ["cluster-admin"], "mcp admin"
    )
    assert "tenant" not in claims

    # A scope the client may not have, or a wrong secret: the provider's error comes back.
    with pytest.raises(TokenError) as e:
        idp.token("acme-ci", RESOURCE, scope="admin")
    assert e.value.status == 400 and e.value.body["error"] == "invalid_scope"
    r = httpx2.post(
        idp.token_endpoint, auth=("acme-ci", "wrong"), timeout=10,
        data={"grant_type": "client_credentials", "resource": RESOURCE},
    )
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")


def test_forged_tokens_use_the_same_layout(idp):
    real = verify(idp, idp.token("acme-ci", RESOURCE, scope="mcp"))
    forged = idp.claims("acme-ci", RESOURCE, scope="mcp")
    assert set(forged) == set(real)
    # Signed with the provider's key, a forged token verifies like a real one...
    assert verify(idp, idp.forge(forged))["sub"] == "acme-ci"
    # ...and the broken variants are refused by a verifier.
    with pytest.raises(jwt.InvalidAlgorithmError):
        verify(idp, idp.forge(forged, alg="none"))
    with pytest.raises(jwt.ImmatureSignatureError):
        verify(idp, idp.forge(idp.claims("acme-ci", RESOURCE, nbf=int(time.time()) + 3600)))
    with pytest.raises(jwt.InvalidIssuerError):
        verify(idp, idp.forge(idp.claims("acme-ci", RESOURCE, iss="http://127.0.0.1:1")))


def test_rotate(idp):
    old_kid = idp.kid
    old_token = idp.token("ops", RESOURCE, scope="mcp")
    port = idp.port

    new_kid = idp.rotate()
    assert idp.port == port
    assert [k["kid"] for k in idp.jwks()["keys"]] == [new_kid, old_kid]
    new_token = idp.token("ops", RESOURCE, scope="mcp")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert verify(idp, new_token)["sub"] == "ops"
    assert verify(idp, old_token)["sub"] == "ops"  # the old key is still published

    # A real restart keeps the port, the issuer and the keys.
    idp.restart()
    assert idp.port == port and idp.issuer == f"http://127.0.0.1:{port}"
    assert [k["kid"] for k in idp.jwks()["keys"]] == [new_kid, old_kid]
    assert jwt.get_unverified_header(idp.token("ops", RESOURCE))["kid"] == new_kid

    idp.drop_old_keys()
    assert [k["kid"] for k in idp.jwks()["keys"]] == [new_kid]
