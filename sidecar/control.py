"""The control plane: load, unload and inspect the engine (admin key)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.engine import LoadRequest
from sidecar.errors import BadRequest
from sidecar.http import read_json_object
from sidecar.supervisor import Supervisor


def _supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor = request.app.state.supervisor
    return supervisor


def _bad_request(exc: ValidationError) -> BadRequest:
    error = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(str(p) for p in error["loc"]) or None
    message = error["msg"].removeprefix("Value error, ")
    return BadRequest(f"{param}: {message}" if param else message, param=param)


async def load(request: Request) -> JSONResponse:
    body = await read_json_object(request)
    try:
        load_request = LoadRequest.model_validate(body)
    except ValidationError as exc:
        raise _bad_request(exc) from None
    status, result = await _supervisor(request).load(load_request)
    return JSONResponse(result, status_code=status)


async def unload(request: Request) -> JSONResponse:
    body: dict[str, Any] = await read_json_object(request) if await request.body() else {}
    drain = body.get("drain_timeout_s")
    if drain is not None and (isinstance(drain, bool) or not isinstance(drain, int | float) or drain < 0):
        raise BadRequest("drain_timeout_s: must be a number of seconds, 0 or more", param="drain_timeout_s")
    return JSONResponse(await _supervisor(request).unload(drain))


async def status(request: Request) -> JSONResponse:
    return JSONResponse(_supervisor(request).status())


routes = [
    Route("/v1/model", status, methods=["GET"]),
    Route("/v1/model/load", load, methods=["POST"]),
    Route("/v1/model/unload", unload, methods=["POST"]),
]
