"""Local fakes of SendGrid, Postmark and Resend for ``FakeAPI``: each request is validated
against the provider's published request schema, and answered with the provider's real
success and error bodies and headers.

The schemas are read at test time from ``shared/provider-specs/`` (never copied here): the
SendGrid OpenAPI, Postmark's Swagger 2.0 and the Resend OpenAPI extracts (``SOURCES.md`` there).
Where an extract is stale or states a rule only in prose, a small overlay, listed in each
loader below with its source, brings it in line with the provider's documentation. On top,
validation is strict: an object that declares its properties takes no others, because the real
APIs silently ignore an unknown field, and a misspelt field would silently lose data.

    fake = ResendFake()
    async with FakeAPI(handler=fake.handle) as api:
        fake.push(resend_error(429, "rate_limit_exceeded", "Too many requests."))
        ...  # point the provider's base_url at api.url
    assert fake.violations == []  # every request matched the schema

``FakeAPI.push`` bypasses the handler, and so validation: script answers with ``fake.push``
(the next requests) or ``fake.default`` (every request).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import jsonschema
import yaml

from tests.conftest import SHARED, require_tool
from tests.support.fakeapi import Answer, ReceivedRequest

SPECS = SHARED / "provider-specs"
SENDGRID_SPEC = "sendgrid-tsg_mail_v3.mail_send.subset.json"
POSTMARK_SPEC = "postmark-server-swagger.email.subset.yml"
RESEND_SPEC = "resend-openapi.emails.subset.yaml"


@functools.cache  # parsing and checking a spec is slow; the result is never changed
def load_spec(name: str) -> Any:
    """A spec extract from ``shared/provider-specs`` (fails in CI, skips elsewhere, if absent)."""
    path = SPECS / name
    require_tool(str(path) if path.is_file() else None, f"provider spec {path}")
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def strict(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema that lists ``properties`` forbids others."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    props = schema.get("properties")
    if isinstance(props, dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def nullable(schema: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (which the SendGrid 3.1 document still uses, and JSON
    Schema ignores) as the JSON Schema it means: ``null`` added to the type."""
    if isinstance(schema, list):
        return [nullable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: nullable(value) for key, value in schema.items()}
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _validator(cls: type[jsonschema.protocols.Validator], schema: dict[str, Any]) -> Any:
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@functools.cache
def sendgrid_request_validator() -> Any:
    """``POST /v3/mail/send``: the spec's PostMailSend body, strict.

    Overlay: ``personalizations[].to`` needs an item (the spec only marks it required; SendGrid
    answers "The to array is required for all personalization objects, and must have at least
    one email object with a valid email address"), and ``personalizations`` too.
    """
    spec = load_spec(SENDGRID_SPEC)
    body = spec["components"]["requestBodies"]["PostMailSend"]["content"]["application/json"]
    schema = strict({**copy.deepcopy(body["schema"]), "components": spec["components"]})
    schema["properties"]["personalizations"]["minItems"] = 1
    schema["properties"]["personalizations"]["items"]["properties"]["to"]["minItems"] = 1
    return _validator(jsonschema.Draft202012Validator, schema)


@functools.cache
def sendgrid_response_validator() -> Any:
    spec = load_spec(SENDGRID_SPEC)
    schema = {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]}
    return _validator(jsonschema.Draft202012Validator, nullable(schema))


