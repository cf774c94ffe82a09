"""Small helpers for reading requests, and for noticing that their client left."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import Receive

from sidecar.errors import BadRequest


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 defines it, parsed by orjson; a body in UTF-16 or UTF-32, or with a byte-order mark, is
    decoded first (the standard library takes those too). ValueError for what is not JSON, including what
    Python's own parser lets through: NaN and Infinity, lone surrogates (which no UTF-8 can carry on to the
    engine), numbers beyond a double, nesting deeper than 1024. Integers beyond 64 bits come back as floats."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        encoding = json.detect_encoding(raw)
        if encoding == "utf-8":
            raise
        return orjson.loads(raw.decode(encoding))


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    try:
        value = parse_json(body)
    except ValueError as exc:  # not JSON, or not text in any of JSON's encodings
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(value).__name__}", code="invalid_json")
    return value


async def disconnected(receive: Receive) -> None:
    """Returns when the client disconnects: for a request whose body was read, nothing else can come."""
    while (await receive())["type"] != "http.disconnect":
        pass
