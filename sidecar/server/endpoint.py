"""What the route table says of each route (`routes.py`): the words, without the table."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class Plane(enum.Enum):
    """Which key a route needs."""

    OPEN = "open"  # none
    DATA = "data"  # a data key (an admin key too)
    CONTROL = "control"  # an admin key
    METRICS = "metrics"  # none, or a data key with SIDECAR_METRICS_REQUIRE_KEY

    # Members are singletons, equal only to themselves: hashed by identity in C, not by Enum's Python `__hash__`
    # (auth looks a request's plane up in a dict on every request).
    __hash__ = object.__hash__


class Serves(enum.Enum):
    """Which process answers a route where there are data-plane workers (SIDECAR_WORKERS > 1)."""

    EVERY = "every process"  # the data plane: a worker answers it itself
    OWNER = "the engine's owner"  # a worker forwards it to the supervisor's process


RequestHandler = Callable[[Request], Awaitable[Response]]
AsgiHandler = Callable[[Scope, Receive, Send], Awaitable[None]]
# A route's handler: Starlette's request -> response, or the name of the proxy's method (ASGI) that serves it.
Handler = RequestHandler | Literal["generate", "embeddings", "responses", "messages", "passthrough"]


@dataclass(frozen=True)
class Endpoint:
    methods: tuple[str, ...]
    path: str  # Starlette's pattern
    plane: Plane
    handler: Handler
    serves: Serves = Serves.OWNER
    summary: str | None = None  # what OpenAPI and `GET /` say; None: neither lists it
    body: type[BaseModel] | dict[str, Any] | None = None  # the request body's schema, for OpenAPI
    body_required: bool = True
