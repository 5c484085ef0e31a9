"""The ``zdlb`` command: ``run``, ``check``, ``ctl``, ``deploy``, ``demo`` and ``demo-app``.

Exit codes: 0 success, 2 invalid config or usage (argparse's convention), 1 a runtime failure
such as a busy port. Errors are one readable message, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from zdlb import __version__
from zdlb.budget import FDS_PER_CLIENT, default_maxconn, open_file_limit, reserved_fds
from zdlb.cluster.fleet import join_fleet
from zdlb.config.load import load_config
from zdlb.config.model import MAX_WORKERS, Config, LogFormat, LoggingConfig
from zdlb.config.summary import describe
from zdlb.control.server import ControlServer
from zdlb.daemon.ctl import CTL_DESCRIPTION, CTL_HELP, add_ctl_arguments, run_ctl_command
from zdlb.daemon.demo_app import DEMO_HOSTS, DemoVhost, start_demo_hosts, vhosts_of
from zdlb.daemon.demo_deploy import add_parser as add_demo_deploy_parser
from zdlb.daemon.demo_deploy import run_demo_deploy
from zdlb.daemon.demo_fleet import fleet_count, run_fleet_demo_command
from zdlb.daemon.demo_tls import with_https_listener
from zdlb.daemon.lifecycle import (
    EXIT_OK,
    install_signal_handlers,
    raise_open_file_limit,
    run_loop,
    serve,
)
from zdlb.daemon.logs import setup_logging
from zdlb.daemon.master import serve_master
from zdlb.daemon.reload import Reloader, single_actions
from zdlb.daemon.runtime import Runtime, build_runtime, worker_count
from zdlb.daemon.upgrade import (
    UPGRADE_FD_ENV,
    Launch,
    Upgrader,
    ready_message,
    receive_connections,
    receive_takeover,
    report,
)
from zdlb.daemon.worker import WorkerOptions
from zdlb.deploy.cli import add_parser as add_deploy_parser
from zdlb.deploy.cli import run_deploy
from zdlb.errors import ConfigError, ZdlbError

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
# The repository's config.toml is the demo's config (and the reference for every key).
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zdlb", description="zdlb: a zero-downtime HTTP/1.1 and TCP load balancer."
    )
    parser.add_argument("--version", action="version", version=f"zdlb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the load balancer in the foreground")
    run.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    _add_runtime_options(run)

    check = commands.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")

    add_ctl_arguments(commands.add_parser("ctl", help=CTL_HELP, description=CTL_DESCRIPTION))

    add_deploy_parser(commands)
    add_demo_deploy_parser(commands)

    demo = commands.add_parser(
        "demo",
        help="start two demo hosts (main + backup vhosts) behind zdlb on :8000 (HTTPS :8443)",
    )
    demo.add_argument("-c", "--config", type=Path, default=DEMO_CONFIG, metavar="FILE")
    demo.add_argument(  # issue 16: zdlb/daemon/demo_fleet.py
        "--fleet", type=fleet_count, metavar="N", help="N instances sharing state through etcd"
    )
    _add_runtime_options(demo)

    demo_app = commands.add_parser(
        "demo-app",
        help="serve demo hosts' vhosts without zdlb (a host per container)",
        description="Serve the demo's app vhosts without the load balancer, on the ports "
        "`zdlb demo` uses: "
        + ", ".join(f"{s.host} {s.vhost} ({s.version}) :{s.port}" for s in vhosts_of(None))
        + ". docker-compose.yml runs one host per container.",
    )
    demo_app.add_argument(
        "--host", choices=DEMO_HOSTS, help="only this host's two vhosts (default: every host)"
    )
    demo_app.add_argument(
        "--bind",
        type=_ip_literal,
        default=DEMO_APP_BIND,
        metavar="IP",
        help=f"the address to listen on ({DEMO_APP_BIND}; 0.0.0.0 in a container)",
    )
    _add_runtime_options(demo_app, has_config=False)
    return parser


def _ip_literal(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None
    return text


def _add_runtime_options(parser: argparse.ArgumentParser, *, has_config: bool = True) -> None:
    """The event loop and logging options; ``has_config``: they override a config's [logging]."""
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (uvloop)"
    )
    defaults = LoggingConfig()
    format_help, level_help = (
        ("overrides [logging] format", "overrides [logging] level")
        if has_config
        else (f"log line format ({defaults.format.value})", f"log level ({defaults.level})")
    )
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat], help=format_help)
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help=level_help
    )
    if has_config:
        parser.add_argument(
            "--no-access-log", action="store_true", help="overrides [logging] access_log"
        )
        parser.add_argument(
            "--workers",
            type=_worker_count,
            metavar="N",
            help="overrides `workers` (default: one per core this process may use)",
        )


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_WORKERS}, got {text!r}")
    return count


