"""The engine's lifecycle states, and the one table of the transitions between them."""

from __future__ import annotations

import enum


class EngineState(enum.StrEnum):
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"  # the process runs, its GPU memory given back (vLLM's sleep mode)
    UNLOADING = "unloading"
    FAILED = "failed"


_LEGAL: dict[EngineState, frozenset[EngineState]] = {
    EngineState.IDLE: frozenset({EngineState.LOADING}),
    # A load that fails, or that an unload, a replacing load or the sidecar's shutdown abandons.
    EngineState.LOADING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.UNLOADING}),
    EngineState.READY: frozenset({EngineState.UNLOADING, EngineState.FAILED, EngineState.SLEEPING}),
    # Woken, or unloaded as it sleeps, or dead in its sleep.
    EngineState.SLEEPING: frozenset({EngineState.READY, EngineState.UNLOADING, EngineState.FAILED}),
    EngineState.UNLOADING: frozenset({EngineState.IDLE}),
    # A crashed engine is restarted (loading) or cleared by an unload or a load.
    EngineState.FAILED: frozenset({EngineState.LOADING, EngineState.UNLOADING}),
}


class IllegalTransition(RuntimeError):
    def __init__(self, current: EngineState, target: EngineState) -> None:
        super().__init__(f"the engine is {current}: it cannot become {target}")


def check_transition(current: EngineState, target: EngineState) -> None:
    if target is not current and target not in _LEGAL[current]:
        raise IllegalTransition(current, target)
