"""CPU per log line: the gateway's per-message events through ``smtp2api.logs`` as it is now
and as it was at a git revision, alternately in one process, and the lines of both compared.

    python bench/logcost.py [--before HEAD] [--lines 20000] [--rounds 7]

The events are the ones a message produces in hybrid mode at ``info`` (intake's
``message_received``, ``message_spooled`` and ``delivery_succeeded``, the filtered
``message_subject`` debug call), with the SMTP session's context bound (``session_id``, ``peer``,
``msg_id``), written to a real file as the gateway does. The "before" module is read with
``git show REV:src/smtp2api/logs.py`` into a temporary directory; nothing in the work tree or
the repository changes. Lines are logged in a running event loop, ``--per-iteration`` messages
per pass, so the sink's batching counts. CPU time (``time.process_time``) per line, best and
median of the rounds, so other load on the machine inflates both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from smtp2api import logs as logs_now  # noqa: E402

SENDER = "wordpress@shop.example.com"
CONTEXT = {
    "session_id": "9f3c2a7b1e4d",
    "peer": "192.0.2.17",
    "msg_id": "01JD6X4K2M8Q9R7T5V3W1Y0Z2A",
}


def message_events(log: Any) -> int:
    """The log calls of one accepted message (hybrid mode); returns the lines written."""
    log.info("message_received", sender=SENDER, recipients=2, size=2043, attachments=0)
    log.debug("message_subject", subject="Your order #1234 has shipped")  # filtered at info
    log.info("message_spooled")
    log.info(
        "delivery_succeeded",
        provider="http",
        provider_id="<20261128.5f3a@api.example.net>",
        sender=SENDER,
        recipients=2,
        size=2043,
    )
    return 3


def load_before(rev: str, tmp: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/smtp2api/logs.py"],
        check=True,
        capture_output=True,
    ).stdout
    path = tmp / "logs_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("logs_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module: ModuleType, stream: TextIO, messages: int, per_iteration: int) -> float:
    """CPU seconds per line for ``messages`` messages' events, logged in a running event loop
    (as the gateway does), ``per_iteration`` messages per loop iteration, ``msg_id`` bound
    per message with the module's ``bound``."""
    module.configure_logging("info", "json", stream)
    log = structlog.get_logger("smtp2api.intake")
    msg_id = CONTEXT["msg_id"]

    async def burst() -> int:
        lines = 0
        for i in range(messages):
            with module.bound(msg_id=msg_id):
                lines += message_events(log)
            if i % per_iteration == per_iteration - 1:
                await asyncio.sleep(0)  # the next iteration writes what this one logged
        return lines

    context = {k: v for k, v in CONTEXT.items() if k != "msg_id"}
    with structlog.contextvars.bound_contextvars(**context):
        start = time.process_time()
        lines = asyncio.run(burst())
        used = time.process_time() - start
    return used / lines


def sample_lines(configure: Callable[..., None], tmp: Path, name: str) -> list[dict[str, Any]]:
    path = tmp / f"{name}.jsonl"
    with path.open("w") as stream, structlog.contextvars.bound_contextvars(**CONTEXT):
        configure("info", "json", stream)
        log = structlog.get_logger("smtp2api.intake")
        message_events(log)
        log.info("nasty", sender="a\r\nb\x00c\u2028", password="hunter2", value="Bearer x.y")
        log.info("nested", headers={"X-Api-Key": "k", "k\n": ["v\t", 1, None]}, n=1.5)
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        event.pop("timestamp")
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="git revision of the old logs.py")
    parser.add_argument("--lines", type=int, default=20000, help="log lines per round and side")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-iteration", type=int, default=1, help="messages per loop pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before = load_before(args.before, tmp)
        sides = {"before": before, "now": logs_now}
        same = sample_lines(before.configure_logging, tmp, "a") == sample_lines(
            logs_now.configure_logging, tmp, "b"
        )
        print(f"same events (timestamps aside): {same}")
        results: dict[str, list[float]] = {name: [] for name in sides}
        with (tmp / "log.jsonl").open("w") as stream:
            for _ in range(args.rounds):
                for name, module in sides.items():  # alternate: A B A B ...
                    stream.seek(0)
                    stream.truncate()
                    per = args.per_iteration
                    results[name].append(run(module, stream, args.lines // 3, per))
        structlog.reset_defaults()
    for name, values in results.items():
        print(
            f"{name:>6}: best {min(values) * 1e6:6.2f} µs/line, "
            f"median {statistics.median(values) * 1e6:6.2f} µs/line"
        )
    ratio = min(results["now"]) / min(results["before"])
    print(
        f" ratio: now/before = {ratio:.2f} (best), "
        f"{statistics.median(results['now']) / statistics.median(results['before']):.2f} (median)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
