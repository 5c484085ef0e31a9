"""Process plumbing for the benchmark harness: spawn, readiness, /proc accounting, teardown.

Everything here is Linux-only (it reads /proc). CPU time of a proxy is the sum over its whole
process tree (the pid and every live descendant, each of whose /proc/PID/stat already
aggregates its threads), plus the times of reaped children, so nginx's master + worker and
zdlb's SO_REUSEPORT workers are all counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# How long a stopped process gets between SIGTERM and SIGKILL. HAProxy and nginx exit in
# milliseconds; zdlb drains for its grace period, which the generated config does not set.
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1 (bind 0, read, close: racy but fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; return the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if the harness dies without running its cleanup."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Proc:
    """A process the harness started, in its own session so its whole group can be signalled."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, wait up to STOP_TIMEOUT_S, then SIGKILL it."""
        # Group first (start_new_session made pgid == pid), then stray descendants that left it.
        stragglers = descendants(self.pid)
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class ProcRegistry:
    """Every process the harness started; stop_all() runs from a finally block."""

    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name=name, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def wait_port(port: int, deadline_s: float, proc: Proc | None = None) -> bool:
    """Poll a TCP connect to 127.0.0.1:port until it succeeds, the deadline passes or proc dies."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and not proc.is_alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _read_stat(pid: int) -> tuple[int, int] | None:
    """Return (ppid, utime+stime+cutime+cstime in ticks) of pid, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The comm field may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # After comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def _ppid_map() -> dict[int, int]:
    ppids: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                ppids[int(entry.name)] = stat[0]
    return ppids


def descendants(pid: int) -> list[int]:
    """Live descendants of pid (not pid itself), found by walking ppid links in /proc."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppid_map().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user+system, threads and reaped children included) of pid's process tree."""
    ticks = 0
    for member in [pid, *descendants(pid)]:
        stat = _read_stat(member)
        if stat is not None:
            ticks += stat[1]
    return ticks / CLK_TCK


def _vm_rss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over pid's process tree, in bytes (shared pages counted once per process)."""
    return sum(_vm_rss_bytes(member) for member in [pid, *descendants(pid)])


def cpu_times(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat; busy excludes idle and iowait.

    Busy minus the proxy's own CPU time shows foreign load on the proxy's core (another
    benchmark, a test run), plus interrupt work the kernel charges to no process.
    """
    prefix = f"cpu{cpu} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            # user nice system idle iowait irq softirq steal (guest times are inside user).
            values = [int(v) for v in line.split()[1:9]]
            total = sum(values)
            return total - values[3] - values[4], total
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Percent of one CPU that was busy between two cpu_times() samples."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


async def accepting(port: int, timeout_s: float) -> None:
    """Wait, polling every 50 ms within ``timeout_s``, until 127.0.0.1:``port`` accepts
    (raises TimeoutError)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
