"""Streams through the sidecar: what the client sees, and what the sidecar measures of them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.fake_engine import FakeEngine, serving
from tests.processes import SidecarProcess, wait_until
from tests.proxy.conftest import (
    AUTH,
    MESSAGES,
    MODEL,
    RELAY_SLACK_MS,
    Stack,
    assert_timed_as_the_engine,
    engine_id,
    events,
    in_front_of,
    normalized,
    post_stream,
)


def _usage_performance(usage: Any) -> dict[str, Any]:
    performance: dict[str, Any] = usage.model_dump()["performance"]
    return performance


def test_openai_sdk_stream_gets_performance_matching_the_engines_delays(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"ttft_ms": 200, "itl_ms": 20}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    performance = _usage_performance(usage)
    assert_timed_as_the_engine(stack, chunks[-1].id, performance, delay_ms=200)
    decode_ms = performance["latency_ms"] - performance["ttft_ms"]
    assert performance["tpot_ms"] == pytest.approx(decode_ms / 15, abs=0.002)
    assert performance["total_ms"] >= performance["latency_ms"] >= performance["ttft_ms"]
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (usage.prompt_tokens, 16)
    assert performance["output_tokens_per_s"] == pytest.approx(16 / (decode_ms / 1000), rel=0.001)
    assert 0 <= performance["sidecar_overhead_ms"] < performance["total_ms"]
    assert (performance["engine"], performance["model"]) == ("mock", MODEL)
    assert performance["gpu_memory_peak_mb"] is None
    assert "tokens_estimated" not in performance


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("/v1/chat/completions", None),
        ("/v1/completions", None),
        ("/v1/chat/completions", {"include_usage": False}),
        # vLLM's usage in every chunk counts only with include_usage: the sidecar's own ask must not turn it on.
        ("/v1/chat/completions", {"continuous_usage_stats": True}),
    ],
)
def test_stream_without_include_usage_is_the_engines_byte_for_byte(
    stack: Stack, path: str, options: dict[str, Any] | None
) -> None:
    body: dict[str, Any] = {"model": MODEL, "stream": True, "logprobs": 2 if path == "/v1/completions" else True}
    body |= {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "count the clocks"}
    if options is not None:
        body["stream_options"] = options
    through = post_stream(stack.url + path, body, "same-id-1")
    assert engine_id(through).startswith("same-id-1-")
    direct = post_stream(stack.engine_url + path, body, engine_id(through), key=stack.engine_key)
    assert normalized(through) == normalized(direct)
    assert b'"usage"' not in through  # the sidecar asked the engine for usage; the client never sees that chunk
    assert through.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_with_include_usage_differs_only_by_performance(stack: Stack, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "count the clocks"}
    proxied = post_stream(stack.url + path, body, "same-id-2")
    through = events(normalized(proxied))
    direct = events(normalized(post_stream(stack.engine_url + path, body, engine_id(proxied), key=stack.engine_key)))
    assert len(through) == len(direct)
    assert through[:-2] == direct[:-2] and through[-1] == direct[-1] == b"data: [DONE]"
    usage_through = json.loads(through[-2].removeprefix(b"data: "))
    usage_direct = json.loads(direct[-2].removeprefix(b"data: "))
    performance = usage_through["usage"].pop("performance")
    assert usage_through == usage_direct
    assert performance["completion_tokens"] == usage_direct["usage"]["completion_tokens"]


def test_usage_in_every_chunk_passes_through_and_the_answer_is_still_timed(stack: Stack) -> None:
    # vLLM's `continuous_usage_stats`, which guidellm asks for: every chunk carries the tokens so far.
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": options}
    body |= {"mock": {"ttft_ms": 150, "itl_ms": 10}}
    proxied = post_stream(stack.url + "/v1/chat/completions", body, "continuous-1")
    through = events(normalized(proxied))
    # Before the direct request takes its id.
    engine_outputs = stack.engine_outputs_ms(f"chatcmpl-{engine_id(proxied)}")
    direct_url = stack.engine_url + "/v1/chat/completions"
    direct = events(normalized(post_stream(direct_url, body, engine_id(proxied), key=stack.engine_key)))
    assert through[:-2] == direct[:-2] and through[-1] == direct[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in through[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks[:-1]] == [0, *range(1, 17), 16]
    usage = chunks[-1]["usage"]
    performance = usage.pop("performance")
    assert usage == json.loads(direct[-2].removeprefix(b"data: "))["usage"]
    assert engine_outputs[0] - 0.01 <= performance["ttft_ms"] <= engine_outputs[0] + RELAY_SLACK_MS
    assert engine_outputs[0] >= 149 and performance["itl_ms"]["p50"] > 0
    assert performance["completion_tokens"] == 16


def test_several_choices_are_measured_per_choice(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        n=2,
        stream_options={"include_usage": True},
        extra_body={"mock": {"ttft_ms": 50, "itl_ms": 20}},
    )
    chunks = list(stream)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    usage = chunks[-1].usage
    assert usage is not None
    performance = _usage_performance(usage)
    assert performance["completion_tokens"] == 32
    # The engine's gaps between steps, not the ~0 ms between the two choices of one step.
    assert_timed_as_the_engine(stack, chunks[-1].id, performance, delay_ms=50)
    assert performance["tpot_ms"] == pytest.approx((performance["latency_ms"] - performance["ttft_ms"]) / 15, abs=0.002)


class _UsageForEachChoiceEngine(FakeEngine):
    """llama-server's chat of two choices: each ends with a usage chunk of its own, its tokens and the prompt's.
    Choice 0 goes on after choice 1's usage chunk only once the test has read it (`go_on`)."""

    go_on = threading.Event()
    base = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}

    def chat(self) -> bool:
        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            chunk = self.base | {"choices": choices} | ({"usage": usage} if usage else {})
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        def usage(completion: int) -> dict[str, Any]:
            return {"completion_tokens": completion, "prompt_tokens": 5, "total_tokens": 5 + completion}

        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        self.wfile.write(
            event([{"index": 1, "delta": {"content": "a"}}]) + event([{"index": 0, "delta": {"content": "b"}}])
        )
        self.wfile.write(event([{"index": 1, "delta": {}, "finish_reason": "length"}]) + event([], usage(1)))
        self.wfile.flush()
        self.go_on.wait(30)
        self.wfile.write(event([{"index": 0, "delta": {"content": "c"}}]))
        self.wfile.write(event([{"index": 0, "delta": {}, "finish_reason": "length"}]) + event([], usage(2)))
        self.wfile.write(b"data: [DONE]\n\n")
        return False


