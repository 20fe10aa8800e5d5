"""A local fake of Mailgun's ``POST /v3/{domain}/messages.mime`` for ``FakeAPI``.

Each request's multipart form is turned into the object form of the Mailgun OpenAPI request
schema (``shared/provider-specs/mailgun-openapi.messages.subset.yaml``, provenance in
``SOURCES.md`` there; read at test time, never copied) and validated with ``jsonschema``:
array properties (``to``, ``o:tag``) take every value of a repeated field, any other field
must appear once. On top come the rules Mailgun states in prose: ``message`` is a file
upload, send options total at most 16 KB, recipients must be valid addresses. Answers are
Mailgun's real bodies (the spec's examples), themselves checked against the spec's response
schemas.

    fake = MailgunFake(api_key="key-test", domain="mg.example.com")
    async with FakeAPI(handler=fake.handle) as api:
        fake.push(mailgun_rate_limited(120))
        ...  # base_url = api.url
    assert fake.violations == []
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import itertools
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema
import yaml

from tests.conftest import SHARED, require_tool
from tests.support.fakeapi import Answer, ReceivedRequest

SPEC = SHARED / "provider-specs" / "mailgun-openapi.messages.subset.yaml"
MIME_PATH = "/v3/{domain_name}/messages.mime"
_REQUEST_SCHEMA = "POST-v3-domain_name-messages-mime-multipart-form-data-RequestBody"
_PATH = re.compile(r"^/v3/(?P<domain>[^/]+)/messages\.mime$")
_OPTION = re.compile(r"^[ohvt]:")
MAX_OPTIONS_BYTES = 16 * 1024  # "Send options (o:, h:, v:, t:) are limited to 16KB total"
# The spec's example texts (400, 429) and Mailgun's documented 401/404 bodies.
INVALID_TO = "'to' parameter is not a valid address. please check documentation."
OPTIONS_TOO_LARGE = (
    "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"
)
_ADDRESS = re.compile(r"^(?:[^<>]*<)?[^@\s<>]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+>?$")


@cache
def spec() -> Any:
    """The Mailgun spec extract (fails in CI, skips elsewhere, when shared/ is absent)."""
    require_tool(str(SPEC) if SPEC.is_file() else None, f"provider spec {SPEC}")
    return yaml.safe_load(SPEC.read_text(encoding="utf-8"))


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; $refs resolve against the whole document.
    document = {**spec(), **schema}
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


@cache
def request_schema() -> dict[str, Any]:
    schema: dict[str, Any] = spec()["components"]["schemas"][_REQUEST_SCHEMA]
    return schema


@cache
def request_validator() -> jsonschema.Draft202012Validator:
    return _validator(request_schema())


def response_validator(status: int) -> jsonschema.Draft202012Validator:
    operation = spec()["paths"][MIME_PATH]["post"]
    content = operation["responses"][str(status)]["content"]["application/json"]
    return _validator(content["schema"])


def checked(status: int, body: Any, headers: dict[str, str] | None = None) -> Answer:
    """An answer whose JSON body is validated against the spec's schema for ``status``."""
    if str(status) in spec()["paths"][MIME_PATH]["post"]["responses"]:
        response_validator(status).validate(body)
    return Answer(status, json=body, headers=headers or {})


def mailgun_error(status: int, message: str) -> Answer:
    return checked(status, {"message": message})


def mailgun_forbidden() -> Answer:
    return checked(401, "Forbidden")  # 401's body is a bare JSON string


def mailgun_rate_limited(seconds: int, domain: str = "mg.example.com") -> Answer:
    return mailgun_error(
        429,
        f"Domain {domain} is not allowed to send: account-requests-per-sec limit exceeded, "
        f"try again after {seconds} seconds",
    )


