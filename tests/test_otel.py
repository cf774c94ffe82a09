"""OpenTelemetry end to end: the real sidecar in front of the mock engine exports to an OTLP/HTTP receiver (the
protocol's own protobuf definitions, `bench/otlp_receiver.py`), and the spans and metrics it gets are checked
against what the clients saw: parents and trace ids, the GenAI conventions' names and attributes, timings equal
to `usage.performance`, for streamed, whole, failed and cancelled requests, with one process and with several."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from bench.otlp_receiver import OtlpReceiver, Received, Span
from sidecar.settings import load_settings
from sidecar.telemetry import otel
from tests.processes import SidecarProcess, free_port, wait_until

Start = Callable[..., SidecarProcess]
MODEL = "otel-model"
# Exports every 100 ms (spans) and 300 ms (metrics), so that a test waits a fraction of a second for them.
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
SERVER = 2  # the protocol's SpanKind.SERVER
ERROR = 2  # the protocol's StatusCode.ERROR
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


_AUTOLOAD = {
    "SIDECAR_AUTOLOAD_ENGINE": "mock",
    "SIDECAR_AUTOLOAD_MODEL": MODEL,
    "SIDECAR_AUTOLOAD_ARGS": '{"ttft-ms": 100, "itl-ms": 10, "tokens": 8}',
}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def traced(
    receiver: OtlpReceiver, start_sidecar: Start, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., SidecarProcess]:
    """A sidecar exporting to the receiver, the mock engine loaded (100 ms to the first token, 8 tokens)."""
    for name, value in QUICK_EXPORT.items():
        monkeypatch.setenv(name, value)

    def start(**env: str) -> SidecarProcess:
        sidecar = start_sidecar({"SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **_AUTOLOAD, **env})
        sidecar.wait_ready()
        return sidecar

    return start


def _spans(receiver: OtlpReceiver, name: str, count: int = 1) -> list[Span]:
    def arrived(received: Received) -> bool:
        return sum(span.name == name for span in received.spans) >= count

    return [span for span in receiver.wait_for(arrived, timeout_s=10).spans if span.name == name]


def _stream(client: openai.OpenAI, **extra: Any) -> tuple[str, dict[str, Any], str]:
    """A streamed chat with usage: the response's request id, its `usage.performance`, and its chunks' id."""
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "trace me"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=8,
        temperature=0.5,
        **extra,
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert usage is not None
    return request_id, usage.model_extra["performance"] | {"usage": usage}, chunks[0].id


def test_a_streamed_chat_is_a_genai_span_in_the_clients_trace_and_the_engines_parent(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    sidecar = traced()
    request_id, performance, response_id = _stream(openai_client(sidecar, traceparent=TRACEPARENT))

    [span] = _spans(receiver, f"chat {MODEL}")
    assert (span.trace_id, span.parent_span_id, span.kind) == (CLIENT_TRACE, CLIENT_SPAN, SERVER)
    usage = performance.pop("usage")
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mock",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.response.id": response_id,
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "gen_ai.response.time_to_first_chunk": performance["ttft_ms"] / 1000,
        "sidecar.request_id": request_id,
        "sidecar.ttft_ms": performance["ttft_ms"],
        "sidecar.tpot_ms": performance["tpot_ms"],
        "sidecar.queue_ms": performance["queue_ms"],
        "http.response.status_code": 200,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert {name: span.attributes.get(name) for name in expected} == expected
    assert "error.type" not in span.attributes and span.status_code == 0
    # The span lasts the whole answer; the first token's event sits where the TTFT says, which the mock made 100 ms.
    assert (span.end_ns - span.start_ns) / 1e6 >= performance["latency_ms"]
    # and ends with it, not when its record is written (the backlog's 10 ms later)
    assert (span.end_ns - span.start_ns) / 1e6 < performance["queue_ms"] + performance["total_ms"] + 5
    [(event, at)] = span.events
    assert event == "gen_ai.first_token"
    assert (at - span.start_ns) / 1e6 == pytest.approx(performance["ttft_ms"], abs=0.01)
    assert 100 <= performance["ttft_ms"] < 1000

    # The engine was told of the sidecar's span as its parent, in the client's trace: its spans join it.
    engine_port = httpx.get(f"{sidecar.url}/v1/model").json()["port"]
    seen = httpx.get(f"http://127.0.0.1:{engine_port}/mock/last-headers").json()
    assert seen["traceparent"] == f"00-{CLIENT_TRACE}-{span.span_id}-01"


def test_a_streamed_response_is_a_chat_span_with_its_counts_and_first_token(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    """The Responses API in the conventions' terms: a chat, its `max_output_tokens` the request's max tokens, the
    response's id and counts from the event that ends it, its first delta the first token's event."""
    events = list(
        openai_client(traced()).responses.create(model=MODEL, input="trace me", max_output_tokens=6, stream=True)
    )
    final = events[-1].response
    performance = final.usage.model_extra["performance"]
    [span] = _spans(receiver, f"chat {MODEL}")
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 6,
        "gen_ai.response.id": final.id,
        "gen_ai.usage.input_tokens": final.usage.input_tokens,
        "gen_ai.usage.output_tokens": 6,
        "gen_ai.response.time_to_first_chunk": performance["ttft_ms"] / 1000,
        "http.response.status_code": 200,
    }
    assert {name: span.attributes.get(name) for name in expected} == expected
    [(event, at)] = span.events
    assert event == "gen_ai.first_token"
    assert (at - span.start_ns) / 1e6 == pytest.approx(performance["ttft_ms"], abs=0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_message_is_a_chat_span_with_its_stop_reason_counts_and_id(
    stream: bool, traced: Callable[..., SidecarProcess], receiver: OtlpReceiver
) -> None:
    """Anthropic's Messages API in the conventions' terms: a chat, its stop reason the finish reason, its message's
    id the response's, its counts from `message_start` and `message_delta` (or the whole answer's usage)."""
    asked: Any = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "trace me"}]}
    with anthropic.Anthropic(base_url=traced().url, api_key="no-key-needed", max_retries=0) as client:
        if stream:
            events = list(client.messages.create(**asked, stream=True))
            message_id, usage = events[0].message.id, next(e.usage for e in events if e.type == "message_delta")
        else:
            answer = client.messages.create(**asked)
            message_id, usage = answer.id, answer.usage
    [span] = _spans(receiver, f"chat {MODEL}")
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.response.id": message_id,
        "gen_ai.response.finish_reasons": ["max_tokens"],  # the mock's 8 tokens, cut at 5
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": 5,
        "http.response.status_code": 200,
    }
    assert {name: span.attributes.get(name) for name in expected} == expected
    # A whole answer is built from the engine's stream: timed to its first chunk too.
    assert span.attributes.get("gen_ai.response.time_to_first_chunk", 0) > 0


def test_a_stream_without_the_engines_usage_chunk_still_says_why_it_ended(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    """llama-cpp-python ignores stream_options: the finish reason and the id come from the stream's last chunk."""
    _, performance, response_id = _stream(openai_client(traced()), extra_body={"mock": {"stream_usage": False}})
    assert performance["tokens_estimated"]  # the sidecar counted: the engine sent no usage
    [span] = _spans(receiver, f"chat {MODEL}")
    assert span.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert span.attributes["gen_ai.response.id"] == response_id


