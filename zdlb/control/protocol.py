"""The control socket's wire protocol: one command line in, one command object out; replies out.

Sans-IO, like h11: ``parse_command`` takes the bytes of one line and returns a frozen command
object (or raises ``ControlUsageError``, and nothing changes); the ``render_*`` functions build
reply text and ``frame`` turns it into the bytes a client reads. ``control/server.py`` only
moves lines; it never looks inside them. No I/O, no clock, no event loop, no logging here.

Grammar (HAProxy runtime API style: lowercase keywords, case-sensitive; words separated by runs
of spaces or tabs, leading and trailing blanks ignored)::

    [json] help
    [json] show info
    [json] show backends
    [json] show servers [BACKEND] [--fleet]
    [json] set server BACKEND/SERVER state ready|drain|maint
    [json] set server BACKEND/SERVER weight 0..256
    [json] wait BACKEND/SERVER idle|up [TIMEOUT_S]
    [json] flip BACKEND/SERVER [force | wait TIMEOUT_S]
    [json] show deploy
    [json] deploy begin BACKEND to main|backup pid PID [SERVER...]
    [json] deploy takeover pid PID
    [json] deploy renew TOKEN
    [json] deploy step TOKEN SERVER STEP
    [json] deploy host TOKEN SERVER done|failed|rolled-back [REASON...]
    [json] deploy end TOKEN done|failed|interrupted|rolled-back [REASON...]

The ``deploy`` commands are ``zdlb deploy``'s (zdlb/deploy/): a lock with a lease, and the
progress the daemon journals and shows in ``show deploy``.

A reply is UTF-8 text lines and always ends with a line that is exactly empty, so a client reads
lines until it sees ``""``. Reply bodies never contain an empty line (``frame`` drops them).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, assert_never

from zdlb.balancer.server import AdminState
from zdlb.config.model import MAX_WEIGHT
from zdlb.control.deploy_protocol import (
    DEPLOY_HELP_ROWS,
    DeployBegin,
    DeployCommand,
    DeployEnd,
    DeployHost,
    DeployRenew,
    DeployStep,
    DeployTakeover,
    format_deploy,
    parse_deploy,
)
from zdlb.control.words import clip as _clip
from zdlb.control.words import expect_end as _expect_end
from zdlb.control.words import name as _name
from zdlb.control.words import shown as _shown
from zdlb.errors import ControlUsageError

# Commands are a few dozen bytes; the longest legal one is two names and a keyword. A bound keeps
# a hostile or broken client from growing a line buffer without limit: the server reads at most
# MAX_LINE_BYTES plus the line terminator ("\r\n") before it gives up on the line.
MAX_LINE_BYTES = 4096

# Long enough for a drain behind a typical keep-alive idle timeout (HAProxy and nginx default to
# tens of seconds) without a forgotten `wait` holding its connection for long.
DEFAULT_WAIT_TIMEOUT_S = 30.0
# An hour outlasts any sane drain; past it the operator's script is stuck, not the server busy.
MAX_WAIT_TIMEOUT_S = 3600.0


_BLANKS_RE = re.compile(r"[ \t]+")
# C0 controls except tab (a word separator), DEL and C1 controls: none belongs in a command, and
# echoing them back into a reply or a log would let a client forge lines or terminal escapes.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# ASCII only: int() and float() would also take "1_000", "١٢" or "nan".
_INT_RE = re.compile(r"[+-]?[0-9]+")
_SECONDS_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_INT_DIGITS = 9  # more digits than this is out of any range here; skip converting it


@dataclass(frozen=True, slots=True)
class Help:
    """``help``: list every command."""


@dataclass(frozen=True, slots=True)
class ShowInfo:
    """``show info``: process-wide facts (version, uptime, listeners)."""


@dataclass(frozen=True, slots=True)
class ShowBackends:
    """``show backends``: one row per backend."""


@dataclass(frozen=True, slots=True)
class ShowServers:
    """``show servers [BACKEND] [--fleet]``: one row per server, of one backend or (``None``)
    of all; ``fleet``: every instance's view side by side (``[cluster]``)."""

    backend: str | None = None
    fleet: bool = False


@dataclass(frozen=True, slots=True)
class SetServerState:
    """``set server BACKEND/SERVER state ready|drain|maint``."""

    backend: str
    server: str
    state: AdminState


@dataclass(frozen=True, slots=True)
class SetServerWeight:
    """``set server BACKEND/SERVER weight N``: runtime weight, 0..256 (0 takes no new requests)."""

    backend: str
    server: str
    weight: int


