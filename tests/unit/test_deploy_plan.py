"""deploy/plan.py and deploy/record.py as tables: the procedure, failures, resumes, the lock."""

from __future__ import annotations

import pytest

from zdlb.deploy import record
from zdlb.deploy.plan import (
    Role,
    Step,
    Target,
    next_step,
    procedure,
    resume_from,
    rollback_role,
    serve_after_failure,
    serving_during,
)
from zdlb.deploy.record import DEPLOY_LEASE_S, DeployRecord, DeployStatus, HostStatus
from zdlb.errors import ControlCommandError

M, B = Target.MAIN, Target.BACKUP
S = Step


def test_procedures_in_order() -> None:
    assert procedure(M) == (
        S.CHECK, S.FLIP, S.WAIT_IDLE, S.RUN, S.WAIT_UP, S.VERIFY, S.FLIP_BACK, S.CONFIRM,
    )  # fmt: skip
    assert procedure(B) == (S.CHECK, S.WAIT_IDLE, S.RUN, S.WAIT_UP, S.VERIFY, S.FLIP, S.CONFIRM)


@pytest.mark.parametrize("to", list(Target))
def test_next_step_walks_the_procedure_then_ends(to: Target) -> None:
    steps = procedure(to)
    walked = [steps[0]]
    while (step := next_step(to, walked[-1])) is not None:
        walked.append(step)
    assert tuple(walked) == steps


def test_flip_back_is_not_a_step_of_a_deploy_to_backup() -> None:
    with pytest.raises(ValueError):
        next_step(B, S.FLIP_BACK)


# (to, step, who serves during it, who serves after it failed: None = untouched)
ROWS = [
    (M, S.CHECK, Role.TARGET, None),
    (M, S.FLIP, Role.TARGET, None),
    (M, S.WAIT_IDLE, Role.OTHER, Role.TARGET),  # a drain that never ends: abort, flip back
    (M, S.RUN, Role.OTHER, Role.OTHER),
    (M, S.WAIT_UP, Role.OTHER, Role.OTHER),
    (M, S.VERIFY, Role.OTHER, Role.OTHER),
    (M, S.FLIP_BACK, Role.OTHER, Role.OTHER),
    (M, S.CONFIRM, Role.TARGET, Role.OTHER),  # the main took the users but does not serve
    (B, S.CHECK, Role.OTHER, None),
    (B, S.WAIT_IDLE, Role.OTHER, Role.OTHER),
    (B, S.RUN, Role.OTHER, Role.OTHER),
    (B, S.WAIT_UP, Role.OTHER, Role.OTHER),
    (B, S.VERIFY, Role.OTHER, Role.OTHER),
    (B, S.FLIP, Role.OTHER, Role.OTHER),
    (B, S.CONFIRM, Role.TARGET, Role.OTHER),
]


@pytest.mark.parametrize(
    ("to", "step", "during", "after_failure"),
    ROWS,
    ids=[f"{to.value}-{step.value}" for to, step, _, _ in ROWS],
)
def test_who_serves_during_a_step_and_after_it_failed(
    to: Target, step: Step, during: Role, after_failure: Role | None
) -> None:
    assert serving_during(to, step) is during
    assert serve_after_failure(to, step) is after_failure


def test_every_step_of_every_procedure_has_a_row() -> None:
    assert {(to, step) for to, step, _, _ in ROWS} == {
        (to, step) for to in Target for step in procedure(to)
    }


# (to, step it stopped at, failed, where it restarts)
RESUMES = [
    *[(M, step, False, S.CHECK) for step in (S.CHECK, S.FLIP, S.WAIT_IDLE, S.RUN)],
    *[(M, step, False, S.WAIT_UP) for step in (S.WAIT_UP, S.VERIFY, S.FLIP_BACK, S.CONFIRM)],
    *[(B, step, False, S.CHECK) for step in (S.CHECK, S.WAIT_IDLE, S.RUN)],
    *[(B, step, False, S.WAIT_UP) for step in (S.WAIT_UP, S.VERIFY, S.FLIP, S.CONFIRM)],
    *[(to, step, True, S.CHECK) for to in Target for step in procedure(to)],
]


@pytest.mark.parametrize(
    ("to", "step", "failed", "restart"),
    RESUMES,
    ids=[f"{t.value}-{s.value}-{'failed' if f else 'interrupted'}" for t, s, f, _ in RESUMES],
)
def test_resume_restarts_a_host_where_replaying_is_safe(
    to: Target, step: Step, failed: bool, restart: Step
) -> None:
    assert resume_from(to, step, failed) is restart


