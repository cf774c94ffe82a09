"""The app factory: settings in, a Starlette app out."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.control.engine import LoadRequest
from sidecar.control.shared import SharedState
from sidecar.control.supervisor import Supervisor, checked_adapter
from sidecar.dataplane.admission import Admission
from sidecar.dataplane.backlog import Backlog
from sidecar.dataplane.proxy import Proxy
from sidecar.errors import (
    SidecarError,
    handle_http_exception,
    handle_sidecar_error,
    handle_unexpected_error,
    send_error,
)
from sidecar.logs import get_logger
from sidecar.redaction import Redactor
from sidecar.server import control_plane, internal
from sidecar.server import routes as routes_table
from sidecar.server.auth import Auth
from sidecar.server.body_limit import BodyLimit
from sidecar.server.endpoint import AsgiHandler, RequestHandler
from sidecar.server.request_context import RequestContextMiddleware, client_left
from sidecar.settings import Settings
from sidecar.telemetry import otel
from sidecar.telemetry.gpu import Gpus
from sidecar.telemetry.history import RequestHistory
from sidecar.telemetry.service import Telemetry
from sidecar.telemetry.watchdog import Sample
from sidecar.workers import pool as workers
from sidecar.workers.pool import WorkerPool
from sidecar.workers.view import EngineView

log = get_logger("sidecar.app")

# The supervisor's process waits this long past the drain for its workers to exit, then kills them.
WORKER_EXIT_MARGIN_S = 10.0


def autoload_request(settings: Settings) -> LoadRequest | None:
    """The load SIDECAR_AUTOLOAD_* asks for (None without one), checked as `POST /v1/model/load` checks one: the
    same 400 where it is bad, which `sidecar serve` reports before it starts serving."""
    if not (settings.autoload_engine and settings.autoload_model):
        return None
    try:
        request = LoadRequest(
            engine=settings.autoload_engine,
            model=settings.autoload_model,
            args=settings.autoload_args,
            served_model_name=settings.autoload_served_model_name,
            wait=False,
        )
    except ValidationError as exc:
        raise control_plane.bad_request(exc) from None
    checked_adapter(request, settings.engine_executables)
    return request


def create_app(settings: Settings, redactor: Redactor | None = None, pool: WorkerPool | None = None) -> Starlette:
    """The sidecar; with a pool of data-plane workers, the process that owns the engine behind them."""
    redactor = redactor or Redactor()
    redactor.register(*settings.data_keys, *otel.header_secrets())
    gpus = Gpus()
    exporting = otel.from_settings(settings, "supervisor")
    supervisor = Supervisor(settings, redactor, gpus, otel=exporting, shared=pool.shared if pool else None)
    watch = Telemetry(
        settings, gpus, lambda: supervisor.engine_pid, supervisor.status, known_routes=routes_table.known_paths()
    )
    if pool is not None:
        shared = pool.shared

        def share_gpu_reading(sample: Sample) -> None:  # the workers' requests read their GPU peaks from these
            if sample.gpu_used_mb is not None:
                shared.record_gpu(sample.monotonic, sample.gpu_used_mb)

        watch.watchdog.on_sample = share_gpu_reading
    history = RequestHistory(settings.request_history_size)
    admission = Admission(settings.max_concurrent_requests, settings.max_queued_requests, settings.queue_timeout_s)
    watch.metrics.watch_admission(admission)
    proxy = Proxy(settings, supervisor, history, watch, admission, otel=exporting)

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
        try:
            # Spawned now, not waited for: start-up would block serving; /ready tells when it is.
            if (autoload := autoload_request(settings)) is not None:
                await supervisor.load(autoload)
        except SidecarError as exc:  # what `sidecar serve` could not check before (the engine failed to start)
            log.error("autoload_failed", engine=settings.autoload_engine, param=exc.param, error=exc.message)
            raise SystemExit(2) from None
        if pool is not None:
            pool.start()
        yield
        if pool is not None:  # the workers drain their requests first
            await pool.stop(settings.drain_timeout_s + WORKER_EXIT_MARGIN_S)
        await supervisor.shutdown()  # the engine goes first: nothing is left running
        proxy.backlog.run()  # the last requests' records and access lines
        proxy.close()
        watch.stop()
        if exporting is not None:  # after the engine's stop: its span goes out too
            exporting.shutdown()
        log.info("sidecar_stopped")

    routes = internal.supervisor_routes if pool is not None else []
    token = pool.token if pool is not None else None
    app = _assemble(settings, redactor, proxy, watch, history, routes, lifespan, token)
    app.state.supervisor = supervisor
    return app


def create_worker_app(settings: Settings, redactor: Redactor, shared: SharedState, index: int, token: str) -> Starlette:
    """A data-plane worker: the proxy and what it measures here, the rest answered by the supervisor's process."""
    redactor.register(*settings.data_keys, *otel.header_secrets())
    supervisor = workers.internal_client(workers.supervisor_socket(settings), token)
    view = EngineView(settings, shared, index, supervisor, redactor)
    gpus = Gpus()
    # The engine's state, the resources and GPU readings are the supervisor's process's: no watchdog here.
    watch = Telemetry(settings, gpus, lambda: None, None, known_routes=routes_table.known_paths())
    watch.gpu_peak_since = shared.gpu_peak_since
    history = RequestHistory(settings.request_history_size)
    admission = Admission(*workers.admission_share(settings), settings.queue_timeout_s)
    watch.metrics.watch_admission(admission)
    exporting = otel.from_settings(settings, f"worker-{index}")
    proxy = Proxy(settings, view, history, watch, admission, worker=index, otel=exporting)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("worker_serving", worker=index, pid=os.getpid())
        await view.prime()
        yield
        proxy.backlog.run()
        proxy.close()
        await supervisor.aclose()
        gpus.close()
        if exporting is not None:
            exporting.shutdown()

    siblings = internal.sibling_clients(settings, index, token)
    routes, forward = internal.worker_routes(settings, token, history, siblings)
    app = _assemble(settings, redactor, proxy, watch, history, routes, lifespan, token, forward)
    app.state.find_elsewhere = internal.find_in(siblings)
    return app


