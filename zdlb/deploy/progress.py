"""How a deploy shows its progress: live lines on a terminal, log lines, or JSON events.

The driver emits ``Event``s; a ``Progress`` renders them. On a terminal (``TtyProgress``) each
host has one line, rewritten in place with its step and elapsed time, and a summary table
follows the end. Without one (CI, systemd: ``LogProgress``) each step is one log line on the
``zdlb.deploy`` logger, and the user command's output is logged line by line. ``--json``
(``JsonProgress``) writes one JSON object per event on stdout. No procedure logic here.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from zdlb.control.protocol import render_table
from zdlb.deploy.plan import Step

log = logging.getLogger("zdlb.deploy")

# A command's output line longer than this is cut in a live line (a terminal is ~80-200 wide).
LIVE_OUTPUT_CHARS = 60
# On a terminal a failed host's command output is shown at the end: its last lines, this many.
FAILED_OUTPUT_LINES = 20


class EventKind(enum.Enum):
    DEPLOY_STARTED = "deploy-started"
    STEP_STARTED = "step-started"
    STEP_DONE = "step-done"
    STEP_FAILED = "step-failed"
    OUTPUT = "output"  # a line the user's command printed
    HOST_DONE = "host-done"
    HOST_FAILED = "host-failed"
    HOST_ROLLED_BACK = "host-rolled-back"
    NOTE = "note"  # what the deploy did about a failure (flip back, --on-failure)
    DEPLOY_ENDED = "deploy-ended"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened; ``elapsed_s`` is the step's (or host's, deploy's) wall time."""

    kind: EventKind
    host: str | None = None
    step: Step | None = None
    elapsed_s: float | None = None
    text: str = ""  # a reason, an output line, a note, or the deploy's result
    at: float = field(default_factory=time.time)
    hosts: tuple[str, ...] = ()  # DEPLOY_STARTED: every host of the deploy, in order

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"event": self.kind.value, "at": round(self.at, 3)}
        if self.host is not None:
            data["host"] = self.host
        if self.step is not None:
            data["step"] = self.step.value
        if self.elapsed_s is not None:
            data["elapsed_s"] = round(self.elapsed_s, 3)
        if self.text:
            data["text"] = self.text
        if self.hosts:
            data["hosts"] = list(self.hosts)
        return data


@dataclass
class HostSummary:
    """What became of one host: its result, the step it reached, and each step's seconds."""

    host: str
    status: str = "pending"
    step: Step | None = None
    reason: str = ""
    elapsed_s: float = 0.0
    steps_s: dict[Step, float] = field(default_factory=dict)


class Progress(Protocol):
    def emit(self, event: Event) -> None: ...

    def finish(self, hosts: Sequence[HostSummary], result: str) -> None:
        """The deploy is over: show the summary."""
        ...


def summary_table(hosts: Sequence[HostSummary]) -> str:
    """One row per host: result, step reached, total seconds, seconds per step."""
    rows = []
    for host in hosts:
        steps = " ".join(f"{step.value}={s:.2f}" for step, s in host.steps_s.items())
        step = host.step.value if host.step else "-"
        rows.append(
            (
                host.host,
                host.status,
                step,
                f"{host.elapsed_s:.2f}",
                steps or "-",
                host.reason or "-",
            )
        )
    return render_table(("host", "result", "step", "seconds", "per step (s)", "reason"), rows)