@dataclass(frozen=True, slots=True)
class WaitIdle:
    """``wait BACKEND/SERVER idle [TIMEOUT_S]``: reply once the server has nothing in flight.

    ``timeout_s`` is in seconds, > 0 and <= ``MAX_WAIT_TIMEOUT_S``.
    """

    backend: str
    server: str
    timeout_s: float = DEFAULT_WAIT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class WaitUp:
    """``wait BACKEND/SERVER up [TIMEOUT_S]``: reply once the server passes its checks: health
    up, and ``rise`` passes of probes started after the wait began (at once if unchecked).

    ``timeout_s`` is in seconds, > 0 and <= ``MAX_WAIT_TIMEOUT_S``.
    """

    backend: str
    server: str
    timeout_s: float = DEFAULT_WAIT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Flip:
    """``flip BACKEND/SERVER [force | wait TIMEOUT_S]``: the host's other version takes its
    traffic, or gives it back. SERVER names either member of a main/backup pair.

    ``wait_s``: if the member taking over fails its checks, wait up to that many seconds for
    it to pass them (as ``wait ... up``) instead of refusing at once.
    """

    backend: str
    server: str
    force: bool = False
    wait_s: float | None = None


@dataclass(frozen=True, slots=True)
class Swap:
    """``swap BACKEND``: blue/green, every main server becomes a backup and every backup main."""

    backend: str


@dataclass(frozen=True, slots=True)
class ShowStatus:
    """``show status``: the status page's document (``/status.json``): per backend and host,
    which member serves, its users, each member's state and load, the latest events."""


@dataclass(frozen=True, slots=True)
class ShowDeploy:
    """``show deploy``: the current or last deploy, its hosts and steps, and its lock."""


@dataclass(frozen=True, slots=True)
class Reload:
    """``reload``: read the config file again and apply it (daemon/reload.py); answered once
    applied, with what changed, or with every error and nothing applied."""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """``upgrade``: start a new zdlb process from the installed code, hand it the listening
    sockets and the control socket, drain this one (daemon/upgrade.py)."""


Command: TypeAlias = (
    Reload
    | Upgrade
    | Help
    | ShowInfo
    | ShowBackends
    | ShowServers
    | SetServerState
    | SetServerWeight
    | Flip
    | Swap
    | WaitIdle
    | WaitUp
    | ShowDeploy
    | ShowStatus
    | DeployCommand
)

_STATES = "|".join(state.value for state in AdminState)
_HELP_ROWS: tuple[tuple[str, str], ...] = (
    ("help", "this list"),
    ("show info", "version, uptime and listeners"),
    ("show backends", "one line per backend"),
    (
        "show servers [BACKEND] [--fleet]",
        "one line per server, of one backend or of all (--fleet: every instance's view)",
    ),
    (f"set server BACKEND/SERVER state {_STATES}", "change a server's admin state"),
    (f"set server BACKEND/SERVER weight 0..{MAX_WEIGHT}", "change a server's weight"),
    (
        "flip BACKEND/SERVER [force | wait TIMEOUT_S]",
        "a main with a pair: to maint, its pair takes its traffic; again: back (force: even "
        "if the one taking over fails its checks; wait: until it passes them, at most "
        "TIMEOUT_S)",
    ),
    ("swap BACKEND", "blue/green: exchange the main and backup pools"),
    (
        "wait BACKEND/SERVER idle|up [TIMEOUT_S]",
        f"reply once no request is in flight and no connection open (idle), or once the "
        f"server passed 'rise' checks started after the wait began (up) (timeout: default "
        f"{DEFAULT_WAIT_TIMEOUT_S:g} s, at most {MAX_WAIT_TIMEOUT_S:g} s)",
    ),
    ("show deploy", "the current or last deploy: its hosts, their steps, who holds its lock"),
    *DEPLOY_HELP_ROWS,
    ("reload", "read the config file again and apply it; nothing changes if it has an error"),
    ("upgrade", "start a new zdlb from the installed code, hand it the sockets, drain this one"),
    ("show status", "per host: who serves, its users, each member; JSON: the status page's"),
)

USAGE: tuple[str, ...] = tuple(f"usage: {syntax}" for syntax, _ in _HELP_ROWS)
"""One ``usage: ...`` line per command form, in help order."""

