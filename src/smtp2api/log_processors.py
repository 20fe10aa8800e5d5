"""The processors behind every log line (``logs.py`` assembles them): the two guards, secret
masking and control-character escaping, and ``JsonLine``, the JSON chain fused into one
processor for the hot path (each accepted message writes about three lines at info).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from pydantic import SecretBytes, SecretStr
from structlog.contextvars import STRUCTLOG_KEY_PREFIX, STRUCTLOG_KEY_PREFIX_LEN
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "**********"

# Substrings of keys whose values are never logged (matched on the lower-cased key, "-" as "_").
SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "auth_data",
    "credential",
    "private_key",
    "cookie",
)
_BEARER = re.compile(r"^\s*(Bearer|Basic)\s+\S", re.IGNORECASE)

# C0, DEL, C1, and the Unicode line/paragraph separators: everything str.splitlines() or a
# terminal could treat as a line break or an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_PLAIN = (str, int, float, bool, type(None))
_FIRST_KEYS = ("timestamp", "level", "event", "logger")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    return _ESCAPES.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\n``, ``\\x00``)."""
    # Every character _CONTROL matches is non-printable (Cc, Zl, Zp), so a printable text has
    # none: one C-level scan settles the common case without the regex and its copy.
    if text.isprintable():
        return text
    return _CONTROL.sub(_escape_char, text)


# Key -> secret? Log keys are a small fixed vocabulary checked on every event; the bound keeps
# client-chosen nested keys (header names) from growing it without limit.
_SECRET_NAMES: dict[str, bool] = {}
_SECRET_NAMES_MAX = 4096


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    known = _SECRET_NAMES.get(key)
    if known is None:
        norm = key.lower().replace("-", "_")
        known = any(part in norm for part in SECRET_KEY_PARTS)
        if len(_SECRET_NAMES) < _SECRET_NAMES_MAX:
            _SECRET_NAMES[key] = known
    return known


