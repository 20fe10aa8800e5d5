"""The log sink on a real file descriptor: lines of one event-loop iteration written together,
errors at once, whole lines of at most PIPE_BUF bytes per write so processes sharing a pipe
never interleave, and nothing lost at exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from smtp2api import logs
from smtp2api.logs import configure_logging, flush_logs, get_logger

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    flush_logs()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def pipe() -> Iterator[tuple[int, TextIO]]:
    """(read end, non-blocking; write end as a text stream) of a real pipe."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    stream = os.fdopen(write_fd, "w")
    try:
        yield read_fd, stream
    finally:
        flush_logs()
        stream.close()
        os.close(read_fd)


def _read(fd: int) -> list[str]:
    try:
        return os.read(fd, 1 << 16).decode().splitlines()
    except BlockingIOError:
        return []


def test_lines_of_one_loop_iteration_are_written_after_it(pipe: tuple[int, TextIO]) -> None:
    read_fd, stream = pipe
    configure_logging("info", "json", stream)
    log = get_logger("smtp2api.test")

    async def main() -> tuple[list[str], list[str]]:
        log.info("first")
        logging.getLogger("other").warning("second")
        during = _read(read_fd)
        await asyncio.sleep(0)  # the flush was scheduled before this task's wake-up
        return during, _read(read_fd)

    during, after = asyncio.run(main())
    assert during == []
    assert [json.loads(line)["event"] for line in after] == ["first", "second"]


def test_an_error_is_written_at_once_after_the_lines_before_it(
    pipe: tuple[int, TextIO],
) -> None:
    read_fd, stream = pipe
    configure_logging("info", "json", stream)
    log = get_logger("smtp2api.test")

    async def main() -> list[str]:
        log.info("before")
        log.error("failed")
        return _read(read_fd)

    assert [json.loads(line)["event"] for line in asyncio.run(main())] == ["before", "failed"]


def test_lines_without_a_loop_or_file_descriptor_are_written_at_once(
    pipe: tuple[int, TextIO],
) -> None:
    read_fd, stream = pipe
    configure_logging("info", "json", stream)
    get_logger().info("no_loop")
    assert [json.loads(line)["event"] for line in _read(read_fd)] == ["no_loop"]


def test_reconfiguring_flushes_the_lines_gathered_so_far(pipe: tuple[int, TextIO]) -> None:
    read_fd, stream = pipe

    async def main() -> None:
        configure_logging("info", "json", stream)
        get_logger().info("gathered")
        configure_logging("info", "json", stream)  # a reload, mid-iteration

    asyncio.run(main())
    assert [json.loads(line)["event"] for line in _read(read_fd)] == ["gathered"]


def test_chunks_hold_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    lines = [f"{i}:" + "é" * (i * 37 % 900) for i in range(200)] + ["long" * 2000, "last"]
    chunks = list(logs._chunks(lines))
    assert "".join(chunks) == "".join(line + "\n" for line in lines)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.endswith("\n")
        assert len(chunk.encode()) <= select.PIPE_BUF or chunk.count("\n") == 1


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from smtp2api.logs import configure_logging, get_logger

    name, count = sys.argv[1], int(sys.argv[2])
    configure_logging("info", "json")
    log = get_logger("child")

    async def burst(start):
        for seq in range(start, min(start + 40, count)):  # many lines per loop iteration
            log.info("line", proc=name, seq=seq, pad="x" * (seq * 131 % 1500))

    async def main():
        for start in range(0, count, 40):
            await burst(start)
            await asyncio.sleep(0)

    asyncio.run(main())
    loop = asyncio.new_event_loop()

    def last():  # gathered for an iteration that never comes: atexit writes it
        log.info("line", proc=name, seq=count, pad="")
        loop.stop()

    loop.call_soon(last)
    loop.run_forever()
    loop.close()
    """
)


def test_processes_sharing_a_pipe_never_interleave_and_lose_nothing_at_exit() -> None:
    count = 3000
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, name, str(count)], stdout=write_fd, env=env)
        for name in ("a", "b")
    ]
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for line in data.decode().splitlines():
        event = json.loads(line)  # an interleaved write would break a line's JSON
        assert event["pad"] == "x" * (event["seq"] * 131 % 1500) or event["seq"] == count
        seen[event["proc"]].append(event["seq"])
    assert seen == {"a": list(range(count + 1)), "b": list(range(count + 1))}


def test_a_forked_child_does_not_write_its_parents_lines_again(
    pipe: tuple[int, TextIO],
) -> None:
    read_fd, stream = pipe

    async def main() -> int:
        configure_logging("info", "json", stream)
        get_logger().info("parent")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            with contextlib.suppress(BaseException):
                get_logger().info("child")
                flush_logs()
            os._exit(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert asyncio.run(main()) == 0
    assert sorted(json.loads(line)["event"] for line in _read(read_fd)) == ["child", "parent"]