def test_an_answer_of_several_choices_ends_with_the_last_of_its_usage_chunks(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    """A usage chunk while another choice goes on is the engine's, as it wrote it; the last one carries
    `performance`, its completions the choices' added up."""
    with serving(_UsageForEachChoiceEngine) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {
            "model": "fake",
            "messages": MESSAGES,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{sidecar.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            sent = [json.loads(next(line for line in lines if '"usage"' in line)[6:])]
            _UsageForEachChoiceEngine.go_on.set()
            sent += [json.loads(line[6:]) for line in lines]
    usages = [chunk["usage"] for chunk in sent if "usage" in chunk]
    assert usages[0] == {"completion_tokens": 1, "prompt_tokens": 5, "total_tokens": 6}  # no performance yet
    performance = usages[1].pop("performance")
    assert usages[1] == {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7}
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (5, 3)


def test_tool_call_stream_is_timed_by_its_argument_pieces(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    stream = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=tools,  # type: ignore[list-item]
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"ttft_ms": 100, "itl_ms": 10}},
    )
    chunks = list(stream)
    arguments = "".join(
        call.function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for call in c.choices[0].delta.tool_calls
        if call.function
    )
    assert json.loads(arguments)["query"]
    usage = chunks[-1].usage
    assert usage is not None
    assert_timed_as_the_engine(stack, chunks[-1].id, _usage_performance(usage), delay_ms=100)


def test_metrics_of_a_request_by_its_id_and_in_its_access_line(stack: Stack) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    raw = post_stream(stack.url + "/v1/chat/completions", body, "metrics-by-id-1")
    injected = json.loads(events(raw)[-2].removeprefix(b"data: "))["usage"]["performance"]
    record = httpx.get(f"{stack.url}/v1/requests/metrics-by-id-1", headers=AUTH).json()
    assert record["id"] == "metrics-by-id-1" and record["status"] == 200 and record["path"] == "/v1/chat/completions"
    assert record["client_disconnected"] is False
    assert record["performance"] == injected
    access = [line for line in stack.sidecar.output().splitlines() if "metrics-by-id-1" in line and "request" in line]
    assert any(f"ttft_ms={injected['ttft_ms']}" in line for line in access), access
    missing = httpx.get(f"{stack.url}/v1/requests/never-seen", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"
    assert "'never-seen'" in missing.json()["error"]["message"]
    # An id no request can have (past X-Request-ID's 128 characters) is not looked up, nor echoed back.
    unlike = httpx.get(f"{stack.url}/v1/requests/{'x' * 4000}", headers=AUTH)
    assert unlike.status_code == 404 and unlike.json()["error"]["param"] == "request_id"
    assert "x" * 129 not in unlike.text and "128" in unlike.json()["error"]["message"]


def test_engine_timings_are_kept(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    raw = post_stream(stack.url + "/v1/completions", body | {"mock": {"timings": True}}, "timings-1")
    performance = json.loads(events(raw)[-2].removeprefix(b"data: "))["usage"]["performance"]
    assert performance["engine_timings"]["predicted_ms"] == 80.5


def test_bad_stream_fields_are_a_400_before_the_engine(stack: Stack) -> None:
    before = stack.engine_stats()["started"]
    bad = (
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": "x"}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"n": "2"}, "n"),
    )
    for body, param in bad:
        response = httpx.post(f"{stack.url}/v1/chat/completions", json={"messages": MESSAGES} | body, headers=AUTH)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param
    assert stack.engine_stats()["started"] == before


def test_usage_chunk_the_engine_did_not_send_is_added_with_the_tokens_counted(stack: Stack) -> None:
    # llama-cpp-python's server ignores stream_options: the client that asked for usage still gets it.
    stream = stack.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"stream_usage": False, "tokens": 12}},
    )
    chunks = list(stream)
    assert [c.usage is not None for c in chunks].count(True) == 1
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.id, last.model, last.object) == (chunks[0].id, chunks[0].model, "chat.completion.chunk")
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens is None
    performance = _usage_performance(last.usage)
    assert performance["completion_tokens"] == 12 and performance["tokens_estimated"] is True
    assert performance["ttft_ms"] > 0


