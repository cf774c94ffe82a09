"""llama.cpp's own server, llama-server, behind the sidecar on the CPU: the engine llama.cpp's images run.

The binary comes from `bench/install_llama_server.sh` (`.ci/run` runs it), built from the llama.cpp that
llama-cpp-python vendors; `SIDECAR_TEST_LLAMA_SERVER` names another. Without one, every test here is skipped,
naming the script. The model is the tiny random-weight llama of `bench/gguf_llama.py`: greedy answers are one
printable character a token and run to `max_tokens`. One server serves the module; the tests run in file order
and the last one unloads it. The whole answers are compared with the engine's own, asked on its port with
`cache_prompt: false` on both sides, so that the prompt cache's counts are the same either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from openai import OpenAI

import engines
from bench.gguf_llama import write_tiny_llama
from engines.llamacpp import LlamaCppAdapter
from sidecar.dataplane.whole_usage import split_at_usage
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

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = Path(os.environ.get("SIDECAR_TEST_LLAMA_SERVER", REPO / ".llama-server" / "bin" / "llama-server"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not LLAMA_SERVER.exists(),
        reason=f"llama-server is not built at {LLAMA_SERVER}: run bench/install_llama_server.sh",
    ),
]

API_KEY = "llama-server-api-key-0123"
ADMIN_KEY = "llama-server-admin-key-4567"
SERVED = "tiny-llama-server"
MESSAGES: Any = [{"role": "user", "content": "Name three clocks."}]
CONTEXT = 4096
# Embeddings beside generation: llama-server serves both with a pooling type OpenAI's API can return.
ARGS = {"ctx-size": CONTEXT, "embeddings": True, "pooling": "mean"}
NO_CACHE = {"cache_prompt": False}  # llama-server's own: the prompt evaluated afresh, its counts the same each time
# Client and sidecar clocks differ by the loopback hop and the SDK's parsing: bounded even on a loaded machine.
CLOCK_TOLERANCE_MS = 250
# llama-server's log line when a slot stops: how many tokens it held (prompt and generated).
RELEASED = re.compile(r"task (\d+) \| stop processing: n_tokens = (\d+)")


class LlamaServer:
    def __init__(self, sidecar: SidecarProcess, loaded: dict[str, Any]) -> None:
        self.sidecar = sidecar
        self.loaded = loaded
        self.engine = f"http://127.0.0.1:{loaded['port']}"
        self.clients = OpenAIClients()  # closed with the module's server

    def client(self) -> OpenAI:
        return self.clients(f"{self.sidecar.url}/v1", API_KEY, timeout=60)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.sidecar.url, api_key=API_KEY, timeout=60, max_retries=0)

    def engine_auth(self) -> dict[str, str]:
        """The key the sidecar gave this start of llama-server, which its every path but /health needs."""
        return bearer(engine_key(self.loaded["pid"], "LLAMA_API_KEY"))

    def own(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """llama-server's own answer to `body`, asked on its port."""
        answer = httpx.post(f"{self.engine}{path}", json=body, headers=self.engine_auth(), timeout=60)
        assert answer.status_code == 200, answer.text
        own: dict[str, Any] = answer.json()
        return own

    def through(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = httpx.post(f"{self.sidecar.url}{path}", json=body, headers=bearer(API_KEY), timeout=60)
        assert answer.status_code == 200, answer.text
        through: dict[str, Any] = answer.json()
        return through


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    workdir = tmp_path_factory.mktemp("llama-server")
    model = write_tiny_llama(workdir / "tiny.gguf")
    settings = {
        "SIDECAR_API_KEYS": API_KEY,
        "SIDECAR_ADMIN_KEYS": ADMIN_KEY,
        "SIDECAR_ENGINE_EXECUTABLES": json.dumps({"llamacpp": str(LLAMA_SERVER)}),
    }
    with running(workdir, settings) as sidecar:
        loaded = sidecar.loaded(ADMIN_KEY, engine="llamacpp", model=str(model), served_model_name=SERVED, args=ARGS)
        served = LlamaServer(sidecar, loaded)
        try:
            yield served
        finally:
            served.clients.close()


def test_loaded_with_its_key_in_its_environment_alone(llama: LlamaServer) -> None:
    assert (llama.loaded["state"], llama.loaded["engine"]) == ("ready", "llamacpp")
    assert [m.id for m in llama.client().models.list().data] == [SERVED]
    engine = group_members(llama.loaded["pid"])[0]
    command = " ".join(engine.cmdline())
    assert command.startswith(str(LLAMA_SERVER)) and "--metrics" in command and f"--alias {SERVED}" in command
    assert "--embeddings --pooling mean" in command
    key = engine_key(llama.loaded["pid"], "LLAMA_API_KEY")
    assert key not in command and API_KEY not in command
    assert API_KEY not in json.dumps(engine.environ()) and ADMIN_KEY not in json.dumps(engine.environ())
    # The engine answers the sidecar alone: a client's key, or none, is refused on its own port.
    for headers in ({}, bearer(API_KEY)):
        assert httpx.get(f"{llama.engine}/v1/models", headers=headers, timeout=10).status_code == 401


def test_clients_reach_the_engines_data_paths_and_none_of_its_others(llama: LlamaServer) -> None:
    adapter = engines.adapter("llamacpp", str(LLAMA_SERVER))
    assert isinstance(adapter, LlamaCppAdapter)
    for entry in adapter.data_paths:
        method, path = entry.split(" ")
        if method == "GET":
            assert httpx.get(f"{llama.sidecar.url}{path}", headers=bearer(API_KEY), timeout=30).status_code == 200
    # Its own administrative paths (its settings, its slots' prompts, saving a slot to disk) are the sidecar's
    # to hide: the engine has them, the client gets a 404 from the sidecar.
    for path in ("/props", "/slots"):
        assert httpx.get(f"{llama.engine}{path}", headers=llama.engine_auth(), timeout=10).status_code == 200
        refused = httpx.get(f"{llama.sidecar.url}{path}", headers=bearer(API_KEY), timeout=10)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"


def test_a_streamed_chat_carries_llama_cpps_own_usage_and_timings_and_the_clients_clock_sees_it(
    llama: LlamaServer,
) -> None:
    completions = llama.client().chat.completions  # the SDK's first-use costs kept off the client's clock
    clock = read_timed(
        lambda: completions.create(
            model=SERVED,
            messages=MESSAGES,
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_CACHE,
        )
    )
    chunks = clock.chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 48 and text.isprintable()

    # llama-server streams its usage: the client's usage chunk is the engine's, with performance added.
    own = llama.own("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 48, "temperature": 0} | NO_CACHE)
    last = chunks[-1].model_dump(exclude_unset=True)
    performance = last["usage"].pop("performance")
    assert last["usage"] == own["usage"] and own["usage"]["completion_tokens"] == 48
    assert own["choices"][0]["message"]["content"] == text
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (own["usage"]["prompt_tokens"], 48)
    assert "tokens_estimated" not in performance

    # Its own timings, as it reported them; its compute inside what the sidecar measured.
    timings = last["timings"]
    assert performance["engine_timings"] == timings and timings["predicted_n"] == 48
    assert performance["ttft_ms"] >= timings["prompt_ms"]
    assert performance["latency_ms"] >= timings["prompt_ms"] + timings["predicted_ms"]
    client_ttft_ms = (clock.first_content - clock.started) * 1000
    assert client_ttft_ms - CLOCK_TOLERANCE_MS <= performance["ttft_ms"] <= client_ttft_ms
    assert performance["total_ms"] <= (clock.finished - clock.started) * 1000
    if performance["tpot_ms"] is not None:  # null only where every token came in one read
        expected = (performance["latency_ms"] - performance["ttft_ms"]) / 47
        assert performance["tpot_ms"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    "asked",
    [{}, {"logprobs": True, "top_logprobs": 2}, {"return_progress": True}],
    ids=["plain", "logprobs", "progress"],
)
def test_a_non_streamed_chat_is_assembled_into_llama_cpps_own_whole_answer(
    llama: LlamaServer, asked: dict[str, Any]
) -> None:
    """Streamed from the engine for its TTFT, the answer assembled is the one the engine writes unstreamed: every
    field, in the engine's shape (no `logprobs` it leaves out), but each answer's own id, time and timings."""
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 16, "temperature": 0} | NO_CACHE | asked
    through, own = llama.through("/v1/chat/completions", body), llama.own("/v1/chat/completions", body)
    performance = through["usage"].pop("performance")
    for key in ("id", "created", "timings"):
        del through[key], own[key]
    assert through == own and len(own["choices"][0]["message"]["content"]) == 16
    assert performance["ttft_ms"] is not None and 0 < performance["ttft_ms"] <= performance["latency_ms"]
    assert performance["completion_tokens"] == 16


def test_text_completions_streamed_and_whole_are_its_own(llama: LlamaServer) -> None:
    body: Any = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    own = llama.own("/v1/completions", body | NO_CACHE)
    stream = llama.client().completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_body=NO_CACHE
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == own["choices"][0]["text"]
    usage = chunks[-1].model_dump(exclude_unset=True)["usage"]
    assert usage.pop("performance")["ttft_ms"] > 0 and usage == own["usage"]

    through = llama.through("/v1/completions", body | NO_CACHE)
    assert through["usage"].pop("performance")["completion_tokens"] == 12
    for key in ("id", "created", "timings"):
        del through[key], own[key]
    assert through == own


def test_anthropics_messages_api_streamed_and_whole_with_its_sdk(llama: LlamaServer) -> None:
    """The Messages API llama-server serves: the same greedy text as its chat, measured, streamed or whole."""
    chat = llama.own("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    client = llama.anthropic()
    fields: Any = {"model": SERVED, "messages": MESSAGES, "max_tokens": 12, "extra_body": {"temperature": 0}}
    with client.messages.stream(**fields) as stream:
        events = list(stream)
        final = stream.get_final_message()
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == chat["choices"][0]["message"]["content"] and len(text) == 12
    ends = [e for e in events if e.type == "message_delta"]
    assert len(ends) == 1 and ends[0].delta.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    performance = ends[0].usage.model_extra["performance"]  # type: ignore[index]
    # The prompt is the chat's: the tokens it evaluated and those its cache held, which the API counts apart.
    assert (performance["prompt_tokens"], performance["completion_tokens"]) == (chat["usage"]["prompt_tokens"], 12)
    assert 0 < performance["ttft_ms"] <= performance["latency_ms"]

    # A whole message is built from its stream (for its TTFT): the one llama-server writes whole, nulls and all.
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{llama.sidecar.url}/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    own = llama.own("/v1/messages", body)
    answer = whole.json()
    header = json.loads(whole.headers["x-performance-metrics"])
    assert answer["usage"].pop("performance") == header and answer.pop("id") != own.pop("id")
    assert answer == own and answer["content"] == [{"type": "text", "text": text}] and "stop_sequence" in answer
    assert (header["prompt_tokens"], header["completion_tokens"]) == (chat["usage"]["prompt_tokens"], 12)
    assert 0 < header["ttft_ms"] <= header["latency_ms"]
    counted = client.messages.count_tokens(model=SERVED, messages=MESSAGES)
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]


def test_several_choices_are_all_counted_where_it_reports_each_apart(llama: LlamaServer) -> None:
    """With `n`, llama-server reports each choice's usage apart (a chat's in a usage chunk for each, a completion's
    in the chunk where the choice ends) and its whole answer has one choice's: `performance` counts them all, at
    the end of the last; the rest goes as llama-server wrote it."""
    client = llama.client()
    fields: Any = {"model": SERVED, "max_tokens": 8, "n": 2, "temperature": 1}
    chat = list(
        client.chat.completions.create(**fields, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    )
    usages = [c.usage.model_dump() for c in chat if c.usage is not None]
    assert len(usages) == 2 and usages[0]["completion_tokens"] == usages[1]["completion_tokens"] == 8
    assert "performance" not in usages[0] and usages[1]["performance"]["completion_tokens"] == 16
    assert {len("".join(c.choices[0].delta.content or "" for c in chat if c.choices and c.choices[0].index == i))
            for i in (0, 1)} == {8}  # fmt: skip

    text = list(client.completions.create(**fields, prompt="tick", stream=True, stream_options={"include_usage": True}))
    usages = [c.usage.model_dump() for c in text if c.usage is not None]
    assert [u["completion_tokens"] for u in usages] == [8, 8, 8]  # the two choices' own, then the sidecar's chunk
    assert text[-1].choices == [] and usages[-1]["performance"]["completion_tokens"] == 16

    for path, asked in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "tick"})):
        own, through = llama.own(path, fields | asked), llama.through(path, fields | asked)
        performance = through["usage"].pop("performance")
        assert through["usage"]["completion_tokens"] == own["usage"]["completion_tokens"] == 8  # its own words
        assert performance["completion_tokens"] == 16 and len(through["choices"]) == 2


