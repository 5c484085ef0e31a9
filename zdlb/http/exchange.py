"""One HTTP exchange (a request and its answer) as plain state and pure decisions.

http/connection.py's ``ClientConnection`` holds at most one ``Exchange`` at a time and applies
what the functions below decide; nothing here does I/O, reads a clock or logs. The decisions
are taken at a few known points of an exchange (its head, its server's answer or failure, its
end), never per chunk or per header, so each costs one call on the hot path.

The rules:

1. **Phases.** A client connection is ``IDLE`` (keep-alive, deadline ``client_s``), receives a
   ``HEAD`` (deadline ``http_request_s``), runs an ``EXCHANGE`` (deadline ``server_s``, re-armed
   by every byte either way), and ends ``CLOSING`` (its last answer written) or ``TUNNEL`` (after
   a ``101``, a pump owns both sockets). Reading pauses for the reasons ``PAUSED_*``; it resumes
   when none is left.
2. **Keep-alive** (``keeps_alive``): the client connection stays open after an answer only if
   the request asked to persist (RFC 9112 section 9.3), was read whole, the answer's framing
   lets the client find its end (not close-delimited), zdlb is not stopping, the client did
   not half-close, and no byte followed an upgrade request that was not switched (those bytes
   may be the other protocol's and are never parsed as HTTP).
3. **Reuse** (``may_reuse``): an idle pooled upstream connection served other clients. Under
   ``safe`` (HAProxy's default ``http-reuse safe``) a client connection's first request gets a
   connection of its own, so a server's stray answer can only reach the client that caused it;
   ``always`` pools first requests too; ``never`` pools nothing. An upgrade always gets a fresh
   connection: if the server switches, the connection leaves the pool for good.
4. **Replay** (``replay_after_loss``): a request whose upstream connection closed before any
   byte of answer is sent again only if it is idempotent (RFC 9110 section 9.2.2) and still
   held whole. On a pooled connection the server most likely closed it idle as zdlb reused it:
   once, on a fresh connection to the same server. On a fresh one the server took the request
   and died: another server, as a connect failure is (rule 5).
5. **Retry target** (``retry_target``): after a failed connect, or a fresh connection lost
   before answering, another server within ``retries``: the failed one's pair first (the same
   host's other version, so a sticky user stays on its host), else a balanced pick among the
   servers not tried yet.
6. **Statuses** (``status_for_upstream_failure``): zdlb answers 503 when no server is usable,
   504 when a server took longer than ``server_s`` to answer, 502 for every other server
   failure (refused, reset, garbage, a connect that timed out); a client's protocol error
   carries its own status (400, 408, 414, 431, 501, 505).
7. **Waits** (``request_deadline``): a connection that never sent a byte gets 408 at
   ``http_request_s``, as one whose head is incomplete; an idle keep-alive connection is closed
   without a word at ``client_s`` (its client may be about to send: HAProxy's `http-keep-alive`).
   A request waiting for a server slot gets 503 with ``Retry-After`` at ``queue_s``. While
   zdlb reads a request body (not paused by the server), the client must send a byte at least
   every ``client_body_s`` and, after the body's first ``client_body_s``, average at least
   ``min_body_rate`` bytes a second (Apache's mod_reqtimeout rule: each ``min_body_rate`` bytes
   buy one more second); else 408, or a close if the answer already began.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from zdlb.config.model import Reuse
from zdlb.errors import UpstreamError, UpstreamTimeout
from zdlb.http.head import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    import asyncio

    from zdlb.balancer.queue import Ticket
    from zdlb.balancer.server import Server
    from zdlb.http.head import RequestHead
    from zdlb.http.upstream import UpstreamConnection


class Phase(enum.Enum):
    IDLE = "idle"  # keep-alive, waiting for a request: deadline client_s
    HEAD = "head"  # a request head is arriving: deadline http_request_s
    EXCHANGE = "exchange"  # a request is being forwarded or answered: deadline server_s
    CLOSING = "closing"  # the last answer is written; the connection closes after it
    TUNNEL = "tunnel"  # switched protocols: a Pump owns both sockets; idle deadline tunnel_s


# The phases as module constants, for the hot path. Reading a member as an attribute of its Enum
# class costs ~60 ns on CPython 3.11 (EnumType.__getattr__ keeps the lookup from being
# specialised; 3.12 dropped it), a module global ~3 ns, and a keep-alive request tests its phase
# ~10 times. `match` statements keep the dotted names (a bare name there is a capture).
IDLE, IN_HEAD, IN_EXCHANGE, CLOSING, TUNNEL = Phase


# Why reading from the client is paused (bits of one int); reading resumes when none is left.
# Plain ints, not an IntFlag: enum arithmetic cost ~1.5 us per request in cProfile.
PAUSED_UPSTREAM_FULL = 1  # the server's socket buffer is full
PAUSED_CONNECTING = 2  # too many request bytes held while the server connection opens
PAUSED_NEXT_REQUEST = 4  # the reader holds bytes past a request still being answered
PAUSED_DETOUR = 8  # a body is spliced, or a 101 is being switched: the transport must not read

# Request bytes held while the upstream connection is being opened, before the client is
# paused: a whole typical request fits, a large upload waits for the connect.
MAX_PENDING_BYTES = 65536
# A request is replayed on a fresh connection only if all its bytes are still held.
MAX_REPLAY_BYTES = 65536


class Replay(enum.Enum):
    """What to do with a request whose upstream connection closed before any answer."""

    NO = "no"  # answer 502
    SAME_SERVER = "same_server"  # a fresh connection to the same server (a stale pooled one)
    OTHER_SERVER = "other_server"  # retry_target, as after a failed connect


class Exchange:
    """The state of one request and its answer. Created when a request head is accepted,
    dropped when its answer ends; the connection reads and writes these slots directly."""

    __slots__ = (
        "body_bytes_base",
        "body_deadline_base",
        "bytes_out",
        "connect_task",
        "identity",
        "is_chunked_down",
        "is_chunked_up",
        "keep_alive",
        "replay",
        "replay_bytes",
        "request",
        "request_done",
        "response_started",
        "retried_stale",
        "server",
        "set_cookie",
        "splice_request",
        "splice_response",
        "started_at",
        "status",
        "ticket",
        "tried",
        "ubuf",
        "ubuf_bytes",
        "upstream",
    )

    def __init__(self, request: RequestHead, started_at: float) -> None:
        self.request = request
        self.started_at = started_at  # time.monotonic(): uvloop's loop.time() ticks in ms
        self.server: Server | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.ubuf: list[bytes] = []  # bytes for the server not written yet
        self.ubuf_bytes = 0
        # Bytes written to the server, kept for a replay (rule 4); None: not replayable.
        self.replay: list[bytes] | None = [] if request.method in IDEMPOTENT_METHODS else None
        self.replay_bytes = 0
        # Servers that failed this request, in order. A tuple: most requests never fail, and
        # the empty one is shared (a list would be an allocation per request).
        self.tried: tuple[Server, ...] = ()
        self.retried_stale = False  # replayed once already after a stale pooled connection
        self.request_done = False  # the whole request was read from the client
        self.is_chunked_up = False  # the request body is re-encoded chunked for the server
        self.response_started = False  # a byte of the server's answer went to the client
        self.is_chunked_down = False  # the answer's body is re-encoded chunked for the client
        self.splice_request = False  # the rest of the request body goes by splice
        self.splice_response = False  # the answer's body is long enough to be spliced
        self.keep_alive = False  # the client connection stays open after this answer (rule 2)
        self.status = 0
        self.bytes_out = 0  # body bytes of the answer
        self.identity: str | None = None  # the host the client's sticky cookie named
        self.set_cookie = b""  # Set-Cookie lines for the answer: the client is (re-)pinned
        # Waiting for a slot on a server at its maxconn (balancer/queue.py); None: not queued.
        self.ticket: Ticket | None = None
        # The request body's pace (rule 7): bytes the client had sent when the body began, and
        # when the body's first client_body_s ends (a loop time).
        self.body_bytes_base = 0
        self.body_deadline_base = 0.0

    def __repr__(self) -> str:
        server = self.server.name if self.server is not None else "-"
        return (
            f"<Exchange {self.request.method.decode()} {self.request.target.decode()!r}"
            f" server={server} status={self.status} done={self.request_done}>"
        )


def body_deadline(exchange: Exchange, now: float, received: int, body_s: float, rate: int) -> float:
    """Rule 7: when the client's request body times out, ``received`` bytes into the body."""
    silence = now + body_s
    if not rate:
        return silence
    pace = exchange.body_deadline_base + (received - exchange.body_bytes_base) / rate
    return silence if silence < pace else pace


