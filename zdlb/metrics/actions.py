"""The status page's write actions (flip, drain, ready): who may ask, and what they ask.

Off unless ``[metrics] admin = true``, which config/load.py accepts only with a loopback
``listen``: whoever can connect to a loopback port runs on the host already. Even then, a web
page the operator visits in another tab can make their browser send requests to
127.0.0.1:9100 (cross-site request forgery, and DNS rebinding, where a foreign name resolves
to 127.0.0.1). So a request is refused unless *all* of these hold, each defeating one trick:

1. ``POST``: a link, an ``<img>`` or a redirect cannot send one;
2. the ``X-Zdlb-Action: 1`` header: a cross-site HTML form cannot set headers, and a
   cross-site ``fetch`` with a custom header needs a CORS preflight that this endpoint never
   grants (it answers no ``OPTIONS`` and sends no ``Access-Control-*``);
3. ``Host`` is a loopback address (DNS rebinding sends the attacker's name as Host);
4. ``Origin``, when the browser sends one, is ``http://`` + that Host (same origin);
5. ``Content-Type: application/json`` and a body of ``{"action": ..., "server": "B/S"}``.

Then the action runs as the control socket's command would (logged, journaled, on the
timeline). Pure: no I/O; the endpoint moves the bytes and daemon glue runs the command.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from dataclasses import dataclass

from zdlb.config.address import parse_address

ACTION_HEADER = b"x-zdlb-action"
# A body is one small JSON object; a backend/server name is at most a few hundred bytes.
MAX_ACTION_BODY_BYTES = 1024


class ActionKind(enum.Enum):
    FLIP = "flip"  # as `zdlb ctl flip B/S` (refused if the member taking over fails its checks)
    DRAIN = "drain"  # as `set server B/S state drain`
    READY = "ready"  # as `set server B/S state ready`


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    backend: str
    server: str


class ActionRefused(Exception):
    """A write request this endpoint will not run: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_request(method: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Rules 1-4 on a request's method and (lower-cased) headers. Raises ActionRefused."""
    if method != b"POST":
        raise ActionRefused(405, "actions are POST requests")
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in fields:  # two Hosts or two Origins: refuse rather than pick one
            raise ActionRefused(400, f"repeated {name.decode('latin-1')} header")
        fields[name] = value
    if fields.get(ACTION_HEADER) != b"1":
        raise ActionRefused(403, "missing X-Zdlb-Action: 1 header")
    host = fields.get(b"host", b"").decode("latin-1")
    if not _is_loopback_host(host):
        raise ActionRefused(403, f"Host {host!r} is not a loopback address")
    origin = fields.get(b"origin")
    if origin is not None and origin.decode("latin-1") != f"http://{host}":
        raise ActionRefused(403, "cross-origin request")
    content_type = fields.get(b"content-type", b"").partition(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise ActionRefused(415, "the body must be application/json")


def parse_action(body: bytes) -> Action:
    """Rule 5: the action a body asks for. Raises ActionRefused (400) for anything else."""
    if len(body) > MAX_ACTION_BODY_BYTES:
        raise ActionRefused(413, f"body over {MAX_ACTION_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ActionRefused(400, "the body is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"action", "server"}:
        raise ActionRefused(400, 'expected {"action": ..., "server": "BACKEND/SERVER"}')
    action, target = data["action"], data["server"]
    kinds = ", ".join(kind.value for kind in ActionKind)
    if not isinstance(action, str) or action not in {kind.value for kind in ActionKind}:
        raise ActionRefused(400, f"action must be one of {kinds}")
    if not isinstance(target, str) or target.count("/") != 1 or "" in target.split("/"):
        raise ActionRefused(400, "server must be BACKEND/SERVER")
    backend, server = target.split("/")
    return Action(ActionKind(action), backend, server)


def _is_loopback_host(host: str) -> bool:
    """Is a Host header value ``IP[:port]`` with a loopback IP ("localhost" is a name: a
    rebinding attacker's name is one too, so names are refused)."""
    try:
        return ipaddress.ip_address(parse_address(host, is_bind=True).host).is_loopback
    except ValueError:  # not IP:port (parse_address), or not an IP (ip_address)
        return False
