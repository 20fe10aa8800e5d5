"""Parsing of the config file's human units: durations, sizes and listen addresses."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|k|m|g)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"5d"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or '5d'")  # noqa: TRY004 - pydantic reports ValueError
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_FACTORS[match.group(2) or "s"]
    else:
        raise ValueError("expected a duration such as '30s', '5m' or '5d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """``"25MB"`` (10**6), ``"10MiB"`` (2**20) or an integer number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '25MB', '10MiB' or a number of bytes")  # noqa: TRY004
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _SIZE_FACTORS[(match.group(2) or "b").lower()])
    else:
        raise ValueError("expected a size such as '25MB', '10MiB' or a number of bytes")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_hostport(value: str) -> tuple[str, int]:
    """``"0.0.0.0:587"``, ``"[::1]:25"``, ``"localhost:2525"`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. '0.0.0.0:587' or '[::1]:587'")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("an IPv6 address must be written as [ADDR]:PORT")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address must be written as [ADDR]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)
