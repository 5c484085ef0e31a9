"""Bulk TCP benchmark: a 256 MiB file from nginx, through zdlb's TCP pump and HAProxy mode tcp.

Run through ``benchmarks/bulk.sh``. Setup (PERFORMANCE.md's pinned layout): nginx (sendfile,
one worker) and the client on CPU0, the proxy under test on CPU1, each proxy alone on its
core. Targets, measured in interleaved rounds (order rotated every round):

- ``direct``: the client straight at nginx, the ceiling;
- ``haproxy``: ``mode tcp``, ``option splice-request`` + ``option splice-response`` (forced
  splice: ``splice-auto`` often never splices), ``tune.pipesize`` = zdlb's pipe size, nbthread 1;
- ``haproxy-64k``: the same with 64 KiB pipes, PERFORMANCE.md's first anchor;
- ``zdlb-splice-<size>``: the splice pump at each pipe size of ``--pipe-sizes`` (the
  ``DEFAULT_PIPE_BYTES`` measurement);
- ``zdlb-copy``: the fallback pump (``splice = false``), 1 MiB buffers.

Per round and target the client downloads the file ``--count`` times, one after the other,
reading 1 MiB at a time (bulk_client.py); MB/s is bytes over the client's wall time, and the
proxy's CPU seconds per GiB come from /proc/PID/stat (utime+stime, its whole process tree)
before and after. Reported: medians over rounds, ratios against ``haproxy`` within this run.
Then one more download per proxy under ``strace -c -f -p PID`` counts its system calls:
splice calls and no recv/send of payload prove the bytes stayed in the kernel.

zdlb runs as ``--zdlb-cmd`` (default: ``zdlb run -c {config}``, the real daemon) with
``{port}``, ``{server}``, ``{splice}``, ``{pipe_bytes}`` and ``{config}`` substituted;
``{config}`` is a zdlb.toml with one ``mode = "tcp"`` listener written for each variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from benchmarks.procs import ProcRegistry, free_port, tree_cpu_s, wait_port
from benchmarks.report import markdown_table
from benchmarks.targets import taskset

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30
READY_TIMEOUT_S = 15.0
CLIENT_TIMEOUT_S = 300.0
STRACE_ATTACH_S = 10.0  # bound on strace -p attaching to every thread (it takes milliseconds)
STRACE_EXIT_S = 30.0  # bound on strace writing its summary after SIGINT
DEFAULT_ZDLB_CMD = (
    f"{shlex.quote(sys.executable)} -m zdlb.daemon.cli run -c {{config}} --log-level warning"
)
# System calls worth showing from strace -c: payload moves and readiness waits.
STRACE_CALLS = (
    "splice",
    "recvfrom",
    "sendto",
    "read",
    "write",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
)
SUMMARY_HEADER = [
    "target",
    "MB/s (median)",
    "MB/s range",
    "CPU s/GiB",
    "MB/s vs HAProxy",
    "CPU/GiB vs HAProxy",
]

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid $dir/bulk-nginx.pid;
error_log $dir/bulk-nginx.error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$port;
        root $dir/www;
$server_extra
    }
}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 1000
    tune.pipesize $pipe_bytes

defaults
    mode $mode
    option splice-request
    option splice-response
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bulk
    bind 127.0.0.1:$port
    default_backend app

backend app
    server s1 127.0.0.1:$backend
"""

ZDLB_CONF = """\
# zdlb config for the bulk benchmark: one tcp listener, one server (nginx).
[logging]
access_log = false

[listeners.bulk]
bind = "127.0.0.1:$port"
backend = "app"
mode = "tcp"
splice = $splice
pipe_bytes = $pipe_bytes

[backends.app]
servers = [{ name = "s1", address = "$server" }]
"""


@dataclass
class Target:
    name: str
    port: int
    pid: int | None  # the proxy's, for CPU accounting; None for direct
    rates: list[float] = field(default_factory=list)  # MB/s per round
    cpu_per_gib: list[float] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags bulk.py and bulk_http.py share: rounds, pinning, zdlb command, strace, results."""
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--proxy-cpu", type=int, default=1)
    p.add_argument("--load-cpu", type=int, default=0)
    p.add_argument("--zdlb-cmd", default=DEFAULT_ZDLB_CMD)
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--count", type=int, default=4, help="downloads per round and target")
    p.add_argument("--file-mib", type=int, default=256)
    p.add_argument("--pipe-sizes", default="65536,262144,1048576", help="zdlb splice variants")
    return p.parse_args(argv)


def max_pipe_bytes(args: argparse.Namespace) -> int:
    return max(int(s) for s in args.pipe_sizes.split(","))


def write_file(path: Path, size: int) -> None:
    """A file of ``size`` random bytes, written 1 MiB at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for offset in range(0, size, MIB):
            out.write(os.urandom(min(MIB, size - offset)))


