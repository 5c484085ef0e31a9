"""The ``deploy ...`` control commands (``zdlb deploy``'s lock and progress): parsing, text.

Grammar (control/protocol.py dispatches the ``deploy`` word here)::

    deploy begin BACKEND to main|backup pid PID [SERVER...]
    deploy takeover pid PID
    deploy renew TOKEN
    deploy step TOKEN SERVER STEP
    deploy host TOKEN SERVER done|failed|rolled-back [REASON...]
    deploy end TOKEN done|failed|interrupted|rolled-back [REASON...]

Sans-IO like protocol.py: words in, a frozen command out, or ``ControlUsageError``. Kept apart
so the daemon's base protocol stays readable; nothing here runs a deploy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias, TypeVar, assert_never

from zdlb.control.words import clip as _clip
from zdlb.control.words import expect_end as _expect_end
from zdlb.control.words import name as _name
from zdlb.control.words import shown as _shown
from zdlb.deploy.plan import Step, Target
from zdlb.deploy.record import END_RESULTS, HOST_RESULTS, DeployStatus, HostStatus
from zdlb.errors import ControlUsageError

_INT_RE = re.compile(r"[+-]?[0-9]+")  # ASCII only, as protocol.py
_MAX_INT_DIGITS = 9
_Choice = TypeVar("_Choice")
_TOKEN_RE = re.compile(r"[0-9a-f]{1,64}")  # a deploy lock's token: hex from secrets.token_hex

DEPLOY_HELP_ROWS: tuple[tuple[str, str], ...] = (
    (
        "deploy begin BACKEND to main|backup pid PID [SERVER...]",
        "zdlb deploy: take the deploy lock (one deploy at a time)",
    ),
    ("deploy takeover pid PID", "zdlb deploy --resume/--rollback: take an unfinished deploy"),
    (
        "deploy renew|step|host|end TOKEN ...",
        "zdlb deploy: its lease and progress (step TOKEN SERVER STEP; host TOKEN SERVER "
        "done|failed|rolled-back [REASON]; end TOKEN RESULT [REASON])",
    ),
)
_USAGE_DEPLOY_BEGIN, _USAGE_DEPLOY_TAKEOVER, _USAGE_DEPLOY_UPDATE = (
    f"usage: {syntax}" for syntax, _ in DEPLOY_HELP_ROWS
)
_USAGE_DEPLOY = "\n".join((_USAGE_DEPLOY_BEGIN, _USAGE_DEPLOY_TAKEOVER, _USAGE_DEPLOY_UPDATE))


@dataclass(frozen=True, slots=True)
class DeployBegin:
    """``deploy begin BACKEND to main|backup pid PID [SERVER...]``: take the deploy lock for
    the hosts of ``servers`` (mains or pairs; every main with a pair when empty)."""

    backend: str
    to: Target
    pid: int
    servers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeployTakeover:
    """``deploy takeover pid PID``: take the lock of an interrupted or failed deploy."""

    pid: int


@dataclass(frozen=True, slots=True)
class DeployRenew:
    """``deploy renew TOKEN``: extend the lock's lease."""

    token: str


@dataclass(frozen=True, slots=True)
class DeployStep:
    """``deploy step TOKEN SERVER STEP``: the host of SERVER starts STEP."""

    token: str
    server: str
    step: Step


@dataclass(frozen=True, slots=True)
class DeployHost:
    """``deploy host TOKEN SERVER RESULT [REASON...]``: the host of SERVER is done, failed or
    rolled back."""

    token: str
    server: str
    result: HostStatus
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeployEnd:
    """``deploy end TOKEN RESULT [REASON...]``: the deploy is over; the lock is released."""

    token: str
    result: DeployStatus
    reason: str = ""


DeployCommand: TypeAlias = (
    DeployBegin | DeployTakeover | DeployRenew | DeployStep | DeployHost | DeployEnd
)


