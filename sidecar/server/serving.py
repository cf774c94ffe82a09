"""The app served: uvicorn on uvloop and httptools, in one process, or in a supervisor's process (which owns the
engine) and its data-plane workers, each on the socket it is given."""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import structlog
import uvicorn
from starlette.applications import Starlette

from sidecar.control.shared import SharedState
from sidecar.control.supervisor import Supervisor
from sidecar.log_writer import EXIT_WAIT_S
from sidecar.logs import configure_logging, flush_logs
from sidecar.redaction import Redactor
from sidecar.server import garbage, http_server
from sidecar.server.app import create_app, create_worker_app
from sidecar.settings import Settings
from sidecar.workers import pool as workers


def server_config(settings: Settings, app: Starlette) -> uvicorn.Config:
    """The app on uvloop and httptools, with our access line instead of uvicorn's, draining on shutdown."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http_server.protocol(settings.max_header_bytes, settings.client_timeout_s),  # uvicorn's, bounded
        ws="none",  # no route is a WebSocket: an upgrade request is served as HTTP, never by a WebSocket library
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # nothing reads the client's address: no need to rewrite it on every request
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )


class _Server(uvicorn.Server):
    """uvicorn's server, which tells the supervisor the moment a signal asks it to stop: a load in progress is
    abandoned then, with an OpenAI error for its caller, rather than cut after the graceful wait."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] = lambda: None) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, with the log lines still queued (`log_writer`) written before it raises again the signal that
        stopped it: that ends the process at once, atexit's flush never runs."""
        with super().capture_signals():
            try:
                yield
            finally:
                flush_logs(EXIT_WAIT_S)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        garbage.take_over()
        super().run(sockets)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        collecting = asyncio.create_task(garbage.collect_periodically())
        try:
            await super().serve(sockets)
        finally:
            collecting.cancel()


def server(settings: Settings, redactor: Redactor) -> uvicorn.Server:
    app = create_app(settings, redactor)
    supervisor: Supervisor = app.state.supervisor
    return _Server(server_config(settings, app), supervisor.server_stopping)


def serve_with_workers(settings: Settings, redactor: Redactor) -> None:
    """SIDECAR_WORKERS > 1: this process binds the port for the workers, owns the engine, and serves the full app
    on a Unix socket for them; the workers serve the port."""
    listener = socket.create_server((settings.host, settings.port), reuse_port=False, backlog=2048)
    listener.set_inheritable(True)
    if settings.port == 0:  # a free port: the one the workers are told
        settings = settings.model_copy(update={"port": listener.getsockname()[1]})
    shared = SharedState.create(workers.state_file(settings), settings.workers)
    pool = workers.WorkerPool(settings, listener, shared, secrets.token_urlsafe(32))
    app = create_app(settings, redactor, pool)
    supervisor: Supervisor = app.state.supervisor

    def stopping() -> None:
        supervisor.server_stopping()
        pool.signal_stop()  # the workers drain now, alongside this process

    internal = workers.unix_listener(workers.supervisor_socket(settings))
    _Server(server_config(settings, app), stopping).run(sockets=[internal])


def serve_worker(index: int, fd: int) -> None:
    """A data-plane worker (`python -m sidecar worker INDEX FD`), started by the supervisor's process."""
    settings, token = workers.worker_settings()
    if settings.log_dir is not None:  # files of its own: rotation is not safe with several writers
        settings = settings.model_copy(update={"log_dir": settings.log_dir / f"worker-{index}"})
    redactor = Redactor()
    configure_logging(settings, redactor)
    structlog.contextvars.bind_contextvars(worker=index)
    shared = SharedState.attach(workers.state_file(settings), settings.workers)
    app = create_worker_app(settings, redactor, shared, index, token)
    public = socket.socket(fileno=fd)
    own = workers.unix_listener(workers.worker_socket(settings, index))
    _Server(server_config(settings, app)).run(sockets=[public, own])