def test_a_client_that_drops_usage_reads_the_metrics_by_the_request_id_in_the_headers(stack: Stack) -> None:
    """What LiteLLM and LangChain users do: they never see `usage.performance`, but they get the headers."""
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_body={"mock": {"ttft_ms": 100}},
    )
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    assert chunks and all(chunk.usage is None for chunk in chunks)  # not asked for: none sent
    found: dict[str, Any] = {}

    def recorded() -> bool:
        response = httpx.get(f"{stack.url}/v1/requests/{request_id}", headers=AUTH)
        found.update(response.json() if response.status_code == 200 else {})
        return bool(found)

    wait_until(recorded, timeout_s=5)
    performance = found["performance"]
    assert performance["completion_tokens"] == 16
    assert_timed_as_the_engine(stack, chunks[-1].id, performance, delay_ms=100)


class _OneWriteEngine(FakeEngine):
    """An engine that writes its whole streamed answer in one write, as a busy machine delivers it in one read."""

    def chat(self) -> bool:
        base = {"id": "c", "object": "chat.completion.chunk", "model": "fake"}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]} for i in range(8)]
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}})
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        self.send(b"text/event-stream", body)
        return True


class _UsageInTheLastChoiceEngine(FakeEngine):
    """llama-server's completion stream: its usage in the chunk with the last choice, whether asked for or not, and no
    usage chunk of its own."""

    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake"}
    usage: Any = {"completion_tokens": 2, "prompt_tokens": 4, "total_tokens": 6}
    usage["prompt_tokens_details"] = {"cached_tokens": 3}
    chunks = [
        base | {"choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}]},
        base | {"choices": [{"text": "b", "index": 0, "logprobs": None, "finish_reason": "length"}], "usage": usage},
    ]

    def chat(self) -> bool:
        body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in self.chunks) + b"data: [DONE]\n\n"
        self.send(b"text/event-stream", body)
        return True


def test_usage_an_engine_puts_in_its_last_choice_comes_in_the_usage_chunk_asked_for(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    """The engine's events go as they came; the usage chunk the client asked for repeats the engine's own usage,
    every field of it, with `performance`: not a count of the events."""
    with serving(_UsageInTheLastChoiceEngine) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "prompt": "hi", "stream": True}
        for asked in (True, False):
            options = {"stream_options": {"include_usage": True}} if asked else {}
            raw = httpx.post(f"{sidecar.url}/v1/completions", json=body | options, headers=AUTH, timeout=30).content
            sent = [json.loads(e.removeprefix(b"data: ")) for e in events(raw)[:-1]]
            assert sent[:2] == _UsageInTheLastChoiceEngine.chunks and events(raw)[-1] == b"data: [DONE]"
            if not asked:  # the engine's stream, as it would have answered the client
                assert len(sent) == 2
                continue
            assert len(sent) == 3 and sent[2]["choices"] == [] and sent[2]["id"] == "cmpl-1"
            performance = sent[2]["usage"].pop("performance")
            assert sent[2]["usage"] == _UsageInTheLastChoiceEngine.usage
            assert (performance["prompt_tokens"], performance["completion_tokens"]) == (4, 2)
            assert "tokens_estimated" not in performance


def test_events_arriving_together_are_reported_as_coalesced_not_as_zero_gaps(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    with serving(_OneWriteEngine) as url:
        sidecar = in_front_of(url, start_sidecar)
        body = {"model": "fake", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        raw = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30).content
        performance = json.loads(events(raw)[-2].removeprefix(b"data: "))["usage"]["performance"]
        assert performance["completion_tokens"] == 8 and performance["coalesced_events"] == 7
        assert (performance["tpot_ms"], performance["itl_ms"], performance["output_tokens_per_s"]) == (None, None, None)
        assert performance["ttft_ms"] == performance["latency_ms"] > 0
