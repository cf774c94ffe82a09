"""What a command does when it arrives while the owner is in the middle of a long step: one table.

The owner takes commands one at a time. While a step runs (a load waiting for readiness, a restart's back-off,
an abandoned load's stop, an unload's drain and stop) it keeps reading its inbox, and `decide` answers each
command at once, leaves it waiting its turn, or stops the step for it, as `POLICY` says. At rest the owner runs
each command in turn (`lifecycle.py`): a load when ready is 409 unless it replaces; an unload when idle answers
idle at once. docs/control-plane.md shows `table()`, and a test checks that it does.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from sidecar.control.commands import Crashed, IdleUnload, Load, Shutdown, Sleep, Unload, Wake, shutting_down
from sidecar.control.inbox import DEFER, AnyCommand, Decision, Preempt, fail, reply
from sidecar.engine_state import EngineState
from sidecar.errors import Conflict, SidecarError


class Phase(enum.Enum):
    LOADING = "a load or restart, starting"
    RESTART_WAIT = "a restart's back-off"
    ABANDONING = "an abandoned load, stopping"
    DRAINING = "an unload or replace, draining"
    STOPPING = "an unload or replace, stopping"


class Kind(enum.Enum):
    LOAD = "load"
    REPLACE = 'load with `"replace": true`'
    UNLOAD = "unload"
    SLEEP_OR_WAKE = "sleep, wake"
    SIGTERM = "SIGTERM (the server starts to stop)"
    SHUTDOWN = "shutdown (the lifespan ends)"
    REPORT = "a watcher's report (crash, idleness)"


class Act(enum.Enum):
    REFUSE = "409 at once"
    PREEMPT = "stops the step; runs next"
    JOIN = "answered with this unload's result"
    WAIT = "waits its turn"
    DISMISS = "dropped: its engine is gone"


_R, _P, _J, _W, _D = Act.REFUSE, Act.PREEMPT, Act.JOIN, Act.WAIT, Act.DISMISS
# Kinds in the order of `Kind`: load, replace, unload, sleep or wake, SIGTERM, shutdown, report.
POLICY: dict[Phase, dict[Kind, Act]] = {
    phase: dict(zip(Kind, acts, strict=True))
    for phase, acts in {
        Phase.LOADING: (_R, _P, _P, _R, _P, _P, _D),
        Phase.RESTART_WAIT: (_P, _P, _P, _R, _P, _P, _D),
        Phase.ABANDONING: (_R, _R, _W, _R, _W, _W, _D),
        Phase.DRAINING: (_R, _R, _J, _R, _W, _P, _D),
        Phase.STOPPING: (_R, _R, _J, _R, _W, _W, _D),
    }.items()
}

# What the caller of a load stopped by a command is told.
_LOAD_STOPPED_BY: dict[Kind, Callable[[], SidecarError]] = {
    Kind.REPLACE: lambda: Conflict("the load was replaced by another load"),
    Kind.UNLOAD: lambda: Conflict("the load was cancelled by an unload"),
    Kind.SIGTERM: lambda: shutting_down("the load was stopped"),
    Kind.SHUTDOWN: lambda: shutting_down("the load was stopped"),
}


def kind_of(command: AnyCommand) -> Kind:
    if isinstance(command, Load):
        return Kind.REPLACE if command.request.replace else Kind.LOAD
    if isinstance(command, Unload):
        return Kind.UNLOAD
    if isinstance(command, Sleep | Wake):
        return Kind.SLEEP_OR_WAKE
    if isinstance(command, Shutdown):
        return Kind.SHUTDOWN if command.final else Kind.SIGTERM
    assert isinstance(command, Crashed | IdleUnload)
    return Kind.REPORT


def decide(phase: Phase, command: AnyCommand, state: EngineState, closing: bool, joiners: list[AnyCommand]) -> Decision:
    """Answer `command` as the table says for `phase` (None once answered), or defer it, or stop the step for it.
    A load while the server stops is 503, whatever the phase; an unload that joins is added to `joiners`."""
    kind = kind_of(command)
    if closing and kind in (Kind.LOAD, Kind.REPLACE):
        fail(command, shutting_down("no engine can be loaded"))
        return None
    act = POLICY[phase][kind]
    if act is Act.REFUSE:
        fail(command, Conflict(f"the engine is {state}: wait until it is done"))
    elif act is Act.DISMISS:
        reply(command, None)
    elif act is Act.JOIN:
        joiners.append(command)
    elif act is Act.WAIT:
        return DEFER
    else:
        error: SidecarError | None = _LOAD_STOPPED_BY[kind]() if phase is Phase.LOADING else None
        return Preempt(error)
    return None


def table() -> str:
    """The policy as a Markdown table: the docs' copy of it."""
    rows = ["| command, arriving during | " + " | ".join(phase.value for phase in Phase) + " |"]
    rows.append("|---" * (len(Phase) + 1) + "|")
    for kind in Kind:
        rows.append(f"| {kind.value} | " + " | ".join(POLICY[phase][kind].value for phase in Phase) + " |")
    return "\n".join(rows)
