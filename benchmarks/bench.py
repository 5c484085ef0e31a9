"""zdlb benchmark harness: direct vs zdlb vs HAProxy vs nginx, interleaved, medians.

Starts two nginx backends (CPU0), the selected proxies (CPU1), then for each round, workload
and target (target order rotated each round) runs wrk on CPU0 and samples the proxy's CPU time.
Then measures RSS per idle keep-alive connection (idle_conns.py), prints a table and appends a
dated section to RESULTS.md. Everything it starts is stopped in a finally block; its temp dir
is removed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks import targets as tg
from benchmarks.procs import ProcRegistry, busy_pct, cpu_times, raise_nofile_limit
from benchmarks.report import HEADER, IdleRow, plain_table, results_section, summarize, table_rows
from benchmarks.wrkrun import WORKLOADS, RunResult, WrkError, WrkParams, run_wrk

HERE = Path(__file__).resolve().parent
QUIET_BUSY_PCT = 10.0  # a CPU busier than this before the run means someone else is using it
PAUSE_S = 0.5  # between runs, so TIME_WAIT teardown of a `close` run is not billed to the next


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.sh", description="zdlb vs HAProxy vs nginx, interleaved rounds."
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument(
        "--only",
        default=",".join(tg.DEFAULT_TARGETS),
        help=f"comma list among {','.join(tg.ALL_TARGETS)}"
        f" (default {','.join(tg.DEFAULT_TARGETS)})",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma list among {','.join(WORKLOADS)} (default all)",
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target, 0: none")
    p.add_argument(
        "--idle-conns",
        type=int,
        default=5000,
        help="idle keep-alive connections for the RSS test, 0: skip (default 5000)",
    )
    p.add_argument("--idle-timeout", type=float, default=120.0, help="seconds per proxy")
    p.add_argument(
        "--zdlb-cmd",
        default=tg.DEFAULT_ZDLB_CMD,
        help="zdlb command line; {config} becomes the generated TOML path",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run zdlb at git revision REV (target zdlb-base, same config as zdlb): the "
        "before/after of a change in the same interleaved run",
    )
    p.add_argument("--zdlb-ready-timeout", type=float, default=tg.READY_TIMEOUT_S)
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU for the proxies (default 1)")
    p.add_argument("--load-cpu", type=int, default=0, help="CPU for wrk+backends (default 0)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset at all")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs for debugging")
    args = p.parse_args(argv)
    args.only = _pick(p, args.only, tg.ALL_TARGETS, "--only")
    if args.baseline:
        args.only = (*args.only, tg.BASELINE_TARGET)
    args.workloads = _pick(p, args.workloads, tuple(WORKLOADS), "--workloads")
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be >= 1")
    return args


def _pick(p: argparse.ArgumentParser, value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        p.error(f"{flag}: unknown or empty {unknown}; choose among {','.join(allowed)}")
    return [a for a in allowed if a in chosen]  # canonical order


def say(text: str) -> None:
    print(text, flush=True)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


def _version(argv: list[str], marker: str) -> str:
    """First output line of a `--version`-style command containing marker, else 'not found'."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    for line in (done.stdout + done.stderr).splitlines():
        if marker in line:
            return line.strip()
    return "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(args: argparse.Namespace) -> list[tuple[str, str]]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    rev = _version(["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %s"], "")
    if rev in ("unknown", "not found"):
        rev = "no commit yet"
    dirty = _version(["git", "-C", str(HERE.parent), "status", "--porcelain", "zdlb"], "")
    if dirty not in ("unknown", "not found"):
        rev += " (plus uncommitted changes under zdlb/)"
    pinning = (
        "none"
        if args.no_pin
        else f"proxies on CPU{args.proxy_cpu}, wrk+backends on CPU{args.load_cpu}"
    )
    return [
        ("machine", f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}"),
        (
            "versions",
            "; ".join(
                [
                    _version(["haproxy", "-v"], "version"),
                    _version(["nginx", "-v"], "version"),
                    f"Python {platform.python_version()}",
                    f"uvloop {_package_version('uvloop')}",
                    f"httptools {_package_version('httptools')}",
                    _version(["wrk", "-v"], "wrk"),
                ]
            ),
        ),
        ("zdlb", rev),
        (
            "setup",
            f"{args.rounds} round(s) x {args.duration} s, wrk -t{args.threads} "
            f"-c{args.connections} --latency, pinning: {pinning}; medians",
        ),
    ]