def describe_budget(config: Config) -> str:
    """`zdlb check`'s line on the connection budget (budget.py): the limit this process would
    run with here, and where it comes from."""
    nofile = open_file_limit()
    fits = default_maxconn(config, nofile)
    if config.maxconn is None:
        return (
            f"maxconn: {fits} client connections per process (open-file limit {nofile}:"
            f" {reserved_fds(config)} reserved, {FDS_PER_CLIENT} per client)"
        )
    warning = "" if config.maxconn <= fits else f"; WARNING: open-file limit {nofile} fits {fits}"
    return f"maxconn: {config.maxconn} client connections per process{warning}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo-app":  # no config file: the demo's vhosts are built in
        return _run_demo_apps(args)
    if args.command == "demo-deploy":
        return run_demo_deploy(args)
    if args.command == "demo" and args.fleet:  # issue 16: etcd and N instances, no -c
        return run_fleet_demo_command(args)
    if args.command == "ctl":  # daemon/entry.py comes here without importing this module
        return run_ctl_command(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"zdlb: invalid config {exc}", file=sys.stderr)
        return EXIT_CONFIG
    match args.command:
        case "check":
            print(describe(config))
            print(describe_budget(config))
            print("config OK")
            return EXIT_OK
        case "run":
            return _run(args, config, _run_daemon)
        case "demo":
            return _run(args, config, _run_demo)  # its HTTPS listener: _run_demo
        case "deploy":
            return run_deploy(args, config)
    raise AssertionError(args.command)  # argparse only accepts the commands above


def _run(
    args: argparse.Namespace,
    config: Config,
    body: Callable[[Config, int, WorkerOptions, Launch], Coroutine[Any, Any, None]],
) -> int:
    logging_config = config.logging
    options = WorkerOptions(
        loop=args.loop,
        log_level=args.log_level or logging_config.level,
        log_format=LogFormat(args.log_format) if args.log_format else logging_config.format,
        access_log=logging_config.access_log and not args.no_access_log,
        workers_override=args.workers,  # a reload may change `workers` only without it
    )
    setup_logging(options.log_level, options.log_format, access_log=options.access_log)
    raise_open_file_limit()
    workers = worker_count(config, args.workers)
    return run_loop(args.loop, body(config, workers, options, _launch_of(args)))


def _launch_of(args: argparse.Namespace) -> Launch:
    """How to start this daemon again, the same way (``zdlb ctl upgrade``)."""
    options = ["--loop", args.loop]
    if args.workers is not None:
        options += ["--workers", str(args.workers)]
    if args.log_format:
        options += ["--log-format", args.log_format]
    if args.log_level:
        options += ["--log-level", args.log_level]
    if args.no_access_log:
        options.append("--no-access-log")
    return Launch(args.config.absolute(), options)


async def _serve(
    config: Config,
    stop: asyncio.Event,
    workers: int,
    options: WorkerOptions,
    launch: Launch | None = None,
) -> None:
    """Bind (or take over an upgraded predecessor's sockets), then serve in this process (one
    worker) or through worker processes."""
    inherited, channel = None, None
    if (fd := os.environ.pop(UPGRADE_FD_ENV, None)) is not None:
        inherited, channel = await asyncio.to_thread(receive_takeover, int(fd))

    def actions(runtime: Runtime, control: ControlServer | None, stop: asyncio.Event) -> Reloader:
        reloader = single_actions(runtime, control, stop)
        if launch is not None:
            upgrader = Upgrader(runtime, launch, stop)
            upgrader.control_socket = lambda: control.listening_socket if control else None
            reloader.upgrade_action = upgrader.upgrade
        return reloader

    fleet = None
    try:
        runtime = build_runtime(config, workers=workers, inherited=inherited)
        if config.cluster is not None:  # issue 16: the fleet's state before anything serves
            fleet = runtime.fleet = await join_fleet(config.cluster, runtime.servers)
        if channel is not None:
            runtime.on_ready.append(lambda: _ready(channel, runtime, True))
        if workers == 1:
            await serve(runtime, stop, actions=actions)
        else:
            await serve_master(runtime, stop, workers, options, actions)
    except ZdlbError as exc:
        if channel is not None and channel.fileno() != -1:
            report(channel, {"error": str(exc)})
        raise
    finally:
        if fleet is not None:
            await fleet.close()


def _ready(channel: socket.socket, runtime: Runtime, takes_connections: bool) -> None:
    """An upgrade's new process serves: say so, and take the idle connections (a master deals
    them out to its workers: upgrade.py ``receive_connections``)."""
    report(channel, ready_message(runtime, takes_connections), close=not takes_connections)
    if takes_connections:
        task = asyncio.get_running_loop().create_task(receive_connections(channel, runtime))
        runtime.background.add(task)
        task.add_done_callback(runtime.background.discard)


