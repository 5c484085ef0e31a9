"""``docker-compose.yml``, the ``Dockerfile`` and ``deploy/compose.toml``, checked without Docker.

No Docker engine runs where zdlb is tested, so these files are read, not run: the compose file
with PyYAML (a test dependency only; the file quotes every port mapping, so YAML 1.1 and
Compose's YAML 1.2 read it alike), the Dockerfile with the small instruction reader below.
Every command a container runs goes through zdlb's own argument parser, every control command
through the control protocol's parser, and the config through ``load_config``: a renamed option,
a moved port or a server that no container serves fails here, not on someone's first
``docker compose up``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import re
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from zdlb.config.load import load_config
from zdlb.config.model import Config, PoolName, ServerConfig
from zdlb.control.protocol import Flip, WaitIdle, WaitUp, parse_command
from zdlb.daemon.cli import build_parser
from zdlb.daemon.demo_app import DEMO_HOSTS, vhosts_of

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
README = REPO_ROOT / "README.md"
SERVICES = ("lb", "front-1", "front-2")
FRONTS = ("front-1", "front-2")
MIN_PYTHON = (3, 11)  # pyproject.toml's requires-python


# --- readers ---------------------------------------------------------------------------------


def zdlb_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` (what follows ``zdlb``) parsed by the real CLI parser; fails the test if it
    would not start (argparse exits, printing why)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"`zdlb {shlex.join(argv)}` is not a valid zdlb command:\n{errors.getvalue()}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    entry = compose["services"][name]
    assert isinstance(entry, dict), name
    return entry


def command_of(compose: dict[str, Any], name: str) -> list[str]:
    """The service's ``command``: exec form (a list of strings), so no shell splits it."""
    command = service(compose, name)["command"]
    assert isinstance(command, list), f"{name}: use the exec form, a list of strings"
    assert all(isinstance(word, str) for word in command), f"{name}: quote every word"
    return command


@dataclass(frozen=True, slots=True)
class Mount:
    source: str  # a path for a bind mount, a volume name otherwise
    target: PurePosixPath
    is_read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts_of(compose: dict[str, Any], name: str) -> list[Mount]:
    """The service's ``volumes`` in Compose's short syntax, ``SOURCE:TARGET[:ro]``."""
    mounts = []
    for entry in service(compose, name).get("volumes", []):
        source, target, *mode = entry.split(":")
        assert mode in ([], ["ro"], ["rw"]), entry
        mounts.append(Mount(source, PurePosixPath(target), mode == ["ro"]))
    return mounts


def lb_config_mount(compose: dict[str, Any]) -> Mount:
    """The bind mount that puts ``zdlb run -c FILE``'s FILE into the ``lb`` container."""
    args = zdlb_args(command_of(compose, "lb"))
    assert args.command == "run"
    target = PurePosixPath(args.config)
    matching = [m for m in mounts_of(compose, "lb") if m.target == target]
    assert len(matching) == 1, f"lb runs with {target}, which no volume of lb mounts"
    return matching[0]


@pytest.fixture(scope="module")
def lb_config(compose: dict[str, Any]) -> Config:
    """The config ``lb`` runs, as ``zdlb run`` loads it (a ConfigError fails the test)."""
    mount = lb_config_mount(compose)
    return load_config(REPO_ROOT / mount.source)


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    value: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions per build stage (each starts with FROM).

    Comments and blank lines are dropped and backslash-continued lines joined, which is all of
    the Dockerfile syntax this repository's Dockerfile uses.
    """
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    stages: list[list[Instruction]] = []
    for text in logical:
        keyword, _, value = text.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{text!r} before the first FROM"
        stages[-1].append(instruction)
    return stages


def values(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.value for i in stage if i.keyword == keyword]


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) ENTRYPOINT or CMD; the shell form would run under /bin/sh -c."""
    words = json.loads(value)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), value
    return words


