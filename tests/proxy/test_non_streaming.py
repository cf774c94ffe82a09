"""Non-streaming requests: assembled from the engine's stream, equal to the engine's own non-streaming answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.processes import bearer, wait_until
from tests.proxy.conftest import AUTH, KEY, MESSAGES, MODEL, Stack, assert_timed_as_the_engine, normalized

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"messages": MESSAGES}),
    "chat-logprobs": ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
    "chat-tool-call": ("/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS}),
    "chat-n2-length": ("/v1/chat/completions", {"messages": MESSAGES, "n": 2, "max_tokens": 5}),
    "completion-logprobs": ("/v1/completions", {"prompt": "count the clocks", "logprobs": 3}),
    "completion-n2": ("/v1/completions", {"prompt": ["count", "the clocks"], "n": 2}),
}


def _post(url: str, body: dict[str, Any], request_id: str, key: str = KEY) -> httpx.Response:
    headers = {"X-Request-ID": request_id} | bearer(key)
    response = httpx.post(url, json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("case", CASES)
def test_assembled_answer_equals_the_engines_own(stack: Stack, case: str) -> None:
    path, fields = CASES[case]
    body = {"model": MODEL} | fields
    through = _post(stack.url + path, body, f"assembled-{case}")
    answer = json.loads(normalized(through.content))
    engine_id = answer["id"].split("-", 1)[1]  # what the engine was given: the client's id, made unique
    assert engine_id.startswith(f"assembled-{case}-")
    direct = _post(stack.engine_url + path, body, engine_id, key=stack.engine_key)
    performance = answer["usage"].pop("performance")
    assert answer == json.loads(normalized(direct.content))
    assert json.loads(through.headers["X-Performance-Metrics"]) == performance
    assert performance["ttft_ms"] is not None  # measured: the engine was asked to stream
    assert performance["completion_tokens"] == answer["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("case", "asked", "refused"),
    [
        ("chat", {"prompt_logprobs": 1}, "`prompt_logprobs` are not available"),
        ("completion-logprobs", {"prompt_logprobs": 1}, "`prompt_logprobs` are not available"),
        ("completion-logprobs", {"use_beam_search": True}, "not currently supported with beam search"),
        ("chat", {"kv_transfer_params": {"do_remote_decode": True}}, None),  # a prefill of disaggregated serving
        ("completion-logprobs", {"prompt_logprobs": 0}, None),  # each prompt token's own logprob: vLLM streams it
    ],
)
def test_what_only_a_whole_answer_has_goes_to_the_engine_unstreamed(
    stack: Stack, case: str, asked: dict[str, Any], refused: str | None
) -> None:
    """vLLM answers `prompt_logprobs`, and a completion's beam search, only without streaming (streamed, the
    request is its 400, or with `prompt_logprobs` 0 a stream without them), and a prefill's `kv_transfer_params`
    only in a whole answer: such a request goes as it is, and the answer is the engine's own, measured but for a
    TTFT."""
    path, fields = CASES[case]
    body = {"model": MODEL} | asked | fields
    streamed = httpx.post(stack.engine_url + path, json=body | {"stream": True}, headers=bearer(stack.engine_key))
    if refused is not None:
        assert streamed.status_code == 400 and refused in streamed.text  # why it cannot be assembled
    else:
        assert next(iter(asked)) not in streamed.text  # what an assembled answer could not have
    through = _post(stack.url + path, body, f"whole-only-{case}")
    answer = json.loads(normalized(through.content))
    direct = _post(stack.engine_url + path, body, answer["id"].split("-", 1)[1], key=stack.engine_key)
    performance = answer["usage"].pop("performance")
    assert answer == json.loads(normalized(direct.content))
    if "prompt_logprobs" in asked:
        assert (answer if case == "chat" else answer["choices"][0])["prompt_logprobs"][0] is None  # vLLM's shape
    if "kv_transfer_params" in asked:
        assert answer["kv_transfer_params"]["remote_engine_id"] == "mock"
    assert performance["ttft_ms"] is None and performance["latency_ms"] > 0


def test_stream_options_without_stream_are_the_engines_to_refuse(stack: Stack) -> None:
    """OpenAI and vLLM refuse `stream_options` on a request that does not stream: the sidecar, which would stream
    it for assembly, sends it as it is, and the engine's 400 is the answer."""
    body = {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}}
    direct = httpx.post(stack.engine_url + "/v1/chat/completions", json=body, headers=bearer(stack.engine_key))
    through = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert through.status_code == direct.status_code == 400
    assert through.json()["error"]["message"] == direct.json()["message"]  # the mock's errors are vLLM's, flat
    assert "stream=True" in direct.json()["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_engine_failing_mid_answer_is_its_error_not_a_cut_answer(stack: Stack, path: str) -> None:
    """vLLM fails a stream already begun with an error event; without streaming it answers the error itself. The
    assembled answer is that error, with its status, not the part generated before it."""
    fields = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "count the clocks"}
    body = {"model": MODEL, "mock": {"error_after": 2}} | fields
    through = httpx.post(stack.url + path, json=body, headers=AUTH, timeout=30)
    direct = httpx.post(stack.engine_url + path, json=body, headers=bearer(stack.engine_key), timeout=30)
    assert through.status_code == direct.status_code == 500
    error = through.json()["error"]
    assert error["message"] == direct.json()["message"] == "the mock failed mid-answer"
    assert error["type"] == "InternalServerError"
    streamed = httpx.post(stack.url + path, json=body | {"stream": True}, headers=AUTH, timeout=30)
    assert streamed.status_code == 200  # a stream's status is sent before the error: its event goes through
    assert '"the mock failed mid-answer"' in streamed.text