async def _run_daemon(config: Config, workers: int, options: WorkerOptions, launch: Launch) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    log.info("started config=%s workers=%d pid=%d", config.source, workers, os.getpid())
    await _serve(config, stop, workers, options, launch)
    log.info("stopped")


async def _run_demo(config: Config, workers: int, options: WorkerOptions, launch: Launch) -> None:
    config = await asyncio.to_thread(with_https_listener, config)  # runs openssl: off the loop
    hosts = await start_demo_hosts()
    try:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        # The command as the user can type it: `make demo` runs .venv/bin/zdlb, not on PATH.
        program = sys.argv[0] if Path(sys.argv[0]).name == "zdlb" else "zdlb"
        help_text = DEMO_HELP.format(config=config.source, program=program)
        if any(listener.name == "https" for listener in config.listeners):
            help_text += DEMO_HTTPS_HELP.format(config=Path(config.source).parent)
        print(help_text, file=sys.stderr, flush=True)
        await _serve(config, stop, workers, options)
    finally:
        hosts.close()
        await hosts.wait_closed()


DEMO_HELP = """\
zdlb demo: load balancer on http://127.0.0.1:8000 (config {config})
  demo hosts: front-1 main (v1) 127.0.0.1:8081, backup (v2) :8091; front-2 main :8082, backup
  :8092. Each backup vhost is its main's pair: the same host's other version.
Sticky users and a deploy by hand (another terminal):
  curl -s -c jar -b jar http://127.0.0.1:8000/     # pins you to front-1 or front-2 (SERVERID)
  {program} ctl -c {config} flip app/front-1    # front-1's users move to its v2
  curl -s -c jar -b jar http://127.0.0.1:8000/     # still your host (v2 if it is front-1)
  {program} ctl -c {config} wait app/front-1 idle 30
  curl -s -X POST 'http://127.0.0.1:8081/demo/deploy?version=v3&seconds=2'  # deploy v3
  {program} ctl -c {config} wait app/front-1 up 30
  {program} ctl -c {config} flip app/front-1    # front-1's main (v3) serves again
A crash (POST /demo/stop?seconds=N: a vhost refuses connections for N s, 1..600, default 30):
  curl -s -X POST 'http://127.0.0.1:8081/demo/stop?seconds=30'  # front-1's v2 stands in
  {program} ctl -c {config} show servers
Stop with Ctrl-C."""
DEMO_HTTPS_HELP = """
HTTPS on https://localhost:8443 (a certificate made at start, in {config}/demo-tls/):
  curl -s --cacert {config}/demo-tls/ca.pem https://localhost:8443/"""


# Loopback, as `zdlb demo` binds; a container passes --bind 0.0.0.0 so the balancer reaches it.
DEMO_APP_BIND = "127.0.0.1"


def _run_demo_apps(args: argparse.Namespace) -> int:
    """``zdlb demo-app``: no config file, so logging is the options over the config defaults."""
    defaults = LoggingConfig()
    log_format = LogFormat(args.log_format) if args.log_format else defaults.format
    setup_logging(args.log_level or defaults.level, log_format)
    return run_loop(args.loop, _serve_demo_apps(args.bind, vhosts_of(args.host)))


async def _serve_demo_apps(bind_host: str, vhosts: Sequence[DemoVhost]) -> None:
    hosts = await start_demo_hosts(bind_host, vhosts)
    try:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        lines = []
        for server in hosts.servers:
            spec, (host, port) = server.spec, server.addr
            vhost = f"{spec.host}/{spec.vhost}"
            addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("demo.serving vhost=%s version=%s addr=%s", vhost, spec.version, addr)
            lines.append(f"  {vhost:<15} {spec.version}  http://{addr}/")
        help_text = DEMO_APP_HELP.format(vhosts="\n".join(lines))
        print(help_text, file=sys.stderr, flush=True)
        await stop.wait()
        log.info("demo.stopping vhosts=%d", len(hosts.servers))
    finally:
        hosts.close()
        await hosts.wait_closed()


DEMO_APP_HELP = """\
zdlb demo-app: demo vhosts without the load balancer
{vhosts}
Each answers GET / with its host, vhost and version, GET /health with "ok";
POST /demo/stop?seconds=N refuses connections for N s (1..600), then serves again;
POST /demo/deploy?version=V&seconds=N the same, then answers as version V (&broken=health:
failing /health; &broken=500: answering 500).
Stop with Ctrl-C (or SIGTERM)."""


if __name__ == "__main__":
    sys.exit(main())
