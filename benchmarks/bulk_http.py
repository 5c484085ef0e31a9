"""HTTP bulk benchmark: large Content-Length bodies through zdlb's HTTP listener, spliced or not.

Run through ``benchmarks/bulk_http.sh``. What it measures: ``splice_min_bytes`` on an HTTP
listener (with ``splice = true``) moves a body with at least that many bytes still to come
after the first read by ``os.splice``, kernel-side; ``false`` keeps every body on the Python
path. Where does splicing start to pay off (the default's crossover), and how does zdlb compare
with HAProxy's forced splice?

Setup (PERFORMANCE.md's pinned layout, as bulk.py): one nginx (sendfile, one worker) and the
client on CPU0, the proxy under test alone on CPU1. Targets, all in front of that nginx:

- ``direct``: the client straight at nginx, the ceiling;
- ``haproxy``: ``mode http``, ``option splice-request`` + ``option splice-response`` (forced:
  ``splice-auto`` often never splices), ``tune.pipesize`` 1 MiB, nbthread 1;
- ``zdlb-splice``: ``splice_min_bytes = --min-bytes``, default 0: whatever is left of every
  body after the first read is spliced, so each size shows what splicing costs there. A body
  the first read took whole is not spliced even at 0 (strace: no dup, no splice for it), so 0
  and 1 behave alike; the crossover this finds is the value for the default;
- ``zdlb-nosplice``: ``splice_min_bytes = false``, the Python path for every body.
zdlb gets 1 MiB pipes (HAProxy's pipe size), one worker (``workers = 1``), no access log.

Workloads, for each size of ``--sizes``: ``download``, GETs of a file of that size; ``upload``,
POSTs of a body of that size. Each measurement is one client process (bulk_client.py, 1 MiB
reads, 1 MiB ``sendall`` pieces) making ``max(--count, --volume-mib / size)`` requests on one
keep-alive connection, so small sizes move as many bytes as large ones. In each round every
workload, size and target is measured once, the target order rotated every round; reported
are medians over rounds and ratios against ``haproxy`` within this run.

nginx must read an upload whole before it answers, or the proxies would see a response in the
middle of a request body. ``location /upload { return 200; }`` does not: nginx discards the body
*after* answering (seen here: the 200 came after 1 MiB of an 8 MiB body). So ``/upload`` has
``mirror /discard; mirror_request_body on;``, which reads the whole body before the content
phase, into memory (``client_body_buffer_size`` = the largest size: no temp file); the content
phase then answers 405 (the static module does not take POSTs), which ``error_page 405 =200``
turns into a 200. ``check_upload_waits`` proves it at start against nginx itself.

Proxy CPU comes from ``/proc/PID/task/*/schedstat`` (nanoseconds on CPU, its process tree):
``/proc/PID/stat``'s 10 ms ticks are too coarse for 0.1 s of CPU. Reported per measurement: MB/s
(body bytes over the client's wall time), proxy CPU seconds per GiB and microseconds per
request, the proxy's CPU % and its core's busy % (``/proc/stat``) over the client's run: busy
well above the proxy's share (or above ~5% on a ``direct`` row) means something else ran on
that core. Then, unless ``--no-strace``, one download and one upload of the largest size per
proxy under ``strace -c -f -p PID``: splice calls and few read/write calls show the body stayed
in the kernel.
"""

from __future__ import annotations

import argparse
import math
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from benchmarks.bulk import (
    GIB,
    HAPROXY_CONF,
    MIB,
    NGINX_CONF,
    STRACE_CALLS,
    add_common_args,
    append_results,
    client_json,
    machine_line,
    on_signal,
    ratio,
    render,
    say,
    started,
    trace_syscalls,
    utc_now,
    write_file,
)
from benchmarks.procs import Proc, ProcRegistry, busy_pct, cpu_times, descendants, free_port
from benchmarks.report import markdown_table
from benchmarks.targets import taskset

