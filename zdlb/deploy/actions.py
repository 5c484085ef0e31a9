"""The deploy's I/O outside the control socket: the user's command, and the verify request.

``run_command`` runs a shell command in its own process group with the host's facts in its
environment, hands each output line to a callback, and kills the whole group at its deadline
or when the deploy is cancelled (Ctrl-C), so no half-run deploy command outlives zdlb deploy.
``verify`` sends one GET to a server directly (never through a listener: no user may see the
version being checked) with h11, under a deadline. Both raise ``StepFailed`` with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence

import h11

from zdlb.config.model import Address
from zdlb.errors import ZdlbError

# After SIGTERM, a command's process group gets this long before SIGKILL (systemd's default
# is 90 s; a deploy step that ignores SIGTERM should not hold the host that long).
KILL_GRACE_S = 5.0
# The verify request reads at most this much of the answer: only its status matters.
VERIFY_READ_BYTES = 65536
# A failure reason quotes at most this many characters of the command's last output line.
REASON_OUTPUT_CHARS = 200


class StepFailed(ZdlbError):
    """A deploy step did not succeed; the message is the reason, shown to the operator."""


async def run_command(
    command: str,
    env: Mapping[str, str],
    timeout_s: float,
    on_line: Callable[[str], None],
) -> None:
    """Run ``command`` with ``/bin/sh -c``; return when it exits 0 within ``timeout_s``.

    Raises StepFailed (non-zero exit, timeout, cannot start). Cancelling kills its group.
    """
    try:
        proc = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own group: the kill reaches its children too
        )
    except OSError as exc:
        raise StepFailed(f"cannot start the command: {exc}") from None
    last = ""
    try:
        async with asyncio.timeout(timeout_s):
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                text = line.decode("utf-8", "replace").rstrip("\n")
                last = text or last
                on_line(text)
            status = await proc.wait()
    except TimeoutError:
        await _kill_group(proc)
        raise StepFailed(f"the command was still running after {timeout_s:g} s") from None
    except BaseException:
        await asyncio.shield(_kill_group(proc))
        raise
    if status != 0:
        said = f": {last[:REASON_OUTPUT_CHARS]}" if last else ""
        raise StepFailed(f"the command exited with status {status}{said}")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        try:
            async with asyncio.timeout(KILL_GRACE_S):
                await proc.wait()
            return
        except TimeoutError:
            continue


def parse_statuses(text: str) -> tuple[tuple[int, int], ...]:
    """``"200,301-308"`` as inclusive ranges. Raises ValueError with the bad item."""
    ranges = []
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        try:
            bounds = (int(low), int(high) if dash else int(low))
        except ValueError:
            raise ValueError(f"{item!r} is neither a status nor LOW-HIGH") from None
        if not 100 <= bounds[0] <= bounds[1] <= 599:
            raise ValueError(f"{item!r} is not within 100-599")
        ranges.append(bounds)
    return tuple(ranges)


async def verify(
    address: Address, path: str, expect: Sequence[tuple[int, int]], timeout_s: float
) -> int:
    """GET ``path`` from ``address`` directly; the status, if it is in ``expect``.

    Raises StepFailed (refused, reset, timeout, unexpected status, not HTTP).
    """
    where = f"GET http://{address}{path}"
    try:
        async with asyncio.timeout(timeout_s):
            status = await _get_status(address, path)
    except TimeoutError:
        raise StepFailed(f"{where}: no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise StepFailed(f"{where}: {exc.strerror or exc}") from None
    except h11.ProtocolError as exc:
        raise StepFailed(f"{where}: not a valid HTTP answer ({exc})") from None
    if not any(low <= status <= high for low, high in expect):
        raise StepFailed(f"{where} answered {status}")
    return status


async def _get_status(address: Address, path: str) -> int:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", str(address)), ("user-agent", "zdlb-deploy"), ("connection", "close")]
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(VERIFY_READ_BYTES)
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                return event.status_code
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("closed before an answer")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
