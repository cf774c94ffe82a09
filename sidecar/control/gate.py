"""The data-plane requests holding the engine: counted, so that an unload drains them and idleness is known."""

from __future__ import annotations

import asyncio
import time

from sidecar.control.shared import SharedState
from sidecar.engine_state import EngineState
from sidecar.errors import ServiceUnavailable

DRAIN_POLL_S = 0.01


class RequestGate:
    """This process's requests in flight and when one last started or ended; with data-plane workers, theirs too,
    read from the memory they share (`shared`)."""

    def __init__(self, shared: SharedState | None = None) -> None:
        self.shared = shared
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._last_used = time.monotonic()

    @property
    def in_flight(self) -> int:
        return self._in_flight + (self.shared.in_flight() if self.shared else 0)

    @property
    def last_used(self) -> float:
        """When a data-plane request last started or ended, in any process (monotonic)."""
        return max(self._last_used, self.shared.last_used()) if self.shared else self._last_used

    def touch(self) -> None:
        """The engine was just (re)made ready: idleness counts from now."""
        self._last_used = time.monotonic()

    def enter(self) -> None:
        self._in_flight += 1
        self._drained.clear()
        self._last_used = time.monotonic()

    def leave(self) -> None:
        self._in_flight -= 1
        self._last_used = time.monotonic()
        if self._in_flight == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Returns once no request holds the engine, in any process."""
        await self._drained.wait()
        while self.shared is not None and self.shared.in_flight() > 0:
            await asyncio.sleep(DRAIN_POLL_S)  # the workers' counts are read, not signalled


def not_ready(state: EngineState, idle_unloaded: bool, model: str | None = None) -> ServiceUnavailable:
    """The data plane's 503 while no engine is ready, saying why: in the supervisor's process and in a worker."""
    if state is EngineState.SLEEPING:
        return ServiceUnavailable("the model is sleeping: wake it first (POST /v1/model/wake)", code="model_sleeping")
    if state is EngineState.IDLE and idle_unloaded:
        return ServiceUnavailable(
            f"the model{f' {model!r}' if model else ''} was unloaded after its ttl_s without requests: load it "
            "again (SIDECAR_LOAD_ON_DEMAND=true does that for the next request)",
            code="model_unloaded_idle",
        )
    return ServiceUnavailable(f"no model is loaded (engine state: {state})")
