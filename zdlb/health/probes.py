"""Active checks: one TCP or HTTP probe of one server, judged into a ``ProbeResult``.

A TCP probe passes when the connection is accepted. An HTTP probe sends one ``Connection:
close`` request through h11 and judges the response status against ``expect_status`` and, if
set, the first ``DEFAULT_MAX_BODY_BYTES`` of the body against ``expect_body``. The whole probe
runs under ``asyncio.timeout(check.timeout_s)`` and its socket is closed on every path.

Network and protocol problems are results, never exceptions: a probe fails, the verdict decides.
Only cancellation propagates. This module must not keep state between probes, decide health
(``verdict.py`` does), log (the scheduler logs transitions, not probes) or retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from dataclasses import dataclass
from typing import assert_never

import h11

from zdlb.config.model import Address, CheckConfig, CheckKind
from zdlb.tls.context import Origination

# How much body an HTTP probe reads while looking for ``expect_body``. Status pages are a few
# hundred bytes; a health endpoint that streams megabytes must not make every probe read them.
# HAProxy's `http-check expect string` likewise only searches what fits in one check buffer.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
# One read per call: a loopback or LAN status page arrives in one or two of these.
READ_CHUNK_BYTES = 16 * 1024
USER_AGENT = "zdlb-check"


class Phase(enum.Enum):
    """Where a probe was when its deadline struck, for the failure detail."""

    CONNECT = "connect"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome: ``detail`` says why in a few words; ``duration_s`` is wall time."""

    passed: bool
    detail: str  # "ok 200", "connect refused", "timeout after 1.0 s (response)", ...
    duration_s: float


class _Progress:
    """How far a probe got; read after its deadline struck, to say where it hung."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.CONNECT


def probe_target(server_address: Address, check: CheckConfig) -> Address:
    """The endpoint to probe: ``check.address`` if set, else the server's host on ``check.port``
    if set, else the server's own address. (Config refuses both overrides at once; given both,
    ``check.port`` replaces the port of ``check.address``.)"""
    target = check.address or server_address
    if check.port is not None:
        target = Address(target.host, check.port)
    return target


async def run_probe(
    check: CheckConfig,
    target: Address,
    server_host_header: str,
    tls: Origination | None = None,
) -> ProbeResult:
    """Probe ``target`` once as ``check`` says, within ``check.timeout_s`` seconds.

    ``server_host_header`` is the Host header of an HTTP probe unless ``check.host`` is set.
    ``tls``: the server's backend speaks TLS; a tcp check then passes once the handshake does
    (the certificate verified as for traffic), an http check goes over it.
    Never raises for network or protocol trouble (that is a failed result); re-raises
    ``CancelledError``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    progress = _Progress()
    try:
        async with asyncio.timeout(check.timeout_s):
            passed, detail = await _probe(check, target, server_host_header, progress, tls)
    except TimeoutError:
        passed, detail = False, f"timeout after {check.timeout_s} s ({progress.phase.value})"
    return ProbeResult(passed, detail, loop.time() - started)


async def _probe(
    check: CheckConfig,
    target: Address,
    server_host_header: str,
    progress: _Progress,
    tls: Origination | None,
) -> tuple[bool, str]:
    try:
        if tls is None:
            reader, writer = await asyncio.open_connection(target.host, target.port)
        else:
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=tls.context,
                server_hostname=tls.server_hostname,
                ssl_handshake_timeout=check.timeout_s,
            )
    except ConnectionRefusedError:
        return False, "connect refused"
    except ssl.SSLError as exc:
        return False, f"tls handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return False, f"connect failed: {_describe(exc)}"
    progress.phase = Phase.RESPONSE
    is_ok = False
    try:
        match check.kind:
            case CheckKind.TCP:
                is_ok, detail = True, "ok connected"
            case CheckKind.HTTP:
                is_ok, detail = await _exchange(check, reader, writer, server_host_header)
            case _:
                assert_never(check.kind)
    except ConnectionResetError:
        detail = "reset by server"
    except OSError as exc:
        detail = f"io error: {_describe(exc)}"
    except h11.RemoteProtocolError as exc:
        detail = f"bad response: {exc}"
    except h11.LocalProtocolError as exc:  # a check config h11 refuses to send
        detail = f"bad request: {exc}"
    finally:
        await _close(writer, is_ok)
    return is_ok, detail


async def _exchange(
    check: CheckConfig,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    server_host_header: str,
) -> tuple[bool, str]:
    """Send the check request and judge the response; raises OSError and h11 errors."""
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", check.host or server_host_header),
        ("User-Agent", USER_AGENT),
        ("Connection", "close"),
    ]
    request = h11.Request(method=check.method, target=check.path, headers=headers)
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    return await _judge_response(check, conn, reader)


async def _judge_response(
    check: CheckConfig, conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[bool, str]:
    """Read the response as far as the judgement needs: the head, or the body up to the match
    (at most ``DEFAULT_MAX_BODY_BYTES`` of it)."""
    status = 0
    needle = check.expect_body.encode() if check.expect_body else None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(READ_CHUNK_BYTES)
            if not data and status == 0:  # h11 would call this a protocol error
                return False, "closed before a response"
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
            if not _status_expected(status, check.expect_status):
                return False, f"status {status} not in {_ranges_text(check.expect_status)}"
            if needle is None:
                return True, f"ok {status}"  # no need to read a body nobody looks at
        elif isinstance(event, h11.Data) and needle is not None:
            # Search only the new bytes plus the needle's overlap: linear in bytes read, even
            # when a server dribbles its body a byte per packet.
            start = max(0, len(body) - len(needle) + 1)
            body += event.data[: DEFAULT_MAX_BODY_BYTES - len(body)]
            if body.find(needle, start) >= 0:
                return True, f"ok {status}"
            if len(body) >= DEFAULT_MAX_BODY_BYTES:
                return False, f"body lacks {check.expect_body!r} in {DEFAULT_MAX_BODY_BYTES} bytes"
        elif isinstance(event, h11.EndOfMessage):
            return False, f"body lacks {check.expect_body!r}"
        elif isinstance(event, h11.ConnectionClosed):
            return False, "closed before a response"
        # InformationalResponse (1xx) is interim: the final response follows.


def _status_expected(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= status <= high for low, high in ranges)


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


async def _close(writer: asyncio.StreamWriter, is_graceful: bool) -> None:
    """Close the probe connection; after a failure, drop unsent bytes instead of flushing them
    (a server that stopped reading must not keep the socket open)."""
    if is_graceful:
        writer.close()
    else:
        writer.transport.abort()
    # Closing completes on the next loop iteration; waiting for it means a returned probe holds
    # no file descriptor. The error a reset connection reports is already judged.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
