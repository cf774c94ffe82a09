"""The request gate: the data plane's requests counted, the drain that waits for them, idleness from their ends;
with data-plane workers, their counts read from the memory they share."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.control.gate import RequestGate, not_ready
from sidecar.engine_state import EngineState


class Shared:
    """The shared block as the gate reads it: the workers' requests in flight and their last use."""

    def __init__(self) -> None:
        self.counted = 0
        self.used = 0.0

    def in_flight(self) -> int:
        return self.counted

    def last_used(self) -> float:
        return self.used


async def test_a_drain_waits_for_every_request_in_flight() -> None:
    gate = RequestGate()
    await asyncio.wait_for(gate.drained(), 1)  # none: at once
    gate.enter()
    gate.enter()
    drained = asyncio.create_task(gate.drained())
    gate.leave()
    await asyncio.sleep(0)
    assert not drained.done() and gate.in_flight == 1
    gate.leave()
    await asyncio.wait_for(drained, 1)


async def test_the_workers_requests_count_and_hold_the_drain() -> None:
    shared = Shared()
    gate = RequestGate(shared)  # type: ignore[arg-type]
    shared.counted = 2
    assert gate.in_flight == 2
    drained = asyncio.create_task(gate.drained())
    await asyncio.sleep(0.05)
    assert not drained.done()
    shared.counted = 0
    await asyncio.wait_for(drained, 1)


def test_idleness_counts_from_the_latest_use_in_any_process() -> None:
    shared = Shared()
    gate = RequestGate(shared)  # type: ignore[arg-type]
    gate.touch()
    shared.used = gate.last_used + 30
    assert gate.last_used == shared.used


@pytest.mark.parametrize(
    ("state", "idle_unloaded", "code"),
    [
        (EngineState.SLEEPING, False, "model_sleeping"),
        (EngineState.IDLE, True, "model_unloaded_idle"),
        (EngineState.IDLE, False, "engine_not_ready"),
        (EngineState.LOADING, False, "engine_not_ready"),
    ],
)
def test_the_503_says_why_no_engine_is_ready(state: EngineState, idle_unloaded: bool, code: str) -> None:
    error = not_ready(state, idle_unloaded, "m")
    assert (error.status_code, error.code) == (503, code)
