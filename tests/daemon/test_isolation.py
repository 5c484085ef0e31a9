"""Nothing from the working directory or the environment runs inside zdlb's processes.

A directory holding a ``zdlb/__init__.py``, a ``sitecustomize.py`` and a ``usercustomize.py``
(each writing a marker file when imported) is the daemon's working directory, and in the
second test also its PYTHONPATH. The daemon and its workers must serve without ever importing
them; a control run proves the planted files do run when an interpreter is not isolated, so
the test can fail.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import START_TIMEOUT_S, Daemon, ServerSpec, render_config
from tests.servers import EchoServer, H11Client

PLANTED = ("zdlb/__init__.py", "sitecustomize.py", "usercustomize.py")
WORKERS = 2


def plant(directory: Path, markers: Path) -> None:
    """Modules that leave a marker (their own name) in ``markers`` when imported."""
    markers.mkdir()
    for name in PLANTED:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = markers / name.replace("/", "_")
        path.write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")


def zdlb_script() -> str:
    """The ``zdlb`` console entry point installed next to this interpreter."""
    return str(Path(sys.executable).with_name("zdlb"))


async def serve_one(daemon: Daemon, config: Path) -> None:
    addr = await daemon.listener_addr("web", timeout_s=START_TIMEOUT_S)
    await daemon.wait_text(f"workers_started workers={WORKERS}")
    for _ in range(4):
        async with await H11Client.connect(addr) as client:
            response = await client.request("GET", "/")
        assert response.status == 200, response


async def run_planted(
    tmp_path: Path, echo_server: EchoServer, argv: list[str], env: dict[str, str]
) -> list[str]:
    """Run ``argv`` from a planted working directory; the markers that appeared."""
    planted, markers = tmp_path / "planted", tmp_path / "markers"
    planted.mkdir()
    plant(planted, markers)
    config = tmp_path / "zdlb.toml"
    config.write_text(render_config([ServerSpec("s1", echo_server.addr)]), encoding="utf-8")
    env = {**os.environ, **{k: v.replace("{planted}", str(planted)) for k, v in env.items()}}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "run",
        "--workers",
        str(WORKERS),
        "-c",
        str(config),
        cwd=planted,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Daemon(proc)
    try:
        await serve_one(daemon, config)
        assert "ImportError" not in daemon.output and "Traceback" not in daemon.output
    finally:
        await daemon.aclose()
    return sorted(path.name for path in markers.iterdir())


async def test_the_planted_modules_run_in_a_plain_interpreter(tmp_path: Path) -> None:
    """The control: without isolation the working directory's zdlb is the one imported."""
    planted, markers = tmp_path / "planted", tmp_path / "markers"
    planted.mkdir()
    plant(planted, markers)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import zdlb", cwd=planted, env={**os.environ, "PYTHONPATH": ""}
    )
    async with asyncio.timeout(START_TIMEOUT_S):
        await proc.wait()
    assert (markers / "zdlb___init__.py").exists()


async def test_the_zdlb_command_and_its_workers_ignore_the_working_directory(
    tmp_path: Path, echo_server: EchoServer
) -> None:
    found = await run_planted(tmp_path, echo_server, [zdlb_script()], {})
    assert found == []


@pytest.mark.parametrize("variable", ["PYTHONPATH", "PYTHONSTARTUP"])
async def test_workers_ignore_python_variables(
    tmp_path: Path, echo_server: EchoServer, variable: str
) -> None:
    """An isolated master (as deploy/zdlb.service starts it): its workers inherit the variable
    with the environment and must not act on it either."""
    value = "{planted}" if variable == "PYTHONPATH" else "{planted}/sitecustomize.py"
    argv = [sys.executable, "-I", "-m", "zdlb.daemon.cli"]
    found = await run_planted(tmp_path, echo_server, argv, {variable: value})
    assert found == []
