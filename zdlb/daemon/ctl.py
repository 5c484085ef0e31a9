"""``zdlb ctl``: send one command line to the control socket, print the framed answer.

Blocking sockets on purpose: a one-shot client with a deadline, no event loop needed. The
exit status says whether the daemon answered an error (an answer starting with "error:", or a
JSON object with an "error" key), so scripts can chain commands with ``&&``.

It must start fast: ``zdlb ctl show info`` took a median 178 ms (151-220) when the whole
daemon was imported first, 80 ms (64-174, on a shared 2-core box) with only this module,
argparse and (for ``-c``) config/load.py, through daemon/entry.py (benchmarks/ctl_latency.py,
20 runs each). So nothing here imports asyncio, uvloop, prometheus_client, h11
or any part of the data plane; tests/daemon/test_ctl_speed.py checks it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered an error, or could not be reached
EXIT_CONFIG = 2  # the config names no control socket, or is invalid (as `zdlb check`)
# `zdlb ctl` waits this long for an answer; `wait ... idle T` gets T more.
CTL_TIMEOUT_S = 10.0
CTL_HELP = "send one command to a running zdlb's control socket"
CTL_DESCRIPTION = (
    "Send COMMAND to the control socket and print the answer; "
    "`zdlb ctl -c FILE help` lists the commands. Exit 1 if the daemon answers an error."
)


def add_ctl_arguments(ctl: argparse.ArgumentParser) -> None:
    """``zdlb ctl``'s options, for cli.py's subcommand and ``ctl_parser`` alike."""
    where = ctl.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", type=Path, metavar="FILE", help="find the socket here")
    where.add_argument("-s", "--socket", type=Path, metavar="PATH", help="the socket itself")
    ctl.add_argument("--json", action="store_true", help="ask for a JSON answer")
    # issue 16: `show servers --fleet` (argparse would take --fleet as an option of its own).
    ctl.add_argument("--fleet", action="store_true", help="show servers: every instance's view")
    ctl.add_argument(
        "--timeout", type=float, default=CTL_TIMEOUT_S, metavar="S", help="give up after S s"
    )
    ctl.add_argument("words", nargs="+", metavar="COMMAND", help="e.g. show servers")


def ctl_parser() -> argparse.ArgumentParser:
    """``zdlb ctl`` alone: the same options and messages as cli.py's subcommand."""
    parser = argparse.ArgumentParser(prog="zdlb ctl", description=CTL_DESCRIPTION)
    add_ctl_arguments(parser)
    return parser


def run_ctl_command(args: argparse.Namespace) -> int:
    """Parsed ``zdlb ctl`` arguments: find the socket (``-s``, or the config's), run the
    command; the exit status."""
    path: Path | None = args.socket
    if path is None:
        path = _socket_of(args.config)
        if path is None:
            return EXIT_CONFIG
    words = [*args.words, "--fleet"] if args.fleet else args.words
    return run_ctl(path, words, as_json=args.json, timeout_s=args.timeout)


def _socket_of(config_path: Path) -> Path | None:
    """The control socket ``config_path`` names; None after printing why there is none.

    A config with errors elsewhere still names the running daemon's socket: the operator who
    broke the file must still be able to ask the daemon (``reload`` then answers with every
    error and its key path). Only ``[control] socket`` is read from such a file, and only a
    non-empty string is taken.
    """
    from zdlb.config.load import load_config, resolve_path  # pure: TOML and dataclasses only
    from zdlb.errors import ConfigError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        value = _raw_socket(config_path)
        if value is None:
            print(f"zdlb: invalid config {exc}", file=sys.stderr)
            return None
        return resolve_path(config_path.absolute().parent, value)
    if config.control.socket is None:
        print(f"zdlb: {config.source} configures no [control] socket", file=sys.stderr)
    return config.control.socket


def _raw_socket(config_path: Path) -> str | None:
    import tomllib

    try:
        with config_path.open("rb") as file:
            control = tomllib.load(file).get("control")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    value = control.get("socket") if isinstance(control, dict) else None
    return value if isinstance(value, str) and value and "\0" not in value else None


_END = b"\n\n"  # every answer ends with an empty line (control/protocol.py frame())
_MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a `show servers` of thousands of servers fits


def run_ctl(path: Path, words: Sequence[str], *, as_json: bool, timeout_s: float) -> int:
    """Send ``words`` as one command; print the answer; return the exit status."""
    if words and words[0] == "json":  # `zdlb ctl ... json show servers` asks the same
        as_json, words = True, words[1:]
    line = ("json " if as_json else "") + " ".join(words)
    deadline_s = timeout_s + _wait_timeout_s(words)
    try:
        answer = _exchange(path, line.encode() + b"\n", deadline_s)
    except OSError as exc:
        print(f"zdlb ctl: cannot talk to {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except TimeoutError:
        print(f"zdlb ctl: no answer from {path} within {deadline_s:g} s", file=sys.stderr)
        return EXIT_ERROR
    if not answer.endswith(_END):
        print(f"zdlb ctl: {path} closed before a complete answer", file=sys.stderr)
        return EXIT_ERROR
    text = answer.decode("utf-8", "replace").rstrip("\n")  # the framing's empty line
    is_error = _is_error(text, as_json)
    print(text, file=sys.stderr if is_error else sys.stdout)
    return EXIT_ERROR if is_error else EXIT_OK


def _exchange(path: Path, request: bytes, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(request)
        answer = bytearray()
        while not answer.endswith(_END):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk or len(answer) + len(chunk) > _MAX_ANSWER_BYTES:
                break  # closed early, or an answer no daemon sends: print what came
            answer += chunk
    return bytes(answer)


# `upgrade` answers once the new process serves, which it may take up to 20 s to say
# (daemon/upgrade.py READY_TIMEOUT_S; not imported: that module pulls in the daemon).
UPGRADE_WAIT_S = 20.0


def _wait_timeout_s(words: Sequence[str]) -> float:
    """`wait B/S idle|up [T]` and `flip B/S wait T` take up to T seconds (a wait's default:
    30) before they answer; `upgrade` up to UPGRADE_WAIT_S."""
    if list(words) == ["upgrade"]:
        return UPGRADE_WAIT_S
    if len(words) >= 3 and words[0] == "wait" and words[2] in ("idle", "up"):
        text = words[3] if len(words) > 3 else "30"
    elif len(words) >= 4 and words[0] == "flip" and words[2] == "wait":
        text = words[3]
    else:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        return 0.0  # the daemon will answer with the usage at once
    return seconds if 0 < seconds <= 3600 else 0.0


def _is_error(text: str, as_json: bool) -> bool:
    if as_json:
        try:
            value = json.loads(text)
        except ValueError:
            return True
        return isinstance(value, dict) and "error" in value
    return text.startswith("error:")