(
    _USAGE_HELP,
    _USAGE_SHOW_INFO,
    _USAGE_SHOW_BACKENDS,
    _USAGE_SHOW_SERVERS,
    _USAGE_SET_STATE,
    _USAGE_SET_WEIGHT,
    _USAGE_FLIP,
    _USAGE_SWAP,
    _USAGE_WAIT,
) = USAGE[:9]
_USAGE_SHOW_DEPLOY = USAGE[9]
_USAGE_SHOW_STATUS = "usage: show status"
_USAGE_RELOAD = "usage: reload"
_USAGE_UPGRADE = "usage: upgrade"
_USAGE_ALL = "\n".join(USAGE)
_USAGE_SHOW = "\n".join(
    (
        _USAGE_SHOW_INFO,
        _USAGE_SHOW_BACKENDS,
        _USAGE_SHOW_SERVERS,
        _USAGE_SHOW_DEPLOY,
        _USAGE_SHOW_STATUS,
    )
)
_USAGE_SET = "\n".join((_USAGE_SET_STATE, _USAGE_SET_WEIGHT))


def help_text() -> str:
    """The reply to ``help``: every command with one line of description, ending in ``\\n``."""
    intro = "commands (prefix any with 'json' for a JSON reply):\n"
    return intro + render_table(("command", "description"), _HELP_ROWS)


# --- parsing -------------------------------------------------------------------------------------


def parse_command(line: bytes) -> tuple[Command, bool]:
    """Parse one command line into ``(command, as_json)``.

    ``line`` may end with one ``"\\n"`` or ``"\\r\\n"``; without it, it must be valid UTF-8 free
    of control characters (tab separates words) and at most ``MAX_LINE_BYTES`` long.

    Raises ``ControlUsageError`` (and only that, whatever the bytes) for an empty, overlong,
    undecodable, unknown or malformed command; its ``usage`` holds the ``usage:`` lines of the
    command family concerned, or every usage line when no family is recognisable.
    """
    words = _split_words(line)
    as_json = words[0] == "json"
    if as_json:
        words = words[1:]
        if not words:
            raise ControlUsageError("missing command after 'json'", _USAGE_ALL)
    match words[0]:
        case "help":
            _expect_end(words, 1, _USAGE_HELP)
            return Help(), as_json
        case "reload":
            _expect_end(words, 1, _USAGE_RELOAD)
            return Reload(), as_json
        case "upgrade":
            _expect_end(words, 1, _USAGE_UPGRADE)
            return Upgrade(), as_json
        case "show":
            return _parse_show(words), as_json
        case "set":
            return _parse_set(words), as_json
        case "wait":
            return _parse_wait(words), as_json
        case "flip":
            return _parse_flip(words), as_json
        case "deploy":
            return parse_deploy(words), as_json
        case "swap":
            if len(words) < 2:
                raise ControlUsageError("missing BACKEND", _USAGE_SWAP)
            _expect_end(words, 2, _USAGE_SWAP)
            return Swap(_name(words[1], "backend", _USAGE_SWAP)), as_json
        case word:
            raise ControlUsageError(f"unknown command {_shown(word)}", _USAGE_ALL)


def wants_json(line: bytes) -> bool:
    """Whether ``line`` starts with the word ``json``, even if the rest fails to parse.

    Lets the server answer a usage error in the format the client asked for. Never raises.
    """
    head = line[:16].lstrip(b" \t")
    return head.startswith(b"json") and head[4:5] in (b"", b" ", b"\t", b"\r", b"\n")