def readme_container_commands() -> list[list[str]]:
    """The ``zdlb`` words of every ``docker compose exec lb zdlb ...`` in README's Containers."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Containers\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        if line.startswith("docker compose exec lb "):
            words = shlex.split(line, comments=True)
            assert words[4] == "zdlb", line
            commands.append(words[5:])
    return commands


# --- docker-compose.yml ----------------------------------------------------------------------


def test_services_are_the_balancer_and_two_app_hosts(compose: dict[str, Any]) -> None:
    assert tuple(compose["services"]) == SERVICES
    assert FRONTS == DEMO_HOSTS  # one container per demo host


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_runs_the_dockerfile_image(compose: dict[str, Any], name: str) -> None:
    entry = service(compose, name)
    assert entry["build"] == ".", "the repository root, where the Dockerfile is"
    assert entry["image"] == service(compose, "lb")["image"]  # one image, built once
    assert "entrypoint" not in entry  # the Dockerfile's: zdlb


@pytest.mark.parametrize("name", SERVICES)
def test_every_command_is_a_zdlb_command(compose: dict[str, Any], name: str) -> None:
    args = zdlb_args(command_of(compose, name))
    assert args.command == ("run" if name == "lb" else "demo-app")


def test_lb_starts_after_the_app_hosts(compose: dict[str, Any]) -> None:
    assert sorted(service(compose, "lb")["depends_on"]) == sorted(FRONTS)


def test_lb_healthcheck_asks_the_control_socket(compose: dict[str, Any]) -> None:
    test = service(compose, "lb")["healthcheck"]["test"]
    assert test[:2] == ["CMD", "zdlb"]
    args = zdlb_args(test[2:])
    assert args.command == "ctl"
    assert PurePosixPath(args.config) == lb_config_mount(compose).target
    parse_command(" ".join(args.words).encode())  # a ControlUsageError fails the test


def test_lb_config_is_mounted_read_only_and_valid(
    compose: dict[str, Any], lb_config: Config
) -> None:
    mount = lb_config_mount(compose)
    assert mount.is_bind and mount.is_read_only
    assert (REPO_ROOT / mount.source).resolve() == REPO_ROOT / "deploy" / "compose.toml"
    assert len(lb_config.listeners) == 1


def test_control_socket_and_state_file_live_in_named_volumes(
    compose: dict[str, Any], lb_config: Config
) -> None:
    named = {m.target: m.source for m in mounts_of(compose, "lb") if not m.is_bind}
    assert set(named.values()) <= set(compose["volumes"]), "declared at the top level"
    control = lb_config.control
    assert control.socket is not None and control.state_file is not None
    for path in (control.socket, control.state_file):
        assert path.is_absolute(), "a path inside the container, not next to the config"
        assert PurePosixPath(path).parent in named, f"{path}: no named volume holds it"


def test_published_port_is_the_listener_port(compose: dict[str, Any], lb_config: Config) -> None:
    (listener,) = lb_config.listeners
    (mapping,) = service(compose, "lb")["ports"]
    assert isinstance(mapping, str), "quote port mappings: YAML 1.1 reads some as base-60 ints"
    host_ip, host_port, container_port = mapping.split(":")
    assert (host_ip, host_port) == ("127.0.0.1", "8000")  # the demo is not for the network
    assert int(container_port) == listener.bind.port
    # Published traffic arrives on the container's own interface, not its loopback.
    assert ipaddress.ip_address(listener.bind.host).is_unspecified


def front_vhost_ports(compose: dict[str, Any], name: str) -> dict[int, str]:
    """The ports front ``name``'s command binds, each with its vhost ("main" or "backup")."""
    args = zdlb_args(command_of(compose, name))
    assert args.host == name, "the container's name is the host name its pages show"
    assert ipaddress.ip_address(args.bind).is_unspecified, "lb must reach it over the network"
    return {spec.port: spec.vhost for spec in vhosts_of(args.host)}


def test_every_server_is_a_vhost_some_front_binds(
    compose: dict[str, Any], lb_config: Config
) -> None:
    (backend,) = lb_config.backends
    served: set[tuple[str, int]] = set()
    for server in backend.servers:
        host, port = server.address.host, server.address.port
        assert host in FRONTS, f"{server.name}: {host!r} is no app host service"
        ports = front_vhost_ports(compose, host)
        assert port in ports, f"{server.name}: {host} binds {sorted(ports)}, not {port}"
        assert ports[port] == server.pool.value, f"{server.name}: the {ports[port]} vhost"
        served.add((host, port))
    every_vhost = {(name, port) for name in FRONTS for port in front_vhost_ports(compose, name)}
    assert served == every_vhost, "a vhost no server of the config sends traffic to"