@dataclass(frozen=True)
class Form:
    """A parsed multipart/form-data body: text fields (repeatable) and file parts."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)  # name, type, data


def _headers(block: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(block + b"\r\n")


def parse_form(content_type: str, body: bytes) -> Form:
    """Parse a multipart/form-data body (RFC 7578, RFC 2046 §5.1.1) byte-exactly.

    The stdlib's MIME parser would parse a ``message/rfc822`` file part as a message of its
    own; here each part's content stays the bytes that were sent.
    """
    boundary = _headers(f"Content-Type: {content_type}".encode()).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("not a multipart body: no boundary")
    segments = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    if len(segments) < 3 or not segments[-1].startswith(b"--"):
        raise ValueError("multipart body without its close delimiter")
    form = Form()
    for segment in segments[1:-1]:
        line_end, blank = segment.find(b"\r\n"), segment.find(b"\r\n\r\n")
        if line_end < 0 or blank < 0 or segment[:line_end].strip(b" \t"):
            raise ValueError("malformed part")
        head, data = _headers(segment[line_end + 2 : blank]), segment[blank + 4 :]
        name = head.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise ValueError("a part without a name")
        filename = head.get_filename()
        if filename is not None:
            form.files[name] = (filename, head.get_content_type(), data)
        else:
            form.fields.setdefault(name, []).append(data.decode("utf-8"))
    return form


def form_object(form: Form) -> dict[str, Any]:
    """The form in the schema's object form: arrays for array properties, else one value."""
    properties = request_schema().get("properties", {})
    out: dict[str, Any] = {}
    for name, values in form.fields.items():
        is_array = properties.get(name, {}).get("type") == "array"
        out[name] = values if is_array or len(values) > 1 else values[0]
    for name, (_filename, _type, data) in form.files.items():
        out[name] = data.decode("latin-1")  # format: binary -> a string of octets
    return out


class MailgunFake:
    """Validates, records and answers ``messages.mime`` calls like Mailgun does."""

    def __init__(self, api_key: str = "key-test", domain: str = "mg.example.com") -> None:
        self.api_key = api_key
        self.domain = domain
        self.violations: list[str] = []  # schema errors: a test asserts this stays empty
        self.requests: list[ReceivedRequest] = []
        self.accepted: list[Form] = []  # the forms of requests that sent an email
        self._script: deque[Answer] = deque()
        self._lock = threading.Lock()  # FakeAPI may serve from another thread
        self._ids = itertools.count(1)

    def push(self, *answers: Answer) -> None:
        """Answer the next valid requests with these, in order, instead of a success."""
        with self._lock:
            self._script.extend(answers)

    def handle(self, request: ReceivedRequest) -> Answer:
        with self._lock:
            self.requests.append(request)
            match = _PATH.match(request.path)
            if request.method != "POST" or match is None:
                return Answer(404, json={"message": "Not Found"})
            if not self._authorized(request.headers.get("authorization", "")):
                return mailgun_forbidden()
            if match["domain"] != self.domain:
                return Answer(404, json={"message": f"Domain not found: {match['domain']}"})
            form, problem = self._check(request)
            if problem is not None:
                return problem
            if self._script:
                return self._script.popleft()
            self.accepted.append(form)
            number = next(self._ids)
            return checked(
                200,
                {"id": f"<20261128.{number}.fake@{self.domain}>", "message": "Queued. Thank you."},
            )

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return decoded == f"api:{self.api_key}"

    def _check(self, request: ReceivedRequest) -> tuple[Form, Answer | None]:
        content_type = request.headers.get("content-type", "")
        try:
            form = parse_form(content_type, request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            self.violations.append(f"<body>: {exc}")
            return Form(), mailgun_error(400, "Bad Request")
        errors = list(request_validator().iter_errors(form_object(form)))
        found = [f"{'.'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in errors]
        if "message" in form.fields:  # "send this as a file upload"
            found.append("message: sent as a text field, not a file part")
        if found:
            self.violations += found
            return form, mailgun_error(400, found[0])
        options = sum(
            len(name.encode()) + len(value.encode())
            for name, values in form.fields.items()
            if _OPTION.match(name)
            for value in values
        )
        if options > MAX_OPTIONS_BYTES:
            return form, mailgun_error(400, OPTIONS_TOO_LARGE)
        if not all(_ADDRESS.match(to) for value in form.fields["to"] for to in value.split(",")):
            return form, mailgun_error(400, INVALID_TO)
        return form, None
