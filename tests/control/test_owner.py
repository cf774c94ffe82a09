"""The task that owns the engine: a caller always hears back, whatever becomes of the task."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import pytest

from sidecar.control.inbox import AnyCommand, Command
from sidecar.control.owner import Owner
from sidecar.errors import ServiceUnavailable, SidecarError


@dataclass(eq=False)
class Note(Command[str]):
    name: str


def owner(handle: object) -> Owner:
    return Owner(handle, lambda command: contextlib.nullcontext(), lambda: None)  # type: ignore[arg-type]


async def test_a_command_whose_handler_fails_hears_an_internal_error_and_the_owner_goes_on() -> None:
    async def handle(command: AnyCommand) -> None:
        if isinstance(command, Note) and command.name == "bad":
            raise RuntimeError("a bug")
        if isinstance(command, Note):
            command.reply.set_result(command.name)

    the_owner = owner(handle)
    with pytest.raises(SidecarError, match="internal error in the supervisor: RuntimeError") as failed:
        await the_owner.ask(lambda reply: Note(reply, "bad"))
    assert failed.value.status_code == 500
    assert await asyncio.wait_for(the_owner.ask(lambda reply: Note(reply, "good")), 5) == "good"


async def test_a_caller_waiting_when_the_task_is_cancelled_hears_the_sidecar_is_stopping() -> None:
    handling = asyncio.Event()

    async def handle(command: AnyCommand) -> None:
        handling.set()
        await asyncio.Event().wait()  # never answers

    the_owner = owner(handle)
    asking = asyncio.create_task(the_owner.ask(lambda reply: Note(reply, "stuck")))
    await asyncio.wait_for(handling.wait(), 5)
    assert the_owner._task is not None
    the_owner._task.cancel()
    with pytest.raises(ServiceUnavailable, match="the engine's supervisor stopped") as stopped:
        await asyncio.wait_for(asking, 5)
    assert stopped.value.code == "shutting_down"
