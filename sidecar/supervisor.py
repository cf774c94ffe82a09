"""The engine's lifecycle: load, readiness, supervision, restart, drain and unload.

One lock serializes every operation that changes the engine (load, unload, restart); a load that finds
it held is refused with 409 at once, an unload cancels a load in progress and then waits its turn.
Readers (status, health, the data plane) read the state without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines import AdapterError, ArgValue, EngineAdapter, UnknownEngine
from engines import adapter as registered_adapter
from sidecar.errors import BadGateway, BadRequest, Conflict, GatewayTimeout, ServiceUnavailable, SidecarError
from sidecar.gpu import Gpus, on_gpu, processes_memory_mb
from sidecar.logs import get_logger
from sidecar.process import EngineProcess, become_subreaper
from sidecar.redaction import Redactor
from sidecar.settings import Settings
from sidecar.state import EngineState

log = get_logger("sidecar.supervisor")

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Supervisor:
    def __init__(self, settings: Settings, redactor: Redactor, gpus: Gpus | None = None) -> None:
        self.settings = settings
        self.redactor = redactor
        self.gpus = gpus
        self.state = EngineState.IDLE
        self.engine: Engine | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self.freed_gpu_memory_mb: float | None = None
        self._lock = asyncio.Lock()
        self._load_task: asyncio.Task[dict[str, Any]] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
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

    # -- load ---------------------------------------------------------------------------------------------

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
        adapter = self._adapter_for(request)
        if self._lock.locked():
            raise Conflict(f"the engine is {self.state}: wait until it is done, or unload first")
        if self.state is EngineState.READY and not request.replace:
            raise Conflict('an engine is already loaded: unload it first, or pass "replace": true')
        await self._lock.acquire()  # free, so this does not wait: nothing can slip in between
        self._cancel_restart()
        spawned = asyncio.Event()
        task = asyncio.create_task(self._load_locked(request, adapter, spawned))
        task.add_done_callback(_consume_exception)
        self._load_task = task
        if not request.wait:
            # 202 once the process exists (it has a pid to show), or at once when an engine must drain first.
            if self.engine is None:
                waiter = asyncio.ensure_future(spawned.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            return 202, self.status()
        try:
            return 200, await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                raise Conflict("the load was cancelled by an unload") from None
            raise

    async def _load_locked(
        self, request: LoadRequest, adapter: EngineAdapter, spawned: asyncio.Event
    ) -> dict[str, Any]:
        try:
            if self.engine is not None:
                await self._stop_engine(self.settings.drain_timeout_s, reason="replace")
            self.restarts = 0
            await self._bring_up(request, adapter, spawned)
            return self._ready_body()
        finally:
            self._lock.release()

    async def _bring_up(
        self, request: LoadRequest, adapter: EngineAdapter, spawned: asyncio.Event | None = None
    ) -> None:
        """Start the engine and wait until it is ready: state loading, then ready or failed."""
        self.state = EngineState.LOADING
        self.exit_code = None
        self.last_error = None
        started = time.monotonic()
        log.info("model_load", engine=adapter.name, model=request.model)
        try:
            engine = await self._spawn(request, adapter)
            self.engine = engine
            if spawned is not None:
                spawned.set()
            await self._wait_ready(engine, request.startup_timeout_s or self.settings.startup_timeout_s)
        except SidecarError as exc:
            self.state = EngineState.FAILED
            self.last_error = exc.message
            log.error("model_load_failed", engine=adapter.name, model=request.model, error=exc.message)
            raise
        except asyncio.CancelledError:
            if self.engine and self.engine.process:
                await self.engine.process.stop(self.settings.kill_grace_s)
            raise
        engine.load_time_s = round(time.monotonic() - started, 3)
        self.state = EngineState.READY
        log.info("model_ready", engine=adapter.name, model=request.model, load_time_s=engine.load_time_s)
        if engine.process is not None:
            self._watch_task = asyncio.create_task(self._watch(engine))

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
            process = await EngineProcess.spawn(adapter.name, argv, env, self.redactor)
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
        if self.engine is not engine or self.state is not EngineState.READY:
            return  # stopped on purpose
        self.state = EngineState.FAILED
        self.exit_code = engine.process.returncode
        self.last_error = f"engine exited with code {self.exit_code} while ready"
        log.error("engine_crashed", engine=engine.adapter.name, exit_code=self.exit_code, tail=engine.process.tail(5))
        await engine.process.stop(self.settings.kill_grace_s)  # whatever is left of its group
        if self.restarts < self.settings.restart_max and not self._lock.locked():
            self._restart_task = asyncio.create_task(self._restart(engine))

    async def _restart(self, crashed: Engine) -> None:
        while self.restarts < self.settings.restart_max:
            delay = min(self.settings.restart_backoff_s * 2**self.restarts, self.settings.restart_backoff_max_s)
            self.restarts += 1
            log.warning("engine_restart_scheduled", engine=crashed.adapter.name, attempt=self.restarts, delay_s=delay)
            await asyncio.sleep(delay)
            if self._lock.locked() or self.state is not EngineState.FAILED:
                return  # an operator's load or unload took over
            async with self._lock:
                try:
                    await self._bring_up(crashed.request, crashed.adapter)
                    log.info("engine_restarted", engine=crashed.adapter.name, attempt=self.restarts)
                    return
                except SidecarError:
                    continue

    def _cancel_restart(self) -> None:
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()

    # -- unload -------------------------------------------------------------------------------------------

    async def unload(self, drain_timeout_s: float | None = None) -> dict[str, Any]:
        self._cancel_restart()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, SidecarError):
                await self._load_task
        async with self._lock:
            if self.engine is None:
                self.state = EngineState.IDLE
                return {"state": EngineState.IDLE}
            drain = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            exit_code = await self._stop_engine(drain, reason="unload")
            return {"state": EngineState.IDLE, "exit_code": exit_code, "freed_gpu_memory_mb": self.freed_gpu_memory_mb}

    async def _stop_engine(self, drain_timeout_s: float, reason: str) -> int | None:
        engine = self.engine
        assert engine is not None
        self.state = EngineState.UNLOADING  # new data-plane requests get 503 from here on
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        exit_code = None
        gpu_before, gpu_pids = await asyncio.to_thread(self._gpu_before_stop)
        if engine.process is not None:
            exit_code = await engine.process.stop(self.settings.kill_grace_s)
        self.freed_gpu_memory_mb = await asyncio.to_thread(self._gpu_freed, gpu_before, gpu_pids)
        self.engine = None
        self.state = EngineState.IDLE
        self.exit_code = exit_code
        log.info(
            "model_unload",
            engine=engine.adapter.name,
            reason=reason,
            exit_code=exit_code,
            freed_gpu_memory_mb=self.freed_gpu_memory_mb,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )
        return exit_code

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

    async def shutdown(self) -> None:
        """On the sidecar's exit: stop the engine (requests were drained by the server already)."""
        await self.unload(drain_timeout_s=0)
        await self._probe.aclose()


def _consume_exception(task: asyncio.Task[Any]) -> None:
    # A load with wait=false has no one awaiting it: its error is in the state and the log already.
    if not task.cancelled():
        task.exception()


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