KIB = 1 << 10
PIPE_BYTES = MIB  # HAProxy's tune.pipesize and zdlb's pipe_bytes: the cheaper size (bulk.py)
WORKLOADS = ("download", "upload")
TRACE_CALLS = (*STRACE_CALLS, "readv", "writev")
UPLOAD_CHECK_BYTES = 2 * MIB
UPLOAD_CHECK_WAIT_S = 0.3  # nginx answering within this, one byte short of the body, fails
CHECK_TIMEOUT_S = 10.0
SIZE_SUFFIXES = {"k": KIB, "m": MIB, "g": GIB}
TABLE_HEADER = [
    "size",
    "target",
    "MB/s (median)",
    "MB/s range",
    "CPU s/GiB",
    "CPU us/req",
    "proxy CPU % / core busy %",
    "MB/s vs HAProxy",
    "CPU/GiB vs HAProxy",
]

# Added inside bulk.py's nginx server block: keep-alive for ever, and /upload (see the docstring).
NGINX_SERVER_EXTRA = """\
        keepalive_requests 100000000;
        client_max_body_size 0;
        location = /upload {
            client_body_buffer_size $body_buffer;
            mirror /discard;
            mirror_request_body on;
            error_page 405 =200 @ok;
        }
        location = /discard { internal; return 204; }
        location @ok { return 200 "ok\\n"; }"""

ZDLB_CONF = """\
# zdlb config for the HTTP bulk benchmark: one http listener, one server (nginx).
workers = 1

[logging]
access_log = false

[listeners.web]
bind = "127.0.0.1:$port"
backend = "app"
mode = "http"
splice = true
pipe_bytes = $pipe_bytes
splice_min_bytes = $splice_min_bytes

[backends.app]
servers = [{ name = "s1", address = "$server" }]
"""


@dataclass
class Target:
    name: str
    port: int
    proc: Proc | None  # the proxy, for CPU accounting and its log; None for direct
    failure: str | None = None  # set when a measurement failed: skipped from then on


@dataclass(frozen=True)
class Sample:
    mbps: float
    cpu_s_per_gib: float | None  # None for direct
    cpu_us_per_req: float | None
    proxy_pct: float  # the proxy's CPU time over the client process's wall time
    core_busy_pct: float  # the proxy's core busy over the same time, by anything


@dataclass
class Results:
    """Samples per (workload, size, target name), in round order."""

    samples: dict[tuple[str, int, str], list[Sample]] = field(default_factory=dict)

    def add(self, workload: str, size: int, target: str, sample: Sample) -> None:
        self.samples.setdefault((workload, size, target), []).append(sample)

    def get(self, workload: str, size: int, target: str) -> list[Sample]:
        return self.samples.get((workload, size, target), [])


def parse_size(text: str) -> int:
    """``64k``, ``1m``, ``1g`` (binary units) or a byte count."""
    text = text.strip().lower()
    unit = SIZE_SUFFIXES.get(text[-1:], 1)
    return int(text[:-1] if unit > 1 else text) * unit


def size_label(size: int) -> str:
    for suffix, unit in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {suffix}"
    return f"{size} B"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.set_defaults(rounds=5)  # short rounds: more of them ride out a neighbour's bursts
    p.add_argument("--sizes", default="64k,256k,512k,1m,16m,256m", help="k/m/g: binary units")
    p.add_argument("--count", type=int, default=4, help="least requests per measurement")
    p.add_argument("--volume-mib", type=int, default=256, help="least MiB per measurement")
    p.add_argument("--min-bytes", type=int, default=0, help="zdlb-splice's splice_min_bytes")
    args = p.parse_args(argv)
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: not a list of sizes: {args.sizes!r}")
    if min(args.size_list) <= 0:
        p.error("--sizes needs positive sizes")
    return args


def tree_cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every thread of pid's process tree (/proc/.../schedstat)."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue  # exited meanwhile
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def check_upload_waits(port: int) -> None:
    """Fail unless nginx's /upload answers only once the whole body is in (see docstring)."""
    head = f"POST /upload HTTP/1.1\r\nHost: bulk\r\nContent-Length: {UPLOAD_CHECK_BYTES}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=CHECK_TIMEOUT_S) as sock:
        sock.sendall(head.encode() + bytes(UPLOAD_CHECK_BYTES - 1))
        early, _, _ = select.select([sock], [], [], UPLOAD_CHECK_WAIT_S)
        if early:
            raise RuntimeError(f"nginx answered before the body ended: {sock.recv(200)!r}")
        sock.sendall(b"\0")
        answer = sock.recv(200)
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"nginx /upload did not answer 200: {answer!r}")


