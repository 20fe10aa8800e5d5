"""The ``ses`` provider: Amazon SES API v2 ``SendEmail`` with the original MIME as ``Content.Raw``.

botocore (the optional extra ``smtp2api[ses]``) signs (SigV4) and finds credentials (the
standard AWS chain); the request itself goes out on the gateway's shared httpx client, so it
is pooled and bounded by ``timeout`` like every other provider. Errors: ``ses_errors.py``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import json
import os
import re
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from pydantic import TypeAdapter, ValidationError

from smtp2api import config, replies
from smtp2api.errors import ConfigError, PayloadBug, ProviderConfigError, ProviderRejected
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.providers.base import answer_id, parse_json
from smtp2api.providers.request import bounded_request
from smtp2api.providers.ses_errors import classify

if TYPE_CHECKING:
    from botocore.credentials import Credentials, ReadOnlyCredentials
    from botocore.loaders import Loader
    from botocore.session import Session

log = structlog.get_logger("smtp2api.providers.ses")

SIGNING_NAME = "ses"  # sesv2 model metadata: signingName "ses", endpointPrefix "email"
PATH = "/v2/email/outbound-emails"  # SendEmail: POST, rest-json
MAX_RECIPIENTS = 50  # To + Cc + Bcc per call (SES quotas); larger envelopes are split
# SES quotas: 40 MB per message for API v2, counted after base64 (4/3); leave 64 KiB for the
# JSON around Content.Raw.Data (50 recipients, tags, configuration set, ARNs).
MAX_REQUEST_BYTES = 40_000_000
MAX_MESSAGE_SIZE = (MAX_REQUEST_BYTES - 65_536) // 4 * 3
MAX_TAGS = 50  # SES: message tags per message
_TAG_LIMIT = 256  # characters of a tag name or value
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # SES tag names/values: ASCII letters, digits, _ -
_CONFIG_SET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # SES configuration set names
_REGION = re.compile(r"^[a-z0-9-]{1,40}$")  # becomes part of a host name and of the SigV4 scope
# Build and sign bodies larger than this in a thread: SigV4 hashes the whole payload (SHA-256),
# and base64 + JSON of a 30 MB message would stall the event loop for tens of milliseconds.
_OFF_LOOP_BYTES = 256 * 1024
_R553_NON_ASCII = replies.SMTPReply(
    553, "5.6.7", "Non-ASCII address local parts are not supported by the upstream API"
)
_R553_BAD_DOMAIN = replies.R553_BAD_RECIPIENT.with_text("Address domain cannot be encoded (IDNA)")
_R554_BAD_CONFIG_SET = replies.R554_BAD_MESSAGE.with_text("Invalid X-SES-CONFIGURATION-SET")


def _import_botocore(name: str) -> None:
    if importlib.util.find_spec("botocore") is None:
        raise ConfigError(
            [f"providers.{name}.type: 'ses' needs botocore: pip install 'smtp2api[ses]'"]
        )


@functools.cache
def _loader() -> Loader:
    """botocore's data loader, shared: it caches the parsed models and endpoint rules, which
    are read-only. Sessions are not shared, since each caches its resolved credentials."""
    from botocore.loaders import create_loader

    return create_loader()


def _new_session() -> Session:
    from botocore.session import Session

    session = Session()
    session.register_component("data_loader", _loader())
    return session


def _region(name: str, settings: config.SesProvider, session: Session) -> str:
    """``region``, else the AWS chain (AWS_DEFAULT_REGION, the profile), else AWS_REGION."""
    region = (
        settings.region
        or session.get_config_variable("region")
        or os.environ.get("AWS_REGION")  # set by Lambda and ECS; botocore itself ignores it
    )
    if not region:
        raise ConfigError(
            [f"providers.{name}.region: not set, and no region in the AWS config chain"]
        )
    if not _REGION.match(str(region)):
        raise ConfigError([f"providers.{name}.region: {region!r} is not an AWS region name"])
    return str(region)


def _endpoint(name: str, settings: config.SesProvider, region: str, session: Session) -> str:
    """``endpoint_url`` (or ``base_url``), else what botocore resolves for ``sesv2``.

    botocore knows the partitions (``amazonaws.com``, ``amazonaws.com.cn``, ...) and reads
    the AWS config's own endpoint settings (``AWS_ENDPOINT_URL_SESV2``, FIPS, dual-stack).
    An unsigned client resolves it without touching the credential chain.
    """
    explicit = settings.endpoint_url or settings.base_url
    if explicit:
        return explicit.rstrip("/")
    from botocore import UNSIGNED
    from botocore.config import Config

    client = session.create_client(
        "sesv2", region_name=region, config=Config(signature_version=UNSIGNED)
    )
    url = str(client.meta.endpoint_url)
    client.close()
    try:  # design §8 holds for an endpoint from the AWS config too
        return TypeAdapter(config.UpstreamURL).validate_python(url)
    except ValidationError:
        raise ConfigError([f"providers.{name}: AWS endpoint {url!r} must use https"]) from None


def _check_settings(name: str, settings: config.SesProvider) -> None:
    problems = []
    if settings.configuration_set is not None and not _CONFIG_SET.match(settings.configuration_set):
        problems.append(
            f"providers.{name}.configuration_set: letters, digits, '_' and '-' only, at most 64"
        )
    if settings.from_arn is not None and not settings.from_arn.startswith("arn:"):
        problems.append(f"providers.{name}.from_arn: expected an ARN (arn:aws:ses:...)")
    if (settings.access_key_id is None) != (settings.secret_access_key is None):
        problems.append(
            f"providers.{name}: set access_key_id and secret_access_key together, or neither"
        )
    if settings.session_token is not None and settings.access_key_id is None:
        problems.append(f"providers.{name}.session_token: needs access_key_id")
    if problems:
        raise ConfigError(problems)


def ses_address(address: str) -> str:
    """``address`` as SES takes it: 7-bit local part, IDNA (punycode) domain (sesv2 Destination).

    SES does not implement SMTPUTF8, so a non-ASCII local part cannot be carried: RFC 6531
    answers that with 553 and X.6.7, "Non-ASCII addresses not permitted for that
    sender/recipient". Permanent: retrying through SES can never succeed.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address  # not an address SES could parse anyway; let it name the problem
    if not local.isascii():
        raise ProviderRejected("non-ASCII local part", reply=_R553_NON_ASCII)
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")  # RFC 3490/3492 (IDNA 2003)
        except UnicodeError:
            raise ProviderRejected("domain not IDNA-encodable", reply=_R553_BAD_DOMAIN) from None
    return f"{local}@{domain}"