def test_a_whole_answer_without_a_trace_starts_one_and_metrics_carry_the_same_numbers(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    sidecar = traced()
    client = openai_client(sidecar)
    answers = [
        client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"whole {i}"}], max_tokens=4
        )
        for i in range(3)
    ]
    performances = [answer.parse().usage.model_extra["performance"] for answer in answers]  # type: ignore[union-attr]
    streamed = [_stream(client)[1] for _ in range(2)]

    spans = _spans(receiver, f"chat {MODEL}", count=5)
    whole = [span for span in spans if span.attributes["gen_ai.request.stream"] is False]
    assert len(whole) == 3
    for span, answer in zip(sorted(whole, key=lambda s: s.start_ns), answers, strict=True):
        assert span.parent_span_id == ""  # a trace of its own
        assert span.attributes["sidecar.request_id"] == answer.headers["x-request-id"]
        assert span.attributes["gen_ai.response.id"] == answer.parse().id
        assert span.attributes["gen_ai.response.finish_reasons"] == ["length"]
        assert span.attributes["gen_ai.usage.output_tokens"] == 4

    # The GenAI histograms hold the numbers of usage.performance, in seconds: five requests, their TTFT summed.
    everyone = performances + [performance for performance in streamed]
    ttft = _histogram(receiver, "gen_ai.server.time_to_first_token", count=5)
    assert ttft.sum == pytest.approx(sum(p["ttft_ms"] for p in everyone) / 1000, abs=1e-9)
    assert ttft.unit == "s" and ttft.bounds[:3] == [0.001, 0.005, 0.01]
    assert ttft.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mock",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
    }
    tpot = _histogram(receiver, "gen_ai.server.time_per_output_token", count=5)
    assert tpot.sum == pytest.approx(sum(p["tpot_ms"] for p in everyone) / 1000, abs=1e-9)
    duration = _histogram(receiver, "gen_ai.server.request.duration", count=5)
    assert duration.sum == pytest.approx(sum(p["queue_ms"] + p["total_ms"] for p in everyone) / 1000, abs=1e-9)
    tokens = {
        point.attributes["gen_ai.token.type"]: point
        for point in receiver.histograms("gen_ai.client.token.usage")
        if point.count == 5
    }
    assert tokens["output"].sum == sum(p["completion_tokens"] for p in everyone)
    assert tokens["input"].sum == sum(p["prompt_tokens"] for p in everyone)


