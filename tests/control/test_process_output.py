"""The engine's output as the sidecar keeps it: a real child process writing a flood of numbered lines in one
write, read through `EngineProcess`; its tail, its followers and its log lines."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog

from sidecar.control.engine_output import TAIL_LINES
from sidecar.control.process import EngineProcess
from sidecar.control.runfile import EngineRecord
from sidecar.redaction import Redactor
from tests.processes import until

SECRET = "hf_process_output_secret_0123"
# Waits for its go file, then writes `count` numbered lines in one write, the secret in the last, and sleeps.
CHILD = """
import os, sys, time
go, count = sys.argv[1], int(sys.argv[2])
while not os.path.exists(go):
    time.sleep(0.01)
sys.stdout.write("".join(f"line {n}\\n" for n in range(count - 1)) + f"line {count - 1} {sys.argv[3]}\\n")
sys.stdout.flush()
time.sleep(60)
"""

Flood = Callable[[int, float], Awaitable[EngineProcess]]


@pytest.fixture
async def flood(tmp_path: Path) -> AsyncIterator[Flood]:
    """An engine that will write `count` lines once its go file exists, its output logged at `per_s`."""
    started: list[EngineProcess] = []

    async def spawn(count: int, per_s: float) -> EngineProcess:
        argv = [sys.executable, "-c", CHILD, str(tmp_path / "go"), str(count), SECRET]
        record = EngineRecord(tmp_path, 0)
        process = await EngineProcess.spawn("flood", argv, {}, Redactor([SECRET]), record, 1.0, 0, per_s)
        started.append(process)
        return process

    yield spawn
    for process in started:
        await process.stop(1.0)


async def test_a_flood_past_the_rate_is_logged_in_part_and_its_last_lines_kept_masked(
    flood: Flood, tmp_path: Path
) -> None:
    with structlog.testing.capture_logs() as logged:
        process = await flood(5000, 10)
        (tmp_path / "go").touch()
        await until(lambda: process.output.tail(1) == ["line 4999 ***"])
        assert process.output.tail() == [f"line {n}" for n in range(5000 - TAIL_LINES, 4999)] + ["line 4999 ***"]
        assert any(entry["event"] == "engine_output_unlogged" for entry in logged)  # the first report at once
        await process.stop(1.0)  # the output's end reports what was not yet

        def unlogged() -> int:
            return sum(entry["lines"] for entry in logged if entry["event"] == "engine_output_unlogged")

        lines = [entry["line"] for entry in logged if entry["event"] == "engine_output"]
        # The burst, ten seconds' worth, and (the write read in pieces) what the rate added between reads.
        assert lines[:100] == [f"line {n}" for n in range(100)] and len(lines) <= 110
        await until(lambda: unlogged() == 5000 - len(lines))
    assert all(SECRET not in str(entry) for entry in logged)


async def test_a_follower_gets_every_line_of_a_flood_in_order(flood: Flood, tmp_path: Path) -> None:
    process = await flood(800, 10)
    with process.output.follow(tail=0) as (kept, follower):
        assert kept == []
        (tmp_path / "go").touch()
        lines = [(await follower.lines.get()) for _ in range(800)]
    assert [line for _, line in lines] == [f"line {n}" for n in range(799)] + ["line 799 ***"]
    assert {stream for stream, _ in lines} == {"stdout"}
    assert process.output.tail(2) == ["line 798", "line 799 ***"]
