"""A fake Microsoft Graph mail API on 127.0.0.1: what the ``graph`` provider calls, checked
the way Graph checks it.

* Bearer tokens are checked against a ``FakeIdentity``: unknown, expired or revoked tokens get
  ``401 InvalidAuthenticationToken``.
* Request bodies over 4 MiB get 413. ``sendMail`` and draft creation take the MIME message as
  base64 ``text/plain`` (``400 ErrorMimeContentInvalidBase64String`` otherwise); recipients
  come from the To/Cc/Bcc header fields, as in Exchange, and Bcc is not shown to anyone.
* Drafts: create, PATCH (extended properties), attachments by JSON POST, upload sessions
  (``createUploadSession``, then PUTs whose ``Content-Range`` must continue where the last one
  stopped, at most 4 MiB each, non-final slices in multiples of 320 KiB, and no
  Authorization header), ``/send`` and DELETE.
* Mailbox checks: unknown mailboxes get ``404 ErrorInvalidUser``; mailboxes the app may not
  use (an application access policy) ``403 ErrorAccessDenied``, and so do drafts without the
  ``Mail.ReadWrite`` permission (``sendMail`` and ``/send`` need ``Mail.Send``).
* ``script(op, GraphAnswer(...))`` makes the next call of an operation answer an error.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import json
import re
import secrets
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from aiohttp import web

from tests.support.fake_identity import GRAPH_SCOPE, FakeIdentity

REQUEST_LIMIT = 4 * 1024 * 1024
UPLOAD_MIN = 3_000_000  # "between 3 MB and 150 MB, create an upload session"
UPLOAD_MAX = 150 * 1024 * 1024
SLICE = 320 * 1024
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


@dataclass(frozen=True)
class GraphAnswer:
    status: int
    code: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FileAttachment:
    name: str
    content_type: str
    content: bytes
    inline: bool
    content_id: str | None
    via: str  # "json" or "upload"


@dataclass
class Delivered:
    """A message Exchange would now deliver."""

    mailbox: str
    via: str  # "sendMail" or "draft"
    mime: bytes
    to: list[str]
    cc: list[str]
    bcc: list[str]
    attachments: list[FileAttachment]
    saved_to_sent: bool

    @property
    def recipients(self) -> list[str]:
        return self.to + self.cc + self.bcc

    @property
    def parsed(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.mime, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def visible(self) -> bytes:
        """The message as its recipients see it: no Bcc field."""
        msg = self.parsed
        del msg["Bcc"]
        return msg.as_bytes()


@dataclass
class _Draft:
    mailbox: str
    mime: bytes
    attachments: list[FileAttachment] = field(default_factory=list)
    delete_after_submit: bool = False


@dataclass
class _Session:
    draft_id: str
    item: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)


class GraphError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.answer = GraphAnswer(status, code, message, headers or {})


class FakeGraph:
    """``async with FakeGraph(identity) as graph:`` then ``graph.url`` as ``base_url``."""

    def __init__(
        self,
        identity: FakeIdentity,
        *,
        mailboxes: set[str] | None = None,
        app_mailboxes: set[str] | None = None,
        permissions: frozenset[str] = frozenset({"Mail.Send", "Mail.ReadWrite"}),
    ) -> None:
        self.identity = identity
        self.mailboxes = mailboxes
        self.app_mailboxes = app_mailboxes
        self.permissions = permissions  # the application permissions consented to
        self.delivered: list[Delivered] = []
        self.calls: list[tuple[str, str, int]] = []  # (operation, bearer token or "", status)
        self.drafts: dict[str, _Draft] = {}
        self.deleted: list[str] = []
        self.sessions: dict[str, _Session] = {}
        self._scripted: dict[str, deque[GraphAnswer]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, op: str, *answers: GraphAnswer) -> None:
        self._scripted[op].extend(answers)

    def ops(self, op: str) -> list[tuple[str, str, int]]:
        return [c for c in self.calls if c[0] == op]

    async def __aenter__(self) -> FakeGraph:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        users = "/v1.0/users/{user}"
        app.router.add_post(f"{users}/sendMail", self._wrap("sendMail", self._send_mail))
        app.router.add_post(f"{users}/messages", self._wrap("createMessage", self._create))
        app.router.add_patch(f"{users}/messages/{{mid}}", self._wrap("patchMessage", self._patch))
        app.router.add_delete(f"{users}/messages/{{mid}}", self._wrap("delete", self._delete))
        app.router.add_post(
            f"{users}/messages/{{mid}}/attachments", self._wrap("addAttachment", self._attach)
        )
        app.router.add_post(
            f"{users}/messages/{{mid}}/attachments/createUploadSession",
            self._wrap("createUploadSession", self._session),
        )
        app.router.add_post(f"{users}/messages/{{mid}}/send", self._wrap("send", self._send))
        app.router.add_put("/upload/{session}", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _error(answer: GraphAnswer) -> web.Response:
        request_id = str(uuid.uuid4())
        body = {
            "error": {
                "code": answer.code,
                "message": answer.message,
                "innerError": {
                    "date": "2024-01-01T00:00:00",
                    "request-id": request_id,
                    "client-request-id": request_id,
                },
            }
        }
        headers = {"request-id": request_id, **answer.headers}
        return web.json_response(body, status=answer.status, headers=headers)

    def _wrap(self, op: str, handler: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            try:
                body = await request.read()
                self._authorize(request, token, body)
                needed = "Mail.Send" if op in ("sendMail", "send") else "Mail.ReadWrite"
                if needed not in self.permissions:
                    raise GraphError(403, "ErrorAccessDenied", "Access is denied.")
                if self._scripted[op]:
                    raise GraphError(**vars(self._scripted[op].popleft()))
                response: web.StreamResponse = await handler(request, body)
            except GraphError as exc:
                response = self._error(exc.answer)
            self.calls.append((op, token, response.status))
            return response

        return handle

    def _authorize(self, request: web.Request, token: str, body: bytes) -> None:
        if not token or not self.identity.valid(token, GRAPH_SCOPE):
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        if len(body) > REQUEST_LIMIT:
            raise GraphError(413, "RequestEntityTooLarge", "The request body is too large.")
        user = request.match_info["user"].lower()
        if self.mailboxes is not None and user not in self.mailboxes:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if self.app_mailboxes is not None and user not in self.app_mailboxes:
            raise GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )

    @staticmethod
    def _mime(request: web.Request, body: bytes) -> bytes:
        if request.content_type != "text/plain":
            raise GraphError(400, "ErrorInvalidRequest", "Expected a MIME message as text/plain.")
        try:
            mime = base64.b64decode(_WHITESPACE.sub(b"", body), validate=True)
        except (binascii.Error, ValueError):
            mime = b""
        if not mime:
            raise GraphError(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        return mime

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from None
        if not isinstance(data, dict):
            raise GraphError(400, "BadRequest", "Expected a JSON object.")
        return data

    def _draft(self, request: web.Request) -> tuple[str, _Draft]:
        mid = request.match_info["mid"]
        draft = self.drafts.get(mid)
        if draft is None or draft.mailbox != request.match_info["user"].lower():
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return mid, draft

    def _deliver(
        self, mailbox: str, via: str, mime: bytes, attachments: list[FileAttachment], saved: bool
    ) -> None:
        msg = email.message_from_bytes(mime, policy=email.policy.default)
        lists = {}
        for name in ("to", "cc", "bcc"):
            lists[name] = [
                a.lower() for _, a in getaddresses([str(v) for v in msg.get_all(name, [])])
            ]
        everyone = lists["to"] + lists["cc"] + lists["bcc"]
        if not everyone or any("@" not in a for a in everyone):
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
        self.delivered.append(
            Delivered(
                mailbox, via, mime, lists["to"], lists["cc"], lists["bcc"], attachments, saved
            )
        )

    # --- operations -------------------------------------------------------------------------

    async def _send_mail(self, request: web.Request, body: bytes) -> web.Response:
        # The MIME form of sendMail has no saveToSentItems: a copy is always saved.
        self._deliver(
            request.match_info["user"].lower(), "sendMail", self._mime(request, body), [], True
        )
        return web.Response(status=202)

    async def _create(self, request: web.Request, body: bytes) -> web.Response:
        mime = self._mime(request, body)
        mid = "AAMkAD" + secrets.token_urlsafe(24) + "="
        self.drafts[mid] = _Draft(request.match_info["user"].lower(), mime)
        parsed = email.message_from_bytes(mime, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        text = parsed.get_body(("plain", "html"))
        content = text.get_content() if text is not None else ""
        return web.json_response(
            {
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('x')/messages/$entity",
                "@odata.etag": 'W/"CQAAABYAAAC"',
                "isDraft": True,
                "subject": str(parsed.get("subject", "")),
                "body": {"contentType": "text", "content": content},  # drafts echo the message
                "id": mid,
            },
            status=201,
        )

    async def _patch(self, request: web.Request, body: bytes) -> web.Response:
        mid, draft = self._draft(request)
        for prop in self._json(body).get("singleValueExtendedProperties", []):
            if prop == {"id": "Boolean 0x0E01", "value": "true"}:  # PR_DELETE_AFTER_SUBMIT
                draft.delete_after_submit = True
        return web.json_response({"id": mid})

    async def _delete(self, request: web.Request, body: bytes) -> web.Response:
        mid, _ = self._draft(request)
        del self.drafts[mid]
        self.deleted.append(mid)
        return web.Response(status=204)

    async def _attach(self, request: web.Request, body: bytes) -> web.Response:
        _, draft = self._draft(request)
        data = self._json(body)
        if data.get("@odata.type") != "#microsoft.graph.fileAttachment" or not data.get("name"):
            raise GraphError(
                400, "ErrorInvalidRequest", "A fileAttachment with a name is required."
            )
        try:
            content = base64.b64decode(str(data.get("contentBytes", "")), validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(400, "ErrorInvalidRequest", "contentBytes is not base64.") from None
        draft.attachments.append(
            FileAttachment(
                data["name"],
                data.get("contentType", ""),
                content,
                bool(data.get("isInline")),
                data.get("contentId"),
                "json",
            )
        )
        return web.json_response({"id": f"att-{len(draft.attachments)}"}, status=201)

    async def _session(self, request: web.Request, body: bytes) -> web.Response:
        mid, _ = self._draft(request)
        item = self._json(body).get("AttachmentItem")
        if (
            not isinstance(item, dict)
            or item.get("attachmentType") != "file"
            or not item.get("name")
        ):
            raise GraphError(
                400, "ErrorInvalidRequest", "AttachmentItem with attachmentType 'file' and a name."
            )
        size = item.get("size")
        if not isinstance(size, int) or size < UPLOAD_MIN:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size too small.",
            )
        if size > UPLOAD_MAX:
            raise GraphError(400, "ErrorAttachmentSizeExceeded", "The attachment is too large.")
        key = secrets.token_urlsafe(12)
        self.sessions[key] = _Session(mid, item)
        return web.json_response(
            {
                "uploadUrl": f"{self.url}/upload/{key}?authtoken={secrets.token_urlsafe(8)}",
                "expirationDateTime": "2099-01-01T00:00:00Z",
                "nextExpectedRanges": ["0-"],
            },
            status=201,
        )

    async def _upload(self, request: web.Request) -> web.Response:
        chunk = await request.read()
        try:
            response = self._take_slice(request, chunk)
        except GraphError as exc:
            response = self._error(exc.answer)
        self.calls.append(("upload", "", response.status))
        return response

    def _take_slice(self, request: web.Request, chunk: bytes) -> web.Response:
        session = self.sessions.get(request.match_info["session"])
        if session is None:
            raise GraphError(404, "ErrorItemNotFound", "Upload session not found.")
        if "Authorization" in request.headers:  # the URL carries its own token
            raise GraphError(
                401, "InvalidAuthenticationToken", "Do not send an Authorization header."
            )
        match = _RANGE.match(request.headers.get("Content-Range", ""))
        if match is None:
            raise GraphError(400, "InvalidContentRange", "Content-Range is required.")
        start, end, total = map(int, match.groups())
        done = len(session.data)
        final = end + 1 == total
        if (
            start != done
            or total != session.item["size"]
            or end < start
            or len(chunk) != end - start + 1
        ):
            raise GraphError(416, "InvalidRange", f"Expected bytes {done}-.")
        if len(chunk) > REQUEST_LIMIT or (not final and len(chunk) % SLICE):
            raise GraphError(
                400, "InvalidChunkSize", "Slices must be multiples of 320 KiB, at most 4 MiB."
            )
        session.data += chunk
        if not final:
            return web.json_response(
                {
                    "expirationDateTime": "2099-01-01T00:00:00Z",
                    "nextExpectedRanges": [f"{end + 1}-"],
                }
            )
        item = session.item
        draft = self.drafts[session.draft_id]
        draft.attachments.append(
            FileAttachment(
                item["name"],
                item.get("contentType", ""),
                bytes(session.data),
                bool(item.get("isInline")),
                item.get("contentId"),
                "upload",
            )
        )
        del self.sessions[request.match_info["session"]]
        location = f"{self.url}/v1.0/users('{draft.mailbox}')/messages('{session.draft_id}')"
        location += f"/attachments('att-{len(draft.attachments)}')"
        return web.Response(status=201, headers={"Location": location})

    async def _send(self, request: web.Request, body: bytes) -> web.Response:
        mid, draft = self._draft(request)
        self._deliver(
            draft.mailbox, "draft", draft.mime, draft.attachments, not draft.delete_after_submit
        )
        del self.drafts[mid]
        return web.Response(status=202)