def parse_deploy(words: list[str]) -> DeployCommand:
    """``words`` of a line starting with ``deploy``. Raises ControlUsageError."""
    if len(words) < 2:
        raise ControlUsageError("missing what to do", _USAGE_DEPLOY)
    match words[1]:
        case "begin":
            return _parse_deploy_begin(words)
        case "takeover":
            _expect_word(words, 2, "pid", _USAGE_DEPLOY_TAKEOVER)
            pid = _pid(words, 3, _USAGE_DEPLOY_TAKEOVER)
            _expect_end(words, 4, _USAGE_DEPLOY_TAKEOVER)
            return DeployTakeover(pid)
        case "renew":
            token = _token(words, 2)
            _expect_end(words, 3, _USAGE_DEPLOY_UPDATE)
            return DeployRenew(token)
        case "step":
            token, server = _token(words, 2), _server_word(words, 3)
            steps = {step.value: step for step in Step}
            step = _choice(words, 4, steps, "step", _USAGE_DEPLOY_UPDATE)
            _expect_end(words, 5, _USAGE_DEPLOY_UPDATE)
            return DeployStep(token, server, step)
        case "host":
            token, server = _token(words, 2), _server_word(words, 3)
            results = {result.value: result for result in HOST_RESULTS}
            host_result = _choice(words, 4, results, "result", _USAGE_DEPLOY_UPDATE)
            return DeployHost(token, server, host_result, " ".join(words[5:]))
        case "end":
            token = _token(words, 2)
            ends = {result.value: result for result in END_RESULTS}
            end_result = _choice(words, 3, ends, "result", _USAGE_DEPLOY_UPDATE)
            return DeployEnd(token, end_result, " ".join(words[4:]))
        case word:
            raise ControlUsageError(f"unknown command 'deploy {_clip(word)}'", _USAGE_DEPLOY)


def _parse_deploy_begin(words: list[str]) -> DeployBegin:
    usage = _USAGE_DEPLOY_BEGIN
    if len(words) < 3:
        raise ControlUsageError("missing BACKEND", usage)
    backend = _name(words[2], "backend", usage)
    _expect_word(words, 3, "to", usage)
    to = _choice(words, 4, {target.value: target for target in Target}, "pool", usage)
    _expect_word(words, 5, "pid", usage)
    pid = _pid(words, 6, usage)
    servers = tuple(_name(word, "server", usage) for word in words[7:])
    return DeployBegin(backend, to, pid, servers)


def _expect_word(words: list[str], index: int, word: str, usage: str) -> None:
    if len(words) <= index:
        raise ControlUsageError(f"missing '{word}'", usage)
    if words[index] != word:
        raise ControlUsageError(f"expected '{word}', got {_shown(words[index])}", usage)


def _choice(
    words: list[str], index: int, choices: Mapping[str, _Choice], what: str, usage: str
) -> _Choice:
    expected = ", ".join(choices)
    if len(words) <= index:
        raise ControlUsageError(f"missing {what}: expected {expected}", usage)
    choice = choices.get(words[index])
    if choice is None:
        message = f"unknown {what} {_shown(words[index])}: expected {expected}"
        raise ControlUsageError(message, usage)
    return choice


def _pid(words: list[str], index: int, usage: str) -> int:
    if len(words) <= index:
        raise ControlUsageError("missing PID", usage)
    word = words[index]
    if not _INT_RE.fullmatch(word) or len(word) > _MAX_INT_DIGITS or int(word) < 1:
        raise ControlUsageError(f"pid {_shown(word)} is not a positive integer", usage)
    return int(word)


def _token(words: list[str], index: int) -> str:
    if len(words) <= index:
        raise ControlUsageError("missing TOKEN", _USAGE_DEPLOY_UPDATE)
    if not _TOKEN_RE.fullmatch(words[index]):
        message = f"token {_shown(words[index])} is not 1..64 hex digits"
        raise ControlUsageError(message, _USAGE_DEPLOY_UPDATE)
    return words[index]


def _server_word(words: list[str], index: int) -> str:
    if len(words) <= index:
        raise ControlUsageError("missing SERVER", _USAGE_DEPLOY_UPDATE)
    return _name(words[index], "server", _USAGE_DEPLOY_UPDATE)


def format_deploy(command: DeployCommand) -> str:
    """The canonical text of ``command``: ``parse_deploy`` reads it back."""
    match command:
        case DeployBegin(backend, to, pid, servers):
            return " ".join(("deploy begin", backend, "to", to.value, "pid", str(pid), *servers))
        case DeployTakeover(pid):
            return f"deploy takeover pid {pid}"
        case DeployRenew(token):
            return f"deploy renew {token}"
        case DeployStep(token, server, step):
            return f"deploy step {token} {server} {step.value}"
        case DeployHost(token, server, result, reason):
            return f"deploy host {token} {server} {result.value} {reason}".rstrip()
        case DeployEnd(token, result, reason):
            return f"deploy end {token} {result.value} {reason}".rstrip()
        case _:
            assert_never(command)
