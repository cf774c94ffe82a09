"""A sidecar with the mock engine loaded, both real processes on loopback, and clients for each."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import OpenAIClients, SidecarProcess, bearer, engine_key

KEY = "proxy-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "tell me about clocks"}]


@dataclass
class Stack:
    sidecar: SidecarProcess
    engine_url: str  # the mock engine itself, for answers to compare with
    engine_key: str  # the key the sidecar gave it, which its /v1 paths need
    clients: OpenAIClients = field(default_factory=OpenAIClients)  # closed with the stack

    @property
    def url(self) -> str:
        return self.sidecar.url

    def client(self) -> OpenAI:
        return self.clients(f"{self.url}/v1", KEY, timeout=30)

    def direct(self) -> OpenAI:
        return self.clients(f"{self.engine_url}/v1", self.engine_key, timeout=30)

    def stop(self) -> None:
        self.clients.close()
        self.sidecar.stop()

    def record(self, request_id: str) -> dict[str, Any]:
        """The sidecar's record of a request (`GET /v1/requests/{id}`), or {} while it has none."""
        response = httpx.get(f"{self.url}/v1/requests/{request_id}", headers=AUTH)
        return response.json() if response.status_code == 200 else {}  # type: ignore[no-any-return]

    def engine_stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(f"{self.engine_url}/mock/stats").json()
        return stats

    def engine_outputs_ms(self, answer_id: str) -> list[float]:
        """When the mock wrote each output step of that answer, in ms from the request's arrival, by its own clock."""
        response = httpx.get(f"{self.engine_url}/mock/outputs/{answer_id}")
        response.raise_for_status()
        times: list[float] = response.json()["output_ms"]
        return times


# What a loaded 2-core machine may put between the engine writing an event and the sidecar reading it: the
# scheduling of two processes and a loopback hop. The engine's own clock carries its share of the load.
RELAY_SLACK_MS = 100.0


def assert_timed_as_the_engine(stack: Stack, answer_id: str, performance: dict[str, Any], delay_ms: float) -> None:
    """The sidecar's TTFT, latency and ITL are the engine's own, plus no more than a relay's slack.

    The sidecar's clock starts before the engine's (it forwards the request after reading it) and stops after
    (it reads what the engine wrote), so neither figure can come out below the engine's; `delay_ms` is the TTFT
    the mock was told to inject, which its own first output cannot beat.
    """
    outputs = stack.engine_outputs_ms(answer_id)
    assert outputs[0] >= delay_ms - 1, outputs  # asyncio's timer may fire within its clock's resolution
    assert outputs[0] - 0.01 <= performance["ttft_ms"] <= outputs[0] + RELAY_SLACK_MS, (outputs, performance)
    assert outputs[-1] - 0.01 <= performance["latency_ms"] <= outputs[-1] + RELAY_SLACK_MS, (outputs, performance)
    gaps = sorted(later - earlier for earlier, later in zip(outputs, outputs[1:], strict=False))
    if gaps and performance["itl_ms"] is not None:
        assert performance["itl_ms"]["p50"] == pytest.approx(gaps[len(gaps) // 2], abs=10), (outputs, performance)


def start_stack(workdir: Path, env: dict[str, str] | None = None, engine_args: dict[str, Any] | None = None) -> Stack:
    args = {"ttft-ms": 20, "itl-ms": 5, "tokens": 16} | (engine_args or {})
    sidecar = SidecarProcess(
        workdir,
        {
            "SIDECAR_API_KEYS": KEY,
            "SIDECAR_AUTOLOAD_ENGINE": "mock",
            "SIDECAR_AUTOLOAD_MODEL": MODEL,
            "SIDECAR_AUTOLOAD_ARGS": json.dumps(args),
            **(env or {}),
        },
    )
    try:
        sidecar.wait_healthy()
        sidecar.wait_ready()
        engine = httpx.get(f"{sidecar.url}/v1/model", headers=AUTH).json()
        # The first request to a fresh mock engine costs it about 25 ms more (lazy imports): not what tests measure.
        warm_up = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "stream": True}
        httpx.post(f"{sidecar.url}/v1/chat/completions", json=warm_up, headers=AUTH, timeout=10).raise_for_status()
    except BaseException:
        sidecar.stop()
        raise
    return Stack(sidecar, f"http://127.0.0.1:{engine['port']}", engine_key(engine["pid"], "VLLM_API_KEY"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One sidecar and engine for a whole module: for tests that leave them as they found them."""
    started = start_stack(tmp_path_factory.mktemp("stack"))
    yield started
    started.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """A sidecar and engine of the test's own: for tests that kill, stall or reconfigure them."""
    started: list[Stack] = []

    def start(env: dict[str, str] | None = None, engine_args: dict[str, Any] | None = None) -> Stack:
        started.append(start_stack(tmp_path, env, engine_args))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def in_front_of(
    engine_url: str, start_sidecar: Callable[..., SidecarProcess], settings: dict[str, str] | None = None
) -> SidecarProcess:
    """A sidecar with these settings and the engine at `engine_url` (a test's fake) loaded as an external engine."""
    sidecar = start_sidecar({"SIDECAR_API_KEYS": KEY} | (settings or {}))
    load = {"engine": "external", "model": "fake", "url": engine_url}
    assert httpx.post(f"{sidecar.url}/v1/model/load", json=load, headers=AUTH, timeout=30).status_code == 200
    return sidecar


def normalized(raw: bytes) -> bytes:
    """Two answers to the same request differ only in `created` (the clock's second)."""
    return re.sub(rb'"created":\s*\d+', b'"created":0', raw)


def events(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


def engine_id(stream: bytes) -> str:
    """The request id the engine was given for a streamed answer (a client's made unique by the sidecar): its
    events' `id`, the object's prefix (`chatcmpl-`, `cmpl-`) taken off. The engine's own answer to a request with
    this id is the same answer."""
    first: dict[str, Any] = json.loads(events(stream)[0].removeprefix(b"data: "))
    return str(first["id"]).split("-", 1)[1]


def post_stream(url: str, body: dict[str, Any], request_id: str, key: str = KEY) -> bytes:
    headers = {"X-Request-ID": request_id} | bearer(key)
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        return response.read()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(stack: Stack) -> Samples:
    """The sidecar's /metrics now: (name, sorted labels) -> value."""
    text = httpx.get(f"{stack.url}/metrics").text  # open: no key needed by default
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)
