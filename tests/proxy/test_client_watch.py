"""The watch that cancels an exchange when its client leaves: it must not keep the exchange alive afterwards.

A unit test of the one component, with the server's side played by the test (what `http_server.HttpProtocol`
does when a connection is lost: flag the request's state, call the function the watch left there); the
end-to-end disconnect behaviour is in test_faults.py. A reference cycle per request kept every finished exchange
in memory until the garbage collector's oldest generation, whose collections stopped the event loop for tens of
milliseconds under load.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar import request_state
from sidecar.dataplane.exchange import ClientWatch


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


async def _exchange(leave: str | None) -> tuple[SimpleNamespace, bool]:
    """An exchange under the watch; its client leaving `before` it begins, `during` it, or not at all (None).
    The exchange, and whether it ran to its end."""
    scope: dict[str, Any] = {"state": {}}
    exchange = SimpleNamespace(scope=scope, client_done=False, client_disconnected=False)
    if leave == "before":
        request_state.of(scope).connection_lost()
    engine = asyncio.Event()  # the engine's answer, which never comes unless the client stays

    async def serve() -> None:
        with ClientWatch(exchange):  # type: ignore[arg-type]
            if leave == "during":
                asyncio.get_running_loop().call_soon(request_state.of(scope).connection_lost)
            else:
                asyncio.get_running_loop().call_soon(engine.set)
            await engine.wait()
            exchange.client_done = True
        assert request_state.of(scope).on_client_gone is None

    task = asyncio.create_task(serve())
    try:
        await task
    except asyncio.CancelledError:
        return exchange, False
    return exchange, True


async def test_a_finished_exchange_is_freed_without_the_garbage_collector(garbage_kept: list[Any]) -> None:
    exchange, finished = await _exchange(leave=None)
    assert finished and not exchange.client_disconnected
    assert request_state.of(exchange.scope).on_client_gone is None  # nothing of the exchange is left in the scope
    del exchange
    gc.collect()
    assert not [obj for obj in garbage_kept if isinstance(obj, ClientWatch | SimpleNamespace)]


@pytest.mark.parametrize("leave", ["during", "before"])
async def test_a_client_that_leaves_cancels_the_exchange(leave: str, garbage_kept: list[Any]) -> None:
    exchange, finished = await _exchange(leave=leave)
    assert not finished and exchange.client_disconnected
    del exchange
    gc.collect()
    assert not [obj for obj in garbage_kept if isinstance(obj, ClientWatch | SimpleNamespace)]


async def test_a_connection_lost_after_the_response_completed_is_no_disconnect() -> None:
    scope: dict[str, Any] = {"state": {}}
    exchange = SimpleNamespace(scope=scope, client_done=False, client_disconnected=False)
    with ClientWatch(exchange):  # type: ignore[arg-type]
        exchange.client_done = True  # [DONE] went out: the server may close the connection any time now
        request_state.of(scope).connection_lost()
        await asyncio.sleep(0)  # where a cancellation would land
    assert not exchange.client_disconnected