def _histogram(receiver: OtlpReceiver, metric: str, count: int) -> Any:
    def arrived(received: Received) -> bool:
        return any(p.metric == metric and p.count >= count for p in received.histograms.values())

    receiver.wait_for(arrived, timeout_s=10)
    [point] = [point for point in receiver.histograms(metric) if "error.type" not in point.attributes]
    assert point.count == count
    return point


def test_failed_requests_say_their_error_type(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    sidecar = traced(SIDECAR_UPSTREAM_INTER_TOKEN_TIMEOUT_S="0.5")
    client = openai_client(sidecar)
    with pytest.raises(openai.BadRequestError):  # the engine's own 400
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"mock": {"error": {"status": 400}}}
        )
    # A stream the engine stops sending after two tokens: cut by the inter-token timeout after its status went out.
    with pytest.raises(openai.APIError):
        list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "stall"}],
                stream=True,
                extra_body={"mock": {"stall_after": 2}},
            )
        )
    httpx.post(f"{sidecar.url}/v1/model/unload").raise_for_status()
    with pytest.raises(openai.APIStatusError) as refused:  # no engine: refused before anything reaches one
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 503

    spans = sorted(_spans(receiver, f"chat {MODEL}", count=3), key=lambda span: span.start_ns)
    assert [span.attributes["error.type"] for span in spans] == ["400", "engine_timeout", "engine_not_ready"]
    assert [span.attributes["http.response.status_code"] for span in spans] == [400, 200, 503]
    assert all(span.status_code == ERROR for span in spans)
    # The cut stream had its first token: the span has it, the TTFT histogram does not (successful answers only).
    assert spans[1].attributes["sidecar.ttft_ms"] >= 100
    duration = receiver.wait_for(
        lambda r: sum(p.metric == "gen_ai.server.request.duration" for p in r.histograms.values()) >= 2, 10
    )
    failed = [
        p
        for p in duration.histograms.values()
        if p.metric == "gen_ai.server.request.duration" and "error.type" in p.attributes
    ]
    assert {p.attributes["error.type"] for p in failed} <= {"400", "engine_timeout"}
    assert not [p for p in receiver.histograms("gen_ai.server.time_to_first_token") if "error.type" in p.attributes]


def test_a_client_gone_mid_stream_ends_its_span_as_cancelled(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver
) -> None:
    sidecar = traced()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
        "mock": {"tokens": 200, "itl_ms": 50},
    }
    with httpx.stream("POST", f"{sidecar.url}/v1/chat/completions", json=body, timeout=10) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break  # the first token: then the client goes

    [span] = _spans(receiver, f"chat {MODEL}")
    assert span.attributes["error.type"] == "client_disconnected"
    assert span.attributes["sidecar.client_disconnected"] is True
    assert span.status_code == ERROR
    assert (span.end_ns - span.start_ns) / 1e9 < 5  # not the 10 s the whole answer would take