@functools.cache
def postmark_request_validators() -> dict[str, Any]:
    """``/email`` and ``/email/withTemplate``: the Swagger 2.0 definitions (draft 4), strict.

    Overlays, from Postmark's API reference and official client (postmark.js ``Message``):
    ``MessageStream`` (string) and ``Metadata`` (string values) exist on both; ``From`` is
    required, and at least one of To/Cc/Bcc (Bcc-only messages are accepted); ``/email`` needs
    TextBody or HtmlBody ("Provide either email TextBody or HtmlBody or both"); the template
    call needs ``TemplateModel`` and exactly one of ``TemplateId``/``TemplateAlias`` (the
    extract marks both required, which no request could satisfy).
    """
    spec = load_spec(POSTMARK_SPEC)
    definitions = strict(copy.deepcopy(spec["definitions"]))
    recipients = [{"required": [key]} for key in ("To", "Cc", "Bcc")]
    for name in ("SendEmailRequest", "EmailWithTemplateRequest"):
        definitions[name]["properties"]["MessageStream"] = {"type": "string"}
        definitions[name]["properties"]["Metadata"] = {
            "type": "object",
            "additionalProperties": {"type": "string"},
        }
    send = definitions["SendEmailRequest"]
    send["required"] = ["From"]
    send["allOf"] = [
        {"anyOf": recipients},
        {"anyOf": [{"required": ["TextBody"]}, {"required": ["HtmlBody"]}]},
    ]
    template = definitions["EmailWithTemplateRequest"]
    template["required"] = ["From", "TemplateModel"]
    template["allOf"] = [
        {"anyOf": recipients},
        {"oneOf": [{"required": ["TemplateId"]}, {"required": ["TemplateAlias"]}]},
    ]
    return {
        path: _validator(
            jsonschema.Draft4Validator,
            {"$ref": f"#/definitions/{name}", "definitions": definitions},
        )
        for path, name in (
            ("/email", "SendEmailRequest"),
            ("/email/withTemplate", "EmailWithTemplateRequest"),
        )
    }


@functools.cache
def postmark_response_validator(name: str) -> Any:
    spec = load_spec(POSTMARK_SPEC)
    schema = {"$ref": f"#/definitions/{name}", "definitions": spec["definitions"]}
    return _validator(jsonschema.Draft4Validator, schema)


@functools.cache
def resend_request_validator() -> Any:
    """``POST /emails``: SendEmailRequest, strict.

    Overlays, from the spec's own prose and Resend's docs: tag names and values match
    ``[A-Za-z0-9_-]{1,256}`` (the Tag descriptions); a template excludes html and text ("If
    provided, do not include html or text") and stands in for the subject (Resend's template
    docs: subject and from default to the template's).
    """
    spec = load_spec(RESEND_SPEC)
    components = strict(copy.deepcopy(spec["components"]))
    schemas = components["schemas"]
    for key in ("name", "value"):
        schemas["Tag"]["properties"][key]["pattern"] = "^[A-Za-z0-9_-]{1,256}$"
    schemas["Tag"]["required"] = ["name", "value"]
    request = schemas["SendEmailRequest"]
    request["required"] = ["from", "to"]
    request["allOf"] = [
        {"anyOf": [{"required": ["subject"]}, {"required": ["template"]}]},
        {"not": {"required": ["template", "html"]}},
        {"not": {"required": ["template", "text"]}},
    ]
    schema = {"$ref": "#/components/schemas/SendEmailRequest", "components": components}
    return _validator(jsonschema.Draft202012Validator, schema)


@functools.cache
def resend_key_validator() -> Any:
    """The ``Idempotency-Key`` header parameter of ``POST /emails`` (docs: 1 to 256 chars)."""
    spec = load_spec(RESEND_SPEC)
    [param] = [p for p in spec["paths"]["/emails"]["post"]["parameters"] if p["in"] == "header"]
    return _validator(jsonschema.Draft202012Validator, {**param["schema"], "minLength": 1})


@functools.cache
def resend_response_validator() -> Any:
    spec = load_spec(RESEND_SPEC)
    schema = {"$ref": "#/components/schemas/SendEmailResponse", "components": spec["components"]}
    return _validator(jsonschema.Draft202012Validator, schema)


# --- real answers --------------------------------------------------------------------------


