"""The demo's app servers: small keep-alive HTTP/1.1 backends that say who answered.

``zdlb demo`` runs four of them (two hosts, each with a main and a backup vhost) behind zdlb,
so a person can watch balancing, stickiness and failover with ``curl``; ``zdlb demo-app`` runs
one host's two vhosts alone, as a container of ``docker-compose.yml`` does. Each answers ``GET /``
with a text page naming its host, vhost and version and the request's ``X-Forwarded-For``,
``GET /health`` with ``200 ok``, any other path with 404 and methods other than GET, HEAD, POST
and PUT with 405; HEAD works, request bodies are read, discarded and counted.

``POST /demo/stop?seconds=N`` is the demo's failover switch: the vhost answers 202, closes its
listening socket (new connections are refused) and its idle keep-alive connections, and after N
seconds binds the same address again. ``POST /demo/deploy?version=V&seconds=N[&broken=B]`` is a
deploy: the same stop, after which the vhost answers as version V; ``broken=health`` makes it
come back failing ``/health`` (503), ``broken=500`` answering every other path with 500 while
``/health`` still passes (only a verify request catches that). Any other method on ``/demo/*``
gets 405.

Built on h11 over asyncio streams: correctness over speed, it is a demo, not a benchmark target.
This module must not import the proxy: it is a stand-in for someone else's application, and it
talks to zdlb only over sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus

import h11

from zdlb.errors import ListenerError

log = logging.getLogger(__name__)

# Keep-alive idle and per-read deadline. uvicorn and Apache close idle keep-alive connections
# after 5 s; zdlb's pooled-connection lifetime (DEFAULT_UPSTREAM_IDLE_S, 1.5 s) stays below it,
# as it must below any real server's.
DEFAULT_DEMO_IDLE_S = 5.0
# A client that stops reading the answer is dropped after this long instead of pinning a task.
DEFAULT_DEMO_WRITE_S = 10.0
# One read per readiness; 64 KiB matches asyncio's default stream buffer limit.
READ_CHUNK_BYTES = 65536
# Connections accepted per readiness callback, so a burst cannot starve the other callbacks.
ACCEPT_BATCH = 16
# Pause before accepting again after EMFILE and the like; asyncio's accept loop waits 1 s too.
ACCEPT_RETRY_S = 1.0
# Listen backlog of each demo socket: the demo sees a handful of curl or wrk clients at most.
DEMO_BACKLOG = 128

# How long POST /demo/stop keeps a vhost down without ?seconds=: time enough to run a few curls.
DEFAULT_STOP_S = 30.0
# Bounds of ?seconds=: a stop must outlast a curl, and a forgotten one must end within 10 min.
MIN_STOP_S = 1.0
MAX_STOP_S = 600.0

# How long POST /demo/deploy keeps a vhost down without ?seconds=: a quick app restart.
DEFAULT_DEPLOY_S = 2.0

HEALTH_PATH = b"/health"
PAGE_PATH = b"/"
DEMO_PREFIX = b"/demo/"
STOP_PATH = b"/demo/stop"
DEPLOY_PATH = b"/demo/deploy"
# A version is echoed in pages and headers: short, and no byte that could split a header.
_VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


class Broken(enum.Enum):
    """How a deployed demo vhost misbehaves: not at all, failing /health, or answering 500."""

    NO = "no"
    HEALTH = "health"
    ERROR_500 = "500"


# A plain decimal: float() alone would also take "inf", "nan", "1e3" and "1_0".
_SECONDS_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class DemoVhost:
    """One demo app server: the host it pretends to be, its vhost, its version and its port."""

    host: str  # e.g. "front-1"
    vhost: str  # "main" or "backup"
    version: str  # e.g. "v1"
    port: int  # 0 picks a free port (tests)


# The demo layout the README describes: two hosts, main on 808x running v1, backup on 809x
# running v2, so a failover is visible in the answer's version.
FRONT_1_MAIN_PORT = 8081
FRONT_1_BACKUP_PORT = 8091
FRONT_2_MAIN_PORT = 8082
FRONT_2_BACKUP_PORT = 8092
DEMO_VHOSTS: tuple[DemoVhost, ...] = (
    DemoVhost("front-1", "main", "v1", FRONT_1_MAIN_PORT),
    DemoVhost("front-1", "backup", "v2", FRONT_1_BACKUP_PORT),
    DemoVhost("front-2", "main", "v1", FRONT_2_MAIN_PORT),
    DemoVhost("front-2", "backup", "v2", FRONT_2_BACKUP_PORT),
)
# The demo's hosts in order; `zdlb demo-app --host NAME` serves one of them (a container each).
DEMO_HOSTS: tuple[str, ...] = tuple(dict.fromkeys(spec.host for spec in DEMO_VHOSTS))


def vhosts_of(host: str | None) -> tuple[DemoVhost, ...]:
    """The demo vhosts ``host`` runs (its main and its backup); every demo vhost for ``None``.

    Raises ValueError for a host the demo does not have.
    """
    if host is None:
        return DEMO_VHOSTS
    if host not in DEMO_HOSTS:
        raise ValueError(f"no demo host {host!r} (demo hosts: {', '.join(DEMO_HOSTS)})")
    return tuple(spec for spec in DEMO_VHOSTS if spec.host == host)


class DemoVhostState(enum.Enum):
    """Whether a demo vhost listens: ``STOPPED`` after POST /demo/stop, until it binds again."""

    SERVING = "serving"
    STOPPED = "stopped"
    CLOSED = "closed"


class DemoVhostServer:
    """One demo vhost serving on a listening socket it owns; ``close()`` ends every connection.

    Each connection is a task this object tracks, so ``wait_closed()`` returns only when no
    socket of it is left open. ``stop()`` (POST /demo/stop) closes the listening socket for a
    while; the timer that binds it again is owned here and cancelled by ``close()``.
    ``min_stop_s`` is the least ``?seconds=`` accepted; tests lower it below a second.
    """

    def __init__(
        self,
        spec: DemoVhost,
        sock: socket.socket,
        *,
        idle_s: float = DEFAULT_DEMO_IDLE_S,
        write_s: float = DEFAULT_DEMO_WRITE_S,
        min_stop_s: float = MIN_STOP_S,
    ) -> None:
        self.spec = spec
        self._sock = sock
        self._idle_s = idle_s
        self._write_s = write_s
        self._min_stop_s = min_stop_s
        self.addr: tuple[str, int] = sock.getsockname()[:2]
        self.requests = 0
        self.broken = Broken.NO
        # What POST /demo/deploy installs when the stop ends: (version, broken).
        self._next_version: tuple[str, Broken] | None = None
        self._state = DemoVhostState.SERVING
        self._is_accepting = False
        self._retry_accept: asyncio.TimerHandle | None = None
        self._restart_timer: asyncio.TimerHandle | None = None
        # Resolved when a stop ends: True once serving again, False if the re-bind failed or
        # close() came first. A future, not a task: nothing runs while the vhost is down.
        self._stop_over: asyncio.Future[bool] | None = None
        # Writers of keep-alive connections waiting for their next request: stop() closes them.
        self._idle_writers: set[asyncio.StreamWriter] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        # Accepted sockets no connection task has wrapped in a transport yet: closed by
        # wait_closed() if their task was cancelled before it started.
        self._unowned_socks: set[socket.socket] = set()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"<DemoVhostServer {s.host}/{s.vhost} {s.version} on {self.addr[0]}:{self.addr[1]}"
            f" {self._state.value} conns={len(self._conn_tasks)} requests={self.requests}>"
        )

    @property
    def state(self) -> DemoVhostState:
        return self._state

    @property
    def is_stopped(self) -> bool:
        """True from ``stop()`` until the address is bound again (forever if that failed)."""
        return self._state is DemoVhostState.STOPPED

    def start(self) -> None:
        """Start accepting on the running loop; the socket must be listening and non-blocking."""
        if self._state is DemoVhostState.SERVING and not self._is_accepting:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept_ready)
            self._is_accepting = True

    def stop(self, duration_s: float) -> None:
        """Refuse connections for ``duration_s`` seconds, then bind the same address again.

        Closes the listening socket and the idle keep-alive connections at once; connections
        busy with a request finish it (answered with ``Connection: close``) and end. If the
        address cannot be bound again, the vhost logs it and stays stopped. Does nothing unless
        serving.
        """
        if self._state is not DemoVhostState.SERVING:
            return
        loop = asyncio.get_running_loop()
        self._stop_accepting(loop)
        self._sock.close()
        self._state = DemoVhostState.STOPPED
        for writer in self._idle_writers:
            writer.close()  # the connection task reads EOF and ends
        self._idle_writers.clear()
        self._stop_over = loop.create_future()
        self._restart_timer = loop.call_later(duration_s, self._restart)
        log.info(
            "demo.stopped vhost=%s/%s port=%d seconds=%g",
            self.spec.host,
            self.spec.vhost,
            self.addr[1],
            duration_s,
        )

    async def wait_restarted(self) -> bool:
        """Wait for the current stop to end: True if serving again, False if the re-bind failed
        or ``close()`` came first. Returns at once when no stop is pending."""
        if self._stop_over is None:
            return self._state is DemoVhostState.SERVING
        # Shielded: a cancelled waiter must not cancel the future other waiters share.
        return await asyncio.shield(self._stop_over)

    def close(self) -> None:
        """Stop accepting and cancel every connection; ``wait_closed()`` awaits the end."""
        self._stop_accepting(asyncio.get_running_loop())
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
        self._state = DemoVhostState.CLOSED
        self._end_stop(is_serving=False)
        for task in self._conn_tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Return once every connection has ended and every socket is closed; call close() first."""
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        for sock in self._unowned_socks:
            sock.close()
        self._unowned_socks.clear()
        self._sock.close()

    def _accept_ready(self) -> None:
        # Accepting synchronously in the readiness callback means no accepted socket can be lost
        # between the accept and the task that owns it, whatever close() interrupts.
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn_sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS: the listening socket stays readable, so pause
                # instead of spinning, as asyncio's own accept loop does.
                log.warning(
                    "demo.accept_paused vhost=%s/%s error=%s", self.spec.host, self.spec.vhost, exc
                )
                self._pause_accepting(loop, ACCEPT_RETRY_S)
                return
            conn_sock.setblocking(False)
            self._unowned_socks.add(conn_sock)
            task = loop.create_task(self._serve_connection(conn_sock))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    def _stop_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._is_accepting:
            loop.remove_reader(self._sock.fileno())
            self._is_accepting = False
        if self._retry_accept is not None:
            self._retry_accept.cancel()
            self._retry_accept = None

    def _restart(self) -> None:
        self._restart_timer = None
        host, port = self.addr
        vhost = f"{self.spec.host}/{self.spec.vhost}"
        try:
            sock = bind_demo_socket(host, port)
        except ListenerError as exc:
            log.warning("demo.restart_failed vhost=%s port=%d error=%s", vhost, port, exc)
            self._end_stop(is_serving=False)
            return
        self._sock = sock
        if self._next_version is not None:
            version, self.broken = self._next_version
            self.spec = replace(self.spec, version=version)
            self._next_version = None
        self._state = DemoVhostState.SERVING
        self.start()
        log.info(
            "demo.restarted vhost=%s port=%d version=%s broken=%s",
            vhost,
            port,
            self.spec.version,
            self.broken.value,
        )
        self._end_stop(is_serving=True)

    def _end_stop(self, *, is_serving: bool) -> None:
        if self._stop_over is not None and not self._stop_over.done():
            self._stop_over.set_result(is_serving)

    def _pause_accepting(self, loop: asyncio.AbstractEventLoop, pause_s: float) -> None:
        """Stop accepting for ``pause_s`` seconds, then resume unless close() came first."""
        loop.remove_reader(self._sock.fileno())
        self._is_accepting = False
        self._retry_accept = loop.call_later(pause_s, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._retry_accept = None
        self.start()

    async def _serve_connection(self, conn_sock: socket.socket) -> None:
        # The top of a connection task: log once, close, never let an error reach the loop.
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn_sock)
            self._unowned_socks.discard(conn_sock)  # the transport owns it now
            await self._serve_requests(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client left or idled out: routine for keep-alive connections
        except Exception:
            log.exception("demo.connection_error vhost=%s/%s", self.spec.host, self.spec.vhost)
        finally:
            if writer is None:
                self._unowned_socks.discard(conn_sock)
                conn_sock.close()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        is_keep_alive = False
        while True:
            try:
                received = await self._next_request(conn, reader, writer, is_keep_alive)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, exc.error_status_hint, b"bad request\n", [])
                return
            if received is None:
                return
            request, body_bytes = received
            self.requests += 1
            status, body, extra = self._answer(request, body_bytes)
            await self._send(conn, writer, status, body, extra, is_head=request.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close from either side, or HTTP/1.0
            conn.start_next_cycle()
            is_keep_alive = True

    async def _next_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        is_keep_alive: bool,
    ) -> tuple[h11.Request, int] | None:
        """Read one whole request, discarding its body; ``None`` on a clean close before one."""
        request: h11.Request | None = None
        body_bytes = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    info = h11.InformationalResponse(status_code=100, headers=[])
                    writer.write(conn.send(info))
                # Idle: a keep-alive connection with no byte of its next request yet. A fresh
                # connection is not idle: its client is about to send the first request.
                is_idle = (
                    is_keep_alive and conn.their_state is h11.IDLE and not conn.trailing_data[0]
                )
                if is_idle and self._state is not DemoVhostState.SERVING:
                    return None
                if is_idle:
                    self._idle_writers.add(writer)
                try:
                    async with asyncio.timeout(self._idle_s):
                        data = await reader.read(READ_CHUNK_BYTES)
                finally:
                    self._idle_writers.discard(writer)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None  # h11 emits Request before EndOfMessage
                return request, body_bytes
            elif isinstance(event, h11.ConnectionClosed):
                return None
            # h11.PAUSED cannot happen: we answer before calling next_event again.

    def _answer(self, request: h11.Request, body_bytes: int) -> Answer:
        path, _, query = request.target.partition(b"?")
        if path.startswith(DEMO_PREFIX):
            return self._answer_demo(request.method, path, query)
        if request.method not in (b"GET", b"HEAD", b"POST", b"PUT"):
            return 405, b"method not allowed\n", [(b"allow", b"GET, HEAD, POST, PUT")]
        if path == HEALTH_PATH:
            if self.broken is Broken.HEALTH:
                return 503, b"broken\n", []
            return 200, b"ok\n", []
        if self.broken is Broken.ERROR_500:
            return 500, b"broken version\n", []
        if path != PAGE_PATH:
            return 404, b"not found\n", []
        forwarded_for = b", ".join(v for k, v in request.headers if k == b"x-forwarded-for")
        return 200, render_page(self.spec, request.method, forwarded_for, body_bytes), []

    def _answer_demo(self, method: bytes, path: bytes, query: bytes) -> Answer:
        """The demo's control paths: ``POST /demo/stop`` stops this vhost (see ``stop()``),
        ``POST /demo/deploy`` too, then it comes back as another version."""
        if method != b"POST":
            return 405, b"method not allowed\n", [(b"allow", b"POST")]
        if path == DEPLOY_PATH:
            return self._answer_deploy(query)
        if path != STOP_PATH:
            return 404, b"not found\n", []
        seconds = parse_stop_seconds(query, self._min_stop_s, MAX_STOP_S)
        if seconds is None:
            text = f"seconds must be a number from {self._min_stop_s:g} to {MAX_STOP_S:g}\n"
            return 400, text.encode(), []
        if self._state is not DemoVhostState.SERVING:
            return 409, b"already stopped\n", []
        # Stopped before the 202 is written: a client that has read it sees the next connect
        # refused, with no window in which the old socket still accepts.
        self.stop(seconds)
        s = self.spec
        text = (
            f"{s.host}/{s.vhost} stopped: port {self.addr[1]} refuses connections"
            f" for {seconds:g} s, then serves again\n"
        )
        return 202, text.encode(), []

    def _answer_deploy(self, query: bytes) -> Answer:
        """``POST /demo/deploy?version=V[&seconds=N][&broken=health|500]``."""
        params = urllib.parse.parse_qs(query.decode("latin-1"), keep_blank_values=True)
        versions = params.get("version", [])
        if len(versions) != 1 or _VERSION_RE.fullmatch(versions[0]) is None:
            return 400, b"version must be 1..32 letters, digits, '.', '_' or '-'\n", []
        brokens = params.get("broken", [Broken.NO.value])
        kinds = [kind for kind in Broken if len(brokens) == 1 and kind.value == brokens[0]]
        if not kinds:
            return 400, b"broken must be no, health or 500\n", []
        seconds = parse_stop_seconds(query, self._min_stop_s, MAX_STOP_S, DEFAULT_DEPLOY_S)
        if seconds is None:
            text = f"seconds must be a number from {self._min_stop_s:g} to {MAX_STOP_S:g}\n"
            return 400, text.encode(), []
        if self._state is not DemoVhostState.SERVING:
            return 409, b"already stopped\n", []
        self._next_version = (versions[0], kinds[0])
        self.stop(seconds)
        s = self.spec
        text = (
            f"{s.host}/{s.vhost} deploying {versions[0]}: port {self.addr[1]} refuses"
            f" connections for {seconds:g} s, then serves {versions[0]}"
            + ("" if kinds[0] is Broken.NO else f" (broken: {kinds[0].value})")
            + "\n"
        )
        return 202, text.encode(), []

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra: list[tuple[bytes, bytes]],
        *,
        is_head: bool = False,
    ) -> None:
        s = self.spec
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"x-demo-server", f"{s.host}/{s.vhost}/{s.version}".encode()),
            *extra,
        ]
        if self._state is not DemoVhostState.SERVING:
            # A stopped vhost keeps no connection: h11 then ends this one after the answer.
            headers.append((b"connection", b"close"))
        out = conn.send(
            h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
        )
        if not is_head:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        async with asyncio.timeout(self._write_s):
            await writer.drain()


