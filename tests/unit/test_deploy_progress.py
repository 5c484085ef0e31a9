"""deploy/progress.py: what each renderer writes for the same events."""

from __future__ import annotations

import io
import json
import logging

import pytest

from zdlb.deploy.plan import Step
from zdlb.deploy.progress import (
    Event,
    EventKind,
    HostSummary,
    JsonProgress,
    LogProgress,
    TtyProgress,
    summary_table,
)

EVENTS = [
    Event(EventKind.STEP_STARTED, "front-1", Step.RUN, at=100.0),
    Event(EventKind.OUTPUT, "front-1", Step.RUN, text="restarting app", at=100.1),
    Event(EventKind.STEP_DONE, "front-1", Step.RUN, 0.25, at=100.25),
    Event(EventKind.STEP_FAILED, "front-2", Step.VERIFY, text="GET / answered 500", at=101.0),
]
HOSTS = [
    HostSummary("front-1", "done", Step.CONFIRM, "", 3.37, {Step.RUN: 0.25, Step.WAIT_UP: 3.0}),
    HostSummary("front-2", "failed", Step.VERIFY, "verify: GET / answered 500", 1.5),
]


def test_json_is_one_object_per_event_then_a_summary() -> None:
    out = io.StringIO()
    progress = JsonProgress(out)
    for event in EVENTS:
        progress.emit(event)
    progress.finish(HOSTS, "failed: front-2 failed at step verify")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[2] == {
        "event": "step-done", "host": "front-1", "step": "run", "elapsed_s": 0.25, "at": 100.25
    }  # fmt: skip
    assert lines[-1]["hosts"][0]["steps_s"] == {"run": 0.25, "wait-up": 3.0}
    assert lines[-1]["result"].startswith("failed")


def test_log_is_one_line_per_step_failures_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zdlb.deploy")
    out = io.StringIO()
    progress = LogProgress(out)
    for event in EVENTS:
        progress.emit(event)
    progress.finish(HOSTS, "failed")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[2] == (logging.INFO, "deploy.step-done host=front-1 step=run elapsed_s=0.250")
    assert messages[3] == (
        logging.WARNING,
        "deploy.step-failed host=front-2 step=verify text=GET / answered 500",
    )
    assert out.getvalue().startswith("deploy failed\nhost ")


def test_tty_rewrites_one_line_per_host_in_place() -> None:
    out = io.StringIO()
    progress = TtyProgress(out, ["front-1", "front-2"])
    progress.emit(EVENTS[0])
    progress.emit(EVENTS[1])
    text = out.getvalue()
    second = text.split("\x1b[F\x1b[2K\x1b[F\x1b[2K")[-1]  # the last drawing, after going up 2
    first_line, second_line = second.splitlines()
    assert first_line.startswith("front-1") and "run" in first_line
    assert first_line.endswith("| restarting app")
    assert second_line.split() == ["front-2", "pending"]
    progress.emit(Event(EventKind.HOST_DONE, "front-1", elapsed_s=3.37))
    last = out.getvalue().rsplit("\x1b[2K", 1)[1]
    assert [line.split() for line in last.splitlines()] == [
        ["front-1", "done", "in", "3.4", "s"],
        ["front-2", "pending"],
    ]


def test_summary_table_lists_each_steps_seconds() -> None:
    table = summary_table(HOSTS)
    assert "run=0.25 wait-up=3.00" in table
    assert table.splitlines()[2].split()[:4] == ["front-2", "failed", "verify", "1.50"]


def test_tty_shows_a_failed_hosts_last_output_lines_at_the_end() -> None:
    out = io.StringIO()
    progress = TtyProgress(out, ["front-2"])
    for index in range(30):
        progress.emit(Event(EventKind.OUTPUT, "front-2", Step.RUN, text=f"line {index}"))
    progress.emit(Event(EventKind.HOST_FAILED, "front-2", Step.RUN, text="exit status 3"))
    progress.finish(HOSTS, "failed")
    tail = out.getvalue().split("front-2: the command's last output lines:\n", 1)[1]
    assert tail.splitlines()[:20] == [f"  line {index}" for index in range(10, 30)]