def test_control_operations_are_spans(
    receiver: OtlpReceiver, start_sidecar: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in QUICK_EXPORT.items():
        monkeypatch.setenv(name, value)
    restart = {"SIDECAR_RESTART_MAX": "1", "SIDECAR_RESTART_BACKOFF_S": "0.1"}
    sidecar = start_sidecar({"SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **restart})
    load = {"engine": "mock", "model": MODEL, "args": {"enable-sleep-mode": True}}
    httpx.post(f"{sidecar.url}/v1/model/load", json=load, timeout=30).raise_for_status()
    httpx.post(f"{sidecar.url}/v1/model/sleep", json={"level": 1}, timeout=30).raise_for_status()
    httpx.post(f"{sidecar.url}/v1/model/wake", timeout=30).raise_for_status()
    # The engine dies under a request, and the sidecar starts it again.
    dying = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "mock": {"die_after": 1}}
    httpx.post(f"{sidecar.url}/v1/chat/completions", json=dying, timeout=30)
    wait_until(lambda: httpx.get(f"{sidecar.url}/v1/model").json()["restarts"] == 1, timeout_s=20)
    sidecar.wait_ready()
    httpx.post(f"{sidecar.url}/v1/model/unload", timeout=30).raise_for_status()
    failing = {"engine": "mock", "model": MODEL, "args": {"exit-at-start": 3}}
    assert httpx.post(f"{sidecar.url}/v1/model/load", json=failing, timeout=30).status_code == 502

    names = ["load", "sleep", "wake", "engine_crashed", "unload", "load"]

    def control(received: Received) -> list[Span]:
        return sorted((s for s in received.spans if s.name.startswith("sidecar.")), key=lambda span: span.start_ns)

    spans = control(receiver.wait_for(lambda r: len(control(r)) >= len(names), timeout_s=10))
    assert [span.name for span in spans] == [f"sidecar.{name}" for name in names]
    for span in spans:
        assert span.attributes["sidecar.engine"] == "mock"
        assert span.attributes["gen_ai.request.model"] == MODEL
    states = ["ready", "sleeping", "ready", "ready", "idle", "failed"]
    assert [span.attributes["sidecar.state"] for span in spans] == states
    crashed = spans[3]  # an incident, whatever came after it: here, a restart that brought the engine back
    assert crashed.attributes["error.type"] == "engine_crashed" and crashed.attributes["sidecar.restarts"] == 1
    assert spans[-1].status_code == ERROR and spans[-1].attributes["error.type"] == "engine_start_failed"
    assert [i for i, span in enumerate(spans) if "error.type" in span.attributes] == [3, 5]
    assert spans[0].resource["service.name"] == "llm-sidecar"


def test_every_data_plane_worker_exports_its_own_requests(
    traced: Callable[..., SidecarProcess], receiver: OtlpReceiver, openai_client: Callable[..., openai.OpenAI]
) -> None:
    sidecar = traced(SIDECAR_WORKERS="2")
    answered = {_stream(openai_client(sidecar))[0] for _ in range(6)}

    spans = _spans(receiver, f"chat {MODEL}", count=6)
    assert {span.attributes["sidecar.request_id"] for span in spans} == answered
    processes = {span.resource["sidecar.process"] for span in spans}
    assert processes <= {"worker-0", "worker-1"}
    counted = receiver.wait_for(
        lambda r: sum(p.count for p in r.histograms.values() if p.metric == "gen_ai.server.time_to_first_token") >= 6,
        timeout_s=10,
    )
    per_process = [p for p in counted.histograms.values() if p.metric == "gen_ai.server.time_to_first_token"]
    assert sum(p.count for p in per_process) == 6
    assert {p.resource["sidecar.process"] for p in per_process} == processes


def test_off_without_an_endpoint_nothing_is_imported() -> None:
    assert not otel.enabled(load_settings(None), environ={})
    assert otel.enabled(load_settings(None), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not otel.enabled(
        load_settings(None, otel_exporter_otlp_endpoint="http://collector:4318"), environ={"OTEL_SDK_DISABLED": "true"}
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OTEL_"))}
    script = (
        "import sys; from sidecar.server.app import create_app; from sidecar.settings import load_settings; "
        "create_app(load_settings(None)); print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True
    )
    assert imported.stdout.splitlines()[-1] == "[]"


def test_a_grpc_protocol_is_refused_at_start_naming_the_http_port(start_sidecar: Start) -> None:
    sidecar = start_sidecar(
        {"SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        wait=False,
    )
    assert sidecar.wait_exit() == 2
    assert "http/protobuf" in sidecar.output() and "4318" in sidecar.output()


def test_a_collector_that_is_down_holds_the_exit_no_longer_than_the_flush_bound(
    start_sidecar: Start, openai_client: Callable[..., openai.OpenAI]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: every export is refused and retried
    sidecar = start_sidecar({"SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": closed, **_AUTOLOAD})
    sidecar.wait_ready()
    _stream(openai_client(sidecar))  # a span and metrics waiting to go out
    sidecar.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert sidecar.wait_exit(timeout_s=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    # The exporters alone retry for 10 s each (measured: 13 s to exit); the flush bound is 3 s.
    assert time.monotonic() - started < 8


def test_the_collectors_key_never_shows_in_the_engines_output(
    receiver: OtlpReceiver, start_sidecar: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "collector-key-0a1b2c3d4e5f"
    # Honeycomb's headers: a name no pattern takes for a secret's, so only the registered value masks it.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-honeycomb-team={key},x-honeycomb-dataset=llm")
    sidecar = start_sidecar({"SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    load = {"engine": "mock", "model": MODEL, "args": {"print-env": "OTEL_EXPORTER_OTLP_HEADERS"}}
    httpx.post(f"{sidecar.url}/v1/model/load", json=load, timeout=30).raise_for_status()
    # The engine printed the variable it inherited; the sidecar's log of its output shows it masked.
    wait_until(lambda: "OTEL_EXPORTER_OTLP_HEADERS" in sidecar.output(), timeout_s=10)
    assert key not in sidecar.output()
