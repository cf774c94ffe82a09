"""A real engine nobody here wrote: llama-cpp-python's OpenAI server behind the sidecar, on the CPU.

The model is a tiny random-weight llama written at test time (`bench/gguf_llama.py`): greedy answers are one
printable character a token and always run to `max_tokens`. The tests run in file order on one engine; the
last one unloads it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

import engines
from bench.gguf_llama import write_tiny_llama
from tests.processes import (
    OpenAIClients,
    SidecarProcess,
    bearer,
    engine_key,
    group_members,
    is_gone,
    read_timed,
    running,
    wait_until,
)

pytestmark = pytest.mark.slow

API_KEY = "llama-api-key-0123"
ADMIN_KEY = "llama-admin-key-4567"
SERVED = "tiny-llama"
MESSAGES: Any = [{"role": "user", "content": "Name three clocks."}]
# llama.cpp's own report at the end of each completion, in the engine's output.
PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
EVAL = re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs")
# Client and sidecar clocks differ by the loopback hop and the SDK's parsing: bounded even on a loaded machine.
CLOCK_TOLERANCE_MS = 250


class Llama:
    def __init__(self, sidecar: SidecarProcess, loaded: dict[str, Any]) -> None:
        self.sidecar = sidecar
        self.loaded = loaded
        self.clients = OpenAIClients()  # closed with the module's server

    def client(self) -> OpenAI:
        return self.clients(f"{self.sidecar.url}/v1", API_KEY, timeout=60)

    def engine_reports(self) -> list[tuple[float, int, float, int]]:
        """llama.cpp's timings so far: (prompt eval ms, prompt tokens, eval ms, eval runs), one per completion."""
        output = self.sidecar.output()
        prompts = PROMPT_EVAL.findall(output)
        evals = EVAL.findall(output)
        return [(float(p[0]), int(p[1]), float(e[0]), int(e[1])) for p, e in zip(prompts, evals, strict=False)]

    def next_engine_report(self, before: int) -> tuple[float, int, float, int]:
        wait_until(lambda: len(self.engine_reports()) > before, timeout_s=10)
        return self.engine_reports()[before]

    def engine_auth(self) -> dict[str, str]:
        """The key the sidecar gave llama-cpp-python, which its every route needs."""
        return bearer(engine_key(self.loaded["pid"], "API_KEY"))

    def engines_own_usage(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The usage llama-cpp-python itself reports for a whole (non-streamed) answer: asked on its own port."""
        url = f"http://127.0.0.1:{self.loaded['port']}{path}"
        response = httpx.post(url, json=body, headers=self.engine_auth(), timeout=60)
        assert response.status_code == 200, response.text
        usage: dict[str, Any] = response.json()["usage"]
        return usage


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    workdir = tmp_path_factory.mktemp("llama")
    model = write_tiny_llama(workdir / "tiny.gguf")
    with running(workdir, {"SIDECAR_API_KEYS": API_KEY, "SIDECAR_ADMIN_KEYS": ADMIN_KEY}) as sidecar:
        body = {"engine": "llamacpp", "model": str(model), "served_model_name": SERVED, "args": {"n_ctx": 4096}}
        served = Llama(sidecar, sidecar.loaded(ADMIN_KEY, **body))
        try:
            yield served
        finally:
            served.clients.close()


def test_loaded_through_the_control_plane_and_listed(llama: Llama) -> None:
    assert (llama.loaded["state"], llama.loaded["engine"], llama.loaded["served_model_name"]) == (
        "ready",
        "llamacpp",
        SERVED,
    )
    assert httpx.get(f"{llama.sidecar.url}/ready").status_code == 200
    models = llama.client().models.list()
    assert [m.id for m in models.data] == [SERVED]


def test_clients_reach_the_engines_data_paths_and_none_of_its_others(llama: Llama) -> None:
    """The passthrough's allow-list against the real engine: what it lists the engine serves; a route the engine
    has but the sidecar does not expose is a 404 from the sidecar, and the engine never sees it."""
    data = {"Authorization": f"Bearer {API_KEY}"}
    adapter = engines.adapter("llamacpp", sys.executable)
    for entry in adapter.data_paths:
        method, path = entry.split(" ")
        if method == "GET":
            answered = httpx.get(f"{llama.sidecar.url}{path}", headers=data, timeout=30)
            assert answered.status_code == 200, (entry, answered.text)
    engine = f"http://127.0.0.1:{llama.loaded['port']}"
    hidden = "/v1/engines/copilot-codex/completions"  # llama-cpp-python's, not an OpenAI data-plane path
    body = {"prompt": "hi", "max_tokens": 1}
    before = len(llama.engine_reports())
    assert httpx.post(f"{engine}{hidden}", json=body, headers=llama.engine_auth(), timeout=60).status_code == 200
    # the engine has it, and answers it to the sidecar alone: the key the sidecar gave it guards every route
    assert httpx.post(f"{engine}{hidden}", json=body, headers=data, timeout=60).status_code == 401
    llama.next_engine_report(before)  # its completion's report, logged
    before = len(llama.engine_reports())
    refused = httpx.post(f"{llama.sidecar.url}{hidden}", json=body, headers=data, timeout=30)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert len(llama.engine_reports()) == before  # no completion ran for it


def test_streamed_chat_measured_as_llama_cpp_and_the_clients_clock_see_it(llama: Llama) -> None:
    before = len(llama.engine_reports())
    completions = llama.client().chat.completions  # the SDK's first-use costs kept off the client's clock
    clock = read_timed(
        lambda: completions.create(
            model=SERVED,
            messages=MESSAGES,
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    chunks = clock.chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 48 and text.isprintable()

    # llama-cpp-python sends no usage chunk: the sidecar adds one, with the streamed tokens counted and the prompt
    # counted by the engine's tokenizer: the messages' text, without the chat template's tokens (at most the
    # engine's own count, which has them).
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and chunks[-1].id == chunks[0].id
    assert usage.completion_tokens == 48
    exact = llama.engines_own_usage("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert 0 < usage.prompt_tokens <= exact["prompt_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + 48
    performance: dict[str, Any] = usage.model_dump()["performance"]
    assert performance["completion_tokens"] == 48 and performance["tokens_estimated"] is True
    assert performance["prompt_tokens"] == usage.prompt_tokens
    assert (performance["engine"], performance["model"]) == ("llamacpp", SERVED)

    # The client's clock: it starts earlier and ends later than the sidecar's, by no more than the hop. The
    # sidecar's clock stops at the end of the engine's stream; the client's usage chunk then waits for the
    # engine's count of the prompt, which is not the engine's generation time: compared with the last token.
    client_ttft_ms = (clock.first_content - clock.started) * 1000
    client_total_ms = (clock.finished - clock.started) * 1000
    assert client_ttft_ms - CLOCK_TOLERANCE_MS <= performance["ttft_ms"] <= client_ttft_ms
    assert performance["ttft_ms"] <= performance["latency_ms"] <= performance["total_ms"] <= client_total_ms
    assert performance["total_ms"] >= (clock.last_content - clock.started) * 1000 - CLOCK_TOLERANCE_MS
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 48  # one token a chunk
    assert_tpot_by_the_rule(performance, 48)

    # llama.cpp's own timings: a decode run a token (the first may come with the prompt's), all of its compute
    # inside the latency the sidecar measured.
    prompt_ms, _, eval_ms, runs = llama.next_engine_report(before)
    assert runs in (47, 48)
    assert performance["ttft_ms"] >= prompt_ms
    assert performance["latency_ms"] >= prompt_ms + eval_ms


def assert_tpot_by_the_rule(performance: dict[str, Any], tokens: int) -> None:
    """TPOT and ITL by the rule, not a value load can take away: output read all at once has no observed gap.

    Under load llama-cpp-python's events can reach the sidecar in one read; then TPOT and ITL are null by design.
    """
    if performance["coalesced_events"] == tokens - 1:
        assert performance["tpot_ms"] is None and performance["itl_ms"] is None
        assert performance["ttft_ms"] == performance["latency_ms"]
        return
    assert 0 < performance["itl_ms"]["p50"] <= performance["itl_ms"]["max"] <= performance["latency_ms"]
    expected_tpot = (performance["latency_ms"] - performance["ttft_ms"]) / (tokens - 1)
    assert performance["tpot_ms"] == pytest.approx(expected_tpot, abs=0.01)


def test_a_non_streamed_chat_is_llama_cpps_own_whole_answer_with_its_exact_usage(llama: Llama) -> None:
    """llama-cpp-python streams no usage, and a chat's prompt cannot be counted as it counts it (with its chat
    template): an answer assembled from its stream would carry a usage that is not its own. So a non-streaming
    request goes to it as it is: its answer, its usage, measured but for a TTFT."""
    body: dict[str, Any] = {"model": SERVED, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    started = time.perf_counter()
    through = httpx.post(f"{llama.sidecar.url}/v1/chat/completions", json=body, headers=bearer(API_KEY), timeout=60)
    elapsed_ms = (time.perf_counter() - started) * 1000
    url = f"http://127.0.0.1:{llama.loaded['port']}/v1/chat/completions"
    direct = httpx.post(url, json=body, headers=llama.engine_auth(), timeout=60)
    assert through.status_code == direct.status_code == 200, through.text
    answer, own = through.json(), direct.json()
    performance = answer["usage"].pop("performance")
    for key in ("id", "created"):  # each answer's own
        del answer[key], own[key]
    assert answer == own and len(own["choices"][0]["message"]["content"]) == 16
    assert own["usage"]["prompt_tokens"] > 16  # the chat template's tokens counted: more than the messages' words
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (own["usage"]["prompt_tokens"], 16)
    assert "tokens_estimated" not in performance
    assert performance["ttft_ms"] is None and 0 < performance["latency_ms"] <= elapsed_ms


def test_text_completions_streamed_and_whole(llama: Llama) -> None:
    client = llama.client()
    stream = client.completions.create(
        model=SERVED,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.model_dump()["performance"]["ttft_ms"] > 0
    # A text prompt is counted exactly: the engine's tokenizer on the prompt, as the engine itself counts it.
    exact = llama.engines_own_usage("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12})
    assert usage.prompt_tokens == exact["prompt_tokens"] > 0 and usage.total_tokens == exact["total_tokens"]

    whole = client.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == streamed  # greedy: the same either way
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        exact["prompt_tokens"],
        12,
    )
    assert whole.usage.model_dump()["performance"]["ttft_ms"] is None  # not streamed: the engine's own answer


def test_client_disconnect_stops_llama_cpp_generating(llama: Llama) -> None:
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{llama.sidecar.url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        content_events = 0
        while content_events < 5:
            if '"content"' in next(lines):
                content_events += 1
    # Closing the response drops the connection; the sidecar drops its own to the engine, which stops.
    wait_until(lambda: "Disconnected from client" in llama.sidecar.output(), timeout_s=10)
    reports = llama.engine_reports()
    assert all(runs < 3000 - 1 for *_, runs in reports)
    # The engine is free again: the next request is answered.
    after = llama.client().chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=0)
    assert len(after.choices[0].message.content or "") == 4


def test_a_client_request_id_that_is_not_a_uuid_is_kept_and_the_engine_accepts_the_request(llama: Llama) -> None:
    response = llama.client().chat.completions.with_raw_response.create(
        model=SERVED, messages=MESSAGES, max_tokens=4, extra_headers={"X-Request-ID": "job-42"}
    )
    assert response.http_response.status_code == 200
    assert response.headers["x-request-id"] == "job-42"
    assert response.parse().usage.completion_tokens == 4
    record = httpx.get(f"{llama.sidecar.url}/v1/requests/job-42", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert record["status"] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_means_the_same_as_behind_any_engine(llama: Llama, stream: bool) -> None:
    body: dict[str, Any] = {"model": SERVED, "messages": MESSAGES, "max_completion_tokens": 8}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(
        f"{llama.sidecar.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    if stream:
        usage = json.loads(response.text.split("data: ")[-2])["usage"]
    else:
        usage = response.json()["usage"]
    assert usage["completion_tokens"] == 8


# Last: it unloads the engine the module's other tests share.
def test_unload_leaves_no_process(llama: Llama) -> None:
    pid = llama.loaded["pid"]
    members = group_members(pid)
    assert members, "the engine runs in its own process group"
    response = httpx.post(
        f"{llama.sidecar.url}/v1/model/unload",
        json={"drain_timeout_s": 5},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["state"] == "idle"
    assert group_members(pid) == []
    assert all(is_gone(p.pid) for p in members)
    assert httpx.get(f"{llama.sidecar.url}/ready").status_code == 503