def test_embeddings_are_its_own_with_their_usage_measured(llama: LlamaServer) -> None:
    raw = llama.client().embeddings.with_raw_response.create(model=SERVED, input=["a clock", "two clocks ticking"])
    through = raw.parse()
    own = llama.own("/v1/embeddings", {"model": SERVED, "input": ["a clock", "two clocks ticking"]})
    assert [item.embedding for item in through.data] == [item["embedding"] for item in own["data"]]
    performance = json.loads(raw.headers["x-performance-metrics"])
    assert through.usage.model_dump()["performance"] == performance
    assert (through.usage.prompt_tokens, through.usage.total_tokens) == (
        own["usage"]["prompt_tokens"],
        own["usage"]["total_tokens"],
    )
    assert performance["prompt_tokens"] == own["usage"]["prompt_tokens"] > 0 and performance["latency_ms"] > 0
    # Its usage comes after its model and object, before its data: `performance` is written in there, the rest of
    # the answer goes on as llama-server wrote it.
    request = {"model": SERVED, "input": ["a clock"], "encoding_format": "float"}
    raw_through = httpx.post(f"{llama.sidecar.url}/v1/embeddings", json=request, headers=bearer(API_KEY), timeout=60)
    raw_own = httpx.post(f"{llama.engine}/v1/embeddings", json=request, headers=llama.engine_auth(), timeout=60)
    usage_at, data_at = raw_own.content.index(b'"usage"'), raw_own.content.index(b'"data"')
    assert usage_at < data_at and split_at_usage([raw_own.content]) is not None  # a shape read unparsed
    assert raw_through.content.startswith(raw_own.content[:usage_at])
    assert raw_through.content.endswith(raw_own.content[data_at:])