def parse_stop_seconds(
    query: bytes, min_s: float, max_s: float, default_s: float = DEFAULT_STOP_S
) -> float | None:
    """The ``seconds`` of a ``/demo/stop`` query string; ``default_s`` when absent.

    ``None`` when it is repeated, not a plain decimal number, or outside ``min_s..max_s``.
    """
    values = urllib.parse.parse_qs(query.decode("latin-1"), keep_blank_values=True).get("seconds")
    if values is None:
        return default_s
    if len(values) != 1 or _SECONDS_RE.fullmatch(values[0]) is None:
        return None
    seconds = float(values[0])
    return seconds if min_s <= seconds <= max_s else None


def render_page(spec: DemoVhost, method: bytes, forwarded_for: bytes, body_bytes: int) -> bytes:
    """The ``GET /`` page: one ``key: value`` line per fact, readable in curl and a browser."""
    lines = [
        f"host: {spec.host}",
        f"vhost: {spec.vhost}",
        f"version: {spec.version}",
        f"method: {method.decode('ascii', 'replace')}",
        f"x-forwarded-for: {forwarded_for.decode('latin-1') or '-'}",
        f"body-bytes: {body_bytes}",
    ]
    return ("\n".join(lines) + "\n").encode()


async def serve_demo_vhost(
    host: str, vhost: str, version: str, sock: socket.socket
) -> DemoVhostServer:
    """Serve one demo vhost on ``sock`` (bound, listening) on the running loop; return it started.

    The server takes ownership of ``sock`` and closes it in ``wait_closed()``.
    """
    sock.setblocking(False)
    server = DemoVhostServer(DemoVhost(host, vhost, version, sock.getsockname()[1]), sock)
    server.start()
    return server


