"""The mock engine as a real process, with the official openai SDK as its client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.processes import free_port, wait_until

MESSAGES = [{"role": "user", "content": "measure me"}]


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engines.mock_server", "--port", str(port), "--model", "mock-1"]
        + ["--ttft-ms", "200", "--itl-ms", "10", "--tokens", "8"],
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout_s=20)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def client(mock_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{mock_url}/v1", api_key="unused") as sdk:
        yield sdk


def test_models_lists_the_configured_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["mock-1"]


def test_chat_is_deterministic_and_matches_its_stream(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="mock-1", messages=MESSAGES)  # type: ignore[arg-type]
    second = client.chat.completions.create(model="mock-1", messages=MESSAGES)  # type: ignore[arg-type]
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model="mock-1",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == first.usage


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    assert all(c.choices and c.usage is None for c in chunks)


def test_first_token_comes_after_the_configured_delay_and_the_role_before(client: openai.OpenAI) -> None:
    start = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True, max_tokens=3):  # type: ignore[arg-type]
        arrivals.append((time.monotonic() - start, chunk.choices[0].delta))
    role_at, role = arrivals[0]
    first_at = next(t for t, delta in arrivals if delta.content)
    assert role.role == "assistant" and not role.content
    assert role_at < 0.15
    assert 0.2 <= first_at < 0.2 + 0.15


def test_n_choices_and_max_tokens(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="mock-1", messages=MESSAGES, n=2, max_tokens=3)  # type: ignore[arg-type]
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.choices[0].message.content != response.choices[1].message.content
    assert response.usage is not None and response.usage.completion_tokens == 6


def test_tool_calls_on_request(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    response = client.chat.completions.create(model="mock-1", messages=MESSAGES, tools=tools)  # type: ignore[arg-type]
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "search"  # type: ignore[union-attr]
    assert "query" in json.loads(call.function.arguments)  # type: ignore[union-attr]
    stream = client.chat.completions.create(model="mock-1", messages=MESSAGES, tools=tools, stream=True)  # type: ignore[arg-type]
    pieces = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert "".join(p[0].function.arguments or "" for p in pieces) == call.function.arguments  # type: ignore[union-attr]


def test_logprobs_on_request(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="mock-1", messages=MESSAGES, logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 8
    assert all(len(entry.top_logprobs) == 2 and entry.logprob < 0 for entry in content)
    text = client.completions.create(model="mock-1", prompt="measure me", logprobs=1, max_tokens=4)
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert "".join(logprobs.tokens) == text.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="mock-1", input=["a", "b"])
    assert [len(d.embedding) for d in response.data] == [8, 8]