def _split_words(line: bytes) -> list[str]:
    """Check the line as a whole (length, encoding, characters) and split it into words."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if len(line) > MAX_LINE_BYTES:
        raise ControlUsageError(f"command longer than {MAX_LINE_BYTES} bytes", _USAGE_ALL)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlUsageError(
            f"command is not valid UTF-8 (bad byte at offset {exc.start})", _USAGE_ALL
        ) from None
    control = _CONTROL_RE.search(text)
    if control is not None:
        raise ControlUsageError(
            f"control character U+{ord(control.group()):04X} at offset {control.start()}",
            _USAGE_ALL,
        )
    words = _BLANKS_RE.split(text.strip(" \t"))
    if words == [""]:
        raise ControlUsageError("empty command", _USAGE_ALL)
    return words


def _parse_show(words: list[str]) -> Command:
    if len(words) < 2:
        raise ControlUsageError("missing what to show", _USAGE_SHOW)
    match words[1]:
        case "info":
            _expect_end(words, 2, _USAGE_SHOW_INFO)
            return ShowInfo()
        case "backends":
            _expect_end(words, 2, _USAGE_SHOW_BACKENDS)
            return ShowBackends()
        case "servers":
            fleet = "--fleet" in words[2:]
            if fleet:
                words = [word for word in words if word != "--fleet"]
            if len(words) == 2:
                return ShowServers(None, fleet)
            _expect_end(words, 3, _USAGE_SHOW_SERVERS)
            return ShowServers(_name(words[2], "backend", _USAGE_SHOW_SERVERS), fleet)
        case "deploy":
            _expect_end(words, 2, _USAGE_SHOW_DEPLOY)
            return ShowDeploy()
        case "status":
            _expect_end(words, 2, _USAGE_SHOW_STATUS)
            return ShowStatus()
        case word:
            raise ControlUsageError(f"unknown command 'show {_clip(word)}'", _USAGE_SHOW)


def _parse_set(words: list[str]) -> Command:
    if len(words) < 2:
        raise ControlUsageError("missing what to set", _USAGE_SET)
    if words[1] != "server":
        raise ControlUsageError(f"unknown command 'set {_clip(words[1])}'", _USAGE_SET)
    if len(words) < 3:
        raise ControlUsageError("missing BACKEND/SERVER", _USAGE_SET)
    backend, server = _target(words[2], _USAGE_SET)
    if len(words) < 4:
        raise ControlUsageError("missing 'state' or 'weight'", _USAGE_SET)
    match words[3]:
        case "state":
            return SetServerState(backend, server, _state(words))
        case "weight":
            return SetServerWeight(backend, server, _weight(words))
        case word:
            message = f"unknown field {_shown(word)}: expected 'state' or 'weight'"
            raise ControlUsageError(message, _USAGE_SET)


def _state(words: list[str]) -> AdminState:
    expected = "expected " + ", ".join(state.value for state in AdminState)
    if len(words) < 5:
        raise ControlUsageError(f"missing state: {expected}", _USAGE_SET_STATE)
    states = [state for state in AdminState if state.value == words[4]]
    if not states:
        message = f"unknown state {_shown(words[4])}: {expected}"
        raise ControlUsageError(message, _USAGE_SET_STATE)
    _expect_end(words, 5, _USAGE_SET_STATE)
    return states[0]


def _weight(words: list[str]) -> int:
    if len(words) < 5:
        raise ControlUsageError("missing weight", _USAGE_SET_WEIGHT)
    word = words[4]
    if not _INT_RE.fullmatch(word):
        raise ControlUsageError(f"weight {_shown(word)} is not an integer", _USAGE_SET_WEIGHT)
    if len(word) > _MAX_INT_DIGITS or not 0 <= int(word) <= MAX_WEIGHT:
        message = f"weight {_clip(word)} is out of range 0..{MAX_WEIGHT}"
        raise ControlUsageError(message, _USAGE_SET_WEIGHT)
    _expect_end(words, 5, _USAGE_SET_WEIGHT)
    return int(word)


def _parse_flip(words: list[str]) -> Command:
    if len(words) < 2:
        raise ControlUsageError("missing BACKEND/SERVER", _USAGE_FLIP)
    backend, server = _target(words[1], _USAGE_FLIP)
    if len(words) == 2:
        return Flip(backend, server)
    if words[2] == "wait":
        if len(words) < 4:
            raise ControlUsageError("missing TIMEOUT_S after 'wait'", _USAGE_FLIP)
        wait_s = _timeout_s(words[3], _USAGE_FLIP)
        _expect_end(words, 4, _USAGE_FLIP)
        return Flip(backend, server, wait_s=wait_s)
    if words[2] != "force":
        message = f"unknown option {_shown(words[2])}: expected 'force' or 'wait'"
        raise ControlUsageError(message, _USAGE_FLIP)
    _expect_end(words, 3, _USAGE_FLIP)
    return Flip(backend, server, force=True)


def _parse_wait(words: list[str]) -> Command:
    if len(words) < 2:
        raise ControlUsageError("missing BACKEND/SERVER", _USAGE_WAIT)
    backend, server = _target(words[1], _USAGE_WAIT)
    if len(words) < 3:
        raise ControlUsageError("missing condition: expected 'idle' or 'up'", _USAGE_WAIT)
    kind: type[WaitIdle | WaitUp]
    match words[2]:
        case "idle":
            kind = WaitIdle
        case "up":
            kind = WaitUp
        case word:
            message = f"unknown condition {_shown(word)}: expected 'idle' or 'up'"
            raise ControlUsageError(message, _USAGE_WAIT)
    if len(words) == 3:
        return kind(backend, server)
    timeout_s = _timeout_s(words[3])
    _expect_end(words, 4, _USAGE_WAIT)
    return kind(backend, server, timeout_s)


def _timeout_s(word: str, usage: str = _USAGE_WAIT) -> float:
    if not _SECONDS_RE.fullmatch(word):
        message = f"timeout {_shown(word)} is not a number of seconds"
        raise ControlUsageError(message, usage)
    timeout_s = float(word)  # a huge exponent gives inf, which the range check refuses
    if not 0 < timeout_s <= MAX_WAIT_TIMEOUT_S:
        message = f"timeout {_clip(word)} must be > 0 and <= {MAX_WAIT_TIMEOUT_S:g} seconds"
        raise ControlUsageError(message, usage)
    return timeout_s


def _target(word: str, usage: str) -> tuple[str, str]:
    """Split ``BACKEND/SERVER`` at its first slash and check both names."""
    backend, slash, server = word.partition("/")
    if not slash:
        raise ControlUsageError(f"expected BACKEND/SERVER, got {_shown(word)}", usage)
    return _name(backend, "backend", usage), _name(server, "server", usage)


def format_command(command: Command) -> str:
    """The canonical text of ``command``, without ``json``: ``parse_command`` reads it back.

    For logs and for clients that build command lines.
    """
    match command:
        case Reload():
            return "reload"
        case Upgrade():
            return "upgrade"
        case Help():
            return "help"
        case ShowInfo():
            return "show info"
        case ShowStatus():
            return "show status"
        case ShowBackends():
            return "show backends"
        case ShowServers(backend=None, fleet=fleet):
            return "show servers --fleet" if fleet else "show servers"
        case ShowServers(backend=backend, fleet=fleet):
            return f"show servers {backend}" + (" --fleet" if fleet else "")
        case SetServerState(backend, server, state):
            return f"set server {backend}/{server} state {state.value}"
        case SetServerWeight(backend, server, weight):
            return f"set server {backend}/{server} weight {weight}"
        case WaitIdle(backend, server, timeout_s):
            return f"wait {backend}/{server} idle {timeout_s!r}"
        case WaitUp(backend, server, timeout_s):
            return f"wait {backend}/{server} up {timeout_s!r}"
        case Flip(backend, server, force, wait_s):
            option = " force" if force else "" if wait_s is None else f" wait {wait_s!r}"
            return f"flip {backend}/{server}{option}"
        case Swap(backend):
            return f"swap {backend}"
        case ShowDeploy():
            return "show deploy"
        case (
            DeployBegin()
            | DeployTakeover()
            | DeployRenew()
            | DeployStep()
            | DeployHost()
            | DeployEnd()
        ):
            return format_deploy(command)
        case _:
            assert_never(command)


# --- replies -------------------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing spaces, one ``\\n`` per line.

    Cells are shown with ``str``, except ``None`` as ``-`` and enum members as their value.
    Cells must not contain newlines. Raises ``ValueError`` if a row's length is not the
    header's.
    """
    cells = [list(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, headers have {len(headers)}: {row!r}")
        cells.append([_cell(value) for value in row])
    widths = [max(len(line[column]) for line in cells) for column in range(len(headers))]
    lines = (
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    )
    return "".join(line.rstrip(" ") + "\n" for line in lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def render_json(value: object) -> str:
    """Compact JSON with sorted keys and a final ``\\n``; enum members become their value.

    Raises ``TypeError`` for values JSON cannot hold and ``ValueError`` for NaN or infinity
    (which would make the reply invalid JSON for ``jq`` and friends).
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
    )
    return text + "\n"


def _json_default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def render_error(message: str, usage: str) -> str:
    """Text error reply: ``error: MESSAGE``, then the usage line(s) unless ``usage`` is empty."""
    text = f"error: {message}\n"
    return text + f"{usage}\n" if usage else text


def render_json_error(message: str, usage: str) -> str:
    """JSON error reply: ``{"error": MESSAGE, "usage": USAGE}`` (``usage`` may be ``""``)."""
    return render_json({"error": message, "usage": usage})


def frame(text: str) -> bytes:
    """Encode a reply body as UTF-8 and end it with the empty line that marks its end.

    Blank lines inside ``text`` are dropped, since a client would take the first for the end of
    the reply; a final ``\\n`` is added if missing. A body with content therefore ends with
    ``\\n\\n`` exactly once; an empty body is the terminator alone (``b"\\n"``). Characters UTF-8
    cannot encode (lone surrogates) become ``?`` rather than failing the reply.
    """
    lines = [line for line in text.split("\n") if line.strip()]
    body = "".join(line + "\n" for line in lines)
    return (body + "\n").encode("utf-8", errors="replace")
