"""OpenAI routes: proxied to the engine (sidecar/dataplane/proxy.py), and the metrics of recent requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from sidecar import request_state
from sidecar.dataplane.proxy import Proxy
from sidecar.errors import NotFound
from sidecar.server.auth import holds_one_of
from sidecar.settings import Settings
from sidecar.telemetry.history import RequestHistory, readable_by, shown

AsgiHandler = Callable[[Scope, Receive, Send], Awaitable[None]]
FindElsewhere = Callable[[str], Awaitable[dict[str, Any] | None]]


class _Asgi:
    """Starlette wraps functions and methods as request -> response; an object with __call__ it runs as ASGI."""

    def __init__(self, handler: AsgiHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


async def request_metrics(request: Request) -> Response:
    """A recent request's record: this process's, else (a data-plane worker) the one another worker kept. Only to
    the key that made the request, or an admin key: to any other it does not exist."""
    history: RequestHistory = request.app.state.history
    request_id = request.path_params["request_id"]
    record = history.get(request_id)
    find_elsewhere: FindElsewhere | None = request.app.state.find_elsewhere
    if record is None and find_elsewhere is not None:
        record = await find_elsewhere(request_id)
    if record is not None:
        settings: Settings = request.app.state.settings
        admin = holds_one_of(request.scope, settings.control_keys)
        # The fingerprint auth took of the request's key, as the proxy kept it in the record of the one it made.
        if not readable_by(record, request_state.of(request.scope).log_fields.get("key_fingerprint"), admin):
            record = None
    if record is None:
        raise NotFound(
            f"no recent request with id {request_id!r} for this key (the last {history.size} are kept)",
            param="request_id",
        )
    return JSONResponse(shown(record))


GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def generation_paths(proxy: Proxy) -> dict[str, AsgiHandler]:
    """The routes that carry the traffic: the app serves them before its router (POST only)."""
    return dict.fromkeys(GENERATION_PATHS, proxy.generate)


def routes(proxy: Proxy) -> list[BaseRoute]:
    """The other OpenAI routes; the app lists them first, as the router tries routes in order on every request.
    The generation routes are here too, for any other method than POST (405) and for the OpenAPI description."""
    generate = _Asgi(proxy.generate)
    return [
        *(Route(path, generate, methods=["POST"]) for path in GENERATION_PATHS),
        Route("/v1/embeddings", _Asgi(proxy.embeddings), methods=["POST"]),
        Route("/v1/requests/{request_id}", request_metrics, methods=["GET"]),
    ]


def passthrough_route(proxy: Proxy) -> BaseRoute:
    """Every other /v1/* path to the engine: the app lists it last, after the control plane's /v1/model."""
    return Route("/v1/{path:path}", _Asgi(proxy.passthrough), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
