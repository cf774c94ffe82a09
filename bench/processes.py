"""The processes the bench runs: the sidecar on a free loopback port with its output in a file, CPU pinning, and
what a process spends over a phase."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import psutil

from sidecar.control.engine import free_port

_CPUCLOCK_SCHED = 2  # the low bits of a process's CPU clock id: its run time as the scheduler counts it


def spawn_sidecar(
    settings: dict[str, str], workdir: Path, name: str = "sidecar"
) -> tuple[subprocess.Popen[bytes], str]:
    """`sidecar serve` with these SIDECAR_* settings (none inherited); the process and its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")} | settings
    env["SIDECAR_PORT"] = str(port)
    with (workdir / f"{name}.log").open("wb") as log:  # the child writes to its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}"


def wait_ok(url: str, timeout_s: float = 60) -> None:
    """Until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def engine_key(pid: int, key_env: str | None, key_flag: str | None = None) -> str | None:
    """The key the sidecar gave the engine it started, read where the engine holds it: its environment (the
    adapter's `key_env`), or its command line for an engine that reads no variable for it (`key_flag`). For the
    bench and the tests, which ask the engine directly, as only the sidecar and the engine's own user can."""
    process = psutil.Process(pid)
    if key_env is not None:
        return process.environ().get(key_env)
    argv, flag = process.cmdline(), f"--{key_flag}"
    return argv[argv.index(flag) + 1] if key_flag is not None and flag in argv else None


def pin(pid: int, cpus: set[int], tree: bool = False) -> None:
    """Every thread of the process (and of its descendants with `tree`) onto these CPUs.

    Per thread, because the affinity call moves only the thread it names; threads started later inherit it.
    """
    process = psutil.Process(pid)
    for each in [process, *(process.children(recursive=True) if tree else [])]:
        for thread in each.threads():
            try:
                os.sched_setaffinity(thread.id, cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass


def command_lines(processes: Iterable[psutil.Process]) -> dict[int, list[str]]:
    """Each process's command line, by pid; one gone meanwhile (an engine's short-lived helper, a worker being
    replaced) is left out rather than raising."""
    found = {}
    for process in processes:
        try:
            found[process.pid] = process.cmdline()
        except psutil.NoSuchProcess:
            continue
    return found


def mock_engines(sidecar_pid: int) -> list[psutil.Process]:
    """The mock engines running under a sidecar (a zombie, whose command line psutil does not read, runs nothing)."""
    children = psutil.Process(sidecar_pid).children(recursive=True)
    argv = command_lines(children)
    return [child for child in children if "engines.mock_server" in " ".join(argv.get(child.pid, ()))]


def cpu_seconds(process: psutil.Process) -> float:
    """A process's CPU time, its threads' (those gone included): to the nanosecond from its CPU clock on Linux
    (`clock_getcpuclockid`'s encoding of a pid), else `/proc`'s 10 ms ticks, too coarse for a short phase at one
    stream, whose few milliseconds of a proxy's CPU they read as 0 or 10."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            return time.clock_gettime(((~process.pid) << 3) | _CPUCLOCK_SCHED)
    times = process.cpu_times()
    return times.user + times.system


class ProcessMeter:
    """CPU seconds and peak RSS of one process over a phase (RSS sampled every 50 ms), its children's CPU (a
    sidecar's data-plane workers, a peer's) counted with it, never an engine's."""

    def __init__(self, pid: int | None, engine_pid: int | None = None) -> None:
        self.process = psutil.Process(pid) if pid else None
        self.engine_pid = engine_pid
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self._task: asyncio.Task[None] | None = None
        self._cpu_start = 0.0

    def _cpu(self) -> float:
        assert self.process is not None
        total = 0.0
        for each in [self.process, *_children_of(self.process, self.engine_pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += cpu_seconds(each)
        return total

    async def _sample(self) -> None:
        assert self.process is not None
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / 2**20)
            await asyncio.sleep(0.05)

    def __enter__(self) -> ProcessMeter:
        if self.process is not None:
            self._cpu_start = self._cpu()
            self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self._task is not None:
            self._task.cancel()
            self.cpu_s = self._cpu() - self._cpu_start


def _children_of(process: psutil.Process, engine_pid: int | None) -> list[psutil.Process]:
    """The process's descendants but the engine and its own (a sidecar that loaded its engine is its parent)."""
    engine: set[int] = set()
    if engine_pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(engine_pid)
            engine = {tree.pid, *(child.pid for child in tree.children(recursive=True))}
    with contextlib.suppress(psutil.NoSuchProcess):
        return [child for child in process.children(recursive=True) if child.pid not in engine]
    return []
