"""The ``zdlb`` command line as a user meets it: exit codes and messages of ``check`` and ``run``.

Each test runs the real CLI in a subprocess, bounded by ``CLI_TIMEOUT_S``. Exit codes: 0 OK,
2 invalid config or usage, 1 runtime failure (cli.py). No output may contain a traceback.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import CLI_TIMEOUT_S, REPO_ROOT, ZDLB_CMD, ServerSpec, render_config
from tests.servers import LOOPBACK

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ZDLB_CMD, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream
        assert 'File "' not in stream, stream


def test_check_repo_config_prints_summary() -> None:
    config = REPO_ROOT / "config.toml"

    result = run_cli("check", "-c", str(config))

    assert result.returncode == EXIT_OK, result.stderr
    out = result.stdout
    assert f"{config}: 2 listeners, 1 backend" in out
    assert "web  http  127.0.0.1:8000  -> app" in out
    assert "tcp  tcp   127.0.0.1:8001  -> app" in out
    assert "metrics: http://127.0.0.1:9100/metrics" in out
    assert "workers: one per usable core" in out
    assert "app balance=roundrobin retries=2" in out
    for name, port, pool in [
        ("front-1", 8081, "main"),
        ("front-2", 8082, "main"),
        ("front-1-backup", 8091, "backup"),
        ("front-2-backup", 8092, "backup"),
    ]:
        assert any(
            line.split()[:3] == [name, f"127.0.0.1:{port}", pool] for line in out.splitlines()
        ), out
    assert out.rstrip().endswith("config OK")
    assert result.stderr == ""
    assert_no_traceback(result)


BAD_CONFIG = """\
[defaults.timeouts]
connect_s = -1

[logging]
levle = "debug"

[listeners.web]
bind = "127.0.0.1:{port}"
backend = "nope"

[backends.app]
[[backends.app.servers]]
name = "a"
address = "127.0.0.1:9"

[[backends.app.servers]]
name = "b"
address = "nonsense"
"""

BAD_CONFIG_ISSUES = [
    "defaults.timeouts.connect_s: must be a finite number of seconds > 0, got -1",
    "logging.levle: unknown key (did you mean 'level'?)",
    "listeners.web.backend: no backend named 'nope' (backends: 'app')",
    "backends.app.servers[1].address: 'nonsense' is not host:port",
]


@pytest.mark.parametrize("command", ["check", "run"])
def test_invalid_config_lists_every_error_and_exits_2(
    command: str, busy_port: int, write_config: Callable[[str], Path]
) -> None:
    # The listener's port is held by a listening socket: had `run` bound anything before
    # validating, it would fail with "cannot listen" and exit 1 instead.
    path = write_config(BAD_CONFIG.format(port=busy_port))

    result = run_cli(command, "-c", str(path))

    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stdout == ""
    err = result.stderr
    assert f"zdlb: invalid config {path}: {len(BAD_CONFIG_ISSUES)} error(s)" in err
    for issue in BAD_CONFIG_ISSUES:
        assert f"  {issue}\n" in err, err
    assert "cannot listen" not in err
    assert "listener_started" not in err
    assert "config OK" not in err
    assert_no_traceback(result)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param(None, ["cannot read file: No such file or directory"], id="missing-file"),
        pytest.param(
            "[listeners.web\nbind = 1\n", ["TOML syntax error:", "line 1"], id="toml-syntax"
        ),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_unreadable_config_is_one_clear_message(
    command: str,
    text: str | None,
    fragments: list[str],
    tmp_path: Path,
    write_config: Callable[[str], Path],
) -> None:
    path = tmp_path / "absent.toml" if text is None else write_config(text)

    result = run_cli(command, "-c", str(path))

    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    assert result.stderr.startswith(f"zdlb: invalid config {path}: 1 error(s)\n"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
        pytest.param(["run"], "the following arguments are required: -c/--config", id="no-c"),
        pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="bad-command"),
    ],
)
def test_usage_errors_exit_2(args: list[str], fragment: str) -> None:
    result = run_cli(*args)

    assert result.returncode == EXIT_CONFIG
    assert "usage: zdlb" in result.stderr
    assert fragment in result.stderr
    assert_no_traceback(result)


def test_run_on_busy_port_exits_1_with_clear_message(
    busy_port: int, write_config: Callable[[str], Path]
) -> None:
    servers = [ServerSpec("s1", (LOOPBACK, 9))]
    path = write_config(render_config(servers, bind=f"{LOOPBACK}:{busy_port}"))

    result = run_cli("run", "-c", str(path))

    assert result.returncode == EXIT_FAILURE, result.stderr
    err = result.stderr
    assert "startup_failed" in err
    assert f"cannot listen on {LOOPBACK}:{busy_port}: Address already in use" in err
    assert "listener_started" not in err
    assert_no_traceback(result)


def test_tcp_listener_is_refused_until_tcp_mode_lands(
    busy_port: int, write_config: Callable[[str], Path]
) -> None:
    # The busy port makes a working tcp listener fail fast too (exit 1, "cannot listen").
    servers = [ServerSpec("s1", (LOOPBACK, 9))]
    bind = f"{LOOPBACK}:{busy_port}"
    path = write_config(render_config(servers, bind=bind, listener_extra='mode = "tcp"'))

    checked = run_cli("check", "-c", str(path))
    ran = run_cli("run", "-c", str(path))

    # Either check rejects it too, or run fails with one clear message: never OK-then-crash.
    assert_no_traceback(ran)
    assert ran.returncode in (EXIT_FAILURE, EXIT_CONFIG)
    if checked.returncode == EXIT_OK:
        assert ran.returncode == EXIT_FAILURE
    else:
        assert checked.returncode == ran.returncode == EXIT_CONFIG
