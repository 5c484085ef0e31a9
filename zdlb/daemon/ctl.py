"""``zdlb ctl``: send one command line to the control socket, print the framed answer.

Blocking sockets on purpose: a one-shot client with a deadline, no event loop needed. The
exit status says whether the daemon answered an error (an answer starting with "error:", or a
JSON object with an "error" key), so scripts can chain commands with ``&&``.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered an error, or could not be reached
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


def _wait_timeout_s(words: Sequence[str]) -> float:
    """`wait B/S idle|up [T]` and `flip B/S wait T` take up to T seconds (a wait's default:
    30) before they answer."""
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
