"""Every route of the sidecar in one table: method and path, the key it needs, the process that answers it, its
handler, and what the OpenAPI description says of it.

The app's routes, `GET /` and `GET /openapi.json`, authentication's planes, a data-plane worker's forwarding, the
generation routes the app serves before its router, and the paths the metrics label as they are: all are made
from `ENDPOINTS`. Starlette tries routes in order: the pass-through of the engine's other paths comes last.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from sidecar import __version__
from sidecar.control.engine import AdapterName, AdapterRequest, LoadRequest, SleepRequest, UnloadRequest, WakeRequest
from sidecar.dataplane.proxy import Proxy
from sidecar.errors import MethodNotAllowed, NotFound
from sidecar.server import control_plane, data_plane, health
from sidecar.server.endpoint import AsgiHandler, Endpoint, Handler, Plane, RequestHandler, Serves
from sidecar.server.openapi import openapi_document
from sidecar.telemetry import service as telemetry

_GET, _POST = ("GET",), ("POST",)
_ANY = ("GET", "POST", "PUT", "PATCH", "DELETE")
_FORWARDED = [*_ANY, "HEAD", "OPTIONS"]
_OPENAI_BODY: dict[str, Any] = {"type": "object"}  # OpenAI's (and Anthropic's) bodies: the engine's to judge


async def _root(request: Request) -> JSONResponse:
    endpoints = [f"{method} {e.path}" for e in ENDPOINTS if e.summary for method in e.methods]
    return JSONResponse({"name": "sidecar", "version": __version__, "endpoints": endpoints})


async def _openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(__version__, ENDPOINTS))


async def _no_such_control_route(request: Request) -> Response:
    raise NotFound(f"no route {request.url.path}")


_O, _D, _C = Plane.OPEN, Plane.DATA, Plane.CONTROL
_EVERY = Serves.EVERY
ENDPOINTS: tuple[Endpoint, ...] = (
    # Open: for people and probes.
    Endpoint(_GET, "/", _O, _root, summary="Name, version and endpoints of the sidecar"),
    Endpoint(
        _GET, "/health", _O, health.health, summary="Liveness: 200 while the sidecar runs, with the engine's state"
    ),
    Endpoint(
        _GET, "/ready", _O, health.ready, summary="Readiness: 200 only while an engine is ready to serve, else 503"
    ),
    Endpoint(_GET, "/openapi.json", _O, _openapi, summary="This document"),
    Endpoint(
        _GET,
        "/metrics",
        Plane.METRICS,
        telemetry.metrics,
        summary="Prometheus metrics: requests, TTFT, TPOT, ITL, latency, tokens, engine, CPU, RAM, GPU",
    ),
    # The data plane.
    Endpoint(
        _GET,
        "/v1/telemetry",
        _D,
        telemetry.telemetry_snapshot,
        summary="Latest resource sample and a recent window's min, mean and max (?window_s=60)",
    ),
    Endpoint(
        _POST,
        "/v1/chat/completions",
        _D,
        "generate",
        _EVERY,
        "OpenAI chat completions, proxied to the engine",
        _OPENAI_BODY,
    ),
    Endpoint(
        _POST, "/v1/completions", _D, "generate", _EVERY, "OpenAI text completions, proxied to the engine", _OPENAI_BODY
    ),
    Endpoint(
        _POST, "/v1/embeddings", _D, "embeddings", _EVERY, "OpenAI embeddings, proxied to the engine", _OPENAI_BODY
    ),
    Endpoint(
        _POST,
        "/v1/responses",
        _D,
        "responses",
        _EVERY,
        "OpenAI responses, proxied to the engine and measured (engines that serve them: vLLM, SGLang)",
        _OPENAI_BODY,
    ),
    Endpoint(
        _POST,
        "/v1/messages",
        _D,
        "messages",
        _EVERY,
        "Anthropic messages, proxied to the engine and measured (engines that serve them: vLLM, SGLang, llama-server)",
        _OPENAI_BODY,
    ),
    Endpoint(_GET, "/v1/models", _D, "passthrough", _EVERY, "The engine's models"),
    Endpoint(
        _GET,
        "/v1/requests/{request_id}",
        _D,
        data_plane.request_metrics,
        _EVERY,
        "usage.performance and status of a recent request, by X-Request-ID",
    ),
    # The control plane.
    Endpoint(
        _POST,
        "/v1/model/load",
        _C,
        control_plane.load,
        summary="Start an engine with a model; 200 when ready (wait), 202 at once (no wait)",
        body=LoadRequest,
    ),
    Endpoint(
        _POST,
        "/v1/model/unload",
        _C,
        control_plane.unload,
        summary="Drain in-flight requests, stop the engine's whole process group",
        body=UnloadRequest,
        body_required=False,
    ),
    Endpoint(
        _GET,
        "/v1/model",
        _C,
        control_plane.status,
        summary="The engine's state, process, uptime, restarts, last error and output tail",
    ),
    Endpoint(
        _GET,
        "/v1/model/logs",
        _C,
        control_plane.logs,
        summary="The engine's output as it comes (server-sent events), its kept tail first",
    ),
    Endpoint(
        _POST,
        "/v1/model/sleep",
        _C,
        control_plane.sleep,
        summary="Put the engine to sleep (its GPU memory freed, the process kept): vLLM",
        body=SleepRequest,
        body_required=False,
    ),
    Endpoint(
        _POST,
        "/v1/model/wake",
        _C,
        control_plane.wake,
        summary="Wake a sleeping engine: its GPU memory taken back, ready again",
        body=WakeRequest,
        body_required=False,
    ),
    Endpoint(
        _GET,
        "/v1/model/adapters",
        _C,
        control_plane.adapters,
        summary="The LoRA adapters the engine has loaded, as it lists them",
    ),
    Endpoint(
        _POST,
        "/v1/model/adapters/load",
        _C,
        control_plane.load_adapter,
        summary="Load a LoRA adapter into the engine by name and path: vLLM, SGLang",
        body=AdapterRequest,
    ),
    Endpoint(
        _POST,
        "/v1/model/adapters/unload",
        _C,
        control_plane.unload_adapter,
        summary="Unload a LoRA adapter from the engine by name",
        body=AdapterName,
    ),
    # What is not in the table above: under /v1/model, nothing (the control plane's key first); any other /v1
    # path goes to the engine where its adapter lists it (`data_paths`), else 404 without reaching it.
    Endpoint(_ANY, "/v1/model/{rest:path}", _C, _no_such_control_route),
    Endpoint(_ANY, "/v1/{path:path}", _D, "passthrough", _EVERY),
)


class _Asgi:
    """Starlette wraps functions and methods as request -> response; an object with __call__ it runs as ASGI."""

    def __init__(self, handler: AsgiHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def _bound(handler: Handler, proxy: Proxy) -> Any:
    return _Asgi(getattr(proxy, handler)) if isinstance(handler, str) else handler


class _WrongMethod:
    """In front of the pass-through, which takes every method: a path that a route before it serves with other
    methods (`POST /v1/models`, `GET /v1/chat/completions`) is answered 405 with those in `Allow`, as Starlette
    answers where nothing follows, rather than passed on to the engine's paths and answered 404 there. Fixed paths
    are looked up (the pass-through carries rerank and score traffic); the few with parameters are matched."""

    def __init__(self, handler: AsgiHandler, before: list[BaseRoute]) -> None:
        self.handler = handler
        self.fixed: dict[str, set[str]] = {}
        self.patterns: list[Route] = []
        for route in before:
            if isinstance(route, Route) and route.methods:
                if route.param_convertors:
                    self.patterns.append(route)
                else:
                    self.fixed.setdefault(route.path, set()).update(route.methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.fixed.get(scope["path"], set()) | {
            method
            for route in self.patterns
            if route.matches(scope)[0] is Match.PARTIAL
            for method in route.methods or ()
        }
        if allowed:
            raise MethodNotAllowed.on(scope["method"], scope["path"], ", ".join(sorted(allowed)))
        await self.handler(scope, receive, send)


def starlette_routes(proxy: Proxy, forward: RequestHandler | None = None) -> list[BaseRoute]:
    """The table as Starlette's routes; in a data-plane worker (`forward` given), the routes the engine's owner
    serves go to `forward`, whatever their method (the owner answers a wrong one)."""
    routes: list[BaseRoute] = []
    forwarded: set[str] = set()
    for endpoint in ENDPOINTS:
        if forward is not None and endpoint.serves is Serves.OWNER:
            if endpoint.path not in forwarded:
                forwarded.add(endpoint.path)
                routes.append(Route(endpoint.path, forward, methods=_FORWARDED))
            continue
        handler = _bound(endpoint.handler, proxy)
        if endpoint.handler == "passthrough" and "{" in endpoint.path:  # the catch-all of the engine's paths
            handler = _WrongMethod(handler, routes)
        routes.append(Route(endpoint.path, handler, methods=list(endpoint.methods)))
    return routes


def generation_paths(proxy: Proxy) -> dict[str, AsgiHandler]:
    """The routes that carry the traffic, which the app serves before its router (POST only)."""
    return {e.path: proxy.generate for e in ENDPOINTS if e.handler == "generate"}


def known_paths() -> frozenset[str]:
    """The paths the metrics label as they are (every other is labelled by its family)."""
    return frozenset(e.path for e in ENDPOINTS if e.summary)


class Planes:
    """The key a path needs, by the table: its own route's plane, else that of the first route whose pattern's
    fixed part begins it (the table's order), else open."""

    def __init__(self, endpoints: Iterable[Endpoint], metrics_require_key: bool) -> None:
        metrics = Plane.DATA if metrics_require_key else Plane.OPEN
        self.exact: dict[str, Plane] = {}
        self.prefixes: list[tuple[str, Plane]] = []
        for endpoint in endpoints:
            plane = metrics if endpoint.plane is Plane.METRICS else endpoint.plane
            fixed = endpoint.path.split("{", 1)[0]
            if fixed == endpoint.path:
                self.exact.setdefault(endpoint.path, plane)
            else:
                self.prefixes.append((fixed, plane))

    def __call__(self, path: str) -> Plane:
        plane = self.exact.get(path)
        if plane is not None:
            return plane
        for prefix, plane in self.prefixes:
            if path.startswith(prefix):
                return plane
        return Plane.OPEN


def planes(metrics_require_key: bool) -> Planes:
    return Planes(ENDPOINTS, metrics_require_key)