def quiet_check(seconds: float = 1.0) -> str:
    """Busy percent of every CPU over a short sample, taken before anything is started.

    Another benchmark or test run on the box skews every figure; this makes it visible.
    """
    cpus = range(os.cpu_count() or 1)
    before = {cpu: cpu_times(cpu) for cpu in cpus}
    time.sleep(seconds)
    busy = {cpu: busy_pct(before[cpu], cpu_times(cpu)) for cpu in cpus}
    text = ", ".join(f"CPU{cpu} {pct:.0f}%" for cpu, pct in busy.items())
    if max(busy.values()) > QUIET_BUSY_PCT:
        say(f"WARNING: the machine is not idle before the run ({text}): figures will be noisy")
    return text


def start_targets(args: argparse.Namespace, reg: ProcRegistry, tmp: Path) -> list[tg.Target]:
    load_cpu = None if args.no_pin else args.load_cpu
    proxy_cpu = None if args.no_pin else args.proxy_cpu
    b1 = tg.start_backend(reg, tmp, "backend1", load_cpu)
    b2 = tg.start_backend(reg, tmp, "backend2", load_cpu)
    backends = (b1.port, b2.port)
    say(f"backends up on :{b1.port} and :{b2.port}")
    started: list[tg.Target] = []
    for name in args.only:
        if name == "direct":
            target = tg.Target("direct", b1.port)
        elif name in ("haproxy", "haproxy-routes"):
            target = tg.start_haproxy(reg, tmp, backends, proxy_cpu, name)
        elif name == "nginx":
            target = tg.start_nginx_proxy(reg, tmp, backends, proxy_cpu)
        elif name == tg.BASELINE_TARGET:
            root = tg.checkout(args.baseline, tmp / "baseline")
            target = tg.start_zdlb(
                reg,
                tmp,
                backends,
                proxy_cpu,
                args.zdlb_cmd,
                args.zdlb_ready_timeout,
                name,
                template="zdlb",
                root=root,
            )
        else:
            target = tg.start_zdlb(
                reg, tmp, backends, proxy_cpu, args.zdlb_cmd, args.zdlb_ready_timeout, name
            )
        state = "ready" if target.is_runnable else f"SKIPPED: {target.skip_reason}"
        say(f"{name:8} :{target.port} {state}")
        if not target.is_runnable and target.proc is not None and target.proc.log_tail(1):
            say("    " + target.proc.log_tail(8).replace("\n", "\n    "))
        started.append(target)
    return started


def progress_line(result: RunResult, proxy_cpu: int | None) -> str:
    line = (
        f"round {result.round_no} {result.workload:9} {result.target:8} {result.rps:9,.0f} rps"
        f"  p99 {result.p99_ms:6.2f} ms"
    )
    if result.cpu_us_per_req is not None and result.cpu_pct is not None:
        line += f"  {result.cpu_us_per_req:6.1f} us/req  CPU {result.cpu_pct:3.0f}%"
    if result.proxy_core_busy_pct is not None:
        line += f"  CPU{proxy_cpu} busy {result.proxy_core_busy_pct:3.0f}%"
    return f"{line}  errors {result.errors}"


def warm_up(targets: list[tg.Target], params: WrkParams, duration_s: int) -> None:
    """One short keep-alive run per target: fills pools and caches; a failure skips it."""
    for target in targets:
        if target.is_runnable:
            try:
                run_wrk(target, WORKLOADS["keepalive"], params, round_no=0, duration_s=duration_s)
            except WrkError as exc:
                target.skip_reason = f"warm-up failed: {exc}"
                say(f"{target.name}: {target.skip_reason}")


def run_rounds(args: argparse.Namespace, targets: list[tg.Target], tmp: Path) -> list[RunResult]:
    """Every round runs every workload against every target, target order rotated per round."""
    load_cpu = None if args.no_pin else args.load_cpu
    proxy_cpu = None if args.no_pin else args.proxy_cpu
    params = WrkParams(args.threads, args.connections, load_cpu, proxy_cpu, tmp)
    if args.warmup > 0:
        warm_up(targets, params, args.warmup)
    results: list[RunResult] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(targets)
        order = targets[shift:] + targets[:shift]  # interleave: nobody always runs first
        for workload in args.workloads:
            for target in order:
                target.check_alive()
                if not target.is_runnable:
                    continue
                time.sleep(PAUSE_S)
                try:
                    result = run_wrk(
                        target,
                        WORKLOADS[workload],
                        params,
                        round_no=round_no,
                        duration_s=args.duration,
                    )
                except WrkError as exc:
                    target.skip_reason = str(exc)
                    say(f"round {round_no} {workload:9} {target.name:8} FAILED: {exc}")
                    continue
                target.check_alive()
                results.append(result)
                say(progress_line(result, proxy_cpu))
    return results


