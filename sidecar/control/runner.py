"""One engine at a time, started and stopped: the steps the owner's commands are made of, and the state they
publish (read by anyone: status, health, the data plane, the workers through the shared block)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from engines import EngineAdapter
from sidecar.control import startup
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.gate import RequestGate
from sidecar.control.inbox import Abandoned, AnyCommand, Inbox
from sidecar.control.policy import Phase, decide
from sidecar.control.process import process_tree
from sidecar.control.records import EngineStatus, ReadyEngine, Unloaded
from sidecar.control.runfile import EngineRecord
from sidecar.control.shared import SharedState
from sidecar.engine_state import EngineState, check_transition
from sidecar.errors import SidecarError
from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.settings import Settings
from sidecar.telemetry.gpu import Gpus, engine_memory_mb, freed_mb

log = get_logger("sidecar.supervisor")


class Runner:
    """The engine's start (loading, then ready or failed) and stop (drain, the process group stopped, idle), and
    the state they leave: what status, health and the workers read."""

    def __init__(
        self,
        settings: Settings,
        redactor: Redactor,
        gpus: Gpus | None,
        gate: RequestGate,
        probe: httpx.AsyncClient,
        inbox: Inbox,
        shared: SharedState | None,
    ) -> None:
        self.settings, self.redactor, self.gpus, self.gate, self.probe = settings, redactor, gpus, gate, probe
        self.inbox, self.shared = inbox, shared
        self.record = EngineRecord(settings.run_dir, settings.port)
        self.state = EngineState.IDLE
        self.engine: Engine | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self.last_error_code: str | None = None
        self.freed_gpu_memory_mb: float | None = None
        self.idle_unloaded: LoadRequest | None = None  # what an idle unload took away, for a load on demand
        self.closing = False  # the server is stopping: no new load
        self.generation = 0  # changes whenever the engine does: the workers fetch its description then
        self._published_engine: Engine | None = None

    def during(self, phase: Phase, work: Awaitable[Any], joiners: list[AnyCommand] | None = None) -> Awaitable[Any]:
        """`work`, with the commands that arrive meanwhile answered as the policy says for `phase`."""
        joined = [] if joiners is None else joiners
        return self.inbox.during(work, lambda command: decide(phase, command, self.state, self.closing, joined))

    def set_state(self, state: EngineState) -> None:
        check_transition(self.state, state)
        self.state = state
        self.publish()

    def publish(self) -> None:
        """The state, the engine's generation and the idle-unload flag, for the data-plane workers."""
        if self.shared is None:
            return
        if self.engine is not self._published_engine:
            self._published_engine = self.engine
            self.generation += 1
        self.shared.publish(self.state, self.generation, idle_unloaded=self.idle_unloaded is not None)

    # -- reading ------------------------------------------------------------------------------------------

    def status(self) -> EngineStatus:
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
            "ttl_s": self.ttl_s(engine) if engine else None,
            "idle_unload_in_s": self._idle_unload_in_s(engine, now),
            "exit_code": self.exit_code,
            "last_error": self.last_error,
            "output_tail": process.output.tail(20) if process else [],
            "log_followers": process.output.followers if process else 0,
            "workers": self.shared.workers_now() if self.shared else None,
        }

    def ttl_s(self, engine: Engine) -> float | None:
        return engine.request.ttl_s or self.settings.default_ttl_s or None

    def _idle_unload_in_s(self, engine: Engine | None, now: float) -> float | None:
        """Seconds until the ready engine is unloaded for want of requests (its whole TTL while one runs)."""
        ttl_s = self.ttl_s(engine) if engine is not None and self.state is EngineState.READY else None
        if ttl_s is None:
            return None
        return round(ttl_s if self.gate.in_flight else max(0.0, self.gate.last_used + ttl_s - now), 3)

    def ready_body(self) -> ReadyEngine:
        """A load's answer once the engine is ready."""
        s = self.status()
        return ReadyEngine(
            state=s["state"],
            engine=s["engine"],
            model=s["model"],
            served_model_name=s["served_model_name"],
            pid=s["pid"],
            port=s["port"],
            load_time_s=s["load_time_s"],
            gpu_memory_used_mb=engine_memory_mb(self.gpus, self.engine_pids()),
        )

    def engine_pids(self) -> set[int]:
        engine = self.engine
        return set() if engine is None or engine.process is None else process_tree(engine.process.pid)

    # -- start ----------------------------------------------------------------------------------------------

    async def bring_up(self, request: LoadRequest, adapter: EngineAdapter, spawned: Callable[[], None]) -> Engine:
        """Start the engine and wait until it is ready: state loading, then ready, or failed, or abandoned."""
        self.set_state(EngineState.LOADING)
        self.exit_code = self.last_error = self.last_error_code = None
        started = time.monotonic()
        log.info("model_load", engine=adapter.name, model=request.model)
        settings = self.settings
        engine: Engine | None = None
        try:
            engine = await startup.spawn(
                request, adapter, self.redactor, self.record, settings.kill_grace_s, settings.engine_output_lines_per_s
            )
            self.engine = engine
            spawned()
            timeout_s = request.startup_timeout_s or settings.startup_timeout_s
            await self.during(Phase.LOADING, startup.wait_ready(engine, self.probe, timeout_s, settings.kill_grace_s))
        except Abandoned:
            await self._abandon_load(adapter.name, request.model)
            raise
        except Exception as exc:
            failure = exc if isinstance(exc, SidecarError) else await self._bug_in_load(engine, exc)
            self.set_state(EngineState.FAILED)
            if engine is not None and engine.process is not None:
                self.exit_code = engine.process.returncode
            self.last_error, self.last_error_code = failure.message, failure.code
            log.error("model_load_failed", engine=adapter.name, model=request.model, error=failure.message)
            raise failure from None
        engine.load_time_s = round(time.monotonic() - started, 3)
        self.gate.touch()
        self.set_state(EngineState.READY)
        log.info("model_ready", engine=adapter.name, model=request.model, load_time_s=engine.load_time_s)
        return engine

    async def _bug_in_load(self, engine: Engine | None, exc: Exception) -> SidecarError:
        """A load that failed where no failure was foreseen (a bug) fails as any other does: state failed, its
        engine stopped rather than left running unsupervised, and the next load or unload free to go on."""
        log.error("model_load_error", exc_info=exc)
        if engine is not None and engine.process is not None:
            await engine.process.stop(self.settings.kill_grace_s)
        return SidecarError(f"internal error while loading the engine: {exc.__class__.__name__}")

    async def _abandon_load(self, engine_name: str, model: str) -> None:
        self.set_state(EngineState.UNLOADING)
        engine = self.engine
        if engine is not None and engine.process is not None:
            self.exit_code = await self.during(Phase.ABANDONING, engine.process.stop(self.settings.kill_grace_s))
        self._let_go()
        self.set_state(EngineState.IDLE)
        log.info("model_load_abandoned", engine=engine_name, model=model, exit_code=self.exit_code)

    # -- stop -----------------------------------------------------------------------------------------------

    async def stop(self, drain_timeout_s: float, reason: str, joiners: list[AnyCommand]) -> Unloaded:
        """Drain the data plane, stop the engine's whole group, and say what was freed: state unloading, then idle.
        Unloads that arrive meanwhile join `joiners`."""
        engine = self.engine
        assert engine is not None
        self.set_state(EngineState.UNLOADING)  # new data-plane requests get 503 from here on
        started = time.monotonic()
        with contextlib.suppress(TimeoutError, Abandoned):
            await self.during(Phase.DRAINING, asyncio.wait_for(self.gate.drained(), drain_timeout_s), joiners)
        gpu_before = await asyncio.to_thread(self.gpus.used_mb) if self.gpus and self.gpus.available else None
        gpu_pids = self.engine_pids()
        exit_code = None
        if engine.process is not None:
            stop = engine.process.stop(self.settings.kill_grace_s)
            exit_code = await self.during(Phase.STOPPING, stop, joiners)
        self.freed_gpu_memory_mb = freed = await asyncio.to_thread(freed_mb, self.gpus, gpu_before, gpu_pids)
        self._let_go()
        self.set_state(EngineState.IDLE)
        self.exit_code = exit_code
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info(
            "model_unload",
            engine=engine.adapter.name,
            reason=reason,
            exit_code=exit_code,
            freed_gpu_memory_mb=freed,
            duration_ms=duration_ms,
        )
        return Unloaded(state=EngineState.IDLE, exit_code=exit_code, freed_gpu_memory_mb=freed)

    def _let_go(self) -> None:
        """No engine here any more: an external one's masked values are forgotten now (an engine process forgets
        its own once its output has ended, `EngineProcess.spawn`)."""
        engine, self.engine = self.engine, None
        if engine is not None and engine.process is None:
            self.redactor.forget(*engine.masked)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
