"""``zdlb ctl`` imports only what a one-shot client needs (the figure: benchmarks/ctl_latency.py).

The client runs in a fresh interpreter through the console command's entry point against a real
daemon; the modules it loaded are checked, not its wall time (a shared box makes timings flaky).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tests.daemon.conftest import CLI_TIMEOUT_S, ServerSpec, StartDaemon
from tests.daemon.test_control import control_config
from tests.servers import EchoServer

# The daemon's machinery: none of it belongs in a client that sends one line.
FORBIDDEN = ("asyncio", "uvloop", "prometheus_client", "h11", "httptools", "zdlb.http", "zdlb.tcp")
CLIENT = """
import json, sys
from zdlb.daemon.entry import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


async def run_client(*args: str) -> tuple[int, str, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        CLIENT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate()
    report = json.loads(err.decode().splitlines()[-1])
    return report["code"], out.decode(), report["modules"]


async def test_ctl_show_info_imports_no_daemon_machinery(
    start_daemon: StartDaemon, write_config: Callable[[str], Path], echo_server: EchoServer
) -> None:
    config = write_config(control_config([ServerSpec("s1", echo_server.addr)]))
    daemon = await start_daemon("run", "-c", str(config))
    await daemon.wait_text("control_started")
    code, out, modules = await run_client("ctl", "-c", str(config), "show", "info")
    assert code == 0, out
    assert f" {daemon.pid}\n" in out
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == []
    assert "zdlb.daemon.cli" not in modules and "zdlb.daemon.lifecycle" not in modules


async def test_other_commands_still_import_the_daemon(
    write_config: Callable[[str], Path], echo_server: EchoServer
) -> None:
    """The control: `zdlb check` goes through cli.py and loads asyncio, so the check above
    can fail."""
    config = write_config(control_config([ServerSpec("s1", echo_server.addr)]))
    code, out, modules = await run_client("check", "-c", str(config))
    assert code == 0, out
    assert "asyncio" in modules and "zdlb.daemon.cli" in modules