def idle_one(args: argparse.Namespace, target: tg.Target) -> IdleRow:
    """Run idle_conns against one live proxy in a child process (its own fd limit, CPU0)."""
    assert target.proc is not None
    argv = [sys.executable, "-m", "benchmarks.idle_conns", "--json"]
    argv += ["--port", str(target.port), "--pid", str(target.proc.pid)]
    argv += ["-n", str(args.idle_conns), "--timeout", str(args.idle_timeout)]
    if not args.no_pin:
        argv = tg.taskset(args.load_cpu, argv)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            cwd=tg.REPO_ROOT,
            timeout=args.idle_timeout + 30,
        )
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
        return IdleRow(target.name, 0, None, f"failed: {exc!r}")
    note = (
        f"RSS {info['rss_before_bytes'] / 1e6:.1f} -> {info['rss_after_bytes'] / 1e6:.1f} MB;"
        f" {info['failed']} failed, {info['closed_by_proxy']} closed by proxy"
    )
    if info["first_error"]:
        note += f"; first error {info['first_error'][:60]}"
    return IdleRow(target.name, info["connections"], info["bytes_per_conn"], note)


def run_idle(args: argparse.Namespace, targets: list[tg.Target]) -> list[IdleRow]:
    """RSS per idle keep-alive connection, for every proxy still running."""
    rows: list[IdleRow] = []
    for target in targets:
        target.check_alive()
        if target.proc is None:
            continue
        if not target.is_runnable:
            rows.append(IdleRow(target.name, 0, None, f"skipped: {target.skip_reason}"))
            continue
        row = idle_one(args, target)
        per_conn = "-" if row.bytes_per_conn is None else f"{row.bytes_per_conn / 1000:.2f}"
        say(f"idle     {target.name:8} {row.connections} held, {per_conn} KB/conn ({row.note})")
        rows.append(row)
        time.sleep(PAUSE_S)
    return rows


def check_tools(args: argparse.Namespace) -> list[str]:
    needed = ["nginx", "wrk"] + ([] if args.no_pin else ["taskset"])
    needed += ["haproxy"] if "haproxy" in args.only else []
    return [tool for tool in needed if shutil.which(tool) is None]


def print_summary(
    targets: list[tg.Target], results: list[RunResult], workloads: list[str]
) -> list[list[str]]:
    """Print the medians table; return its rows for RESULTS.md."""
    with_results = {r.target for r in results}
    skipped = {t.name: t.skip_reason or "" for t in targets if t.name not in with_results}
    rows = table_rows(summarize(results), skipped, workloads)
    say("")
    say(plain_table(HEADER, rows))
    for t in targets:
        if t.name in with_results and t.skip_reason:
            say(f"note: {t.name} stopped early: {t.skip_reason}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = check_tools(args)
    if missing:
        say(f"missing tools: {' '.join(missing)} (benchmarks/run.sh installs them)")
        return 2
    if not args.no_pin and len(os.sched_getaffinity(0)) < 2:
        say("fewer than 2 CPUs available: running unpinned (--no-pin)")
        args.no_pin = True
    raise_nofile_limit()  # inherited by every proxy we start
    if not args.no_pin:
        os.sched_setaffinity(0, {args.load_cpu})  # keep the harness itself off the proxy's core
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    command = "python -m benchmarks.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = dt.datetime.now(dt.UTC)
    busy_before = quiet_check()
    tmp = Path(tempfile.mkdtemp(prefix="zdlb-bench-"))
    reg = ProcRegistry()
    try:
        targets = start_targets(args, reg, tmp)
        results = run_rounds(args, targets, tmp)
        idle = run_idle(args, targets) if args.idle_conns > 0 else []
    finally:
        reg.stop_all()
        if args.baseline:
            tg.remove_checkout(tmp / "baseline")
        if args.keep_tmp:
            say(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = print_summary(targets, results, args.workloads)
    if not args.no_results:
        machine = [*machine_facts(args), ("busy before start (1 s sample)", busy_before)]
        section = results_section(
            title=f"{started:%Y-%m-%d %H:%M} UTC",
            machine=machine,
            command=command,
            rows=rows,
            idle=idle,
        )
        with args.results.open("a") as out:
            out.write("\n" + section)
        say(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
