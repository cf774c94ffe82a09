"""The routes between the sidecar's processes (`SIDECAR_WORKERS` > 1): the supervisor's process answers the workers
about the engine; a worker answers its siblings about its requests and forwards every route it does not serve.

Calls between the processes go over Unix sockets in the run directory (mode 0600) and carry a token made for this
run: the internal routes answer 404 to anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sidecar import request_state
from sidecar.control.supervisor import Supervisor
from sidecar.errors import NotFound, ServiceUnavailable
from sidecar.server.data_plane import FindElsewhere
from sidecar.settings import Settings
from sidecar.telemetry import service as telemetry
from sidecar.telemetry.history import RequestHistory
from sidecar.telemetry.merge import merged_exposition
from sidecar.telemetry.records import RequestRecord
from sidecar.workers.pool import internal_client, supervisor_socket, worker_socket

# Hop-by-hop and length headers, and the request id: each side of a forwarded call sets its own.
_FORWARD_DROPPED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "x-request-id"}
)
# Of the answer: hop-by-hop headers, and those the worker's server writes itself (one Date). Its length is kept:
# the raw bytes go through unchanged.
_ANSWER_DROPPED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "date", "server", "x-request-id"}
)


def _internal(request: Request) -> None:
    """404 unless the request carries this run's token, as the request-context middleware found."""
    if not request_state.of(request.scope).internal:
        raise NotFound(f"no route {request.url.path}")


async def internal_engine(request: Request) -> Response:
    """For the workers: the engine now, its generation, and what a request to it needs (keys included)."""
    _internal(request)
    supervisor: Supervisor = request.app.state.supervisor
    return Response(supervisor.describe_engine().model_dump_json(), media_type="application/json")


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


def sibling_clients(settings: Settings, index: int, token: str) -> list[httpx.AsyncClient]:
    return [internal_client(worker_socket(settings, i), token) for i in range(settings.workers) if i != index]


def find_in(siblings: list[httpx.AsyncClient]) -> FindElsewhere:
    """GET /v1/requests/{id} in a worker, for a request it did not serve: the record of the worker that did."""

    async def find(request_id: str) -> RequestRecord | None:
        for client in siblings:
            with contextlib.suppress(httpx.HTTPError):
                answer = await client.get(f"/internal/requests/{request_id}")
                if answer.status_code == 200:
                    found: RequestRecord = answer.json()
                    return found
        return None

    return find


def worker_routes(
    settings: Settings, token: str, history: RequestHistory, siblings: list[httpx.AsyncClient]
) -> tuple[list[BaseRoute], Callable[[Request], Awaitable[Response]]]:
    """A worker's own routes (what spans the workers: a request's record, the metrics), and the handler of the
    routes it forwards to the supervisor's process (the route table's, `routes.starlette_routes`)."""
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
        headers.append(("x-request-id", request_state.of(request.scope).request_id))  # one id in both access lines
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

    own: list[BaseRoute] = [
        Route("/metrics", all_metrics, methods=["GET"]),
        Route("/internal/requests/{request_id}", own_request, methods=["GET"]),
        Route("/internal/metrics", own_metrics, methods=["GET"]),
    ]
    return own, forward