def _tag_part(text: str) -> str:
    return _TAG_UNSAFE.sub("_", text)[:_TAG_LIMIT]


def email_tags(message: Message) -> list[dict[str, str]]:
    """``EmailTags`` from the message's metadata (name=value) and tags (name, value "true").

    SES allows only ASCII letters, digits, ``_`` and ``-`` (256 each), so anything else
    becomes ``_``; names must be unique, so metadata wins over a tag of the same name.
    """
    tags: dict[str, str] = {}
    for key, value in message.metadata.items():
        name = _tag_part(key)
        if name:
            tags.setdefault(name, _tag_part(value) or "_")
    for tag in message.tags:
        name = _tag_part(tag)
        if name:
            tags.setdefault(name, "true")
    if len(tags) > MAX_TAGS:
        log.warning("ses_tags_dropped", kept=MAX_TAGS, dropped=len(tags) - MAX_TAGS)
    return [{"Name": k, "Value": v} for k, v in list(tags.items())[:MAX_TAGS]]


class _Credentials:
    """Static keys from the config, or botocore's chain resolved on first use, off the loop.

    The chain (env, shared files and profiles, SSO, web identity, ECS/EC2 roles) may do
    network I/O, and so may a refresh of temporary credentials: both run in a thread.
    """

    def __init__(self, session: Session, static: Credentials | None, timeout: float) -> None:
        self._session = session
        self._creds = static
        self._timeout = timeout
        self._lock = asyncio.Lock()

    async def _resolve(self) -> Credentials:
        async with self._lock:
            if self._creds is None:
                self._creds = await asyncio.to_thread(self._session.get_credentials)
            if self._creds is None:
                raise ProviderConfigError("no AWS credentials found in config or the AWS chain")
            return self._creds

    async def frozen(self) -> ReadOnlyCredentials:
        from botocore.credentials import RefreshableCredentials
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            async with asyncio.timeout(self._timeout):
                creds = self._creds or await self._resolve()
                if isinstance(creds, RefreshableCredentials) and creds.refresh_needed():
                    return await asyncio.to_thread(creds.get_frozen_credentials)
                return creds.get_frozen_credentials()
        except TimeoutError:
            raise ProviderConfigError("AWS credential provider did not answer in time") from None
        except (BotoCoreError, ClientError) as exc:
            raise ProviderConfigError(f"AWS credentials unavailable: {type(exc).__name__}") from exc


