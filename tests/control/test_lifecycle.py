"""The lifecycle's restarts with a fake clock and a fake engine: the back-off's schedule, the policy's count, and
an operator's command that stops a back-off in the middle (the phase policy at work, no process, no waiting).

The supervisor is the real one; what starts an engine (`startup.spawn`, `startup.wait_ready`) is replaced by
fakes that make a process-less engine come up, or fail to, and the back-off's sleep records its delay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.control import startup
from sidecar.control.engine import Engine, LoadRequest
from sidecar.control.supervisor import Supervisor
from sidecar.engine_state import EngineState
from sidecar.errors import BadGateway, SidecarError
from sidecar.redaction import Redactor
from sidecar.settings import load_settings


class FakeOutput:
    followers = 0

    def tail(self, lines: int) -> list[str]:
        return []

    def let_followers_go(self) -> None:
        pass


class FakeProcess:
    """What the lifecycle reads of an engine's process: its exit, its code, its stop, its (empty) output."""

    def __init__(self) -> None:
        self.pid = 2**22 + 7  # no such process: its tree is itself
        self.returncode: int | None = None
        self.exited = asyncio.Event()
        self.output = FakeOutput()

    def crash(self, code: int) -> None:
        self.returncode = code
        self.exited.set()

    async def stop(self, grace_s: float) -> int | None:
        if self.returncode is None:
            self.crash(-15)
        return self.returncode


class Engines:
    """The fake start-up: each engine started, and whether the next ones come up."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self.come_up = True

    async def spawn(self, request: Any, adapter: Any, *_: Any) -> Engine:
        process = FakeProcess()
        self.started.append(process)
        return Engine(request, adapter, "http://127.0.0.1:9", 9, process, time.time(), time.monotonic())  # type: ignore[arg-type]

    async def wait_ready(self, engine: Engine, *_: Any) -> None:
        if not self.come_up:
            raise BadGateway("engine mock exited during start-up", code="engine_start_failed")


class Clock:
    """The back-off's sleep: records each delay; waits for `release` while `hold` is set."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.hold = False
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hold:
            self.waiting.set()
            await self.release.wait()


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Supervisor, Engines, Clock]]:
    engines, clock = Engines(), Clock()
    monkeypatch.setattr(startup, "spawn", engines.spawn)
    monkeypatch.setattr(startup, "wait_ready", engines.wait_ready)
    settings = load_settings(
        None, run_dir=tmp_path, restart_max=3, restart_backoff_s=1.0, restart_backoff_max_s=3.0, drain_timeout_s=0
    )
    supervisor = Supervisor(settings, Redactor())
    supervisor._lifecycle.sleep = clock.sleep  # the one seam: the back-off's clock
    yield supervisor, engines, clock
    await supervisor.shutdown()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll the owner's published state until `condition` holds (it runs on this loop: a turn is enough)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def _loaded(supervisor: Supervisor) -> None:
    code, _ = await supervisor.load(LoadRequest(engine="mock", model="m"))
    assert code == 200 and supervisor.state is EngineState.READY


async def test_a_crashed_engine_is_restarted_after_a_doubling_back_off_up_to_the_count(
    rig: tuple[Supervisor, Engines, Clock],
) -> None:
    supervisor, engines, clock = rig
    await _loaded(supervisor)
    engines.come_up = False
    engines.started[0].crash(1)
    await _until(lambda: len(engines.started) == 4 and supervisor.state is EngineState.FAILED)
    assert clock.delays == [1.0, 2.0, 3.0]  # 1, 2, then 4 capped at the maximum
    status = supervisor.status()
    assert status["restarts"] == 3 and status["last_error"] == "engine mock exited during start-up"


async def test_a_restart_that_comes_up_is_ready_again_and_counted(rig: tuple[Supervisor, Engines, Clock]) -> None:
    supervisor, engines, clock = rig
    await _loaded(supervisor)
    engines.started[0].crash(1)
    await _until(lambda: len(engines.started) == 2 and supervisor.state is EngineState.READY)
    assert clock.delays == [1.0] and supervisor.status()["restarts"] == 1
    assert supervisor.engine is not None and supervisor.engine.process is engines.started[1]  # type: ignore[comparison-overlap]


async def test_an_unload_during_the_back_off_stops_the_restart_and_runs_at_once(
    rig: tuple[Supervisor, Engines, Clock],
) -> None:
    supervisor, engines, clock = rig
    await _loaded(supervisor)
    clock.hold = True
    engines.started[0].crash(1)
    await clock.waiting.wait()  # the owner is in the back-off now
    unloaded = await supervisor.unload()
    assert unloaded["state"] is EngineState.IDLE and supervisor.state is EngineState.IDLE
    assert clock.delays == [1.0] and len(engines.started) == 1  # no restart was started after it


async def test_sleep_during_the_back_off_is_409_and_the_restart_goes_on(rig: tuple[Supervisor, Engines, Clock]) -> None:
    supervisor, engines, clock = rig
    await _loaded(supervisor)
    clock.hold = True
    engines.started[0].crash(1)
    await clock.waiting.wait()
    with pytest.raises(SidecarError) as refused:
        await supervisor.sleep(1)
    assert refused.value.status_code == 409
    clock.release.set()
    await _until(lambda: supervisor.state is EngineState.READY and len(engines.started) == 2)