def start_nginx(args: argparse.Namespace, reg: ProcRegistry, tmp: Path) -> int:
    port = free_port()
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "upload").touch()  # the static module answers 405 (not 404) to a POST
    extra = NGINX_SERVER_EXTRA.replace("$body_buffer", str(max(args.size_list)))
    conf = render(NGINX_CONF, tmp / "nginx.conf", dir=tmp, port=port, server_extra=extra)
    argv = ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx.early.log"), "-c", str(conf)]
    started(reg, tmp, "nginx", taskset(args.load_cpu, argv), port)
    check_upload_waits(port)
    return port


def start_haproxy(args: argparse.Namespace, reg: ProcRegistry, tmp: Path, backend: int) -> Target:
    port = free_port()
    values = {"mode": "http", "port": port, "backend": backend, "pipe_bytes": PIPE_BYTES}
    cfg = render(HAPROXY_CONF, tmp / "haproxy.cfg", **values)
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c rejects {cfg}: {(check.stdout + check.stderr).strip()}")
    argv = taskset(args.proxy_cpu, ["haproxy", "-db", "-f", str(cfg)])
    return Target("haproxy", port, proc_of(reg, started(reg, tmp, "haproxy", argv, port)))


def start_zdlb(
    args: argparse.Namespace, reg: ProcRegistry, tmp: Path, name: str, min_bytes: str, backend: int
) -> Target:
    port = free_port()
    server = f"127.0.0.1:{backend}"
    config = render(
        ZDLB_CONF,
        tmp / f"{name}.toml",
        port=port,
        server=server,
        pipe_bytes=PIPE_BYTES,
        splice_min_bytes=min_bytes,
    )
    argv = shlex.split(args.zdlb_cmd.format(config=config, port=port, server=server))
    return Target(
        name, port, proc_of(reg, started(reg, tmp, name, taskset(args.proxy_cpu, argv), port))
    )


def proc_of(reg: ProcRegistry, pid: int) -> Proc:
    return next(p for p in reg.procs if p.pid == pid)


def start_targets(args: argparse.Namespace, reg: ProcRegistry, tmp: Path) -> list[Target]:
    nginx_port = start_nginx(args, reg, tmp)
    return [
        Target("direct", nginx_port, None),
        start_haproxy(args, reg, tmp, nginx_port),
        start_zdlb(args, reg, tmp, "zdlb-splice", str(args.min_bytes), nginx_port),
        start_zdlb(args, reg, tmp, "zdlb-nosplice", "false", nginx_port),
    ]


def client_args(port: int, workload: str, size: int, count: int) -> list[str]:
    if workload == "upload":
        return [f"--port={port}", "--path=/upload", f"--count={count}", f"--upload={size}"]
    return [f"--port={port}", f"--path=/f-{size}.bin", f"--count={count}", "--keep-alive"]


def requests_for(args: argparse.Namespace, size: int) -> int:
    volume = int(args.volume_mib) * MIB
    return max(int(args.count), math.ceil(volume / size))


def measure(args: argparse.Namespace, target: Target, workload: str, size: int) -> Sample:
    pid = target.proc.pid if target.proc else None
    count = requests_for(args, size)
    cpu_before = tree_cpu_ns(pid) if pid else 0
    core_before = cpu_times(args.proxy_cpu)
    started_at = time.monotonic()
    result = client_json(args.load_cpu, client_args(target.port, workload, size, count))
    wall_s = time.monotonic() - started_at
    core_busy = busy_pct(core_before, cpu_times(args.proxy_cpu))
    cpu_s = (tree_cpu_ns(pid) - cpu_before) / 1e9 if pid else 0.0
    return Sample(
        mbps=result["bytes"] / result["seconds"] / 1e6,
        cpu_s_per_gib=cpu_s / (result["bytes"] / GIB) if pid else None,
        cpu_us_per_req=cpu_s / count * 1e6 if pid else None,
        proxy_pct=100.0 * cpu_s / wall_s,
        core_busy_pct=core_busy,
    )


