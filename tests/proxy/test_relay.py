"""The stream relay (`Relays.stream` and its read loop, `_pump`) on its own: a scripted engine response, the
client's `send` recorded, and a clock the test moves, so that what the relay writes and what it measures are
checked exactly. The end-to-end streams are in test_streaming.py."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar import request_state
from sidecar.dataplane import relay as relay_module
from sidecar.dataplane.admission import Admission
from sidecar.dataplane.exchange import Deadline, Exchange
from sidecar.dataplane.performance import PerformanceMeter
from sidecar.dataplane.proxy import Proxy
from sidecar.dataplane.upstream_errors import Disconnected
from sidecar.settings import load_settings
from sidecar.telemetry.gpu import Gpus
from sidecar.telemetry.history import RequestHistory
from sidecar.telemetry.service import Telemetry

MS = 1_000_000  # nanoseconds


class Clock:
    """perf_counter_ns as the relay reads it: moved by the test, one read of the engine at a time."""

    def __init__(self) -> None:
        self.now_ns = 1_000 * MS

    def __call__(self) -> int:
        return self.now_ns


class ScriptedResponse:
    """The engine's streamed answer: each `readany` gives the next read's bytes at its time (ms after admission),
    then b"" (the end), or raises what the script says."""

    status = 200
    raw_headers = [(b"content-type", b"text/event-stream")]

    def __init__(self, clock: Clock, start_ns: int, reads: list[tuple[float, bytes | Exception]]) -> None:
        self._clock, self._start_ns, self._reads = clock, start_ns, list(reads)

    def headers(self) -> Iterator[tuple[str, str]]:
        return iter([("content-type", "text/event-stream")])

    @property
    def complete(self) -> bool:
        """Whether every read of the script has been given: the body's end is all that is left."""
        return not self._reads

    def hand_reads_to(self, handler: Callable[[bytes], bool] | None) -> None:
        """Every read of the script comes through `readany`: the reads handed over as they arrive are
        test_first_token's."""

    async def readany(self) -> bytes:
        if not self._reads:
            return b""
        at_ms, data = self._reads.pop(0)
        self._clock.now_ns = self._start_ns + int(at_ms * MS)
        if isinstance(data, Exception):
            raise data
        return data


def chunk(content: str | None = None, usage: dict[str, int] | None = None, role: bool = False) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": content}
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": None}]
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(relay_module.time, "perf_counter_ns", fake)
    return fake


async def relay(clock: Clock, reads: list[tuple[float, bytes | Exception]], client_usage: bool) -> tuple[list, Any]:
    """The reads through a real Proxy's stream relay: the messages the client was sent, and the exchange."""
    return await relayed(clock, reads, "/v1/chat/completions", lambda proxy: proxy.relays.stream, client_usage)


async def relayed(
    clock: Clock,
    reads: list[tuple[float, bytes | Exception]],
    path: str,
    mode: Callable[[Proxy], Callable[..., Awaitable[None]]],
    client_usage: bool = False,
) -> tuple[list, Any]:
    """The reads through one of a real Proxy's relay modes, for a request to `path`."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    proxy, exchange = proxy_and_exchange(clock, path, send, client_usage)
    try:
        await mode(proxy)(exchange, ScriptedResponse(clock, exchange.meter.start_ns, reads))
    finally:
        exchange.deadline.close()
        proxy.close()
    return sent, exchange


def proxy_and_exchange(
    clock: Clock, path: str, send: Callable[[dict[str, Any]], Awaitable[None]], client_usage: bool = False
) -> tuple[Proxy, Exchange]:
    """A real Proxy, and an exchange for a request to `path` admitted now, whose client's messages go to `send`."""
    settings = load_settings(None)
    telemetry = Telemetry(settings, Gpus(nvml=None), lambda: None, None)
    proxy = Proxy(settings, SimpleNamespace(), RequestHistory(8), telemetry, Admission(8, 8, 5.0))
    engine = SimpleNamespace(adapter=SimpleNamespace(name="vllm"), served_model="m")
    meter = PerformanceMeter(clock.now_ns)
    scope: dict[str, Any] = {"type": "http", "path": path, "state": {}}
    deadline = Deadline(meter, 60.0, 60.0, request_state.of(scope))
    exchange = Exchange(scope, send, engine, meter, deadline, client_usage=client_usage)  # type: ignore[arg-type]
    return proxy, exchange


