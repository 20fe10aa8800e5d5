"""Raw message bytes + envelope -> ``Message`` (pure, no I/O). Owns which recipients are To, Cc
and Bcc, the decoded subject, bodies and attachments, the custom headers kept, and the raw bytes
forwarded to raw-MIME providers (Bcc and control headers cut out, nothing else changed).
"""

from __future__ import annotations

from dataclasses import dataclass

from smtp2api.controls import (
    CONTROL_HEADER_PREFIXES,
    CONTROL_HEADERS,
    Controls,
    extract_controls,
)
from smtp2api.errors import MessageError
from smtp2api.mime_headers import (
    HeaderField,
    HeaderSection,
    parse_mailboxes,
    scan_headers,
    without_fields,
)
from smtp2api.mime_parts import Body, parse_tree, walk
from smtp2api.mime_text import clean_line
from smtp2api.models import Address, Envelope, Message

# Forwarded to JSON APIs as custom headers (threading, list handling, auto-reply suppression),
# besides every X-* that is not a control header.
_KEPT_HEADERS = frozenset(
    {
        "message-id",
        "in-reply-to",
        "references",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-id",
        "auto-submitted",
        "precedence",
    }
)
# RFC 5322 §3.6.3 and §3.6.6: blind copies are never shown to other recipients.
_BLIND_HEADERS = frozenset({"bcc", "resent-bcc"})


@dataclass(frozen=True)
class MimeLimits:
    """Bounds on what one message may make the parser do; exceeding one is a MessageError."""

    max_depth: int = 20  # nesting of multipart and message/* parts
    max_parts: int = 500  # parts in the whole tree
    max_headers: int = 1000  # header fields, top level and all parts together
    max_header_bytes: int = 1_000_000  # bytes of header fields, top level and all parts


def parse_message(
    raw: bytes,
    envelope: Envelope,
    msg_id: str,
    *,
    received: bytes = b"",
    limits: MimeLimits = MimeLimits(),
    headers_only: bool = False,
) -> Message:
    """Parse ``raw`` for ``envelope``; raises MessageError and nothing else.

    ``headers_only``: skip the body (no text, html or attachments), for routes whose
    providers all take the raw MIME: the header-derived fields are the same, and a large
    message then costs no more memory than its bytes (docs/performance.md)."""
    return parse_with_controls(
        raw, envelope, msg_id, received=received, limits=limits, headers_only=headers_only
    )[0]


def parse_with_controls(
    raw: bytes,
    envelope: Envelope,
    msg_id: str,
    *,
    received: bytes = b"",
    limits: MimeLimits = MimeLimits(),
    headers_only: bool = False,
) -> tuple[Message, Controls]:
    """``parse_message`` plus the Controls the message's headers carried."""
    try:
        return _parse(raw, envelope, msg_id, received, limits, headers_only=headers_only)
    except MessageError:
        raise
    except Exception as exc:  # safety net: each known failure is handled where it happens
        raise MessageError(f"unparseable message ({type(exc).__name__})") from exc


def _parse(
    raw: bytes,
    envelope: Envelope,
    msg_id: str,
    received: bytes,
    limits: MimeLimits,
    *,
    headers_only: bool = False,
) -> tuple[Message, Controls]:
    section = scan_headers(raw, max_fields=limits.max_headers, max_bytes=limits.max_header_bytes)
    named = [f for f in section.fields if f.name]
    control = [f for f in named if _is_control(f.key)]
    # Controls see the unfolded text; each handler decides about RFC 2047 (JSON must not be
    # decoded blindly).
    controls = extract_controls([(f.name, f.text(encoded_words=False)) for f in control])
    dropped = [f for f in named if f.key in _BLIND_HEADERS] + control

    body = Body() if headers_only else _body(raw, limits, section)

    to, cc, bcc = _split_recipients(envelope.rcpt_tos, section)
    subject = section.first("subject")
    message = Message(
        id=msg_id,
        raw=received + without_fields(raw, dropped),
        from_=_sender(section),
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=tuple(
            Address(addr, name) for name, addr in _mailboxes(section, "reply-to") if addr
        ),
        subject=subject.text() if subject else "",
        text=body.text,
        html=body.html,
        headers=tuple(_custom_headers(named)),
        attachments=tuple(body.attachments),
        tags=controls.tags,
        metadata=controls.metadata,
        template=controls.template,
        template_variables=controls.template_variables,
        stream=controls.stream,
        configuration_set=controls.configuration_set,
    )
    return message, controls


