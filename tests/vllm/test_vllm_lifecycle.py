"""vLLM's processes under the sidecar's supervision: its EngineCore killed under a stream, the sidecar killed, the
sidecar stopped while vLLM starts; and vLLM started for embeddings. Each test has a sidecar and a vLLM of its own;
nothing of vLLM may be left."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from sidecar.dataplane.whole_usage import split_at_usage
from tests.processes import (
    SidecarProcess,
    bearer,
    command_lines,
    engine_key,
    group_members,
    is_gone,
    wait_until,
)
from tests.vllm.test_vllm import ADMIN, ARGS, DATA, ENV, LONG, MESSAGES, VLLM_PYTHON, model, pytestmark

__all__ = ["model", "pytestmark"]  # the module's model, and the tests' marks: skipped without vLLM

Start = Callable[..., SidecarProcess]


def _sidecar(start_sidecar: Start, **env: str) -> SidecarProcess:
    return start_sidecar(
        {
            "SIDECAR_API_KEYS": DATA["Authorization"].removeprefix("Bearer "),
            "SIDECAR_ADMIN_KEYS": ADMIN["Authorization"].removeprefix("Bearer "),
            "SIDECAR_ENGINE_EXECUTABLES": json.dumps({"vllm": str(VLLM_PYTHON)}),
            **env,
        }
    )


def _load_body(model: Path) -> dict[str, Any]:
    return {"engine": "vllm", "model": str(model), "args": ARGS, "env": ENV, "startup_timeout_s": 300}


def _load(sidecar: SidecarProcess, model: Path) -> dict[str, Any]:
    answer = httpx.post(f"{sidecar.url}/v1/model/load", json=_load_body(model), headers=ADMIN, timeout=330)
    assert answer.status_code == 200, f"{answer.text}\n{sidecar.output()[-3000:]}"
    loaded: dict[str, Any] = answer.json()
    return loaded


def _status(sidecar: SidecarProcess) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{sidecar.url}/v1/model", headers=ADMIN, timeout=10).json()
    return status


def _find_engine_core(pid: int) -> int | None:
    """vLLM's EngineCore: the process that holds the model, a child of its API server (`VLLM::EngineCore`, its
    command line as vLLM sets its title)."""
    for found, argv in command_lines(group_members(pid)).items():
        if "EngineCore" in " ".join(argv):
            return found
    return None


def _engine_core(pid: int) -> int:
    found = _find_engine_core(pid)
    assert found is not None, f"no EngineCore among {command_lines(group_members(pid))}"
    return found


def test_engine_core_killed_under_a_stream_ends_it_with_an_error_and_the_policy_restarts_vllm(
    start_sidecar: Start, model: Path
) -> None:
    sidecar = _sidecar(start_sidecar, SIDECAR_RESTART_MAX="1", SIDECAR_RESTART_BACKOFF_S="0.5")
    pid = _load(sidecar, model)["pid"]
    old = [process.pid for process in group_members(pid)]
    core = _engine_core(pid)  # found before the stream: a short answer can be over in half a second
    body = {"model": str(model), "messages": MESSAGES, "max_tokens": 480, "stream": True} | LONG
    lines: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{sidecar.url}/v1/chat/completions", json=body, headers=DATA, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    streaming.set()
        except httpx.HTTPError as exc:  # a cut connection is a clean end too: the client is told
            lines.append(f"transport error: {exc}")
        streaming.set()

    client = threading.Thread(target=stream)
    client.start()
    assert streaming.wait(60)
    os.kill(core, signal.SIGKILL)
    client.join(timeout=60)
    assert not client.is_alive()
    ended = "\n".join(lines[-6:])
    assert '"error"' in ended or "transport error" in ended, ended  # never a silent end
    assert "data: [DONE]" not in lines[:-1] or '"error"' in ended
    # vLLM's API server exits when its EngineCore dies; the sidecar notices and starts it again, once.
    wait_until(lambda: _status(sidecar)["restarts"] == 1 and _status(sidecar)["state"] == "ready", timeout_s=300)
    assert _status(sidecar)["pid"] != pid
    wait_until(lambda: group_members(pid) == [], timeout_s=30)  # the first vLLM's processes, all of them
    assert all(is_gone(p) for p in old)
    again = httpx.post(
        f"{sidecar.url}/v1/chat/completions",
        json={"model": str(model), "messages": MESSAGES, "max_tokens": 2},
        headers=DATA,
        timeout=60,
    )
    assert again.status_code == 200, again.text


def test_vllm_dies_with_a_sidecar_killed_by_sigkill(start_sidecar: Start, model: Path) -> None:
    sidecar = _sidecar(start_sidecar, SIDECAR_KILL_GRACE_S="2")
    pid = _load(sidecar, model)["pid"]
    assert len(group_members(pid)) >= 2
    sidecar.process.kill()
    sidecar.process.wait()
    wait_until(lambda: group_members(pid) == [], timeout_s=30)


def test_sigterm_while_vllm_starts_answers_the_load_and_leaves_nothing(start_sidecar: Start, model: Path) -> None:
    sidecar = _sidecar(start_sidecar)
    answered: list[httpx.Response] = []

    def load() -> None:
        answered.append(httpx.post(f"{sidecar.url}/v1/model/load", json=_load_body(model), headers=ADMIN, timeout=330))

    loading = threading.Thread(target=load)
    loading.start()
    wait_until(lambda: _status(sidecar)["pid"] is not None, timeout_s=30)
    pid = _status(sidecar)["pid"]
    # Well into vLLM's start-up: its EngineCore is there.
    wait_until(lambda: _find_engine_core(pid) is not None, timeout_s=120)
    sidecar.process.send_signal(signal.SIGTERM)
    loading.join(timeout=60)
    assert answered and answered[0].status_code == 503, answered
    assert answered[0].json()["error"]["code"] == "shutting_down"
    assert sidecar.wait_exit(60) in (0, -signal.SIGTERM)
    wait_until(lambda: group_members(pid) == [], timeout_s=30)


def test_a_pooling_models_embeddings_are_vllms_own_bytes_with_performance_in_their_usage(
    start_sidecar: Start, model: Path, openai_client: Callable[..., OpenAI]
) -> None:
    """The model served for embeddings (`--runner pooling`): vLLM writes its answer from its arrays, the usage last,
    and the sidecar passes the vectors on as vLLM wrote them, `performance` written into the usage; the OpenAI
    SDK, which asks for base64, gets the same vectors."""
    sidecar = _sidecar(start_sidecar)
    load = _load_body(model) | {"args": ARGS | {"runner": "pooling"}}
    answer = httpx.post(f"{sidecar.url}/v1/model/load", json=load, headers=ADMIN, timeout=330)
    assert answer.status_code == 200, f"{answer.text}\n{sidecar.output()[-3000:]}"
    loaded = answer.json()
    request = {"model": str(model), "input": ["a clock", "two clocks ticking"]}
    through = httpx.post(f"{sidecar.url}/v1/embeddings", json=request, headers=DATA, timeout=60)
    own_auth = bearer(engine_key(loaded["pid"], "VLLM_API_KEY"))
    direct = httpx.post(f"http://127.0.0.1:{loaded['port']}/v1/embeddings", json=request, headers=own_auth, timeout=60)
    assert through.status_code == direct.status_code == 200, through.text

    def vectors(raw: bytes) -> bytes:
        return raw[raw.index(b'"data":') : raw.rindex(b'"usage":')]

    assert vectors(through.content) == vectors(direct.content)  # vLLM's own bytes
    assert split_at_usage([direct.content]) is not None  # a shape the sidecar reads unparsed
    answered, own = through.json(), direct.json()
    performance = answered["usage"].pop("performance")
    assert answered["usage"] == own["usage"] and performance["prompt_tokens"] == own["usage"]["prompt_tokens"]
    assert json.loads(through.headers["x-performance-metrics"]) == performance and performance["total_ms"] > 0
    client = openai_client(sidecar, DATA["Authorization"].removeprefix("Bearer "))
    decoded = client.embeddings.create(model=str(model), input=request["input"])
    assert [item.embedding for item in decoded.data] == [item["embedding"] for item in own["data"]]