def run_rounds(args: argparse.Namespace, targets: list[Target]) -> Results:
    results = Results()
    for n in range(args.rounds):
        say(f"round {n + 1}/{args.rounds}")
        shift = n % len(targets)
        for workload in WORKLOADS:
            for size in args.size_list:
                for target in targets[shift:] + targets[:shift]:
                    sample = try_measure(args, target, workload, size)
                    if sample is not None:
                        results.add(workload, size, target.name, sample)
                        say(sample_line(workload, size, target.name, sample))
    return results


def try_measure(
    args: argparse.Namespace, target: Target, workload: str, size: int
) -> Sample | None:
    """One measurement; None if the target failed, now or before (it is skipped from then on):
    a proxy that breaks under one workload still leaves the others' figures."""
    if target.failure is not None:
        return None
    try:
        return measure(args, target, workload, size)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        mark_failed(target, f"{workload} {size_label(size)}: {exc}")
        return None


def mark_failed(target: Target, what: str) -> None:
    tail = target.proc.log_tail(5) if target.proc else ""
    exited = "" if target.proc is None or target.proc.is_alive() else " (the proxy exited)"
    target.failure = f"{what}{exited}; its log: {tail or '(empty)'}"
    say(f"  {target.name} FAILED, skipped from now on: {target.failure}")


def warm_up(args: argparse.Namespace, targets: list[Target]) -> None:
    """One request of each workload and size per target: page cache, pools, socket buffers,
    and a first proof that every target answers each of them."""
    for target in targets:
        for workload in WORKLOADS:
            for size in args.size_list:
                if target.failure is None:
                    try:
                        client_json(args.load_cpu, client_args(target.port, workload, size, 1))
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        mark_failed(target, f"warm-up {workload} {size_label(size)}: {exc}")


