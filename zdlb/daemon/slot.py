"""A master's view of one worker process (workers.py): its process, channels and latest report.

No process is started or stopped here: workers.py does that.
"""

from __future__ import annotations

import asyncio

from zdlb.config.model import Config
from zdlb.daemon import ipc
from zdlb.daemon.fdchannel import FdChannel
from zdlb.errors import ZdlbError


class WorkerSlot:
    """Worker number ``index``: its current process, channel and latest report."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.report: ipc.StatsReport | None = None
        self.reader: asyncio.Task[None] | None = None
        self.fds: FdChannel | None = None  # sockets both ways (fdchannel.py)
        self.ready = asyncio.Event()
        self.started_at = 0.0
        self.config: Config | None = None  # what it was started with
        self.is_retiring = False  # a reload lowered `workers`: not restarted (resize.py)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<WorkerSlot {self.index} pid={pid} ready={self.ready.is_set()}>"

    def send(self, message: ipc.Message) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(ipc.encode(message))


async def ready_or_exited(slot: WorkerSlot) -> None:
    """Wait for the worker to serve. Raises ZdlbError if it exits first."""
    assert slot.proc is not None
    ready = asyncio.ensure_future(slot.ready.wait())
    exited = asyncio.ensure_future(slot.proc.wait())
    await asyncio.wait((ready, exited), return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    exited.cancel()
    if not slot.ready.is_set():
        code = slot.proc.returncode
        raise ZdlbError(f"worker {slot.index} exited with code {code} before serving")
