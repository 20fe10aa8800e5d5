"""The ``graph`` provider: Microsoft Graph ``sendMail`` with the original MIME (design §2, §5).

Small messages: ``POST /users/{id}/sendMail``, body the base64 of the MIME as ``text/plain``.
Messages over Graph's 4 MB request limit, or sent with ``save_to_sent_items = false``, go
through a draft: ``POST /users/{id}/messages`` (MIME, its largest attachments cut out), each
cut attachment added back (a JSON POST under 3 MB, an upload session above), then
``POST /messages/{id}/send``. ``docs/providers/graph.md`` explains the choices.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from pydantic import TypeAdapter, ValidationError

from smtp2api import config
from smtp2api.errors import (
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
)
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.providers.base import parse_json
from smtp2api.providers.graph_auth import TokenSource
from smtp2api.providers.graph_errors import R552_TOO_LARGE, map_graph_error
from smtp2api.providers.graph_mime import (
    Detached,
    address_to_envelope,
    b64_size,
    detach_large_parts,
)
from smtp2api.providers.request import MAX_ERROR_BODY, ApiAnswer, bounded_request

log = structlog.get_logger("smtp2api.providers.graph")

# Graph refuses request bodies over 4 MB (413); observed: a 3,145,611-byte attachment still
# posts as JSON (base64 4,194,148 bytes), so the cap is 4 MiB. A MIME body keeps 64 KiB spare.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_MIME_B64 = MAX_REQUEST_BYTES - 64 * 1024
# "If the file size is under 3 MB, do a single POST ... between 3 MB and 150 MB, create an
# upload session" (Graph, outlook-large-attachments); an upload session for less fails with
# ErrorAttachmentSizeShouldNotBeLessThanMinimumSize. 3,000,000 bytes as JSON stays < 4 MiB.
UPLOAD_SESSION_MIN = 3_000_000
# Each PUT of an upload session carries at most 4 MB; slices in multiples of 320 KiB, as
# Graph's own large-file upload tasks use.
UPLOAD_CHUNK = 10 * 320 * 1024
MAX_MESSAGE_SIZE = 150 * 1024 * 1024  # Graph's attachment cap; Exchange's default is 35 MB
MAX_RECIPIENTS = 500  # Exchange Online's default recipients per message
_DRAFT_BODY_LIMIT = 16 * 1024 * 1024  # the created draft echoes the message: read its id only
# PR_DELETE_AFTER_SUBMIT (MS-OXOMSG §2.2.3.22): what saveToSentItems=false does in Exchange,
# for sends through a draft, whose /send takes no saveToSentItems.
_DELETE_AFTER_SUBMIT = {
    "singleValueExtendedProperties": [{"id": "Boolean 0x0E01", "value": "true"}]
}

_UPLOAD_URL: TypeAdapter[str] = TypeAdapter(config.UpstreamURL)


class GraphApiProvider:
    """Sends as ``user_id`` (else the envelope sender) through Microsoft Graph."""

    raw_mime = True
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(
        self, name: str, settings: config.GraphProvider, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self._client = client
        self.tokens = TokenSource(name, settings)
        self._users = f"{settings.base_url or settings.graph_url}/v1.0/users"
        self._user_id = settings.user_id
        self._save_to_sent = settings.save_to_sent_items
        self._timeout = settings.timeout
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"GraphApiProvider(name={self.name!r}, users={self._users!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        mailbox = self._user_id or envelope.mail_from
        if not mailbox:
            raise ProviderConfigError(
                "no mailbox to send as: set user_id (the envelope sender is empty)"
            )
        mime = address_to_envelope(message.raw, envelope.rcpt_tos)
        base = f"{self._users}/{quote(mailbox, safe='@')}"
        if self._save_to_sent and b64_size(len(mime)) <= MAX_MIME_B64:
            try:
                await self._call("POST", f"{base}/sendMail", mailbox, mime=mime)
            except ProviderRejected as exc:
                if exc.status != 413:
                    raise
                # Graph's limit turned out lower than ours: through a draft, cut smaller.
                await self._send_draft(base, mailbox, mime, MAX_MIME_B64 // 2)
        else:
            await self._send_draft(base, mailbox, mime, MAX_MIME_B64)
        # 202 Accepted carries no id (Graph queues the message): the gateway's id stands in.
        return SendResult(provider=self.name, provider_id=message.id)

    async def aclose(self) -> None:
        if self._cleanups:  # draft deletions under way: bounded by the timeout of each call
            await asyncio.wait(self._cleanups, timeout=self._timeout)
        self.tokens.close()

    # --- the draft path ----------------------------------------------------------------------

    async def _send_draft(self, base: str, mailbox: str, mime: bytes, budget: int) -> None:
        detached: list[Detached] = []
        if b64_size(len(mime)) > budget:
            split = detach_large_parts(mime, budget)
            if split is None:
                raise ProviderRejected(
                    "message body alone exceeds Graph's request limit", reply=R552_TOO_LARGE
                )
            mime, detached = split
        created = await self._call(
            "POST", f"{base}/messages", mailbox, mime=mime, limit=_DRAFT_BODY_LIMIT
        )
        data = parse_json(created.body)
        draft_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(draft_id, str) or not draft_id:
            raise ProviderUnavailable("draft created without an id")
        draft = f"{base}/messages/{quote(draft_id, safe='=')}"
        try:
            if not self._save_to_sent:
                await self._call("PATCH", draft, mailbox, payload=_DELETE_AFTER_SUBMIT)
            for attachment in detached:
                await self._attach(draft, mailbox, attachment)
        except DeliveryError:
            await self._discard(draft, mailbox)
            raise
        except asyncio.CancelledError:
            # The caller's deadline (sync_timeout) or shutdown: delete the unsent draft in the
            # background, since this task may not await any more.
            task = asyncio.create_task(self._discard(draft, mailbox))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            raise
        try:
            await self._call("POST", f"{draft}/send", mailbox, content=b"")
        except OutcomeUnknown:
            raise  # /send may have gone through: the draft may be the sent message by now
        except DeliveryError:
            await self._discard(draft, mailbox)
            raise
        log.info("graph_draft_sent", provider=self.name, attachments=len(detached))

    async def _attach(self, draft: str, mailbox: str, item: Detached) -> None:
        meta: dict[str, Any] = {"name": item.name, "contentType": item.content_type}
        meta["isInline"] = item.inline
        if item.content_id:
            meta["contentId"] = item.content_id
        if len(item.content) < UPLOAD_SESSION_MIN:
            payload = {
                "@odata.type": "#microsoft.graph.fileAttachment",
                **meta,
                "contentBytes": base64.b64encode(item.content).decode("ascii"),
            }
            await self._call("POST", f"{draft}/attachments", mailbox, payload=payload)
            return
        session = {"AttachmentItem": {"attachmentType": "file", **meta, "size": len(item.content)}}
        created = await self._call(
            "POST", f"{draft}/attachments/createUploadSession", mailbox, payload=session
        )
        data = parse_json(created.body)
        url = data.get("uploadUrl") if isinstance(data, dict) else None
        if not isinstance(url, str):
            raise ProviderUnavailable("upload session without an uploadUrl")
        try:
            url = _UPLOAD_URL.validate_python(url)  # design §8, for a URL the API chose
        except ValidationError:
            raise ProviderConfigError(
                "upload URL refused: not https, or a forbidden host"
            ) from None
        await self._upload(url, item.content, mailbox)

    async def _upload(self, url: str, content: bytes, mailbox: str) -> None:
        total = len(content)
        for start in range(0, total, UPLOAD_CHUNK):
            chunk = content[start : start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            # No Authorization header: the upload URL carries its own token, and Graph refuses
            # a request that has both.
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {start}-{end}/{total}",  # RFC 9110 §14.4
            }
            answer = await self._request("PUT", url, headers, chunk)
            if not answer.ok:
                raise map_graph_error(
                    answer.status, answer.headers, answer.body, provider=self.name, mailbox=mailbox
                )

    async def _discard(self, draft: str, mailbox: str) -> None:
        """Best effort: delete a draft that will not be sent, so Drafts does not fill up."""
        try:
            await self._call("DELETE", draft, mailbox)
        except DeliveryError as exc:
            log.warning("graph_draft_left", provider=self.name, detail=exc.detail)
        except RuntimeError:  # the shared client closed under a background deletion
            log.warning("graph_draft_left", provider=self.name, detail="client closed")

    # --- HTTP --------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        url: str,
        mailbox: str,
        *,
        mime: bytes | None = None,
        payload: Any = None,
        content: bytes | None = None,
        limit: int = MAX_ERROR_BODY,
    ) -> ApiAnswer:
        """One authorised Graph call; a 401 refreshes the token and retries once (design §4)."""
        headers: dict[str, str] = {}
        if mime is not None:
            content = base64.b64encode(mime)
            headers["Content-Type"] = "text/plain"
        elif payload is not None:
            content = json.dumps(payload, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            token = await self.tokens.get()
            headers["Authorization"] = f"Bearer {token}"
            answer = await self._request(method, url, headers, content, limit)
            if answer.status == 401 and attempt == 1:
                # An expired or revoked token: nothing was done, so the retry is safe.
                await self.tokens.invalidate(token)
                continue
            if answer.ok:
                return answer
            raise map_graph_error(
                answer.status, answer.headers, answer.body, provider=self.name, mailbox=mailbox
            )
        raise PayloadBug("unreachable")  # pragma: no cover - the loop returns or raises

    async def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | None,
        limit: int = MAX_ERROR_BODY,
    ) -> ApiAnswer:
        """One bounded request (``request.bounded_request``), at most ``limit`` bytes of body."""
        stream: AsyncIterator[bytes] | None = None
        if content is not None:
            # Bodies of up to 4 MiB go out in slices, with their length declared (no chunked
            # encoding): a transport then never holds the loop for one large write.
            stream = _slices(content)
            headers = {**headers, "Content-Length": str(len(content))}
        return await bounded_request(
            self._client,
            method,
            url,
            budget=self._timeout,
            limit=limit,
            content=stream,
            headers=headers,
        )


async def _slices(content: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    view = memoryview(content)
    for start in range(0, len(content), size):
        yield bytes(view[start : start + size])
