"""The watch that cancels an exchange when its client leaves: it must not keep the exchange alive afterwards.

A unit test of the one component: the end-to-end disconnect behaviour is in test_faults.py. A reference cycle
per request (a cancelled watcher's traceback holding the request's frames) kept every finished exchange in
memory until the garbage collector's oldest generation, whose collections stopped the event loop for tens of
milliseconds under load.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.proxy import _ClientWatch


class _Receive:
    """uvicorn's `receive` once the body is read: it waits until the response completes or the client leaves."""

    def __init__(self) -> None:
        self.over = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        await self.over.wait()
        return {"type": "http.disconnect"}


@pytest.fixture
def garbage_kept() -> Iterator[list[Any]]:
    """What the collector finds unreachable during the test (kept for inspection instead of freed)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def _exchange(receive: _Receive, leave: bool) -> SimpleNamespace:
    exchange = SimpleNamespace(receive=receive, client_done=False, client_disconnected=False)

    async def serve() -> None:
        with _ClientWatch(exchange):  # type: ignore[arg-type]
            if leave:
                receive.over.set()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(serve())
    try:
        await task
    except asyncio.CancelledError:
        pass
    receive.over.set()  # the response is complete: the server answers the watcher's receive
    await asyncio.sleep(0.01)
    return exchange


async def test_a_finished_exchange_is_freed_without_the_garbage_collector(garbage_kept: list[Any]) -> None:
    exchange = await _exchange(_Receive(), leave=False)
    assert not exchange.client_disconnected  # the response's end is no disconnect
    gc.collect()
    assert not [obj for obj in garbage_kept if isinstance(obj, _ClientWatch | SimpleNamespace)]


async def test_a_client_that_leaves_cancels_the_exchange() -> None:
    exchange = await _exchange(_Receive(), leave=True)
    assert exchange.client_disconnected
