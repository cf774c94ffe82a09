"""The engine's lifecycle: load, readiness, supervision, restart, drain and unload.

One task, the owner, holds the engine and its state; nothing else changes them. Callers (the control plane,
the lifespan, the engine's watcher, the signal handler) put a command in its inbox and await the answer;
readers (status, health, the data plane) read what it publishes. There is no lock that could outlive its
holder: a caller that goes away only stops listening, and the owner finishes what it started.

The owner takes commands one at a time. While a long step runs (a load waiting for readiness, a restart's
back-off, an unload's drain and stop), it keeps reading its inbox, and answers each command at once or
stops the step for it:

| command, arriving during | loading (a load or a restart) | unloading (an unload or a replace) |
|---|---|---|
| load | 409 | 409 |
| load with `replace` | the load is abandoned (its caller: 409), then this one runs | 409 |
| unload | the load is abandoned (its caller: 409), then idle | answered when this unload ends |
| SIGTERM (the server begins to stop) | the load is abandoned (its caller: 503) | waits for the unload |
| shutdown (the lifespan ends) | the load is abandoned, then everything stops | the drain ends at once, then stop |

At rest: a load when ready is 409 unless it replaces; an unload when idle answers idle at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from engines import AdapterError, EngineAdapter, LoraApi, SleepApi, UnknownEngine
from engines import adapter as registered_adapter
from sidecar.control.engine import Engine, EngineSlot, LoadRequest, free_port
from sidecar.control.inbox import DEFER, Abandoned, Command, Decision, Inbox, Preempt, fail, new_reply, reply
from sidecar.control.process import REAP_AFTER_KILL_S, EngineProcess, become_subreaper, process_tree
from sidecar.control.runfile import EngineRecord
from sidecar.control.shared import SharedState
from sidecar.engine_state import EngineState, check_transition
from sidecar.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    GatewayTimeout,
    NotFound,
    ServiceUnavailable,
    SidecarError,
    engine_error_body,
)
from sidecar.http import tls_context
from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.settings import ENV_PREFIX, Settings
from sidecar.telemetry.gpu import RELEASE_TIMEOUT_S, Gpus, engine_memory_mb, freed_mb
from sidecar.telemetry.metrics import engine_load
from sidecar.telemetry.otel import OpenTelemetry

log = get_logger("sidecar.supervisor")

READY_POLL_S = 0.1
DRAIN_POLL_S = 0.01
# A scrape of the sidecar waits this long at most for the engine's own metrics (its load), then goes without them
# (a hung engine's figures are left out, never the last ones repeated). vLLM's /metrics takes up to 3 s on two busy
# cores: a shorter wait lost its load exactly when it was busiest.
ENGINE_METRICS_TIMEOUT_S = 3.0
# Sleep, wake and adapter loads move weights between GPU, CPU and disk: seconds to minutes for a large model.
ENGINE_CONTROL_TIMEOUT_S = 300.0


def shutdown_bound_s(settings: Settings) -> float:
    """The longest the sidecar may take to exit after SIGTERM: the server's drain, the engine's SIGTERM grace,
    its reaping after SIGKILL, its GPU memory's release, and a few seconds of the process's own. A container's
    stop grace period (compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`) must cover it,
    or the engine is killed with the sidecar before either can say so."""
    return settings.drain_timeout_s + settings.kill_grace_s + REAP_AFTER_KILL_S + RELEASE_TIMEOUT_S + 5.0


# -- commands to the owner -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Load(Command):
    request: LoadRequest
    adapter: EngineAdapter


@dataclass(eq=False)
class _Unload(Command):
    drain_timeout_s: float


@dataclass(eq=False)
class _Crashed(Command):
    engine: Engine


@dataclass(eq=False)
class _Sleep(Command):
    level: int


@dataclass(eq=False)
class _Wake(Command):
    pass


@dataclass(eq=False)
class _IdleUnload(Command):
    engine: Engine  # the engine that was idle when the watcher looked


@dataclass(eq=False)
class _Shutdown(Command):
    final: bool  # False: the server began to stop (SIGTERM); True: the lifespan ends, everything stops


def _shutting_down(what: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"the sidecar is shutting down: {what}", code="shutting_down")


class Supervisor:
    def __init__(self, settings: Settings, redactor: Redactor, gpus: Gpus | None = None) -> None:
        self.settings = settings
        self.redactor = redactor
        self.gpus = gpus
        # Published by the owner, read by anyone.
        self.state = EngineState.IDLE
        self.engine: Engine | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self._last_error_code: str | None = None
        self.freed_gpu_memory_mb: float | None = None
        self.otel: OpenTelemetry | None = None  # control operations as spans, where OpenTelemetry is on
        # The owner's.
        self._inbox = Inbox()
        self._owner: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # the server is stopping: no new load
        self._closed = False  # the owner is gone: every command is 503
        self._watchers: set[asyncio.Task[None]] = set()
        self._record = EngineRecord(settings.run_dir, settings.port)
        # The data plane's.
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._last_used = time.monotonic()  # a data-plane request's start or end: idle unload counts from it
        self._idle_unloaded: LoadRequest | None = None  # what an idle unload took away, for a load on demand
        self._on_demand: asyncio.Task[Any] | None = None
        self._idle_watcher: asyncio.Task[None] | None = None
        # With data-plane workers (SIDECAR_WORKERS > 1): what they are told, and what they say back.
        self.shared: SharedState | None = None
        self._published_engine: Engine | None = None
        self._generation = 0
        self._probe = httpx.AsyncClient(timeout=httpx.Timeout(2.0), verify=tls_context(settings.upstream_ca_file))
        become_subreaper()

    # -- reading ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        engine = self.engine
        process = engine.process if engine else None
        now = time.monotonic()
        return {
            "state": self.state,
            "engine": engine.adapter.name if engine else None,
            "model": engine.request.model if engine else None,
            "served_model_name": engine.served_model if engine else None,
            "pid": process.pid if process else None,
            "port": engine.port if engine else None,
            "started_at": _iso(engine.started_at) if engine else None,
            "uptime_s": round(now - engine.started_monotonic, 3) if engine else None,
            "load_time_s": engine.load_time_s if engine else None,
            "restarts": self.restarts,
            "ttl_s": self._ttl_s(engine) if engine else None,
            "idle_unload_in_s": self._idle_unload_in_s(engine, now),
            "exit_code": self.exit_code,
            "last_error": self.last_error,
            "output_tail": process.tail(20) if process else [],
            "log_followers": process.followers if process else 0,
            "workers": self.shared.workers_now() if self.shared else None,
        }

    async def engine_load(self) -> tuple[tuple[str, str], dict[str, float]] | None:
        """The ready engine's load, read from its own /metrics now: ((model, engine), values); None when there is
        no ready engine, it has no load series, or it does not answer 200 within ENGINE_METRICS_TIMEOUT_S."""
        engine = self.engine
        if self.state is not EngineState.READY or engine is None or engine.adapter.load_series is None:
            return None
        url = engine.base_url + engine.adapter.metrics_path
        try:
            answer = await self._probe.get(url, headers=engine.upstream_headers, timeout=ENGINE_METRICS_TIMEOUT_S)
        except httpx.HTTPError as exc:
            log.debug("engine_metrics_unread", error=str(exc) or exc.__class__.__name__)
            return None
        if answer.status_code != 200:
            log.debug("engine_metrics_unread", status=answer.status_code)
            return None
        return (engine.served_model, engine.adapter.name), engine_load(answer.text, engine.adapter.load_series)

    def _ttl_s(self, engine: Engine) -> float | None:
        return engine.request.ttl_s or self.settings.default_ttl_s or None

    def _idle_unload_in_s(self, engine: Engine | None, now: float) -> float | None:
        """Seconds until the ready engine is unloaded for want of requests (its whole TTL while one runs)."""
        ttl_s = self._ttl_s(engine) if engine is not None and self.state is EngineState.READY else None
        if ttl_s is None:
            return None
        return round(ttl_s if self.in_flight else max(0.0, self.last_used + ttl_s - now), 3)

    def describe_engine(self) -> dict[str, Any]:
        """For the data-plane workers: the engine's generation and what a request to it needs (keys included:
        this goes over the run's private socket only)."""
        engine = self.engine
        described = None
        if engine is not None:
            request = engine.request.model_dump() | {
                "api_key": engine.request.api_key.get_secret_value() if engine.request.api_key else None
            }
            described = {
                "request": request,
                "base_url": engine.base_url,
                "port": engine.port,
                "started_at": engine.started_at,
                "uptime_s": time.monotonic() - engine.started_monotonic,
                "load_time_s": engine.load_time_s,
                "upstream_headers": engine.upstream_headers,
            }
        return {"generation": self._generation, "engine": described}

    @property
    def in_flight(self) -> int:
        """Data-plane requests holding the engine: this process's, and the workers' where there are some."""
        return self._in_flight + (self.shared.in_flight() if self.shared else 0)

    @property
    def last_used(self) -> float:
        """When a data-plane request last started or ended, in any process."""
        return max(self._last_used, self.shared.last_used()) if self.shared else self._last_used

    async def _wait_drained(self) -> None:
        await self._drained.wait()
        while self.shared is not None and self.shared.in_flight() > 0:
            await asyncio.sleep(DRAIN_POLL_S)  # the workers' counts are read, not signalled

    def engine_process(self) -> EngineProcess:
        """The running engine's process, for following its output: 404 without one, 400 for an external engine."""
        engine = self.engine
        if self._closing:
            raise _shutting_down("its engine's output ends now")
        if engine is None:
            raise NotFound("no engine is running: load one first", code="no_engine")
        if engine.process is None:
            raise BadRequest(f"the {engine.adapter.name} engine runs elsewhere: its output is not the sidecar's")
        return engine.process

    @property
    def engine_pid(self) -> int | None:
        engine = self.engine
        return engine.process.pid if engine is not None and engine.process is not None else None

    def _engine_pids(self) -> set[int]:
        pid = self.engine_pid
        return set() if pid is None else process_tree(pid)

    def _ready_body(self) -> dict[str, Any]:
        status = self.status()
        keys = ("state", "engine", "model", "served_model_name", "pid", "port", "load_time_s")
        gpu_memory_used_mb = engine_memory_mb(self.gpus, self._engine_pids())
        return {key: status[key] for key in keys} | {"gpu_memory_used_mb": gpu_memory_used_mb}

    def request_slot(self) -> EngineSlot:
        """Hold the engine for one data-plane request (`async with`, which gives the engine): 503 unless ready
        (after an idle unload, with load on demand, the model is loaded again first); unload drains these first."""
        return EngineSlot(self._hold, self._release)

    async def _hold(self) -> Engine:
        if self.state is not EngineState.READY and self.settings.load_on_demand:
            await self._load_on_demand()
        engine = self.engine
        if self.state is not EngineState.READY or engine is None:
            raise self._not_ready()
        self._in_flight += 1
        self._drained.clear()
        self._last_used = time.monotonic()
        return engine

    def _release(self) -> None:
        self._in_flight -= 1
        self._last_used = time.monotonic()
        if self._in_flight == 0:
            self._drained.set()

    def _not_ready(self) -> ServiceUnavailable:
        idle = self._idle_unloaded
        return not_ready(self.state, idle is not None, idle.model if idle else None)

    async def load_on_demand(self) -> None:
        """For a data-plane worker's request: what `request_slot` does here, with SIDECAR_LOAD_ON_DEMAND."""
        if self.state is not EngineState.READY:
            await self._load_on_demand()
        if self.state is not EngineState.READY:
            raise self._not_ready()

    async def _load_on_demand(self) -> None:
        """The model an idle unload took away is loaded again for the request that needs it; requests that come
        meanwhile wait for the same load. Bounded by the load's start-up timeout; its error is theirs."""
        if self._on_demand is None:
            request = self._idle_unloaded
            if request is None or self.state is not EngineState.IDLE:
                return
            log.info("model_load_on_demand", engine=request.engine, model=request.model)
            self._on_demand = asyncio.create_task(self.load(request.model_copy(update={"wait": True})))
            self._on_demand.add_done_callback(self._on_demand_done)
        await asyncio.shield(self._on_demand)

    def _on_demand_done(self, task: asyncio.Task[Any]) -> None:
        self._on_demand = None
        if not task.cancelled():
            task.exception()  # every waiter has it; retrieved here too, for when they all left

    # -- asking the owner -----------------------------------------------------------------------------------

    def _adapter_for(self, request: LoadRequest) -> EngineAdapter:
        try:
            adapter = registered_adapter(request.engine, self.settings.engine_executables.get(request.engine))
        except UnknownEngine as exc:
            raise BadRequest(str(exc), param="engine", code="unknown_engine") from None
        if adapter.starts_process:
            if request.url is not None:
                raise BadRequest(f"'url' is only for the external engine, not {request.engine}", param="url")
            try:  # bad flags are a 400 before anything changes
                adapter.command(request.model, 0, request.args, request.served_model_name)
            except AdapterError as exc:
                raise BadRequest(str(exc), param=exc.param) from None
        elif request.url is None:
            raise BadRequest(f"the {request.engine} engine needs 'url'", param="url")
        if adapter.starts_process and (request.api_key is not None or request.headers):
            param = "api_key" if request.api_key is not None else "headers"
            raise BadRequest(f"'{param}' is only for the external engine, not {request.engine}", param=param)
        return adapter

    async def load(self, request: LoadRequest) -> tuple[int, dict[str, Any]]:
        """(200, the ready engine) with `wait`, else (202, the status) once the engine's process exists."""
        adapter = self._adapter_for(request)
        result: tuple[int, dict[str, Any]] = await self._ask(lambda reply: _Load(reply, request, adapter))
        return result

    async def sleep(self, level: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._ask(lambda reply: _Sleep(reply, level))
        return result

    async def wake(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._ask(lambda reply: _Wake(reply))
        return result

    async def unload(self, drain_timeout_s: float | None = None) -> dict[str, Any]:
        drain = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        result: dict[str, Any] = await self._ask(lambda reply: _Unload(reply, drain))
        return result

    def stop_leftover(self) -> None:
        """At start-up: stop an engine that a previous sidecar on this port left running (blocking: in a thread)."""
        self._record.stop_leftover(self.settings.kill_grace_s)

    def server_stopping(self) -> None:
        """The server received SIGTERM or SIGINT: a load in progress is abandoned now, none is accepted after.

        Safe to call from a signal handler: the command is handed to the owner on its loop.
        """
        if self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._post_stopping)

    def _post_stopping(self) -> None:
        if self.engine is not None and self.engine.process is not None:
            self.engine.process.let_followers_go()  # open log streams would hold up the server's drain
        if not self._closed:
            self._post(_Shutdown(new_reply(), final=False))

    async def shutdown(self) -> None:
        """On the sidecar's exit: stop the engine (requests were drained by the server already)."""
        if self._owner is not None and not self._closed:
            with contextlib.suppress(SidecarError):
                await self._ask(lambda reply: _Shutdown(reply, final=True))
            await self._owner
        await self._probe.aclose()

    def _post(self, command: Command) -> None:
        if self._owner is None:
            self._loop = asyncio.get_running_loop()
            # A context of its own: the request that happened to start it must not tag every later engine log line.
            self._owner = asyncio.create_task(self._own(), name="engine-owner", context=contextvars.Context())
        self._inbox.post(command)

    async def _ask(self, make: Callable[[asyncio.Future[Any]], Command]) -> Any:
        if self._closed:
            raise _shutting_down("no engine operation is possible")
        command = make(new_reply())
        self._post(command)
        assert self._owner is not None
        await asyncio.wait({command.reply, self._owner}, return_when=asyncio.FIRST_COMPLETED)
        if not command.reply.done():
            raise SidecarError("the engine's supervisor stopped", code="supervisor_stopped")
        return command.reply.result()

    # -- the owner ------------------------------------------------------------------------------------------

    async def _own(self) -> None:
        while True:
            command = await self._inbox.next()
            try:
                with self._traced(command):
                    await self._handle(command)
            except Exception as exc:  # a bug: its caller hears of it, and the owner goes on
                log.exception("supervisor_error", command=type(command).__name__)
                fail(command, SidecarError(f"internal error in the supervisor: {exc.__class__.__name__}"))
            if isinstance(command, _Shutdown) and command.final:
                break
        self._closed = True
        for command in self._inbox.take_all():
            fail(command, _shutting_down("no engine operation is possible"))
        for watcher in self._watchers:
            watcher.cancel()

    async def _handle(self, command: Command) -> None:
        if isinstance(command, _Load):
            await self._load(command)
        elif isinstance(command, _Unload):
            await self._unload(command)
        elif isinstance(command, _Crashed):
            reply(command, None)
            await self._crashed(command.engine)
        elif isinstance(command, _IdleUnload):
            reply(command, None)
            await self._idle(command.engine)
        elif isinstance(command, _Sleep):
            await self._sleep(command)
        elif isinstance(command, _Wake):
            await self._wake(command)
        elif isinstance(command, _Shutdown):
            self._closing = True
            if command.final and self.engine is not None:
                await self._stop(0.0, reason="shutdown", joiners=[])
            reply(command, None)

    @contextlib.contextmanager
    def _traced(self, command: Command) -> Iterator[None]:
        """A span around a command that acts on the engine, where OpenTelemetry is on: what it acted on, the
        state it left, and its error. (A crash report of an engine stopped on purpose does nothing: no span.)"""
        operation = _operation(command, self.engine, self.state) if self.otel is not None else None
        if operation is None or self.otel is None:
            yield
            return
        request = command.request if isinstance(command, _Load) else (self.engine.request if self.engine else None)
        attributes = (
            {} if request is None else {"sidecar.engine": request.engine, "gen_ai.request.model": request.model}
        )
        with self.otel.control(operation, attributes) as span:
            yield
            error = command.reply.exception() if command.reply.done() and not command.reply.cancelled() else None
            span.attributes = {"sidecar.state": str(self.state), "sidecar.restarts": self.restarts}
            if isinstance(error, SidecarError):
                span.error_type = error.code or str(error.status_code)
            elif operation == "engine_crashed":  # an incident, even where a restart brought the engine back
                span.error_type = "engine_crashed"
            elif self.state is EngineState.FAILED:  # a load answered 202, or a restart, that did not come up
                span.error_type = self._last_error_code or "engine_failed"
            if self.exit_code is not None:
                span.attributes["sidecar.exit_code"] = self.exit_code

    def _set_state(self, state: EngineState) -> None:
        check_transition(self.state, state)
        self.state = state
        self._publish()

    def _publish(self) -> None:
        """The state, the engine's generation and the idle-unload flag, for the data-plane workers."""
        if self.shared is None:
            return
        if self.engine is not self._published_engine:
            self._published_engine = self.engine
            self._generation += 1
        self.shared.publish(self.state, self._generation, idle_unloaded=self._idle_unloaded is not None)

    # -- load -----------------------------------------------------------------------------------------------

    async def _load(self, command: _Load) -> None:
        request = command.request
        if self._closing:
            return fail(command, _shutting_down("no engine can be loaded"))
        if self.state in (EngineState.READY, EngineState.SLEEPING) and not request.replace:
            return fail(command, Conflict('an engine is already loaded: unload it first, or pass "replace": true'))
        if self.engine is not None:  # ready or sleeping (replace), or failed: the old engine goes first
            if not request.wait:
                reply(command, (202, self.status()))
            await self._stop(self.settings.drain_timeout_s, reason="replace", joiners=[])
        self.restarts = 0
        self._idle_unloaded = None  # an operator's load: no load on demand of what an idle unload took

        def spawned() -> None:
            if not request.wait:
                reply(command, (202, self.status()))

        try:
            await self._bring_up(request, command.adapter, spawned)
        except Abandoned as abandoned:
            if abandoned.error is not None:
                fail(command, abandoned.error)
        except SidecarError as exc:
            fail(command, exc)
        else:
            reply(command, (200, self._ready_body()))

    def _while_loading(self, command: Command) -> Decision:
        if _refused_while_busy(command, self.state):
            return None
        if isinstance(command, _Load):
            if self._closing:
                fail(command, _shutting_down("no engine can be loaded"))
            elif command.request.replace:
                return Preempt(Conflict("the load was replaced by another load"))
            else:
                fail(command, Conflict(f"the engine is {self.state}: wait until it is done, or unload first"))
            return None
        if isinstance(command, _Unload):
            return Preempt(Conflict("the load was cancelled by an unload"))
        if isinstance(command, _Shutdown):
            return Preempt(_shutting_down("the load was stopped"))
        reply(command, None)  # a crash report of an engine already gone
        return None

    async def _bring_up(self, request: LoadRequest, adapter: EngineAdapter, spawned: Callable[[], None]) -> None:
        """Start the engine and wait until it is ready: state loading, then ready, or failed, or abandoned."""
        self._set_state(EngineState.LOADING)
        self.exit_code = None
        self.last_error = self._last_error_code = None
        started = time.monotonic()
        log.info("model_load", engine=adapter.name, model=request.model)
        try:
            engine = await self._spawn(request, adapter)
            self.engine = engine
            spawned()
            timeout_s = request.startup_timeout_s or self.settings.startup_timeout_s
            await self._inbox.during(self._wait_ready(engine, timeout_s), self._while_loading)
        except Abandoned:
            await self._abandon_load(adapter.name, request.model)
            raise
        except SidecarError as exc:
            self._set_state(EngineState.FAILED)
            self.last_error, self._last_error_code = exc.message, exc.code
            log.error("model_load_failed", engine=adapter.name, model=request.model, error=exc.message)
            raise
        engine.load_time_s = round(time.monotonic() - started, 3)
        self._last_used = time.monotonic()
        self._set_state(EngineState.READY)
        log.info("model_ready", engine=adapter.name, model=request.model, load_time_s=engine.load_time_s)
        if engine.process is not None:
            self._start_watcher(self._watch(engine))
        self._watch_idleness(engine)

    def _start_watcher(self, watch: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        watcher = asyncio.create_task(watch)
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return watcher

    def _watch_idleness(self, engine: Engine) -> None:
        """One idle watcher at a time, for the engine now ready (none without a TTL)."""
        if self._idle_watcher is not None:
            self._idle_watcher.cancel()
        ttl_s = self._ttl_s(engine)
        self._idle_watcher = None if ttl_s is None else self._start_watcher(self._watch_idle(engine, ttl_s))

    async def _abandon_load(self, engine_name: str, model: str) -> None:
        self._set_state(EngineState.UNLOADING)
        engine = self.engine
        if engine is not None and engine.process is not None:
            stop = engine.process.stop(self.settings.kill_grace_s)
            self.exit_code = await self._inbox.during(stop, self._while_stopping)
        self.engine = None
        self._set_state(EngineState.IDLE)
        log.info("model_load_abandoned", engine=engine_name, model=model, exit_code=self.exit_code)

    def _while_stopping(self, command: Command) -> Decision:
        """While an abandoned load's process stops: loads are refused, the rest waits its turn."""
        if isinstance(command, _Load):
            fail(command, Conflict(f"the engine is {self.state}: wait until it is done"))
            return None
        if isinstance(command, _Crashed):
            reply(command, None)
            return None
        return DEFER

    async def _spawn(self, request: LoadRequest, adapter: EngineAdapter) -> Engine:
        now = (time.time(), time.monotonic())
        # The request's env goes to the child only, its key and headers to the engine only; their values are
        # masked in every log line from now on.
        self.redactor.register(*request.secrets())
        if not adapter.starts_process:
            assert request.url is not None
            return Engine(
                request, adapter, request.url.rstrip("/"), None, None, *now, upstream_headers=request.upstream_headers()
            )
        port = free_port()
        argv = adapter.command(request.model, port, request.args, request.served_model_name)
        env = {**inherited_environment(), **adapter.environment(request.args), **request.env}
        log.info("engine_spawn", engine=adapter.name, argv=argv, port=port, env_names=sorted(request.env))
        try:
            process = await EngineProcess.spawn(
                adapter.name, argv, env, self.redactor, self._record, self.settings.kill_grace_s, port
            )
        except OSError as exc:
            raise BadGateway(
                f"cannot start engine {adapter.name}: {exc.strerror or exc}", code="engine_spawn_failed"
            ) from None
        return Engine(request, adapter, f"http://127.0.0.1:{port}", port, process, *now)

    async def _wait_ready(self, engine: Engine, timeout_s: float) -> None:
        """Poll readiness until the deadline; an exit during start-up ends the wait at once."""
        deadline = time.monotonic() + timeout_s
        process = engine.process
        if process is None:  # a server that should be running already: nothing listening, or a refused key, is final
            try:
                answer = await self._probe.get(engine.base_url + "/v1/models", headers=engine.upstream_headers)
            except httpx.ConnectError as exc:  # refused, unknown host, or a certificate that does not verify
                raise BadGateway(f"cannot reach {engine.base_url}: {exc}", code="engine_unreachable") from None
            except httpx.HTTPError:
                pass
            else:
                if answer.status_code in (401, 403):
                    raise BadGateway(
                        f"{engine.base_url} refused the key ({answer.status_code}): check 'api_key'",
                        code="engine_unauthorized",
                    )
        while True:
            if process is not None and process.exited.is_set():
                await process.stop(self.settings.kill_grace_s)  # the rest of its group
                self.exit_code = process.returncode
                tail = " | ".join(process.tail(5))
                raise BadGateway(
                    f"engine {engine.adapter.name} exited during start-up with exit code {process.returncode}: {tail}",
                    code="engine_start_failed",
                )
            if await engine.adapter.is_ready(self._probe, engine.base_url, engine.upstream_headers):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if process is not None:
                    self.exit_code = await process.stop(self.settings.kill_grace_s)
                raise GatewayTimeout(
                    f"engine {engine.adapter.name} was not ready within {timeout_s:g}s; it was stopped",
                    code="engine_start_timeout",
                )
            wait = min(READY_POLL_S, remaining)
            if process is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.exited.wait(), wait)

    # -- supervision --------------------------------------------------------------------------------------

    async def _watch(self, engine: Engine) -> None:
        assert engine.process is not None
        await engine.process.exited.wait()
        if not self._closed:
            self._post(_Crashed(new_reply(), engine))

    async def _crashed(self, engine: Engine) -> None:
        if self.engine is not engine or self.state not in (EngineState.READY, EngineState.SLEEPING):
            return  # stopped on purpose
        assert engine.process is not None
        self.last_error = f"engine exited with code {engine.process.returncode} while {self.state}"
        self._last_error_code = "engine_crashed"
        self._set_state(EngineState.FAILED)
        self.exit_code = engine.process.returncode
        log.error("engine_crashed", engine=engine.adapter.name, exit_code=self.exit_code, tail=engine.process.tail(5))
        await engine.process.stop(self.settings.kill_grace_s)  # whatever is left of its group
        if not self._closing:
            await self._restart(engine)

    async def _restart(self, crashed: Engine) -> None:
        """Bring a crashed engine back, with back-off, until the policy's count; any operator command comes first."""
        while self.restarts < self.settings.restart_max:
            delay = min(self.settings.restart_backoff_s * 2**self.restarts, self.settings.restart_backoff_max_s)
            self.restarts += 1
            log.warning("engine_restart_scheduled", engine=crashed.adapter.name, attempt=self.restarts, delay_s=delay)
            try:
                await self._inbox.during(asyncio.sleep(delay), self._while_waiting_to_restart)
                await self._bring_up(crashed.request, crashed.adapter, lambda: None)
            except Abandoned:
                return  # the command that came in goes next
            except SidecarError:
                continue
            log.info("engine_restarted", engine=crashed.adapter.name, attempt=self.restarts)
            return
        if self.settings.restart_max:  # the policy is spent: the engine stays down until an operator loads one
            log.error("engine_restarts_exhausted", engine=crashed.adapter.name, restarts=self.restarts)

    def _while_waiting_to_restart(self, command: Command) -> Decision:
        if _refused_while_busy(command, self.state):
            return None
        if isinstance(command, _Crashed | _IdleUnload):
            reply(command, None)
            return None
        return Preempt()

    async def _watch_idle(self, engine: Engine, ttl_s: float) -> None:
        """Ask the owner to unload the engine once no request has started or ended for ttl_s."""
        while self.engine is engine:
            if self.in_flight:
                await self._wait_drained()
                continue
            left = self.last_used + ttl_s - time.monotonic()
            if left <= 0:
                self._post(_IdleUnload(new_reply(), engine))
                return
            await asyncio.sleep(left)

    async def _idle(self, engine: Engine) -> None:
        if self.engine is not engine or self.state is not EngineState.READY:
            return  # stopped, replaced or crashed since the watcher looked
        ttl_s = self._ttl_s(engine)
        assert ttl_s is not None
        if self.in_flight or time.monotonic() - self.last_used < ttl_s:
            self._watch_idleness(engine)  # a request came in meanwhile: start over
            return
        await self._stop(self.settings.drain_timeout_s, reason="idle", joiners=[])
        self._idle_unloaded = engine.request
        self._publish()

    # -- sleep and wake (an engine's sleep mode) ----------------------------------------------------------

    def _sleep_api(self, engine: Engine | None) -> tuple[Engine, SleepApi]:
        if engine is None:
            raise Conflict("no engine is loaded", code="no_engine")
        api = engine.adapter.sleep_api(engine.request.args)
        if api is None:
            raise _missing(engine, "sleep mode", engine.adapter.sleep_mode)
        return engine, api

    async def _sleep(self, command: _Sleep) -> None:
        """Drain, then ask the engine to give its GPU memory back: state sleeping, data plane 503 meanwhile."""
        try:
            engine, api = self._sleep_api(self.engine)
            if self.state is not EngineState.READY:
                raise Conflict(f"the engine is {self.state}: only a ready engine can sleep")
            if command.level not in api.levels:
                levels = " or ".join(map(str, api.levels))
                raise BadRequest(f"level: the {engine.adapter.name} engine sleeps at level {levels}", param="level")
        except SidecarError as exc:
            return fail(command, exc)
        started = time.monotonic()
        self._set_state(EngineState.SLEEPING)  # new data-plane requests get 503 from here on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_drained(), self.settings.drain_timeout_s)
        try:
            freed = await self._engine_call(engine, f"{api.sleep}?level={command.level}")
        except SidecarError as exc:
            self._set_state(EngineState.READY)  # the engine did not sleep: as it was
            return fail(command, exc)
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info(
            "model_sleep",
            engine=engine.adapter.name,
            sleep_level=command.level,  # "level" is the log line's own
            freed_gpu_memory_mb=freed,
            duration_ms=duration_ms,
        )
        reply(command, {"state": self.state, "level": command.level, "freed_gpu_memory_mb": freed})

    async def _wake(self, command: _Wake) -> None:
        try:
            engine, api = self._sleep_api(self.engine)
            if self.state is not EngineState.SLEEPING:
                raise Conflict(f"the engine is {self.state}: only a sleeping engine wakes")
        except SidecarError as exc:
            return fail(command, exc)
        started = time.monotonic()
        try:
            freed = await self._engine_call(engine, api.wake)
        except SidecarError as exc:
            return fail(command, exc)  # still asleep
        taken = None if freed is None else round(-freed, 1)
        self._last_used = time.monotonic()
        self._set_state(EngineState.READY)
        self._watch_idleness(engine)  # its idle watcher stopped while it slept
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("model_wake", engine=engine.adapter.name, gpu_memory_taken_mb=taken, duration_ms=duration_ms)
        reply(command, {"state": self.state, "gpu_memory_taken_mb": taken})

    async def _engine_call(self, engine: Engine, path: str, body: dict[str, Any] | None = None) -> float | None:
        """POST to the engine's own control endpoint; the GPU memory it gave back (negative: took), null without
        a GPU. Its refusal is a 400 with its own words where it blames the request, else 502."""
        before = await asyncio.to_thread(self.gpus.used_mb) if self.gpus and self.gpus.available else None
        try:
            answer = await self._probe.post(
                engine.base_url + path, json=body, headers=engine.upstream_headers, timeout=ENGINE_CONTROL_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise BadGateway(f"the engine did not answer {path}: {exc or exc.__class__.__name__}") from None
        if answer.status_code >= 400:
            said = engine_error_body(answer.status_code, answer.content)["error"]["message"]
            if answer.status_code in (400, 404, 409, 422):
                raise BadRequest(f"the engine refused: {said}", code="engine_refused")
            raise BadGateway(f"the engine answered {answer.status_code} to {path}: {said}")
        after = await asyncio.to_thread(self.gpus.used_mb) if before is not None and self.gpus else None
        return None if before is None or after is None else round(before - after, 1)

    # -- LoRA adapters (an engine's dynamic LoRA) -----------------------------------------------------------

    def _lora_api(self) -> tuple[Engine, LoraApi]:
        engine = self.engine
        if self.state is not EngineState.READY or engine is None:
            raise Conflict(f"the engine is {self.state}: adapters need a ready engine", code="engine_not_ready")
        api = engine.adapter.lora_api(engine.request.args)
        if api is None:
            raise _missing(engine, "dynamic LoRA", engine.adapter.dynamic_lora)
        return engine, api

    async def adapters(self) -> list[dict[str, Any]]:
        """The LoRA adapters the engine has now, read from its /v1/models (entries that name a parent)."""
        engine, _ = self._lora_api()
        try:
            answer = await self._probe.get(engine.base_url + "/v1/models", headers=engine.upstream_headers)
            models = answer.raise_for_status().json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BadGateway(f"the engine's model list could not be read: {exc or exc.__class__.__name__}") from None
        return [
            {"name": m.get("id"), "path": m.get("root"), "parent": m["parent"]}
            for m in models
            if isinstance(m, dict) and m.get("parent")
        ]

    async def load_adapter(self, name: str, path: str) -> list[dict[str, Any]]:
        engine, api = self._lora_api()
        started = time.monotonic()
        await self._engine_call(engine, api.load, {"lora_name": name, "lora_path": path})
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("adapter_load", engine=engine.adapter.name, adapter=name, path=path, duration_ms=duration_ms)
        return await self.adapters()

    async def unload_adapter(self, name: str) -> list[dict[str, Any]]:
        engine, api = self._lora_api()
        started = time.monotonic()
        await self._engine_call(engine, api.unload, {"lora_name": name})
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("adapter_unload", engine=engine.adapter.name, adapter=name, duration_ms=duration_ms)
        return await self.adapters()

    # -- unload -------------------------------------------------------------------------------------------

    async def _unload(self, command: _Unload) -> None:
        self._idle_unloaded = None  # an operator's unload: the model stays away
        if self.engine is None:
            self._publish()
            reply(command, {"state": EngineState.IDLE})
            return
        joiners: list[Command] = [command]
        result = await self._stop(command.drain_timeout_s, reason="unload", joiners=joiners)
        for joiner in joiners:
            reply(joiner, result)

    def _while_unloading(self, joiners: list[Command], draining: bool) -> Callable[[Command], Decision]:
        def decide(command: Command) -> Decision:
            if _refused_while_busy(command, self.state):
                return None
            if isinstance(command, _Unload):
                joiners.append(command)  # answered with this unload's result
                return None
            if isinstance(command, _Load):
                fail(command, Conflict(f"the engine is {self.state}: wait until it is done"))
                return None
            if isinstance(command, _Shutdown):
                return Preempt() if command.final and draining else DEFER
            reply(command, None)
            return None

        return decide

    async def _stop(self, drain_timeout_s: float, reason: str, joiners: list[Command]) -> dict[str, Any]:
        """Drain the data plane, stop the engine's whole group, and say what was freed: state unloading, then idle."""
        engine = self.engine
        assert engine is not None
        self._set_state(EngineState.UNLOADING)  # new data-plane requests get 503 from here on
        started = time.monotonic()
        drained = asyncio.wait_for(self._wait_drained(), drain_timeout_s)
        with contextlib.suppress(TimeoutError, Abandoned):
            await self._inbox.during(drained, self._while_unloading(joiners, draining=True))
        exit_code = None
        gpu_before = await asyncio.to_thread(self.gpus.used_mb) if self.gpus and self.gpus.available else None
        gpu_pids = self._engine_pids()
        if engine.process is not None:
            stop = engine.process.stop(self.settings.kill_grace_s)
            exit_code = await self._inbox.during(stop, self._while_unloading(joiners, draining=False))
        self.freed_gpu_memory_mb = await asyncio.to_thread(freed_mb, self.gpus, gpu_before, gpu_pids)
        self.engine = None
        self._set_state(EngineState.IDLE)
        self.exit_code = exit_code
        log.info(
            "model_unload",
            engine=engine.adapter.name,
            reason=reason,
            exit_code=exit_code,
            freed_gpu_memory_mb=self.freed_gpu_memory_mb,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )
        return {"state": EngineState.IDLE, "exit_code": exit_code, "freed_gpu_memory_mb": self.freed_gpu_memory_mb}


def not_ready(state: EngineState, idle_unloaded: bool, model: str | None = None) -> ServiceUnavailable:
    """The data plane's 503 while no engine is ready, saying why."""
    if state is EngineState.SLEEPING:
        return ServiceUnavailable("the model is sleeping: wake it first (POST /v1/model/wake)", code="model_sleeping")
    if state is EngineState.IDLE and idle_unloaded:
        return ServiceUnavailable(
            f"the model{f' {model!r}' if model else ''} was unloaded after its ttl_s without requests: load it "
            "again (SIDECAR_LOAD_ON_DEMAND=true does that for the next request)",
            code="model_unloaded_idle",
        )
    return ServiceUnavailable(f"no model is loaded (engine state: {state})")


def _missing(engine: Engine, feature: str, api: SleepApi | LoraApi | None) -> BadRequest:
    """An engine feature asked of an engine without it: the flag to load it with, where it has one."""
    hint = f' load it with "args": {{"{api.flag}": true}}' if api is not None else " it has none"
    return BadRequest(f"the {engine.adapter.name} engine as loaded has no {feature}:{hint}")


def _refused_while_busy(command: Command, state: EngineState) -> bool:
    """Sleep and wake during a load, a restart's wait or an unload: 409 at once (True), as a load is."""
    if isinstance(command, _Sleep | _Wake):
        fail(command, Conflict(f"the engine is {state}: wait until it is done"))
        return True
    return False


def _operation(command: Command, engine: Engine | None, state: EngineState) -> str | None:
    """The span's name for a command that acts on the engine; None for one that will not."""
    if isinstance(command, _Crashed):
        alive = command.engine is engine and state in (EngineState.READY, EngineState.SLEEPING)
        return "engine_crashed" if alive else None
    if isinstance(command, _IdleUnload):
        return "idle_unload" if command.engine is engine and state is EngineState.READY else None
    if isinstance(command, _Shutdown):
        return "shutdown" if command.final and engine is not None else None
    names = {_Load: "load", _Unload: "unload", _Sleep: "sleep", _Wake: "wake"}
    return names.get(type(command))


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def inherited_environment() -> dict[str, str]:
    """What the engine inherits of the sidecar's environment: all of it (CUDA, Hugging Face, the engine's own
    variables) but the sidecar's settings, its keys among them. An engine, its custom code (`trust_remote_code`)
    or a crash dump of it never holds them."""
    return {name: value for name, value in os.environ.items() if not name.upper().startswith(ENV_PREFIX)}
