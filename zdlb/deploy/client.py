"""The deploy's client of the control socket: one JSON command per connection, with a deadline.

A connection per command costs a unix-socket connect (~50 us) instead of a ``zdlb ctl`` process
(0.2-0.45 s), and no connection sits idle for the control server to drop while the user's
command runs. Every reply is JSON (``json`` prefix); an ``{"error": ...}`` reply raises
``DeployCommandRefused`` with the daemon's message. This module knows nothing of the procedure.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from zdlb.errors import ZdlbError

_END = b"\n\n"  # every answer ends with an empty line (control/protocol.py frame())
# `show servers` of thousands of servers fits; nothing the deploy asks is larger.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# The daemon answers anything but a wait in milliseconds; this bounds a stuck daemon.
DEFAULT_COMMAND_TIMEOUT_S = 10.0
# Keys of an error answer that say nothing more than its "error" (or only to a person typing).
_NOT_SHOWN = ("error", "usage")


class DeployCommandRefused(ZdlbError):
    """The daemon answered a command with an error (its message is the exception's)."""


class ControlUnreachable(ZdlbError):
    """The control socket could not be reached or answered nothing usable in time."""


class ControlClient:
    """Sends control commands to the socket at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<ControlClient {self.path}>"

    async def call(self, line: str, wait_s: float = 0.0) -> Any:
        """The JSON answer to ``line``; ``wait_s``: how long the command itself may take (a
        ``wait``), on top of ``DEFAULT_COMMAND_TIMEOUT_S``.

        Raises DeployCommandRefused (an error answer) or ControlUnreachable.
        """
        timeout_s = DEFAULT_COMMAND_TIMEOUT_S + wait_s
        try:
            async with asyncio.timeout(timeout_s):
                answer = await self._exchange(f"json {line}\n".encode())
        except TimeoutError:
            raise ControlUnreachable(f"no answer from {self.path} within {timeout_s:g} s") from None
        except OSError as exc:
            raise ControlUnreachable(f"cannot talk to {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(answer)
        except ValueError:
            raise ControlUnreachable(f"{self.path} answered something that is not JSON") from None
        if isinstance(data, dict) and "error" in data:
            details = ", ".join(
                f"{key}={value}" for key, value in sorted(data.items()) if key not in _NOT_SHOWN
            )
            raise DeployCommandRefused(str(data["error"]) + (f" ({details})" if details else ""))
        return data

    async def _exchange(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            writer.write(request)
            await writer.drain()
            answer = bytearray()
            while not answer.endswith(_END):
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionResetError("closed before a complete answer")
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    raise ConnectionResetError("answer too large")
            return bytes(answer)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass  # the answer is read; how the close went changes nothing
