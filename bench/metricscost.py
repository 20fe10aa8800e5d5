"""CPU of the per-message metric observations, ``smtp2api.metrics`` now and at a git revision,
alternately in one process.

    python bench/metricscost.py [--before HEAD] [--messages 20000] [--rounds 7]

One message's observations: a connection, the session gauge up and down, seven SMTP replies
(banner to QUIT), the message result and size, one delivery attempt. The "before" module is
read with ``git show REV:src/smtp2api/metrics.py`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from smtp2api import metrics as metrics_now  # noqa: E402
from smtp2api.replies import SMTPReply  # noqa: E402

REPLIES = [SMTPReply(code, "", "x") for code in (220, 250, 250, 250, 354, 250, 221)]


def load_before(rev: str, tmp: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/smtp2api/metrics.py"],
        check=True,
        capture_output=True,
    ).stdout
    path = tmp / "metrics_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("metrics_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(metrics: Any, messages: int) -> float:
    """CPU seconds per message."""
    start = time.process_time()
    for _ in range(messages):
        metrics.observe_connection("accepted")
        metrics.observe_active(1)
        for reply in REPLIES:
            metrics.observe_reply(reply)
        metrics.observe_message("accepted", 2043)
        metrics.observe_delivery("http", "success", 0.004)
        metrics.observe_active(-1)
    return (time.process_time() - start) / messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(args.before, Path(tmp))
    sides = {
        "before": before.Metrics(providers=["http"], process_metrics=False),
        "now": metrics_now.Metrics(providers=["http"], process_metrics=False),
    }
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, metrics in sides.items():
            results[name].append(run(metrics, args.messages))
    for name, values in results.items():
        print(
            f"{name:>6}: best {min(values) * 1e6:6.2f} µs/message, "
            f"median {statistics.median(values) * 1e6:6.2f}"
        )
    same = sides["before"].render()[0] == sides["now"].render()[0]
    print(f" ratio: now/before = {min(results['now']) / min(results['before']):.2f} (best)")
    print(f"same exposition after the same observations: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
