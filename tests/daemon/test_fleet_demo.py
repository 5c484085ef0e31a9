"""``zdlb demo --fleet 3`` and the README's fleet block, run exactly as written (issue 16).

The demo binds fixed ports (etcd 2379/2380, the demo hosts, 8101-8103): the test is skipped
when one is taken. The README's lines run in a scratch directory with a ``.venv/bin/zdlb`` that
starts this checkout's zdlb, as tests/daemon/test_readme.py does.
"""

from __future__ import annotations

import re
import signal
import stat
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import START_TIMEOUT_S, StartDaemon
from tests.daemon.test_demo import taken_ports
from tests.daemon.test_readme import readme_block, run_line

pytestmark = pytest.mark.slow

FLEET_PORTS = (2379, 2380, 8081, 8082, 8091, 8092, 8101, 8102, 8103)


async def test_the_readme_fleet_block_works_verbatim(
    tmp_path: Path, start_daemon: StartDaemon
) -> None:
    if taken := taken_ports(FLEET_PORTS):
        pytest.skip(f"zdlb demo --fleet 3 needs 127.0.0.1 ports {FLEET_PORTS}; in use: {taken}")
    program = tmp_path / ".venv" / "bin" / "zdlb"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m zdlb.daemon.cli "$@"\n')
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    demo = await start_daemon("demo", "--fleet", "3")
    await demo.wait_text("fleet_demo_ready", timeout_s=3 * START_TIMEOUT_S)
    lines = readme_block("A flip made on one\ninstance reaches the other two")
    assert len(lines) == 5, lines
    flip, lb2, fleet, pinned, again = [await run_line(line, tmp_path) for line in lines]
    assert flip == "app/front-1: admin ready -> maint\napp/front-1-backup serves front-1\n"
    assert re.search(r"app/front-1 +main +maint", lb2), lb2
    assert fleet.splitlines()[0].split() == ["server", "lb-1", "lb-2", "lb-3"], fleet
    assert fleet.count("maint/up") == 3, fleet  # front-1 on every instance
    host = re.search(r"host: (\S+)", pinned)
    assert host is not None, pinned
    assert f"host: {host[1]}" in again, (pinned, again)
    if host[1] == "front-1":  # flipped: its pair serves it, through any instance
        assert "version: v2" in pinned and "version: v2" in again
    demo.send_signal(signal.SIGINT)
    assert await demo.wait_exit(timeout_s=15) == 0
    assert "stopped" in demo.output