def test_each_backup_pairs_with_the_main_on_its_host(lb_config: Config) -> None:
    (backend,) = lb_config.backends
    by_name: dict[str, ServerConfig] = {s.name: s for s in backend.servers}
    backups = [s for s in backend.servers if s.pool is PoolName.BACKUP]
    assert len(backups) == len(FRONTS)
    for backup in backups:
        assert backup.pair is not None, f"{backup.name} pairs with no main"
        assert by_name[backup.pair].address.host == backup.address.host
    assert backend.sticky is not None and backend.sticky.cookie == "SERVERID"
    check = backend.servers[0].check
    assert check is not None and (check.path, check.expect_body) == ("/health", "ok")


def test_readme_commands_are_valid_control_commands(
    compose: dict[str, Any], lb_config: Config
) -> None:
    commands = readme_container_commands()
    assert len(commands) >= 4, commands  # show servers, flip, wait, flip back
    (backend,) = lb_config.backends
    names = {(backend.name, server.name) for server in backend.servers}
    vhosts = {str(server.address) for server in backend.servers}
    kinds: list[type] = []
    for words in commands:
        args = zdlb_args(words)
        if args.command == "demo-deploy":  # run in lb: a main vhost's address, as lb knows it
            assert args.address in vhosts, words
            kinds.append(type(args))
            continue
        assert PurePosixPath(args.config) == lb_config_mount(compose).target
        if args.command == "deploy":
            assert args.backend == backend.name
            run = shlex.split(args.run)
            assert run[0] == "zdlb" and zdlb_args(run[1:]).command == "demo-deploy", args.run
            kinds.append(type(args))
            continue
        assert args.command == "ctl"
        command, _ = parse_command(" ".join(args.words).encode())
        if isinstance(command, Flip | WaitIdle | WaitUp):
            assert (command.backend, command.server) in names, words
        kinds.append(type(command))
    assert kinds.count(Flip) == 2 and WaitIdle in kinds, "flip, wait idle, flip back"
    assert WaitUp in kinds, "the flip back waits until the deployed main passes its checks"


# --- Dockerfile and .dockerignore ------------------------------------------------------------


def test_image_is_python_3_11_or_later_slim() -> None:
    for stage in dockerfile_stages():
        image = stage[0].value.split()[0]
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim", image)
        assert match is not None, image
        assert (int(match[1]), int(match[2])) >= MIN_PYTHON
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">={}.{}".format(*MIN_PYTHON)


def test_image_installs_the_package_and_runs_zdlb() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2, "build a wheel, then install it"
    build, final = stages
    assert any(run.startswith("pip wheel ") and run.endswith(" .") for run in values(build, "RUN"))
    assert any(run.startswith("pip install ") for run in values(final, "RUN"))
    assert [exec_form(v) for v in values(final, "ENTRYPOINT")] == [["zdlb"]]
    # `zdlb` is the package's console script, so pip puts it on the image's PATH.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["zdlb"] == "zdlb.daemon.entry:main"


def test_image_runs_as_an_unprivileged_user() -> None:
    *_, final = dockerfile_stages()
    users = values(final, "USER")
    assert users, "no USER: the container would run as root"
    assert users[-1] not in ("root", "0")


def test_image_exposes_the_listener_and_every_demo_vhost(lb_config: Config) -> None:
    *_, final = dockerfile_stages()
    exposed = {int(port) for value in values(final, "EXPOSE") for port in value.split()}
    (listener,) = lb_config.listeners
    assert exposed == {listener.bind.port} | {spec.port for spec in vhosts_of(None)}


def test_image_default_command_is_zdlb_help() -> None:
    *_, final = dockerfile_stages()
    (cmd,) = [exec_form(v) for v in values(final, "CMD")]
    out = io.StringIO()
    with pytest.raises(SystemExit) as exc_info, contextlib.redirect_stdout(out):
        build_parser().parse_args(cmd)
    assert exc_info.value.code == 0
    assert out.getvalue().startswith("usage: zdlb")


def test_build_context_holds_exactly_what_the_dockerfile_copies() -> None:
    build, _ = dockerfile_stages()
    copied = {
        source
        for value in values(build, "COPY")
        if not value.startswith("--from=")
        for source in value.split()[:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "zdlb"}
    for source in copied:
        assert (REPO_ROOT / source).exists(), source
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allowlist: exclude everything, let back in what the build copies, and nothing else.
    assert patterns[0] == "*"
    assert {p[1:] for p in patterns if p.startswith("!")} == copied
