"""The benchmark's messages: a 2 KB text message, a realistic 10 KB multipart one (text, HTML
and a small PDF generated here), and a large one with a single attachment.

Every message is returned as wire-ready bytes: CRLF line endings, lines of at most 78
characters (RFC 5322 §2.1.1), no line starting with "." (so no dot-stuffing is needed).
"""

from __future__ import annotations

import base64
import textwrap

FROM = "bench@example.com"
TO = "rcpt@example.net"

_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat"
)
_WORDS = _TEXT.split(" ")


def _prose(size: int, seed: int = 0) -> str:
    """Wrapped pseudo-text of about ``size`` characters (deterministic)."""
    words: list[str] = []
    total = 0
    i = seed
    while total < size:
        word = _WORDS[(i * 7 + i // 3) % len(_WORDS)]
        words.append(word)
        total += len(word) + 1
        i += 1
    return "\n".join(textwrap.wrap(" ".join(words), 72))


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def _headers(subject: str, extra: str = "") -> str:
    return (
        f'From: "Bench Sender" <{FROM}>\n'
        f"To: <{TO}>\n"
        f"Subject: {subject}\n"
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\n"
        "Message-ID: <bench-0001@example.com>\n"
        "MIME-Version: 1.0\n"
        f"{extra}"
    )


def text_message(size: int = 2048) -> bytes:
    """A plain-text message of ``size`` bytes in total (headers included), give or take 80."""
    head = _headers("Benchmark text message", "Content-Type: text/plain; charset=utf-8\n")
    body = _prose(max(0, size - len(head) - 40))
    return _crlf(f"{head}\n{body}\n")


def pdf_document(pages: int = 1) -> bytes:
    """A small, valid PDF (one text page per ``pages``), built by hand: no library needed."""
    objects: list[bytes] = []
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for page in range(pages):
        lines = _prose(1500, seed=page).splitlines()
        text = "BT /F1 10 Tf 50 780 Td 12 TL " + " ".join(
            "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '"
            for line in lines
        )
        # Stored uncompressed on purpose: an invoice PDF of a few KB, like real mail carries.
        stream = (text + " ET").encode()
        content_ref = 5 + 2 * page
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources "
            f"<< /Font << /F1 3 0 R >> >> /Contents {content_ref} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _b64_lines(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def multipart_message() -> bytes:
    """About 10 KB: multipart/mixed of (multipart/alternative of text + HTML) and a PDF."""
    text = _prose(1800, seed=3)
    paragraphs = "".join(f"<p>{p}</p>\n" for p in _prose(2200, seed=5).split("\n"))
    html = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Invoice</title></head>\n'
        '<body style="font-family: Arial, sans-serif">\n<h1>Your invoice</h1>\n'
        f"{paragraphs}"
        '<table border="1"><tr><td>Item</td><td>Price</td></tr>'
        "<tr><td>Widget</td><td>9.99</td></tr></table>\n</body></html>"
    )
    pdf = pdf_document(pages=2)
    head = _headers(
        "=?utf-8?q?Your_invoice_=E2=80=94_order_1234?=",
        'Content-Type: multipart/mixed; boundary="mixed-b1"\n',
    )
    body = (
        "This is a multi-part message in MIME format.\n\n"
        "--mixed-b1\n"
        'Content-Type: multipart/alternative; boundary="alt-b2"\n\n'
        "--alt-b2\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 7bit\n\n"
        f"{text}\n\n"
        "--alt-b2\n"
        "Content-Type: text/html; charset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        f"{_qp(html)}\n\n"
        "--alt-b2--\n\n"
        "--mixed-b1\n"
        'Content-Type: application/pdf; name="invoice-1234.pdf"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="invoice-1234.pdf"\n\n'
        f"{_b64_lines(pdf)}\n\n"
        "--mixed-b1--\n"
    )
    return _crlf(f"{head}\n{body}")


def _qp(text: str) -> str:
    """Quoted-printable with soft line breaks at 76 (RFC 2045 §6.7), enough for ASCII HTML."""
    out: list[str] = []
    for source in text.split("\n"):
        line = source.replace("=", "=3D")
        while len(line) > 75:
            cut = 75
            while line[cut - 2 : cut].find("=") >= 0 and cut > 70:
                cut -= 1  # never split an =XX escape
            out.append(line[:cut] + "=")
            line = line[cut:]
        out.append(line)
    return "\n".join(out)


def large_message(size: int) -> bytes:
    """About ``size`` bytes: a short text part and one base64 attachment filling the rest."""
    head = _headers("Benchmark large message", 'Content-Type: multipart/mixed; boundary="big-b1"\n')
    # base64 with CRLF every 76 characters: 78 bytes on the wire per 57 bytes of payload.
    payload = max(0, (size - 600) * 57 // 78)
    chunk = bytes((i * 131 + 7) % 251 for i in range(4096))  # deterministic filler
    data = (chunk * (payload // len(chunk) + 1))[:payload]
    body = (
        "--big-b1\nContent-Type: text/plain; charset=utf-8\n\nA large attachment follows.\n\n"
        "--big-b1\n"
        'Content-Type: application/octet-stream; name="data.bin"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="data.bin"\n\n'
    )
    return _crlf(f"{head}\n{body}") + _crlf(_b64_lines(data)) + b"\r\n--big-b1--\r\n"


def by_name(name: str, size: int = 25_000_000) -> bytes:
    if name == "text2k":
        return text_message(2048)
    if name == "multipart10k":
        return multipart_message()
    if name == "large":
        return large_message(size)
    raise ValueError(f"unknown message {name!r} (text2k | multipart10k | large)")
