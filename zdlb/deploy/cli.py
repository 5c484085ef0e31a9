"""``zdlb deploy``: the command line of a rolling deploy (arguments, output mode, exit status).

Exit status: 0 the deploy (or resume, roll-back) completed; 1 it failed, was refused (another
deploy holds the lock) or the daemon could not be reached, with one line naming the host, the
step and the reason; 2 usage or config errors; 130 interrupted (Ctrl-C, SIGTERM), the deploy
left for ``--resume`` or ``--rollback``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from zdlb.config.model import Config, LogFormat
from zdlb.daemon.logs import setup_logging
from zdlb.deploy.actions import parse_statuses
from zdlb.deploy.client import ControlClient, ControlUnreachable, DeployCommandRefused
from zdlb.deploy.driver import Deployer, DeployFailed, DeployOptions
from zdlb.deploy.plan import Target
from zdlb.deploy.progress import JsonProgress, LogProgress, Progress, TtyProgress

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
# A live line's elapsed time is redrawn this often on a terminal.
TICK_S = 0.5

DESCRIPTION = """\
A rolling deploy through the control socket, one host (a main server and its pair) at a time:
check that the member serving meanwhile is up, take the deploy lock, flip the host's users to
its pair, wait until the main is idle, run COMMAND for it (environment: ZDLB_BACKEND,
ZDLB_SERVER, ZDLB_ADDRESS, ZDLB_PAIR, ZDLB_PAIR_ADDRESS, ZDLB_MAIN, ZDLB_TO), wait until it
passes its checks, send the --verify request to it directly, flip the users back and confirm
it serves. On a failure the host's users stay on (or go back to) its last good version,
--on-failure runs, and zdlb deploy exits 1 naming the step. `zdlb ctl show deploy` shows the
state; --resume continues an interrupted or failed deploy, --rollback puts every host it
touched back on its last good version.
"""


def add_parser(commands: Any) -> None:
    """Add ``deploy`` to the ``zdlb`` subcommands (``commands``: argparse's subparsers)."""
    deploy = commands.add_parser(
        "deploy",
        help="a rolling deploy: each host's users move to its pair while COMMAND runs",
        description=DESCRIPTION,
    )
    deploy.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    deploy.add_argument("backend", metavar="BACKEND")
    deploy.add_argument(
        "servers", nargs="*", metavar="SERVER", help="only these hosts (default: every paired main)"
    )
    deploy.add_argument("--run", metavar="COMMAND", help="deploys one server (/bin/sh -c)")
    deploy.add_argument(
        "--to",
        choices=[t.value for t in Target],
        default=Target.MAIN.value,
        help="main (default): the main gets the new version while its pair serves, then takes "
        "the users back; backup: the pair gets it while the main serves, then takes the users",
    )
    deploy.add_argument("--verify", metavar="PATH", help="GET PATH from the server directly")
    deploy.add_argument(
        "--expect-status",
        type=_statuses,
        default=((200, 399),),
        metavar="LIST",
        help="statuses --verify accepts, e.g. 200,301-308 (default 200-399)",
    )
    deploy.add_argument("--on-failure", metavar="COMMAND", help="runs when a host fails")
    deploy.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    for name, default, what in (
        ("idle", 30.0, "the server to finish what it serves"),
        ("run", 300.0, "COMMAND"),
        ("up", 60.0, "the server to pass its checks"),
        ("verify", 5.0, "the --verify answer"),
    ):
        deploy.add_argument(
            f"--{name}-timeout",
            type=_seconds,
            default=default,
            metavar="S",
            help=f"wait at most S s for {what} ({default:g})",
        )
    again = deploy.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue an interrupted or failed deploy"
    )
    again.add_argument(
        "--rollback",
        action="store_true",
        help="every host an unfinished deploy touched serves its last good version again",
    )


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600], got {text!r}")
    return seconds


def _statuses(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return parse_statuses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_deploy(args: argparse.Namespace, config: Config) -> int:
    """``zdlb deploy``: the exit status."""
    if config.control.socket is None:
        print(f"zdlb: {config.source} configures no [control] socket", file=sys.stderr)
        return EXIT_USAGE
    if args.run is None and not args.rollback:
        print("zdlb deploy: --run COMMAND is required (except with --rollback)", file=sys.stderr)
        return EXIT_USAGE
    if args.verify is not None and not args.verify.startswith("/"):
        print(f"zdlb deploy: --verify {args.verify!r} must start with '/'", file=sys.stderr)
        return EXIT_USAGE
    backends = {b.name: b for b in config.backends}
    if args.backend not in backends:
        known = ", ".join(sorted(backends))
        print(
            f"zdlb deploy: no backend {args.backend!r} in {config.source} ({known})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    addresses = {s.name: s.address for s in backends[args.backend].servers}
    options = DeployOptions(
        backend=args.backend,
        servers=tuple(args.servers),
        to=Target(args.to),
        run=args.run,
        verify_path=args.verify,
        expect_status=args.expect_status,
        on_failure=args.on_failure,
        idle_timeout_s=args.idle_timeout,
        run_timeout_s=args.run_timeout,
        up_timeout_s=args.up_timeout,
        verify_timeout_s=args.verify_timeout,
    )
    progress: Progress
    if args.json:
        progress = JsonProgress(sys.stdout)
    elif sys.stderr.isatty():
        progress = TtyProgress(sys.stderr, [])
    else:
        setup_logging("info", LogFormat.TEXT)
        progress = LogProgress(sys.stdout)
    deployer = Deployer(ControlClient(config.control.socket), options, progress, addresses)
    if args.rollback:
        action = deployer.rollback()
    else:
        action = deployer.resume() if args.resume else deployer.run()
    return asyncio.run(_main(deployer, action, progress))


async def _main(deployer: Deployer, action: Coroutine[Any, Any, None], progress: Progress) -> int:
    task = asyncio.ensure_future(action)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    ticker = asyncio.create_task(_tick(progress))
    try:
        await task
        status, result = EXIT_OK, "completed"
    except asyncio.CancelledError:
        status, result = (
            EXIT_INTERRUPTED,
            "interrupted: resume with --resume or undo with --rollback",
        )
    except DeployFailed as exc:
        status, result = EXIT_FAILED, f"failed: {exc}"
    except DeployCommandRefused as exc:
        status, result = EXIT_FAILED, f"refused: {exc}"
    except ControlUnreachable as exc:
        status, result = EXIT_FAILED, f"failed: {exc}"
    finally:
        ticker.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    progress.finish(list(deployer.hosts.values()), result)
    if status != EXIT_OK:
        print(f"zdlb deploy: {result}", file=sys.stderr)
    return status


async def _tick(progress: Progress) -> None:
    if not isinstance(progress, TtyProgress):
        return
    while True:
        await asyncio.sleep(TICK_S)
        progress.tick()
