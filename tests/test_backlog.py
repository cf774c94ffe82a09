"""The backlog of finished requests' bookkeeping: later, in order, in each request's context, a batch per loop
turn (a quarter of what waits), and all of it at once for whoever reads what it writes."""

from __future__ import annotations

import asyncio
import contextvars

import structlog

from sidecar.dataplane.backlog import Backlog

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


async def test_work_waits_then_runs_by_itself_in_order_in_the_context_it_was_added_from() -> None:
    backlog = Backlog(delay_s=0.005)
    seen: list[str] = []
    done = asyncio.get_running_loop().create_future()
    for name in ("a", "b"):
        request_id.set(name)
        backlog.add(lambda: seen.append(request_id.get()))
    request_id.set("after")
    backlog.add(lambda: done.set_result(None))
    assert seen == [] and len(backlog) == 3  # nothing done on the caller's time
    await asyncio.wait_for(done, timeout=5)
    assert seen == ["a", "b"] and len(backlog) == 0


async def test_run_does_everything_waiting_at_once_and_the_timer_then_finds_nothing() -> None:
    backlog = Backlog(delay_s=0.001, batch=1)
    seen: list[int] = []
    for number in range(3):
        backlog.add(lambda number=number: seen.append(number))
    backlog.run()  # a GET of the history, say: every record is in
    assert seen == [0, 1, 2]
    backlog.add(lambda: seen.append(3))  # a new timer for new work
    marker = asyncio.get_running_loop().create_future()
    backlog.add(lambda: marker.set_result(None))
    await asyncio.wait_for(marker, timeout=5)
    assert seen == [0, 1, 2, 3]


async def test_the_loop_gets_a_turn_between_batches() -> None:
    """Under load, the bookkeeping of many requests never holds the loop for all of them at once."""
    backlog = Backlog(delay_s=0.001, batch=2)
    loop = asyncio.get_running_loop()
    order: list[str] = []
    finished = loop.create_future()

    def first() -> None:
        order.append("work 0")
        loop.call_soon(order.append, "loop turn")  # what the loop has to do meanwhile: reading sockets, say

    backlog.add(first)
    for number in range(1, 5):
        backlog.add(lambda number=number: order.append(f"work {number}"))
    backlog.add(lambda: finished.set_result(None))
    await asyncio.wait_for(finished, timeout=5)
    assert order == ["work 0", "work 1", "loop turn", "work 2", "work 3", "work 4"]


async def test_what_waits_stays_within_a_few_turns_worth_when_requests_end_faster_than_a_batch() -> None:
    """Ten requests ending every loop turn, five times the batch: a fixed batch would fall 8 further behind each
    turn (1,600 after 200 turns, every one holding its exchange); a quarter of what waits a turn keeps it near
    four turns' worth."""
    backlog = Backlog(delay_s=0, batch=2)
    waiting = []
    for _ in range(200):
        for _ in range(10):
            backlog.add(lambda: None)
        waiting.append(len(backlog))
        await asyncio.sleep(0)  # a loop turn: the backlog's batch runs in it
    assert max(waiting[100:]) <= 60, waiting[-10:]
    backlog.run()
    assert len(backlog) == 0


async def test_a_failing_piece_is_logged_and_the_rest_still_done() -> None:
    backlog = Backlog(delay_s=60)
    seen: list[str] = []

    def broken() -> None:
        raise ValueError("a bug in one request's bookkeeping")

    backlog.add(broken)
    backlog.add(lambda: seen.append("next"))
    with structlog.testing.capture_logs() as logs:
        backlog.run()
    assert seen == ["next"]
    assert [entry["event"] for entry in logs] == ["bookkeeping_failed"]
