"""The DATA reader alone: CPU per message and peak memory, this tree's against a git revision's.

    python bench/data_reader.py [--before HEAD] [--large 25000000] [--small-runs 3000]

Both readers run in this process on the same input, fed to an ``asyncio.StreamReader`` in
64 KiB pieces as a socket would deliver them (the message already dot-stuffed, as on the
wire). Reported: CPU (``time.process_time``) per 2 KB message and per MB of a large one, and
the large message's tracemalloc peak above what was allocated before the read (the wire
bytes themselves are not counted), as a multiple of the message size.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import messages

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

Reader = Callable[..., Awaitable[Any]]
PIECE = 65536


def _wire(message: bytes) -> bytes:
    """What a client sends after 354: dot-stuffed, then the end of data."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def _read(read_data: Reader, wire: bytes) -> Any:
    reader = asyncio.StreamReader(limit=998 + 3)
    view = memoryview(wire)

    async def feed() -> None:
        for start in range(0, len(wire), PIECE):
            reader.feed_data(view[start : start + PIECE])
            await asyncio.sleep(0)

    feeder = asyncio.create_task(feed())
    result = await read_data(reader, max_bytes=2**31, max_line=998)
    await feeder
    return result


def _small_cpu(read_data: Reader, wire: bytes, runs: int) -> float:
    async def many() -> None:
        for _ in range(runs):
            await _read(read_data, wire)

    started = time.process_time()
    asyncio.run(many())
    return (time.process_time() - started) / runs


def _large(read_data: Reader, wire: bytes, size: int) -> tuple[float, float]:
    """(CPU seconds per MB, tracemalloc peak growth as a multiple of the message)."""

    async def once(measure: bool) -> float:
        # The result never leaves this coroutine: asyncio.run's teardown repr()s its task's
        # result (a transient copy of the whole message, Python 3.11), which is not ours.
        if measure:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        result = await _read(read_data, wire)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert result.error is None, "refused"
        assert len(result.content) == size, "wrong content"
        return peak

    started = time.process_time()
    asyncio.run(once(measure=False))
    cpu = (time.process_time() - started) / (size / 1e6)
    return cpu, asyncio.run(once(measure=True)) / size


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _readers(before: str | None, tmp: Path) -> dict[str, Reader]:
    from smtp2api import smtp_data

    readers: dict[str, Reader] = {"now": smtp_data.read_data}
    if before:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{before}:src/smtp2api/smtp_guard.py"],
            capture_output=True,
            check=True,
        ).stdout
        (tmp / "guard_before.py").write_bytes(source)
        readers[before] = _load(tmp / "guard_before.py", "guard_before").read_data
    return readers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="also measure the reader of this git revision")
    parser.add_argument("--large", type=int, default=25_000_000)
    parser.add_argument("--small-runs", type=int, default=3000)
    args = parser.parse_args()
    small, large = messages.text_message(), messages.large_message(args.large)
    small_wire, large_wire = _wire(small), _wire(large)
    with tempfile.TemporaryDirectory() as tmp:
        readers = _readers(args.before, Path(tmp))
        print(f"small {len(small)} B, large {len(large) / 1e6:.1f} MB, fed in {PIECE} B reads")
        for name, read_data in readers.items():
            assert asyncio.run(_read(read_data, small_wire)).content == small
            per_small = _small_cpu(read_data, small_wire, args.small_runs)
            per_mb, peak = _large(read_data, large_wire, len(large))
            print(
                f"  {name:<8} {per_small * 1e6:7.1f} us CPU per small message, "
                f"{per_mb * 1e3:6.1f} ms CPU per MB, peak {peak:4.2f}x the large message"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