def test_a_prompt_past_the_context_is_its_own_400_with_its_figures(llama: LlamaServer) -> None:
    """llama-server refuses it before any work, saying how long the prompt was and the context: the chat's error
    in the OpenAI shape with its figures kept, streamed or not; the Messages API's as it wrote it."""
    long: Any = [{"role": "user", "content": "clock " * 1000}]
    for stream in (False, True):
        body = {"model": SERVED, "messages": long, "max_tokens": 4, "stream": stream}
        answer = httpx.post(f"{llama.sidecar.url}/v1/chat/completions", json=body, headers=bearer(API_KEY), timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert (error["type"], error["code"], error["n_ctx"]) == ("exceed_context_size_error", None, CONTEXT)
        assert error["n_prompt_tokens"] > CONTEXT and "exceeds the available context size" in error["message"]
    with pytest.raises(anthropic.BadRequestError) as raised:
        llama.anthropic().messages.create(model=SERVED, messages=long, max_tokens=4)
    assert isinstance(raised.value.body, dict) and raised.value.body["error"]["n_ctx"] == CONTEXT


def test_the_engines_load_is_read_under_the_sidecars_names(llama: LlamaServer) -> None:
    """llama-server's requests processing is the sidecar's running gauge while a stream is at the engine. (Its
    KV cache gauge is gone from llama.cpp since its pull request 13660: none is made up.)"""

    def running() -> float | None:
        text = httpx.get(f"{llama.sidecar.url}/metrics", timeout=10).text
        assert "sidecar_engine_kv_cache_usage_ratio{" not in text
        for line in text.splitlines():
            if line.startswith("sidecar_engine_running_requests{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    assert running() == 0
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": CONTEXT, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{llama.sidecar.url}/v1/chat/completions", json=body, headers=bearer(API_KEY)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if '"content"' in line)
        assert running() == 1  # its generation runs to the context's end: seconds on these cores
    wait_until(lambda: running() == 0, timeout_s=10)


def test_a_client_gone_mid_stream_cancels_the_engines_task(llama: LlamaServer) -> None:
    prompt_tokens = llama.own("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})["usage"]["prompt_tokens"]
    asked = CONTEXT - prompt_tokens
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": asked, "temperature": 0, "stream": True}
    output = llama.sidecar.output()
    released, cancelled = len(RELEASED.findall(output)), output.count("cancel task")
    with httpx.stream("POST", f"{llama.sidecar.url}/v1/chat/completions", json=body, headers=bearer(API_KEY)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5):
            next(line for line in lines if '"content"' in line)
    # Closing the response drops the connection; the sidecar drops its own to the engine, which cancels the task.
    wait_until(lambda: llama.sidecar.output().count("cancel task") > cancelled, timeout_s=10)
    wait_until(lambda: len(RELEASED.findall(llama.sidecar.output())) > released, timeout_s=10)
    _, held = RELEASED.findall(llama.sidecar.output())[released]
    assert int(held) < prompt_tokens + asked
    after = llama.client().chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=0)
    assert len(after.choices[0].message.content or "") == 4


# Last: it unloads the engine the module's other tests share.
def test_unload_leaves_no_process(llama: LlamaServer) -> None:
    members = group_members(llama.loaded["pid"])
    assert members, "the engine runs in its own process group"
    response = httpx.post(f"{llama.sidecar.url}/v1/model/unload", headers=bearer(ADMIN_KEY), timeout=60)
    assert response.status_code == 200 and response.json()["state"] == "idle"
    assert group_members(llama.loaded["pid"]) == []
    assert all(is_gone(p.pid) for p in members)
