"""Small helpers for reading requests, and for noticing that their client left."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope

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


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` in lower case, as ASGI servers give names), or None. The
    generation routes' checks read the raw list: a Starlette `Headers` costs 1-1.6 µs a lookup, this 0.3."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive) -> bytes:
    """The request's whole body, as Starlette's `Request.body` reads it (ClientDisconnect if the client leaves
    first), without its Request object and stream generator: 0.3 µs a request against 3.5."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        return bytes(message.get("body", b""))  # the usual request: its body in one message
    parts: list[bytes] = []
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] == "http.request":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)
        message = await receive()


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    return json_object(await request.body())


def json_object(body: bytes) -> dict[str, Any]:
    """A request's body as a JSON object, or a 400 that says what is wrong with it."""
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
