"""The engine's lifecycle as the rest of the sidecar sees it: load, unload, sleep and wake, adapters, status, and
a slot per data-plane request.

One task, the owner (`owner.py`), holds the engine and its state; nothing else changes them. The methods here
put a command in its inbox and await the answer, or read what it publishes. What it does with each command is
`lifecycle.py`; the steps it is made of, and what they publish, `runner.py`; what a command arriving in the
middle of a step does, the table in `policy.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from engines import AdapterError, EngineAdapter, UnknownEngine
from engines import adapter as registered_adapter
from sidecar.control import features, startup, tracing
from sidecar.control.commands import Load, Shutdown, Sleep, Unload, Wake, shutting_down
from sidecar.control.engine import Engine, EngineSlot, LoadRequest
from sidecar.control.engine_client import engine_client
from sidecar.control.features import EngineCalls
from sidecar.control.gate import RequestGate, not_ready
from sidecar.control.inbox import AnyCommand, new_reply
from sidecar.control.lifecycle import Lifecycle
from sidecar.control.owner import Owner
from sidecar.control.process import REAP_AFTER_KILL_S, EngineProcess, become_subreaper
from sidecar.control.records import Adapter, Described, EngineDescription, EngineStatus, Loaded, Slept, Unloaded, Woken
from sidecar.control.runner import Runner
from sidecar.control.shared import SharedState
from sidecar.engine_state import EngineState
from sidecar.errors import BadRequest, NotFound, ServiceUnavailable, SidecarError
from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.settings import Settings
from sidecar.telemetry.engine_load import read_engine_load
from sidecar.telemetry.gpu import RELEASE_TIMEOUT_S, Gpus
from sidecar.telemetry.otel import OpenTelemetry

log = get_logger("sidecar.supervisor")


def shutdown_bound_s(settings: Settings) -> float:
    """The longest the sidecar may take to exit after SIGTERM: the server's drain, the engine's SIGTERM grace,
    its reaping after SIGKILL, its GPU memory's release, and a few seconds of the process's own. A container's
    stop grace period (compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`) must cover it,
    or the engine is killed with the sidecar before either can say so."""
    return settings.drain_timeout_s + settings.kill_grace_s + REAP_AFTER_KILL_S + RELEASE_TIMEOUT_S + 5.0


class Supervisor:
    """The engine as the control plane, the data plane, health and the workers see it: commands that the owner
    runs one at a time, what it publishes, and the data plane's slot per request."""

    def __init__(
        self,
        settings: Settings,
        redactor: Redactor,
        gpus: Gpus | None = None,
        otel: OpenTelemetry | None = None,
        shared: SharedState | None = None,
    ) -> None:
        """`otel`: control operations as spans; `shared`: the block the data-plane workers read (and count in)."""
        self.settings = settings
        self.shared = shared
        self._probe = engine_client(settings.upstream_ca_file)  # readiness, its metrics, sleep, adapters
        self.calls = EngineCalls(self._probe, gpus)
        self.gate = RequestGate(shared)
        self._owner = Owner(self._handle, self._traced, self._closed)
        self.run = Runner(settings, redactor, gpus, self.gate, self._probe, self._owner.inbox, shared)
        self._lifecycle = Lifecycle(self.run, self.calls, self._report)
        self._otel = otel
        self._on_demand: asyncio.Task[Any] | None = None
        become_subreaper()

    # -- reading ------------------------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self.run.state

    @property
    def engine(self) -> Engine | None:
        return self.run.engine

    def status(self) -> EngineStatus:
        return self.run.status()

    @property
    def engine_pid(self) -> int | None:
        engine = self.run.engine
        return engine.process.pid if engine is not None and engine.process is not None else None

    async def engine_load(self) -> tuple[tuple[str, str], dict[str, float]] | None:
        """The ready engine's load, read from its own /metrics now: ((model, engine), values); None when there is
        no ready engine, it has no load series, or it does not answer in time."""
        engine = self.run.engine
        if self.run.state is not EngineState.READY or engine is None or engine.adapter.load_series is None:
            return None
        url = engine.base_url + engine.adapter.metrics_path
        load = await read_engine_load(self._probe, url, engine.upstream_headers, engine.adapter.load_series)
        return None if load is None else ((engine.served_model, engine.adapter.name), load)

    def describe_engine(self) -> Described:
        """For the data-plane workers: the engine's generation and what a request to it needs."""
        engine = self.run.engine
        return Described(generation=self.run.generation, engine=EngineDescription.of(engine) if engine else None)

    def engine_process(self) -> EngineProcess:
        """The running engine's process, for following its output: 404 without one, 400 for an external engine."""
        engine = self.run.engine
        if self.run.closing:
            raise shutting_down("its engine's output ends now")
        if engine is None:
            raise NotFound("no engine is running: load one first", code="no_engine")
        if engine.process is None:
            raise BadRequest(f"the {engine.adapter.name} engine runs elsewhere: its output is not the sidecar's")
        return engine.process

    # -- the data plane's slot ------------------------------------------------------------------------------

    def request_slot(self) -> EngineSlot:
        """Hold the engine for one data-plane request (`async with`, which gives the engine): 503 unless ready
        (after an idle unload, with load on demand, the model is loaded again first); unload drains these first."""
        return EngineSlot(self._hold, self.gate.leave)

    async def _hold(self) -> Engine:
        if self.run.state is not EngineState.READY and self.settings.load_on_demand:
            await self._load_on_demand()
        engine = self.run.engine
        if self.run.state is not EngineState.READY or engine is None:
            raise self._not_ready()
        self.gate.enter()
        return engine

    def _not_ready(self) -> ServiceUnavailable:
        idle = self.run.idle_unloaded
        return not_ready(self.run.state, idle is not None, idle.model if idle else None)

    async def load_on_demand(self) -> None:
        """For a data-plane worker's request: what `request_slot` does here, with SIDECAR_LOAD_ON_DEMAND."""
        if self.run.state is not EngineState.READY:
            await self._load_on_demand()
        if self.run.state is not EngineState.READY:
            raise self._not_ready()

    async def _load_on_demand(self) -> None:
        """The model an idle unload took away is loaded again for the request that needs it; requests that come
        meanwhile wait for the same load. Bounded by the load's start-up timeout; its error is theirs."""
        if self._on_demand is None:
            request = self.run.idle_unloaded
            if request is None or self.run.state is not EngineState.IDLE:
                return
            log.info("model_load_on_demand", engine=request.engine, model=request.model)
            self._on_demand = asyncio.create_task(self.load(request.model_copy(update={"wait": True})))
            self._on_demand.add_done_callback(self._on_demand_done)
        await asyncio.shield(self._on_demand)

    def _on_demand_done(self, task: asyncio.Task[Any]) -> None:
        self._on_demand = None
        if not task.cancelled():
            task.exception()  # every waiter has it; retrieved here too, for when they all left

    # -- commands -------------------------------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> Loaded:
        """(200, the ready engine) with `wait`, else (202, the status) once the engine's process exists."""
        adapter = checked_adapter(request, self.settings.engine_executables)
        if request.url is not None and await asyncio.to_thread(
            startup.leads_to_sidecar, request.url, self.settings.host, self.settings.port
        ):
            raise BadRequest(
                "'url' leads to this sidecar itself, where every request would come back: give the engine's own URL",
                param="url",
                code="engine_loop",
            )
        return await self._owner.ask(lambda reply: Load(reply, request, adapter))

    async def unload(self, drain_timeout_s: float | None = None) -> Unloaded:
        drain = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        return await self._owner.ask(lambda reply: Unload(reply, drain))

    async def sleep(self, level: int) -> Slept:
        return await self._owner.ask(lambda reply: Sleep(reply, level))

    async def wake(self) -> Woken:
        return await self._owner.ask(lambda reply: Wake(reply))

    # LoRA adapters: straight to the engine (no state of the sidecar's changes), while it is ready.

    async def adapters(self) -> list[Adapter]:
        """The LoRA adapters the engine has now, as it lists them."""
        engine, _ = features.lora_api(self.run.engine, self.run.state)
        return await self.calls.adapters(engine)

    async def load_adapter(self, name: str, path: str) -> list[Adapter]:
        engine, api = features.lora_api(self.run.engine, self.run.state)
        started = time.monotonic()
        await self.calls.post(engine, api.load, {"lora_name": name, "lora_path": path})
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("adapter_load", engine=engine.adapter.name, adapter=name, path=path, duration_ms=duration_ms)
        return await self.calls.adapters(engine)

    async def unload_adapter(self, name: str) -> list[Adapter]:
        engine, api = features.lora_api(self.run.engine, self.run.state)
        started = time.monotonic()
        await self.calls.post(engine, api.unload, {"lora_name": name})
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("adapter_unload", engine=engine.adapter.name, adapter=name, duration_ms=duration_ms)
        return await self.calls.adapters(engine)

    # -- the process's start and end ----------------------------------------------------------------------------

    def stop_leftover(self) -> None:
        """At start-up: stop an engine that a previous sidecar on this port left running (blocking: in a thread)."""
        self.run.record.stop_leftover(self.settings.kill_grace_s)

    def server_stopping(self) -> None:
        """The server received SIGTERM or SIGINT: a load in progress is abandoned now, none is accepted after.
        Safe to call from a signal handler: the command is handed to the owner on its loop."""
        self._owner.call_soon_threadsafe(self._post_stopping)

    def _post_stopping(self) -> None:
        engine = self.run.engine
        if engine is not None and engine.process is not None:
            engine.process.output.let_followers_go()  # open log streams would hold up the server's drain
        self._report(Shutdown(new_reply(), final=False))

    async def shutdown(self) -> None:
        """On the sidecar's exit: stop the engine (requests were drained by the server already)."""
        if self._owner.started and not self._owner.closed:
            with contextlib.suppress(SidecarError):
                await self._owner.ask(lambda reply: Shutdown(reply, final=True))
            await self._owner.finished()
        await self._probe.aclose()

    # -- the owner's hooks ----------------------------------------------------------------------------------

    async def _handle(self, command: AnyCommand) -> None:
        await self._lifecycle.handle(command)

    def _traced(self, command: AnyCommand) -> contextlib.AbstractContextManager[None]:
        return tracing.traced(self._otel, command, self.run)

    def _report(self, command: AnyCommand) -> None:
        """A command from inside (a watcher, the signal handler): dropped once the owner is gone."""
        if not self._owner.closed:
            self._owner.post(command)

    def _closed(self) -> None:
        self._lifecycle.closed()


def checked_adapter(request: LoadRequest, executables: dict[str, str]) -> EngineAdapter:
    """The registered adapter for a load, its flags checked: a 400 before anything changes (`executables`:
    SIDECAR_ENGINE_EXECUTABLES)."""
    try:
        adapter = registered_adapter(request.engine, executables.get(request.engine))
    except UnknownEngine as exc:
        raise BadRequest(str(exc), param="engine", code="unknown_engine") from None
    if adapter.starts_process:
        if request.url is not None:
            raise BadRequest(f"'url' is only for the external engine, not {request.engine}", param="url")
        try:
            adapter.command(request.model, 0, request.args, request.served_model_name)
            adapter.check_env(request.env)
        except AdapterError as exc:
            raise BadRequest(str(exc), param=exc.param) from None
    elif request.url is None:
        raise BadRequest(f"the {request.engine} engine needs 'url'", param="url")
    if adapter.starts_process and (request.api_key is not None or request.headers):
        param = "api_key" if request.api_key is not None else "headers"
        raise BadRequest(f"'{param}' is only for the external engine, not {request.engine}", param=param)
    return adapter
