"""The one task that holds the engine: it takes the commands in its inbox one at a time, and nothing else changes
the engine or its state.

Callers (the control plane, the lifespan, the engine's watchers, the signal handler) post a command and await its
answer; readers read what the lifecycle publishes. There is no lock that could outlive its holder: a caller that
goes away only stops listening, and the owner finishes what it started.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sidecar.control.commands import Shutdown, shutting_down
from sidecar.control.inbox import AnyCommand, Command, Inbox, fail, new_reply
from sidecar.errors import SidecarError
from sidecar.logs import get_logger

log = get_logger("sidecar.supervisor")

T = TypeVar("T")


class Owner:
    def __init__(
        self,
        handle: Callable[[AnyCommand], Awaitable[None]],
        traced: Callable[[AnyCommand], AbstractContextManager[None]],
        on_close: Callable[[], None],
    ) -> None:
        self.inbox = Inbox()
        self.closed = False  # the task is gone: every command is 503
        self._handle = handle  # runs one command
        self._traced = traced  # a span around it, where OpenTelemetry is on
        self._on_close = on_close
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def post(self, command: AnyCommand) -> None:
        """Into the inbox; the task starts with the first command."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            # A context of its own: the request that happened to start it must not tag every later engine log line.
            self._task = asyncio.create_task(self._run(), name="engine-owner", context=contextvars.Context())
        self.inbox.post(command)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """`callback` on the owner's loop, from any thread (a signal handler's); nothing before the first command."""
        if self._loop is not None and not self.closed:
            self._loop.call_soon_threadsafe(callback)

    async def ask(self, make: Callable[[asyncio.Future[T]], Command[T]]) -> T:
        """Post the command `make` builds around a new reply, and wait for the answer (503 once the task is gone)."""
        if self.closed:
            raise shutting_down("no engine operation is possible")
        command = make(new_reply())
        self.post(command)
        assert self._task is not None
        waiting: set[asyncio.Future[Any]] = {command.reply, self._task}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not command.reply.done():  # the task ended without answering: cancelled, as the server stops
            raise shutting_down("the engine's supervisor stopped")
        return command.reply.result()

    @property
    def started(self) -> bool:
        return self._task is not None

    async def finished(self) -> None:
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            command = await self.inbox.next()
            try:
                with self._traced(command):
                    await self._handle(command)
            except Exception as exc:  # a bug: its caller hears of it, and the owner goes on
                log.exception("supervisor_error", command=type(command).__name__)
                fail(command, SidecarError(f"internal error in the supervisor: {exc.__class__.__name__}"))
            if isinstance(command, Shutdown) and command.final:
                break
        self.closed = True
        for command in self.inbox.take_all():
            fail(command, shutting_down("no engine operation is possible"))
        self._on_close()
