"""Anthropic's Messages API stream relay (`MessagesRelay`) on its own: a scripted engine response, the client's `send`
recorded and a clock the test moves (test_relay.py's), so that what it writes and what it measures are checked
exactly. The end-to-end stream, with the Anthropic SDK, is in test_messages.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.dataplane import relay as relay_module
from sidecar.dataplane.chunks import is_message_output
from sidecar.dataplane.exchange import Exchange
from sidecar.dataplane.messages import MessageAssembler
from sidecar.dataplane.upstream_errors import Disconnected
from sidecar.telemetry.otel_attributes import finish_reasons
from tests.proxy.test_relay import Clock, ScriptedResponse, bodies, proxy_and_exchange, relayed

Reads = list[tuple[float, bytes | Exception]]


def event(kind: str, **fields: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **fields}).encode())


def delta(kind: str = "text_delta", **fields: Any) -> bytes:
    return event("content_block_delta", index=0, delta={"type": kind, **fields})


def text(piece: str) -> bytes:
    return delta(text=piece)


START = event(
    "message_start",
    message={"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m", "stop_reason": None,
             "usage": {"input_tokens": 7, "output_tokens": 0}},
)  # fmt: skip
BLOCK = event("content_block_start", index=0, content_block={"type": "text", "text": ""})
BLOCK_STOP = event("content_block_stop", index=0)
STOP = event("message_stop")


def ending(**usage: Any) -> bytes:
    return event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage=usage)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(relay_module.time, "perf_counter_ns", fake)  # the time module: every relay's clock
    return fake


async def relay(clock: Clock, reads: Reads) -> tuple[list[dict[str, Any]], Exchange]:
    return await relayed(clock, reads, "/v1/messages", lambda proxy: proxy.messages_relay.stream)


async def test_events_go_out_as_written_timed_on_the_deltas_and_message_delta_carries_performance(
    clock: Clock,
) -> None:
    reads: Reads = [
        (1, START + BLOCK),
        (20, text("Hel")),
        (25, text("lo")[:40]),  # an event cut between reads
        (26, text("lo")[40:] + text("!")),
        (40, BLOCK_STOP + ending(output_tokens=3) + STOP),
    ]
    sent, exchange = await relay(clock, reads)

    written = bodies(sent)
    assert sent[0]["status"] == 200
    assert written[:3] == [START + BLOCK, text("Hel"), text("lo") + text("!")]  # a read with no whole event: none
    head, named, rest = written[3].partition(b"event: message_delta\ndata: ")
    assert head == BLOCK_STOP and rest.endswith(b"\n\n" + STOP)
    final = json.loads(rest.split(b"\n\n", 1)[0])
    performance = final["usage"].pop("performance")
    assert final == json.loads(ending(output_tokens=3).split(b"data: ", 1)[1])  # else as the engine wrote it
    assert written[4:] == [b""]  # the end of the engine's body ends the client's: there is no [DONE]
    assert performance == exchange.performance
    assert (performance["ttft_ms"], performance["latency_ms"], performance["total_ms"]) == (20.0, 26.0, 40.0)
    assert performance["itl_ms"] == {"p50": 6.0, "p90": 6.0, "p99": 6.0, "max": 6.0}
    # The prompt's count from message_start, the output's from message_delta.
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (7, 3)
    assert "tokens_estimated" not in performance
    assert [finish_reasons(event) for event in exchange.final_events if isinstance(event, dict)] == [[], ["end_turn"]]


async def test_the_prompt_counts_its_cached_tokens_which_the_messages_api_counts_apart(clock: Clock) -> None:
    cached = {"output_tokens": 2, "input_tokens": 3, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 5}
    reads: Reads = [(1, START), (10, text("a")), (12, text("b")), (20, ending(**cached))]
    _, exchange = await relay(clock, reads)
    assert exchange.performance is not None
    assert (exchange.performance["prompt_tokens"], exchange.performance["completion_tokens"]) == (48, 2)


@pytest.mark.parametrize(
    ("data", "output"),
    [
        (text("Hi"), True),
        (text(""), False),
        (delta("thinking_delta", thinking="so"), True),
        (delta("input_json_delta", partial_json='{"city": '), True),
        (delta("input_json_delta", partial_json=""), False),
        (delta("signature_delta", signature="abc"), False),  # a thinking block's signature: not generated text
        (event("content_block_start", index=1, content_block={"type": "tool_use", "id": "t", "name": "f"}), True),
        (BLOCK, False),
        (START, False),
        (ending(output_tokens=3), False),
        (event("ping"), False),
    ],
)
def test_output_is_a_non_empty_delta_or_a_tool_calls_start(data: bytes, output: bool) -> None:
    assert is_message_output(data.split(b"data: ", 1)[1].strip()) is output


async def test_without_usage_the_output_events_are_counted(clock: Clock) -> None:
    reads: Reads = [(10, text("a")), (12, text("b") + text("c")), (20, STOP)]
    sent, exchange = await relay(clock, reads)
    assert bodies(sent) == [text("a"), text("b") + text("c"), STOP, b""]
    assert exchange.performance is None  # measured as the exchange ends (`Proxy._exchange_admitted`)


async def test_an_engine_gone_mid_stream_ends_it_with_anthropics_error_event(clock: Clock) -> None:
    reads: Reads = [(1, START), (10, text("Hi")), (20, Disconnected("reset"))]
    sent, exchange = await relay(clock, reads)
    written = bodies(sent)
    assert written[:2] == [START, text("Hi")]
    name, data = written[-1].removesuffix(b"\n\n").split(b"\n")
    assert name == b"event: error"  # what the Anthropic SDK raises; it passes over an event without a name
    assert json.loads(data.removeprefix(b"data: ")) == {
        "type": "error",
        "error": {"type": "api_error", "message": "the engine closed the stream mid-answer"},
    }
    assert exchange.error == "engine_error"


def test_a_message_is_built_from_its_events_as_the_anthropic_sdk_builds_it() -> None:
    """Each block from its start with its deltas: text, thinking and its signature, a tool's input from its JSON
    fragments; the stop reason and the output's usage from `message_delta`; `ping` and `message_stop` add nothing."""
    message = MessageAssembler()
    thinking = {"type": "thinking", "thinking": "", "signature": ""}
    tool = {"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}
    for data in [
        START,
        event("content_block_start", index=0, content_block=thinking),
        delta("thinking_delta", thinking="Let me "),
        delta("thinking_delta", thinking="see."),
        delta("signature_delta", signature="sig"),
        event("content_block_stop", index=0),
        event("ping"),
        event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=1, delta={"type": "text_delta", "text": "It is "}),
        event("content_block_delta", index=1, delta={"type": "text_delta", "text": "noon."}),
        event("content_block_start", index=2, content_block=tool),
        event("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": '{"city": "Os'}),
        event("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": 'lo"}'}),
        event("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 9}),
        STOP,
    ]:
        message.add(json.loads(data.split(b"data: ", 1)[1]))
    assert message.error is None
    assert message.result() == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Let me see.", "signature": "sig"},
            {"type": "text", "text": "It is noon."},
            {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"city": "Oslo"}},
        ],
        "model": "m",
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 7, "output_tokens": 9},
        "stop_sequence": None,
    }


