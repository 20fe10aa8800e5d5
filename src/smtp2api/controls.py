"""Provider control headers: every convention (the gateway's own X-Smtp2api-*, SES, Postmark,
Mailgun, SendGrid's X-SMTPAPI) translated into one neutral set of tags, metadata, template,
stream and configuration set (design §2), so a tag set for one provider reaches any other.
``mime.py`` strips every header listed here from the raw message and from ``Message.headers``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from smtp2api import replies
from smtp2api.errors import MessageError
from smtp2api.mime_text import clean_line, decode_words

TEMPLATE = "x-smtp2api-template"
VARIABLES = "x-smtp2api-variables"
TAGS = "x-smtp2api-tags"
SES_CONFIGURATION_SET = "x-ses-configuration-set"
SES_MESSAGE_TAGS = "x-ses-message-tags"
PM_TAG = "x-pm-tag"
PM_METADATA_PREFIX = "x-pm-metadata-"
PM_MESSAGE_STREAM = "x-pm-message-stream"
MAILGUN_TAG = "x-mailgun-tag"
MAILGUN_VARIABLES = "x-mailgun-variables"
SMTPAPI = "x-smtpapi"

# Every header translated into Controls and never forwarded: lower-case names, and prefixes
# (entries ending in "-", as "x-pm-metadata-" for X-PM-Metadata-<key>). Use is_control_header.
CONTROL_HEADERS: frozenset[str] = frozenset(
    {
        TEMPLATE,
        VARIABLES,
        TAGS,
        SES_CONFIGURATION_SET,
        SES_MESSAGE_TAGS,
        PM_TAG,
        PM_METADATA_PREFIX,
        PM_MESSAGE_STREAM,
        MAILGUN_TAG,
        MAILGUN_VARIABLES,
        SMTPAPI,
    }
)
CONTROL_HEADER_PREFIXES: tuple[str, ...] = tuple(
    sorted(name for name in CONTROL_HEADERS if name.endswith("-"))
)


def is_control_header(name: str) -> bool:
    """True for a header that is translated into ``Controls`` and never forwarded."""
    key = name.strip().lower()
    return key in CONTROL_HEADERS or key.startswith(CONTROL_HEADER_PREFIXES)


@dataclass(frozen=True)
class Controls:
    """What the control headers asked for, provider-neutral."""

    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    template_variables: dict[str, Any] | None = None
    stream: str | None = None  # Postmark message stream
    configuration_set: str | None = None  # SES configuration set


def _fail(reason: str) -> MessageError:
    return MessageError(reason, reply=replies.R554_BAD_MESSAGE.with_text(f"Rejected: {reason}"))


def _json_object(name: str, value: str) -> dict[str, Any]:
    """The JSON object in header ``name``; encoded-words are undone if the raw text is no JSON
    (a client library may have RFC 2047-encoded a long non-ASCII value)."""
    candidates = [value]
    if "=?" in value:
        candidates.append(decode_words(value))
    for text in candidates:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            continue
        if isinstance(parsed, dict):
            return parsed
        raise _fail(f"{name} is not a JSON object")
    raise _fail(f"{name} is not valid JSON")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return clean_line(value)
    return clean_line(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


class _Builder:
    def __init__(self) -> None:
        self.tags: list[str] = []
        self.metadata: dict[str, str] = {}
        self.template: str | None = None
        self.variables: dict[str, Any] | None = None
        self.stream: str | None = None
        self.configuration_set: str | None = None

    def tag(self, values: Iterable[Any]) -> None:
        for value in values:
            text = _as_text(value)
            if text and text not in self.tags:
                self.tags.append(text)

    def meta(self, items: Iterable[tuple[Any, Any]]) -> None:
        for key, value in items:
            name = _as_text(key)
            if name:
                self.metadata[name] = _as_text(value)

    def build(self) -> Controls:
        return Controls(
            tuple(self.tags),
            self.metadata,
            self.template,
            self.variables,
            self.stream,
            self.configuration_set,
        )


def _first(current: str | None, value: str) -> str | None:
    return current if current is not None else (clean_line(decode_words(value)) or None)


def _ses_tags(value: str) -> list[tuple[str, str]]:
    # "name1=value1, name2=value2" (SES SendRawEmail via SMTP)
    pairs = (item.partition("=") for item in value.split(","))
    return [(k.strip(), v.strip()) for k, sep, v in pairs if sep and k.strip()]


def _smtpapi(b: _Builder, value: str) -> None:
    # SendGrid X-SMTPAPI: only "category" and "unique_args" are meaningful here; its "to",
    # "sub" and "filters" are ignored, because the SMTP envelope decides who receives the mail.
    api = _json_object("X-SMTPAPI", value)
    category = api.get("category")
    b.tag([category] if isinstance(category, str) else category or ())
    unique_args = api.get("unique_args")
    if isinstance(unique_args, dict):
        b.meta(unique_args.items())


def _variables(b: _Builder, value: str) -> None:
    b.variables = {**(b.variables or {}), **_json_object("X-Smtp2api-Variables", value)}


def _set_template(b: _Builder, v: str) -> None:
    b.template = _first(b.template, v)


def _set_stream(b: _Builder, v: str) -> None:
    b.stream = _first(b.stream, v)


def _set_configuration_set(b: _Builder, v: str) -> None:
    b.configuration_set = _first(b.configuration_set, v)


_HANDLERS: dict[str, Callable[[_Builder, str], None]] = {
    TEMPLATE: _set_template,
    VARIABLES: _variables,
    TAGS: lambda b, v: b.tag(decode_words(v).split(",")),
    PM_TAG: lambda b, v: b.tag([decode_words(v)]),  # Postmark: one tag per message
    MAILGUN_TAG: lambda b, v: b.tag([decode_words(v)]),  # Mailgun: one per header, repeatable
    SES_MESSAGE_TAGS: lambda b, v: b.meta(_ses_tags(decode_words(v))),
    SES_CONFIGURATION_SET: _set_configuration_set,
    PM_MESSAGE_STREAM: _set_stream,
    MAILGUN_VARIABLES: lambda b, v: b.meta(_json_object("X-Mailgun-Variables", v).items()),
    SMTPAPI: _smtpapi,
}


def extract_controls(headers: list[tuple[str, str]]) -> Controls:
    """Translate the control headers among ``headers`` (name, unfolded value) into Controls.

    Headers are read in order: single values (template, stream, configuration set) take the
    first occurrence, tags accumulate without duplicates, and a later metadata key overrides an
    earlier one. Invalid JSON in a JSON-valued header raises MessageError naming the header.
    """
    builder = _Builder()
    for name, value in headers:
        key = name.strip().lower()
        handler = _HANDLERS.get(key)
        if handler is not None:
            handler(builder, value)
        elif is_control_header(key):  # X-PM-Metadata-<key>: the key keeps its spelling
            builder.meta([(name.strip()[len(PM_METADATA_PREFIX) :], decode_words(value))])
    return builder.build()
