"""OAuth2 client-credentials tokens for the ``graph`` provider, through msal (``smtp2api[graph]``).

msal is synchronous: it runs in a worker thread, one acquisition at a time, with its HTTP going
through an ``httpx.Client`` of ours (no redirects, the provider's timeout) and only ever to the
configured ``authority_url``: instance discovery and regional endpoints are switched off.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import structlog

from smtp2api import __version__, config, replies
from smtp2api.errors import (
    ConfigError,
    DeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from smtp2api.providers.base import annotate, map_http_errors, redact, retry_after_seconds
from smtp2api.replies import sanitize_text

log = structlog.get_logger("smtp2api.providers.graph")

# msal treats a cached token with less than 5 minutes left as expired and fetches a new one
# (``_acquire_token_silent_from_cache_and_possibly_refresh_it``); our in-loop memo stops at the
# same point, so msal is only asked when it would refresh.
MSAL_MARGIN = 300.0
_PEM = b"-----BEGIN"
_AADSTS = re.compile(r"AADSTS\d+")  # Entra's error numbers, e.g. AADSTS90002: no such tenant


def _load_msal(name: str) -> Any:
    try:
        import msal
    except ImportError:
        raise ConfigError(
            [f"providers.{name}.type: 'graph' needs msal; install smtp2api[graph]"]
        ) from None
    return msal


def load_certificate(name: str, path: Path, password: str | None) -> dict[str, str]:
    """msal's ``client_credential`` for a certificate: PEM (key + certificate) or PKCS#12.

    Read and checked at startup, so a wrong path, password or key type is a ConfigError
    (exit 78) rather than a stream of 451s. msal signs the client assertion with PS256 and
    names the certificate by its SHA-256 thumbprint (``x5t#S256``) when given the certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12

    where = f"providers.{name}.certificate_file"
    secret = password.encode() if password else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path} ({exc.strerror})"]) from None
    try:
        if _PEM in data:
            key: object = serialization.load_pem_private_key(data, secret)
            certs = x509.load_pem_x509_certificates(data)
        else:
            key, cert, extra = pkcs12.load_key_and_certificates(data, secret)
            certs = [c for c in (cert, *extra) if c is not None]
    except (ValueError, TypeError) as exc:
        # cryptography says "Bad decrypt", "password was not given", "Could not deserialize"
        raise ConfigError([f"{where}: cannot load the key and certificate ({exc})"]) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError([f"{where}: Microsoft Entra ID needs an RSA key"])
    matching = [c for c in certs if c.public_key() == key.public_key()]
    if not matching:
        raise ConfigError([f"{where}: holds no certificate for its private key"])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # held in memory only, as msal would after decrypting
    )
    cert_pem = matching[0].public_bytes(serialization.Encoding.PEM)
    return {"private_key": key_pem.decode("ascii"), "public_certificate": cert_pem.decode("ascii")}