def bind_demo_socket(bind_host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``bind_host:port``.

    Raises ``ListenerError`` if the address cannot be bound (in use, bad interface).
    """
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted demo must rebind while the last run's connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
        sock.listen(DEMO_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(exc.errno, f"demo server cannot listen on {bind_host}:{port}") from exc
    return sock


class DemoHosts:
    """All the demo's vhost servers, started together and closed together."""

    def __init__(self, servers: Sequence[DemoVhostServer]) -> None:
        self.servers = tuple(servers)

    def __repr__(self) -> str:
        return f"<DemoHosts {list(self.servers)!r}>"

    def close(self) -> None:
        """Stop every server and cancel its connections; ``wait_closed()`` awaits the end."""
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        """Return once every server's sockets are closed."""
        await asyncio.gather(*(server.wait_closed() for server in self.servers))


async def start_demo_hosts(
    bind_host: str = "127.0.0.1", vhosts: Sequence[DemoVhost] = DEMO_VHOSTS
) -> DemoHosts:
    """Bind and start every demo vhost on the running loop.

    Raises ``ListenerError`` if any port cannot be bound; the ones already bound are closed.
    """
    socks: list[socket.socket] = []
    try:
        for spec in vhosts:
            socks.append(bind_demo_socket(bind_host, spec.port))
    except ListenerError:
        for sock in socks:
            sock.close()
        raise
    servers = []
    for spec, sock in zip(vhosts, socks, strict=True):
        port = sock.getsockname()[1]
        server = DemoVhostServer(DemoVhost(spec.host, spec.vhost, spec.version, port), sock)
        server.start()
        servers.append(server)
    return DemoHosts(servers)
