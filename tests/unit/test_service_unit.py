"""deploy/zdlb.service: a unit systemd accepts, whose commands are valid zdlb command lines."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from zdlb.config.model import DEFAULT_GRACE_S
from zdlb.daemon.cli import build_parser
from zdlb.daemon.ctl import ctl_parser
from zdlb.daemon.workers import STOP_MARGIN_S

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "zdlb.service"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
}


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser["Service"]


def zdlb_args(key: str) -> list[str]:
    """The command's arguments after ``python3 -I -m zdlb`` (isolated mode is required)."""
    argv = shlex.split(service()[key])
    assert argv[0].endswith("/python3") and argv[1:4] == ["-I", "-m", "zdlb"], argv
    return argv[4:]


def test_readiness_and_stop_are_zdlbs() -> None:
    unit = service()
    assert (unit["Type"], unit["NotifyAccess"], unit["KillMode"]) == ("notify", "all", "mixed")
    assert float(unit["TimeoutStopSec"]) > DEFAULT_GRACE_S + STOP_MARGIN_S


@pytest.mark.parametrize(("key", "command"), [("ExecStartPre", "check"), ("ExecStart", "run")])
def test_start_commands_parse(key: str, command: str) -> None:
    args = build_parser().parse_args(zdlb_args(key))
    assert args.command == command
    assert str(args.config) == "/etc/zdlb/zdlb.toml"


def test_reload_runs_zdlb_ctl_reload_on_the_same_config() -> None:
    args = zdlb_args("ExecReload")
    assert args[0] == "ctl"
    parsed = ctl_parser().parse_args(args[1:])
    assert (str(parsed.config), parsed.words) == ("/etc/zdlb/zdlb.toml", ["reload"])
    assert parsed.config == build_parser().parse_args(zdlb_args("ExecStart")).config


def test_hardening() -> None:
    unit = service()
    for key, value in HARDENING.items():
        assert unit.get(key) == value, key
    assert unit["User"] != "root"


def test_ctl_waits_as_long_as_an_upgrade_may_take() -> None:
    from zdlb.daemon.ctl import UPGRADE_WAIT_S
    from zdlb.daemon.upgrade import READY_TIMEOUT_S

    assert UPGRADE_WAIT_S >= READY_TIMEOUT_S
