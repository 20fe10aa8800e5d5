"""``smtp2api queue`` against the spool of a running daemon (a real subprocess), like postqueue.

Each test spools two messages through the daemon: one the API keeps refusing with 503 (queued,
next try in an hour) and one it refuses for good with 422 (dead).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from smtp2api.cli import main
from tests.conftest import base_config
from tests.support.daemon import Daemon, write_config
from tests.support.fakeapi import Answer, FakeAPI, ReceivedRequest
from tests.support.smtpclient import send


@dataclass
class Spooled:
    daemon: Daemon
    api: FakeAPI
    config: Path
    queued: str  # id of the message the API answers 503 to
    dead: str  # id of the message the API refused with 422


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "alice@example.com"
    msg["Subject"] = subject
    msg.set_content("The body text.\n")
    return msg.as_bytes()


def answer(request: ReceivedRequest) -> Answer:
    if request.json["subject"] == "refuse me":
        return Answer(422, json={"message": "not allowed"})
    return Answer(503)


@pytest.fixture
def spooled(tmp_path: Path) -> Iterator[Spooled]:
    with FakeAPI(handler=answer).running_in_thread() as api:
        data = base_config(
            tmp_path,
            providers={"main": {"type": "http", "url": f"{api.url}/send"}},
            delivery={"mode": "queue", "backoff_min": "1h", "backoff_max": "1h"},
        )
        path = write_config(tmp_path / "smtp2api.toml", data)
        with Daemon(path) as daemon:
            ids = []
            for subject in ("please wait", "refuse me"):
                code, text = send(
                    daemon.smtp_port, message(subject), rcpts=("a@x.test", "b@x.test")
                )
                assert code == 250, text
                ids.append(text.rsplit(" ", 1)[1])
            daemon.wait_for("message_dead", where=lambda e: e.get("msg_id") == ids[1])
            daemon.wait_for(
                "delivery_deferred",
                where=lambda e: e.get("msg_id") == ids[0] and "retry_in" in e,
            )
            yield Spooled(daemon, api, path, ids[0], ids[1])


def queue(spooled: Spooled, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``smtp2api queue ARGS --config ...`` in this process (not the daemon's)."""
    code = main(["queue", *args, "--config", str(spooled.config)])
    return code, capsys.readouterr().out


def test_list_shows_every_column_and_filters_by_state(
    spooled: Spooled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = queue(spooled, capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "AGE",
        "TRIES",
        "NEXT",
        "STATE",
        "RCPTS",
        "SENDER",
        "/",
        "LAST",
        "REPLY",
    ]
    assert re.fullmatch(
        rf"{spooled.queued} +\d+s +1 +in (59m|1h) +queued +2  <app@example\.com>", lines[1]
    ), lines[1]
    assert lines[2].split(None, 1) == ["451", "4.3.0 Upstream error, try again later"]
    assert re.fullmatch(rf"{spooled.dead} +\d+s +1 +- +dead +2  <app@example\.com>", lines[3])
    assert lines[4].strip().startswith("554 5.6.0 Message rejected upstream: not allowed")
    assert lines[-1] == "-- 2 message(s)"

    code, out = queue(spooled, capsys, "list", "--state", "dead")
    assert code == 0
    assert spooled.dead in out
    assert spooled.queued not in out
    assert out.splitlines()[-1] == "-- 1 message(s)"


def test_show_prints_metadata_and_headers_and_the_body_only_on_request(
    spooled: Spooled, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = queue(spooled, capsys, "show", spooled.queued)
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.split("\n\n", 1)[0].splitlines())
    assert fields["id"].strip() == spooled.queued
    assert fields["state"].strip() == "queued"
    assert fields["attempts"].strip() == "1"
    assert fields["recipients"].strip() == "a@x.test, b@x.test"
    assert fields["providers"].strip() == "main"
    assert fields["last reply"].strip() == "451 4.3.0 Upstream error, try again later"
    assert fields["last error"].strip().startswith("HTTP 503")
    assert "Subject: please wait" in out
    assert "Received: from" in out  # the gateway's own trace header comes first
    assert "The body text." not in out

    code, out = queue(spooled, capsys, "show", spooled.queued, "--body")
    assert code == 0
    assert "The body text." in out

    assert queue(spooled, capsys, "show", "01NOSUCHMESSAGE") == (
        1,
        "01NOSUCHMESSAGE: no such message\n",
    )


def test_retry_one_and_retry_all_make_the_running_worker_try_again(
    spooled: Spooled, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = len(spooled.api.requests)
    assert queue(spooled, capsys, "retry", spooled.queued) == (0, f"{spooled.queued}: due now\n")
    spooled.api.wait_for_requests_sync(calls + 1)  # the daemon noticed within its poll
    spooled.daemon.wait_for(
        "delivery_deferred",
        where=lambda e: e.get("msg_id") == spooled.queued and e.get("attempt") == 2,
    )

    code, out = queue(spooled, capsys, "retry", "--all")
    assert (code, out) == (0, "2 message(s) due now\n")  # the dead one is revived
    spooled.api.wait_for_requests_sync(calls + 3)
    spooled.daemon.wait_for(
        "message_dead", where=lambda e: e.get("msg_id") == spooled.dead and e.get("attempts") == 2
    )
    assert queue(spooled, capsys, "retry", "01NOSUCHMESSAGE")[0] == 1


def test_delete_and_purge(spooled: Spooled, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue(spooled, capsys, "delete", spooled.queued) == (0, f"{spooled.queued}: deleted\n")
    assert queue(spooled, capsys, "delete", spooled.queued)[0] == 1  # gone already
    assert queue(spooled, capsys, "purge", "--dead") == (0, "1 dead message(s) removed\n")
    code, out = queue(spooled, capsys, "list")
    assert (code, out.splitlines()[-1]) == (0, "-- 0 message(s)")


def test_the_installed_command_and_a_wrong_config(spooled: Spooled, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "smtp2api", "queue", "list", "--config"]
    result = subprocess.run(
        [*command, str(spooled.config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert spooled.queued in result.stdout

    other = write_config(
        tmp_path / "other.toml",
        base_config(tmp_path / "elsewhere", providers={"o": {"type": "outbox"}}),
    )
    result = subprocess.run(
        [*command, str(other)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 69  # EX_UNAVAILABLE, and no empty spool created by mistake
    assert "no spool at" in result.stderr
    assert not (tmp_path / "elsewhere").exists()