class JsonProgress:
    """One JSON object per event, then one ``summary`` object, on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def emit(self, event: Event) -> None:
        self._stream.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
        self._stream.flush()

    def finish(self, hosts: Sequence[HostSummary], result: str) -> None:
        data = {
            "event": "summary",
            "result": result,
            "hosts": [
                {
                    "host": h.host,
                    "status": h.status,
                    "step": h.step.value if h.step else None,
                    "reason": h.reason,
                    "elapsed_s": round(h.elapsed_s, 3),
                    "steps_s": {step.value: round(s, 3) for step, s in h.steps_s.items()},
                }
                for h in hosts
            ],
        }
        self._stream.write(json.dumps(data) + "\n")  # steps in the order they ran
        self._stream.flush()


class LogProgress:
    """One log line per step (and per output line), then the summary table on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def emit(self, event: Event) -> None:
        level = logging.WARNING if event.kind in _BAD else logging.INFO
        parts = [f"deploy.{event.kind.value}"]
        if event.host is not None:
            parts.append(f"host={event.host}")
        if event.step is not None:
            parts.append(f"step={event.step.value}")
        if event.elapsed_s is not None:
            parts.append(f"elapsed_s={event.elapsed_s:.3f}")
        if event.text:
            parts.append(f"text={event.text}")
        log.log(level, "%s", " ".join(parts))

    def finish(self, hosts: Sequence[HostSummary], result: str) -> None:
        self._stream.write(f"deploy {result}\n" + (summary_table(hosts) if hosts else ""))
        self._stream.flush()


_BAD = (EventKind.STEP_FAILED, EventKind.HOST_FAILED, EventKind.NOTE)


class TtyProgress:
    """A live line per host on a terminal, rewritten in place; ``tick()`` refreshes times."""

    def __init__(self, stream: TextIO, hosts: Sequence[str]) -> None:
        self._stream = stream
        self._hosts = list(hosts)
        self._state: dict[str, tuple[str, float | None]] = {h: ("pending", None) for h in hosts}
        self._last_output: dict[str, str] = {}
        self._outputs: dict[str, deque[str]] = {}
        self._failed: list[str] = []
        self._notes: list[str] = []
        self._drawn = 0

    def emit(self, event: Event) -> None:
        host = event.host
        for name in (*event.hosts, host):
            if name is not None and name not in self._state:
                self._hosts.append(name)
                self._state[name] = ("pending", None)
        match event.kind:
            case EventKind.STEP_STARTED if host is not None and event.step is not None:
                self._state[host] = (event.step.value, time.monotonic())
                self._last_output.pop(host, None)
            case EventKind.OUTPUT if host is not None:
                self._last_output[host] = event.text[:LIVE_OUTPUT_CHARS]
                lines = self._outputs.setdefault(host, deque(maxlen=FAILED_OUTPUT_LINES))
                lines.append(event.text)
            case EventKind.HOST_DONE if host is not None:
                self._state[host] = (f"done in {event.elapsed_s or 0:.1f} s", None)
            case EventKind.HOST_FAILED if host is not None:
                self._state[host] = (f"FAILED: {event.text}", None)
                self._failed.append(host)
            case EventKind.HOST_ROLLED_BACK if host is not None:
                self._state[host] = ("rolled back", None)
            case EventKind.NOTE:
                self._notes.append(f"{host or 'deploy'}: {event.text}")
            case _:
                pass
        self.tick()

    def tick(self) -> None:
        """Redraw every host's line (the cursor goes back up over the last drawing)."""
        out = "\x1b[F\x1b[2K" * self._drawn if self._drawn else ""
        now = time.monotonic()
        lines = []
        for host in self._hosts:
            text, since = self._state.get(host, ("pending", None))
            if since is not None:
                text = f"{text} {now - since:5.1f} s"
                if output := self._last_output.get(host):
                    text += f"  | {output}"
            lines.append(f"{host:<20} {text}")
        lines += self._notes
        self._stream.write(out + "".join(line + "\n" for line in lines))
        self._stream.flush()
        self._drawn = len(lines)

    def finish(self, hosts: Sequence[HostSummary], result: str) -> None:
        self.tick()
        for host in self._failed:
            if lines := self._outputs.get(host):
                self._stream.write(f"\n{host}: the command's last output lines:\n")
                self._stream.write("".join(f"  {line}\n" for line in lines))
        self._stream.write(f"\ndeploy {result}\n" + (summary_table(hosts) if hosts else ""))
        self._stream.flush()
