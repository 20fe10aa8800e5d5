"""CPU and memory of ``parse_message`` now and at a git revision, alternately, and whether
both produce the same ``Message``.

    python bench/mimecost.py [--before HEAD] [--rounds 5] [--iterations 2000] [--large 25]

Each side runs in its own subprocess (``PYTHONPATH`` pointing at this work tree's ``src`` or
at ``git archive REV src/smtp2api`` unpacked in a temporary directory), A B A B ..., and
reports CPU time (``time.process_time``) per parse of the 2 KB text and the 10.7 KB multipart
message of ``bench/messages.py``, with the received header the gateway prepends. ``--large
N`` also parses one N MB message (one base64 attachment) once per side under tracemalloc and
reports the peak of the parse (the message's own bytes excluded) as a multiple of its size.
Nothing in the work tree or the repository changes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECEIVED = b"Received: from client.example (client.example [192.0.2.7])\r\n\tby gw; now\r\n"


def _worker(names: list[str], iterations: int, large_mb: int) -> dict[str, Any]:
    import messages  # bench/, importable as this script's directory

    from smtp2api.mime import parse_message
    from smtp2api.models import Envelope

    envelope = Envelope(mail_from=messages.FROM, rcpt_tos=(messages.TO,))
    out: dict[str, Any] = {}
    for name in names:
        raw = RECEIVED + messages.by_name(name)
        message = parse_message(raw, envelope, "m1")
        for _ in range(iterations // 10):  # warm up
            parse_message(raw, envelope, "m1")
        start = time.process_time()
        for _ in range(iterations):
            parse_message(raw, envelope, "m1")
        used = time.process_time() - start
        digest = hashlib.sha256(repr(message).encode()).hexdigest()
        out[name] = {"us": used / iterations * 1e6, "digest": digest}
    if large_mb:
        import tracemalloc

        raw = RECEIVED + messages.large_message(large_mb * 1_000_000)
        tracemalloc.start()
        start = time.process_time()
        message = parse_message(raw, envelope, "m1")
        used = time.process_time() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        digest = hashlib.sha256(repr(message).encode()).hexdigest()
        out["large"] = {"us": used * 1e6, "peak": peak / len(raw), "digest": digest}
    return out


def _side(src: Path, names: list[str], iterations: int, large_mb: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT / 'bench'}")
    command = [sys.executable, __file__, "--worker", ",".join(names)]
    command += ["--iterations", str(iterations), "--large", str(large_mb)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _unpack(rev: str, tmp: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/smtp2api"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "src"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=2000, help="parses per round")
    parser.add_argument("--messages", default="text2k,multipart10k")
    parser.add_argument("--large", type=int, default=0, help="also one message of N MB")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        names = [n for n in args.worker.split(",") if n]
        print(json.dumps(_worker(names, args.iterations, args.large)))
        return 0
    names = [n for n in args.messages.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"before": _unpack(args.before, Path(tmp)), "now": ROOT / "src"}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side, src in sides.items():  # alternate: A B A B ...
                large = args.large if round_ == 0 else 0
                runs[side].append(_side(src, names, args.iterations, large))
    same = True
    for name in [*names, *(["large"] if args.large else [])]:
        cells = []
        for side, results in runs.items():
            values = [r[name]["us"] for r in results if name in r]
            cells.append(
                f"{side} best {min(values):8.1f} µs median {statistics.median(values):8.1f}"
            )
        before = min(r[name]["us"] for r in runs["before"] if name in r)
        now = min(r[name]["us"] for r in runs["now"] if name in r)
        digests = {r[name]["digest"] for results in runs.values() for r in results if name in r}
        same &= len(digests) == 1
        print(f"{name:13} {' | '.join(cells)} | now/before {now / before:.2f}")
        if name == "large":
            peaks = [runs[side][0]["large"]["peak"] for side in sides]
            print(
                f"{'':13} tracemalloc peak: before {peaks[0]:.2f}x, now {peaks[1]:.2f}x the message"
            )
    print(f"same Message on both sides: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
