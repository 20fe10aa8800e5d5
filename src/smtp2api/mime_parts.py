"""The MIME body tree (``mime_tree.parse_tree``: compat32, bounded) walked iteratively: the text
and HTML bodies picked, every other leaf turned into an Attachment. Nothing here recurses
without a bound and nothing raises but MessageError.
"""

from __future__ import annotations

import binascii
import io
import quopri
import re
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message as EmailMessage
from email.policy import compat32

from smtp2api.errors import MessageError
from smtp2api.mime_text import (
    clean_line,
    decode_bytes,
    decode_words,
    header_text,
    sanitize_filename,
    text_from_header,
    unfold,
)
from smtp2api.mime_tree import Part, parse_tree, source_content
from smtp2api.models import Attachment

__all__ = ["Body", "children", "parse_tree", "walk"]

_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_MAX_CONTENT_ID = 250


def children(part: EmailMessage) -> list[EmailMessage]:
    """The sub-parts of a multipart or message/* part. Only a list payload is read: compat32's
    ``get_payload()`` decodes an 8-bit str payload with the declared charset and can raise."""
    if not part.is_multipart():
        return []
    payload = part.get_payload()
    return [p for p in payload if isinstance(p, EmailMessage)] if isinstance(payload, list) else []


@dataclass
class Body:
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def walk(root: EmailMessage, *, linesep: str) -> Body:
    """The first text/plain and text/html that are not attachments, and every other leaf.

    Multiparts of any subtype are entered (alternative, related, mixed, signed, report...);
    ``message/*`` parts are not: an attached message is one attachment.
    """
    body = Body()
    stack = [root]
    while stack:
        part = stack.pop()
        ctype = _content_type(part)
        index = len(body.attachments) + 1
        if ctype.startswith("message/"):
            body.attachments.append(_message_attachment(part, ctype, index, linesep))
            continue
        if part.is_multipart():
            stack.extend(reversed(children(part)))
            continue
        if ctype.startswith("multipart/"):  # no boundary (RFC 2046 §5.1.1): opaque text
            ctype = "text/plain"
        if not _take_as_body(part, ctype, body):
            body.attachments.append(_leaf_attachment(part, ctype, index))
    return body


def _header(part: EmailMessage, name: str) -> str:
    value = part.get(name)
    return value if isinstance(value, str) else ""


def _content_type(part: EmailMessage) -> str:
    ctype = part.get_content_type()
    return ctype if _CONTENT_TYPE.fullmatch(ctype) else "application/octet-stream"


def _disposition(part: EmailMessage) -> str:
    return _header(part, "content-disposition").split(";", 1)[0].strip().lower()


def _param(part: EmailMessage, name: str, header: str) -> str | None:
    """A parameter value, RFC 2231 decoded (charset and continuations), or None."""
    try:
        value = part.get_param(name, None, header)
    except (ValueError, LookupError, TypeError, IndexError):
        return None  # e.g. int() of a 5000-digit RFC 2231 section number
    if isinstance(value, tuple):  # (charset, language, octets as latin-1 text)
        charset, _language, text = value
        try:
            octets = str(text).encode("latin-1", "surrogateescape")
        except UnicodeEncodeError:
            octets = str(text).encode("utf-8", "surrogateescape")
        return decode_bytes(octets, charset)
    return text_from_header(value) if isinstance(value, str) else None


def _filename(part: EmailMessage) -> str | None:
    """The filename (RFC 2183) or, failing that, the Content-Type name parameter. Encoded-words
    in it are decoded too: RFC 2047 §5 forbids them there, but Outlook and others send them."""
    for name, header in (("filename", "content-disposition"), ("name", "content-type")):
        value = _param(part, name, header)
        if value and value.strip():
            return decode_words(unfold(value))
    return None


def _content_bytes(part: EmailMessage) -> bytes:
    """The content after transfer decoding (RFC 2045 §6); an unknown encoding leaves it as is."""
    try:
        data: object = source_content(part) if isinstance(part, Part) else None
        if data is None:
            data = part.get_payload(decode=True)
    except (ValueError, LookupError, TypeError):  # compat32 catches most decoding errors itself
        data = None
    return data if isinstance(data, bytes) else b""


def _take_as_body(part: EmailMessage, ctype: str, body: Body) -> bool:
    """Use ``part`` as the text or HTML body if it is the first of its kind and inline."""
    if _disposition(part) == "attachment" or _filename(part) is not None:
        return False
    if ctype == "text/plain" and body.text is None:
        body.text = _decode_text(part)
        return True
    if ctype == "text/html" and body.html is None:
        body.html = _decode_text(part)
        return True
    return False


def _decode_text(part: EmailMessage) -> str:
    charset = _param(part, "charset", "content-type")
    return decode_bytes(_content_bytes(part), charset)


def _content_id(part: EmailMessage) -> str | None:
    cid = clean_line(text_from_header(unfold(_header(part, "content-id"))))
    cid = cid.strip("<> \t")[:_MAX_CONTENT_ID]
    return cid or None


def _leaf_attachment(part: EmailMessage, ctype: str, index: int) -> Attachment:
    content_id = _content_id(part)
    # An API's "inline" means "referenced by cid: from the HTML"; without a Content-ID there is
    # nothing to reference, so such a part is sent as a plain attachment.
    inline = content_id is not None and _disposition(part) != "attachment"
    return Attachment(
        filename=sanitize_filename(_filename(part), index, ctype),
        content_type=ctype,
        content=_content_bytes(part),
        disposition="inline" if inline else "attachment",
        content_id=content_id,
    )


def _message_attachment(part: EmailMessage, ctype: str, index: int, linesep: str) -> Attachment:
    """An attached message as one ``message/*`` attachment named after its subject."""
    inner = children(part)
    if inner:
        content = linesep.encode("ascii").join(_flatten(p, linesep) for p in inner)
    else:
        content = _content_bytes(part)
    # RFC 2046 §5.2.1 allows only 7bit/8bit/binary here, but base64 is seen in the wild; the
    # parser then read the encoded text as the "message", so decode what it produced.
    cte = _header(part, "content-transfer-encoding").strip().lower()
    if inner and cte in ("base64", "quoted-printable"):
        content = _transfer_decode(content, cte)
    name = _filename(part)
    if name is None and inner and ctype in ("message/rfc822", "message/global"):
        subject = header_text(_header(inner[0], "subject"))
        name = f"{subject[:150]}.eml" if subject else None
    return Attachment(
        filename=sanitize_filename(name, index, ctype),
        content_type=ctype,
        content=content,
        disposition="attachment",
        content_id=_content_id(part),
    )


def _transfer_decode(data: bytes, cte: str) -> bytes:
    try:
        if cte == "base64":
            return binascii.a2b_base64(data)  # not strict: skips line breaks and stray bytes
        return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data


def _flatten(message: EmailMessage, linesep: str) -> bytes:
    """An attached message back to bytes; headers keep their text, bodies their bytes."""
    buffer = io.BytesIO()
    policy = compat32.clone(linesep=linesep, max_line_length=None)
    if hasattr(policy, "verify_generated_headers"):  # CPython >= 3.11.10 (CVE-2024-6923)
        policy = policy.clone(verify_generated_headers=False)
    try:
        BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(message, unixfrom=False)
    except Exception as exc:
        raise MessageError("an attached message cannot be serialised") from exc
    return buffer.getvalue()