def render(text: str, dest: Path, **values: object) -> Path:
    dest.write_text(string.Template(text).substitute({k: str(v) for k, v in values.items()}))
    return dest


def started(reg: ProcRegistry, tmp: Path, name: str, argv: list[str], port: int) -> int:
    proc = reg.spawn(name, argv, tmp)
    if not wait_port(port, READY_TIMEOUT_S, proc):
        raise RuntimeError(f"{name} did not start: {proc.log_tail(3)}")
    return proc.pid


def start_targets(args: argparse.Namespace, reg: ProcRegistry, tmp: Path) -> list[Target]:
    nginx_port = free_port()
    conf = render(NGINX_CONF, tmp / "nginx.conf", dir=tmp, port=nginx_port, server_extra="")
    nginx = ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx.early.log"), "-c", str(conf)]
    started(reg, tmp, "nginx", taskset(args.load_cpu, nginx), nginx_port)
    targets = [Target("direct", nginx_port, None)]
    sizes = [int(s) for s in args.pipe_sizes.split(",")]
    for name, pipe_bytes in (("haproxy", max_pipe_bytes(args)), ("haproxy-64k", 65536)):
        port = free_port()
        cfg = render(
            HAPROXY_CONF,
            tmp / f"{name}.cfg",
            mode="tcp",
            port=port,
            backend=nginx_port,
            pipe_bytes=pipe_bytes,
        )
        argv = taskset(args.proxy_cpu, ["haproxy", "-db", "-f", str(cfg)])
        targets.append(Target(name, port, started(reg, tmp, name, argv, port)))
    variants = [(f"zdlb-splice-{s // 1024}k", "on", s) for s in sizes]
    variants.append(("zdlb-copy", "off", max(sizes)))
    for name, splice, pipe_bytes in variants:
        port = free_port()
        values = {
            "port": port,
            "server": f"127.0.0.1:{nginx_port}",
            "splice": splice,
            "pipe_bytes": pipe_bytes,
        }
        toml = dict(values, splice="true" if splice == "on" else "false")
        config = render(ZDLB_CONF, tmp / f"{name}.toml", **toml)
        argv = shlex.split(args.zdlb_cmd.format(config=config, **values))
        pid = started(reg, tmp, name, taskset(args.proxy_cpu, argv), port)
        targets.append(Target(name, port, pid))
    return targets


def run_client(args: argparse.Namespace, port: int, count: int) -> dict[str, float]:
    return client_json(
        args.load_cpu, [f"--port={port}", f"--count={count}", f"--expect={args.file_mib * MIB}"]
    )


