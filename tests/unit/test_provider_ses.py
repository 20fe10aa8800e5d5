"""The ``ses`` provider against ``httpx.MockTransport``: the signed request, every mapped error.

The request body is checked against botocore's own sesv2 model (the published API shape);
the signature itself is verified end to end by moto in tests/integration.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.session import Session
from botocore.validate import ParamValidator
from structlog.testing import capture_logs

from smtp2api import config
from smtp2api.errors import (
    AccountPaused,
    ConfigError,
    ConnectFailed,
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
)
from smtp2api.models import Address, Envelope, Message, SendResult
from smtp2api.providers import ses
from smtp2api.providers.base import Provider
from smtp2api.providers.registry import build_provider
from smtp2api.providers.ses import MAX_MESSAGE_SIZE, MAX_REQUEST_BYTES, SesProvider

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
URL = "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails"
RAW = (
    b"Received: from client.test by gw.test\r\n"
    b"From: App <app@example.com>\r\nTo: alice@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
)
ENVELOPE = Envelope("bounce@example.com", ("alice@example.net", "hidden@example.org"))
SEND_EMAIL = Session().get_service_model("sesv2").operation_model("SendEmail")
AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/\d{8}/(?P<region>[a-z0-9-]+)/ses/"
    r"aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=[0-9a-f]{64}$"
)


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "id": "01J0MSGID0000000000000000",
        "raw": RAW,
        "from_": Address("app@example.com", "App"),
        "to": (Address("alice@example.net"),),
        "bcc": (Address("hidden@example.org"),),
        "subject": "hi",
        "text": "Hello",
    }
    fields.update(changes)
    return Message(**fields)


def settings(**changes: Any) -> config.SesProvider:
    data: dict[str, Any] = {
        "type": "ses",
        "region": "eu-west-1",
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "timeout": 5,
    }
    data.update(changes)
    return config.SesProvider(**data)


Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def ok(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"MessageId": "0102018f-ses-id"})


Make = Callable[..., tuple[SesProvider, Recorder]]


@pytest.fixture
async def make_provider() -> AsyncIterator[Make]:
    clients: list[httpx.AsyncClient] = []

    def make(handler: Handler = ok, **changes: Any) -> tuple[SesProvider, Recorder]:
        recorder = Recorder(handler)
        client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
        clients.append(client)
        return SesProvider("ses", settings(**changes), client), recorder

    yield make
    for client in clients:
        await client.aclose()


def sent_body(request: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.content)
    # botocore's model validates the API-side shape, where the blob is bytes, not base64.
    params = json.loads(request.content)
    params["Content"]["Raw"]["Data"] = base64.b64decode(params["Content"]["Raw"]["Data"])
    report = ParamValidator().validate(params, SEND_EMAIL.input_shape)
    assert not report.has_errors(), report.generate_report()
    return body


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials or region from this machine: an empty AWS chain, IMDS off."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SESV2",
        "AWS_USE_FIPS_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "aws-config").write_text("")
    (tmp_path / "aws-credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# --- the request -----------------------------------------------------------------------


async def test_sends_the_signed_raw_request(make_provider: Make) -> None:
    provider, recorder = make_provider()
    assert isinstance(provider, Provider)
    result = await provider.send(make_message(), ENVELOPE)

    assert result == SendResult(provider="ses", provider_id="0102018f-ses-id")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["Content-Type"] == "application/json"
    auth = AUTH.match(request.headers["Authorization"])
    assert auth is not None
    assert auth["key"] == KEY_ID
    assert auth["region"] == "eu-west-1"
    assert {"content-type", "host", "x-amz-date"} <= set(auth["signed"].split(";"))
    assert re.fullmatch(r"\d{8}T\d{6}Z", request.headers["X-Amz-Date"])
    assert "X-Amz-Security-Token" not in request.headers
    body = sent_body(request)
    assert body == {
        "FromEmailAddress": "bounce@example.com",
        "Destination": {"ToAddresses": ["alice@example.net", "hidden@example.org"]},
        "Content": {"Raw": {"Data": base64.b64encode(RAW).decode()}},
    }


async def test_destination_is_the_envelope_of_the_call(make_provider: Make) -> None:
    # A chunk of a larger envelope: only its recipients, whatever the headers say.
    provider, recorder = make_provider()
    await provider.send(make_message(), Envelope("bounce@example.com", ("hidden@example.org",)))
    assert sent_body(recorder.requests[0])["Destination"] == {"ToAddresses": ["hidden@example.org"]}


async def test_session_token_is_signed_and_sent(make_provider: Make) -> None:
    provider, recorder = make_provider(session_token="FwoGZXIvYXdzEXAMPLETOKEN")
    await provider.send(make_message(), ENVELOPE)
    headers = recorder.requests[0].headers
    assert headers["X-Amz-Security-Token"] == "FwoGZXIvYXdzEXAMPLETOKEN"
    auth = AUTH.match(headers["Authorization"])
    assert auth is not None
    assert "x-amz-security-token" in auth["signed"].split(";")


async def test_options_from_config_and_message(make_provider: Make) -> None:
    arn = "arn:aws:ses:eu-west-1:123456789012:identity/example.com"
    provider, recorder = make_provider(configuration_set="default-set", from_arn=arn)
    await provider.send(make_message(), ENVELOPE)
    body = sent_body(recorder.requests[0])
    assert body["ConfigurationSetName"] == "default-set"
    assert body["FromEmailAddressIdentityArn"] == arn

    # X-SES-CONFIGURATION-SET (normalised by controls.py) wins over the configured default.
    await provider.send(make_message(configuration_set="marketing_2"), ENVELOPE)
    assert sent_body(recorder.requests[1])["ConfigurationSetName"] == "marketing_2"


async def test_bad_configuration_set_header_is_the_messages_fault(make_provider: Make) -> None:
    provider, recorder = make_provider()
    with pytest.raises(ProviderRejected) as caught:
        await provider.send(make_message(configuration_set="no spaces!"), ENVELOPE)
    assert str(caught.value.reply).startswith("554 5.6.0")
    assert not recorder.requests


async def test_email_tags_are_sanitised(make_provider: Make) -> None:
    provider, recorder = make_provider()
    message = make_message(
        metadata={"order id": "A-42/7", "campaign": "spring", "empty": ""},
        tags=("welcome", "campaign", "caf\u00e9"),
    )
    await provider.send(message, ENVELOPE)
    assert sent_body(recorder.requests[0])["EmailTags"] == [
        {"Name": "order_id", "Value": "A-42_7"},
        {"Name": "campaign", "Value": "spring"},  # metadata wins over the tag of that name
        {"Name": "empty", "Value": "_"},
        {"Name": "welcome", "Value": "true"},
        {"Name": "caf_", "Value": "true"},
    ]


async def test_email_tags_are_capped(make_provider: Make) -> None:
    provider, recorder = make_provider()
    tags = tuple(f"t{i}" for i in range(ses.MAX_TAGS + 5))
    with capture_logs() as logs:
        await provider.send(make_message(tags=tags, metadata={"n": "x" * 300}), ENVELOPE)
    sent = sent_body(recorder.requests[0])["EmailTags"]
    assert len(sent) == ses.MAX_TAGS
    assert sent[0] == {"Name": "n", "Value": "x" * 256}
    assert any(entry["event"] == "ses_tags_dropped" for entry in logs)


async def test_null_sender_uses_the_from_header(make_provider: Make) -> None:
    provider, recorder = make_provider()
    await provider.send(make_message(), Envelope("", ("alice@example.net",)))
    assert sent_body(recorder.requests[0])["FromEmailAddress"] == "app@example.com"

    await provider.send(make_message(from_=None), Envelope("", ("alice@example.net",)))
    assert "FromEmailAddress" not in sent_body(recorder.requests[1])


async def test_idn_domains_become_punycode(make_provider: Make) -> None:
    provider, recorder = make_provider()
    envelope = Envelope("app@b\u00fccher.example", ("alice@m\u00fcnchen.example",))
    await provider.send(make_message(), envelope)
    body = sent_body(recorder.requests[0])
    assert body["FromEmailAddress"] == "app@xn--bcher-kva.example"
    assert body["Destination"] == {"ToAddresses": ["alice@xn--mnchen-3ya.example"]}


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope("app@example.com", ("j\u00f6rg@example.net",)),
        Envelope("\u00f6@example.com", ("alice@example.net",)),
    ],
)
async def test_non_ascii_local_part_is_553_5_6_7(make_provider: Make, envelope: Envelope) -> None:
    provider, recorder = make_provider()
    with pytest.raises(ProviderRejected) as caught:
        await provider.send(make_message(), envelope)
    assert str(caught.value.reply).startswith("553 5.6.7 ")
    assert not recorder.requests


async def test_large_message_is_signed_off_the_loop(make_provider: Make) -> None:
    provider, recorder = make_provider()
    raw = RAW + b"x" * 400_000 + b"\r\n"
    await provider.send(make_message(raw=raw), ENVELOPE)
    body = sent_body(recorder.requests[0])
    assert base64.b64decode(body["Content"]["Raw"]["Data"]) == raw
    assert AUTH.match(recorder.requests[0].headers["Authorization"])


def test_limits() -> None:
    assert SesProvider.max_recipients == 50
    assert SesProvider.raw_mime is True
    # 40 MB after base64, with room for the JSON around the data.
    assert (MAX_MESSAGE_SIZE + 2) // 3 * 4 + 65_536 <= MAX_REQUEST_BYTES
    assert MAX_MESSAGE_SIZE > 29_900_000


# --- setup ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "url"),
    [
        ({}, URL),
        (
            {"region": "cn-north-1"},
            "https://email.cn-north-1.amazonaws.com.cn/v2/email/outbound-emails",
        ),
        (
            {"endpoint_url": "http://127.0.0.1:4566/"},
            "http://127.0.0.1:4566/v2/email/outbound-emails",
        ),
        (
            {"base_url": "https://ses-proxy.example.net"},
            "https://ses-proxy.example.net/v2/email/outbound-emails",
        ),
    ],
)
async def test_endpoint(make_provider: Make, changes: dict[str, Any], url: str) -> None:
    provider, recorder = make_provider(**changes)
    await provider.send(make_message(), ENVELOPE)
    assert str(recorder.requests[0].url) == url


@pytest.mark.usefixtures("no_aws_env")
def test_region_from_the_aws_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    provider = SesProvider("ses", settings(region=None), httpx.AsyncClient())
    assert provider.region == "ap-southeast-2"
    assert provider.url.startswith("https://email.ap-southeast-2.amazonaws.com/")


@pytest.mark.usefixtures("no_aws_env")
def test_endpoint_from_the_aws_config_must_be_https(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SESV2", "https://ses.internal.example")
    provider = SesProvider("ses", settings(), httpx.AsyncClient())
    assert provider.url == "https://ses.internal.example/v2/email/outbound-emails"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SESV2", "http://ses.internal.example")
    with pytest.raises(ConfigError, match="must use https"):
        SesProvider("ses", settings(), httpx.AsyncClient())


@pytest.mark.usefixtures("no_aws_env")
def test_no_region_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"providers\.ses\.region"):
        SesProvider("ses", settings(region=None), httpx.AsyncClient())


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"region": "eu-west-1.evil.example"}, "region"),
        ({"configuration_set": "has space"}, "configuration_set"),
        ({"from_arn": "identity/example.com"}, "from_arn"),
        ({"secret_access_key": None}, "access_key_id and secret_access_key"),
        ({"access_key_id": None, "secret_access_key": None, "session_token": "t"}, "session_token"),
    ],
)
def test_invalid_settings_are_config_errors(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        SesProvider("ses", settings(**changes), httpx.AsyncClient())


def test_missing_extra_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ses.importlib.util.find_spec
    monkeypatch.setattr(
        ses.importlib.util, "find_spec", lambda name: None if name == "botocore" else real(name)
    )
    with pytest.raises(ConfigError, match=re.escape("pip install 'smtp2api[ses]'")):
        build_provider("ses", settings(), httpx.AsyncClient())


def test_registry_builds_it_and_repr_hides_secrets() -> None:
    provider = build_provider("mail", settings(session_token="tok-secret"), httpx.AsyncClient())
    assert isinstance(provider, SesProvider)
    assert SECRET not in repr(provider)
    assert KEY_ID not in repr(provider)


# --- credentials: the standard AWS chain ----------------------------------------------------


@pytest.mark.usefixtures("no_aws_env")
async def test_credentials_from_the_environment(
    make_provider: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT00001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    provider, recorder = make_provider(access_key_id=None, secret_access_key=None)
    await provider.send(make_message(), ENVELOPE)
    auth = AUTH.match(recorder.requests[0].headers["Authorization"])
    assert auth is not None
    assert auth["key"] == "AKIAENVIRONMENT00001"


@pytest.mark.usefixtures("no_aws_env")
async def test_credentials_from_a_profile(
    make_provider: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "aws-credentials").write_text(
        "[relay]\naws_access_key_id = AKIAPROFILE000000001\naws_secret_access_key = p-secret\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "relay")
    provider, recorder = make_provider(access_key_id=None, secret_access_key=None)
    await provider.send(make_message(), ENVELOPE)
    auth = AUTH.match(recorder.requests[0].headers["Authorization"])
    assert auth is not None
    assert auth["key"] == "AKIAPROFILE000000001"


@pytest.mark.usefixtures("no_aws_env")
async def test_no_credentials_is_451_4_3_5_without_a_request(make_provider: Make) -> None:
    provider, recorder = make_provider(access_key_id=None, secret_access_key=None)
    with pytest.raises(ProviderConfigError) as caught:
        await provider.send(make_message(), ENVELOPE)
    assert str(caught.value.reply).startswith("451 4.3.5")
    assert not recorder.requests


# --- errors ----------------------------------------------------------------------------------


def aws_error(status: int, name: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"message": message},
        headers={
            "x-amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/com.amazonaws.sesv2/",
            "x-amzn-RequestId": "req-0001",
            **headers,
        },
    )


async def fail(make: Make, response: httpx.Response) -> DeliveryError:
    provider, _ = make(lambda _request: response)
    with pytest.raises(DeliveryError) as caught:
        await provider.send(make_message(), ENVELOPE)
    return caught.value


NOT_VERIFIED = (
    "Email address is not verified. The following identities failed the check in region "
    "EU-WEST-1: app@example.com"
)
ERRORS = [
    (400, "MessageRejected", NOT_VERIFIED, ProviderRejected, "550 5.7.1"),
    (400, "MessageRejected", "Illegal address", ProviderRejected, "553 5.1.3"),
    (400, "MessageRejected", "Message rejected: virus detected", ProviderRejected, "550 5.7.1"),
    (
        400,
        "MailFromDomainNotVerifiedException",
        "MAIL FROM not verified",
        ProviderRejected,
        "550 5.7.1",
    ),
    (400, "AccountSuspendedException", "Sending suspended", AccountPaused, "451 4.3.2"),
    (400, "SendingPausedException", "Sending paused", AccountPaused, "451 4.3.2"),
    (429, "TooManyRequestsException", "Too many requests", RateLimited, "451 4.7.0"),
    (400, "ThrottlingException", "Maximum sending rate exceeded.", RateLimited, "451 4.7.0"),
    (400, "Throttling", "Maximum sending rate exceeded.", RateLimited, "451 4.7.0"),
    (400, "LimitExceededException", "Limit exceeded", RateLimited, "451 4.7.0"),
    (400, "ThrottlingException", "Daily message quota exceeded.", QuotaExhausted, "451 4.7.0"),
    (
        404,
        "NotFoundException",
        "Configuration set <x> does not exist.",
        ProviderConfigError,
        "451 4.3.5",
    ),
    (400, "BadRequestException", "Invalid tag value", PayloadBug, "451 4.3.0"),
    (400, "BadRequestException", "Recipient count exceeds 50.", PayloadBug, "451 4.3.0"),
    (400, "BadRequestException", "Missing final '@domain'", ProviderRejected, "553 5.1.3"),
    (
        400,
        "BadRequestException",
        "Local address contains control or whitespace",
        ProviderRejected,
        "553 5.1.3",
    ),
    (
        403,
        "AccessDeniedException",
        "not authorized to perform ses:SendEmail",
        ProviderConfigError,
        "451 4.3.5",
    ),
    (
        403,
        "InvalidClientTokenId",
        "The security token is invalid.",
        ProviderConfigError,
        "451 4.3.5",
    ),
    (403, "SignatureDoesNotMatch", "Signature mismatch", ProviderConfigError, "451 4.3.5"),
    (403, "UnrecognizedClientException", "Bad token", ProviderConfigError, "451 4.3.5"),
    (
        400,
        "ExpiredTokenException",
        "The security token included in the request is expired",
        ProviderConfigError,
        "451 4.3.5",
    ),
    (500, "InternalServiceErrorException", "Internal error", ProviderUnavailable, "451 4.3.0"),
    (503, "ServiceUnavailable", "Service unavailable", ProviderUnavailable, "451 4.3.0"),
]


@pytest.mark.parametrize(("status", "name", "message", "cls", "reply"), ERRORS)
async def test_error_mapping(
    make_provider: Make, status: int, name: str, message: str, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(make_provider, aws_error(status, name, message))
    assert type(error) is cls
    assert str(error.reply).startswith(reply + " ")
    assert error.provider_code == name
    assert error.request_id == "req-0001"
    assert error.status == status
    assert f"code={name}" in str(error.reply)
    assert "request_id=req-0001" in str(error.reply)
    # The sender sees SES's reason only when the message is at fault.
    assert (message[:20] in str(error.reply)) is error.reply.is_permanent


async def test_quota_waits_an_hour_and_throttling_honours_headers(make_provider: Make) -> None:
    quota = await fail(
        make_provider, aws_error(400, "ThrottlingException", "Daily message quota exceeded.")
    )
    assert isinstance(quota, QuotaExhausted)
    assert quota.retry_after == 3600.0
    throttled = await fail(
        make_provider,
        aws_error(429, "TooManyRequestsException", "slow down", **{"Retry-After": "7"}),
    )
    assert isinstance(throttled, RateLimited)
    assert throttled.retry_after == 7.0


async def test_payload_bug_is_logged_as_an_error(make_provider: Make) -> None:
    with capture_logs() as logs:
        error = await fail(make_provider, aws_error(400, "BadRequestException", "Invalid tag"))
    assert isinstance(error, PayloadBug)
    [entry] = [e for e in logs if e["event"] == "provider_refused_request"]
    assert entry["log_level"] == "error"
    assert entry["code"] == "BadRequestException"
    assert entry["request_id"] == "req-0001"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(
            400,
            json={"__type": "com.amazonaws.sesv2#MessageRejected", "message": "Illegal address"},
        ),
        httpx.Response(400, json={"code": "MessageRejected", "Message": "Illegal address"}),
        httpx.Response(
            400,
            content=b"<ErrorResponse><Error><Code>MessageRejected</Code>"
            b"<Message>Illegal address</Message></Error></ErrorResponse>",
        ),
    ],
)
async def test_error_type_from_body_shapes(make_provider: Make, response: httpx.Response) -> None:
    error = await fail(make_provider, response)
    assert isinstance(error, ProviderRejected)
    assert error.provider_code == "MessageRejected"
    assert str(error.reply).startswith("553 5.1.3 ")


@pytest.mark.parametrize(
    ("response", "cls", "reply"),
    [
        (
            httpx.Response(502, content=b"<html>Bad Gateway</html>"),
            ProviderUnavailable,
            "451 4.3.0",
        ),
        (httpx.Response(413, content=b""), ProviderRejected, "552 5.3.4"),
        (httpx.Response(400, json={"message": "what?"}), ProviderRejected, "554 5.6.0"),
        (httpx.Response(403, content=b""), ProviderConfigError, "451 4.3.5"),
        (
            httpx.Response(301, headers={"Location": "https://elsewhere.example"}),
            ProviderConfigError,
            "451 4.3.5",
        ),
    ],
)
async def test_unnamed_answers_follow_the_generic_table(
    make_provider: Make, response: httpx.Response, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(make_provider, response)
    assert type(error) is cls
    assert str(error.reply).startswith(reply + " ")


async def test_secrets_echoed_by_the_api_are_redacted(make_provider: Make) -> None:
    error = await fail(
        make_provider,
        aws_error(400, "MessageRejected", f"Illegal address for key {SECRET} ({KEY_ID})"),
    )
    assert SECRET not in str(error.reply)
    assert KEY_ID not in str(error.reply)
    assert SECRET not in error.detail


async def test_success_without_an_id(make_provider: Make) -> None:
    provider, _ = make_provider(lambda _r: httpx.Response(200, content=b"not json"))
    result = await provider.send(make_message(), ENVELOPE)
    assert result.provider_id is None


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("refused"), ConnectFailed),
        (httpx.ReadTimeout("slow"), OutcomeUnknown),
        (httpx.RemoteProtocolError("reset"), OutcomeUnknown),
    ],
)
async def test_transport_errors(
    make_provider: Make, exc: Exception, cls: type[DeliveryError]
) -> None:
    def boom(_request: httpx.Request) -> httpx.Response:
        raise exc

    provider, _ = make_provider(boom)
    with pytest.raises(cls):
        await provider.send(make_message(), ENVELOPE)