def sendgrid_error(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> Answer:
    """SendGrid's error body: ``{"errors": [{"message", "field"}]}`` (ErrorResponse)."""
    return Answer(
        status, json={"errors": [{"message": message, "field": field}]}, headers=headers or {}
    )


def sendgrid_rate_limited(reset_in: float = 30.0) -> Answer:
    """The 429 SendGrid documents, with its X-RateLimit-* headers (reset: epoch seconds)."""
    reset = int(datetime.now(UTC).timestamp() + reset_in)
    return sendgrid_error(
        429,
        "too many requests",
        headers={
            "X-RateLimit-Limit": "600",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        },
    )


def postmark_error(code: int, message: str, status: int = 422) -> Answer:
    """Postmark's error body: ``{"ErrorCode", "Message"}`` (StandardPostmarkResponse)."""
    return Answer(status, json={"ErrorCode": code, "Message": message})


def resend_error(
    status: int, name: str, message: str, headers: Mapping[str, str] | None = None
) -> Answer:
    """Resend's error body: ``{"statusCode", "name", "message"}``."""
    body = {"statusCode": status, "name": name, "message": message}
    return Answer(status, json=body, headers=headers or {})


def resend_rate_limited(seconds: int = 1) -> Answer:
    """The 429 Resend documents, with its ratelimit-* and retry-after headers."""
    return resend_error(
        429,
        "rate_limit_exceeded",
        "Too many requests. You can only make 2 requests per second. See rate limit response "
        "headers for more information. Or contact support to increase rate limit.",
        headers={
            "ratelimit-limit": "2",
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(seconds),
            "retry-after": str(seconds),
        },
    )


# --- the fakes ------------------------------------------------------------------------------


class SpecFake:
    """Validates, records and answers; subclasses say what is valid and what the API answers."""

    paths: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.violations: list[str] = []  # schema errors: a test asserts this stays empty
        self.requests: list[ReceivedRequest] = []
        self.accepted: list[ReceivedRequest] = []  # requests that led to a sent email
        self.answers: list[Answer] = []  # what each accepted request was answered
        self._script: deque[Answer] = deque()
        self.default: Answer | None = None  # when set, valid requests get this, not a success
        self._lose_next = False
        self._lock = threading.Lock()  # FakeAPI may serve from another thread
        self._ids = itertools.count(1)

    def push(self, *answers: Answer) -> None:
        """Answer the next valid requests with these, in order, instead of a success."""
        with self._lock:
            self._script.extend(answers)

    def lose_next_answer(self) -> None:
        """Take the next valid request, then reset the connection: "outcome unknown"."""
        with self._lock:
            self._lose_next = True

    def handle(self, request: ReceivedRequest) -> Answer:
        with self._lock:
            self.requests.append(request)
            problem = self.check(request)
            if problem is not None:
                return problem
            if self._script:
                return self._script.popleft()
            if self.default is not None:
                return self.default
            answer = self.accept(request, next(self._ids))
            if answer.status < 300:
                self.accepted.append(request)
                self.answers.append(answer)
            if self._lose_next:
                self._lose_next = False
                return Answer(drop=True)
            return answer

    def check(self, request: ReceivedRequest) -> Answer | None:
        """An error answer when ``request`` is not a valid call, else None."""
        if request.method != "POST" or request.path not in self.paths:
            return self.not_found()
        if not self.authorized(request.headers):
            return self.unauthorized()
        body = request.json
        errors = list(self.validator(request.path).iter_errors(body))
        if body is None or errors:
            found = [
                f"{'.'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in errors
            ]
            self.violations += found or ["<body>: not JSON"]
            return self.invalid(found[0] if found else "not JSON")
        return None

    def validator(self, path: str) -> Any:
        raise NotImplementedError

    def authorized(self, headers: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def accept(self, request: ReceivedRequest, number: int) -> Answer:
        raise NotImplementedError

    def not_found(self) -> Answer:
        raise NotImplementedError

    def unauthorized(self) -> Answer:
        raise NotImplementedError

    def invalid(self, problem: str) -> Answer:
        raise NotImplementedError


class SendgridFake(SpecFake):
    """SendGrid v3 Mail Send: 202 with ``X-Message-Id``, errors as ``{"errors": [...]}``."""

    paths = ("/v3/mail/send",)

    def __init__(self, api_key: str = "SG.test-key") -> None:
        super().__init__()
        self.api_key = api_key
        self._validator = sendgrid_request_validator()

    def validator(self, path: str) -> Any:
        return self._validator

    def authorized(self, headers: Mapping[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def accept(self, request: ReceivedRequest, number: int) -> Answer:
        message_id = hashlib.sha256(f"sg-{number}".encode()).hexdigest()[:22]
        return Answer(202, headers={"X-Message-Id": message_id})

    def not_found(self) -> Answer:
        return sendgrid_error(404, "not found", "null")

    def unauthorized(self) -> Answer:
        return sendgrid_error(
            401, "The provided authorization grant is invalid, expired, or revoked"
        )

    def invalid(self, problem: str) -> Answer:
        field, _, message = problem.partition(": ")
        return sendgrid_error(400, message, field)


class PostmarkFake(SpecFake):
    """Postmark ``/email`` and ``/email/withTemplate``: 200 with ``MessageID``, errors 422."""

    paths = ("/email", "/email/withTemplate")

    def __init__(self, server_token: str = "pm-server-token") -> None:
        super().__init__()
        self.server_token = server_token
        self._validators = postmark_request_validators()

    def validator(self, path: str) -> Any:
        return self._validators[path]

    def authorized(self, headers: Mapping[str, str]) -> bool:
        return (
            headers.get("x-postmark-server-token") == self.server_token
            and headers.get("accept") == "application/json"
            and headers.get("content-type") == "application/json"
        )

    def accept(self, request: ReceivedRequest, number: int) -> Answer:
        body = request.json
        return Answer(
            200,
            json={
                "To": body.get("To", ""),
                "SubmittedAt": datetime.now(UTC).isoformat(),
                "MessageID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"postmark-{number}")),
                "ErrorCode": 0,
                "Message": "OK",
            },
        )

    def not_found(self) -> Answer:
        return Answer(404, body=b"")

    def unauthorized(self) -> Answer:
        return postmark_error(
            10,
            "The Server Token you provided in the X-Postmark-Server-Token request header was "
            "invalid. Please verify that you are using a valid token.",
            status=401,
        )

    def invalid(self, problem: str) -> Answer:
        return postmark_error(403, f"Your request JSON is not compatible: {problem}")


class ResendFake(SpecFake):
    """Resend ``POST /emails``: 200 ``{"id"}``, named errors, and real idempotency.

    A repeated ``Idempotency-Key`` with the same body gets the first answer again and sends
    nothing; with another body it gets 409 ``invalid_idempotent_request`` (Resend's docs).
    """

    paths = ("/emails",)

    def __init__(self, api_key: str = "re_test_key") -> None:
        super().__init__()
        self.api_key = api_key
        self._validator = resend_request_validator()
        self._key_validator = resend_key_validator()
        self._seen: dict[str, tuple[bytes, Answer]] = {}

    def validator(self, path: str) -> Any:
        return self._validator

    def authorized(self, headers: Mapping[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def check(self, request: ReceivedRequest) -> Answer | None:
        problem = super().check(request)
        if problem is not None:
            return problem
        key = request.headers.get("idempotency-key")
        if key is not None and not self._key_validator.is_valid(key):
            self.violations.append(f"Idempotency-Key: {key!r}")
            return resend_error(
                400, "invalid_idempotency_key", "The key must be between 1-256 chars."
            )
        if key is not None and key in self._seen:
            digest, first = self._seen[key]
            if digest != hashlib.sha256(request.body).digest():
                return resend_error(
                    409,
                    "invalid_idempotent_request",
                    "Same idempotency key used with a different request payload. Change your "
                    "idempotency key or payload.",
                )
            return first  # replayed: nothing is sent again
        return None

    def accept(self, request: ReceivedRequest, number: int) -> Answer:
        answer = Answer(200, json={"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"resend-{number}"))})
        key = request.headers.get("idempotency-key")
        if key is not None:
            self._seen[key] = (hashlib.sha256(request.body).digest(), answer)
        return answer

    def not_found(self) -> Answer:
        return resend_error(404, "not_found", "The requested endpoint does not exist.")

    def unauthorized(self) -> Answer:
        return resend_error(
            401,
            "missing_api_key",
            "Missing API key in the authorization header. Include the following header "
            "Authorization: Bearer YOUR_API_KEY in the request.",
        )

    def invalid(self, problem: str) -> Answer:
        return resend_error(422, "validation_error", problem)
