"""Settings: the TOML file plus ``SMTP2API_*`` environment overrides, validated as pure data.

``load_settings`` is the only entry point; it raises ``ConfigError`` with one line per
problem, each naming the key (``smtp.listen[0]: ...``). Live objects are built in ``app.py``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from smtp2api.errors import ConfigError
from smtp2api.units import parse_duration, parse_hostport, parse_size

ENV_PREFIX = "SMTP2API_"
CONFIG_ENV = "SMTP2API_CONFIG"  # reserved: the config path, not a setting
DEFAULT_CONFIG_PATH = Path("/etc/smtp2api/config.toml")


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


# Cloud instance-metadata endpoints outside the link-local ranges (169.254.169.254, the AWS,
# GCP, Azure, OCI and DigitalOcean one, is link-local already): AWS IMDS over IPv6, Alibaba.
_METADATA_IPS = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits


def refused_upstream_address(address: str) -> str | None:
    """Why an API may not be reached at this IP address (design §8), or None when it may.

    Refused: link-local (169.254.0.0/16 holds the cloud metadata service), known metadata
    addresses, multicast, unspecified (0.0.0.0 reaches the local host) and broadcast,
    also when written as IPv4-mapped or NAT64 IPv6. Loopback and private ranges are allowed:
    sidecars and internal API gateways live there.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_link_local or ip in _METADATA_IPS:
        return "link-local and cloud metadata addresses are refused"
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "multicast, unspecified and broadcast addresses are refused"
    return None


