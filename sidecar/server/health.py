"""`/health` and `/ready`: open endpoints for probes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from sidecar.control.supervisor import Supervisor
from sidecar.engine_state import EngineState
from sidecar.errors import ServiceUnavailable


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