def test_openai_sdk_non_streaming_ttft_matches_the_engines_delay(stack: Stack) -> None:
    completion = stack.client().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"mock": {"ttft_ms": 150, "itl_ms": 10}},
    )
    parsed = completion.parse()
    assert parsed.usage is not None and parsed.choices[0].finish_reason == "stop"
    performance = parsed.usage.model_dump()["performance"]
    assert_timed_as_the_engine(stack, parsed.id, performance, delay_ms=150)
    assert json.loads(completion.headers["x-performance-metrics"]) == performance


def test_embeddings_and_models_through_the_sdk(stack: Stack) -> None:
    client = stack.client()
    embedding = client.embeddings.with_raw_response.create(model=MODEL, input=["a clock", "two clocks"])
    parsed = embedding.parse()
    assert [len(item.embedding) for item in parsed.data] == [8, 8]
    direct = stack.direct().embeddings.create(model=MODEL, input=["a clock", "two clocks"])
    assert [item.embedding for item in parsed.data] == [item.embedding for item in direct.data]
    performance = json.loads(embedding.headers["x-performance-metrics"])
    assert performance["prompt_tokens"] == direct.usage.prompt_tokens and performance["total_ms"] > 0
    assert [model.id for model in client.models.list()] == [MODEL]


def test_a_large_embeddings_answer_is_the_engines_own_bytes_with_performance_in_its_usage(stack: Stack) -> None:
    """64 embeddings of 4,096 values, 1.3 MB read in many parts: the engine's bytes go on as it wrote them, neither
    parsed nor written again, with `usage.performance` written in where its usage ends the answer."""
    body = {"model": MODEL, "input": [f"clock {index}" for index in range(64)], "dimensions": 4096}
    through = _post(stack.url + "/v1/embeddings", body, "large-embeddings")
    direct = _post(stack.engine_url + "/v1/embeddings", body, "large-embeddings-direct", key=stack.engine_key)
    assert len(direct.content) > 1_000_000
    usage_at = direct.content.rindex(b'"usage"')
    assert through.content[:usage_at] == direct.content[:usage_at] and through.content.endswith(b"}}")
    answer, own = through.json(), direct.json()
    performance = answer["usage"].pop("performance")
    assert answer == own and json.loads(through.headers["x-performance-metrics"]) == performance
    assert performance["prompt_tokens"] == own["usage"]["prompt_tokens"] == 128 and performance["total_ms"] > 0
    assert int(through.headers["content-length"]) == len(through.content)


def test_without_assembly_the_engine_answers_non_streaming_and_ttft_is_null(own_stack: Callable[..., Stack]) -> None:
    stack = own_stack({"SIDECAR_ASSEMBLE_NON_STREAMING": "false"})
    before = stack.engine_stats()
    body = {"model": MODEL, "messages": MESSAGES, "mock": {"ttft_ms": 100, "itl_ms": 5}}
    answer = _post(stack.url + "/v1/chat/completions", body, "not-assembled").json()
    performance = answer["usage"].pop("performance")
    assert performance["ttft_ms"] is None and performance["tpot_ms"] is None
    assert performance["latency_ms"] >= 100 + 15 * 5
    assert answer["choices"][0]["message"]["content"]
    assert stack.engine_stats()["completed"] == before["completed"] + 1
    # A client that gives up while the engine has not answered yet: the engine's request is aborted too.
    long = {"model": MODEL, "messages": MESSAGES, "mock": {"ttft_ms": 20_000}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.url + "/v1/chat/completions", json=long, headers=AUTH, timeout=0.5)
    wait_until(lambda: stack.engine_stats()["cancelled"] == before["cancelled"] + 1, timeout_s=2)
