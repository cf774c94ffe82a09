"""The inbox of a task that owns something: commands in arrival order, each with a future for its answer.

The owner takes them one at a time with `next()`. While one of its steps runs, `during()` keeps answering the
commands that arrive, or stops the step for one that must go first: that is how a long step (an engine's start)
stays interruptible without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sidecar.errors import SidecarError

T = TypeVar("T")


@dataclass(eq=False)
class Command(Generic[T]):
    """A request to the owner; `T` is what it is answered with."""

    reply: asyncio.Future[T]


class Defer:
    """Leave the command in the inbox: it is taken when the step ends."""


@dataclass
class Preempt:
    """Stop the step for the command (it is next in line); `error` is what the step's own caller is told."""

    error: SidecarError | None = None


DEFER = Defer()
# What a step does with a command that arrives while it runs: None once the command is answered.
Decision = Defer | Preempt | None
AnyCommand = Command[Any]


class Abandoned(Exception):
    """A step was stopped for a command that arrived meanwhile."""

    def __init__(self, error: SidecarError | None) -> None:
        super().__init__(error.message if error else "abandoned")
        self.error = error


def new_reply() -> asyncio.Future[Any]:
    reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    # A caller that left never reads the answer: mark it read, so that asyncio does not report it as lost.
    reply.add_done_callback(lambda future: future.cancelled() or future.exception())
    return reply


def reply(command: Command[T], value: T) -> None:
    if not command.reply.done():
        command.reply.set_result(value)


def fail(command: Command[Any], error: SidecarError) -> None:
    if not command.reply.done():
        command.reply.set_exception(error)


class Inbox:
    def __init__(self) -> None:
        self._commands: deque[AnyCommand] = deque()
        self._arrived = asyncio.Event()

    def post(self, command: AnyCommand) -> None:
        self._commands.append(command)
        self._arrived.set()

    async def next(self) -> AnyCommand:
        while not self._commands:
            self._arrived.clear()
            await self._arrived.wait()
        return self._commands.popleft()

    def take_all(self) -> list[AnyCommand]:
        taken = list(self._commands)
        self._commands.clear()
        return taken

    async def during(self, work: Awaitable[T], decide: Callable[[AnyCommand], Decision]) -> T:
        """Await `work` while `decide` answers each command that arrives, defers it, or stops `work` for it
        (`work` is cancelled, the command goes first in line, and Abandoned is raised)."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                for command in list(self._commands):
                    decision = decide(command)
                    if isinstance(decision, Defer):
                        continue
                    self._commands.remove(command)
                    if isinstance(decision, Preempt):
                        self._commands.appendleft(command)
                        raise Abandoned(decision.error)
                self._arrived.clear()
                arrived = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait({task, arrived}, return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, SidecarError):
                    await task