class SesProvider:
    """Sends the raw MIME through SES API v2 ``SendEmail`` (design §5, ``ses``).

    ``Destination.ToAddresses`` carries every envelope recipient of the call: with
    ``Content.Raw``, SES sends to the Destination addresses (the envelope, as SES v1's
    ``SendRawEmail`` ``Destinations``) and adds no header, so To/Cc come from the MIME
    unchanged and Bcc recipients stay invisible. The To/Cc/Bcc split only matters for
    ``Content.Simple``, where SES writes the headers itself.
    """

    raw_mime = True
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(self, name: str, settings: config.SesProvider, client: httpx.AsyncClient) -> None:
        _import_botocore(name)
        from botocore.credentials import Credentials

        _check_settings(name, settings)
        self.name = name
        self._client = client
        session = _new_session()
        self.region = _region(name, settings, session)
        self.url = _endpoint(name, settings, self.region, session) + PATH
        self._configuration_set = settings.configuration_set
        self._from_arn = settings.from_arn
        self._timeout = settings.timeout
        static = None
        secrets: list[str] = []
        if settings.access_key_id is not None and settings.secret_access_key is not None:
            key_id = settings.access_key_id.get_secret_value()
            secret = settings.secret_access_key.get_secret_value()
            token = settings.session_token.get_secret_value() if settings.session_token else None
            static = Credentials(key_id, secret, token)
            secrets = [s for s in (key_id, secret, token) if s]
        self._secrets = tuple(secrets)
        self._credentials = _Credentials(session, static, settings.timeout)

    def __repr__(self) -> str:  # never the credentials
        return f"SesProvider(name={self.name!r}, url={self.url!r}, region={self.region!r})"

    def payload(self, message: Message, envelope: Envelope) -> dict[str, Any]:
        """The ``SendEmailRequest`` JSON, ``Content.Raw.Data`` still as bytes."""
        sender = envelope.mail_from or (message.from_.email if message.from_ else "")
        request: dict[str, Any] = {
            "Destination": {"ToAddresses": [ses_address(r) for r in envelope.rcpt_tos]},
            "Content": {"Raw": {"Data": message.raw}},
        }
        if sender:  # null reverse-path and no From: SES then reads the From header itself
            request["FromEmailAddress"] = ses_address(sender)
        if self._from_arn:
            request["FromEmailAddressIdentityArn"] = self._from_arn
        # The message's X-SES-CONFIGURATION-SET wins over the configured default, as on SES's
        # own SMTP interface.
        configuration_set = message.configuration_set or self._configuration_set
        if configuration_set:
            if not _CONFIG_SET.match(configuration_set):
                raise ProviderRejected("bad configuration set name", reply=_R554_BAD_CONFIG_SET)
            request["ConfigurationSetName"] = configuration_set
        tags = email_tags(message)
        if tags:
            request["EmailTags"] = tags
        return request

    def _signed(
        self, request: dict[str, Any], creds: ReadOnlyCredentials
    ) -> tuple[bytes, dict[str, str]]:
        """The JSON body and its SigV4 headers (pure CPU: may run in a thread)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        raw = request["Content"]["Raw"]
        raw["Data"] = base64.b64encode(raw["Data"]).decode("ascii")  # rest-json blob
        body = json.dumps(request, separators=(",", ":")).encode("ascii")
        aws = AWSRequest(
            method="POST", url=self.url, data=body, headers={"Content-Type": "application/json"}
        )
        SigV4Auth(creds, SIGNING_NAME, self.region).add_auth(aws)
        return body, dict(aws.headers.items())

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        request = self.payload(message, envelope)
        creds = await self._credentials.frozen()
        if len(message.raw) > _OFF_LOOP_BYTES:
            body, headers = await asyncio.to_thread(self._signed, request, creds)
        else:
            body, headers = self._signed(request, creds)
        answer = await bounded_request(
            self._client, "POST", self.url, budget=self._timeout, content=body, headers=headers
        )
        if answer.ok:  # SendEmail answers 200
            return SendResult(
                provider=self.name, provider_id=answer_id(parse_json(answer.body), "MessageId")
            )
        error = classify(answer.status, answer.headers, answer.body, self._secrets)
        if isinstance(error, PayloadBug):  # our request was wrong: a bug to fix, not mail
            log.error(
                "provider_refused_request",
                provider=self.name,
                status=answer.status,
                code=error.provider_code,
                request_id=error.request_id,
                detail=error.detail,
            )
        raise error

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