@pytest.mark.parametrize("to", list(Target))
def test_a_rollback_serves_the_last_good_version(to: Target) -> None:
    assert rollback_role(to) is Role.OTHER


# --- the lock --------------------------------------------------------------------------------

HOSTS = [("front-1", "front-1-backup"), ("front-2", "front-2-backup")]
T0 = 1_000_000.0


def begun(now: float = T0, last: DeployRecord | None = None, token: str = "aa") -> DeployRecord:
    return record.begin(
        last, backend="app", to=M, hosts=HOSTS, token=token, pid=42, uid=1000, now=now
    )


def test_begin_holds_a_lease_and_starts_every_host_pending() -> None:
    deploy = begun()
    assert deploy.effective_status(T0) is DeployStatus.RUNNING
    assert deploy.lease_until == T0 + DEPLOY_LEASE_S
    assert [h.status for h in deploy.hosts] == [HostStatus.PENDING] * 2
    assert "token" not in deploy.to_json(T0)


def test_a_second_deploy_is_refused_naming_the_holder() -> None:
    deploy = record.host_step(begun(), "aa", "front-1", S.FLIP, T0 + 1)
    with pytest.raises(ControlCommandError) as caught:
        begun(T0 + 2, deploy, token="bb")
    message = str(caught.value)
    assert "in progress (host front-1, step flip), held by pid 42 (uid 1000)" in message


def test_a_lease_not_renewed_reads_interrupted_and_blocks_a_new_deploy() -> None:
    deploy = record.host_step(begun(), "aa", "front-1", S.RUN, T0 + 1)
    later = T0 + 1 + DEPLOY_LEASE_S
    assert deploy.effective_status(later) is DeployStatus.INTERRUPTED
    with pytest.raises(ControlCommandError, match=r"is interrupted .*resume it"):
        begun(later, deploy, token="bb")
    with pytest.raises(ControlCommandError, match="lock expired"):
        record.renew(deploy, "aa", later)
    taken = record.takeover(deploy, token="cc", pid=43, uid=0, now=later)
    assert (taken.holder_pid, taken.token) == (43, "cc")
    assert taken.effective_status(later) is DeployStatus.RUNNING
    current = taken.current()
    assert current is not None and current.step is S.RUN


@pytest.mark.parametrize(
    ("result", "may_begin"),
    [
        (DeployStatus.DONE, True),
        (DeployStatus.ROLLED_BACK, True),
        (DeployStatus.FAILED, False),
        (DeployStatus.INTERRUPTED, False),
    ],
)
def test_what_may_follow_an_ended_deploy(result: DeployStatus, may_begin: bool) -> None:
    ended = record.end(begun(), "aa", result, "", T0 + 1)
    assert ended.token == ""
    if may_begin:
        assert begun(T0 + 2, ended, token="bb").token == "bb"
        with pytest.raises(ControlCommandError, match="nothing to resume"):
            record.takeover(ended, token="cc", pid=1, uid=0, now=T0 + 2)
    else:
        with pytest.raises(ControlCommandError, match="resume it"):
            begun(T0 + 2, ended, token="bb")
        assert record.takeover(ended, token="cc", pid=1, uid=0, now=T0 + 2).token == "cc"


def test_updates_need_the_holders_token() -> None:
    deploy = begun()
    with pytest.raises(ControlCommandError, match="does not hold"):
        record.renew(deploy, "bb", T0)
    with pytest.raises(ControlCommandError, match="does not hold"):
        record.host_step(deploy, "bb", "front-1", S.FLIP, T0)
    with pytest.raises(ControlCommandError, match="does not hold"):
        record.end(deploy, "", DeployStatus.DONE, "", T0)


def test_a_host_is_named_by_its_main_or_its_pair() -> None:
    deploy = record.host_step(begun(), "aa", "front-2-backup", S.CHECK, T0)
    assert deploy.hosts[1].status is HostStatus.RUNNING
    with pytest.raises(ControlCommandError, match="not a host"):
        record.host_step(deploy, "aa", "front-3", S.CHECK, T0)


def test_the_record_round_trips_through_json_with_or_without_its_token() -> None:
    deploy = record.host_result(
        record.host_step(begun(), "aa", "front-1", S.VERIFY, T0 + 1),
        "aa",
        "front-1",
        HostStatus.FAILED,
        "verify: GET / answered 500",
        T0 + 2,
    )
    assert "token" not in deploy.to_json(T0 + 2)
    back = record.from_json(deploy.to_json(T0 + 2))
    assert back.hosts == deploy.hosts
    assert back.token == ""
    assert record.from_json({**deploy.to_json(T0 + 2), "token": "aa"}).token == "aa"
    assert (back.backend, back.to, back.holder_pid) == ("app", M, 42)
