"""How zdlb starts its own processes: workers, and an upgrade's successor.

Both run in Python's isolated mode (``python -I``: no working directory or script directory on
sys.path, no PYTHON* variables, no user site-packages, so no usercustomize): a
``zdlb/__init__.py`` or ``sitecustomize.py`` in the directory the daemon was started from, or
on a PYTHONPATH, never runs as the daemon's user (tests/daemon/test_isolation.py). The zdlb they
import is this process's: its package root is passed on and put on sys.path only when the
interpreter's own path lacks it (an editable install, or a checkout run from its root on
purpose). For an installed zdlb that root is site-packages, so an upgrade's successor runs the
code installed now. Only the main process talks to systemd: children get no NOTIFY_SOCKET
unless they are to become the main process (upgrade.py passes it on).

No I/O here: argument lists and environments only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import zdlb

_BOOT = (
    "import sys\n"
    "root = sys.argv[1]\n"
    "if root not in sys.path:\n"
    "    sys.path.insert(0, root)\n"
    "from zdlb.daemon.{module} import main\n"
    "sys.exit(main({args}))\n"
)


def package_root() -> str:
    """The directory holding the ``zdlb`` package this process runs."""
    return str(Path(zdlb.__file__).resolve().parents[1])


def worker_argv() -> list[str]:
    """One worker (daemon/worker.py, its spec on stdin)."""
    boot = _BOOT.format(module="worker", args="")
    return [sys.executable, "-I", "-c", boot, package_root()]


def zdlb_argv(*args: str) -> list[str]:
    """``zdlb *args`` (daemon/entry.py), isolated."""
    boot = _BOOT.format(module="entry", args="sys.argv[2:]")
    return [sys.executable, "-I", "-c", boot, package_root(), *args]


def child_environment() -> dict[str, str]:
    """This process's environment without NOTIFY_SOCKET."""
    return {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
