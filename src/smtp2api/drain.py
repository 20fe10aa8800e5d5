"""Graceful stop of the SMTP sessions (design §3, "Shutdown"): idle sessions are closed with
``421 4.3.2`` at once; sessions inside a transaction get a grace period to finish.

A transaction starts at MAIL and ends with the reply to DATA (or RSET): closing a session
between transactions loses nothing, since the client has either had its reply or not yet
handed anything over (RFC 5321 §3.8: a server may send 421 at any time and close).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import cast

from smtp2api.replies import R421_SHUTTING_DOWN
from smtp2api.smtp import GatewaySMTP, Handler


def in_transaction(session: GatewaySMTP) -> bool:
    """MAIL was given and the transaction is not over (aiosmtpd resets the envelope after
    each DATA and on RSET)."""
    envelope = session.envelope
    return envelope is not None and envelope.mail_from is not None


def close_session(session: GatewaySMTP) -> None:
    """Say ``421 4.3.2`` and close, unless the connection is closing already."""
    # Duck-typed: uvloop's transports are not asyncio.WriteTransport subclasses.
    transport = cast(asyncio.WriteTransport | None, session.transport)
    if transport is not None and not transport.is_closing():
        transport.write(f"{R421_SHUTTING_DOWN}\r\n".encode())
        transport.close()


async def drain(
    handlers: Callable[[], Iterable[Handler]], activity: asyncio.Event, grace: float
) -> None:
    """Close idle sessions; give busy ones (in a transaction, or in DATA) up to ``grace``
    seconds, closing each as it goes idle. ``activity`` must be set on every reply sent and
    every disconnect: each one is a moment a busy session may have become idle."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        activity.clear()
        busy = 0
        for handler in handlers():
            for session in list(handler.active):
                if session in handler.in_data or in_transaction(session):
                    busy += 1
                else:
                    close_session(session)
        if not busy or loop.time() >= deadline:
            break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await activity.wait()
    for handler in handlers():
        for session in list(handler.active):
            close_session(session)