def strace_all(
    args: argparse.Namespace, targets: list[Target], tmp: Path
) -> dict[str, dict[str, int]]:
    """Syscall counts per "proxy workload" for one request of the largest size."""
    size = max(args.size_list)
    counts: dict[str, dict[str, int]] = {}
    for target in targets:
        for workload in WORKLOADS:
            if target.proc is None or target.failure is not None:
                continue
            work = partial(client_json, args.load_cpu, client_args(target.port, workload, size, 1))
            out = tmp / f"{target.name}-{workload}.strace"
            try:
                counts[f"{target.name} {workload}"] = trace_syscalls(
                    target.proc.pid, out, work, TRACE_CALLS
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                mark_failed(target, f"strace {workload} {size_label(size)}: {exc}")
    return counts


def sample_line(workload: str, size: int, name: str, sample: Sample) -> str:
    line = f"  {workload:<8} {size_label(size):>8} {name:<14} {sample.mbps:8.0f} MB/s"
    if sample.cpu_s_per_gib is not None and sample.cpu_us_per_req is not None:
        line += f"  {sample.cpu_s_per_gib:.3f} CPU s/GiB  {sample.cpu_us_per_req:9.1f} CPU us/req"
    line += f"  proxy CPU {sample.proxy_pct:3.0f}%, its core busy {sample.core_busy_pct:3.0f}%"
    return line


def median_of(samples: list[Sample], attr: str) -> float | None:
    values = [v for s in samples if (v := getattr(s, attr)) is not None]
    return statistics.median(values) if values else None


def workload_table(results: Results, targets: list[Target], workload: str, sizes: list[int]) -> str:
    rows = []
    for size in sizes:
        base = results.get(workload, size, "haproxy")
        base_rate, base_cpu = median_of(base, "mbps"), median_of(base, "cpu_s_per_gib")
        for t in targets:
            samples = results.get(workload, size, t.name)
            if not samples:
                rows.append([size_label(size), t.name, "failed", *["-"] * 6])
                continue
            rate = median_of(samples, "mbps")
            cpu = median_of(samples, "cpu_s_per_gib")
            per_req = median_of(samples, "cpu_us_per_req")
            proxy_pct = median_of(samples, "proxy_pct")
            busy = median_of(samples, "core_busy_pct")
            rates = [s.mbps for s in samples]
            rows.append(
                [
                    size_label(size),
                    t.name,
                    f"{rate:,.0f}",
                    f"{min(rates):,.0f}-{max(rates):,.0f}",
                    f"{cpu:.3f}" if cpu is not None else "-",
                    f"{per_req:,.1f}" if per_req is not None else "-",
                    f"{proxy_pct:.0f} / {busy:.0f}",
                    ratio(rate, base_rate),
                    ratio(cpu, base_cpu),
                ]
            )
    return markdown_table(TABLE_HEADER, rows)


def crossover_table(results: Results, sizes: list[int]) -> str:
    """zdlb-splice over zdlb-nosplice per size: below 1x CPU/GiB, splicing pays off."""
    rows = []
    for size in sizes:
        row = [size_label(size)]
        for workload in WORKLOADS:
            spliced = results.get(workload, size, "zdlb-splice")
            plain = results.get(workload, size, "zdlb-nosplice")
            for attr in ("cpu_s_per_gib", "mbps"):
                row.append(ratio(median_of(spliced, attr), median_of(plain, attr)))
        rows.append(row)
    header = ["size", *(f"{w} {m}" for w in WORKLOADS for m in ("CPU/GiB", "MB/s"))]
    return markdown_table(header, rows)


def strace_table(counts: dict[str, dict[str, int]], size: int) -> str:
    calls = [c for c in TRACE_CALLS if any(c in found for found in counts.values())]
    rows = [[name, *(str(found.get(c, 0)) for c in calls)] for name, found in counts.items()]
    return markdown_table([f"syscalls, one {size_label(size)} request", *calls], rows)


def render_report(
    args: argparse.Namespace,
    targets: list[Target],
    results: Results,
    counts: dict[str, dict[str, int]],
) -> str:
    sizes = args.size_list
    per_size = ", ".join(f"{size_label(s)} x{requests_for(args, s)}" for s in sizes)
    lines = [
        f"## HTTP bulk, {utc_now()}",
        "",
        machine_line(),
        f"- setup: nginx (sendfile, one worker) behind each proxy; requests per measurement on "
        f"one keep-alive connection: {per_size}; {args.rounds} rounds interleaved, medians; "
        f"client reads and sends 1 MiB at a time; proxy on CPU{args.proxy_cpu}, nginx and "
        f"client on CPU{args.load_cpu}; pipes 1 MiB; zdlb-splice: splice_min_bytes = "
        f"{args.min_bytes}, zdlb-nosplice: false; uploads read whole by nginx before it answers",
        f"- command: `{shlex.join(['benchmarks/bulk_http.sh', *sys.argv[1:]])}`",
        "",
    ]
    for workload in WORKLOADS:
        lines += [f"**{workload}**", "", workload_table(results, targets, workload, sizes), ""]
    lines += [
        "**zdlb-splice / zdlb-nosplice** (CPU/GiB below 1x: splicing pays off at that size)",
        "",
        crossover_table(results, sizes),
        "",
    ]
    if counts:
        lines += [strace_table(counts, max(sizes)), ""]
    notes = [f"- {t.name} failed: {t.failure}" for t in targets if t.failure is not None]
    for t in targets:  # zdlb logs at warning and up, HAProxy at its default: normally silent
        if t.proc is not None and (tail := t.proc.log_tail(3)):
            notes.append(f"- {t.name} logged (last lines): `{' / '.join(tail.splitlines())}`")
    if notes:
        lines += [*notes, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_signal)
    reg = ProcRegistry()
    tmp = Path(tempfile.mkdtemp(prefix="zdlb-bulk-http-"))
    try:
        tmp.chmod(0o755)  # nginx's workers run as nobody when started as root
        for size in args.size_list:
            write_file(tmp / "www" / f"f-{size}.bin", size)
        targets = start_targets(args, reg, tmp)
        warm_up(args, targets)
        results = run_rounds(args, targets)
        counts = {} if args.no_strace else strace_all(args, targets, tmp)
        report = render_report(args, targets, results, counts)
        say(report)
        if args.results:
            append_results(report)
    finally:
        reg.stop_all()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