def _mask_text(value: str) -> str:
    # _BEARER can only match a text that starts with white space or "b"/"B" (IGNORECASE folds
    # nothing else onto "b"): test that first instead of running the regex on every value.
    head = value[:1]
    if head and (head in "bB" or head.isspace()) and _BEARER.match(value):
        # An Authorization header value under an innocent key ("header", "value", ...).
        return f"{value.split(None, 1)[0]} {MASK}"
    return value


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, Mapping):
        return {k: MASK if _is_secret_key(k) else _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def mask_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: mask values of secret-looking keys (nested too) and of ``SecretStr``."""
    for key, value in event_dict.items():
        if key == "exc_info":
            continue
        event_dict[key] = MASK if _is_secret_key(key) else _mask(value)
    return event_dict


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return escape_control(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {_escape(str(k)): _escape(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    # Any other object is shown by its repr, which may carry raw newlines: escape it now.
    return escape_control(repr(value))


def _first_keys_first(event_dict: EventDict) -> EventDict:
    # The keys a reader scans for come first; the JSON line keeps this order.
    out: EventDict = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    out.update(event_dict)
    return out


def _escape_keys(out: EventDict) -> EventDict:
    if any(_CONTROL.search(key) for key in out):
        return {escape_control(key): value for key, value in out.items()}
    return out


def escape_controls(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: escape control characters in every key and value, so one event = one line."""
    out = _first_keys_first(event_dict)
    for key, value in out.items():
        # exc_info is rendered later, by a formatter that escapes the untrusted part itself.
        if key != "exc_info":
            out[key] = _escape(value)
    return _escape_keys(out)


# The last whole second and its ISO 8601 text: a log line needs only the microseconds formatted.
_second: tuple[int, str] = (-1, "")


def utc_timestamp() -> str:
    """Now as TimeStamper(fmt="iso", utc=True) writes it: ``2026-01-02T03:04:05.678901Z``,
    the fraction left out when it is zero (``datetime.isoformat``; both truncate to µs)."""
    global _second  # noqa: PLW0603 - a one-entry cache; a tuple swap is atomic under the GIL
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached, text = _second
    if cached != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


def merge_contextvars(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog's ``merge_contextvars``, reading each variable once (``items()``, not a
    lookup per key): the same keys, values and order."""
    for var, value in contextvars.copy_context().items():
        name = var.name
        if value is not Ellipsis and name.startswith(STRUCTLOG_KEY_PREFIX):
            event_dict.setdefault(name[STRUCTLOG_KEY_PREFIX_LEN:], value)
    return event_dict


def stamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = utc_timestamp()
    return event_dict


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # structlog's add_log_level mapping
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})
# JSONRenderer's json.dumps, built once: same separators, ensure_ascii, NaN; escape_controls
# leaves nothing but JSON types, so ``default`` is never reached.
_JSON = json.JSONEncoder(default=repr)
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_encode_c = (
    _C_ENCODER(
        None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    if _C_ENCODER is not None
    else None
)
# In a line without "\\" every string is printable ASCII but '"' and "\\" (ensure_ascii escapes
# the rest), so white space is " " and '": "' starts a value: _BEARER on each string value is
# this search on the line.
_BEARER_VALUE = re.compile(r'": " *(?:bearer|basic) +[^ "]', re.IGNORECASE)
# Key tuple -> (its secret-looking keys, whether every key is printable), per event shape.
_KEY_PLANS: dict[tuple[str, ...], tuple[tuple[str, ...], bool]] = {}


def _encode(out: EventDict) -> str:
    return "".join(_encode_c(out, 0)) if _encode_c is not None else _JSON.encode(out)


def _key_plan(keys: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    plan = _KEY_PLANS.get(keys)
    if plan is None:
        plan = (tuple(k for k in keys if _is_secret_key(k)), "".join(keys).isprintable())
        if len(_KEY_PLANS) < _SECRET_NAMES_MAX:
            _KEY_PLANS[keys] = plan
    return plan


def _head(event_dict: EventDict, level: str, name: object) -> EventDict:
    """What add_log_level, TimeStamper, _add_logger_name and the reordering of
    ``escape_controls`` make of ``event_dict``, in one copy."""
    out: EventDict = {"timestamp": utc_timestamp(), "level": level}
    event_dict.pop("timestamp", None)
    event_dict.pop("level", None)
    if "event" in event_dict:
        out["event"] = event_dict.pop("event")
    if "logger" in event_dict:
        out["logger"] = event_dict.pop("logger")
    elif name:
        out["logger"] = name
    out.update(event_dict)
    return out


class JsonLine:
    """The JSON chain (level, timestamp, logger name, ``mask_secrets``, ``escape_controls``,
    JSONRenderer) as one processor that writes the same line at a fraction of the cost.

    The common event (plain values, keys seen before, nothing to escape or mask) is rendered
    first and checked after: the key plan masks secret keys, and a line without a backslash
    has no control character to escape. Anything else takes ``_mask`` and ``_escape`` value by
    value, and an event with ``exc_info``, ``stack_info`` or a stdlib record the whole chain.
    """

    def __init__(self, chain: list[Processor]) -> None:
        self._chain = chain

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        if "exc_info" in event_dict or "stack_info" in event_dict or "_record" in event_dict:
            result: Any = event_dict
            for processor in self._chain:
                result = processor(logger, method_name, result)
            return result
        level = _LEVEL_NAMES.get(method_name, method_name)
        out = _head(event_dict, level, getattr(logger, "name", None))
        secret, printable_keys = _key_plan(tuple(out))
        for key in secret:
            out[key] = MASK
        if printable_keys and _PLAIN_TYPES.issuperset(map(type, out.values())):
            line = _encode(out)
            if "\\" not in line and not _BEARER_VALUE.search(line):
                return line
        for key, value in out.items():
            out[key] = _escape(_mask(value))
        return _encode(_escape_keys(out))


def add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    name = record.name if isinstance(record, logging.LogRecord) else getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict
