"""Data-plane workers (`SIDECAR_WORKERS` > 1): N processes serve the public port, one process owns the engine.

    the supervisor's process                      worker 0 .. N-1 (`python -m sidecar worker`)
    - binds the public port, hands it to each     - accept on that socket (the kernel spreads connections)
    - the Supervisor: load, unload, the engine    - the data plane: proxy, admission, measurements, history
    - the full app on a Unix socket (control      - every other route forwarded to the supervisor's process
      plane, health, telemetry, the watchdog)     - a Unix socket of its own, for the other workers
    - starts the workers, replaces one that dies

They share a small block of memory (`sidecar/shared.py`): the engine's state and generation, which every worker
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
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import SecretStr
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from engines import adapter as registered_adapter
from sidecar import telemetry
from sidecar.dataplane import FindElsewhere
from sidecar.engine import Engine, EngineSlot, LoadRequest
from sidecar.errors import NotFound, ServiceUnavailable
from sidecar.guard import die_with_parent
from sidecar.history import RequestHistory
from sidecar.logs import get_logger
from sidecar.middleware.request_context import INTERNAL_HEADER
from sidecar.redaction import Redactor
from sidecar.settings import Settings
from sidecar.shared import SharedState
from sidecar.state import EngineState
from sidecar.supervisor import Supervisor, not_ready

log = get_logger("sidecar.workers")

RESPAWN_DELAY_S = 1.0
_SETTINGS_ENV = "SIDECAR_WORKER_SETTINGS"
_TOKEN_ENV = "SIDECAR_WORKER_TOKEN"
# Hop-by-hop and length headers, and the request id: each side of a forwarded call sets its own.
_FORWARD_DROPPED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "x-request-id"}
)
# Of the answer: hop-by-hop headers, and those the worker's server writes itself (one Date). Its length is kept:
# the raw bytes go through unchanged.
_ANSWER_DROPPED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "date", "server", "x-request-id"}
)


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


def _internal(request: Request) -> None:
    """404 unless the request carries this run's token, as the request-context middleware found."""
    if not request.scope["state"].get("internal"):
        raise NotFound(f"no route {request.url.path}")


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


async def internal_engine(request: Request) -> Response:
    """For the workers: the engine now, its generation, and what a request to it needs (keys included)."""
    _internal(request)
    supervisor: Supervisor = request.app.state.supervisor
    return JSONResponse(supervisor.describe_engine())


async def internal_on_demand(request: Request) -> Response:
    """For the workers: load on demand what an idle unload took, as a request in this process would."""
    _internal(request)
    supervisor: Supervisor = request.app.state.supervisor
    await supervisor.load_on_demand()
    return JSONResponse({"state": supervisor.state})


async def internal_metrics(request: Request) -> Response:
    """For the workers' /metrics: this process's series, the engine's state, resources and load included."""
    _internal(request)
    return await telemetry.metrics(request)


supervisor_routes: list[BaseRoute] = [
    Route("/internal/engine", internal_engine, methods=["GET"]),
    Route("/internal/on-demand", internal_on_demand, methods=["POST"]),
    Route("/internal/metrics", internal_metrics, methods=["GET"]),
]


# -- a worker -------------------------------------------------------------------------------------------------


