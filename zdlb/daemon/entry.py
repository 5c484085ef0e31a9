"""The ``zdlb`` console command's entry point: ``zdlb ctl`` without the daemon's imports.

``zdlb ctl`` is what operators and ``systemctl reload`` run, often in a loop: it goes straight
to daemon/ctl.py (argparse, a blocking socket). Every other command goes to daemon/cli.py,
which imports the daemon. This module imports nothing else at module level.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zdlb *argv`` (``sys.argv[1:]`` by default); the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["ctl"]:
        from zdlb.daemon.ctl import ctl_parser, run_ctl_command

        return run_ctl_command(ctl_parser().parse_args(args[1:]))
    from zdlb.daemon.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
