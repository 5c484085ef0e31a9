"""README "Reload, upgrade and stop": its command block runs as written, in a shell, against a
running daemon (the README's `zdlb` on PATH, its `zdlb.toml` in the working directory)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

from tests.daemon.conftest import CLI_TIMEOUT_S, REPO_ROOT, Daemon, ServerSpec
from tests.daemon.test_reload import config_text
from tests.daemon.test_upgrade import NEW_PID_RE, old_exits
from tests.servers import EchoServer


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Reload, upgrade and stop", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block[1].splitlines() if line.strip()]


async def shell(command: str, cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = await asyncio.create_subprocess_shell(
        command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_readme_reload_upgrade_commands_run_as_written(
    tmp_path: Path, echo_server: EchoServer
) -> None:
    commands = readme_commands()
    assert commands == [
        "zdlb check -c zdlb.toml && zdlb ctl -c zdlb.toml reload",
        "zdlb ctl -c zdlb.toml upgrade",
        "zdlb ctl -c zdlb.toml show info",
    ]
    config = tmp_path / "zdlb.toml"
    config.write_text(config_text([ServerSpec("s1", echo_server.addr)]), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdlb", "run", "--workers", "1", "-c", "zdlb.toml"),
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Daemon(proc)
    new_pid = None
    try:
        await daemon.listener_addr()
        config.write_text(config.read_text().replace('name = "s1"', 'name = "s9"'))
        code, out, err = await shell(commands[0], tmp_path)
        assert code == 0, err
        assert out.endswith("config OK\nserver app/s1 removed\nserver app/s9 added\n"), out
        code, out, err = await shell(commands[1], tmp_path)
        assert code == 0, err
        match = NEW_PID_RE.search(out)
        assert match is not None, out
        new_pid = int(match[1])
        assert await old_exits(daemon) == 0
        code, out, err = await shell(commands[2], tmp_path)
        assert code == 0, err
        assert re.search(rf"pid\s+{new_pid}\n", out), out
        assert (
            json.loads((await shell("zdlb ctl -c zdlb.toml json show servers", tmp_path))[1])[0][
                "server"
            ]
            == "app/s9"
        )
    finally:
        if new_pid is not None:
            os.kill(new_pid, signal.SIGTERM)
            await daemon.wait_line(
                lambda _: daemon.output.count("INFO zdlb.daemon.cli stopped") >= 1
            )
        await daemon.aclose()
