"""What the owner does with each command: load, unload, restart after a crash, unload when idle, sleep and wake.

Run by the owner's task only (`owner.py`), one command at a time, out of the runner's steps (`runner.py`); a
long step reads the inbox meanwhile and answers what arrives as `policy.POLICY` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from engines import EngineAdapter
from sidecar.control import features
from sidecar.control.commands import Crashed, IdleUnload, Load, Shutdown, Sleep, Unload, Wake, shutting_down
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.features import EngineCalls
from sidecar.control.inbox import Abandoned, AnyCommand, fail, new_reply, reply
from sidecar.control.policy import Phase
from sidecar.control.records import Slept, Unloaded, Woken
from sidecar.control.runner import Runner
from sidecar.engine_state import EngineState
from sidecar.errors import BadRequest, Conflict, SidecarError
from sidecar.logs import get_logger

log = get_logger("sidecar.supervisor")


class Lifecycle:
    """The owner's handler: one command at a time, out of the runner's steps; the engine's watchers (its exit,
    its idleness) report back as commands."""

    def __init__(self, run: Runner, calls: EngineCalls, post: Callable[[AnyCommand], None]) -> None:
        self.run = run
        self.calls = calls
        self.post = post  # into the owner's inbox (a watcher's report)
        self.settings = run.settings
        self._watchers: set[asyncio.Task[None]] = set()
        self._idle_watcher: asyncio.Task[None] | None = None
        self.sleep = asyncio.sleep  # a restart's back-off waits on it (a test's clock stands in)

    async def handle(self, command: AnyCommand) -> None:
        run = self.run
        if isinstance(command, Load):
            await self._load(command)
        elif isinstance(command, Unload):
            await self._unload(command)
        elif isinstance(command, Crashed):
            reply(command, None)
            await self._crashed(command.engine)
        elif isinstance(command, IdleUnload):
            reply(command, None)
            await self._idle(command.engine)
        elif isinstance(command, Sleep):
            await _answer(command, self._sleep(command.level))
        elif isinstance(command, Wake):
            await _answer(command, self._wake())
        elif isinstance(command, Shutdown):
            run.closing = True
            if command.final and run.engine is not None:
                await run.stop(0.0, reason="shutdown", joiners=[])
            reply(command, None)

    def closed(self) -> None:
        """The owner is gone: so are the watchers."""
        for watcher in self._watchers:
            watcher.cancel()

    # -- load and unload --------------------------------------------------------------------------------------

    async def _load(self, command: Load) -> None:
        request, run = command.request, self.run
        if run.closing:
            return fail(command, shutting_down("no engine can be loaded"))
        if run.state in (EngineState.READY, EngineState.SLEEPING) and not request.replace:
            return fail(command, Conflict('an engine is already loaded: unload it first, or pass "replace": true'))

        def spawned() -> None:
            if not request.wait:
                reply(command, (202, run.status()))

        if run.engine is not None:  # ready or sleeping (replace), or failed: the old engine goes first
            spawned()
            await run.stop(self.settings.drain_timeout_s, reason="replace", joiners=[])
        run.restarts = 0
        run.idle_unloaded = None  # an operator's load: no load on demand of what an idle unload took
        try:
            await self._bring_up(request, command.adapter, spawned)
        except Abandoned as abandoned:
            if abandoned.error is not None:
                fail(command, abandoned.error)
        except SidecarError as exc:
            fail(command, exc)
        else:
            reply(command, (200, run.ready_body()))

    async def _bring_up(self, request: LoadRequest, adapter: EngineAdapter, spawned: Callable[[], None]) -> None:
        """The runner's start, and the engine's watchers once it is ready."""
        engine = await self.run.bring_up(request, adapter, spawned)
        if engine.process is not None:
            self._start_watcher(self._watch(engine))
        self._watch_idleness(engine)

    async def _unload(self, command: Unload) -> None:
        run = self.run
        run.idle_unloaded = None  # an operator's unload: the model stays away
        if run.engine is None:
            run.publish()
            return reply(command, Unloaded(state=EngineState.IDLE))
        joiners: list[AnyCommand] = [command]
        result = await run.stop(command.drain_timeout_s, reason="unload", joiners=joiners)
        for joiner in joiners:
            reply(joiner, result)

    # -- supervision ----------------------------------------------------------------------------------------

    def _start_watcher(self, watch: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        watcher = asyncio.create_task(watch)
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return watcher

    async def _watch(self, engine: Engine) -> None:
        assert engine.process is not None
        await engine.process.exited.wait()
        self.post(Crashed(new_reply(), engine))

    async def _crashed(self, engine: Engine) -> None:
        run = self.run
        if run.engine is not engine or run.state not in (EngineState.READY, EngineState.SLEEPING):
            return  # stopped on purpose
        assert engine.process is not None
        run.last_error = f"engine exited with code {engine.process.returncode} while {run.state}"
        run.last_error_code = "engine_crashed"
        run.set_state(EngineState.FAILED)
        run.exit_code = engine.process.returncode
        tail = engine.process.output.tail(5)
        log.error("engine_crashed", engine=engine.adapter.name, exit_code=run.exit_code, tail=tail)
        await engine.process.stop(self.settings.kill_grace_s)  # whatever is left of its group
        if not run.closing:
            await self._restart(engine)

    async def _restart(self, crashed: Engine) -> None:
        """Bring a crashed engine back, with back-off, until the policy's count; any operator command comes first."""
        run, settings = self.run, self.settings
        while run.restarts < settings.restart_max:
            delay = min(settings.restart_backoff_s * 2**run.restarts, settings.restart_backoff_max_s)
            run.restarts += 1
            log.warning("engine_restart_scheduled", engine=crashed.adapter.name, attempt=run.restarts, delay_s=delay)
            try:
                await run.during(Phase.RESTART_WAIT, self.sleep(delay))
                await self._bring_up(crashed.request, crashed.adapter, lambda: None)
            except Abandoned:
                return  # the command that came in goes next
            except SidecarError:
                continue
            log.info("engine_restarted", engine=crashed.adapter.name, attempt=run.restarts)
            return
        if settings.restart_max:  # the policy is spent: the engine stays down until an operator loads one
            log.error("engine_restarts_exhausted", engine=crashed.adapter.name, restarts=run.restarts)

    def _watch_idleness(self, engine: Engine) -> None:
        """One idle watcher at a time, for the engine now ready (none without a TTL)."""
        if self._idle_watcher is not None:
            self._idle_watcher.cancel()
        ttl_s = self.run.ttl_s(engine)
        self._idle_watcher = None if ttl_s is None else self._start_watcher(self._watch_idle(engine, ttl_s))

    async def _watch_idle(self, engine: Engine, ttl_s: float) -> None:
        """Ask the owner to unload the engine once no request has started or ended for ttl_s."""
        gate = self.run.gate
        while self.run.engine is engine:
            if gate.in_flight:
                await gate.drained()
                continue
            left = gate.last_used + ttl_s - time.monotonic()
            if left <= 0:
                self.post(IdleUnload(new_reply(), engine))
                return
            await asyncio.sleep(left)

    async def _idle(self, engine: Engine) -> None:
        run = self.run
        if run.engine is not engine or run.state is not EngineState.READY:
            return  # stopped, replaced or crashed since the watcher looked
        ttl_s = run.ttl_s(engine)
        assert ttl_s is not None
        if run.gate.in_flight or time.monotonic() - run.gate.last_used < ttl_s:
            self._watch_idleness(engine)  # a request came in meanwhile: start over
            return
        await run.stop(self.settings.drain_timeout_s, reason="idle", joiners=[])
        run.idle_unloaded = engine.request
        run.publish()

    # -- sleep and wake (an engine's sleep mode) ----------------------------------------------------------

    async def _sleep(self, level: int) -> Slept:
        """Drain, then ask the engine to give its GPU memory back: state sleeping, data plane 503 meanwhile."""
        run = self.run
        engine, api = features.sleep_api(run.engine)
        if run.state is not EngineState.READY:
            raise Conflict(f"the engine is {run.state}: only a ready engine can sleep")
        if level not in api.levels:
            levels = " or ".join(map(str, api.levels))
            raise BadRequest(f"level: the {engine.adapter.name} engine sleeps at level {levels}", param="level")
        started = time.monotonic()
        run.set_state(EngineState.SLEEPING)  # new data-plane requests get 503 from here on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.gate.drained(), self.settings.drain_timeout_s)
        try:
            freed = await self.calls.post(engine, f"{api.sleep}?level={level}")
        except SidecarError:
            run.set_state(EngineState.READY)  # the engine did not sleep: as it was
            raise
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info(
            "model_sleep",
            engine=engine.adapter.name,
            sleep_level=level,  # "level" is the log line's own
            freed_gpu_memory_mb=freed,
            duration_ms=duration_ms,
        )
        return Slept(state=run.state, level=level, freed_gpu_memory_mb=freed)

    async def _wake(self) -> Woken:
        run = self.run
        engine, api = features.sleep_api(run.engine)
        if run.state is not EngineState.SLEEPING:
            raise Conflict(f"the engine is {run.state}: only a sleeping engine wakes")
        started = time.monotonic()
        freed = await self.calls.post(engine, api.wake)  # its error: still asleep
        taken = None if freed is None else round(-freed, 1)
        run.gate.touch()
        run.set_state(EngineState.READY)
        self._watch_idleness(engine)  # its idle watcher stopped while it slept
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        log.info("model_wake", engine=engine.adapter.name, gpu_memory_taken_mb=taken, duration_ms=duration_ms)
        return Woken(state=run.state, gpu_memory_taken_mb=taken)


async def _answer(command: AnyCommand, work: Awaitable[Any]) -> None:
    try:
        reply(command, await work)
    except SidecarError as exc:
        fail(command, exc)
