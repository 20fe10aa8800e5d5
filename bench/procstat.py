"""CPU time and memory of a process tree, read from /proc (Linux; no psutil needed).

``Tree(pid)`` covers the process and every descendant (a supervisor and its workers).
``cpu()`` is user+system seconds of the live tree; ``Sampler`` polls the tree's summed RSS
in a thread and keeps the peak.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(x) for x in task.read_text().split()]
        except OSError:
            continue
    return out


class Tree:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        seen: list[int] = []
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            if pid in seen or not Path(f"/proc/{pid}").exists():
                continue
            seen.append(pid)
            todo += _children(pid)
        return seen

    def cpu(self) -> float:
        """User + system CPU seconds of the live tree (reaped children are not counted)."""
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        return total

    def rss(self) -> int:
        """Summed resident set of the tree, bytes (pages shared after fork count twice)."""
        total = 0
        for pid in self.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            except (OSError, IndexError, ValueError):
                continue
        return total

    def pss(self) -> int:
        """Summed proportional set size, bytes: shared pages split between their users."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            except (OSError, ValueError):
                continue
        return total


class Sampler:
    """Polls ``tree.rss()`` every ``interval`` seconds in a thread; ``peak`` is the maximum."""

    def __init__(self, tree: Tree, interval: float = 0.02) -> None:
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.peak = self.tree.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.tree.rss())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.tree.rss())
