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
from smtp2api.replies import SMTPReply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_matches(address: str, patterns: Iterable[str]) -> bool:
    """Case-insensitive shell-style match (``*@example.com``) of an address against patterns."""
    lowered = address.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


class Policy:
    """Relay and sender decisions for one configuration."""

    def __init__(self, trusted_networks: Sequence[IPNetwork], accounts: Sequence[Account]) -> None:
        self._trusted = tuple(trusted_networks)
        self._senders = {a.username: tuple(a.allowed_senders) for a in accounts}

    def is_trusted(self, peer_ip: str) -> bool:
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
