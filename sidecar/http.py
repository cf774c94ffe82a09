"""Small helpers for reading requests, and for noticing that their client left."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import Receive

from sidecar.errors import BadRequest


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    try:
        value = json.loads(body)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # the parser recurses once per level: [[[[...]]]] 100,000 deep exhausts the stack
        raise BadRequest("request body is JSON nested too deeply", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(value).__name__}", code="invalid_json")
    return value


async def disconnected(receive: Receive) -> None:
    """Returns when the client disconnects: for a request whose body was read, nothing else can come."""
    while (await receive())["type"] != "http.disconnect":
        pass