def client_json(load_cpu: int, client_args: list[str]) -> dict[str, float]:
    """Run bulk_client.py with ``client_args`` pinned to ``load_cpu``; its JSON result."""
    argv = [sys.executable, "-m", "benchmarks.bulk_client", *client_args]
    done = subprocess.run(
        taskset(load_cpu, argv),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
        cwd=HERE.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client {' '.join(client_args)} failed: {done.stderr.strip()[-300:]}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def measure(args: argparse.Namespace, target: Target) -> str:
    cpu_before = tree_cpu_s(target.pid) if target.pid else 0.0
    result = run_client(args, target.port, args.count)
    cpu_s = tree_cpu_s(target.pid) - cpu_before if target.pid else 0.0
    rate = result["bytes"] / result["seconds"] / 1e6
    target.rates.append(rate)
    line = f"  {target.name:<18} {rate:8.0f} MB/s"
    if target.pid:
        target.cpu_per_gib.append(cpu_s / (result["bytes"] / GIB))
        line += f"  {target.cpu_per_gib[-1]:.3f} CPU s/GiB"
    return line


def strace_counts(args: argparse.Namespace, target: Target, tmp: Path) -> dict[str, int]:
    """System calls the proxy made during one download, from strace -c."""
    assert target.pid is not None
    out = tmp / f"{target.name}.strace"
    return trace_syscalls(target.pid, out, lambda: run_client(args, target.port, 1))


def trace_syscalls(
    pid: int, out: Path, work: Callable[[], object], calls: Sequence[str] = STRACE_CALLS
) -> dict[str, int]:
    """Counts of ``calls`` that pid's threads made while ``work()`` ran (strace -c -f)."""
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not _wait_traced(pid, tracer, STRACE_ATTACH_S):
            raise RuntimeError(f"strace did not attach to {pid} within {STRACE_ATTACH_S} s")
        work()
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=STRACE_EXIT_S)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(timeout=STRACE_EXIT_S)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in calls and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def _wait_traced(pid: int, tracer: subprocess.Popen[bytes], deadline_s: float) -> bool:
    """Poll until every thread of pid has ``tracer`` as its TracerPid (/proc), bounded."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and tracer.poll() is None:
        if _tracer_pids(pid) == {tracer.pid}:
            return True
        time.sleep(0.02)
    return False


def _tracer_pids(pid: int) -> set[int]:
    """The TracerPid of each thread of pid (0: not traced); empty if pid is gone."""
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:
            continue  # the thread exited meanwhile
        found.update(int(line.split()[1]) for line in lines if line.startswith("TracerPid:"))
    return found


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def summary_table(targets: list[Target]) -> str:
    base = next(t for t in targets if t.name == "haproxy")
    base_rate, base_cpu = statistics.median(base.rates), statistics.median(base.cpu_per_gib)
    rows = []
    for t in targets:
        rate = statistics.median(t.rates)
        cpu = statistics.median(t.cpu_per_gib) if t.cpu_per_gib else None
        rows.append(
            [
                t.name,
                f"{rate:,.0f}",
                f"{min(t.rates):,.0f}-{max(t.rates):,.0f}",
                f"{cpu:.3f}" if cpu is not None else "-",
                ratio(rate, base_rate),
                ratio(cpu, base_cpu),
            ]
        )
    return markdown_table(SUMMARY_HEADER, rows)


def strace_table(args: argparse.Namespace, counts: dict[str, dict[str, int]]) -> str:
    calls = [c for c in STRACE_CALLS if any(c in found for found in counts.values())]
    rows = [[name, *(str(found.get(c, 0)) for c in calls)] for name, found in counts.items()]
    return markdown_table([f"syscalls, one {args.file_mib} MiB download", *calls], rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    reg = ProcRegistry()
    tmp = Path(tempfile.mkdtemp(prefix="zdlb-bulk-"))
    try:
        tmp.chmod(0o755)  # nginx's workers run as nobody when started as root
        write_file(tmp / "www" / "bulk.bin", args.file_mib * MIB)
        targets = start_targets(args, reg, tmp)
        for t in targets:  # warm-up: page cache, pools, autotuned socket buffers
            run_client(args, t.port, 1)
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}")
            shift = n % len(targets)
            for target in targets[shift:] + targets[:shift]:
                say(measure(args, target))
        counts: dict[str, dict[str, int]] = {}
        if not args.no_strace:
            traced = ("haproxy", f"zdlb-splice-{max_pipe_bytes(args) // 1024}k", "zdlb-copy")
            for t in targets:
                if t.name in traced:
                    counts[t.name] = strace_counts(args, t, tmp)
        report = render_report(args, targets, counts)
        say(report)
        if args.results:
            append_results(report)
    finally:
        reg.stop_all()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0


def render_report(
    args: argparse.Namespace, targets: list[Target], counts: dict[str, dict[str, int]]
) -> str:
    lines = [
        f"## TCP bulk, {utc_now()}",
        "",
        machine_line(),
        f"- setup: {args.file_mib} MiB file from nginx (sendfile), {args.count} downloads per "
        f"round and target, {args.rounds} rounds interleaved, medians; client reads 1 MiB at a "
        f"time; proxy on CPU{args.proxy_cpu}, nginx and client on CPU{args.load_cpu}",
        f"- command: `benchmarks/bulk.sh {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        summary_table(targets),
        "",
    ]
    if counts:
        lines += [strace_table(args, counts), ""]
    return "\n".join(lines)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_line() -> str:
    """The report's ``- machine:`` line: cores, kernel, HAProxy and Python versions."""
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    return (
        f"- machine: nproc {os.cpu_count()}, Linux {platform.release()}; "
        f"{haproxy.stdout.splitlines()[0] if haproxy.stdout else 'haproxy ?'}; "
        f"Python {platform.python_version()}"
    )


def append_results(report: str) -> None:
    """Append a report section to benchmarks/RESULTS.md."""
    with (HERE / "RESULTS.md").open("a") as out:
        out.write("\n" + report)


def on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


if __name__ == "__main__":
    sys.exit(main())
