"""Real processes for tests: the sidecar started as `python -m sidecar serve` on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from openai import OpenAI

from bench.processes import command_lines, engine_key
from sidecar.control.engine import free_port

__all__ = [
    "SidecarProcess",
    "bearer",
    "command_lines",
    "engine_key",
    "free_port",
    "group_members",
    "is_gone",
    "running",
    "wait_until",
]


class SidecarProcess:
    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        args: tuple[str, ...] = (),
        port: int | None = None,
        open_files: tuple[int, int] | None = None,  # its soft and hard RLIMIT_NOFILE, where not this process's
        unread: bool = False,  # its output to a pipe read only by whoever takes `process.stdout` (`output()` empty)
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = workdir / f"sidecar-{self.port}.out"
        self._output = self.output_path.open("wb")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        # One data-plane process unless a test asks for workers: the default (half the cores) differs by machine.
        child_env |= {"SIDECAR_PORT": str(self.port), "SIDECAR_WORKERS": "1", **env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", *args],
            cwd=workdir,
            env=child_env,
            stdout=subprocess.PIPE if unread else self._output,
            stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files),
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not healthy after {timeout_s}s:\n{self.output()}")

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until GET /ready answers 200 (an autoloaded engine is ready); past the deadline, an error with the end of
        the sidecar's log, which says why (the engine's exit and its own last lines)."""
        try:
            wait_until(lambda: httpx.get(f"{self.url}/ready").status_code == 200, timeout_s=timeout_s)
        except TimeoutError:
            lines = [line for line in self.output().splitlines() if "path=/ready" not in line]  # its own polls
            tail = "\n".join(lines[-40:])
            raise TimeoutError(f"sidecar not ready after {timeout_s}s:\n{tail}") from None

    # -- what tests ask of it most, as a client would --------------------------------------------------------

    def load(self, key: str | None = None, timeout: float = 30, **body: Any) -> httpx.Response:
        """POST /v1/model/load: the mock engine serving "m", unless `body` says otherwise."""
        request = {"engine": "mock", "model": "m"} | body
        return httpx.post(f"{self.url}/v1/model/load", json=request, headers=bearer(key), timeout=timeout)

    def loaded(self, key: str | None, startup_timeout_s: float = 120, **body: Any) -> dict[str, Any]:
        """An engine loaded and waited for (`load` with `wait`): its state. A load that fails, fails the caller
        with the end of the sidecar's log, which says why."""
        timeout = startup_timeout_s + 30
        response = self.load(key, timeout=timeout, wait=True, startup_timeout_s=startup_timeout_s, **body)
        assert response.status_code == 200, f"{response.text}\n{self.output()[-5000:]}"
        state: dict[str, Any] = response.json()
        return state

    def status(self, key: str | None = None) -> dict[str, Any]:
        """GET /v1/model, which must answer 200."""
        answer = httpx.get(f"{self.url}/v1/model", headers=bearer(key))
        assert answer.status_code == 200, answer.text
        status: dict[str, Any] = answer.json()
        return status

    def chat(
        self,
        key: str | None = None,
        model: str = "m",
        headers: dict[str, str] | None = None,
        timeout: float = 30,
        **mock: Any,
    ) -> httpx.Response:
        """POST /v1/chat/completions: one user message, 4 tokens at most; `mock` is the mock engine's overrides."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        if mock:
            body["mock"] = mock
        url = f"{self.url}/v1/chat/completions"
        return httpx.post(url, json=body, headers=bearer(key) | (headers or {}), timeout=timeout)

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


@contextlib.contextmanager
def running(workdir: Path, env: dict[str, str], ready: bool = False) -> Iterator[SidecarProcess]:
    """A sidecar started and healthy (with `ready`, its autoloaded engine ready too), stopped on the way out: for
    a module's fixture, where the tests share one."""
    process = SidecarProcess(workdir, env)
    try:
        process.wait_healthy()
        if ready:
            process.wait_ready()
        yield process
    finally:
        process.stop()


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll until predicate() is true; the seconds it took. Raises TimeoutError past the deadline."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - start


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """`wait_until` for a test on the event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class OpenAIClients:
    """OpenAI SDK clients made for a test or a module's server, closed with it (`close`): one left to the garbage
    collector is an unclosed socket's ResourceWarning, an error, in whichever later test the collector runs. No
    retries."""

    def __init__(self) -> None:
        self.made: list[OpenAI] = []

    def __call__(self, base_url: str, api_key: str, timeout: float, headers: dict[str, str] | None = None) -> OpenAI:
        client = OpenAI(base_url=base_url, api_key=api_key, default_headers=headers, max_retries=0, timeout=timeout)
        self.made.append(client)
        return client

    def close(self) -> None:
        for client in self.made:
            client.close()


@dataclass
class ClientClock:
    """A chat stream as its client read it, timed on the client's clock (`time.perf_counter`, seconds): when the
    request was sent, its first and last chunk with content, and its end."""

    chunks: list[Any]
    started: float
    first_content: float
    last_content: float
    finished: float


def read_timed(create: Callable[[], Iterable[Any]]) -> ClientClock:
    """The stream `create` opens (an OpenAI SDK chat stream), read whole on the client's clock. Make the SDK's
    client and touch `chat.completions` first: their first-use costs (a loaded machine took 260 ms over them)
    would otherwise read as TTFT."""
    started = time.perf_counter()
    first_content = last_content = 0.0
    chunks = []
    for chunk in create():
        if chunk.choices and chunk.choices[0].delta.content:
            last_content = time.perf_counter()
            first_content = first_content or last_content
        chunks.append(chunk)
    assert first_content, "no chunk with content"
    return ClientClock(chunks, started, first_content, last_content, time.perf_counter())
