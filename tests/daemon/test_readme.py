"""The README's command blocks, run exactly as written against the real ``zdlb demo``.

Each block is read from README.md at test time, so editing the README changes what runs here.
The commands run in a scratch directory holding a copy of config.toml and a ``.venv/bin/zdlb``
that starts this checkout's zdlb, because the README tells a user to type ``.venv/bin/zdlb ...
-c config.toml`` from the repository. The demo binds its fixed ports (8000, 8001, 8081/8082,
8091/8092, 8443, 9100): the test is skipped when one is taken. Keep-alive clients with cookie jars
load the listener meanwhile; none of their requests may fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from tests.daemon.conftest import REPO_ROOT, START_TIMEOUT_S, Daemon, StartDaemon
from tests.daemon.test_demo import EADDRINUSE_TEXT, parse_page, taken_ports
from tests.servers import LOOPBACK, H11Client

README = REPO_ROOT / "README.md"
DEMO_PORTS = (8000, 8001, 8081, 8082, 8091, 8092, 8443, 9100)  # 8443: HTTPS (issue 14)
LB_ADDR = (LOOPBACK, 8000)
# One README line (a zdlb ctl call, a wait of up to 30 s) must finish within this.
LINE_TIMEOUT_S = 45.0
CLIENTS = 4
# Each client stops after this many requests once the block is done; the whole load is bounded
# by the block's own deadline.
TAIL_REQUESTS = 5
_BLOCK_RE = re.compile(r"```sh\n(?P<body>.*?)```", re.S)
_EXITS_RE = re.compile(r"#.*\bexits (?P<status>[0-9]+)\b")


def readme_block(after: str) -> list[str]:
    """The command lines of the first ```sh block after the text ``after`` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    match = _BLOCK_RE.search(text, start)
    assert match is not None, f"no sh block after {after!r} in README.md"
    lines = [line for line in match["body"].splitlines() if line.strip()]
    return [line for line in lines if not line.lstrip().startswith("#")]


@dataclass
class User:
    """A keep-alive client with a cookie jar; what answered it, and what failed."""

    cookie: str | None = None
    versions: list[tuple[str, str]] = field(default_factory=list)  # (host, version)
    failures: list[str] = field(default_factory=list)

    async def run(self, done: asyncio.Event) -> None:
        tail = 0
        async with await H11Client.connect(LB_ADDR) as conn:
            while tail < TAIL_REQUESTS and not self.failures:
                tail += done.is_set()
                headers = [("cookie", self.cookie)] if self.cookie else []
                try:
                    response = await conn.request("GET", "/", headers)
                except (OSError, TimeoutError, h11.ProtocolError) as exc:
                    self.failures.append(repr(exc))
                    return
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                    continue
                page = parse_page(response.body)
                self.versions.append((page["host"], page["version"]))
                if set_cookie := response.header("set-cookie"):
                    self.cookie = set_cookie.split(";")[0]
                if not conn.is_reusable:
                    self.failures.append("connection closed by zdlb")


@pytest.fixture
async def demo_dir(tmp_path: Path, start_daemon: StartDaemon) -> AsyncIterator[Path]:
    """A directory laid out as the README assumes, with ``zdlb demo`` running on its config."""
    if taken := taken_ports(DEMO_PORTS):
        pytest.skip(f"zdlb demo needs 127.0.0.1 ports {DEMO_PORTS}; in use now: {taken}")
    shutil.copy(REPO_ROOT / "config.toml", tmp_path / "config.toml")
    program = tmp_path / ".venv" / "bin" / "zdlb"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m zdlb.daemon.cli "$@"\n')
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    daemon = await start_daemon("demo", "-c", str(tmp_path / "config.toml"))
    await wait_started(daemon)
    yield tmp_path


async def wait_started(daemon: Daemon) -> None:
    first = await daemon.wait_line(
        lambda line: "listener_started listener=web" in line or "startup_failed" in line,
        timeout_s=START_TIMEOUT_S,
    )
    if "startup_failed" in first and EADDRINUSE_TEXT in first:
        pytest.skip(f"a demo port was taken between the check and the start: {first}")
    await daemon.wait_text("control_started")


async def run_line(line: str, cwd: Path) -> str:
    """Run one README line with bash in ``cwd``; fail the test unless it exits as its comment
    says (``# exits N``), 0 by default."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        line,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        async with asyncio.timeout(LINE_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"README line still running after {LINE_TIMEOUT_S} s: {line}")
    text = out.decode(errors="replace")
    expected = int(match["status"]) if (match := _EXITS_RE.search(line)) else 0
    assert proc.returncode == expected, f"README line: rc={proc.returncode}: {line}\n{text}"
    return text


async def run_block_under_load(lines: list[str], cwd: Path) -> tuple[list[str], list[User]]:
    """Run the lines in order while keep-alive users load the demo; their failures fail it."""
    users = [User() for _ in range(CLIENTS)]
    done = asyncio.Event()
    outputs = []
    async with asyncio.TaskGroup() as tasks:
        for user in users:
            tasks.create_task(user.run(done))
        try:
            for line in lines:
                outputs.append(await run_line(line, cwd))
        finally:
            done.set()
    assert [f for user in users for f in user.failures] == []
    for user in users:
        host = user.versions[0][0]
        assert {h for h, _ in user.versions} == {host}, user  # every user stayed on its host
    return outputs, users


async def page_version(port: int) -> str:
    """The version a demo vhost answers as (from its header: a broken one answers 500)."""
    async with await H11Client.connect((LOOPBACK, port)) as client:
        served_by = (await client.request("GET", "/")).header("x-demo-server") or "?/?/?"
    return served_by.split("/")[2]


async def test_the_readme_first_lines_work_verbatim_under_load(demo_dir: Path) -> None:
    """The block a new user types after ``make demo``: front-1's main taken down, and nobody
    sees it (its backup vhost, or front-2, answers)."""
    lines = readme_block("Each\npage names the host")
    assert [line.split()[0] for line in lines] == ["curl"] * 4, lines
    outputs, _ = await run_block_under_load(lines, demo_dir)
    assert "vhost: main" in outputs[0]
    for answer in outputs[2:]:
        served = (answer.split("host: ")[1].split()[0], answer.split("vhost: ")[1].split()[0])
        assert served in {("front-1", "backup"), ("front-2", "main")}, answer


async def test_the_readme_deploy_by_hand_works_verbatim_under_load(demo_dir: Path) -> None:
    lines = readme_block("A deploy by hand, one host at a time")
    assert any("wait app/front-1 up" in line for line in lines), lines
    outputs, _ = await run_block_under_load(lines, demo_dir)
    assert "app/front-1-backup serves front-1" in outputs[0]
    assert outputs[-1].endswith("app/front-1 serves front-1\n")
    assert await page_version(8081) == "v3"  # front-1's main runs what the README deployed


async def test_the_readme_rolling_deploys_work_verbatim_under_load(demo_dir: Path) -> None:
    lines = readme_block("### Rolling deploys")
    assert [line.split()[1] for line in lines] == ["deploy", "deploy", "ctl", "deploy"], lines
    outputs, users = await run_block_under_load(lines, demo_dir)
    assert "deploy completed" in outputs[0]
    assert "front-1 failed at step verify" in outputs[1]
    assert "front-1  front-1-backup  failed" in outputs[2]
    assert "deploy completed" in outputs[3]
    # front-2 kept v3 (the failed deploy stopped before it); front-1's users are on its pair.
    assert (await page_version(8082), await page_version(8081)) == ("v3", "v4")
    front_1 = [u for u in users if u.versions[0][0] == "front-1"]
    assert all(u.versions[-1] == ("front-1", "v2") for u in front_1)
    assert all(version != "v4" for u in users for _, version in u.versions)  # nobody saw it


async def test_the_readme_https_lines_work_verbatim(demo_dir: Path) -> None:
    """The demo's HTTPS listener (issue 14): curl verifies the certificate ``zdlb demo`` made
    at start against the CA it left in demo-tls/, and HSTS is on."""
    lines = readme_block("### TLS (HTTPS)")
    assert [line.split()[0] for line in lines] == ["curl", "curl"], lines
    outputs = [await run_line(line, demo_dir) for line in lines]
    assert outputs[0].startswith("host: front-")
    assert outputs[1].lower().startswith("strict-transport-security: max-age=300")
    assert not (demo_dir / "demo-tls" / "ca.key").exists()  # nothing more can be signed
