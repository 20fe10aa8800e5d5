"""The provider fakes themselves: their schemas refuse what the APIs refuse, and their answers
match the providers' published response schemas. A fake that accepts anything proves nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.fake_providers import (
    PostmarkFake,
    ResendFake,
    SendgridFake,
    postmark_error,
    postmark_request_validators,
    postmark_response_validator,
    resend_error,
    resend_rate_limited,
    resend_request_validator,
    resend_response_validator,
    sendgrid_error,
    sendgrid_rate_limited,
    sendgrid_request_validator,
    sendgrid_response_validator,
)
from tests.support.fakeapi import ReceivedRequest

SENDGRID_OK: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "a@example.net"}]}],
    "from": {"email": "s@example.com"},
    "subject": "Hi",
    "content": [{"type": "text/plain", "value": "Hi"}],
}
POSTMARK_OK: dict[str, Any] = {"From": "s@example.com", "To": "a@example.net", "TextBody": "Hi"}
RESEND_OK: dict[str, Any] = {"from": "s@example.com", "to": ["a@example.net"], "subject": "Hi"}


def request(path: str, body: Any, **headers: str) -> ReceivedRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    lowered = {k.lower().replace("_", "-"): v for k, v in headers.items()}
    return ReceivedRequest("POST", path, {}, lowered, raw)


@pytest.mark.parametrize(
    "bad",
    [
        {**SENDGRID_OK, "personalizations": [{"to": []}]},
        {**SENDGRID_OK, "personalizations": []},
        {**SENDGRID_OK, "custom_args": {"a": "b"}},  # top-level custom_args is a string
        {**SENDGRID_OK, "categories": ["x"] * 11},
        {**SENDGRID_OK, "subject": ""},
        {**SENDGRID_OK, "attachments": [{"content": "eA==", "type": "text/plain"}]},
        {**SENDGRID_OK, "from": {"email": "s@example.com", "nmae": "typo"}},
        {**SENDGRID_OK, "contents": []},
        {k: v for k, v in SENDGRID_OK.items() if k != "from"},
    ],
)
def test_sendgrid_schema_refuses(bad: dict[str, Any]) -> None:
    validator = sendgrid_request_validator()
    validator.validate(SENDGRID_OK)
    assert not validator.is_valid(bad)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ("/email", {k: v for k, v in POSTMARK_OK.items() if k != "From"}),
        ("/email", {"From": "s@example.com", "TextBody": "Hi"}),  # nobody to send to
        ("/email", {"From": "s@example.com", "To": "a@example.net"}),  # no body
        ("/email", {**POSTMARK_OK, "Metadata": {"n": 1}}),
        ("/email", {**POSTMARK_OK, "Attachments": [{"Name": "a", "Contents": "eA=="}]}),
        ("/email", {**POSTMARK_OK, "Tags": ["a"]}),
        ("/email/withTemplate", {**POSTMARK_OK, "TemplateModel": {}}),
        (
            "/email/withTemplate",
            {
                "From": "s@example.com",
                "To": "a@x.net",
                "TemplateId": 1,
                "TemplateAlias": "w",
                "TemplateModel": {},
            },
        ),
        (
            "/email/withTemplate",
            {"From": "s@example.com", "To": "a@x.net", "TemplateId": "1", "TemplateModel": {}},
        ),
    ],
)
def test_postmark_schema_refuses(path: str, bad: dict[str, Any]) -> None:
    validators = postmark_request_validators()
    validators["/email"].validate(POSTMARK_OK)
    validators["/email/withTemplate"].validate(
        {"From": "s@example.com", "Bcc": "a@x.net", "TemplateAlias": "w", "TemplateModel": {}}
    )
    assert not validators[path].is_valid(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in RESEND_OK.items() if k != "to"},
        {**RESEND_OK, "to": []},
        {**RESEND_OK, "to": [f"u{i}@example.net" for i in range(51)]},
        {**RESEND_OK, "tags": [{"name": "has space", "value": "x"}]},
        {**RESEND_OK, "tags": [{"name": "ok"}]},
        {**RESEND_OK, "template": {"id": "t"}, "html": "<p>x</p>"},
        {**RESEND_OK, "template": {"variables": {}}},
        {**RESEND_OK, "template": {"id": "t", "variables": {"a": [1]}}},
        {**RESEND_OK, "metadata": {"a": "b"}},
        {k: v for k, v in RESEND_OK.items() if k != "subject"},
    ],
)
def test_resend_schema_refuses(bad: dict[str, Any]) -> None:
    validator = resend_request_validator()
    validator.validate(RESEND_OK)
    validator.validate({**RESEND_OK, "template": {"id": "t", "variables": {"a": 1, "b": "c"}}})
    assert not validator.is_valid(bad)


def test_error_answers_match_the_published_response_schemas() -> None:
    sendgrid = sendgrid_response_validator()
    for answer in (sendgrid_error(400, "bad", "subject"), sendgrid_rate_limited()):
        sendgrid.validate(answer.json)
    postmark_response_validator("StandardPostmarkResponse").validate(
        postmark_error(406, "inactive").json
    )
    for answer in (resend_error(422, "validation_error", "x"), resend_rate_limited()):
        assert set(answer.json) == {"statusCode", "name", "message"}


def test_success_answers_match_the_published_response_schemas() -> None:
    sg = SendgridFake().handle(
        request("/v3/mail/send", SENDGRID_OK, authorization="Bearer SG.test-key")
    )
    assert sg.status == 202
    assert len(sg.headers["X-Message-Id"]) == 22
    pm = PostmarkFake().handle(
        request(
            "/email",
            POSTMARK_OK,
            x_postmark_server_token="pm-server-token",
            accept="application/json",
            content_type="application/json",
        )
    )
    postmark_response_validator("SendEmailResponse").validate(pm.json)
    assert pm.json["ErrorCode"] == 0
    rs = ResendFake().handle(request("/emails", RESEND_OK, authorization="Bearer re_test_key"))
    resend_response_validator().validate(rs.json)


def test_fakes_refuse_bad_credentials_paths_and_bodies() -> None:
    fake = SendgridFake()
    assert (
        fake.handle(request("/v3/mail/send", SENDGRID_OK, authorization="Bearer nope")).status
        == 401
    )
    assert fake.handle(request("/v3/mail/sned", SENDGRID_OK)).status == 404
    answer = fake.handle(request("/v3/mail/send", {"from": {}}, authorization="Bearer SG.test-key"))
    assert answer.status == 400
    assert fake.violations
    assert fake.accepted == []
    broken = PostmarkFake().handle(
        request(
            "/email",
            b"{not json",
            x_postmark_server_token="pm-server-token",
            accept="application/json",
            content_type="application/json",
        )
    )
    assert (broken.status, broken.json["ErrorCode"]) == (422, 403)


def test_resend_fake_keeps_idempotency_keys() -> None:
    fake = ResendFake()
    auth = {"authorization": "Bearer re_test_key", "idempotency_key": "msg-1"}
    first = fake.handle(request("/emails", RESEND_OK, **auth))
    again = fake.handle(request("/emails", RESEND_OK, **auth))
    assert again is first
    assert len(fake.accepted) == 1
    other = fake.handle(request("/emails", {**RESEND_OK, "subject": "changed"}, **auth))
    assert (other.status, other.json["name"]) == (409, "invalid_idempotent_request")
    too_long = fake.handle(
        request("/emails", RESEND_OK, authorization="Bearer re_test_key", idempotency_key="k" * 257)
    )
    assert (too_long.status, too_long.json["name"]) == (400, "invalid_idempotency_key")
