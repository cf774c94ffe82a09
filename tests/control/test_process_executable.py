"""Which program an engine's spawn starts: the one the sidecar's own PATH finds, whatever PATH the engine's
environment (which a load request's `env` makes) holds."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from sidecar.control.process import EngineProcess
from sidecar.control.runfile import EngineRecord
from sidecar.redaction import Redactor

NAME = "sidecar-test-engine"


def engine_in(folder: Path) -> Path:
    """A program named NAME in `folder` that says which folder it is in, then waits to be stopped."""
    folder.mkdir()
    program = folder / NAME
    program.write_text(f"#!{sys.executable}\nimport time\nprint('{folder.name}', flush=True)\ntime.sleep(60)\n")
    program.chmod(0o755)
    return program


async def spawn(tmp_path: Path, env: dict[str, str]) -> EngineProcess:
    return await EngineProcess.spawn("test", [NAME], env, Redactor(), EngineRecord(tmp_path, 0), 1.0, 0)


async def test_the_engine_is_the_program_on_the_sidecars_path_not_the_one_its_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_in(tmp_path / "own")
    engine_in(tmp_path / "requested")
    monkeypatch.setenv("PATH", f"{tmp_path / 'own'}{os.pathsep}{os.environ['PATH']}")
    process = await spawn(tmp_path, {"PATH": str(tmp_path / "requested")})
    try:
        deadline = time.monotonic() + 10
        while not process.output.tail(5):
            assert time.monotonic() < deadline, "the engine wrote nothing"
            await asyncio.sleep(0.01)
        assert process.output.tail(5) == ["own"]
    finally:
        await process.stop(1.0)


async def test_a_program_only_the_engines_environment_finds_is_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_in(tmp_path / "requested")
    with pytest.raises(FileNotFoundError, match="not an executable on the sidecar's PATH"):
        await spawn(tmp_path, {"PATH": str(tmp_path / "requested")})
    assert not list(tmp_path.glob("*.json")), "no engine was recorded as started"