def _is_control(key: str) -> bool:
    # ``is_control_header`` for a key scan_headers made: already lower-case, no blanks.
    return key in CONTROL_HEADERS or key.startswith(CONTROL_HEADER_PREFIXES)


def _body(raw: bytes, limits: MimeLimits, section: HeaderSection) -> Body:
    root = parse_tree(
        raw,
        max_depth=limits.max_depth,
        max_parts=limits.max_parts,
        max_headers=limits.max_headers,
        max_header_bytes=limits.max_header_bytes,
        top=[(f.name, f.start, f.end) for f in section.fields],
    )
    return walk(root, linesep="\r\n" if b"\r\n" in raw else "\n")


def _mailboxes(section: HeaderSection, key: str) -> list[tuple[str, str | None]]:
    return [box for f in section.all(key) for box in parse_mailboxes(f.value)]


def _sender(section: HeaderSection) -> Address | None:
    """The author: the first mailbox of the first From field, or None.

    Policy for ambiguous From (to be pinned by the security review): RFC 5322 §3.6 allows one
    From field; with several, the first one counts, and with several mailboxes in it (legal with
    a Sender field), the first mailbox. If that mailbox is not exactly one valid addr-spec
    (``a@x@y``, two angle-addrs, no domain), the result is None rather than a guess between
    ``a@x`` and ``x@y``: callers fall back to the envelope sender, which policy has checked.
    """
    field = section.first("from")
    boxes = parse_mailboxes(field.value) if field else []
    name, addr = boxes[0] if boxes else ("", None)
    return Address(addr, name) if addr else None


def _split_recipients(
    rcpt_tos: tuple[str, ...], section: HeaderSection
) -> tuple[tuple[Address, ...], tuple[Address, ...], tuple[Address, ...]]:
    """To/Cc/Bcc from the envelope, which is authoritative (design §2).

    Each envelope recipient appears once (the first spelling of a case-insensitive duplicate
    wins), in envelope order: in ``to`` when the To field names it, else in ``cc`` when Cc
    does, else in ``bcc``. Addresses found only in header fields are dropped.
    """
    names: dict[str, dict[str, str]] = {"to": {}, "cc": {}, "bcc": {}}
    for key, found in names.items():
        for name, addr in _mailboxes(section, key):
            if addr:
                found.setdefault(addr.lower(), name)
    out: dict[str, list[Address]] = {"to": [], "cc": [], "bcc": []}
    seen: set[str] = set()
    for rcpt in rcpt_tos:
        lowered = rcpt.lower()
        if lowered in seen:
            continue
        seen.add(lowered)
        kind = "to" if lowered in names["to"] else "cc" if lowered in names["cc"] else "bcc"
        out[kind].append(Address(rcpt, names[kind].get(lowered, "")))
    return tuple(out["to"]), tuple(out["cc"]), tuple(out["bcc"])


def _custom_headers(fields: list[HeaderField]) -> list[tuple[str, str]]:
    kept: list[tuple[str, str]] = []
    for f in fields:
        key = f.key
        if not (key in _KEPT_HEADERS or key.startswith("x-")) or _is_control(key):
            continue
        # X-* are unstructured (decode RFC 2047); the others are structured, where an
        # encoded-word may not appear (RFC 2047 §5), so their text is kept as written.
        kept.append((clean_line(f.name), f.text(encoded_words=key.startswith("x-"))))
    return kept