async def assembled(clock: Clock, reads: Reads) -> tuple[list[dict[str, Any]], Exchange]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    proxy, exchange = proxy_and_exchange(clock, "/v1/messages", send)
    exchange.engine.adapter.whole_message = "omit_nulls"  # vLLM's
    try:
        await proxy.messages_relay.assembled(exchange, ScriptedResponse(clock, exchange.meter.start_ns, reads))
    finally:
        exchange.deadline.close()
        proxy.close()
    return sent, exchange


async def test_a_whole_message_is_timed_on_its_stream_and_written_as_vllm_writes_one(clock: Clock) -> None:
    reads: Reads = [(1, START + BLOCK), (20, text("Hel")), (26, text("lo")), (40, ending(output_tokens=2) + STOP)]
    sent, exchange = await assembled(clock, reads)
    assert sent[0]["status"] == 200 and (b"content-type", b"application/json") in sent[0]["headers"]
    answer = json.loads(bodies(sent)[0])
    performance = answer["usage"].pop("performance")
    assert answer == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello"}],
        "model": "m",
        "stop_reason": "end_turn",  # its null stop_sequence left out, as vLLM leaves nulls out of a whole answer
        "usage": {"input_tokens": 7, "output_tokens": 2},
    }
    assert (performance["ttft_ms"], performance["latency_ms"], performance["completion_tokens"]) == (20.0, 26.0, 2)
    assert performance == exchange.performance


async def test_a_stream_that_fails_is_answered_with_its_error(clock: Clock) -> None:
    failed = event("error", error={"type": "overloaded_error", "message": "busy"})
    sent, exchange = await assembled(clock, [(1, START + BLOCK), (10, text("Hi")), (20, failed)])
    assert sent[0]["status"] == 500 == exchange.status
    assert json.loads(bodies(sent)[0]) == json.loads(failed.split(b"data: ", 1)[1])
