"""mime.parse_message against the shared corpus and hand-made messages (pure, no sockets)."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from smtp2api.controls import CONTROL_HEADERS, Controls, extract_controls, is_control_header
from smtp2api.errors import MessageError
from smtp2api.mime import MimeLimits, parse_message, parse_with_controls
from smtp2api.models import Envelope, Message

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SMTP2API_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "mime-corpus"
CORPUS_FILES = sorted(p for p in CORPUS.glob("*/*") if p.is_file() and p.parent.name != "licenses")
SCHEMA = json.loads((REPO / "docs" / "message.schema.json").read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)

DEFAULT_LIMITS = MimeLimits()
HIDDEN = "hidden@bcc.example"
ENVELOPE = Envelope("sender@example.org", (HIDDEN, "test@example.com"))
RECEIVED = b"Received: from client.test by gw.test with ESMTPSA id abc\r\n"
# A Bcc-like field at the start of a line of the header section (RFC 5322 §3.6.3, §3.6.6).
BLIND_FIELD = re.compile(rb"(?im)^(?:resent-)?bcc[ \t]*:")


def header_section(raw: bytes) -> bytes:
    """Up to the first empty line (RFC 5322 §2.1); CRLF, LF and CR all end a line."""
    pos = 0
    for match in re.finditer(rb"\r\n|\r|\n", raw):
        if match.start() == pos:
            return raw[:pos]
        pos = match.end()
    return raw


def check_invariants(message: Message, envelope: Envelope) -> None:
    """What must hold for every parsed message, whatever its input."""
    VALIDATOR.validate(message.as_json())
    expected = list(dict.fromkeys(r.lower() for r in envelope.rcpt_tos))
    assert sorted(r.lower() for r in message.recipients) == sorted(expected)
    assert len(message.recipients) == len(expected)
    assert not BLIND_FIELD.search(header_section(message.raw))
    for name, _value in message.headers:
        assert not is_control_header(name)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def parse(
    raw: bytes, *rcpts: str, received: bytes = b"", limits: MimeLimits = DEFAULT_LIMITS
) -> Message:
    envelope = Envelope("sender@example.org", rcpts or ("rcpt@example.net",))
    message = parse_message(raw, envelope, "msg-1", received=received, limits=limits)
    check_invariants(message, envelope)
    return message


# --- the corpus ------------------------------------------------------------------------------


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) > 100, f"MIME corpus not found under {CORPUS}"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_file_parses_or_is_rejected(path: Path) -> None:
    raw = path.read_bytes()
    started = time.perf_counter()
    message: Message | None = None
    try:
        message = parse_message(raw, ENVELOPE, "msg-1", received=RECEIVED)
    except MessageError as exc:  # allowed, but never the catch-all for an unexpected bug
        reason = str(exc)
    else:
        reason = ""
    assert not reason.startswith("unparseable message"), reason
    if message is None:
        return
    assert time.perf_counter() - started < 10
    check_invariants(message, ENVELOPE)
    assert message.raw.startswith(RECEIVED)
    assert HIDDEN in [a.email for a in message.bcc]
    if not BLIND_FIELD.search(header_section(raw)):
        assert message.raw == RECEIVED + raw  # nothing to cut: byte-exact


def corpus(name: str) -> bytes:
    path = CORPUS / name
    if not path.exists():
        pytest.fail(f"corpus file missing: {path}")
    return path.read_bytes()


def test_corpus_dingus_fish_attachment_is_byte_exact() -> None:
    raw = corpus("cpython/msg_07.txt")
    message = parse(raw)
    assert message.subject == "Here is your dingus fish"
    assert message.text is not None
    assert message.text.startswith("Hi there,")
    (gif,) = message.attachments
    encoded = raw.split(b'filename="dingusfish.gif"\n\n', 1)[1].split(b"\n--BOUNDARY--", 1)[0]
    assert gif.filename == "dingusfish.gif"
    assert gif.content_type == "image/gif"
    assert gif.disposition == "attachment"
    assert gif.content == base64.b64decode(b"".join(encoded.split()))
    assert gif.content.startswith(b"GIF87a")


def test_corpus_netscape_related_inline_images() -> None:
    message = parse(corpus("hunnysoft/m1005.txt"))
    assert message.text is not None
    assert message.html is not None
    assert "Die Hasen" in message.subject
    inline = [a for a in message.attachments if a.disposition == "inline"]
    assert [a.filename for a in inline] == ["nsmailEG.png", "nsmail39.png"]  # C:\TEMP\ gone
    assert inline[0].content_id == "part1.39235FC5.E71D8178@example.com"
    for attachment in message.attachments:
        assert attachment.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert all(f"cid:{a.content_id}" in message.html for a in inline)


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("ruby-mail/multi_charset__japanese_iso_2022.eml", "まみむめも"),
        ("ruby-mail/rfc6532__utf8_headers.eml", "Säying Hello"),
        ("ruby-mail/error_emails__bad_encoded_subject.eml", "TEST"),  # charset "NONE"
        ("enmime/mail__qp-utf8-header-recursed.raw", "MIME UTF8 Test ¢ More Text"),
    ],
)
def test_corpus_subject_decoding(name: str, subject: str) -> None:
    assert parse(corpus(name)).subject == subject


def test_corpus_utf8_display_name() -> None:
    message = parse(corpus("ruby-mail/rfc6532__utf8_headers.eml"))
    assert message.from_ is not None
    assert message.from_.name == "Jöhn Doe"


@pytest.mark.parametrize(
    ("name", "filename"),
    [
        ("enmime/mail__mime-bad-8bit-filename.raw", "管理.doc"),  # raw UTF-8 in the header
        ("mime4j/russian-headers.msg", "Список.doc"),
        # "/evil/because:of\path\3d-=?ISO-8859-1?Q?=63?=om=?US-ASCII*EN?Q?pr?=ess.gif"
        ("mimetools/multi-2evil.msg", "3d-compress.gif"),
    ],
)
def test_corpus_filenames_decoded_and_sanitised(name: str, filename: str) -> None:
    assert filename in [a.filename for a in parse(corpus(name)).attachments]


def test_corpus_odd_case_bcc_is_cut_from_raw() -> None:
    raw = corpus("ruby-mail/error_emails__content_transfer_encoding_empty.eml")
    assert b"\r\nBCc: Array\r\n" in raw
    message = parse(raw)
    assert message.raw == raw.replace(b"BCc: Array\r\n", b"")
    assert message.html is not None


def test_corpus_obsolete_routes_are_dropped() -> None:
    message = parse(corpus("torture/with-obsolete-routing.eml"), "baz@quux.com", "x@y.example")
    assert message.from_ is not None
    assert message.from_.email == "foo@bar.com"
    assert [a.email for a in message.to] == ["baz@quux.com"]
    assert [a.email for a in message.bcc] == ["x@y.example"]


def test_corpus_two_mailboxes_in_one_from_is_ambiguous() -> None:
    # "From: Bob Dunite <bob@extern> Bobby Dunite <bobby@extern>": no guess, see mime._sender
    message = parse(corpus("enmime/mail__malformed-multiple-address-header-values.raw"))
    assert message.from_ is None


def test_corpus_base64_encoded_rfc822_attachment_is_decoded() -> None:
    message = parse(corpus("mime4j/base64encoded-rfc822message-nested.msg"))
    (attached,) = message.attachments
    assert attached.content_type == "message/rfc822"
    assert attached.content.startswith(b"MIME-Version: 1.0")
    assert b"Subject: a simple rfc822 message encoded in a base64 body." in attached.content


def test_corpus_large_html_is_fast() -> None:
    for name in ("mailparser/outofmemory.eml", "mailparser/htmllargecallstack.eml"):
        started = time.perf_counter()
        message = parse(corpus(name), "test@example.com")
        assert time.perf_counter() - started < 5
        assert message.html is not None
        assert len(message.html) > 500_000
        assert [a.email for a in message.to] == ["test@example.com"]


def test_corpus_torture_test() -> None:
    message = parse(corpus("torture/torture-test.eml"))
    assert message.subject == "Multi-media mail demonstration"
    assert message.text is not None
    assert len(message.attachments) >= 4


# --- Bcc and the raw bytes --------------------------------------------------------------------

BCC_MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Bcc: carol@example.com,\r\n"
    b"\tdave@example.com\r\n"
    b"Subject: folded  bcc \r\n"
    b"BCC : eve@example.com\r\n"
    b"Resent-Bcc: frank@example.com\r\n"
    b"X-Trailing:   spaces kept   \r\n"
    b"\r\n"
    b"Body mentions\r\nBcc: not-a-header@example.com\r\n"
)


def test_bcc_fields_are_cut_from_raw_byte_exact() -> None:
    message = parse(BCC_MESSAGE, "bob@example.net", "carol@example.com", received=RECEIVED)
    assert message.raw == RECEIVED + (
        b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: folded  bcc \r\n"
        b"X-Trailing:   spaces kept   \r\n"
        b"\r\n"
        b"Body mentions\r\nBcc: not-a-header@example.com\r\n"
    )
    assert [a.email for a in message.bcc] == ["carol@example.com"]
    assert message.subject == "folded  bcc"


def test_bcc_after_bare_cr_or_junk_line_is_cut_too() -> None:
    raw = b"Subject: x\rBcc: secret@example.com\r\nnot a field\nBcc: also@example.com\n\nbody\n"
    message = parse(raw)
    assert message.raw == b"Subject: x\rnot a field\n\nbody\n"


def test_raw_without_bcc_is_untouched() -> None:
    raw = b"From: a@example.org\nSubject: caf\xc3\xa9 \r\nX-A:\tb\r\n\r\n\xff\x00 body\r\n.\r\n"
    assert parse(raw).raw == raw
    assert parse(raw, received=RECEIVED).raw == RECEIVED + raw


# --- recipients --------------------------------------------------------------------------------


def test_envelope_decides_to_cc_bcc() -> None:
    raw = crlf(
        "From: a@example.org\n"
        'To: "Bob B." <BOB@Example.NET>, header-only@example.net\n'
        "Cc: =?utf-8?q?Ren=C3=A9e?= <renee@example.com>, bob@example.net\n"
        "Subject: s\n\nbody\n"
    )
    message = parse(
        raw, "secret@example.com", "Renee@example.COM", "bob@example.NET", "bob@EXAMPLE.net"
    )
    # envelope order, envelope spelling, first spelling of a duplicate, names from the header
    assert [(a.email, a.name) for a in message.to] == [("bob@example.NET", "Bob B.")]
    assert [(a.email, a.name) for a in message.cc] == [("Renee@example.COM", "Renée")]
    assert [(a.email, a.name) for a in message.bcc] == [("secret@example.com", "")]
    assert "header-only@example.net" not in [a.lower() for a in message.recipients]


def test_header_only_addresses_are_never_recipients() -> None:
    raw = crlf("To: x@example.com, y@example.com\nCc: z@example.com\n\nhi\n")
    message = parse(raw, "only@example.org")
    assert message.to == ()
    assert message.cc == ()
    assert [a.email for a in message.bcc] == ["only@example.org"]


def test_group_syntax_and_undisclosed_recipients() -> None:
    raw = crlf("To: team: a@example.com, b@example.com;, undisclosed-recipients:;\n\nhi\n")
    message = parse(raw, "b@example.com", "c@example.com")
    assert [a.email for a in message.to] == ["b@example.com"]
    assert [a.email for a in message.bcc] == ["c@example.com"]


def test_reply_to() -> None:
    raw = crlf("Reply-To: Help <help@example.com>, bad@@x, other@example.com\n\nhi\n")
    assert [(a.email, a.name) for a in parse(raw).reply_to] == [
        ("help@example.com", "Help"),
        ("other@example.com", ""),
    ]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("From: a@x@y\n", None),
        ("From: Joe <a@x@y>\n", None),
        ("From: A <a@example.com> <b@example.com>\n", None),
        ("From: first@example.com\nFrom: second@example.com\n", "first@example.com"),
        ("From: one@example.com, two@example.com\n", "one@example.com"),
        ("From: bad@@x, two@example.com\n", None),
        ("From: \n", None),
        ("", None),
        ("From: (Comment) u@example.com (Name)\n", "u@example.com"),
    ],
)
def test_ambiguous_from_policy(headers: str, expected: str | None) -> None:
    message = parse(crlf(headers + "Subject: s\n\nbody\n"))
    assert (message.from_.email if message.from_ else None) == expected


# --- decoding ----------------------------------------------------------------------------------


def test_encoded_crlf_cannot_create_header_lines() -> None:
    raw = crlf(
        "From: =?utf-8?q?Eve=0D=0ABcc=3A_x=40evil.example?= <eve@example.com>\n"
        "To: bob@example.net\n"
        "Subject: =?utf-8?q?Hello=0D=0ABcc:_victim@example.com=0A=0D=00?=\n"
        "X-Note: =?utf-8?b?bGluZTEKbGluZTI=?=\n"
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nhi\n"
        "--b\nContent-Type: application/octet-stream;"
        ' name="=?utf-8?q?a=0D=0Ab.txt?="\n\nx\n--b--\n'
    )
    message = parse(raw, "bob@example.net")
    assert message.subject == "Hello Bcc: victim@example.com"
    assert message.from_ is not None
    assert message.from_.name == "Eve Bcc: x@evil.example"
    assert message.header("X-Note") == "line1 line2"
    assert message.attachments[0].filename == "a b.txt"
    assert [a.email for a in message.to] == ["bob@example.net"]
    body = message.as_json()
    lines = [body["subject"], body["from"]["name"], *body["headers"].values()]
    for text in lines + [a["filename"] for a in body["attachments"]]:
        assert "\r" not in text
        assert "\n" not in text


def test_unknown_charsets_fall_back() -> None:
    raw = (
        b"Subject: =?x-bogus?q?caf=C3=A9?= =?idna?q?b=E9?=\r\n"
        b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\nna\xc3\xafve\r\n"
        b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>latin \xe9</p>\r\n--b--\r\n"
    )
    message = parse(raw)
    assert message.subject == "cafébé"  # unknown: UTF-8, then latin-1
    assert message.text == "naïve"
    assert message.html == "<p>latin \ufffd</p>"  # declared UTF-8, broken: replacement


def test_body_charsets() -> None:
    raw = crlf("Content-Type: text/plain; charset=iso-2022-jp\n\n").replace(
        b"\r\n\r\n", b"\r\n\r\n" + "日本語".encode("iso-2022-jp")
    )
    assert parse(raw).text == "日本語"
    raw = b"Content-Type: text/plain; charset*=utf-8''%27iso-8859-15%27\r\n\r\n\xa4"
    assert parse(raw).text == "€"  # RFC 2231-encoded charset parameter


def test_text_and_html_found_in_nested_multiparts() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=m\n\n"
        "--m\nContent-Type: multipart/related; boundary=r\n\n"
        "--r\nContent-Type: multipart/alternative; boundary=a\n\n"
        "--a\nContent-Type: text/plain; charset=utf-8\n\nplain\n"
        "--a\nContent-Type: text/html; charset=utf-8\n\n<b>html</b>\n--a--\n"
        "--r\nContent-Type: image/png\nContent-ID: <logo@x>\n"
        "Content-Transfer-Encoding: base64\n\niVBORw0KGgo=\n--r--\n"
        "--m\nContent-Type: text/plain\nContent-Disposition: attachment; filename=notes.txt\n\n"
        "notes\n"
        "--m\nContent-Type: text/html\n\n<p>second html</p>\n--m--\n"
    )
    message = parse(raw)
    assert message.text == "plain"
    assert message.html == "<b>html</b>"
    assert [(a.filename, a.disposition, a.content_id) for a in message.attachments] == [
        ("attachment-1.png", "inline", "logo@x"),
        ("notes.txt", "attachment", None),
        ("attachment-3.html", "attachment", None),
    ]
    assert message.attachments[0].content == b"\x89PNG\r\n\x1a\n"
    assert message.attachments[1].content == b"notes"


def test_inline_image_with_content_id_is_byte_exact() -> None:
    image = bytes(range(256)) * 5
    raw = crlf(
        "Content-Type: multipart/related; boundary=r\n\n"
        '--r\nContent-Type: text/html\n\n<img src="cid:img1@example">\n'
        "--r\nContent-Type: image/jpeg\nContent-Transfer-Encoding: base64\n"
        "Content-Disposition: inline; filename=photo.jpg\nContent-ID:  <img1@example> \n\n"
        + base64.encodebytes(image).decode("ascii")
        + "--r\nContent-Type: image/gif\nContent-Disposition: inline; filename=nocid.gif\n"
        "Content-Transfer-Encoding: base64\n\nR0lGODlh\n--r--\n"
    )
    message = parse(raw)
    photo, nocid = message.attachments
    assert (photo.filename, photo.content_type, photo.disposition) == (
        "photo.jpg",
        "image/jpeg",
        "inline",
    )
    assert photo.content_id == "img1@example"
    assert photo.content == image
    # "inline" without a Content-ID has nothing to be referenced by: a plain attachment
    assert (nocid.disposition, nocid.content_id, nocid.content) == ("attachment", None, b"GIF89a")


def test_nested_rfc822_becomes_one_attachment() -> None:
    inner = crlf(
        "From: inner@example.com\nSubject: Inner =?utf-8?q?s=C3=BCbject?=\n"
        "Content-Type: multipart/mixed; boundary=i\n\n"
        "--i\nContent-Type: text/plain\n\ninner text\n"
        "--i\nContent-Type: application/pdf; name=x.pdf\n\n%PDF\n--i--\n"
    )
    raw = (
        crlf("Subject: outer\nContent-Type: multipart/mixed; boundary=o\n\n--o\n\nouter text\n")
        + crlf("--o\nContent-Type: message/rfc822\n\n")
        + inner
        + crlf("--o\nContent-Type: message/rfc822\n\nFrom: x@example.com\n\nno subject\n--o--\n")
    )
    message = parse(raw)
    assert message.text == "outer text"
    first, second = message.attachments
    assert first.filename == "Inner sübject.eml"
    assert first.content_type == "message/rfc822"
    assert first.content == inner
    assert second.filename == "message-2.eml"
    assert second.content == crlf("From: x@example.com\n\nno subject")


def test_attachment_filenames_are_sanitised() -> None:
    names = [
        ('="../../etc/passwd"', "passwd"),
        ('="C:\\\\Windows\\\\evil.exe"', "evil.exe"),
        ('="..hidden"', "hidden"),
        ('="a\tb\x7fc.txt"', "a bc.txt"),
        ('="photo\u202egpj.exe"', "photogpj.exe"),
        ("*=utf-8''%E2%82%AC%20rate.pdf", "€ rate.pdf"),
        ('="=?utf-8?b?w6lwaS5wZGY=?="', "épi.pdf"),
        ('="..."', "attachment-8.bin"),
        ('=""', "attachment-9.bin"),
        ('="' + "x" * 300 + '.pdf"', "x" * 196 + ".pdf"),
    ]
    parts = "".join(
        f"--b\nContent-Type: application/octet-stream\n"
        f"Content-Disposition: attachment; filename{value}\n\nx\n"
        for value, _expected in names
    )
    raw = crlf("Content-Type: multipart/mixed; boundary=b\n\n" + parts + "--b--\n")
    got = [a.filename for a in parse(raw).attachments]
    assert got == [expected for _value, expected in names]


def test_missing_filename_gets_a_default() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\n\ntext\n"
        "--b\nContent-Type: application/pdf\n\n%PDF\n"
        "--b\nContent-Type: application/x-whatever\n\n??\n--b--\n"
    )
    assert [a.filename for a in parse(raw).attachments] == [
        "attachment-1.pdf",
        "attachment-2.bin",
    ]


def test_transfer_encodings() -> None:
    payload = bytes(range(256))
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\n\ntext\n"
        "--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(payload).decode("ascii")
        + "--b\nContent-Type: text/csv\nContent-Transfer-Encoding: quoted-printable\n\n"
        "a=3Db,=C3=A9=\n\n--b\nContent-Type: application/x-foo\n"
        "Content-Transfer-Encoding: x-gzip64\n\nH4sI\n--b--\n"
    )
    b64, qp, unknown = parse(raw).attachments
    assert b64.content == payload
    assert qp.content == "a=b,é".encode()
    assert unknown.content == b"H4sI"  # unknown encoding: left as is


def test_custom_headers_kept() -> None:
    raw = crlf(
        "Message-ID: <id@example.com>\nReferences: <a@x>\n <b@x>\n"
        "List-Unsubscribe: <mailto:u@x>\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        "Auto-Submitted: auto-generated\nPrecedence: bulk\nList-Id: <l.x>\nIn-Reply-To: <p@x>\n"
        "X-Mailer: =?utf-8?q?M=C3=BCller?=\nX-Entity-Ref-ID: 42\n"
        "Received: from a\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nContent-Type: text/plain\n"
        "X-PM-Tag: welcome\nX-Smtp2api-Tags: a\n\nbody\n"
    )
    assert parse(raw).headers == (
        ("Message-ID", "<id@example.com>"),
        ("References", "<a@x> <b@x>"),
        ("List-Unsubscribe", "<mailto:u@x>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("Auto-Submitted", "auto-generated"),
        ("Precedence", "bulk"),
        ("List-Id", "<l.x>"),
        ("In-Reply-To", "<p@x>"),
        ("X-Mailer", "Müller"),
        ("X-Entity-Ref-ID", "42"),
    )


def test_empty_and_headerless_messages() -> None:
    message = parse(b"", "a@example.com")
    assert (message.from_, message.subject, message.text, message.attachments) == (
        None,
        "",
        "",
        (),
    )
    assert [a.email for a in message.bcc] == ["a@example.com"]
    assert parse(b"\r\njust a body\r\n").text == "just a body\r\n"


# --- limits ------------------------------------------------------------------------------------


def nested_multiparts(depth: int) -> bytes:
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    return opening + b"\r\nx\r\n"


@pytest.mark.timeout(10)
def test_depth_limit() -> None:
    assert parse(nested_multiparts(20)).text == "x"
    with pytest.raises(MessageError, match="nesting deeper than 20"):
        parse(nested_multiparts(21))
    assert parse(nested_multiparts(21), limits=MimeLimits(max_depth=25)).text == "x"
    for raw in (nested_multiparts(50_000), b"Content-Type: message/rfc822\r\n\r\n" * 50_000):
        with pytest.raises(MessageError, match="nesting"):  # never a RecursionError
            parse(raw)


def many_parts(count: int) -> bytes:
    return b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + (
        b"--b\r\n\r\nx\r\n" * count + b"--b--\r\n"
    )


@pytest.mark.timeout(10)
def test_part_count_limit() -> None:
    assert len(parse(many_parts(499)).attachments) == 498  # + root = 500 parts
    with pytest.raises(MessageError, match="more than 500 MIME parts"):
        parse(many_parts(500))
    with pytest.raises(MessageError, match="more than 10 MIME parts"):
        parse(many_parts(10), limits=MimeLimits(max_parts=10))
    with pytest.raises(MessageError, match="MIME parts"):
        parse(many_parts(200_000))


@pytest.mark.timeout(10)
def test_header_limits() -> None:
    parse(b"X-A: b\r\n" * 1000 + b"\r\nbody")
    with pytest.raises(MessageError, match="more than 1000 header fields"):
        parse(b"X-A: b\r\n" * 1001 + b"\r\nbody")
    part = b"--b\r\n" + b"X-A: b\r\n" * 400 + b"\r\nx\r\n"
    with pytest.raises(MessageError, match="header fields"):  # parts count too
        parse(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + part * 3)
    with pytest.raises(MessageError, match="larger than 1000 bytes"):
        parse(
            b"Subject: " + b"x" * 2000 + b"\r\n\r\nbody", limits=MimeLimits(max_header_bytes=1000)
        )
    with pytest.raises(MessageError, match="header section larger"):
        parse(b"No-Blank-Line: " + b"x\r\n " * 600_000)


@pytest.mark.timeout(10)
def test_pathological_headers_stay_fast() -> None:
    started = time.perf_counter()
    # email.message._parseparam is quadratic; 60 parts with 16 KiB of parameters each
    huge = b"Content-Type: multipart/mixed; boundary=b" + b';a="' * 5000 + b"\r\n"
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + (b"--b\r\n" + huge + b"\r\n") * 60
    with pytest.raises(MessageError):
        parse(raw)
    parse(b"Subject: " + b"=?a?q?" * 100_000 + b"\r\n\r\nx")  # RFC 2047 regex stays linear
    parse(b"To: " + b"(" * 300_000 + b"\r\n\r\nx")  # nested comments are counted, not recursed
    parse(b"Content-Type: text/plain; name*" + b"9" * 5000 + b"=x\r\n\r\nx")  # int() limit
    assert time.perf_counter() - started < 5


# --- controls ----------------------------------------------------------------------------------

CONTROLLED = crlf(
    "From: a@example.org\n"
    "To: b@example.net\n"
    "X-Smtp2api-Template: welcome-v2\n"
    'X-Smtp2api-Variables: {"name": "Bob", "items": [1, 2]}\n'
    "X-Smtp2api-Tags: onboarding, welcome ,onboarding\n"
    "X-SES-CONFIGURATION-SET: tracking\n"
    "X-SES-MESSAGE-TAGS: campaign=spring, cohort=b\n"
    "X-PM-Tag: pm-tag\n"
    "X-PM-Metadata-Order-Id: 1234\n"
    "X-PM-Message-Stream: outbound\n"
    "X-Mailgun-Tag: mg-1\n"
    "X-Mailgun-Tag: mg-2\n"
    'X-Mailgun-Variables: {"user_id": 7, "plan": "pro"}\n'
    'X-SMTPAPI: {"category": ["sg-a", "sg-b"], "unique_args": {"ref": "r-9"},\n'
    '  "to": ["injected@example.com"]}\n'
    "X-Custom: kept\n"
    "Subject: controlled\n\nbody\n"
)


def test_every_control_convention_is_translated() -> None:
    message, controls = parse_with_controls(
        CONTROLLED, Envelope("a@example.org", ("b@example.net",)), "msg-1"
    )
    check_invariants(message, Envelope("a@example.org", ("b@example.net",)))
    assert message.tags == ("onboarding", "welcome", "pm-tag", "mg-1", "mg-2", "sg-a", "sg-b")
    assert message.metadata == {
        "campaign": "spring",
        "cohort": "b",
        "Order-Id": "1234",
        "user_id": "7",
        "plan": "pro",
        "ref": "r-9",
    }
    assert message.template == "welcome-v2"
    assert message.template_variables == {"name": "Bob", "items": [1, 2]}
    assert controls.stream == "outbound"
    assert controls.configuration_set == "tracking"
    assert message.recipients == ("b@example.net",)  # X-SMTPAPI "to" is ignored
    assert message.as_json()["template"] == {
        "id": "welcome-v2",
        "variables": {"name": "Bob", "items": [1, 2]},
    }


def test_control_headers_are_stripped_from_raw_and_headers() -> None:
    message = parse(CONTROLLED, "b@example.net")
    assert message.headers == (("X-Custom", "kept"),)
    assert message.raw == crlf(
        "From: a@example.org\nTo: b@example.net\nX-Custom: kept\nSubject: controlled\n\nbody\n"
    )
    for name in CONTROL_HEADERS:
        assert name.encode() not in message.raw.lower()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("X-Smtp2api-Variables: {not json", "X-Smtp2api-Variables is not valid JSON"),
        ("X-Smtp2api-Variables: [1, 2]", "X-Smtp2api-Variables is not a JSON object"),
        ("X-Mailgun-Variables: nope", "X-Mailgun-Variables is not valid JSON"),
        ("X-SMTPAPI: {", "X-SMTPAPI is not valid JSON"),
        ("X-SMTPAPI: " + "[" * 100_000, "X-SMTPAPI is not valid JSON"),
    ],
)
def test_invalid_control_json_is_rejected(header: str, reason: str) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)) as caught:
        parse(crlf(header + "\n\nbody\n"))
    assert caught.value.reply.code == 554
    assert caught.value.reply.enhanced == "5.6.0"
    assert reason in caught.value.reply.text


def test_extract_controls_directly() -> None:
    assert extract_controls([]) == Controls()
    controls = extract_controls(
        [
            ("x-smtp2api-template", ""),
            ("X-Smtp2api-Template", "first"),
            ("X-SMTP2API-TEMPLATE", "second"),
            ("X-Smtp2api-Variables", '=?utf-8?q?{"n":_"Ren=C3=A9"}?='),  # RFC 2047-encoded
            ("X-SMTPAPI", '{"category": "single", "unique_args": "not-a-dict"}'),
            ("X-PM-Metadata-", "no key: stripped, but no metadata"),
            ("X-Smtp2api-Tags", "=?utf-8?q?caf=C3=A9?=, ,"),
            ("Subject", "not a control"),
        ]
    )
    assert controls.template == "first"
    assert controls.template_variables == {"n": "René"}
    assert controls.tags == ("single", "café")
    assert controls.metadata == {}


def test_is_control_header() -> None:
    assert is_control_header("X-PM-Metadata-foo-")
    assert is_control_header("X-PM-Metadata-")
    assert is_control_header(" x-smtpapi ")
    assert not is_control_header("X-PM-Metadat")
    assert not is_control_header("X-Mailer")