class MsalHttp:
    """The HTTP client msal calls (``msal.oauth2cli.http.HttpClient``), on ``httpx.Client``.

    Remembers the status and headers of the last POST: msal hands back only the JSON of a
    failed token request, and 429 / 5xx must not be reported as bad credentials.
    """

    def __init__(self, client: httpx.Client) -> None:
        self._client = client
        self.last_status = 0
        self.last_headers: dict[str, str] = {}

    def post(
        self,
        url: str,
        params: dict[str, Any] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        if isinstance(data, str | bytes):  # msal's "send as-is" form
            response = self._client.post(url, params=params, content=data, headers=headers)
        else:
            # msal passes the client assertion JWT as bytes; httpx would send its repr().
            form = {k: v.decode() if isinstance(v, bytes) else v for k, v in (data or {}).items()}
            response = self._client.post(url, params=params, data=form, headers=headers)
        self.last_status, self.last_headers = response.status_code, dict(response.headers)
        return response

    def get(
        self,
        url: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        return self._client.get(url, params=params, headers=headers)

    def close(self) -> None:
        self._client.close()


class TokenSource:
    """Bearer tokens for ``{graph_url}/.default``: cached, refreshed before expiry by msal.

    ``get()`` answers from memory while the token is good; otherwise one worker thread asks
    msal (its cache, else the token endpoint). ``invalidate(token)`` drops a token Graph
    refused, so the next ``get()`` fetches a new one: once, however many sends saw the 401.
    """

    def __init__(self, name: str, settings: config.GraphProvider) -> None:
        self._msal = _load_msal(name)
        self.name = name
        self._client_id = settings.client_id
        self._authority = f"{settings.authority_url}/{settings.tenant_id}"
        if not self._authority.startswith("https://"):
            # msal parses only https authorities (authority.canonicalize).
            raise ConfigError([f"providers.{name}.authority_url: must use https (msal)"])
        self.scope = f"{settings.graph_url}/.default"
        if settings.client_secret is not None:
            secret = settings.client_secret.get_secret_value()
            self._credential: str | dict[str, str] = secret
            self._secrets: tuple[str, ...] = (secret,)
        else:
            assert settings.certificate_file is not None  # the config allows one or the other
            password = settings.certificate_password
            self._credential = load_certificate(
                name, settings.certificate_file, password.get_secret_value() if password else None
            )
            self._secrets = (password.get_secret_value(),) if password else ()
        self._http = MsalHttp(
            httpx.Client(
                follow_redirects=False,  # design §8
                timeout=httpx.Timeout(settings.timeout),
                headers={"User-Agent": f"smtp2api/{__version__}"},
            )
        )
        self._app: Any = None  # built in the thread: msal fetches the OpenID metadata at once
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._fresh_until = 0.0  # time.monotonic() after which msal is asked again

    async def get(self) -> str:
        if self._token is not None and time.monotonic() < self._fresh_until:
            return self._token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._fresh_until:
                token, lifetime = await asyncio.to_thread(self._acquire)
                self._token, self._fresh_until = token, time.monotonic() + lifetime
            return self._token

    async def invalidate(self, token: str) -> None:
        """Forget ``token`` (Graph said 401) unless a newer one has replaced it already."""
        async with self._lock:
            if token == self._token:
                self._token = None
                await asyncio.to_thread(self._forget, token)

    def close(self) -> None:
        self._http.close()

    # --- in the worker thread ------------------------------------------------------------------

    def _application(self) -> Any:
        if self._app is None:
            self._app = self._msal.ConfidentialClientApplication(
                self._client_id,
                client_credential=self._credential,
                authority=self._authority,
                http_client=self._http,
                # Only the configured authority is ever contacted: no instance discovery at
                # login.microsoftonline.com, no regional endpoint or IMDS probing. National
                # clouds and local test endpoints work as configured.
                instance_discovery=False,
                azure_region=False,
            )
        return self._app

    def _acquire(self) -> tuple[str, float]:
        """(token, seconds to trust it without asking msal again)."""
        with map_http_errors():
            try:
                app = self._application()
                result = app.acquire_token_for_client(scopes=[self.scope])
            except self._msal.exceptions.MsalServiceError as exc:  # 5xx from the endpoint
                raise ProviderUnavailable(
                    f"token endpoint error: {type(exc).__name__}", status=self._http.last_status
                ) from None
            except ValueError as exc:  # OpenID discovery refused: wrong tenant or authority
                # msal's own message drops the endpoint's answer; the one it replaced has it.
                raise self._authority_error(f"{exc} {exc.__context__ or ''}") from None
        if "access_token" not in result:
            raise self._token_error(result)
        if result.get("token_source") != "cache":
            log.info(
                "graph_token_acquired", provider=self.name, expires_in=result.get("expires_in")
            )
        lifetime = float(result.get("expires_in") or 0) - MSAL_MARGIN
        if result.get("refresh_on"):  # msal's proactive refresh point of long-lived tokens
            lifetime = min(lifetime, float(result["refresh_on"]) - time.time())
        return str(result["access_token"]), max(lifetime, 0.0)

    def _forget(self, token: str) -> None:
        app = self._app
        if app is None:
            return
        cache = app.token_cache
        kind = cache.CredentialType.ACCESS_TOKEN
        # Collected first: search() holds the cache lock while it yields.
        stale = [at for at in cache.search(kind, target=[self.scope]) if at.get("secret") == token]
        for entry in stale:
            cache.remove_at(entry)

    def _authority_error(self, text: str) -> DeliveryError:
        found = _AADSTS.search(text)
        code = found.group(0) if found else "authority"
        log.error(
            "graph_token_refused",
            provider=self.name,
            error=code,
            hint="check tenant_id and authority_url",
        )
        return ProviderConfigError(
            f"token authority rejected: {redact(text[:300], self._secrets)}",
            reply=annotate(replies.R451_PROVIDER_CONFIG, "", code),
            provider_code=code,
        )

    def _token_error(self, result: dict[str, Any]) -> DeliveryError:
        """An error answer of the token endpoint: ``invalid_client``, ``unauthorized_client``..."""
        status = self._http.last_status
        code = sanitize_text(str(result.get("error") or "token_error"), 40)
        codes = result.get("error_codes") or []
        aadsts = f"AADSTS{codes[0]}" if codes and isinstance(codes[0], int) else None
        described = redact(str(result.get("error_description") or "")[:400], self._secrets)
        request_id = sanitize_text(str(result.get("trace_id") or ""), 80) or None
        detail = f"token endpoint HTTP {status}: {code}: {sanitize_text(described, 300)}"
        if status == 429:
            return RateLimited(
                detail,
                retry_after=retry_after_seconds(self._http.last_headers),
                provider_code=code,
                request_id=request_id,
                status=status,
            )
        # invalid_client (bad secret, expired certificate), unauthorized_client, invalid_scope,
        # tenant not found: the gateway's own credentials, so 4xx and an alert (design §4).
        log.error(
            "graph_token_refused",
            provider=self.name,
            error=code,
            aadsts=aadsts,
            hint="check tenant_id, client_id and the client secret or certificate",
        )
        return ProviderConfigError(
            detail,
            reply=annotate(replies.R451_PROVIDER_CONFIG, "", aadsts or code, request_id),
            provider_code=aadsts or code,
            request_id=request_id,
            status=status,
        )
