"""``smtp2api queue ...``: inspect and act on the spool, like Postfix's ``postqueue``.

Works while the daemon runs: the spool is opened by a second process and every change is one
committed transaction. ``retry`` makes an entry due now; the running worker notices within
its poll interval (a second). Text that came from a client (addresses, headers, replies) is
printed with control characters escaped, so a message cannot drive the operator's terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from smtp2api.config import Settings
from smtp2api.errors import GatewayError
from smtp2api.logs import escape_control
from smtp2api.spool import open_spool, sqlite_path
from smtp2api.spool.base import Spool, SpoolEntry, SpoolSummary

EX_OK = 0
EX_NOT_FOUND = 1


def add_queue_parser(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    queue = sub.add_parser(
        "queue",
        help="inspect and act on the spool (list, show, retry, delete, purge)",
        description="Inspect and act on the spool, like postqueue(1). Works on the spool "
        "named by the config (spool.url), also while the gateway runs.",
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "list",
        help="one line per spooled message",
        description="One line per spooled message: id, age, tries, next attempt, state, "
        "recipient count and sender, with the last reply on a second line.",
    )
    add_config(p)
    p.add_argument("--state", choices=["queued", "active", "dead"], help="only this state")
    p = actions.add_parser(
        "show",
        help="metadata, last error and headers of one message",
        description="Metadata, last error and headers of one message (--body: all of it). "
        "Exit 1 when there is no such message.",
    )
    add_config(p)
    p.add_argument("id", help="the message id (first column of `queue list`)")
    p.add_argument("--body", action="store_true", help="also print the whole message")
    p = actions.add_parser(
        "retry",
        help="make a message (or all) due now; dead ones are revived",
        description="Make one message (or --all) due now; dead messages are queued again. "
        "The running gateway's worker picks them up.",
    )
    add_config(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?", help="the message id (first column of `queue list`)")
    group.add_argument("--all", action="store_true", help="every queued and dead message")
    p = actions.add_parser(
        "delete",
        help="remove one message from the spool",
        description="Remove one message from the spool: it will not be delivered. "
        "Exit 1 when there is no such message.",
    )
    add_config(p)
    p.add_argument("id", help="the message id (first column of `queue list`)")
    p = actions.add_parser(
        "purge",
        help="remove dead messages",
        description="Remove every dead-lettered message (after inspecting them with "
        "`queue list --state dead`).",
    )
    add_config(p)
    p.add_argument("--dead", action="store_true", required=True, help="remove every dead message")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(epoch: float, now: float) -> str:
    return "now" if epoch <= now else "in " + _age(epoch - now)


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _safe(text: str) -> str:
    return escape_control(text)


def format_list(entries: Sequence[SpoolSummary], now: float) -> str:
    """One line per entry; the last reply, when there is one, on an indented second line."""
    header = (
        f"{'ID':<26} {'AGE':>5} {'TRIES':>5} {'NEXT':>8} {'STATE':<6} {'RCPTS':>5}  "
        "SENDER / LAST REPLY"
    )
    lines = [header]
    for e in entries:
        nxt = "-" if e.state != "queued" else _when(e.next_attempt_at, now)
        lines.append(
            f"{e.id:<26} {_age(now - e.created_at):>5} {e.attempts:>5} {nxt:>8} {e.state:<6} "
            f"{len(e.rcpt_tos):>5}  <{_safe(e.mail_from)}>"
        )
        if e.last_reply:
            lines.append(f"{'':<26} {_safe(e.last_reply)}")
    lines.append(f"-- {len(entries)} message(s)")
    return "\n".join(lines) + "\n"


def format_show(entry: SpoolEntry, now: float, body: bool) -> str:
    next_attempt = "-" if entry.state != "queued" else _stamp(entry.next_attempt_at)
    lines = [
        f"id:              {entry.id}",
        f"state:           {entry.state}",
        f"received:        {_stamp(entry.created_at)} ({_age(now - entry.created_at)} ago)",
        f"attempts:        {entry.attempts}",
        f"next attempt:    {next_attempt}",
        f"sender:          <{_safe(entry.mail_from)}>",
        f"recipients:      {_safe(', '.join(entry.rcpt_tos))}",
        f"delivered to:    {_safe(', '.join(entry.done_recipients)) or '-'}",
        f"account:         {_safe(entry.account or '-')}",
        f"client:          {entry.peer or '-'}",
        f"providers:       {', '.join(entry.providers)}",
        f"size:            {len(entry.raw)} bytes",
        f"last reply:      {_safe(entry.last_reply or '-')}",
        f"last error:      {_safe(entry.last_error or '-')}",
        "",
    ]
    if body:
        # The operator asked for the message itself: lines as they are, controls escaped.
        text = entry.raw.decode("utf-8", "replace").replace("\r\n", "\n")
        lines += [_safe(line) for line in text.split("\n")]
    else:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(entry.raw)
        lines += [f"{_safe(k)}: {_safe(str(v))}" for k, v in parsed.items()]
    return "\n".join(lines) + "\n"


async def _retry_or_delete(spool: Spool, action: str, msg_id: str, out: TextIO) -> int:
    done = await (spool.retry(msg_id) if action == "retry" else spool.delete(msg_id))
    if done:
        out.write(f"{msg_id}: {'due now' if action == 'retry' else 'deleted'}\n")
        return EX_OK
    entry = await spool.get(msg_id)
    if entry is not None and entry.state == "active":
        # Not an error: it is being tried right now, which is what retry asks for.
        out.write(f"{msg_id}: being delivered right now\n")
        return EX_OK
    out.write(f"{_safe(msg_id)}: no such message\n")
    return EX_NOT_FOUND


async def _run(args: argparse.Namespace, spool: Spool, out: TextIO) -> int:
    now = time.time()
    action = args.action
    if action == "list":
        out.write(format_list(await spool.list(state=args.state), now))
        return EX_OK
    if action == "show":
        entry = await spool.get(args.id)
        if entry is None:
            out.write(f"{_safe(args.id)}: no such message\n")
            return EX_NOT_FOUND
        out.write(format_show(entry, now, args.body))
        return EX_OK
    if action == "retry" and args.all:
        out.write(f"{await spool.retry_all()} message(s) due now\n")
        return EX_OK
    if action in ("retry", "delete"):
        return await _retry_or_delete(spool, action, args.id, out)
    out.write(f"{await spool.purge_dead()} dead message(s) removed\n")
    return EX_OK


def run_queue_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    url = settings.spool.url
    if url.startswith("sqlite:///") and not sqlite_path(url).exists():
        # Opening would create an empty spool: most likely the wrong --config.
        raise GatewayError(f"no spool at {sqlite_path(url)} (is --config the daemon's?)")

    async def go() -> int:
        spool = open_spool(settings.spool)
        try:
            return await _run(args, spool, out)
        finally:
            await spool.aclose()

    try:
        return asyncio.run(go())
    except OSError as exc:
        raise GatewayError(f"cannot open the spool: {exc}") from None
