"""The status page's write actions as control commands: daemon glue between metrics/actions.py
(who may ask, and what) and control/commands.py (what a command does).

An action runs exactly as the control socket's command of the same name: logged with the old
and new state, journaled, recorded on the timeline. Refusals (no such server, a flip onto a
member failing its checks) come back as ``ActionRefused`` 409 with the command's own message.
No I/O here beyond what the controller does.
"""

from __future__ import annotations

from zdlb.balancer.server import AdminState
from zdlb.control.commands import Controller
from zdlb.control.protocol import Command, Flip, SetServerState
from zdlb.errors import ControlCommandError
from zdlb.metrics.actions import Action, ActionKind, ActionRefused
from zdlb.metrics.endpoint import ActionRunner

# The uid logged for a change made from the status page: a TCP peer has no uid to read.
STATUS_PAGE_UID = -1


def action_runner(controller: Controller) -> ActionRunner:
    """The status page's write actions, run as the control socket runs them."""

    async def run(action: Action) -> tuple[int, dict[str, object]]:
        command: Command
        match action.kind:
            case ActionKind.FLIP:
                command = Flip(action.backend, action.server)
            case ActionKind.DRAIN:
                command = SetServerState(action.backend, action.server, AdminState.DRAIN)
            case ActionKind.READY:
                command = SetServerState(action.backend, action.server, AdminState.READY)
        try:
            reply = await controller.execute(command, STATUS_PAGE_UID)
        except ControlCommandError as exc:  # unknown server, a flip refused by its checks
            raise ActionRefused(409, str(exc)) from None
        if reply.is_error:
            raise ActionRefused(409, reply.text.strip())
        return 200, {"ok": True, "text": reply.text.strip()}

    return run
