"""Idle unload and load on demand, with the real sidecar and the mock engine as processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.processes import SidecarProcess, is_gone, wait_until

Start = Callable[..., SidecarProcess]
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _load(sidecar: SidecarProcess, **body: Any) -> httpx.Response:
    request = {"engine": "mock", "model": "m", "args": {"ttft-ms": 5, "itl-ms": 5}} | body
    return httpx.post(f"{sidecar.url}/v1/model/load", json=request, timeout=30)


def _log_events(sidecar: SidecarProcess, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


JSON_LOGS = {"SIDECAR_LOG_FORMAT": "json"}


def test_an_engine_without_requests_for_its_ttl_is_unloaded_and_then_answers_503(start_sidecar: Start) -> None:
    sidecar = start_sidecar(JSON_LOGS)
    loaded = _load(sidecar, ttl_s=1.0)
    assert loaded.status_code == 200, loaded.text
    pid = loaded.json()["pid"]
    status = sidecar.status()
    assert status["ttl_s"] == 1.0 and 0 < status["idle_unload_in_s"] <= 1.0

    # A request in flight for longer than the TTL keeps the engine; the count starts again when it ends.
    assert sidecar.chat(itl_ms=500).status_code == 200  # 4 tokens: about 1.5 s
    assert sidecar.status()["state"] == "ready" and sidecar.status()["idle_unload_in_s"] > 0.5

    idle_s = wait_until(lambda: sidecar.status()["state"] == "idle", timeout_s=10)
    assert idle_s == pytest.approx(1.0, abs=0.8)
    assert is_gone(pid)
    (unload,) = _log_events(sidecar, "model_unload")
    assert unload["reason"] == "idle" and unload["engine"] == "mock"
    status = sidecar.status()
    assert status["ttl_s"] is None and status["idle_unload_in_s"] is None

    answered = sidecar.chat()
    assert answered.status_code == 503 and answered.headers["retry-after"]
    error = answered.json()["error"]
    assert error["code"] == "model_unloaded_idle" and "'m' was unloaded after its ttl_s" in error["message"]


def test_the_default_ttl_applies_to_every_load_and_a_load_of_its_own_wins(start_sidecar: Start) -> None:
    sidecar = start_sidecar({"SIDECAR_DEFAULT_TTL_S": "60", **JSON_LOGS})
    assert _load(sidecar).status_code == 200
    assert sidecar.status()["ttl_s"] == 60.0
    assert _load(sidecar, ttl_s=0.5, replace=True).status_code == 200
    assert sidecar.status()["ttl_s"] == 0.5
    wait_until(lambda: sidecar.status()["state"] == "idle", timeout_s=10)


def test_without_a_ttl_the_engine_stays(start_sidecar: Start) -> None:
    sidecar = start_sidecar()
    assert _load(sidecar).status_code == 200
    status = sidecar.status()
    assert status["ttl_s"] is None and status["idle_unload_in_s"] is None


@pytest.mark.parametrize("ttl", [0, -1, "soon", True])
def test_a_bad_ttl_is_a_400_and_changes_nothing(start_sidecar: Start, ttl: Any) -> None:
    sidecar = start_sidecar()
    assert _load(sidecar).status_code == 200
    before = sidecar.status()
    answered = _load(sidecar, ttl_s=ttl, replace=True)
    assert answered.status_code == 400 and answered.json()["error"]["param"] == "ttl_s"
    after = sidecar.status()
    assert (after["state"], after["pid"], after["ttl_s"]) == ("ready", before["pid"], None)


def test_load_on_demand_brings_the_model_back_once_for_the_requests_that_wait(start_sidecar: Start) -> None:
    sidecar = start_sidecar({"SIDECAR_LOAD_ON_DEMAND": "true", **JSON_LOGS})
    first_pid = _load(sidecar, ttl_s=0.5, args={"ttft-ms": 5, "itl-ms": 5, "startup-delay-s": 0.5}).json()["pid"]
    wait_until(lambda: sidecar.status()["state"] == "idle", timeout_s=10)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: sidecar.chat(), range(3)))
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    status = sidecar.status()
    assert status["state"] == "ready" and status["pid"] != first_pid and status["ttl_s"] == 0.5
    assert len(_log_events(sidecar, "model_load_on_demand")) == 1  # one load for the three
    assert len(_log_events(sidecar, "model_ready")) == 2
    # The wait for the load is the requests' queue time, not the engine's TTFT.
    performances = [a.json()["usage"]["performance"] for a in answers]
    assert all(p["queue_ms"] >= 400 and p["ttft_ms"] < 300 for p in performances), performances


def test_load_on_demand_never_undoes_an_operators_unload(start_sidecar: Start) -> None:
    sidecar = start_sidecar({"SIDECAR_LOAD_ON_DEMAND": "true"})
    assert _load(sidecar, ttl_s=60).status_code == 200
    assert httpx.post(f"{sidecar.url}/v1/model/unload", json={}, timeout=30).status_code == 200
    answered = sidecar.chat()
    assert answered.status_code == 503 and answered.json()["error"]["code"] == "engine_not_ready"
    assert sidecar.status()["state"] == "idle"
