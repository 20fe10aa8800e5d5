"""Who may send what: relay permission, per-account sender patterns, peer trust.

Design §8: relay only for authenticated accounts or ``trusted_networks``. Pure functions over
settings; the SMTP layer asks, this module answers with a reply or None.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Sequence

from smtp2api import replies
from smtp2api.config import Account
from smtp2api.mime_headers import parse_mailboxes, scan_headers
from smtp2api.replies import SMTPReply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
R553_FROM_NOT_ALLOWED = replies.R553_SENDER_NOT_ALLOWED.with_text(
    "From header not allowed for this account"
)
# The header check reads the same section mime.py reads; intake enforces [mime] limits.
_UNBOUNDED = 2**62
_TRUST_CACHE_SIZE = 4096


def address_matches(address: str, patterns: Iterable[str]) -> bool:
    """Case-insensitive shell-style match (``*@example.com``) of an address against patterns."""
    lowered = address.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


class Policy:
    """Relay and sender decisions for one configuration."""

    def __init__(self, trusted_networks: Sequence[IPNetwork], accounts: Sequence[Account]) -> None:
        self._trusted = tuple(trusted_networks)
        self._senders = {a.username: tuple(a.allowed_senders) for a in accounts}
        # Asked on every connection, mostly by the same few clients: parsing the address and
        # matching every network each time cost more than the answer is worth keeping.
        self._trust_cache: dict[str, bool] = {}

    def is_trusted(self, peer_ip: str) -> bool:
        known = self._trust_cache.get(peer_ip)
        if known is None:
            if len(self._trust_cache) >= _TRUST_CACHE_SIZE:
                self._trust_cache.clear()  # many distinct peers: start over, stay bounded
            known = self._trust_cache[peer_ip] = self._match_trusted(peer_ip)
        return known

    def _match_trusted(self, peer_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket is 127.0.0.1
        return any(ip in net for net in self._trusted)

    def may_relay(self, account: str | None, trusted: bool) -> bool:
        return account is not None or trusted

    def check_sender(self, account: str | None, mail_from: str) -> SMTPReply | None:
        """None when ``account`` may use ``mail_from``; the 553 reply otherwise."""
        if account is None:
            return None
        patterns = self._senders.get(account, ())
        if not patterns:
            return None
        if mail_from and address_matches(mail_from, patterns):
            return None
        return replies.R553_SENDER_NOT_ALLOWED

    def check_header_sender(self, account: str | None, raw: bytes) -> SMTPReply | None:
        """None when the message's author fields are allowed for ``account``; 553 otherwise.

        Providers send as the header From, not as the envelope sender, so an account limited
        by ``allowed_senders`` is held to them in the header too (Postfix's
        ``reject_sender_login_mismatch`` checks only the envelope). To leave nothing for a
        downstream parser to read differently: at most one From and one Sender field (RFC 5322
        §3.6), and every mailbox in them one valid addr-spec (``mime.parse_mailboxes``: not
        ``a@x@y``, not two angle-addrs) that matches. ``mime.py``'s author, the first mailbox of
        the first From, is then one of them. No From at all is allowed: providers then use the
        envelope sender, which MAIL has checked.
        """
        patterns = self._senders.get(account, ()) if account is not None else ()
        if not patterns:
            return None
        section = scan_headers(raw, max_fields=_UNBOUNDED, max_bytes=_UNBOUNDED)
        for key in ("from", "sender"):
            fields = section.all(key)
            if len(fields) > 1:
                return R553_FROM_NOT_ALLOWED
            for field in fields:
                boxes = parse_mailboxes(field.value)
                # A quoted local part with its own "@" is legal, and split differently by APIs.
                if not boxes or not all(
                    addr and addr.count("@") == 1 and address_matches(addr, patterns)
                    for _name, addr in boxes
                ):
                    return R553_FROM_NOT_ALLOWED
        return None