def _check_upstream_url(value: str) -> str:
    """Design §8: https only, except loopback; never link-local or cloud metadata hosts.

    This checks the URL as written; ``providers.upstream`` checks every address a host name
    resolves to when a request is made."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL such as 'https://api.example.net/v1/emails'")
    host = parts.hostname
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    refusal = refused_upstream_address(host) if ip is not None else None
    if refusal is not None:
        raise ValueError(refusal)
    if host.lower().rstrip(".") in ("metadata.google.internal", "metadata", "instance-data"):
        raise ValueError("cloud metadata hosts are refused")
    loopback = host.lower() == "localhost" or (ip is not None and ip.is_loopback)
    if parts.scheme == "http" and not loopback:
        raise ValueError("must use https (plain http is allowed only for loopback hosts)")
    return value.rstrip("/")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[str, AfterValidator(_check_hostport)]
UpstreamURL = Annotated[str, AfterValidator(_check_upstream_url)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SMTPSettings(_Section):
    hostname: str = Field(default_factory=socket.getfqdn, min_length=1)
    listen: list[HostPort] = ["127.0.0.1:2525"]
    tls_listen: list[HostPort] = []
    plain_listen: list[HostPort] = []
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    require_tls: bool = True
    trusted_networks: list[IPvAnyNetwork] = [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    max_message_size: Size = Field(default=25_000_000, gt=0)
    max_recipients: int = Field(default=100, gt=0)
    max_connections: int = Field(default=2000, gt=0)
    max_connections_per_ip: int = Field(default=100, gt=0)
    idle_timeout: Duration = Field(default=300.0, gt=0)
    proxy_protocol: bool = False
    proxy_trusted_networks: list[IPvAnyNetwork] = []
    # Worker processes sharing the listening sockets (supervisor.py); 0 = one per CPU core.
    # max_connections and max_connections_per_ip apply per process.
    processes: int = Field(default=1, ge=0, le=256)
    # Hostile-input limits (docs/security.md). RFC 5322 §2.1.1: 998 octets of text per line.
    max_line_length: int = Field(default=998, ge=78, le=1_000_000)
    # DATA must average this many bytes/s once data_rate_grace has passed (0: no floor).
    min_data_rate: Size = Field(default=4000, ge=0)
    data_rate_grace: Duration = Field(default=30.0, ge=0)
    # NOOP, RSET, HELP, VRFY, EXPN, HELO, EHLO without a message accepted (Postfix's name).
    junk_command_limit: int = Field(default=100, gt=0)
    # Per client IP (IPv6: per /64), across connections: this many AUTH failures within
    # auth_lockout and AUTH is refused (421 4.7.0) until the oldest is auth_lockout old.
    auth_failure_limit: int = Field(default=10, gt=0)
    auth_lockout: Duration = Field(default=900.0, gt=0)

    @property
    def tls_configured(self) -> bool:
        return self.tls_cert_file is not None

    @model_validator(mode="after")
    def _tls_pairs(self) -> SMTPSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_listen and self.tls_cert_file is None:
            raise ValueError("tls_listen needs tls_cert_file and tls_key_file")
        if not (self.listen or self.tls_listen or self.plain_listen):
            raise ValueError("at least one of listen, tls_listen, plain_listen is required")
        if self.proxy_protocol and not self.proxy_trusted_networks:
            raise ValueError("proxy_protocol needs proxy_trusted_networks (the load balancers)")
        if self.proxy_protocol and self.tls_listen:
            # The header precedes the TLS handshake (docs/scaling.md): terminate nothing at
            # the balancer and use listen (STARTTLS) behind it, or TLS on the balancer.
            raise ValueError("tls_listen cannot be used with proxy_protocol; use listen")
        return self


class Account(_Section):
    username: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x20\x7f]+$")
    password_hash: SecretStr
    allowed_senders: list[str] = []

    @model_validator(mode="after")
    def _hash_format(self) -> Account:
        if not self.password_hash.get_secret_value().startswith("scrypt:"):
            raise ValueError("password_hash must come from `smtp2api hash-password` (scrypt:...)")
        return self


class Route(_Section):
    accounts: list[str] = []
    senders: list[str] = []
    providers: list[str] = Field(min_length=1)


class _Provider(_Section):
    timeout: Duration = Field(default=15.0, gt=0)
    base_url: UpstreamURL | None = None


class HttpProvider(_Provider):
    type: Literal["http"]
    url: UpstreamURL
    api_key: SecretStr | None = None
    headers: dict[str, str] = {}


class OutboxProvider(_Provider):
    type: Literal["outbox"]
    path: Path = Path("smtp2api-outbox")


class SesProvider(_Provider):
    type: Literal["ses"]
    region: str | None = None
    endpoint_url: UpstreamURL | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    configuration_set: str | None = None
    from_arn: str | None = None


class SendgridProvider(_Provider):
    type: Literal["sendgrid"]
    api_key: SecretStr


class MailgunProvider(_Provider):
    type: Literal["mailgun"]
    api_key: SecretStr
    domain: str = Field(min_length=1)


class PostmarkProvider(_Provider):
    type: Literal["postmark"]
    server_token: SecretStr
    message_stream: str = "outbound"


class ResendProvider(_Provider):
    type: Literal["resend"]
    api_key: SecretStr


class GraphProvider(_Provider):
    type: Literal["graph"]
    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    certificate_file: Path | None = None
    certificate_password: SecretStr | None = None
    authority_url: UpstreamURL = "https://login.microsoftonline.com"
    graph_url: UpstreamURL = "https://graph.microsoft.com"
    user_id: str | None = None
    save_to_sent_items: bool = True

    @model_validator(mode="after")
    def _one_credential(self) -> GraphProvider:
        if (self.client_secret is None) == (self.certificate_file is None):
            raise ValueError("set exactly one of client_secret and certificate_file")
        return self


ProviderSettings = Annotated[
    HttpProvider
    | OutboxProvider
    | SesProvider
    | SendgridProvider
    | MailgunProvider
    | PostmarkProvider
    | ResendProvider
    | GraphProvider,
    Field(discriminator="type"),
]
PROVIDER_TYPES = ("http", "outbox", "ses", "sendgrid", "mailgun", "postmark", "resend", "graph")


class DeliverySettings(_Section):
    mode: Literal["queue", "hybrid", "sync"] = "hybrid"
    sync_timeout: Duration = Field(default=10.0, gt=0)
    max_age: Duration = Field(default=5 * 86400.0, gt=0)
    backoff_min: Duration = Field(default=30.0, gt=0)
    backoff_max: Duration = Field(default=3600.0, gt=0)
    concurrency: int = Field(default=64, gt=0, le=10_000)
    soft_bounce: bool = False
    circuit_threshold: int = Field(default=5, ge=1)
    circuit_cooldown: Duration = Field(default=30.0, gt=0)
    bounce: bool = False
    failure_webhook: UpstreamURL | None = None
    shutdown_timeout: Duration = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliverySettings:
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min must not exceed backoff_max")
        return self


class SpoolSettings(_Section):
    url: str = "sqlite:///smtp2api-data/spool.db"
    lease: Duration = Field(default=30.0, gt=0)
    # PostgreSQL spool: this node's name in claims; "" = the hostname. Unique per running
    # gateway (a restarted node takes back the claims under its name at once).
    node_id: str = Field(default="", max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")
    # PostgreSQL spool: how long an operation waits for a database connection before it fails
    # (an SMTP client then gets 451 4.3.0 and retries).
    timeout: Duration = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _scheme(self) -> SpoolSettings:
        if not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("url must start with sqlite:/// or postgresql://")
        return self


class MimeSettings(_Section):
    """Bounds on the MIME parser (``mime.MimeLimits``); beyond one: ``554 5.6.0``."""

    max_depth: int = Field(default=20, gt=0, le=1000)  # nesting of multipart and message/*
    max_parts: int = Field(default=500, gt=0)  # parts in the whole tree
    max_headers: int = Field(default=1000, gt=0)  # header fields, all parts together
    max_header_bytes: Size = Field(default=1_000_000, gt=0)  # their bytes, all parts together


class HttpSettings(_Section):
    listen: HostPort | Literal[""] = "127.0.0.1:9025"  # "" disables the ops endpoint


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Settings(BaseSettings):
    """The whole configuration. Frozen: a reload builds a new one."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    smtp: SMTPSettings = SMTPSettings()
    accounts: list[Account] = []
    routes: list[Route] = []
    providers: dict[str, ProviderSettings] = {}
    delivery: DeliverySettings = DeliverySettings()
    spool: SpoolSettings = SpoolSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    mime: MimeSettings = MimeSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs); no .env, no secrets dir.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        problems: list[str] = []
        names = {a.username for a in self.accounts}
        if len(names) != len(self.accounts):
            problems.append("accounts: usernames must be unique")
        for i, route in enumerate(self.routes):
            problems += [
                f"routes[{i}].providers: unknown provider {p!r}"
                for p in route.providers
                if p not in self.providers
            ]
            problems += [
                f"routes[{i}].accounts: unknown account {a!r}"
                for a in route.accounts
                if a not in names
            ]
        if not self.routes and len(self.providers) > 1:
            problems.append("routes: required when more than one provider is configured")
        if self.accounts and self.smtp.require_tls and not self.smtp.tls_configured:
            problems.append(
                "smtp.require_tls: accounts can only log in over TLS; set tls_cert_file and "
                "tls_key_file, or require_tls = false"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def routes_or_default(self) -> list[Route]:
        """The configured routes, or one catch-all route to the only provider."""
        if self.routes:
            return list(self.routes)
        return [Route(providers=list(self.providers))]


EMBEDDED_DEFAULT: dict[str, Any] = {
    "providers": {"outbox": {"type": "outbox", "path": "smtp2api-outbox"}},
}


def config_path(cli_path: str | None, env: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$SMTP2API_CONFIG``, else the system path if it exists."""
    if cli_path:
        return Path(cli_path)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (None: the embedded local default), apply the environment, validate."""
    environ = dict(os.environ if env is None else env)
    if path is None:
        data: dict[str, Any] = dict(EMBEDDED_DEFAULT)
    else:
        data = _read_toml(path)
        if not data.get("providers") and not _env_has(environ, "providers"):
            raise ConfigError(["providers: at least one provider is required"])
    return build_settings(data, environ)


def build_settings(data: dict[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Validate a config mapping (as read from TOML) with ``env`` overrides (default: none)."""
    environ = dict(env or {})
    problems = _unknown_env_keys(environ)
    if problems:
        raise ConfigError(problems)
    settings_env = {k: v for k, v in environ.items() if k.upper() != CONFIG_ENV}
    try:
        return _build(data, settings_env)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def _build(data: dict[str, Any], env: dict[str, str]) -> Settings:
    # pydantic-settings reads os.environ; swap in the chosen mapping for the build only.
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings(**data)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML ({exc})"]) from None


def _env_has(env: Mapping[str, str], section: str) -> bool:
    prefix = f"{ENV_PREFIX}{section}".upper()
    return any(k.upper() == prefix or k.upper().startswith(prefix + "__") for k in env)


def _unknown_env_keys(env: Mapping[str, str]) -> list[str]:
    known = {name.upper() for name in Settings.model_fields}
    problems = []
    for key in sorted(env):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0]
        if section not in known:
            problems.append(f"{key}: unknown setting (sections: {', '.join(sorted(known))})")
    return problems


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [
            part for part in err["loc"] if part not in PROVIDER_TYPES or _is_key(err["loc"], part)
        ]
        key = _dotted(loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        for line in message.splitlines():
            lines.append(f"{key}: {line}" if key else line)
    return lines


def _is_key(loc: tuple[int | str, ...], part: int | str) -> bool:
    # keep a provider type name when it is a provider's own name (loc[1]), drop the union tag
    return len(loc) > 1 and loc[0] == "providers" and loc[1] == part and loc.index(part) == 1


def _dotted(loc: list[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
