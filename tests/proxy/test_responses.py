"""The Responses API (`POST /v1/responses`) through the sidecar to the mock engine, with the OpenAI SDK: its events
as the engine wrote them, timed as the engine's output, the final event's usage with `usage.performance`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.processes import bearer, wait_until
from tests.proxy.conftest import AUTH, MODEL, Stack, assert_timed_as_the_engine, samples

RESPONSES = "/v1/responses"


def _timeless(event: str) -> str:
    """Two answers to the same request differ only in `created_at` (the clock's second)."""
    return re.sub(r'"created_at":\s*\d+', '"created_at":0', event)


def test_a_streamed_response_is_the_engines_timed_as_its_output_with_performance_at_its_end(stack: Stack) -> None:
    mock = {"ttft_ms": 150, "itl_ms": 20, "tokens": 6}
    request = {"model": MODEL, "input": "what time is it", "stream": True, "extra_body": {"mock": mock}}
    headers = {"X-Request-ID": "responses-stream-1"}
    proxied = list(stack.client().responses.create(**request, extra_headers=headers))  # type: ignore[call-overload]
    performance = proxied[-1].response.usage.model_extra["performance"]
    # Before the direct request takes the same id, and with it the mock's record of when it wrote each delta.
    assert_timed_as_the_engine(stack, proxied[-1].response.id, performance, delay_ms=150)
    engine_id = {"X-Request-ID": proxied[-1].response.id.removeprefix("resp_")}  # the client's, made unique
    assert engine_id["X-Request-ID"].startswith("responses-stream-1-")
    direct = list(stack.direct().responses.create(**request, extra_headers=engine_id))  # type: ignore[call-overload]

    assert [event.type for event in proxied] == [event.type for event in direct]
    assert proxied[-1].type == "response.completed"
    deltas = [event.delta for event in proxied if event.type == "response.output_text.delta"]
    assert len(deltas) == 6 and "".join(deltas) == proxied[-1].response.output_text
    usage = proxied[-1].response.usage
    assert performance["prompt_tokens"] == usage.input_tokens and performance["completion_tokens"] == 6
    assert "tokens_estimated" not in performance and performance["model"] == MODEL
    assert "performance" not in direct[-1].response.usage.model_extra  # the sidecar's, not the engine's
    # Every event but the last passed through as the engine wrote it.
    for mine, its in zip(proxied[:-1], direct[:-1], strict=True):
        assert _timeless(mine.model_dump_json()) == _timeless(its.model_dump_json())

    wait_until(lambda: stack.record("responses-stream-1").get("status") == 200, timeout_s=5)
    assert stack.record("responses-stream-1")["performance"] == performance


def _whole(stack: Stack, request_id: str, **body: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A non-streamed response through the sidecar, its `usage.performance` taken out, and the engine's own answer
    to the same request (its ids the same: the engine's request id is, the client's made unique)."""
    request = {"model": MODEL, "input": [{"role": "user", "content": "hello"}], **body}
    headers = {"X-Request-ID": request_id}
    response = httpx.post(stack.url + RESPONSES, json=request, headers=AUTH | headers, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    performance = answer["usage"].pop("performance")
    assert json.loads(response.headers["x-performance-metrics"]) == performance
    engine_id = {"X-Request-ID": answer["id"].removeprefix("resp_")}
    assert engine_id["X-Request-ID"].startswith(f"{request_id}-")
    to_engine = engine_id | bearer(stack.engine_key)
    direct = httpx.post(stack.engine_url + RESPONSES, json=request, headers=to_engine, timeout=30).json()
    return answer, performance, direct


def test_a_whole_response_is_the_engines_own_timed_from_its_stream(stack: Stack) -> None:
    """Streamed from the engine for its TTFT, answered with the response its last event carries: the engine's own
    answer to the request without streaming, with `usage.performance` and the X-Performance-Metrics header."""
    before = samples(stack)
    mock = {"ttft_ms": 120, "itl_ms": 10, "tokens": 8}
    answer, performance, direct = _whole(stack, "responses-whole-1", max_output_tokens=4, mock=mock)
    assert answer | {"created_at": 0} == direct | {"created_at": 0}
    assert answer["status"] == "incomplete"  # cut at max_output_tokens
    assert performance["completion_tokens"] == answer["usage"]["output_tokens"] == 4
    assert performance["prompt_tokens"] == answer["usage"]["input_tokens"]
    assert_timed_as_the_engine(stack, answer["id"], performance, delay_ms=120)
    after = samples(stack)
    labels = (("engine", "mock"), ("model", MODEL), ("route", RESPONSES), ("status", "2xx"))
    assert after[("sidecar_requests_total", labels)] == before.get(("sidecar_requests_total", labels), 0) + 1


def test_without_assembly_a_whole_response_is_passed_on_with_its_latency_only(
    own_stack: Callable[..., Stack],
) -> None:
    stack = own_stack(env={"SIDECAR_ASSEMBLE_NON_STREAMING": "false"})
    answer, performance, direct = _whole(stack, "responses-whole-2")
    assert answer | {"created_at": 0} == direct | {"created_at": 0}
    assert performance["ttft_ms"] is None and performance["latency_ms"] > 0
    assert performance["completion_tokens"] == answer["usage"]["output_tokens"]


def test_a_background_response_is_answered_queued_at_once_as_the_engine_answers_it(stack: Stack) -> None:
    """`background: true` without streaming: the engine answers at once with the response queued, for the client
    to poll; the sidecar passes that on rather than stream the request and hold the client to the answer's end."""
    mock = {"ttft_ms": 3000, "tokens": 4}  # streamed, the answer would take 3 s
    answer, performance, direct = _whole(stack, "responses-background-1", background=True, store=True, mock=mock)
    assert answer.pop("usage") == {} and direct.pop("usage") is None  # none yet: only the sidecar's performance
    assert answer["status"] == "queued" and answer | {"created_at": 0} == direct | {"created_at": 0}
    assert performance["total_ms"] < 1000 and performance["ttft_ms"] is None


def test_a_client_leaving_a_streamed_response_cancels_the_engines_request(stack: Stack) -> None:
    before = stack.engine_stats()["cancelled"]
    body = {"model": MODEL, "input": "go on", "stream": True, "mock": {"ttft_ms": 0, "itl_ms": 50, "tokens": 400}}
    headers = AUTH | {"X-Request-ID": "responses-leaving-1"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", stack.url + RESPONSES, json=body, headers=headers) as response,
    ):
        for count, _ in enumerate(response.iter_lines()):
            if count == 20:
                break  # leaves with about 20 seconds of deltas still to come
    wait_until(lambda: stack.engine_stats()["cancelled"] == before + 1, timeout_s=2)
    wait_until(lambda: stack.record("responses-leaving-1").get("client_disconnected") is True, timeout_s=2)


@pytest.mark.parametrize("body", [{"input": "x", "stream": "yes"}, {"input": "x", "stream_options": 3}])
def test_a_bad_field_is_the_clients_400_before_the_engine(stack: Stack, body: dict[str, Any]) -> None:
    started = stack.engine_stats()["started"]
    response = httpx.post(stack.url + RESPONSES, json={"model": MODEL, **body}, headers=AUTH, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] in ("stream", "stream_options")
    assert stack.engine_stats()["started"] == started
