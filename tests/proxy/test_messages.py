"""Anthropic's Messages API (`POST /v1/messages`) through the sidecar to the mock engine, with the Anthropic SDK: its
events as the engine wrote them, timed as the engine's output, `message_delta`'s usage with `performance`; whole
answers and the engine's errors as it wrote them."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.processes import bearer, wait_until
from tests.proxy.conftest import AUTH, KEY, MODEL, Stack, assert_timed_as_the_engine, samples

PATH = "/v1/messages"
ASKED = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "what time is it"}]}


def _client(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=KEY, max_retries=0, timeout=30)  # X-API-Key


def _direct(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.engine_url, auth_token=stack.engine_key, max_retries=0, timeout=30)


def test_a_streamed_message_is_the_engines_timed_as_its_output_with_performance_in_message_delta(
    stack: Stack,
) -> None:
    before = samples(stack)
    mock = {"ttft_ms": 150, "itl_ms": 20, "tokens": 6}
    headers = {"X-Request-ID": "messages-stream-1"}
    with _client(stack) as client:
        proxied = list(client.messages.create(**ASKED, stream=True, extra_body={"mock": mock}, extra_headers=headers))
    message_id = proxied[0].message.id  # type: ignore[union-attr]
    ending = next(event for event in proxied if event.type == "message_delta")
    performance = ending.usage.model_extra["performance"]  # type: ignore[union-attr]
    # Before the direct request takes the same id, and with it the mock's record of when it wrote each delta.
    assert_timed_as_the_engine(stack, message_id, performance, delay_ms=150)
    engine_id = {"X-Request-ID": message_id.removeprefix("chatcmpl-")}  # the client's, made unique
    assert engine_id["X-Request-ID"].startswith("messages-stream-1-")
    with _direct(stack) as client:
        direct = list(client.messages.create(**ASKED, stream=True, extra_body={"mock": mock}, extra_headers=engine_id))

    assert [event.type for event in proxied] == [event.type for event in direct]
    assert proxied[-1].type == "message_stop"
    # Every event passed through as the engine wrote it; message_delta's usage has the sidecar's performance too.
    assert [event.model_dump() for event in proxied if event is not ending] == [
        event.model_dump() for event in direct if event.type != "message_delta"
    ]
    assert performance["prompt_tokens"] == ending.usage.input_tokens  # type: ignore[union-attr]
    assert performance["completion_tokens"] == ending.usage.output_tokens == 6  # type: ignore[union-attr]
    assert "tokens_estimated" not in performance and performance["model"] == MODEL

    wait_until(lambda: stack.record("messages-stream-1").get("status") == 200, timeout_s=5)
    assert stack.record("messages-stream-1")["performance"] == performance
    labels = (("engine", "mock"), ("model", MODEL), ("route", PATH), ("status", "2xx"))
    assert samples(stack)[("sidecar_requests_total", labels)] == before.get(("sidecar_requests_total", labels), 0) + 1


def test_a_whole_message_is_built_from_the_engines_stream_equal_to_its_own_and_timed(stack: Stack) -> None:
    """Streamed from the engine for its TTFT, answered with the message its events build: the engine's own whole
    answer (vLLM's shape: no null fields), with `usage.performance`."""
    mock = {"ttft_ms": 20, "itl_ms": 5, "tokens": 8}
    headers = AUTH | {"X-Request-ID": "messages-whole-1"}
    response = httpx.post(stack.url + PATH, json=ASKED | {"max_tokens": 5, "mock": mock}, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    performance = answer["usage"].pop("performance")
    assert json.loads(response.headers["x-performance-metrics"]) == performance
    assert_timed_as_the_engine(stack, answer["id"], performance, delay_ms=20)  # before its id is asked again
    to_engine = {"X-Request-ID": answer["id"].removeprefix("chatcmpl-")} | bearer(stack.engine_key)
    direct = httpx.post(stack.engine_url + PATH, json=ASKED | {"max_tokens": 5, "mock": mock}, headers=to_engine)
    assert answer == direct.json() and "stop_sequence" not in answer
    assert answer["stop_reason"] == "max_tokens" and answer["usage"]["output_tokens"] == 5
    assert performance["completion_tokens"] == 5 and performance["prompt_tokens"] == answer["usage"]["input_tokens"]
    assert performance["tpot_ms"] is not None


def test_a_whole_message_with_tools_goes_as_it_is(stack: Stack) -> None:
    """An engine may stream a tool call it refuses unstreamed (vLLM's named tool): the answer must be its own, so
    a request with tools is not streamed from the engine, and its TTFT is not measured."""
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    body = ASKED | {"max_tokens": 5, "tools": tools, "mock": {"tokens": 8}}
    response = httpx.post(stack.url + PATH, json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    performance = answer["usage"].pop("performance")
    assert performance["ttft_ms"] is None and performance["total_ms"] > 0 and performance["completion_tokens"] == 5
    assert answer["type"] == "message" and answer["usage"]["output_tokens"] == 5


def test_the_engines_error_goes_back_in_its_own_shape_which_the_sdk_reads(stack: Stack) -> None:
    with _client(stack) as client, pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' must be a positive integer"},
    }
    request_id = raised.value.response.headers["x-request-id"]
    wait_until(lambda: stack.record(request_id).get("status") == 400, timeout_s=5)


def test_an_engine_gone_mid_stream_is_an_error_the_sdk_raises(stack: Stack) -> None:
    """The stream's status went out: the error event that ends it is Anthropic's, which the SDK raises (an event
    in the OpenAI shape it would pass over, and the client would take the cut answer for a whole one)."""
    mock = {"ttft_ms": 0, "itl_ms": 5, "tokens": 10, "drop_after": 3}
    headers = {"X-Request-ID": "messages-dropped-1"}
    texts = []
    with _client(stack) as client, pytest.raises(anthropic.APIStatusError, match="mid-answer"):
        for event in client.messages.create(**ASKED, stream=True, extra_body={"mock": mock}, extra_headers=headers):
            if event.type == "content_block_delta":
                texts.append(event.delta.text)  # type: ignore[union-attr]
    assert len(texts) == 3
    wait_until(lambda: stack.record("messages-dropped-1").get("error") == "engine_error", timeout_s=5)


def test_a_bad_stream_field_is_the_clients_400_before_the_engine(stack: Stack) -> None:
    started = stack.engine_stats()["started"]
    response = httpx.post(stack.url + PATH, json=ASKED | {"stream": "yes"}, headers=AUTH, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"
    assert stack.engine_stats()["started"] == started


def test_claude_codes_messages_with_their_beta_query_are_measured_too(stack: Stack) -> None:
    """Claude Code posts to `/v1/messages?beta=true`: the same route, the query passed on to the engine."""
    with _client(stack) as client:
        asked = ASKED | {"extra_body": {"mock": {"tokens": 3}}, "extra_query": {"beta": "true"}}
        events = list(client.messages.create(**asked, stream=True))
    ending = next(event for event in events if event.type == "message_delta")
    performance = ending.usage.model_extra["performance"]  # type: ignore[union-attr]
    assert performance["completion_tokens"] == 3 and performance["ttft_ms"] > 0
