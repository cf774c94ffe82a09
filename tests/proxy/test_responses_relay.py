"""The Responses API's stream relay (`ResponsesRelay`) on its own: a scripted engine response, the client's `send`
recorded and a clock the test moves (test_relay.py's), so that what it writes and what it measures are checked
exactly. The end-to-end stream is in test_responses.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.dataplane import relay as relay_module
from sidecar.dataplane.exchange import Exchange
from sidecar.dataplane.upstream_errors import Disconnected
from sidecar.errors import BadGateway
from tests.proxy.test_relay import Clock, bodies, relayed

USAGE = {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}


def event(kind: str, **fields: Any) -> bytes:
    payload = {"type": f"response.{kind}", **fields}
    return b"event: response.%s\ndata: %s\n\n" % (kind.encode(), json.dumps(payload).encode())


def delta(text: str) -> bytes:
    return event("output_text.delta", item_id="m", output_index=0, content_index=0, delta=text)


COMPLETED = event("completed", response={"id": "resp_1", "status": "completed", "usage": USAGE})


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(relay_module.time, "perf_counter_ns", fake)  # the time module: every relay's clock
    return fake


async def relay(clock: Clock, reads: list[tuple[float, bytes | Exception]]) -> tuple[list[dict[str, Any]], Exchange]:
    return await relayed(clock, reads, "/v1/responses", lambda proxy: proxy.responses_relay.stream)


async def test_events_go_out_a_read_at_a_time_as_written_and_the_last_carries_performance(clock: Clock) -> None:
    created = event("created", response={"id": "resp_1", "status": "in_progress", "usage": None})
    done = event("output_text.done", item_id="m", output_index=0, content_index=0, text="Hello!")
    reads: list[tuple[float, bytes | Exception]] = [
        (1, created),
        (20, delta("Hel")),
        (25, delta("lo")[:30]),  # an event cut between reads
        (26, delta("lo")[30:] + delta("!")),
        (40, done + COMPLETED),
    ]
    sent, exchange = await relay(clock, reads)

    written = bodies(sent)
    assert written[:3] == [created, delta("Hel"), delta("lo") + delta("!")]  # a read with no whole event: no write
    assert written[3].startswith(done + b"event: response.completed\ndata: ")
    assert written[4:] == [b""]  # the end of the engine's body ends the client's: there is no [DONE]
    final = json.loads(written[3][len(done) :].split(b"data: ", 1)[1])
    performance = final["response"]["usage"].pop("performance")
    assert final["response"]["usage"] == USAGE
    assert performance == exchange.performance
    assert (performance["ttft_ms"], performance["latency_ms"], performance["total_ms"]) == (20.0, 26.0, 40.0)
    assert performance["itl_ms"] == {"p50": 6.0, "p90": 6.0, "p99": 6.0, "max": 6.0}
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (5, 3)
    assert "tokens_estimated" not in performance


async def test_the_text_done_event_and_the_final_response_are_not_output(clock: Clock) -> None:
    done = event("output_text.done", item_id="m", output_index=0, content_index=0, text="Hi")
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi")), (30, done), (50, COMPLETED)]
    _, exchange = await relay(clock, reads)
    assert exchange.performance is not None
    assert exchange.performance["latency_ms"] == 10.0 and exchange.performance["total_ms"] == 50.0


async def test_an_engine_gone_mid_stream_ends_it_with_an_error_event(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi")), (20, Disconnected("reset"))]
    sent, exchange = await relay(clock, reads)
    written = bodies(sent)
    assert written[0] == delta("Hi")
    error = json.loads(written[-1].split(b"\n\n")[0].removeprefix(b"data: "))
    assert error["error"]["code"] == "engine_error" and exchange.error == "engine_error"
    assert written[-1].endswith(b"data: [DONE]\n\n")  # what the OpenAI SDK stops at, after raising the error


async def test_a_whole_response_is_the_one_the_last_event_carries_timed_on_the_deltas(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi")), (14, delta("!")), (30, COMPLETED)]
    sent, exchange = await relayed(clock, reads, "/v1/responses", lambda proxy: proxy.responses_relay.assembled)
    head, [body] = sent[0], bodies(sent)
    answer = json.loads(body)
    performance = answer["usage"].pop("performance")
    assert answer == {"id": "resp_1", "status": "completed", "usage": USAGE}
    assert (performance["ttft_ms"], performance["latency_ms"], performance["total_ms"]) == (10.0, 14.0, 30.0)
    assert (b"x-performance-metrics", json.dumps(performance, separators=(",", ":")).encode()) in head["headers"]
    assert (b"content-type", b"application/json") in head["headers"]
    assert exchange.performance == performance


async def test_a_stream_that_ends_without_its_response_is_a_502(clock: Clock) -> None:
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi"))]
    with pytest.raises(BadGateway, match="ended before its response did"):
        await relayed(clock, reads, "/v1/responses", lambda proxy: proxy.responses_relay.assembled)


async def test_a_failed_response_without_usage_is_the_whole_answer_with_its_error(clock: Clock) -> None:
    """`response.failed` ends the response as `completed` does, usage or not: the client gets what it carries."""
    failed = {"id": "resp_1", "status": "failed", "usage": None, "error": {"code": "server_error", "message": "OOM"}}
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi")), (30, event("failed", response=failed))]
    sent, exchange = await relayed(clock, reads, "/v1/responses", lambda proxy: proxy.responses_relay.assembled)
    answer = json.loads(bodies(sent)[0])
    performance = answer["usage"].pop("performance")
    assert answer == failed | {"usage": {}}
    assert performance["ttft_ms"] == 10.0 and performance["total_ms"] == 30.0
    assert sent[0]["status"] == 200 and exchange.performance == performance


@pytest.mark.parametrize(
    ("error_event", "status", "expected"),
    [
        (  # the Responses API's error event: its code is a string, the status 500
            b'event: error\ndata: {"type":"error","code":"server_error","message":"out of memory","param":null,'
            b'"sequence_number":3}\n\n',
            500,
            {"message": "out of memory", "type": "server_error", "param": None, "code": "server_error"},
        ),
        (  # the chat API's, as vLLM fails a chat stream: the status in its code
            b'data: {"error":{"message":"busy","type":"ServiceUnavailableError","param":null,"code":503}}\n\n',
            503,
            {"message": "busy", "type": "ServiceUnavailableError", "param": None, "code": None},
        ),
    ],
)
async def test_a_stream_that_fails_with_an_error_event_is_answered_with_that_error(
    clock: Clock, error_event: bytes, status: int, expected: dict[str, Any]
) -> None:
    """No response came, the engine said why: the client gets its error, as a failed non-streaming request does,
    not a 502 that hides the engine's message."""
    reads: list[tuple[float, bytes | Exception]] = [(10, delta("Hi")), (20, error_event)]
    sent, exchange = await relayed(clock, reads, "/v1/responses", lambda proxy: proxy.responses_relay.assembled)
    assert sent[0]["status"] == status and exchange.status == status
    assert json.loads(bodies(sent)[0]) == {"error": expected}
    assert (b"content-type", b"application/json") in sent[0]["headers"]