def bodies(sent: list[dict[str, Any]]) -> list[bytes]:
    return [message["body"] for message in sent if message["type"] == "http.response.body"]


async def test_each_read_goes_out_as_one_write_as_the_engine_wrote_it_and_done_ends_the_body(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [
        (1, chunk(role=True)),
        (20, chunk("Hel")),
        (25, chunk("lo") + chunk("!")),  # two events in one read: one write
        (30, chunk(usage=USAGE) + DONE),
    ]
    sent, exchange = await relay(clock, reads, client_usage=False)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    out = bodies(sent)
    # The usage chunk only the sidecar asked for is gone; [DONE] and the end of the body go in one message.
    assert out == [chunk(role=True), chunk("Hel"), chunk("lo") + chunk("!"), DONE]
    assert [message.get("more_body") for message in sent[1:]] == [True, True, True, False]
    assert exchange.client_done and exchange.error is None


async def test_what_is_measured_is_the_time_of_each_read(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [
        (1, chunk(role=True)),  # no output: not the first token
        (20, chunk("Hel")),
        (25, chunk("lo") + chunk("!")),  # the second event shares the read's time: coalesced, no gap
        (32, chunk(usage=USAGE) + DONE),
    ]
    _, exchange = await relay(clock, reads, client_usage=True)
    performance = exchange.performance
    assert performance["ttft_ms"] == 20.0 and performance["latency_ms"] == 25.0
    assert performance["itl_ms"] == {"p50": 5.0, "p90": 5.0, "p99": 5.0, "max": 5.0}
    assert performance["coalesced_events"] == 1
    assert performance["completion_tokens"] == 3 and performance["prompt_tokens"] == 5
    assert performance["tpot_ms"] == 2.5  # (25 - 20) / (3 - 1)


async def test_the_usage_chunk_the_client_asked_for_carries_the_performance(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [(20, chunk("Hi")), (30, chunk(usage=USAGE)), (31, DONE)]
    sent, exchange = await relay(clock, reads, client_usage=True)
    out = bodies(sent)
    assert out[0] == chunk("Hi") and out[-1] == DONE
    usage_event = json.loads(out[1].removeprefix(b"data: "))
    assert usage_event["usage"]["completion_tokens"] == 3
    assert usage_event["usage"]["performance"] == exchange.performance
    assert usage_event["usage"]["performance"]["ttft_ms"] == 20.0


async def test_an_engine_gone_mid_stream_ends_the_stream_with_an_error_event(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [(20, chunk("Hi")), (25, Disconnected("the engine closed"))]
    sent, exchange = await relay(clock, reads, client_usage=False)
    out = bodies(sent)
    assert out[0] == chunk("Hi")
    error = json.loads(out[1].split(b"\n\n")[0].removeprefix(b"data: "))
    assert error["error"]["message"] == "the engine closed the stream mid-answer"
    assert out[1].endswith(DONE) and sent[-1].get("more_body", False) is False
    assert exchange.error == error["error"]["code"]


async def test_an_event_split_over_two_reads_goes_out_whole_once_complete(clock: Clock) -> None:
    whole = chunk("Hello")
    reads: list[tuple[float, bytes | Exception]] = [(20, whole[:10]), (22, whole[10:]), (30, DONE)]
    sent, exchange = await relay(clock, reads, client_usage=False)
    assert bodies(sent) == [whole, DONE]
    meter = exchange.meter  # the output arrived with the read that completed it
    assert (meter.first_output_ns - meter.start_ns) / MS == 22.0
