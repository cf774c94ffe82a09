from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.processes import OpenAIClients, SidecarProcess


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SIDECAR_* setting, no OpenTelemetry variable and no .env from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("SIDECAR_", "OTEL_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Tests that configure logging point it at their own captured streams: put pytest's handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start `sidecar serve` as a real process; every one started is stopped at the end of the test."""
    started: list[SidecarProcess] = []

    def start(
        env: dict[str, str] | None = None, args: tuple[str, ...] = (), wait: bool = True, port: int | None = None
    ) -> SidecarProcess:
        process = SidecarProcess(tmp_path, env or {}, args, port)
        started.append(process)
        if wait:
            process.wait_healthy()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def openai_client() -> Iterator[Callable[..., openai.OpenAI]]:
    """The OpenAI SDK in front of a sidecar (`make(sidecar, api_key, **headers)`), closed after the test: an
    unclosed client's socket is a ResourceWarning, an error here, in whichever later test the collector finds it.
    No retries."""
    clients = OpenAIClients()

    def make(sidecar: SidecarProcess, api_key: str = "unused", **headers: str) -> openai.OpenAI:
        return clients(f"{sidecar.url}/v1", api_key, timeout=60, headers=headers)

    yield make
    clients.close()