def _assemble(
    settings: Settings,
    redactor: Redactor,
    proxy: Proxy,
    watch: Telemetry,
    history: RequestHistory,
    routes: list[BaseRoute],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
    internal_token: str | None,
    forward: RequestHandler | None = None,
) -> Starlette:
    """The app around a proxy: the generation routes served first, then `routes` (a process's own), then the route
    table's (in a data-plane worker, those of the engine's owner go to `forward`)."""
    app = _SidecarApp(
        generation=routes_table.generation_paths(proxy),
        outer=_middleware(settings, watch, internal_token, proxy.worker, proxy.backlog),
        settings=settings,
        routes=[*routes, *routes_table.starlette_routes(proxy, forward)],
        exception_handlers=_EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redactor = redactor
    app.state.history = history
    app.state.telemetry = watch
    app.state.find_elsewhere = None  # a data-plane worker asks the others for the records it lacks
    return app


async def _handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """A client gone before its body was read (a control-plane call, embeddings): nothing reaches it, and the
    access line logs nginx's 499 instead of the 500 and traceback of an unexpected error."""
    return Response(status_code=client_left(request.scope))


_EXCEPTION_HANDLERS: dict[Any, Any] = {
    SidecarError: handle_sidecar_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: _handle_client_disconnect,
    Exception: handle_unexpected_error,
}


def _middleware(
    settings: Settings, watch: Telemetry, internal_token: str | None, worker: int | None, backlog: Backlog
) -> list[Middleware]:
    """The layers every request passes first, outermost first: a request id and an access line for every
    response, then CORS (preflights need no key). Auth and the body limit come after them (`_Checked`)."""
    observe = watch.metrics.observe_request
    middleware = [
        Middleware(RequestContextMiddleware, observe, internal_token=internal_token, worker=worker, backlog=backlog)
    ]
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
    return middleware


class _SidecarApp(Starlette):
    """Starlette, behind the checks every request passes (`_Checked`), which serve the generation routes
    themselves: every token of every stream passes the layers between the server and the proxy, and every
    resumption of a request's task passes through each of them again, so the two routes that carry the traffic go
    from the outer middlewares straight to the proxy. Every other route goes on to Starlette's error middlewares
    and router.
    """

    def __init__(
        self, generation: dict[str, AsgiHandler], outer: list[Middleware], settings: Settings, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.generation = generation
        self.outer = outer
        self.sidecar_settings = settings

    def build_middleware_stack(self) -> ASGIApp:
        settings = self.sidecar_settings
        auth = Auth(settings.data_keys, settings.control_keys, routes_table.planes(settings.metrics_require_key))
        body_limit = BodyLimit(settings.max_body_bytes, workers.body_budget_share(settings))
        app: ASGIApp = _Checked(self.generation, super().build_middleware_stack(), auth, body_limit)
        for cls, args, kwargs in reversed(self.outer):
            app = cls(app, *args, **kwargs)
        return app


class _Checked:
    """Authentication and the body limit, the one place each is applied, for every HTTP request; then the
    generation routes (POST) straight to the proxy, every other request to the rest of the app."""

    def __init__(self, generation: dict[str, AsgiHandler], rest: ASGIApp, auth: Auth, body_limit: BodyLimit) -> None:
        self.generation = generation
        self.rest = rest
        self.auth = auth
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.rest(scope, receive, send)
            return
        try:
            self.auth.check(scope)  # before anything reads the body
            bounded = self.body_limit.bounded(scope, receive)
        except SidecarError as exc:
            await send_error(exc, scope, receive, send)
            return
        handler = self.generation.get(scope["path"]) if scope["method"] == "POST" else None
        try:
            if handler is None:
                await self.rest(scope, bounded, send)
            else:
                try:
                    await handler(scope, bounded, send)
                except SidecarError as exc:  # raised before the response started, as with Starlette's handlers
                    await send_error(exc, scope, receive, send)
        finally:
            self.body_limit.release(scope)