class EngineView:
    """A worker's side of the supervisor: the engine it may send requests to, and a slot per request, counted in
    the shared block where the supervisor's drain sees it."""

    def __init__(
        self, settings: Settings, shared: SharedState, index: int, supervisor: httpx.AsyncClient, redactor: Redactor
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.index = index
        self.supervisor = supervisor
        self.redactor = redactor
        self.engine: Engine | None = None
        self._generation = -1
        self._refreshing: asyncio.Task[None] | None = None

    def request_slot(self) -> EngineSlot:
        """As `Supervisor.request_slot`: the engine's state from the shared block, the request counted there."""
        return EngineSlot(self._hold, self._release)

    async def _hold(self) -> Engine:
        self.shared.begin(self.index)  # counted before the state is read: see sidecar/shared.py
        try:
            state, generation, idle_unloaded = self.shared.engine()
            if state is not EngineState.READY and idle_unloaded and self.settings.load_on_demand:
                await self._load_on_demand()
                state, generation, idle_unloaded = self.shared.engine()
            if state is not EngineState.READY:
                raise not_ready(state, idle_unloaded)
            if generation != self._generation:
                await self._refresh()
            if self.engine is None:
                raise not_ready(state, idle_unloaded)
        except BaseException:
            self._release()
            raise
        return self.engine

    def _release(self) -> None:
        self.shared.end(self.index)

    async def prime(self) -> None:
        """At the worker's start: the engine's description now, so that its first request does not wait for it."""
        if self.shared.engine()[0] is EngineState.READY:
            with contextlib.suppress(ServiceUnavailable):
                await self._refresh()

    async def _refresh(self) -> None:
        """The engine's description, fetched once for all the requests that find the generation changed."""
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._fetch())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _fetch(self) -> None:
        try:
            answer = (await self.supervisor.get("/internal/engine")).raise_for_status().json()
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the engine's description could not be read: {exc}") from None
        described = answer["engine"]
        self.engine = None if described is None else self._engine(described)
        self._generation = answer["generation"]

    def _engine(self, described: dict[str, Any]) -> Engine:
        request = LoadRequest.model_validate(described["request"])
        self.redactor.register(*request.secrets())
        adapter = registered_adapter(request.engine, self.settings.engine_executables.get(request.engine))
        return Engine(
            request,
            adapter,
            described["base_url"],
            described["port"],
            None,
            described["started_at"],
            time.monotonic() - described["uptime_s"],
            described["load_time_s"],
            upstream_headers=described["upstream_headers"],
        )

    async def _load_on_demand(self) -> None:
        timeout_s = self.settings.startup_timeout_s + 30
        try:
            answer = await self.supervisor.post("/internal/on-demand", timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the model could not be loaded on demand: {exc}") from None
        if answer.status_code != 200:
            message = answer.json().get("error", {}).get("message", answer.text)
            raise ServiceUnavailable(f"the model could not be loaded on demand: {message}")


def sibling_clients(settings: Settings, index: int, token: str) -> list[httpx.AsyncClient]:
    return [internal_client(worker_socket(settings, i), token) for i in range(settings.workers) if i != index]


def find_in(siblings: list[httpx.AsyncClient]) -> FindElsewhere:
    """GET /v1/requests/{id} in a worker, for a request it did not serve: the record of the worker that did."""

    async def find(request_id: str) -> dict[str, Any] | None:
        for client in siblings:
            with contextlib.suppress(httpx.HTTPError):
                answer = await client.get(f"/internal/requests/{request_id}")
                if answer.status_code == 200:
                    found: dict[str, Any] = answer.json()
                    return found
        return None

    return find


def worker_routes(
    settings: Settings, token: str, history: RequestHistory, siblings: list[httpx.AsyncClient]
) -> list[BaseRoute]:
    """A worker's own routes, besides the data plane: what spans the workers, and what it forwards."""
    supervisor = internal_client(supervisor_socket(settings), token, timeout_s=None)  # streams: the logs

    async def own_request(request: Request) -> Response:
        _internal(request)
        record = history.get(request.path_params["request_id"])
        if record is None:
            raise NotFound("not this worker's")
        return JSONResponse(record)

    async def own_metrics(request: Request) -> Response:
        _internal(request)
        return Response(request.app.state.telemetry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def all_metrics(request: Request) -> Response:
        """Every worker's series and the supervisor's process's, added up: one view whichever worker answers."""
        texts = [request.app.state.telemetry.metrics.exposition().decode()]
        clients = [*siblings, supervisor]
        answers = await asyncio.gather(*(c.get("/internal/metrics") for c in clients), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                texts.append(answer.text)
        return Response(merged_exposition(texts), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request) -> Response:
        """Any other route: answered by the supervisor's process, streamed back (the engine's logs too)."""
        headers = [(k, v) for k, v in request.headers.items() if k not in _FORWARD_DROPPED]
        headers.append(("x-request-id", request.scope["state"]["request_id"]))  # one id in both access lines
        outgoing = supervisor.build_request(
            request.method,
            request.url.path,
            params=request.url.query or None,
            headers=headers,
            content=await request.body(),
        )
        try:
            answer = await supervisor.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the sidecar's supervising process did not answer: {exc}") from None
        kept = {k: v for k, v in answer.headers.items() if k not in _ANSWER_DROPPED}
        return StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, headers=kept, background=BackgroundTask(answer.aclose)
        )

    everything = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return [
        Route("/metrics", all_metrics, methods=["GET"]),
        Route("/internal/requests/{request_id}", own_request, methods=["GET"]),
        Route("/internal/metrics", own_metrics, methods=["GET"]),
        Route("/v1/model", forward, methods=everything),
        Route("/v1/model/{rest:path}", forward, methods=everything),
        Route("/v1/telemetry", forward, methods=everything),
        Route("/", forward, methods=everything),
        Route("/health", forward, methods=everything),
        Route("/ready", forward, methods=everything),
        Route("/openapi.json", forward, methods=everything),
    ]


def merged_exposition(texts: Iterable[str]) -> bytes:
    """Prometheus texts added up sample by sample (the same name and labels): counters, histograms and the
    workers' gauges sum; a counter's `_created` keeps the earliest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


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
