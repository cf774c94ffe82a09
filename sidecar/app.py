"""The app factory: settings in, a Starlette app out."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar import control, dataplane, health, telemetry
from sidecar.admission import Admission
from sidecar.dataplane import AsgiHandler
from sidecar.engine import LoadRequest
from sidecar.errors import (
    SidecarError,
    handle_http_exception,
    handle_sidecar_error,
    handle_unexpected_error,
    send_error,
)
from sidecar.gpu import Gpus
from sidecar.history import RequestHistory
from sidecar.logs import get_logger
from sidecar.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from sidecar.proxy import Proxy
from sidecar.redaction import Redactor
from sidecar.settings import Settings
from sidecar.supervisor import Supervisor
from sidecar.telemetry import Telemetry

log = get_logger("sidecar.app")


def create_app(settings: Settings, redactor: Redactor | None = None) -> Starlette:
    redactor = redactor or Redactor()
    redactor.register(*settings.data_keys)
    gpus = Gpus()
    supervisor = Supervisor(settings, redactor, gpus)
    watch = Telemetry(settings, gpus, lambda: supervisor.engine_pid, supervisor.status)
    history = RequestHistory(settings.request_history_size)
    admission = Admission(settings.max_concurrent_requests, settings.max_queued_requests, settings.queue_timeout_s)
    watch.metrics.watch_admission(admission)
    proxy = Proxy(settings, supervisor, history, watch, admission)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.has_keys:
            log.warning(
                "auth_disabled",
                reason="no API keys configured: requests are not authenticated, listening on loopback only",
                host=settings.host,
            )
        log.info("sidecar_started", host=settings.host, port=settings.port)
        await asyncio.to_thread(supervisor.stop_leftover)
        watch.start()
        if settings.autoload_engine and settings.autoload_model:
            # Spawn now, but do not wait for readiness here: start-up blocks serving, /ready tells when.
            autoload = LoadRequest(
                engine=settings.autoload_engine,
                model=settings.autoload_model,
                args=settings.autoload_args,
                served_model_name=settings.autoload_served_model_name,
                wait=False,
            )
            try:
                await supervisor.load(autoload)
            except SidecarError as exc:  # a bad autoload setting: stop start-up, saying why
                log.error("autoload_failed", engine=settings.autoload_engine, error=exc.message)
                raise SystemExit(2) from None
        yield
        await supervisor.shutdown()  # the engine goes first: nothing is left running
        proxy.close()
        watch.stop()
        log.info("sidecar_stopped")

    # Outermost first: every response gets a request id and an access line, CORS preflights need no key,
    # auth comes before anything reads the body.
    middleware = [Middleware(RequestContextMiddleware, on_complete=watch.metrics.observe_request)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID", "X-Performance-Metrics"],
            )
        )
    middleware += [
        Middleware(
            AuthMiddleware,
            data_keys=settings.data_keys,
            control_keys=settings.control_keys,
            metrics_require_key=settings.metrics_require_key,
        ),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]

    app = _SidecarApp(
        generation=dataplane.generation_paths(proxy),
        outer=middleware,
        routes=[
            *dataplane.routes(proxy),
            *health.routes,
            *telemetry.routes,
            *control.routes,
            dataplane.passthrough_route(proxy),
        ],
        exception_handlers={
            SidecarError: handle_sidecar_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redactor = redactor
    app.state.supervisor = supervisor
    app.state.history = history
    app.state.telemetry = watch
    return app


class _SidecarApp(Starlette):
    """Starlette, with the generation routes served before its router and its two error middlewares.

    Every token of every stream passes the layers between the server and the proxy, and every request the
    router's walk over the routes: for the two routes that carry the traffic, the sidecar's own middleware
    hands the request straight to the proxy (SidecarError answered there), which took about a tenth of the
    sidecar's CPU per request. Every other route goes the usual way, inside the same middleware.
    """

    def __init__(self, generation: dict[str, AsgiHandler], outer: list[Middleware], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generation = generation
        self.outer = outer

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = _GenerationRoutes(self.generation, super().build_middleware_stack())
        for cls, args, kwargs in reversed(self.outer):
            app = cls(app, *args, **kwargs)
        return app


class _GenerationRoutes:
    def __init__(self, routes: dict[str, AsgiHandler], rest: ASGIApp) -> None:
        self.routes = routes
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.rest(scope, receive, send)
            return
        try:
            await handler(scope, receive, send)
        except SidecarError as exc:  # raised before the response started, as with Starlette's handlers
            await send_error(exc, scope, receive, send)


def server_config(settings: Settings, app: Starlette) -> uvicorn.Config:
    """The app on uvloop and httptools, with our access line instead of uvicorn's, draining on shutdown."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # nothing reads the client's address: no need to rewrite it on every request
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )


class _Server(uvicorn.Server):
    """uvicorn's server, which tells the supervisor the moment a signal asks it to stop: a load in progress is
    abandoned then, with an OpenAI error for its caller, rather than cut after the graceful wait."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def server(settings: Settings, redactor: Redactor) -> uvicorn.Server:
    app = create_app(settings, redactor)
    supervisor: Supervisor = app.state.supervisor
    return _Server(server_config(settings, app), supervisor.server_stopping)
