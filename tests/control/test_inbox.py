"""The owner's inbox: commands in arrival order, and a step that keeps answering them while it runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from sidecar.control.inbox import DEFER, Abandoned, Command, Decision, Inbox, Preempt, new_reply, reply
from sidecar.errors import Conflict


@dataclass(eq=False)
class Note(Command):
    name: str


def _note(name: str) -> Note:
    return Note(new_reply(), name)


async def test_commands_come_out_in_the_order_they_went_in() -> None:
    inbox = Inbox()
    for name in "abc":
        inbox.post(_note(name))
    assert [(await inbox.next()).name for _ in range(3)] == ["a", "b", "c"]  # type: ignore[attr-defined]


async def test_a_step_answers_what_arrives_and_leaves_what_it_defers() -> None:
    inbox, step_may_end = Inbox(), asyncio.Event()
    seen: list[str] = []

    def decide(command: Command) -> Decision:
        assert isinstance(command, Note)
        seen.append(command.name)
        if command.name == "later":
            return DEFER
        reply(command, f"answered {command.name}")
        return None

    async def step() -> str:
        await step_may_end.wait()
        return "done"

    running = asyncio.create_task(inbox.during(step(), decide))
    now, later = _note("now"), _note("later")
    inbox.post(now)
    inbox.post(later)
    assert await now.reply == "answered now"  # while the step still runs
    assert not running.done() and not later.reply.done()
    step_may_end.set()
    assert await running == "done"
    assert await inbox.next() is later  # deferred: still in line, first
    assert seen.count("later") >= 1


async def test_a_preempting_command_stops_the_step_and_goes_first() -> None:
    inbox, cancelled = Inbox(), asyncio.Event()

    async def step() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    waiting = _note("waiting")
    inbox.post(waiting)
    running = asyncio.create_task(
        inbox.during(step(), lambda c: Preempt(Conflict("stopped")) if c.name == "urgent" else DEFER)  # type: ignore[attr-defined]
    )
    urgent = _note("urgent")
    await asyncio.sleep(0)
    inbox.post(urgent)
    with pytest.raises(Abandoned) as abandoned:
        await running
    assert abandoned.value.error is not None and abandoned.value.error.message == "stopped"
    assert cancelled.is_set()  # the step's work was cancelled, not left running
    assert await inbox.next() is urgent
    assert await inbox.next() is waiting


async def test_take_all_empties_the_inbox() -> None:
    inbox = Inbox()
    notes = [_note(str(n)) for n in range(3)]
    for note in notes:
        inbox.post(note)
    assert inbox.take_all() == notes and inbox.take_all() == []
