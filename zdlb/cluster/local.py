"""A throwaway etcd on loopback, for ``zdlb demo --fleet`` and the fleet tests.

One member, its data in a folder the caller owns, client and peer ports on 127.0.0.1. Ready
means its ``/health`` answers ``{"health":"true"}``, polled (never a fixed sleep). Blocking:
called before an event loop runs, or from test fixtures. Not for production: a real fleet
names its own etcd cluster in ``[cluster] endpoints``.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from zdlb.errors import ClusterUnavailable

# Debian's etcd-server 3.4 starts in ~0.3 s here; a loaded CI box gets many times that.
READY_TIMEOUT_S = 20.0
POLL_S = 0.02  # between two /health polls
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies, so a killed
    demo or test run never leaves an etcd or an instance behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A loopback port free now (etcd binds its own sockets, so it cannot take a bound one;
    the short race with another process is accepted in tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalEtcd:
    """etcd on 127.0.0.1 with ``data_dir``; ``start`` then ``wait_ready``; ``stop``."""

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0) -> None:
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<LocalEtcd {self.url} pid={pid}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    def start(self) -> None:
        """Start etcd (same ports and data after a stop: it comes back with its keys)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise ClusterUnavailable("no etcd on PATH (Debian: apt-get install etcd-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            binary,
            "--name=zdlb-local",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=zdlb-local={peer}",
        ]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``/health`` until etcd answers healthy. Raises ClusterUnavailable if it exits
        or ``timeout_s`` passes (with the end of its log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ClusterUnavailable(f"etcd exited before serving:\n{self._log_tail()}")
            if self.is_healthy():
                return
            time.sleep(POLL_S)
        raise ClusterUnavailable(f"etcd not healthy after {timeout_s} s:\n{self._log_tail()}")

    def is_healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            answer = json.loads(conn.getresponse().read())
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return isinstance(answer, dict) and answer.get("health") == "true"

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections reset."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, signum: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"
