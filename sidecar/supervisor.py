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
import os
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines import AdapterError, ArgValue, EngineAdapter, UnknownEngine
from engines import adapter as registered_adapter
from sidecar.errors import BadGateway, BadRequest, Conflict, GatewayTimeout, ServiceUnavailable, SidecarError
from sidecar.gpu import Gpus, on_gpu, processes_memory_mb
from sidecar.logs import get_logger
from sidecar.process import REAP_AFTER_KILL_S, EngineProcess, become_subreaper
from sidecar.redaction import Redactor
from sidecar.runfile import EngineRecord
from sidecar.settings import Settings
from sidecar.state import EngineState, check_transition

log = get_logger("sidecar.supervisor")

T = TypeVar("T")

READY_POLL_S = 0.1
GPU_RELEASE_TIMEOUT_S = 15.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(min_length=1)
    model: str = Field(min_length=1)
    args: dict[str, ArgValue] = {}
    env: dict[str, str] = {}
    served_model_name: str | None = None
    wait: bool = True
    startup_timeout_s: float | None = Field(None, gt=0)
    replace: bool = False
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not _ENV_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid environment variable name(s): {', '.join(map(repr, bad))}")
        return env


@dataclass
class Engine:
    """What runs now: the request that started it, its adapter, and its process (none for `external`)."""

    request: LoadRequest
    adapter: EngineAdapter
    base_url: str
    port: int | None
    process: EngineProcess | None
    started_at: float  # wall clock, for people
    started_monotonic: float
    load_time_s: float | None = None

    @property
    def served_model(self) -> str:
        return self.request.served_model_name or self.request.model


def shutdown_bound_s(settings: Settings) -> float:
    """The longest the sidecar may take to exit after SIGTERM: the server's drain, the engine's SIGTERM grace,
    its reaping after SIGKILL, its GPU memory's release, and a few seconds of the process's own. A container's
    stop grace period (compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`) must cover it,
    or the engine is killed with the sidecar before either can say so."""
    return settings.drain_timeout_s + settings.kill_grace_s + REAP_AFTER_KILL_S + GPU_RELEASE_TIMEOUT_S + 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- commands to the owner -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Command:
    reply: asyncio.Future[Any]


@dataclass(eq=False)
class _Load(_Command):
    request: LoadRequest
    adapter: EngineAdapter


@dataclass(eq=False)
class _Unload(_Command):
    drain_timeout_s: float


@dataclass(eq=False)
class _Crashed(_Command):
    engine: Engine


@dataclass(eq=False)
class _Shutdown(_Command):
    final: bool  # False: the server began to stop (SIGTERM); True: the lifespan ends, everything stops


class _Defer:
    """Leave the command in the inbox: it is taken when the step ends."""


@dataclass
class _Preempt:
    """Stop the step for the command (it is next); `error` is what the step's own caller is told."""

    error: SidecarError | None = None


_DEFER = _Defer()
# What a step does with a command that arrives while it runs: None when the command was answered.
Decision = _Defer | _Preempt | None


class _Abandoned(Exception):
    def __init__(self, error: SidecarError | None) -> None:
        super().__init__(error.message if error else "abandoned")
        self.error = error


def _reply(command: _Command, value: Any) -> None:
    if not command.reply.done():
        command.reply.set_result(value)


