"""The relay loop of the APIs whose streams are named events ended by the engine's body, not by `[DONE]`: the
Responses API (`responses.py`) and Anthropic's Messages API (`messages.py`). Each says what an event is to it
(`take`): whether it is output, what it carries, and the bytes the client gets for it."""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.dataplane.answers import stream_cut
from sidecar.dataplane.exchange import Exchange
from sidecar.dataplane.sse import EventTooLarge, SSEParser
from sidecar.dataplane.upstream import Response
from sidecar.dataplane.upstream_errors import UpstreamError
from sidecar.errors import SidecarError

# An event's data, its bytes as the engine wrote them and the time of its read -> the bytes for the client.
Take = Callable[[bytes, bytes, int], bytes]


async def pump_events(
    exchange: Exchange, response: Response, limit: int, take: Take, forward: bool
) -> SidecarError | None:
    """Read the engine's events to the end of its body, each given to `take` at its read's time; with `forward`,
    what each read brings goes to the client at once, in one write. None when the body ended, else the error that
    cut it short (the exchange's deadline, the engine's connection, an event past `limit` bytes)."""
    meter = exchange.meter
    send = exchange.send
    clock = time.perf_counter_ns
    parser = SSEParser(limit)
    read = response.readany
    deadline = exchange.deadline
    try:
        with deadline:
            while True:
                chunk = await read()
                deadline.read_ns = now = clock()
                out: list[bytes] = []
                for event in parser.feed(chunk) if chunk else parser.close():
                    data = event.data
                    out.append(event.raw if data is None else take(data, event.raw, now))
                if forward and out and not exchange.client_done:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                meter.overhead_ns += clock() - now
                if not chunk:
                    return None
    except (TimeoutError, UpstreamError, EventTooLarge) as exc:
        return stream_cut(exchange, exc, limit)
