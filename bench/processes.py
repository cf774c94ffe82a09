"""The processes the bench runs: the sidecar on a free loopback port with its output in a file, and CPU pinning."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import psutil

from sidecar.control.engine import free_port


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
