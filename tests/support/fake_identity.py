"""A fake Microsoft Entra ID token endpoint (OAuth2 client credentials) on 127.0.0.1, over TLS.

Serves what msal asks for: the OpenID discovery document
(``/{tenant}/v2.0/.well-known/openid-configuration``) and ``/{tenant}/oauth2/v2.0/token``.
Validates the client secret, or the client-assertion JWT of certificate credentials (RFC 7523:
signature against the registered certificate, ``x5t#S256``/``x5t``, ``aud``, ``iss``, ``sub``,
``exp``). Issues opaque tokens with a configurable ``expires_in``, counts them, and lets a test
expire or revoke them (the fake Graph asks ``valid()``). Errors have Entra's shape:
``{"error", "error_description": "AADSTS...", "error_codes", "trace_id", "correlation_id"}``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Issued:
    token: str
    client_id: str
    scope: str
    expires_at: float
    revoked: bool = False


@dataclass
class TokenRequest:
    form: dict[str, str]
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class FakeIdentity:
    """``async with FakeIdentity(tls, client_secret="s3cret") as idp:`` then ``idp.authority``."""

    server_tls: ssl.SSLContext
    tenant: str = "contoso-tenant"
    client_id: str = "11111111-2222-3333-4444-555555555555"
    client_secret: str | None = None
    certificate: x509.Certificate | None = None
    expires_in: int = 3600
    scope: str = GRAPH_SCOPE
    issued: list[Issued] = field(default_factory=list)
    requests: list[TokenRequest] = field(default_factory=list)
    _failures: deque[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=deque)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def authority(self) -> str:
        """The ``authority_url`` to configure (without the tenant)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/{self.tenant}/oauth2/v2.0/token"

    # --- test controls ----------------------------------------------------------------------

    def fail_next(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._failures.append((status, body, headers or {}))

    def expire_all(self) -> None:
        """Every token issued so far is past its lifetime now (as if an hour went by)."""
        for item in self.issued:
            item.expires_at = 0.0

    def revoke_all(self) -> None:
        for item in self.issued:
            item.revoked = True

    def valid(self, token: str, scope: str) -> bool:
        for item in self.issued:
            if secrets.compare_digest(item.token, token):
                return not item.revoked and item.expires_at > time.time() and item.scope == scope
        return False

    # --- serving ---------------------------------------------------------------------------

    async def __aenter__(self) -> FakeIdentity:
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._discovery)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.server_tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _error(self, status: int, error: str, code: int, text: str) -> web.Response:
        trace = str(uuid.uuid4())
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace}",
            "error_codes": [code],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
        }
        return web.json_response(body, status=status)

    async def _discovery(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant != self.tenant:
            return self._error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        base = f"{self.authority}/{tenant}"
        return web.json_response(
            {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "token"],
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        response = self._answer(request.match_info["tenant"], form)
        self.requests.append(TokenRequest(form, response.status))
        return response

    def _answer(self, tenant: str, form: dict[str, str]) -> web.Response:
        if self._failures:
            status, body, headers = self._failures.popleft()
            return web.json_response(body, status=status, headers=headers)
        if tenant != self.tenant:
            return self._error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._error(400, "unsupported_grant_type", 70003, "Unsupported grant type.")
        if form.get("client_id") != self.client_id:
            return self._error(400, "unauthorized_client", 700016, "Application not found.")
        if form.get("scope") != self.scope:
            return self._error(
                400, "invalid_scope", 1002012, "The provided value for scope is not valid."
            )
        refused = self._check_credential(form)
        if refused is not None:
            return refused
        token = f"fake-at-{len(self.issued) + 1}-{secrets.token_urlsafe(16)}"
        self.issued.append(Issued(token, self.client_id, self.scope, time.time() + self.expires_in))
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": token,
            }
        )

    def _check_credential(self, form: dict[str, str]) -> web.Response | None:
        if self.client_secret is not None:
            given = form.get("client_secret", "")
            if given and secrets.compare_digest(given, self.client_secret):
                return None
            return self._error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        if form.get("client_assertion_type") != ASSERTION_TYPE or "client_assertion" not in form:
            return self._error(401, "invalid_client", 7000216, "client_assertion is required.")
        problem = self._assertion_problem(form["client_assertion"])
        if problem:
            return self._error(
                401, "invalid_client", 700027, f"Client assertion failed: {problem}."
            )
        return None

    def _assertion_problem(self, assertion: str) -> str:
        assert self.certificate is not None
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return "not a JWT"
        if header.get("alg") not in ("PS256", "RS256"):
            return "unsupported alg"
        # base64url of the digest; msal keeps the "=" padding, RFC 7515 §2 drops it.
        given_s256 = str(header.get("x5t#S256", "")).rstrip("=")
        given_s1 = str(header.get("x5t", "")).rstrip("=")
        sha1 = hashlib.sha1(der, usedforsecurity=False).digest()
        named = given_s256 == _b64url(hashlib.sha256(der).digest()) or given_s1 == _b64url(sha1)
        if not named:
            return "unknown certificate thumbprint"
        try:
            claims = jwt.decode(
                assertion,
                self.certificate.public_key(),  # type: ignore[arg-type]
                algorithms=[header["alg"]],
                audience=self.token_endpoint,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return f"invalid ({type(exc).__name__})"
        if claims["iss"] != self.client_id or claims["sub"] != self.client_id:
            return "wrong iss/sub"
        return ""
