"""PROXY protocol v1/v2 in front of the SMTP listeners (``[smtp] proxy_protocol``).

A TCP load balancer (HAProxy ``send-proxy-v2``, AWS NLB, ...) prepends one header naming the
original client (HAProxy's ``doc/proxy-protocol.txt``). aiosmtpd's parser reads it; this module
decides whom to believe: only a direct peer in ``proxy_trusted_networks`` may send a header, and
every other connection to such a listener is closed before the banner (fail closed), since a
forged header would let anyone claim a trusted address and relay without AUTH.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import AF, V2_CMD, ProxyData, get_proxy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# HAProxy writes the header with the connection's first bytes; a trusted proxy that sends
# nothing for this long is broken, and the slot it holds is not yet counted anywhere.
HEADER_TIMEOUT = 10.0


class ProxyRefused(Exception):
    """The connection is closed without a banner; ``reason`` names why (a log field)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
    return ip


@dataclass(frozen=True, slots=True)
class ProxyGate:
    """The PROXY rules of one configuration: who may send a header, how long to wait for it."""

    trusted: tuple[IPNetwork, ...]
    timeout: float = HEADER_TIMEOUT

    @classmethod
    def build(cls, trusted: Sequence[IPNetwork], idle_timeout: float) -> ProxyGate:
        return cls(tuple(trusted), min(HEADER_TIMEOUT, idle_timeout))

    def admits(self, direct_ip: str) -> bool:
        """Whether the direct TCP peer may speak PROXY at all (the load balancer itself)."""
        ip = _ip(direct_ip)
        return ip is not None and any(ip in net for net in self.trusted)

    async def read(self, reader: asyncio.StreamReader, direct_ip: str) -> tuple[str, ProxyData]:
        """Read the header; return the client address the session is to use, and the header.

        Raises ``ProxyRefused`` for an untrusted peer (nothing is read from it), a missing,
        malformed or late header, or an address that is not an IP.
        """
        if not self.admits(direct_ip):
            raise ProxyRefused("untrusted_peer")
        try:
            data = await asyncio.wait_for(get_proxy(reader), self.timeout)
        except TimeoutError:
            raise ProxyRefused("header_timeout") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            raise ProxyRefused("header_incomplete") from None
        if not data.valid:
            raise ProxyRefused("header_invalid")
        return client_address(data, direct_ip), data


def client_address(data: ProxyData, direct_ip: str) -> str:
    """The address policy, limits and logs see for a valid header.

    v2 ``LOCAL`` (the proxy's own health check) and v1 ``UNKNOWN`` / v2 ``UNSPEC`` carry no
    client: the spec says to use the connection's real endpoints, i.e. the proxy's address.
    A ``UNIX`` source has no IP either, so it is treated the same way.
    """
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return direct_ip
    if data.family not in (AF.INET, AF.INET6) or data.src_addr is None:
        return direct_ip
    ip = _ip(str(data.src_addr))
    if ip is None:
        raise ProxyRefused("header_invalid")
    return str(ip)
