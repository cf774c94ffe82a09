"""A worker's side of the supervisor: the engine it may send requests to, read from the shared block and the
supervisor's process."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from pydantic import ValidationError

from sidecar.control.engine import Engine, EngineSlot
from sidecar.control.gate import not_ready
from sidecar.control.records import Described
from sidecar.control.shared import SharedState
from sidecar.engine_state import EngineState
from sidecar.errors import ServiceUnavailable
from sidecar.redaction import Redactor
from sidecar.settings import Settings


class EngineView:
    """A worker's side of the supervisor: the engine it may send requests to, and a slot per request, counted in
    the shared block where the supervisor's drain sees it."""

    def __init__(
        self, settings: Settings, shared: SharedState, index: int, supervisor: httpx.AsyncClient, redactor: Redactor
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.index = index
        self.supervisor = supervisor
        self.redactor = redactor
        self.engine: Engine | None = None
        self._generation = -1
        self._refreshing: asyncio.Task[None] | None = None

    def request_slot(self) -> EngineSlot:
        """As `Supervisor.request_slot`: the engine's state from the shared block, the request counted there."""
        return EngineSlot(self._hold, self._release)

    async def _hold(self) -> Engine:
        self.shared.begin(self.index)  # counted before the state is read: see sidecar/control/shared.py
        try:
            state, generation, idle_unloaded = self.shared.engine()
            if state is not EngineState.READY and idle_unloaded and self.settings.load_on_demand:
                await self._load_on_demand()
                state, generation, idle_unloaded = self.shared.engine()
            if state is not EngineState.READY:
                raise not_ready(state, idle_unloaded)
            if generation != self._generation:
                await self._refresh()
            if self.engine is None:
                raise not_ready(state, idle_unloaded)
        except BaseException:
            self._release()
            raise
        return self.engine

    def _release(self) -> None:
        self.shared.end(self.index)

    async def prime(self) -> None:
        """At the worker's start: the engine's description now, so that its first request does not wait for it."""
        if self.shared.engine()[0] is EngineState.READY:
            with contextlib.suppress(ServiceUnavailable):
                await self._refresh()

    async def _refresh(self) -> None:
        """The engine's description, fetched once for all the requests that find the generation changed."""
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._fetch())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _fetch(self) -> None:
        try:
            answer = (await self.supervisor.get("/internal/engine")).raise_for_status()
            described = Described.model_validate_json(answer.content)
        except (httpx.HTTPError, ValidationError) as exc:
            raise ServiceUnavailable(f"the engine's description could not be read: {exc}") from None
        previous, self.engine = self.engine, None
        if described.engine is not None:
            self.engine = described.engine.engine(self.settings.engine_executables)
            self.redactor.register(*self.engine.masked)
        if previous is not None:  # after the new one's: a value both hold stays masked throughout
            self.redactor.forget(*previous.masked)
        self._generation = described.generation

    async def _load_on_demand(self) -> None:
        timeout_s = self.settings.startup_timeout_s + 30
        try:
            answer = await self.supervisor.post("/internal/on-demand", timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the model could not be loaded on demand: {exc}") from None
        if answer.status_code != 200:
            message = answer.json().get("error", {}).get("message", answer.text)
            raise ServiceUnavailable(f"the model could not be loaded on demand: {message}")
