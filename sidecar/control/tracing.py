"""The owner's commands as OpenTelemetry spans, where it is on: what each acted on, the state it left, its error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sidecar.control.commands import Crashed, IdleUnload, Load, Shutdown, Sleep, Unload, Wake
from sidecar.control.engine import Engine
from sidecar.control.inbox import AnyCommand
from sidecar.control.runner import Runner
from sidecar.engine_state import EngineState
from sidecar.errors import SidecarError
from sidecar.telemetry.otel import OpenTelemetry

_NAMES: dict[type[AnyCommand], str] = {Load: "load", Unload: "unload", Sleep: "sleep", Wake: "wake"}


def span_name(command: AnyCommand, engine: Engine | None, state: EngineState) -> str | None:
    """The span's name for a command that acts on the engine; None for one that will not (a crash report of an
    engine stopped on purpose, an idle report of one replaced since)."""
    if isinstance(command, Crashed):
        alive = command.engine is engine and state in (EngineState.READY, EngineState.SLEEPING)
        return "engine_crashed" if alive else None
    if isinstance(command, IdleUnload):
        return "idle_unload" if command.engine is engine and state is EngineState.READY else None
    if isinstance(command, Shutdown):
        return "shutdown" if command.final and engine is not None else None
    return _NAMES.get(type(command))


@contextlib.contextmanager
def traced(otel: OpenTelemetry | None, command: AnyCommand, run: Runner) -> Iterator[None]:
    """A span around `command` as the owner runs it (nothing where OpenTelemetry is off)."""
    operation = span_name(command, run.engine, run.state) if otel is not None else None
    if operation is None or otel is None:
        yield
        return
    request = command.request if isinstance(command, Load) else (run.engine.request if run.engine else None)
    attributes = {} if request is None else {"sidecar.engine": request.engine, "gen_ai.request.model": request.model}
    with otel.control(operation, attributes) as span:
        yield
        error = command.reply.exception() if command.reply.done() and not command.reply.cancelled() else None
        span.attributes = {"sidecar.state": str(run.state), "sidecar.restarts": run.restarts}
        if isinstance(error, SidecarError):
            span.error_type = error.code or str(error.status_code)
        elif operation == "engine_crashed":  # an incident, even where a restart brought the engine back
            span.error_type = "engine_crashed"
        elif run.state is EngineState.FAILED:  # a load answered 202, or a restart, that did not come up
            span.error_type = run.last_error_code or "engine_failed"
        if run.exit_code is not None:
            span.attributes["sidecar.exit_code"] = run.exit_code