def keeps_alive(
    request: RequestHead,
    request_done: bool,
    closes_after_body: bool,
    is_stopping: bool,
    client_done: bool,
    held_after_upgrade: bool,
) -> bool:
    """Rule 2: whether the client connection stays open after this answer."""
    return (
        request.keep_alive
        and request_done
        and not closes_after_body
        and not is_stopping
        and not client_done
        and not held_after_upgrade
    )


def may_reuse(policy: Reuse, is_first_request: bool, is_upgrade: bool) -> bool:
    """Rule 3: whether this request may take an idle pooled upstream connection."""
    if is_upgrade or policy is Reuse.NEVER:
        return False
    return policy is Reuse.ALWAYS or not is_first_request


def replay_after_loss(
    got_data: bool, is_held: bool, was_reused: bool, retried_stale: bool
) -> Replay:
    """Rule 4: ``got_data``: a byte of answer arrived; ``is_held``: the request is idempotent
    and every byte of it is still held; ``was_reused``: the lost connection came from the pool;
    ``retried_stale``: this request was already replayed once for a stale pooled connection."""
    if got_data or not is_held:
        return Replay.NO
    if was_reused:
        return Replay.NO if retried_stale else Replay.SAME_SERVER
    return Replay.OTHER_SERVER


def retry_target(
    failed: Server,
    tried: Collection[Server],
    retries: int,
    select: Callable[[Collection[Server]], Server | None],
) -> Server | None:
    """Rule 5: the server to try next after ``failed`` (already in ``tried``), or None.
    ``select(exclude)`` is the backend's balanced pick."""
    if len(tried) > retries:
        return None
    pair = failed.pair
    if pair is not None and pair.is_usable and pair not in tried:
        return pair
    return select(tried)


def status_for_upstream_failure(exc: Exception | None, answering: bool) -> int:
    """Rule 6: the status for a server failure. ``answering``: the request was sent whole and
    zdlb was waiting for the answer (a timeout then is the server's slowness: 504); a connect
    that timed out is a failed connect (502)."""
    if isinstance(exc, UpstreamTimeout):
        return 504 if answering else 502
    if isinstance(exc, UpstreamError):
        return 502
    status = getattr(exc, "status", 502)
    return status if isinstance(status, int) and 500 <= status < 600 else 502
