"""The first token written from the engine connection's read callback (`relay._pump`'s `first_output`): a real
`upstream_connection.Response` fed reads as the connection feeds them, the client's `send` recorded, and the
relay's clock moved by the test. What the client gets and what is measured are those of the relay loop
(test_relay.py); what differs is when: the reads up to the first output go out before the callback returns, with
no task woken, and every read after it through the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar import request_state
from sidecar.dataplane.upstream_connection import Response
from tests.proxy import test_relay
from tests.proxy.test_relay import DONE, MS, USAGE, Clock, bodies, chunk, proxy_and_exchange

clock = test_relay.clock  # the fixture: the relay's clock, moved by the test


class _Connection:
    """What a response asks of its connection."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def finished(self, reusable: bool) -> None:
        pass


class Stream:
    """A real Proxy's stream relay on a real Response, started and left waiting for the engine's first read."""

    def __init__(self, clock: Clock, send: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.clock = clock
        self.start_ns = clock.now_ns
        self.proxy, self.exchange = proxy_and_exchange(clock, "/v1/chat/completions", send or self.record)
        self.scope = self.exchange.scope
        self.response = Response(_Connection())  # type: ignore[arg-type]
        self.response.status = 200
        self.response.raw_headers = [(b"content-type", b"text/event-stream")]

    async def record(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.proxy.relays.stream(self.exchange, self.response))
        await until(lambda: self.response._waiter is not None and not self.response._waiter.done())

    def read(self, at_ms: float, data: bytes) -> None:
        """A read of the engine's, at `at_ms` after admission, as the connection's callback gives it."""
        self.clock.now_ns = self.start_ns + int(at_ms * MS)
        self.response._feed(data)

    async def end(self) -> None:
        self.response._finish()
        try:
            await asyncio.wait_for(self.task, 10)
        finally:
            self.exchange.deadline.close()
            self.proxy.close()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(100):  # loop turns, not time
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the relay's task never got there")


async def test_the_reads_up_to_the_first_output_go_out_within_the_engines_callback(clock: Clock) -> None:
    stream = Stream(clock)
    await stream.start()
    stream.read(1, chunk(role=True))  # no output yet: written all the same, as it came
    assert bodies(stream.sent) == [chunk(role=True)]
    stream.read(20, chunk("Hel"))  # the first token: out before the callback returned, no task woken
    assert bodies(stream.sent) == [chunk(role=True), chunk("Hel")]
    stream.read(25, chunk("lo"))  # after the first output, the loop's: it goes out once the task runs
    assert bodies(stream.sent) == [chunk(role=True), chunk("Hel")]
    await until(lambda: len(bodies(stream.sent)) == 3)
    stream.read(30, chunk(usage=USAGE) + DONE)
    await stream.end()
    assert bodies(stream.sent) == [chunk(role=True), chunk("Hel"), chunk("lo"), DONE]
    assert stream.exchange.client_done and stream.exchange.error is None
    performance = stream.exchange.performance
    assert performance is not None
    assert performance["ttft_ms"] == 20.0 and performance["latency_ms"] == 25.0
    assert performance["completion_tokens"] == 3  # the engine's usage chunk, removed for the client, counted


async def test_with_the_clients_buffer_full_the_first_token_waits_for_the_relay_task(clock: Clock) -> None:
    stream = Stream(clock)
    await stream.start()
    request_state.of(stream.scope).client_writes = (True, 0.0)  # the server protocol's word: writes paused
    stream.read(20, chunk("Hi"))
    assert bodies(stream.sent) == []
    await until(lambda: len(bodies(stream.sent)) == 1)
    stream.read(30, DONE)
    await stream.end()
    assert bodies(stream.sent) == [chunk("Hi"), DONE]
    assert (
        stream.exchange.meter.output_events == 1 and stream.exchange.meter.first_output_ns == stream.start_ns + 20 * MS
    )


async def test_a_send_that_would_wait_leaves_the_read_to_the_relay_task_and_it_goes_out_once(clock: Clock) -> None:
    sent: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def slow_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await gate.wait()  # as uvicorn's send waits for a client's buffer to drain
        sent.append(message)

    stream = Stream(clock, slow_send)
    await stream.start()
    stream.read(20, chunk("Hi"))
    assert bodies(sent) == []
    gate.set()
    await until(lambda: len(bodies(sent)) == 1)
    stream.read(30, DONE)
    await stream.end()
    assert bodies(sent) == [chunk("Hi"), DONE]
    assert stream.exchange.meter.output_events == 1


async def test_a_read_that_ends_the_stream_or_carries_usage_goes_through_the_loop(clock: Clock) -> None:
    stream = Stream(clock)
    await stream.start()
    stream.read(20, chunk(usage=USAGE) + DONE)  # an answer with no output at all
    assert bodies(stream.sent) == []  # not the callback's: the loop removes the usage chunk and ends the body
    await stream.end()
    assert bodies(stream.sent) == [DONE]
    assert stream.response._reads_to is None  # let go of: the handler holds the relay's frame


async def test_what_comes_after_done_is_never_written_even_before_any_output(clock: Clock) -> None:
    stream = Stream(clock)
    await stream.start()
    stream.read(20, chunk(role=True) + DONE)  # an answer with no output: the handler still waits for one
    await until(lambda: bodies(stream.sent) == [chunk(role=True) + DONE])
    stream.read(21, chunk("late"))  # after [DONE]: the end of the body is all that is let through
    await stream.end()
    assert bodies(stream.sent) == [chunk(role=True) + DONE]


async def test_a_read_for_a_client_already_gone_is_left_to_the_relay_task(clock: Clock) -> None:
    stream = Stream(clock)
    await stream.start()
    request_state.of(stream.scope).client_gone = True  # the server's word (its cancelling of the task left out)
    stream.read(20, chunk("Hi"))
    assert bodies(stream.sent) == []
    await until(lambda: len(bodies(stream.sent)) == 1)
    stream.read(30, DONE)
    await stream.end()