def _fail(command: _Command, error: SidecarError) -> None:
    if not command.reply.done():
        command.reply.set_exception(error)


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
        self.freed_gpu_memory_mb: float | None = None
        # The owner's.
        self._inbox: deque[_Command] = deque()
        self._arrived = asyncio.Event()
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
        self._probe = httpx.AsyncClient(timeout=httpx.Timeout(2.0))
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
            "exit_code": self.exit_code,
            "last_error": self.last_error,
            "output_tail": process.tail(20) if process else [],
        }

    @property
    def engine_pid(self) -> int | None:
        engine = self.engine
        return engine.process.pid if engine is not None and engine.process is not None else None

    def _engine_pids(self) -> set[int]:
        """The engine's process and its descendants (vLLM's workers hold the GPU memory, not its API server)."""
        pid = self.engine_pid
        if pid is None:
            return set()
        try:
            root = psutil.Process(pid)
            return {pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.Error:
            return {pid}

    def _gpu_memory_used_mb(self) -> float | None:
        """The engine's own GPU memory where the driver reports it per process, else all used GPU memory."""
        if self.gpus is None or not self.gpus.available:
            return None
        own = processes_memory_mb(self.gpus.read(), self._engine_pids())
        return own if own is not None else self.gpus.used_mb()

    def _ready_body(self) -> dict[str, Any]:
        status = self.status()
        keys = ("state", "engine", "model", "served_model_name", "pid", "port", "load_time_s")
        return {key: status[key] for key in keys} | {"gpu_memory_used_mb": self._gpu_memory_used_mb()}

    @contextlib.asynccontextmanager
    async def request_slot(self) -> AsyncIterator[Engine]:
        """Hold the engine for one data-plane request: 503 unless ready; unload drains these first."""
        engine = self.engine
        if self.state is not EngineState.READY or engine is None:
            raise ServiceUnavailable(f"no model is loaded (engine state: {self.state})")
        self._in_flight += 1
        self._drained.clear()
        try:
            yield engine
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

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
        return adapter

    async def load(self, request: LoadRequest) -> tuple[int, dict[str, Any]]:
        """(200, the ready engine) with `wait`, else (202, the status) once the engine's process exists."""
        adapter = self._adapter_for(request)
        result: tuple[int, dict[str, Any]] = await self._ask(lambda reply: _Load(reply, request, adapter))
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
        if not self._closed:
            self._post(_Shutdown(self._new_reply(), final=False))

    async def shutdown(self) -> None:
        """On the sidecar's exit: stop the engine (requests were drained by the server already)."""
        if self._owner is not None and not self._closed:
            with contextlib.suppress(SidecarError):
                await self._ask(lambda reply: _Shutdown(reply, final=True))
            await self._owner
        await self._probe.aclose()

    def _new_reply(self) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A caller that left never reads the answer: mark it read, so that asyncio does not log it as lost.
        reply.add_done_callback(lambda future: future.cancelled() or future.exception())
        return reply

    def _post(self, command: _Command) -> None:
        if self._owner is None:
            self._loop = asyncio.get_running_loop()
            self._owner = asyncio.create_task(self._own(), name="engine-owner")
        self._inbox.append(command)
        self._arrived.set()

    async def _ask(self, make: Callable[[asyncio.Future[Any]], _Command]) -> Any:
        if self._closed:
            raise _shutting_down("no engine operation is possible")
        command = make(self._new_reply())
        self._post(command)
        assert self._owner is not None
        await asyncio.wait({command.reply, self._owner}, return_when=asyncio.FIRST_COMPLETED)
        if not command.reply.done():
            raise SidecarError("the engine's supervisor stopped", code="supervisor_stopped")
        return command.reply.result()

    # -- the owner ------------------------------------------------------------------------------------------

    async def _own(self) -> None:
        while True:
            command = await self._next()
            try:
                await self._handle(command)
            except Exception as exc:  # a bug: its caller hears of it, and the owner goes on
                log.exception("supervisor_error", command=type(command).__name__)
                _fail(command, SidecarError(f"internal error in the supervisor: {exc.__class__.__name__}"))
            if isinstance(command, _Shutdown) and command.final:
                break
        self._closed = True
        while self._inbox:
            _fail(self._inbox.popleft(), _shutting_down("no engine operation is possible"))
        for watcher in self._watchers:
            watcher.cancel()

    async def _next(self) -> _Command:
        while not self._inbox:
            self._arrived.clear()
            await self._arrived.wait()
        return self._inbox.popleft()

    async def _handle(self, command: _Command) -> None:
        if isinstance(command, _Load):
            await self._load(command)
        elif isinstance(command, _Unload):
            await self._unload(command)
        elif isinstance(command, _Crashed):
            _reply(command, None)
            await self._crashed(command.engine)
        elif isinstance(command, _Shutdown):
            self._closing = True
            if command.final and self.engine is not None:
                await self._stop(0.0, reason="shutdown", joiners=[])
            _reply(command, None)

    async def _during(self, work: Awaitable[T], decide: Callable[[_Command], Decision]) -> T:
        """Await `work` while answering the commands that arrive meanwhile; `decide` may stop it for one."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                for command in list(self._inbox):
                    decision = decide(command)
                    if isinstance(decision, _Defer):
                        continue
                    self._inbox.remove(command)
                    if isinstance(decision, _Preempt):
                        self._inbox.appendleft(command)  # next in line once the step is undone
                        raise _Abandoned(decision.error)
                self._arrived.clear()
                arrived = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait({task, arrived}, return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, SidecarError):
                    await task

    def _set_state(self, state: EngineState) -> None:
        check_transition(self.state, state)
        self.state = state

    # -- load -----------------------------------------------------------------------------------------------

    async def _load(self, command: _Load) -> None:
        request = command.request
        if self._closing:
            return _fail(command, _shutting_down("no engine can be loaded"))
        if self.state is EngineState.READY and not request.replace:
            return _fail(command, Conflict('an engine is already loaded: unload it first, or pass "replace": true'))
        if self.engine is not None:  # ready (replace) or failed: the old engine goes first
            if not request.wait:
                _reply(command, (202, self.status()))
            await self._stop(self.settings.drain_timeout_s, reason="replace", joiners=[])
        self.restarts = 0

        def spawned() -> None:
            if not request.wait:
                _reply(command, (202, self.status()))

        try:
            await self._bring_up(request, command.adapter, spawned)
        except _Abandoned as abandoned:
            if abandoned.error is not None:
                _fail(command, abandoned.error)
        except SidecarError as exc:
            _fail(command, exc)
        else:
            _reply(command, (200, self._ready_body()))

    def _while_loading(self, command: _Command) -> Decision:
        if isinstance(command, _Load):
            if self._closing:
                _fail(command, _shutting_down("no engine can be loaded"))
            elif command.request.replace:
                return _Preempt(Conflict("the load was replaced by another load"))
            else:
                _fail(command, Conflict(f"the engine is {self.state}: wait until it is done, or unload first"))
            return None
        if isinstance(command, _Unload):
            return _Preempt(Conflict("the load was cancelled by an unload"))
        if isinstance(command, _Shutdown):
            return _Preempt(_shutting_down("the load was stopped"))
        _reply(command, None)  # a crash report of an engine already gone
        return None

    async def _bring_up(self, request: LoadRequest, adapter: EngineAdapter, spawned: Callable[[], None]) -> None:
        """Start the engine and wait until it is ready: state loading, then ready, or failed, or abandoned."""
        self._set_state(EngineState.LOADING)
        self.exit_code = None
        self.last_error = None
        started = time.monotonic()
        log.info("model_load", engine=adapter.name, model=request.model)
        try:
            engine = await self._spawn(request, adapter)
            self.engine = engine
            spawned()
            timeout_s = request.startup_timeout_s or self.settings.startup_timeout_s
            await self._during(self._wait_ready(engine, timeout_s), self._while_loading)
        except _Abandoned:
            await self._abandon_load(adapter.name, request.model)
            raise
        except SidecarError as exc:
            self._set_state(EngineState.FAILED)
            self.last_error = exc.message
            log.error("model_load_failed", engine=adapter.name, model=request.model, error=exc.message)
            raise
        engine.load_time_s = round(time.monotonic() - started, 3)
        self._set_state(EngineState.READY)
        log.info("model_ready", engine=adapter.name, model=request.model, load_time_s=engine.load_time_s)
        if engine.process is not None:
            watcher = asyncio.create_task(self._watch(engine))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)

    async def _abandon_load(self, engine_name: str, model: str) -> None:
        self._set_state(EngineState.UNLOADING)
        engine = self.engine
        if engine is not None and engine.process is not None:
            self.exit_code = await self._during(engine.process.stop(self.settings.kill_grace_s), self._while_stopping)
        self.engine = None
        self._set_state(EngineState.IDLE)
        log.info("model_load_abandoned", engine=engine_name, model=model, exit_code=self.exit_code)

    def _while_stopping(self, command: _Command) -> Decision:
        """While an abandoned load's process stops: loads are refused, the rest waits its turn."""
        if isinstance(command, _Load):
            _fail(command, Conflict(f"the engine is {self.state}: wait until it is done"))
            return None
        if isinstance(command, _Crashed):
            _reply(command, None)
            return None
        return _DEFER

    async def _spawn(self, request: LoadRequest, adapter: EngineAdapter) -> Engine:
        now = (time.time(), time.monotonic())
        if not adapter.starts_process:
            assert request.url is not None
            return Engine(request, adapter, request.url.rstrip("/"), None, None, *now)
        port = free_port()
        argv = adapter.command(request.model, port, request.args, request.served_model_name)
        # The request's env goes to the child only; its values are masked in every log line from now on.
        self.redactor.register(*request.env.values())
        env = {**os.environ, **adapter.environment(), **request.env}
        log.info("engine_spawn", engine=adapter.name, argv=argv, port=port, env_names=sorted(request.env))
        try:
            process = await EngineProcess.spawn(
                adapter.name, argv, env, self.redactor, self._record, self.settings.kill_grace_s
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
        while True:
            if process is not None and process.exited.is_set():
                await process.stop(self.settings.kill_grace_s)  # the rest of its group
                self.exit_code = process.returncode
                tail = " | ".join(process.tail(5))
                raise BadGateway(
                    f"engine {engine.adapter.name} exited during start-up with exit code {process.returncode}: {tail}",
                    code="engine_start_failed",
                )
            if await engine.adapter.is_ready(self._probe, engine.base_url):
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
            self._post(_Crashed(self._new_reply(), engine))

    async def _crashed(self, engine: Engine) -> None:
        if self.engine is not engine or self.state is not EngineState.READY:
            return  # stopped on purpose
        assert engine.process is not None
        self._set_state(EngineState.FAILED)
        self.exit_code = engine.process.returncode
        self.last_error = f"engine exited with code {self.exit_code} while ready"
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
                await self._during(asyncio.sleep(delay), self._while_waiting_to_restart)
                await self._bring_up(crashed.request, crashed.adapter, lambda: None)
            except _Abandoned:
                return  # the command that came in goes next
            except SidecarError:
                continue
            log.info("engine_restarted", engine=crashed.adapter.name, attempt=self.restarts)
            return

    def _while_waiting_to_restart(self, command: _Command) -> Decision:
        if isinstance(command, _Crashed):
            _reply(command, None)
            return None
        return _Preempt()

    # -- unload -------------------------------------------------------------------------------------------

    async def _unload(self, command: _Unload) -> None:
        if self.engine is None:
            _reply(command, {"state": EngineState.IDLE})
            return
        joiners: list[_Command] = [command]
        result = await self._stop(command.drain_timeout_s, reason="unload", joiners=joiners)
        for joiner in joiners:
            _reply(joiner, result)

    def _while_unloading(self, joiners: list[_Command], draining: bool) -> Callable[[_Command], Decision]:
        def decide(command: _Command) -> Decision:
            if isinstance(command, _Unload):
                joiners.append(command)  # answered with this unload's result
                return None
            if isinstance(command, _Load):
                _fail(command, Conflict(f"the engine is {self.state}: wait until it is done"))
                return None
            if isinstance(command, _Shutdown):
                return _Preempt() if command.final and draining else _DEFER
            _reply(command, None)
            return None

        return decide

    async def _stop(self, drain_timeout_s: float, reason: str, joiners: list[_Command]) -> dict[str, Any]:
        """Drain the data plane, stop the engine's whole group, and say what was freed: state unloading, then idle."""
        engine = self.engine
        assert engine is not None
        self._set_state(EngineState.UNLOADING)  # new data-plane requests get 503 from here on
        started = time.monotonic()
        drained = asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        with contextlib.suppress(TimeoutError, _Abandoned):
            await self._during(drained, self._while_unloading(joiners, draining=True))
        exit_code = None
        gpu_before, gpu_pids = await asyncio.to_thread(self._gpu_before_stop)
        if engine.process is not None:
            stop = engine.process.stop(self.settings.kill_grace_s)
            exit_code = await self._during(stop, self._while_unloading(joiners, draining=False))
        self.freed_gpu_memory_mb = await asyncio.to_thread(self._gpu_freed, gpu_before, gpu_pids)
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

    def _gpu_before_stop(self) -> tuple[float | None, set[int]]:
        if self.gpus is None or not self.gpus.available:
            return None, set()
        return self.gpus.used_mb(), self._engine_pids()

    def _gpu_freed(self, before: float | None, pids: set[int]) -> float | None:
        """Once the engine's processes have left the GPUs (or the deadline passed): how much memory came back.

        The driver frees a process's memory shortly after it exits, so this polls rather than reads once.
        """
        if self.gpus is None or before is None:
            return None
        deadline = time.monotonic() + GPU_RELEASE_TIMEOUT_S
        while time.monotonic() < deadline:
            if not on_gpu(self.gpus.read(), pids):
                break
            time.sleep(READY_POLL_S)
        else:
            log.warning("gpu_memory_not_released", pids=sorted(pids), timeout_s=GPU_RELEASE_TIMEOUT_S)
        after = self.gpus.used_mb()
        return None if after is None else round(before - after, 1)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
