"""Data-plane workers (`SIDECAR_WORKERS` > 1): N processes serve the public port, one process owns the engine.

    the supervisor's process                      worker 0 .. N-1 (`python -m sidecar worker`)
    - binds the public port, hands it to each     - accept on that socket (the kernel spreads connections)
    - the Supervisor: load, unload, the engine    - the data plane: proxy, admission, measurements, history
    - the full app on a Unix socket (control      - every other route forwarded to the supervisor's process
      plane, health, telemetry, the watchdog)     - a Unix socket of its own, for the other workers
    - starts the workers, replaces one that dies

They share a small block of memory (`sidecar/control/shared.py`): the engine's state and generation, which every worker
reads on every request (an unload's 503 is immediate in all of them), and each worker's requests in flight,
which the supervisor adds up when it drains. A worker fetches the engine's description (address, adapter, load
request) from the supervisor's process when the generation changes. `GET /v1/requests/{id}` asks the other
workers when the request is not its own; `GET /metrics` adds up every worker's series and the supervisor's
process's, as prometheus_client's multiprocess mode adds up its per-process files.

Calls between the processes go over Unix sockets in the run directory (mode 0600) and carry a token made for
this run: the internal routes answer 404 to anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from sidecar.control.guard import die_with_parent
from sidecar.control.shared import SharedState
from sidecar.logs import get_logger
from sidecar.settings import Settings

log = get_logger("sidecar.workers")

RESPAWN_DELAY_S = 1.0
_SETTINGS_ENV = "SIDECAR_WORKER_SETTINGS"
_TOKEN_ENV = "SIDECAR_WORKER_TOKEN"
# Calls between the sidecar's processes carry the run's token in this header.
INTERNAL_HEADER = "x-sidecar-internal"


def supervisor_socket(settings: Settings) -> Path:
    return settings.run_dir / f"sidecar-{settings.port}.sock"


def worker_socket(settings: Settings, index: int) -> Path:
    return settings.run_dir / f"sidecar-{settings.port}-worker-{index}.sock"


def state_file(settings: Settings) -> Path:
    return settings.run_dir / f"sidecar-{settings.port}.state"


def unix_listener(path: Path) -> socket.socket:
    """A listening Unix socket only this user can connect to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(1024)
    return listener


def internal_client(path: Path, token: str, timeout_s: float | None = 10.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)),
        base_url="http://sidecar",
        headers={INTERNAL_HEADER: token},
        timeout=timeout_s,
    )


# -- the supervisor's process ---------------------------------------------------------------------------------


class WorkerPool:
    """The N worker processes: started once the supervisor's app runs, each replaced when it dies, stopped with
    SIGTERM (they drain their requests) before the engine is."""

    def __init__(self, settings: Settings, listener: socket.socket, shared: SharedState, token: str) -> None:
        self.settings = settings
        self.listener = listener
        self.shared = shared
        self.token = token
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._keepers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._keepers = [asyncio.create_task(self._keep(index)) for index in range(self.settings.workers)]

    async def _keep(self, index: int) -> None:
        env = os.environ | {_SETTINGS_ENV: settings_json(self.settings), _TOKEN_ENV: self.token}
        fd = self.listener.fileno()
        while not self.stopping:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "worker",
                str(index),
                str(fd),
                pass_fds=(fd,),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # a worker never outlives the process that owns the engine
            )
            self.processes[index] = process
            self.shared.reset(index, process.pid)
            log.info("worker_started", worker=index, pid=process.pid)
            exit_code = await process.wait()
            self.shared.reset(index)  # its requests died with it: a drain must not wait for them
            if self.stopping:
                return
            log.error("worker_exited", worker=index, pid=process.pid, exit_code=exit_code)
            await asyncio.sleep(RESPAWN_DELAY_S)

    def signal_stop(self) -> None:
        """The server was asked to stop: every worker drains and exits (safe from a signal handler's thread)."""
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    async def stop(self, timeout_s: float) -> None:
        self.signal_stop()
        waits = [process.wait() for process in self.processes.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)
        for process in self.processes.values():
            if process.returncode is None:
                log.warning("worker_kill", pid=process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for keeper in self._keepers:
            keeper.cancel()
        self.listener.close()
        # Here rather than after the server's run: uvicorn ends the process with the signal it caught.
        for index in range(self.settings.workers):
            worker_socket(self.settings, index).unlink(missing_ok=True)
        for path in (supervisor_socket(self.settings), state_file(self.settings)):
            path.unlink(missing_ok=True)


def settings_json(settings: Settings) -> str:
    """The settings as the workers get them: whole, keys included (they go to a child's environment only)."""

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, list):
            return [plain(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return json.dumps({name: plain(value) for name, value in settings.model_dump().items()})


def worker_settings() -> tuple[Settings, str]:
    """In a worker: the supervisor's process's settings and this run's token, taken out of the environment."""
    settings = Settings.model_validate_json(os.environ.pop(_SETTINGS_ENV))
    return settings, os.environ.pop(_TOKEN_ENV)


def admission_share(settings: Settings) -> tuple[int, int]:
    """A worker's share of the admission limits (each worker keeps its own queue)."""
    if not settings.max_concurrent_requests:
        return 0, settings.max_queued_requests
    workers = settings.workers
    return math.ceil(settings.max_concurrent_requests / workers), math.ceil(settings.max_queued_requests / workers)


def body_budget_share(settings: Settings) -> int:
    """This process's share of SIDECAR_MAX_BODY_BYTES_IN_FLIGHT (0: no limit): with data-plane workers each keeps
    its own count, of 1/N of it, never less than one largest body."""
    budget = settings.max_body_bytes_in_flight
    if not budget or settings.workers == 1:
        return budget
    return max(math.ceil(budget / settings.workers), settings.max_body_bytes)
