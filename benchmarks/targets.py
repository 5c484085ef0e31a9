"""The things under test: two nginx backends, and the proxies in front of them.

Each start_* function renders a config from benchmarks/templates/ into the run's temp dir,
spawns the process pinned with `taskset -c CPU`, waits for its port with a bounded deadline and
checks that one real GET answers 200. A proxy that fails any of that becomes a Target with a
skip_reason, never an exception: zdlb may well not run yet.
"""

from __future__ import annotations

import http.client
import os
import shlex
import string
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import Proc, ProcRegistry, free_port, wait_port

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parent.parent
# 100 bytes with an 8-character name: the page size the PERFORMANCE.md anchors were measured with.
PAGE_BODY = (
    "<html><head><title>zdlb</title></head>"
    "<body><p>backend $name: a tiny test page.</p></body></html>"
)
DEFAULT_ZDLB_CMD = (
    f"{shlex.quote(sys.executable)} -m zdlb.daemon.cli run -c {{config}} --log-level warning"
)
READY_TIMEOUT_S = 15.0  # bounded wait for a port to accept; a Python daemon can take a moment
PROBE_TIMEOUT_S = 5.0

# zdlb-bare: zdlb without checks, sticky cookie and control socket (templates/zdlb-bare.toml);
# zdlb-always: zdlb with reuse = "always" (templates/zdlb-always.toml).
# zdlb-routes / haproxy-routes: three routes and header rules, the same in both
# (templates/zdlb-routes.toml, templates/haproxy-routes.cfg); compared with each other.
PROXY_NAMES = (
    "zdlb",
    "zdlb-bare",
    "zdlb-always",
    "zdlb-routes",
    "haproxy",
    "haproxy-routes",
    "nginx",
)
# zdlb at another git revision (bench.py --baseline REV), configured as the zdlb target.
BASELINE_TARGET = "zdlb-base"
ALL_TARGETS = ("direct", *PROXY_NAMES)
DEFAULT_TARGETS = ("direct", "zdlb", "haproxy", "nginx")


@dataclass
class Target:
    """One thing wrk is pointed at. proc is None for `direct` (no proxy CPU to account)."""

    name: str
    port: int
    proc: Proc | None = None
    skip_reason: str | None = None

    @property
    def is_runnable(self) -> bool:
        return self.skip_reason is None

    def check_alive(self) -> None:
        """Turn a proxy that died since the last run into a skipped target."""
        if self.proc is not None and self.skip_reason is None and not self.proc.is_alive():
            self.skip_reason = f"exited with {self.proc.popen.returncode}: {self.proc.log_tail(1)}"


def render(template: str, dest: Path, **values: object) -> Path:
    """Render templates/<template> with string.Template into dest; unknown keys raise."""
    text = string.Template((TEMPLATES / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()}
    )
    dest.write_text(text)
    return dest


def taskset(cpu: int | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


def probe_http(port: int) -> str | None:
    """GET / once; return None on a 200, else a short reason."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request("GET", "/", headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"probe GET / failed: {exc!r}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"probe GET / answered {resp.status} {resp.reason}: {body[:80]!r}"
    return None


def _ready(target: Target, timeout_s: float) -> Target:
    """Wait for the port, then probe; fill skip_reason on failure."""
    assert target.proc is not None
    if not wait_port(target.port, timeout_s, target.proc):
        if target.proc.is_alive():
            target.skip_reason = f"port {target.port} not accepting after {timeout_s:.0f} s"
        else:
            code = target.proc.popen.returncode
            target.skip_reason = f"exited with {code} at startup: {target.proc.log_tail(1)}"
        return target
    target.skip_reason = probe_http(target.port)
    return target


def start_backend(reg: ProcRegistry, tmp: Path, name: str, cpu: int | None) -> Target:
    """Start one nginx backend serving PAGE_BODY; raise RuntimeError if it does not come up."""
    port = free_port()
    body = string.Template(PAGE_BODY).substitute(name=name)
    conf = render(
        "nginx-backend.conf", tmp / f"{name}.conf", dir=tmp, name=name, port=port, body=body
    )
    argv = ["nginx", "-p", str(tmp), "-e", str(tmp / f"{name}.early.log"), "-c", str(conf)]
    target = _ready(Target(name, port, reg.spawn(name, taskset(cpu, argv), tmp)), READY_TIMEOUT_S)
    if target.skip_reason is not None:
        raise RuntimeError(f"backend {name} failed: {target.skip_reason}")
    return target


def start_haproxy(
    reg: ProcRegistry,
    tmp: Path,
    backends: tuple[int, int],
    cpu: int | None,
    name: str = "haproxy",
) -> Target:
    """HAProxy with templates/NAME.cfg."""
    port = free_port()
    conf = render(
        f"{name}.cfg", tmp / f"{name}.cfg", port=port, backend1=backends[0], backend2=backends[1]
    )
    argv = ["haproxy", "-db", "-f", str(conf)]  # -db: foreground, no daemon, no master
    return _ready(Target(name, port, reg.spawn(name, taskset(cpu, argv), tmp)), READY_TIMEOUT_S)


def start_nginx_proxy(
    reg: ProcRegistry, tmp: Path, backends: tuple[int, int], cpu: int | None
) -> Target:
    port = free_port()
    conf = render(
        "nginx-proxy.conf",
        tmp / "nginx-proxy.conf",
        dir=tmp,
        name="nginx-proxy",
        port=port,
        backend1=backends[0],
        backend2=backends[1],
    )
    argv = ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-proxy.early.log"), "-c", str(conf)]
    return _ready(
        Target("nginx", port, reg.spawn("nginx-proxy", taskset(cpu, argv), tmp)), READY_TIMEOUT_S
    )


def checkout(rev: str, dest: Path) -> Path:
    """A detached git worktree of this repository at ``rev`` (for --baseline)."""
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(dest), rev],
        check=True,
        capture_output=True,
    )
    return dest


def remove_checkout(dest: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(dest)],
        check=False,
        capture_output=True,
    )


def start_zdlb(
    reg: ProcRegistry,
    tmp: Path,
    backends: tuple[int, int],
    cpu: int | None,
    cmd_template: str,
    ready_timeout_s: float,
    name: str = "zdlb",
    *,
    template: str | None = None,
    root: Path = REPO_ROOT,
) -> Target:
    """Start zdlb from cmd_template ({config} is replaced by the generated TOML's path), with
    templates/TEMPLATE.toml (TEMPLATE defaults to NAME), importing zdlb from ``root``."""
    port = free_port()
    run_dir = tmp / name  # its own directory: each zdlb target needs its own control socket
    run_dir.mkdir(exist_ok=True)
    conf = render(
        f"{template or name}.toml",
        tmp / f"{name}.toml",
        port=port,
        backend1=backends[0],
        backend2=backends[1],
        dir=run_dir,
    )
    argv = [part.replace("{config}", str(conf)) for part in shlex.split(cmd_template)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    try:
        proc = reg.spawn(name, taskset(cpu, argv), tmp, cwd=root, env=env)
    except OSError as exc:
        return Target(name, port, skip_reason=f"cannot start {argv[0]!r}: {exc}")
    return _ready(Target(name, port, proc), ready_timeout_s)
