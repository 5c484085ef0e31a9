"""The state journal: runtime changes written atomically, read back, replayed onto a config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from zdlb.balancer.server import AdminState, Server
from zdlb.config.model import Address, PoolName, ServerConfig
from zdlb.control import journal


def make_server(name: str, weight: int = 100) -> Server:
    return Server(ServerConfig(name, Address("127.0.0.1", 1), weight=weight), "app")


def test_only_changes_are_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    changed, untouched, weighted = make_server("a"), make_server("b"), make_server("c")
    changed.set_admin(AdminState.MAINT)
    weighted.weight = 7
    journal.save(path, [changed, untouched, weighted])
    assert journal.load(path) == {
        "app/a": journal.ServerChanges(admin=AdminState.MAINT),
        "app/c": journal.ServerChanges(weight=7, config_weight=100),
    }
    assert not (tmp_path / "state.json.tmp").exists()


def test_replay_restores_changes_onto_a_new_config(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = make_server("a")
    before.set_admin(AdminState.DRAIN)
    before.weight = 30
    journal.save(path, [before])
    after = make_server("a")  # the same server, in the config of the next start
    assert journal.replay(journal.load(path), [after]) == 1
    assert (after.admin, after.weight) == (AdminState.DRAIN, 30)


def test_a_server_that_left_the_config_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    gone = make_server("gone")
    gone.set_admin(AdminState.MAINT)
    journal.save(path, [gone])
    stays = make_server("stays")
    with caplog.at_level(logging.INFO, logger="zdlb.control.journal"):
        assert journal.replay(journal.load(path), [stays]) == 0
    assert stays.admin is AdminState.READY
    assert "state_journal_dropped server=app/gone reason=not in the config" in caplog.text


def test_a_weight_whose_config_value_changed_yields_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = make_server("a", weight=100)
    before.weight = 10
    before.set_admin(AdminState.MAINT)
    journal.save(path, [before])
    after = make_server("a", weight=50)  # the operator overrode 100; the config now says 50
    journal.replay(journal.load(path), [after])
    assert (after.admin, after.weight) == (AdminState.MAINT, 50)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"version": 2, "servers": {}}', id="other-version"),
        pytest.param(b'{"version": 1, "servers": []}', id="servers-not-object"),
        pytest.param(b'{"version": 1, "servers": {"app/a": {"admin": "up"}}}', id="bad-state"),
        pytest.param(b'{"version": 1, "servers": {"app/a": {"weight": 999}}}', id="bad-weight"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_an_unusable_journal_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="zdlb.control.journal"):
        assert journal.load(path) == {}
    assert "state_journal_ignored" in caplog.text


def test_a_missing_journal_is_empty(tmp_path: Path) -> None:
    assert journal.load(tmp_path / "absent.json") == {}


def test_the_file_is_readable_json(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    server = make_server("a")
    server.set_admin(AdminState.MAINT)
    journal.save(path, [server])
    assert json.loads(path.read_text()) == {
        "version": 1,
        "servers": {"app/a": {"admin": "maint"}},
    }


def test_a_swapped_pool_and_a_drain_are_replayed_with_a_fresh_hold(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = make_server("a")
    before.pool = PoolName.BACKUP
    before.set_admin(AdminState.DRAIN, now=5.0)
    journal.save(path, [before])
    assert journal.load(path) == {
        "app/a": journal.ServerChanges(admin=AdminState.DRAIN, pool=PoolName.BACKUP)
    }
    after = make_server("a")
    after.drain_hold_s = 300.0
    assert journal.replay(journal.load(path), [after], now=1000.0) == 1
    assert (after.pool, after.admin, after.drain_ends) == (
        PoolName.BACKUP,
        AdminState.DRAIN,
        1300.0,
    )


def test_the_last_deploy_is_journaled_and_a_running_one_reads_back_interrupted(
    tmp_path: Path,
) -> None:
    from zdlb.deploy import record
    from zdlb.deploy.plan import Step, Target
    from zdlb.deploy.record import DEPLOY_LEASE_S, DeployStatus

    path = tmp_path / "state.json"
    assert journal.load_deploy(path) is None  # no file: no deploy
    deploy = record.begin(
        None, backend="app", to=Target.MAIN, hosts=[("a", "b")], token="ab", pid=5, uid=0, now=10.0
    )
    deploy = record.host_step(deploy, "ab", "a", Step.RUN, 11.0)
    journal.save(path, [make_server("a")], deploy.to_json(11.0))
    assert journal.load(path) == {}  # the servers' part is unchanged by it
    back = journal.load_deploy(path)
    assert back is not None and back.hosts == deploy.hosts
    assert back.effective_status(11.0 + DEPLOY_LEASE_S) is DeployStatus.INTERRUPTED


def test_a_malformed_deploy_record_is_ignored_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "servers": {}, "deploy": {"backend": "app"}}))
    assert journal.load_deploy(path) is None
    assert "state_journal_deploy_ignored" in caplog.text
