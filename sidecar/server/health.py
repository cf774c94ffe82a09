"""`/`, `/health`, `/ready`, `/openapi.json`: open endpoints for people and probes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar import __version__
from sidecar.control.supervisor import Supervisor
from sidecar.engine_state import EngineState
from sidecar.errors import ServiceUnavailable
from sidecar.server.openapi import ENDPOINTS, openapi_document


async def root(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "name": "sidecar",
            "version": __version__,
            "endpoints": [f"{e.method} {e.path}" for e in ENDPOINTS],
        }
    )


def _engine(request: Request) -> dict[str, object]:
    supervisor: Supervisor = request.app.state.supervisor
    status = supervisor.status()
    return {key: status[key] for key in ("state", "engine", "model", "served_model_name")}


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "engine": _engine(request)})


async def ready(request: Request) -> JSONResponse:
    engine = _engine(request)
    if engine["state"] is not EngineState.READY:
        raise ServiceUnavailable(f"no engine is ready (state: {engine['state']})")
    return JSONResponse({"status": "ready", "engine": engine})


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(__version__))


routes = [
    Route("/", root, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
