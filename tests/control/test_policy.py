"""The phase policy: what a command that arrives during a long step gets, decided without an engine or a clock.

Each case builds the command as a caller would, asks `decide` as the owner does while a step runs, and checks
what the caller would see: its answer, its error, or the step stopped for it. The docs' copy of the table is
checked against the policy itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engines import adapter as registered_adapter
from sidecar.control.commands import Crashed, IdleUnload, Load, Shutdown, Sleep, Unload, Wake
from sidecar.control.engine import LoadRequest
from sidecar.control.inbox import DEFER, Command, Preempt, new_reply
from sidecar.control.policy import POLICY, Act, Kind, Phase, decide, kind_of, table
from sidecar.engine_state import EngineState
from sidecar.errors import SidecarError

DOCS = Path(__file__).parents[2] / "docs" / "control-plane.md"


def _command(kind: Kind) -> Command:
    reply = new_reply()
    if kind in (Kind.LOAD, Kind.REPLACE):
        request = LoadRequest(engine="mock", model="m", replace=kind is Kind.REPLACE)
        return Load(reply, request, registered_adapter("mock"))
    engine: Any = object()
    return {
        Kind.UNLOAD: lambda: Unload(reply, 1.0),
        Kind.SLEEP_OR_WAKE: lambda: Sleep(reply, 1),
        Kind.SIGTERM: lambda: Shutdown(reply, final=False),
        Kind.SHUTDOWN: lambda: Shutdown(reply, final=True),
        Kind.REPORT: lambda: Crashed(reply, engine),
    }[kind]()


def _error(command: Command) -> SidecarError:
    error = command.reply.exception()
    assert isinstance(error, SidecarError)
    return error


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("kind", list(Kind))
async def test_every_command_in_every_phase_is_answered_as_the_table_says(phase: Phase, kind: Kind) -> None:
    command, joiners = _command(kind), []
    decision = decide(phase, command, EngineState.LOADING, closing=False, joiners=joiners)
    act = POLICY[phase][kind]
    if act is Act.REFUSE:
        assert decision is None and _error(command).status_code == 409
    elif act is Act.DISMISS:
        assert decision is None and command.reply.result() is None
    elif act is Act.JOIN:
        assert decision is None and joiners == [command] and not command.reply.done()
    elif act is Act.WAIT:
        assert decision is DEFER and not command.reply.done()
    else:
        assert isinstance(decision, Preempt) and not command.reply.done()


async def test_a_stopped_load_tells_its_caller_who_stopped_it() -> None:
    said = {}
    for kind in (Kind.REPLACE, Kind.UNLOAD, Kind.SIGTERM, Kind.SHUTDOWN):
        decision = decide(Phase.LOADING, _command(kind), EngineState.LOADING, closing=False, joiners=[])
        assert isinstance(decision, Preempt) and decision.error is not None
        said[kind] = (decision.error.status_code, decision.error.code)
    assert said[Kind.REPLACE][0] == said[Kind.UNLOAD][0] == 409
    assert said[Kind.SIGTERM] == said[Kind.SHUTDOWN] == (503, "shutting_down")
    # A restart's wait or a drain stopped has no caller to tell: the command that stopped it runs next.
    decision = decide(Phase.RESTART_WAIT, _command(Kind.UNLOAD), EngineState.FAILED, closing=False, joiners=[])
    assert decision == Preempt(None)


@pytest.mark.parametrize("phase", list(Phase))
async def test_a_load_while_the_server_stops_is_503_in_every_phase(phase: Phase) -> None:
    for kind in (Kind.LOAD, Kind.REPLACE):
        command = _command(kind)
        assert decide(phase, command, EngineState.UNLOADING, closing=True, joiners=[]) is None
        assert (_error(command).status_code, _error(command).code) == (503, "shutting_down")


async def test_the_refusal_names_the_state_the_engine_is_in() -> None:
    command = _command(Kind.LOAD)
    decide(Phase.STOPPING, command, EngineState.UNLOADING, closing=False, joiners=[])
    assert "the engine is unloading" in _error(command).message


async def test_kinds_cover_every_command() -> None:
    reply, engine = new_reply(), object()
    kinds = {
        kind_of(Wake(reply)),
        kind_of(Sleep(reply, 2)),
        kind_of(IdleUnload(reply, engine)),  # type: ignore[arg-type]
        kind_of(Crashed(reply, engine)),  # type: ignore[arg-type]
    }
    assert kinds == {Kind.SLEEP_OR_WAKE, Kind.REPORT}


def test_the_docs_show_the_policy_as_it_is() -> None:
    shown = "\n".join(line.strip() for line in DOCS.read_text().splitlines() if line.strip().startswith("|"))
    assert table() in shown, "docs/control-plane.md's table differs from sidecar/control/policy.py: paste table()"
