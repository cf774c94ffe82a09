"""The control plane: load, unload and inspect the engine, follow its output (admin key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sidecar.control.engine import AdapterName, AdapterRequest, LoadRequest, SleepRequest, UnloadRequest, WakeRequest
from sidecar.control.engine_output import TAIL_LINES
from sidecar.control.process import EngineProcess
from sidecar.control.supervisor import Supervisor
from sidecar.errors import BadRequest
from sidecar.http import disconnected, read_json_object

_Body = TypeVar("_Body", bound=BaseModel)

# A comment line this often keeps an idle log stream open through proxies that drop silent connections.
LOG_KEEPALIVE_S = 15.0


def _supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor = request.app.state.supervisor
    return supervisor


def bad_request(exc: ValidationError) -> BadRequest:
    """A request body's first invalid field as a 400 naming it."""
    error = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(str(p) for p in error["loc"]) or None
    message = error["msg"].removeprefix("Value error, ")
    return BadRequest(f"{param}: {message}" if param else message, param=param)


async def load(request: Request) -> JSONResponse:
    body = await read_json_object(request)
    try:
        load_request = LoadRequest.model_validate(body)
    except ValidationError as exc:
        raise bad_request(exc) from None
    status, result = await _supervisor(request).load(load_request)
    return JSONResponse(result, status_code=status)


async def unload(request: Request) -> JSONResponse:
    drain = (await _body(request, UnloadRequest)).drain_timeout_s
    return JSONResponse(await _supervisor(request).unload(drain))


async def status(request: Request) -> JSONResponse:
    return JSONResponse(_supervisor(request).status())


async def _body(request: Request, model: type[_Body]) -> _Body:
    """The request's body as `model`, or a 400 naming the field; an empty body is the model's defaults."""
    body = await read_json_object(request) if await request.body() else {}
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise bad_request(exc) from None


async def sleep(request: Request) -> JSONResponse:
    """The engine's sleep mode: its GPU memory given back, the process kept; the data plane 503 meanwhile."""
    level = (await _body(request, SleepRequest)).level
    return JSONResponse(await _supervisor(request).sleep(level))


async def wake(request: Request) -> JSONResponse:
    await _body(request, WakeRequest)
    return JSONResponse(await _supervisor(request).wake())


async def adapters(request: Request) -> JSONResponse:
    """The LoRA adapters the engine has, as it lists them itself."""
    return JSONResponse({"object": "list", "data": await _supervisor(request).adapters()})


async def load_adapter(request: Request) -> JSONResponse:
    adapter = await _body(request, AdapterRequest)
    listed = await _supervisor(request).load_adapter(adapter.name, adapter.path)
    return JSONResponse({"object": "list", "data": listed})


async def unload_adapter(request: Request) -> JSONResponse:
    adapter = await _body(request, AdapterName)
    return JSONResponse({"object": "list", "data": await _supervisor(request).unload_adapter(adapter.name)})


async def logs(request: Request) -> Response:
    """The engine's output as it comes, as server-sent events: the kept tail first (`?tail=N` of the last 100
    lines, all by default), then each line, masked like every log line; an `end` event when the output ends."""
    tail = request.query_params.get("tail", str(TAIL_LINES))
    if not tail.isdigit() or int(tail) > TAIL_LINES:
        raise BadRequest(f"tail: must be a whole number from 0 to {TAIL_LINES}", param="tail")
    process = _supervisor(request).engine_process()
    return StreamingResponse(
        _output_events(process, int(tail), request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _output_events(process: EngineProcess, tail: int, request: Request) -> AsyncIterator[bytes]:
    with process.output.follow(tail) as (kept, follower):
        # A client that leaves lets its follower go at once: nothing is kept for it, nothing waits on it.
        left = asyncio.ensure_future(disconnected(request.receive))
        left.add_done_callback(lambda _: follower.close())
        try:
            for stream, line in kept:
                yield _event({"stream": stream, "line": line})
            while True:
                try:
                    async with asyncio.timeout(LOG_KEEPALIVE_S):
                        item = await follower.lines.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if item is not None:
                    yield _event({"stream": item[0], "line": item[1]})
                if follower.dropped and follower.lines.empty():  # what it missed came after what it read
                    yield _event({"lines": follower.dropped}, "dropped")
                    follower.dropped = 0
                if item is None:
                    break
        finally:
            left.cancel()
    yield _event({"exit_code": process.returncode}, "end")


def _event(data: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
